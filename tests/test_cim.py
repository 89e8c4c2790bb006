"""Tests for pretrain.CIM.forward, the whole CIM step: tokenize, generator loss, sample, mix, decode,
resize, enhancer loss. An untrained tiny dVAE (f = 2), 32 px images, 8 px patches -> a 4 x 4 grid."""
import pytest
import torch
import torch.nn.functional as F

import dvae
import enhancer as enh
import generator as gen
from pretrain import CIM

IMG, PATCH, GRID, VOCAB = 32, 8, 4, 32


def tiny_generator(vocab=VOCAB, cls=gen.BEiTGenerator):
    return cls(img_size=IMG, patch_size=PATCH, vocab_size=vocab, embed_dim=32, depth=1, num_heads=4)


def tiny_enhancer(objective="revdet"):
    backbone = enh.build_backbone("vit_mini", img_size=IMG, patch_size=PATCH, embed_dim=32, depth=1,
                                  num_heads=2)
    return enh.Enhancer(backbone, objective, GRID, "window", 5)


@pytest.fixture
def dvae_parts():
    """A tiny real dVAE (untrained): (encoder, decoder, down-sampling factor f)."""
    torch.manual_seed(0)
    enc = dvae.Encoder(group_count=2, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=VOCAB)
    dec = dvae.Decoder(group_count=2, n_init=8, n_hid=8, n_blk_per_group=1, output_channels=3,
                       vocab_size=VOCAB)
    return enc, dec, enc.downsample


def _batch(B, f, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, IMG, IMG, generator=g)
    tok_images = torch.rand(B, 3, GRID * f, GRID * f, generator=g)
    mask = gen.random_masking(B, GRID * GRID, 0.5, generator=g)
    return images, tok_images, mask


def test_step_outputs_and_labels(dvae_parts):
    enc, dec, f = dvae_parts
    model = CIM(tiny_generator(), tiny_enhancer(), enc, dec)
    images, tok_images, mask = _batch(4, f)
    loss, out = model(images, tok_images, mask)
    B, N = 4, GRID * GRID
    for k in ("tokens", "mixed", "mask", "replaced"):
        assert out[k].shape == (B, N), k
    assert out["mask"].dtype == out["replaced"].dtype == torch.bool
    assert out["corrupted"].shape == (B, 3, IMG, IMG) and not out["corrupted"].requires_grad
    assert out["corrupted"].min() >= 0 and out["corrupted"].max() <= 1
    assert torch.equal(out["tokens"], dvae.tokenize(enc, tok_images).flatten(1))
    # Tokens outside the mask pass through; the label is exactly "mixed differs from the tokenizer".
    assert torch.equal(out["mixed"][~mask], out["tokens"][~mask])
    assert not out["replaced"][~mask].any()
    assert torch.equal(out["replaced"][mask], out["mixed"][mask] != out["tokens"][mask])
    assert out["replaced"].any()  # an untrained generator over 32 codes gets most wrong
    assert 0 <= out["acc_gen"].item() <= 1 and not out["acc_gen"].requires_grad
    assert out["mixed"].max() < VOCAB
    # the corrupted image is the decoded mix, resized bilinearly to the input size
    want = F.interpolate(dvae.decode(dec, out["mixed"].view(B, GRID, GRID)), size=(IMG, IMG),
                         mode="bilinear", align_corners=False)
    assert torch.allclose(out["corrupted"], want)
    assert loss.item() == pytest.approx((out["loss_gen"] + out["loss_enh"]).item())

    loss.backward()
    assert all(p.grad is not None for p in model.generator.parameters())
    assert all(p.grad is None for p in list(enc.parameters()) + list(dec.parameters()))
    assert set(model.state_dict()) == {f"generator.{k}" for k in model.generator.state_dict()} | \
        {f"enhancer.{k}" for k in model.enhancer.state_dict()}  # the frozen dVAE is not saved


def test_sampled_tokens_follow_the_generator_order(dvae_parts):
    """masked_scatter fills masked positions in row-major order, the order of the generator's logits:
    with argmax sampling from logits that name a known token per position, mixed holds exactly it."""
    enc, dec, f = dvae_parts
    images, tok_images, mask = _batch(3, f, seed=2)

    class Fixed(gen.BEiTGenerator):
        def forward(self, x, mask, targets=None):
            logits, _ = super().forward(x, mask)
            want = torch.arange(int(mask.sum())) % self.vocab_size           # (M,) a known sequence
            logits = logits * 0 + 50.0 * F.one_hot(want, self.vocab_size)
            return logits, self.loss(logits, targets.flatten(1)[mask])

    model = CIM(tiny_generator(cls=Fixed), tiny_enhancer(), enc, dec, sample="argmax")
    _, out = model(images, tok_images, mask)
    assert torch.equal(out["mixed"][mask], torch.arange(int(mask.sum())) % VOCAB)


def test_perfect_generator_replaces_nothing(dvae_parts):
    enc, dec, f = dvae_parts

    class Oracle(gen.BEiTGenerator):
        """Predicts the true token with certainty (it peeks at the targets)."""

        def forward(self, x, mask, targets=None):
            logits, _ = super().forward(x, mask)
            logits = logits * 0 + 50.0 * F.one_hot(targets.flatten(1)[mask], self.vocab_size)
            return logits, self.loss(logits, targets.flatten(1)[mask])

    model = CIM(tiny_generator(cls=Oracle), tiny_enhancer("respix"), enc, dec, sample="argmax")
    images, tok_images, mask = _batch(3, f, seed=1)
    _, out = model(images, tok_images, mask)
    assert not out["replaced"].any() and torch.equal(out["mixed"], out["tokens"])
    assert out["acc_gen"].item() == 1.0
    # The corrupted image is then just the dVAE reconstruction, resized bilinearly.
    recon = dvae.decode(dec, out["tokens"].view(3, GRID, GRID))
    want = F.interpolate(recon, size=(IMG, IMG), mode="bilinear", align_corners=False)
    assert torch.allclose(out["corrupted"], want)


def test_trace_sees_every_phase_in_order(dvae_parts):
    enc, dec, f = dvae_parts
    model = CIM(tiny_generator(), tiny_enhancer(), enc, dec)
    seen = []
    model(*_batch(2, f), trace=lambda name, value: seen.append(name))
    assert seen == ["tokens", "logits", "loss_gen", "mixed", "replaced", "corrupted", "enhancer output",
                    "loss_enh", "loss"]


def test_tokenizer_that_does_not_fit_is_named(dvae_parts):
    enc, dec, f = dvae_parts
    images, tok_images, mask = _batch(2, f)
    with pytest.raises(ValueError, match=r"token grid.*generator expects 4x4"):
        big = torch.rand(2, 3, 2 * GRID * f, 2 * GRID * f)
        CIM(tiny_generator(), tiny_enhancer(), enc, dec)(images, big, mask)
    with pytest.raises(ValueError, match=r"vocabulary \(32\).*lm_head \(16\)"):
        CIM(tiny_generator(vocab=16), tiny_enhancer(), enc, dec)
    small_dec = dvae.Decoder(group_count=2, n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match=r"encoder has 32 codes but the decoder 16"):
        CIM(tiny_generator(), tiny_enhancer(), enc, small_dec)
    # A wider lm_head is fine: samples stay inside the tokenizer's codebook.
    _, out = CIM(tiny_generator(vocab=64), tiny_enhancer(), enc, dec)(images, tok_images, mask)
    assert out["mixed"].max() < VOCAB


def test_an_integer_mask_selects_like_a_bool_mask(dvae_parts):
    """A 0/1 uint8 mask must not index by value (tokens[mask] would pick rows 0 and 1)."""
    enc, dec, f = dvae_parts
    model = CIM(tiny_generator(), tiny_enhancer(), enc, dec, sample="argmax")
    images, tok_images, mask = _batch(2, f)
    loss_b, out_b = model(images, tok_images, mask)
    loss_u, out_u = model(images, tok_images, mask.to(torch.uint8))
    assert torch.equal(out_b["mixed"], out_u["mixed"]) and loss_b.item() == loss_u.item()
