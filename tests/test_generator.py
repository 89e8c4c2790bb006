"""Tests for generator.py: masking, relative position bias, the BEiT generator, sampling, corrupt().

Tiny configs (32 px images, 8 px patches -> a 4x4 token grid) keep the whole file to seconds on a CPU.
"""
import math
import os
import random
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dvae  # noqa: E402
import generator as gen  # noqa: E402

IMG, PATCH, GRID, VOCAB = 32, 8, 4, 32


def tiny_generator(vocab=VOCAB, depth=2, **kw):
    return gen.BEiTGenerator(img_size=IMG, patch_size=PATCH, vocab_size=vocab, embed_dim=32, depth=depth,
                             num_heads=4, **kw)


# ----------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,n", [(0.5, 196), (0.75, 196), (0.4, 16), (0.3, 10), (0.1, 3), (0.2, 1)])
def test_random_masking_exact_count(ratio, n):
    mask = gen.random_masking(64, n, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, n)
    assert (mask.sum(1) == max(1, round(ratio * n))).all()  # round(0.1*3) = 0 -> still one masked


def test_random_masking_differs_per_row_and_is_uniform():
    mask = gen.random_masking(20000, 16, 0.5, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.tolist()) for row in mask[:50]}) > 45  # a fresh pattern per image
    freq = mask.float().mean(0)
    assert (freq - 0.5).abs().max() < 0.02  # every position masked half the time


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_random_masking_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="--mask-ratio"):
        gen.random_masking(2, 16, ratio)


def test_blockwise_default_behaviour():
    # BEiT's defaults: 75 of 196 patches, blocks of at least 16. The count never exceeds the target and
    # usually meets it; when 10 tries fail to fit a block, it stops a few patches short (as BEiT does).
    mask = gen.blockwise_masking(500, 14, 75, min_patches=16, generator=random.Random(0))
    assert mask.dtype == torch.bool and mask.shape == (500, 196)
    counts = mask.sum(1).float()
    assert counts.max() <= 75 and counts.min() >= 60
    assert 74.0 < counts.mean() <= 75.0
    assert (counts == 75).float().mean() > 0.5


def test_blockwise_first_block_respects_min_patches():
    # With square blocks (aspect 1) and target == min_patches, the single block drawn has area exactly
    # min_patches: one contiguous k x k square.
    for k in (2, 3, 4):
        mask = gen.blockwise_masking(20, 14, k * k, min_patches=k * k, min_aspect=1.0,
                                     generator=random.Random(k)).view(20, 14, 14)
        for m in mask:
            rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
            assert len(rows) == len(cols) == k and int(m.sum()) == k * k
            assert (rows.diff() == 1).all() and (cols.diff() == 1).all()


def test_blockwise_is_blocky_and_reproducible():
    a = gen.blockwise_masking(8, 14, 75, generator=random.Random(3)).view(8, 14, 14)
    b = gen.blockwise_masking(8, 14, 75, generator=random.Random(3)).view(8, 14, 14)
    assert torch.equal(a, b)
    # Blocks, not salt-and-pepper: most masked patches have a masked 4-neighbour.
    padded = F.pad(a.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[a] > 0).float().mean() > 0.95


def test_mask_patches_dispatch():
    g = torch.Generator().manual_seed(0)
    assert (gen.mask_patches("random", 4, GRID, 0.5, generator=g).sum(1) == 8).all()
    block = gen.mask_patches("block", 4, 14, 75 / 196, generator=g)
    assert block.shape == (4, 196) and (block.sum(1) <= 75).all()
    with pytest.raises(ValueError, match="--mask-type"):
        gen.mask_patches("grid", 4, GRID, 0.5)


# ----------------------------------------------------------------------------------------------------
# Relative position bias
# ----------------------------------------------------------------------------------------------------

def test_relative_position_bias_index_and_output():
    G, heads = 3, 2
    rpb = gen.RelativePositionBias(G, heads)
    n = G * G
    assert rpb.relative_position_bias_table.shape == ((2 * G - 1) ** 2 + 3, heads)
    assert (rpb.relative_position_bias_table == 0).all()  # zero init
    assert rpb().shape == (heads, n + 1, n + 1)
    assert "relative_position_index" not in rpb.state_dict()

    idx = rpb.relative_position_index
    assert idx.shape == (n + 1, n + 1)
    # The 3 special rows: cls->token, token->cls, cls->cls.
    top = rpb.num_distances
    assert (idx[0, 1:] == top - 3).all() and (idx[1:, 0] == top - 2).all() and idx[0, 0] == top - 1
    # Patches: same (dy, dx) offset <=> same index; every offset used; the diagonal is the zero offset.
    pos = [(i // G, i % G) for i in range(n)]
    offsets = {}
    for q in range(n):
        for k in range(n):
            off = (pos[q][0] - pos[k][0], pos[q][1] - pos[k][1])
            offsets.setdefault(off, set()).add(int(idx[1 + q, 1 + k]))
    assert all(len(v) == 1 for v in offsets.values())
    assert len({v.pop() for v in offsets.values()}) == (2 * G - 1) ** 2 == top - 3
    assert len(set(idx.diagonal()[1:].tolist())) == 1

    # The bias reads the table: write a value per row and look it up.
    with torch.no_grad():
        rpb.relative_position_bias_table.copy_(torch.arange(top * heads, dtype=torch.float).view(top, heads))
    out = rpb()
    assert out[1, 2, 5] == rpb.relative_position_bias_table[idx[2, 5], 1]
    assert out[0, 0, 0] == rpb.relative_position_bias_table[top - 1, 0]


# ----------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------

def test_generator_forward_backward_shapes():
    torch.manual_seed(0)
    model = tiny_generator(drop_path_rate=0.1)
    x = torch.randn(3, 3, IMG, IMG)
    mask = gen.random_masking(3, GRID * GRID, 0.5)
    tokens = torch.randint(VOCAB, (3, GRID, GRID))
    logits, loss = model(x, mask, tokens)
    assert logits.shape == (int(mask.sum()), VOCAB)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(VOCAB)) < 1.0  # near-uniform at init
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters()), "every parameter gets a gradient"
    assert model(x, mask)[1] is None


def test_generator_targets_align_with_mask_order():
    # logits row i belongs to the i-th True of mask in row-major order: CE per row with
    # tokens.flatten(1)[mask] equals the model's loss.
    torch.manual_seed(0)
    model = tiny_generator().eval()
    x, tokens = torch.randn(2, 3, IMG, IMG), torch.randint(VOCAB, (2, GRID * GRID))
    mask = gen.random_masking(2, GRID * GRID, 0.25)
    logits, loss = model(x, mask, tokens)
    feats = model.forward_features(x, mask)[:, 1:]  # (B, N, D)
    b, n = mask.nonzero(as_tuple=True)
    assert torch.allclose(logits, model.lm_head(feats[b, n]))
    assert torch.allclose(loss, F.cross_entropy(logits, tokens[b, n]))


def test_masked_pixels_are_invisible():
    # The mask token replaces the masked patch embeddings, so the pixels under the mask cannot matter.
    torch.manual_seed(0)
    model = tiny_generator().eval()
    x = torch.randn(2, 3, IMG, IMG)
    mask = gen.random_masking(2, GRID * GRID, 0.5)
    pixel_mask = mask.view(2, 1, GRID, 1, GRID, 1).expand(2, 3, GRID, PATCH, GRID, PATCH)
    pixel_mask = pixel_mask.reshape(2, 3, IMG, IMG)  # (B, 3, H, W): True inside masked patches
    x2 = torch.where(pixel_mask, torch.randn_like(x) * 5, x)
    assert torch.equal(model(x, mask)[0], model(x2, mask)[0])
    x3 = torch.where(pixel_mask, x, x + 1)  # changing visible pixels does change the predictions
    assert not torch.allclose(model(x, mask)[0], model(x3, mask)[0])


def test_generator_init_and_no_weight_decay():
    torch.manual_seed(0)
    model = gen.BEiTGenerator(img_size=IMG, patch_size=PATCH, vocab_size=VOCAB, embed_dim=96, depth=3,
                              num_heads=4)
    for i, blk in enumerate(model.blocks):  # BEiT's per-layer rescale 1/sqrt(2 * layer)
        want = 0.02 / math.sqrt(2 * (i + 1))
        assert abs(blk.attn.proj.weight.std().item() / want - 1) < 0.05
        assert abs(blk.mlp.fc2.weight.std().item() / want - 1) < 0.05
        assert abs(blk.mlp.fc1.weight.std().item() / 0.02 - 1) < 0.05  # others untouched
        assert torch.allclose(blk.ls1.gamma, torch.full_like(blk.ls1.gamma, 0.1))
        assert blk.attn.qkv.bias is None and blk.attn.q_bias is not None
    assert abs(model.mask_token.std().item() / 0.02 - 1) < 0.3
    assert model.pos_embed is None
    assert model.no_weight_decay() == {"cls_token", "mask_token", "rel_pos_bias.relative_position_bias_table"}
    absolute = tiny_generator(shared_rel_pos_bias=False)
    assert absolute.rel_pos_bias is None and absolute.pos_embed.shape == (1, GRID * GRID + 1, 32)
    assert absolute.no_weight_decay() == {"cls_token", "mask_token", "pos_embed"}


def test_generator_rejects_wrong_mask_and_empty_mask_is_finite():
    model = tiny_generator(depth=1)
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="mask"):
        model(x, torch.zeros(2, 9, dtype=torch.bool))
    logits, loss = model(x, torch.zeros(2, GRID * GRID, dtype=torch.bool), torch.zeros(2, GRID * GRID).long())
    assert logits.shape == (0, VOCAB) and loss.item() == 0.0


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_tokens_matches_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    draws = gen.sample_tokens(logits.expand(200_000, 5), temperature,
                              generator=torch.Generator().manual_seed(0))
    assert draws.shape == (200_000,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert (freq - F.softmax(logits / temperature, -1)).abs().max() < 0.01


def test_sample_tokens_argmax_and_errors():
    logits = torch.randn(50, 7)
    a = gen.sample_tokens(logits, mode="argmax")
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(a, gen.sample_tokens(logits, mode="argmax"))
    with pytest.raises(ValueError, match="--sample"):
        gen.sample_tokens(logits, mode="top-k")
    for t in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--temperature"):
            gen.sample_tokens(logits, t)


# ----------------------------------------------------------------------------------------------------
# corrupt()
# ----------------------------------------------------------------------------------------------------

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


def test_corrupt_outputs_and_labels(dvae_parts):
    enc, dec, f = dvae_parts
    model = tiny_generator()
    images, tok_images, mask = _batch(4, f)
    out = gen.corrupt(model, enc, dec, images, tok_images, mask, rng=torch.Generator().manual_seed(0))
    B, N = 4, GRID * GRID
    for k in ("tokens", "mixed", "mask", "replaced"):
        assert out[k].shape == (B, N), k
    assert out["mask"].dtype == out["replaced"].dtype == torch.bool
    assert out["corrupted"].shape == (B, 3, IMG, IMG) and not out["corrupted"].requires_grad
    assert out["corrupted"].min() >= 0 and out["corrupted"].max() <= 1
    # Tokens outside the mask pass through; the label is exactly "mixed differs from the tokenizer".
    assert torch.equal(out["mixed"][~mask], out["tokens"][~mask])
    assert not out["replaced"][~mask].any()
    assert torch.equal(out["replaced"][mask], out["mixed"][mask] != out["tokens"][mask])
    assert out["replaced"].any()  # an untrained generator over 32 codes gets most wrong
    assert 0 <= out["acc_gen"].item() <= 1 and not out["acc_gen"].requires_grad
    assert out["mixed"].max() < VOCAB

    out["loss_gen"].backward()
    assert torch.isfinite(out["loss_gen"])
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in list(enc.parameters()) + list(dec.parameters()))


def test_corrupt_perfect_generator_replaces_nothing(dvae_parts):
    enc, dec, f = dvae_parts

    class Oracle(gen.BEiTGenerator):
        """Predicts the true token with certainty (it peeks at the targets)."""

        def forward(self, x, mask, targets=None):
            logits, _ = super().forward(x, mask)
            logits = logits * 0 + 50.0 * F.one_hot(targets.flatten(1)[mask], self.vocab_size)
            return logits, self.loss(logits, targets.flatten(1)[mask])

    oracle = Oracle(img_size=IMG, patch_size=PATCH, vocab_size=VOCAB, embed_dim=32, depth=1, num_heads=2)
    images, tok_images, mask = _batch(3, f, seed=1)
    out = gen.corrupt(oracle, enc, dec, images, tok_images, mask, sample="argmax")
    assert not out["replaced"].any() and torch.equal(out["mixed"], out["tokens"])
    assert out["acc_gen"].item() == 1.0
    # The corrupted image is then just the dVAE reconstruction, resized bilinearly.
    recon = dvae.decode(dec, out["tokens"].view(3, GRID, GRID))
    want = F.interpolate(recon, size=(IMG, IMG), mode="bilinear", align_corners=False)
    assert torch.allclose(out["corrupted"], want)


def test_corrupt_rejects_tokenizer_that_does_not_fit(dvae_parts):
    enc, dec, f = dvae_parts
    images, tok_images, mask = _batch(2, f)
    with pytest.raises(ValueError, match=r"token grid.*generator expects 4x4"):
        big = torch.rand(2, 3, 2 * GRID * f, 2 * GRID * f)
        gen.corrupt(tiny_generator(depth=1), enc, dec, images, big, mask)
    with pytest.raises(ValueError, match=r"vocabulary \(32\).*lm_head \(16\)"):
        gen.corrupt(tiny_generator(vocab=16, depth=1), enc, dec, images, tok_images, mask)
    small_dec = dvae.Decoder(group_count=2, n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match=r"encoder has 32 codes but the decoder 16"):
        gen.corrupt(tiny_generator(depth=1), enc, small_dec, images, tok_images, mask)
    # A wider lm_head is fine: samples stay inside the tokenizer's codebook.
    out = gen.corrupt(tiny_generator(vocab=64, depth=1), enc, dec, images, tok_images, mask)
    assert out["mixed"].max() < VOCAB
