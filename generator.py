"""The generator side of CIM: masking, the small BEiT generator, sampling of replacement tokens.

CIM (Fang et al., ICLR 2023, arXiv 2202.03382) corrupts an image by letting a small BEiT predict the
dVAE tokens of randomly masked patches, *sampling* replacements from its prediction and decoding the
mixed token map with the frozen dVAE decoder. This file holds the generator's part of that: which
patches are masked, the network, and the sampling. The corruption itself (tokenize, generate, sample,
mix, decode) reads top to bottom in pretrain.py's CIM.forward.

Needs torch and enhancer.py (the generator is built from the enhancer's transformer blocks): copy
the two files together. Shape letters as in the rest of the repo: B batch, N tokens (patches),
G token-grid side, D width, V vocabulary, M masked tokens in a batch, h heads.
Mask convention everywhere: True / 1 = masked (generator input) or replaced (RevDet label).
"""
import functools
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from enhancer import Block, PatchEmbed, init_vit_weights


# ----------------------------------------------------------------------------------------------------
# Masking (which patches the generator must predict; True = masked)
# ----------------------------------------------------------------------------------------------------

def _check_ratio(ratio):
    if not 0 < ratio < 1:
        raise ValueError(f"--mask-ratio must be strictly between 0 and 1, got {ratio}")


def random_masking(batch_size, num_patches, ratio=0.5, device=None, generator=None):
    """Uniform random masking, a fresh pattern per image -> BoolTensor (B, N), True = masked.

    Every row has exactly max(1, round(ratio * N)) True entries (Python's round): CIM's default is
    ~50% random masking (paper Table 7), and at least one masked patch keeps the generator loss
    defined. Positions are the first k of an argsort of uniform noise, as in MAE. `generator` is an
    optional torch.Generator living on `device`.
    """
    _check_ratio(ratio)
    num_masked = max(1, round(ratio * num_patches))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)  # (B, N)
    ids = noise.argsort(dim=1)[:, :num_masked]                                        # (B, k)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, ids, True)


def _add_block(mask, remaining, min_patches, log_aspect, rng):
    """One step of BEiT's MaskingGenerator._mask: up to 10 tries to place a rectangle that adds between
    1 and `remaining` new masked patches to `mask` (G, G) in place. Returns how many it added (0 = gave up).
    """
    grid = mask.shape[0]
    for _ in range(10):
        # When remaining < min_patches, uniform(min, remaining) draws from [remaining, min] (as BEiT does).
        area = rng.uniform(min_patches, remaining)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if h >= grid or w >= grid:  # BEiT's strict bound: a block never spans the whole grid
            continue
        top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
        block = mask[top:top + h, left:left + w]  # a view: writing it writes mask
        new = h * w - int(block.sum())
        if 0 < new <= remaining:
            block.fill_(True)
            return new
    return 0


def blockwise_masking(batch_size, grid, num_masking, min_patches=16, min_aspect=0.3, max_aspect=None,
                      generator=None):
    """BEiT's blockwise masking -> BoolTensor (B, G*G) on the CPU, True = masked.

    Per image, rectangles of area U[min_patches, remaining] and log-uniform aspect ratio in
    [min_aspect, max_aspect or 1/min_aspect] are added until `num_masking` patches are masked. As in
    BEiT, it stops early when 10 tries in a row fail to add a fitting block, so a row can end a few
    patches *under* the target (never over); blocks drawn near the end may be smaller than
    min_patches. `generator` is a python random.Random (the loop draws scalars; None uses the global
    `random` module, which DataLoader workers seed per worker).
    """
    if not 1 <= num_masking <= grid * grid:
        raise ValueError(f"blockwise masking of {num_masking} patches does not fit a {grid}x{grid} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
    rng = random if generator is None else generator
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    masks = torch.zeros(batch_size, grid, grid, dtype=torch.bool)  # (B, G, G)
    for mask in masks:
        count = 0
        while count < num_masking:
            added = _add_block(mask, num_masking - count, min_patches, log_aspect, rng)
            if added == 0:
                break
            count += added
    return masks.flatten(1)  # (B, N)


def mask_patches(kind, batch_size, grid, ratio=0.5, min_patches=16, device=None, generator=None):
    """The `--mask-type` switch: 'random' (CIM default) or 'block' (BEiT) -> BoolTensor (B, G*G).

    True = masked; `ratio` is the fraction of the G*G patches to mask (a target for 'block').

    Both draw from one torch.Generator (`generator`, on `device`, or the global RNG): blockwise masking
    seeds its python random.Random from it, so one seed reproduces either kind.
    """
    _check_ratio(ratio)
    if kind == "random":
        return random_masking(batch_size, grid * grid, ratio, device=device, generator=generator)
    if kind == "block":
        seed = int(torch.randint(2 ** 62, (1,), device=device, generator=generator))
        num_masking = max(1, round(ratio * grid * grid))
        return blockwise_masking(batch_size, grid, num_masking, min_patches,
                                 generator=random.Random(seed)).to(device)
    raise ValueError(f"--mask-type must be 'random' or 'block', got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# The small BEiT generator (masked image modelling over dVAE tokens)
# ----------------------------------------------------------------------------------------------------

class RelativePositionBias(nn.Module):
    """BEiT's relative position bias, shared by all blocks: forward() -> (h, 1+N, 1+N) attention bias.

    The table has one row per 2-D offset between patches, (2G-1)^2 of them, plus 3 rows for the cls
    token (cls->token, token->cls, cls->cls) which has no position. Zero init, so training starts
    from plain attention. Names follow BEiT (`relative_position_bias_table`); the index is rebuilt
    from the grid, so it is a non-persistent buffer and stays out of checkpoints.
    """

    def __init__(self, grid, num_heads):
        super().__init__()
        self.num_distances = (2 * grid - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_distances, num_heads))
        self.register_buffer("relative_position_index", self._index(grid), persistent=False)

    def _index(self, grid):
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])    # (2, N), row-major like the patch order
        rel = coords[:, :, None] - coords[:, None, :]         # (2, N, N) query minus key offset
        rel = rel + (grid - 1)                                # offsets shifted into [0, 2G-2]
        patch_index = rel[0] * (2 * grid - 1) + rel[1]        # (N, N) row of each (dy, dx) in the table
        n = grid * grid
        index = torch.empty(n + 1, n + 1, dtype=torch.long)   # (1+N, 1+N), position 0 = cls
        index[1:, 1:] = patch_index
        index[0, :] = self.num_distances - 3  # cls query -> tokens
        index[:, 0] = self.num_distances - 2  # token queries -> cls
        index[0, 0] = self.num_distances - 1  # cls -> cls
        return index

    def forward(self):
        n1 = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]  # ((1+N)^2, h)
        return bias.view(n1, n1, -1).permute(2, 0, 1).contiguous()                        # (h, 1+N, 1+N)


class BEiTGenerator(nn.Module):
    """The small BEiT that CIM uses as its generator (paper Sec. 2.1; 4-6 blocks work best, Table 8).

    It sees the image with masked patch embeddings replaced by a learnable mask token and predicts
    the dVAE token of every masked patch. forward(x, mask, targets=None) -> (logits, loss):
    logits (M, V) for the M = mask.sum() masked positions in row-major `mask` order, so
    `targets.flatten(1)[mask]` are the matching tokens; loss is the cross-entropy when `targets`
    (the full token map, (B, N) or (B, G, G)) is given, else None.

    shared_rel_pos_bias=True is BEiT's pre-training setup (one relative position bias for all blocks,
    no absolute position embedding); False uses a learnable absolute `pos_embed` instead.
    """

    def __init__(self, img_size=224, patch_size=16, vocab_size=8192, embed_dim=256, depth=4, num_heads=4,
                 mlp_ratio=4.0, init_values=0.1, shared_rel_pos_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.grid = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if shared_rel_pos_bias:
            self.pos_embed = None
            self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
            self.rel_pos_bias = None
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, qv_bias=True, drop_path=rates[i],
                  init_values=init_values)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self._init_weights()

    def _init_weights(self):
        # BEiT's trunc_normal_(std=0.02, a=-std, b=std): truncated at one standard deviation
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02, a=-0.02, b=0.02)
        self.apply(functools.partial(init_vit_weights, std=0.02, bound=0.02))
        # BEiT's fix_init_weight: shrink each block's residual outputs by 1/sqrt(2 * layer) so the
        # residual stream's variance does not grow with depth at init.
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self):
        """Parameter names AdamW should not decay (besides the 1-D norms and biases pretrain.py skips)."""
        names = {"cls_token", "mask_token", "pos_embed", "rel_pos_bias.relative_position_bias_table"}
        return {n for n, _ in self.named_parameters() if n in names}

    def embed(self, x, mask):
        x = self.patch_embed(x)  # (B, N, D)
        B, N, _ = x.shape
        if mask.shape != (B, N):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the generator expects {(B, N)}")
        # The mask token replaces masked patch embeddings before cls token and positions are added,
        # so a masked patch keeps its position but nothing of its pixels (BEiT).
        w = mask.unsqueeze(-1).type_as(x)  # (B, N, 1)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # (B, 1+N, D)
        return x if self.pos_embed is None else x + self.pos_embed

    def forward_features(self, x, mask):
        x = self.embed(x, mask)  # (B, 1+N, D)
        bias = None if self.rel_pos_bias is None else self.rel_pos_bias()  # (h, 1+N, 1+N)
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x)

    def forward(self, x, mask, targets=None):
        mask = mask.bool()  # a uint8 mask would index by value, not select
        x = self.forward_features(x, mask)[:, 1:]  # (B, N, D), cls dropped
        logits = self.lm_head(x[mask])              # (M, V): the head runs on masked tokens only
        if targets is None:
            return logits, None
        return logits, self.loss(logits, targets.flatten(1)[mask])

    @staticmethod
    def loss(logits, targets):
        """Cross-entropy over masked positions, logits (M, V) and targets (M,)."""
        if logits.shape[0] == 0:
            # The mean over an empty mask is NaN (a known pitfall of the public MIM code); 0 keeps the graph.
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), targets)


# ----------------------------------------------------------------------------------------------------
# Sampling: the generator's guesses become replacement tokens
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_tokens(logits, temperature=1.0, mode="softmax", generator=None):
    """Replacement tokens from logits (..., V) -> LongTensor (...).

    'softmax' draws z' ~ Categorical(softmax(logits / T)), CIM's choice: sampling rather than the
    most likely token keeps the corruptions diverse and plausible (paper Table 9 ablates argmax).
    'argmax' is deterministic. `generator` is an optional torch.Generator on the logits' device.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a positive number, got {temperature}")
    if mode == "argmax":
        return logits.argmax(-1)
    if mode != "softmax":
        raise ValueError(f"--sample must be 'softmax' or 'argmax', got {mode!r}")
    V = logits.shape[-1]
    probs = F.softmax(logits.float().reshape(-1, V) / temperature, dim=-1)  # (M, V), fp32 for multinomial
    # A diverged generator (NaN or +inf logits give NaN rows) must not crash multinomial: the same
    # logits make L_gen non-finite, so the training step is skipped by its one skip decision anyway.
    probs = probs.nan_to_num(nan=1.0)
    z = torch.multinomial(probs, 1, generator=generator)                     # (M, 1)
    return z.view(logits.shape[:-1])                                         # (...)
