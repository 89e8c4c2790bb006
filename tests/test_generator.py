"""Tests for generator.py: masking, relative position bias, the BEiT generator, sampling.

Tiny configs (32 px images, 8 px patches -> a 4x4 token grid) keep the whole file to seconds on a CPU.
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import generator as gen

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
    # BEiT's trunc-normal(0.02) cut at +-1 std has std 0.02 * sqrt(1 - 2 phi(1) / (2 Phi(1) - 1))
    std = 0.02 * math.sqrt(1 - 2 * 0.2419707 / 0.6826895)  # 0.0108
    for i, blk in enumerate(model.blocks):  # BEiT's per-layer rescale 1/sqrt(2 * layer)
        want = std / math.sqrt(2 * (i + 1))
        assert abs(blk.attn.proj.weight.std().item() / want - 1) < 0.05
        assert abs(blk.mlp.fc2.weight.std().item() / want - 1) < 0.05
        assert abs(blk.mlp.fc1.weight.std().item() / std - 1) < 0.05  # others untouched
        assert torch.allclose(blk.ls1.gamma, torch.full_like(blk.ls1.gamma, 0.1))
        assert blk.attn.qkv.bias is None and blk.attn.q_bias is not None
    assert abs(model.mask_token.std().item() / std - 1) < 0.3
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


def test_sample_tokens_survives_non_finite_logits():
    """A diverged generator must not crash the sampler (its step is skipped by the training loop)."""
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3, [float("inf"), 0.0, 1.0],
                           [float("-inf")] * 3])
    draws = gen.sample_tokens(logits, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4,) and ((draws >= 0) & (draws < 3)).all()


def test_generator_init_is_truncated_at_one_std_as_beit():
    """BEiT calls trunc_normal_(std=0.02, a=-std, b=std): no weight beyond +-0.02 before the per-block
    rescale (blocks' proj/fc2 are divided further), but the full range is used."""
    model = tiny_generator(depth=1, vocab=512)
    for w in (model.lm_head.weight, model.blocks[0].attn.qkv.weight, model.mask_token, model.cls_token):
        assert w.abs().max() <= 0.02 and w.abs().max() > 0.015
    assert 0.0100 < model.lm_head.weight.std() < 0.0116  # N(0, 0.02) truncated at +-1 sigma: 0.0108
