"""The enhancer side of CIM: ViT and ResNet backbones, RevDet and ResPix heads, target normalisation.

CIM (Fang et al., ICLR 2023, arXiv 2202.03382) trains the enhancer on the corrupted image x~ that
pretrain.py's CIM.forward decodes from the generator's samples. There is no [MASK] token here: the enhancer only ever sees real-looking pixels,
which is the point of the method (Sec. 3). Two objectives (Sec. 3.2):

    RevDet  "replaced token detection": one logit per token of the tokenizer grid, label 1 where the
            token fed to the dVAE decoder differs from the tokenizer's token; BCE over ALL tokens.
    ResPix  "generative": regress ALL original pixels; the target is the original image normalised
            per pixel by the mean/std of a k x k window around it (sliding-window normalisation).

Backbones carry the parameter names of the checkpoints people already have, timm's
`VisionTransformer` and torchvision's `resnet50`, so `export_backbone()` is a plain state_dict and
loads there with no renaming table; `load_backbone()` goes the other way, from any checkpoint kind
(ours, MAE's, BEiT's, timm's, torchvision's) to a backbone, which is how the downstream stages read
what pre-training wrote.

It also owns the transformer parts (patch embedding, attention with an optional relative position
bias, MLP, block with optional layer scale, stochastic depth, init) that generator.py builds its small
BEiT from. Needs torch alone: copy the file into another project and it runs.

Shape letters used throughout the repo: B batch, N tokens (patches), D width, H/W height/width,
P patch size, h heads. 1 / True = replaced (RevDet label) or masked (generator input).
"""
import math
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Transformer parts (parameter names follow timm's VisionTransformer so weights move with strict=True)
# ----------------------------------------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches -> D-dim tokens with one strided conv (`proj`, as in timm)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)                     # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability p."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    """Per-channel learnable residual scale (CaiT / BEiT); stored as `gamma` like timm's `lsN.gamma`."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention.

    qkv_bias=True gives timm's single `qkv.bias`; qv_bias=True gives BEiT's separate `q_bias` and
    `v_bias` (keys get no bias: it would cancel in the softmax). `bias` in forward is an additive
    attention bias (h, N, N) or (B, h, N, N), e.g. BEiT's relative position bias.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, qv_bias=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if qkv_bias and qv_bias:
            raise ValueError("choose qkv_bias (timm) or qv_bias (BEiT), not both")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        B, N, D = x.shape
        qkv_b = None
        if self.q_bias is not None:
            qkv_b = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, qkv_b if qkv_b is not None else self.qkv.bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, D/h)
        if bias is not None:
            bias = bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    init_values=None turns layer scale off (timm's default, no `ls*` keys); a float turns it on.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qv_bias=False, drop_path=0.0,
                 init_values=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qv_bias=qv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x, bias=None):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), bias)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def init_vit_weights(module, std=0.02, bound=2.0):
    """trunc-normal(std) linears and convs (convs viewed as linears), zero biases, unit LayerNorms.

    `bound` is the truncation point in absolute units, as torch's trunc_normal_(a, b) takes it. timm's
    ViT keeps torch's default of +-2 (at std 0.02 that is no truncation at all); BEiT passes
    a=-std, b=std, i.e. truncates at one standard deviation: generator.py uses bound=std.
    Use as `module.apply(functools.partial(init_vit_weights, bound=...))` or plain `module.apply(init_vit_weights)`.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight.view(module.weight.shape[0], -1), std=std, a=-bound, b=bound)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------
# ViT backbone (timm `VisionTransformer` names; no head)
# ----------------------------------------------------------------------------------------------------

def resize_pos_embed(pos_embed, grid):
    """Bicubically resize a (1, 1+G*G, D) position table to another grid, square (an int) or
    (rows, cols) for non-square inputs; the cls row is kept.

    Used when the backbone runs at a resolution other than the one it was built for, e.g. 512 px
    segmentation crops on a 224 px pre-trained model (the BEiT/MAE fine-tuning recipe).
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(patch_pos.shape[1] ** 0.5)
    D = patch_pos.shape[2]
    patch_pos = patch_pos.reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, H, W)
    patch_pos = F.interpolate(patch_pos, size=(gh, gw), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, D)  # (1, N, D)
    return torch.cat([cls_pos, patch_pos], dim=1)


class VisionTransformer(nn.Module):
    """Plain ViT with a cls token and learned absolute positions, parameter names as timm's.

    forward(x) returns the final-LayerNorm'ed tokens including cls, (B, 1+N, D), like timm's
    `forward_features`; heads decide what to read from them.
    """

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=True, drop_path_rate=0.0, init_values=None):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.embed_dim = self.num_features = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        # stochastic depth grows linearly with depth (timm / BEiT)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], init_values=init_values)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def embed(self, x, mask=None, mask_token=None):
        """Image (B, 3, H, W) -> tokens with cls prepended and positions added, (B, 1+N, D). With a
        mask (B, N), True = masked, the masked patch embeddings become `mask_token` first (BEiT's
        masked image modelling: a masked patch keeps its position, nothing of its pixels)."""
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            w = mask.unsqueeze(-1).type_as(x)  # (B, N, 1)
            x = x * (1 - w) + mask_token * w
        pos = self.pos_embed
        if grid != (self.grid_size, self.grid_size):  # another input size: interpolated positions
            pos = resize_pos_embed(pos, grid)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + pos

    def forward(self, x, mask=None, mask_token=None):
        x = self.embed(x, mask, mask_token)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # (B, 1+N, D)

    def get_layer_outputs(self, x, layers):
        """Token maps (B, 1+N, D) after the given blocks, counted from 1 like BEiT's "4, 6, 8, 12".

        Returned in the order asked, un-normalised (the UperNet necks in segment.py add their own
        norms), cls token included; callers drop it with `[:, 1:]`.
        """
        layers = list(layers)
        if any(not 1 <= k <= len(self.blocks) for k in layers):
            raise ValueError(f"layers {layers} outside 1..{len(self.blocks)}")
        x, outs = self.embed(x), {}
        for k, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            outs[k] = x
            if k == max(layers):
                break  # later blocks are not needed
        return [outs[k] for k in layers]


# ----------------------------------------------------------------------------------------------------
# ResNet backbone (torchvision v1.5 names: stride on the 3x3 conv; no `fc`)
# ----------------------------------------------------------------------------------------------------

def conv_bn(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: 3x3 (stride) -> 3x3, identity or 1x1-conv shortcut."""
    expansion = 1

    def __init__(self, cin, planes, stride=1, drop_path=0.0):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 3, stride)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_downsample(cin, planes, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(identity + self.drop_path(out))


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 -> 3x3 (stride, torchvision "v1.5") -> 1x1 to 4x planes."""
    expansion = 4

    def __init__(self, cin, planes, stride=1, drop_path=0.0):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3, stride)
        self.conv3, self.bn3 = conv_bn(planes, planes * 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_downsample(cin, planes * 4, stride)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(identity + self.drop_path(out))


def make_downsample(cin, cout, stride):
    """1x1 conv + BN shortcut (`downsample.0`, `downsample.1`) where the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(*conv_bn(cin, cout, 1, stride))


class ResNet(nn.Module):
    """torchvision-style ResNet without `avgpool`/`fc`; forward returns the last map (B, C, H/32, W/32),
    or with small_stem (B, C, H/8, W/8).

    width: stem channels (64 = the standard nets); stage s has width * 2**s planes. The network is
    fully convolutional; `img_size` is only recorded so heads know the pre-training resolution.
    zero_init_residual=True zeroes each block's last BN gamma (timm's default, "Bag of tricks");
    off by default like torchvision, so a fresh net matches torchvision's init.
    drop_path_rate: stochastic depth on the residual branch, linear over blocks (timm's resnet; the
    "ResNet strikes back" recipe uses 0.05). It has no parameters, so the keys stay torchvision's.
    small_stem=True: the stem of the small-image SSL codebases (solo-learn, lightly; CIFAR-size inputs),
    a 3x3 stride-1 conv and no max-pool, so a 32 px image ends in a 4x4 map instead of 1x1. Every key
    stays torchvision's; only conv1's weight has another shape (3x3), so that one does not load there.
    """

    def __init__(self, block, layers, width=64, img_size=224, drop_path_rate=0.0, zero_init_residual=False,
                 small_stem=False):
        super().__init__()
        self.img_size, self.small_stem = img_size, small_stem
        self.patch_size = 8 if small_stem else 32  # total stride of the last stage
        self.conv1, self.bn1 = conv_bn(3, width, 3, stride=1) if small_stem else conv_bn(3, width, 7, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        total, done, cin = sum(layers), 0, width
        self.stage_channels = []  # channels of each stage's map; the last is num_features
        for s, n in enumerate(layers):
            planes, blocks = width * 2 ** s, []
            for i in range(n):
                dp = drop_path_rate * done / max(total - 1, 1)
                blocks.append(block(cin, planes, stride=2 if (i == 0 and s > 0) else 1, drop_path=dp))
                cin, done = planes * block.expansion, done + 1
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.stage_channels.append(cin)
        self.num_stages = len(layers)
        self.num_features = cin
        self.init_weights(zero_init_residual)

    def init_weights(self, zero_init_residual):
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each residual branch starts as zero, so every block starts as identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def no_weight_decay(self):
        return set()  # BN and bias parameters are excluded by the optimiser's 1-D rule

    def stage_strides(self):
        """Total stride of each stage's map: 4, 8, 16, 32 (small stem: 1, 2, 4, 8)."""
        return [self.patch_size // 2 ** (self.num_stages - s) for s in range(1, self.num_stages + 1)]

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, width, H/4, W/4); small stem: H, W

    def forward(self, x):
        x = self.stem(x)
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return x  # (B, C, H/32, W/32); small stem: H/8, W/8

    def get_layer_outputs(self, x, layers=(1, 2, 3, 4)):
        """Maps after the given stages (1..4, strides 4, 8, 16, 32; small stem 1, 2, 4, 8), in the order asked."""
        layers = list(layers)
        if any(not 1 <= k <= self.num_stages for k in layers):
            raise ValueError(f"layers {layers} outside 1..{self.num_stages}")
        x, outs = self.stem(x), {}
        for s in range(1, max(layers) + 1):
            x = outs[s] = getattr(self, f"layer{s}")(x)
        return [outs[k] for k in layers]


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

ARCHS = {
    "vit_mini": dict(embed_dim=128, depth=6, num_heads=4),  # CPU-sized, for the built-in data
    "vit_t": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_s": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16),
    "resnet18": dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    "resnet50": dict(block=Bottleneck, layers=(3, 4, 6, 3)),
}

VIT_ONLY = ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "init_values")
RESNET_ONLY = ("block", "layers", "width", "zero_init_residual", "small_stem")


def build_backbone(name, **kw):
    """Backbone for `--arch name`; kw override the preset (img_size, patch_size, drop_path_rate, sizes...).

    Stage scripts pass the same kwargs for every arch, so for a ResNet `patch_size` is ignored (its
    stride is 32 by construction; the token grid is the Enhancer's business) and ViT-only options
    set to None are dropped. A ViT-only option with a value (embed_dim=..., init_values=0.1) is an
    error, not silently ignored: it would hand back a model other than the one asked for.
    """
    if name not in ARCHS:
        raise ValueError(f"unknown --arch {name!r}; valid names: {', '.join(ARCHS)}")
    cfg = dict(ARCHS[name])
    if name.startswith("resnet"):
        kw.pop("patch_size", None)
        bad = [k for k in VIT_ONLY if kw.get(k) is not None]
        if bad:
            raise ValueError(f"--arch {name} is a ResNet and takes no ViT options: {', '.join(bad)}")
        cfg.update({k: v for k, v in kw.items() if k not in VIT_ONLY})
        return ResNet(**cfg)
    bad = [k for k in RESNET_ONLY if k in kw]
    if bad:
        raise ValueError(f"--arch {name} is a ViT and takes no ResNet options: {', '.join(bad)}")
    cfg.update(kw)
    return VisionTransformer(**cfg)


# ----------------------------------------------------------------------------------------------------
# ResPix target: per-patch or sliding-window pixel normalisation
# ----------------------------------------------------------------------------------------------------

def patchify(imgs, p):
    """(B, 3, H, W) -> (B, N, P*P*3), patches in row-major order, pixels (row, col, channel) as MAE."""
    B, C, H, W = imgs.shape
    x = imgs.reshape(B, C, H // p, p, W // p, p)  # (B, 3, H/P, P, W/P, P)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, H/P, W/P, P, P, 3)
    return x.reshape(B, (H // p) * (W // p), p * p * C)  # (B, N, P*P*3)


def unpatchify(x, p, grid_hw=None):
    """(B, N, P*P*3) -> (B, 3, H, W); the inverse of patchify (square grid unless grid_hw is given)."""
    B, N, _ = x.shape
    h, w = grid_hw if grid_hw is not None else (int(N ** 0.5),) * 2
    x = x.reshape(B, h, w, p, p, 3)  # (B, H/P, W/P, P, P, 3)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, 3, H/P, P, W/P, P)
    return x.reshape(B, 3, h * p, w * p)  # (B, 3, H, W)


def normalize_target(img, mode, patch_size=16, window=9, eps=1e-6):
    """Normalise the ResPix regression target (B, 3, H, W); statistics per channel, variance biased.

    none    the image itself.
    patch   each P x P patch by its own mean/std (MAE's --norm_pix_loss; MAE pools the three channels,
            we keep them apart so `patch` and `window` differ only in the neighbourhood).
    window  each pixel by the mean/std of the k x k window centred on it, stride 1 (CIM Sec. 3.2:
            a patch-free version of the MAE target, so every pixel gets its own context). Near the
            border only the pixels inside the image count: avg_pool2d(count_include_pad=False) divides
            by the number of valid pixels, so zero padding never drags the mean towards 0.
    Statistics are computed in at least float32 (E[x^2] - E[x]^2 cancels badly in half precision).
    """
    if mode == "none":
        return img
    x = img.to(torch.promote_types(img.dtype, torch.float32))
    if mode == "patch":
        B, C, H, W = x.shape
        p = patch_size
        if H % p or W % p:
            raise ValueError(f"--norm-pix patch: image {H}x{W} is not a multiple of patch size {p}")
        x = x.reshape(B, C, H // p, p, W // p, p)  # (B, 3, H/P, P, W/P, P)
        mean = x.mean(dim=(3, 5), keepdim=True)
        var = x.var(dim=(3, 5), keepdim=True, unbiased=False)
        return ((x - mean) / (var + eps).sqrt()).reshape(B, C, H, W)  # (B, 3, H, W)
    if mode == "window":
        if window < 1 or window % 2 == 0:
            raise ValueError(f"--norm-window must be an odd positive integer (a window centred on the pixel), "
                             f"got {window}")
        pool = dict(kernel_size=window, stride=1, padding=window // 2, count_include_pad=False)
        mean = F.avg_pool2d(x, **pool)
        var = (F.avg_pool2d(x * x, **pool) - mean * mean).clamp_min(0)  # rounding can go slightly below 0
        return (x - mean) / (var + eps).sqrt()
    raise ValueError(f"unknown --norm-pix {mode!r}; choose none, patch or window")


# ----------------------------------------------------------------------------------------------------
# Heads: a ViT reads its patch tokens, a ResNet its stride-32 map; neither sees a [MASK] token
# ----------------------------------------------------------------------------------------------------

class ViTRevDetHead(nn.Module):
    """One logit per patch token: "was this token replaced?" (logit > 0 means replaced)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens):
        return self.proj(tokens[:, 1:]).squeeze(-1)  # (B, 1+N, D) -> (B, N); cls dropped


class ViTResPixHead(nn.Module):
    """P*P*3 pixels per patch token, reassembled into the image."""

    def __init__(self, dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dim, patch_size * patch_size * 3)

    def forward(self, tokens):
        return unpatchify(self.proj(tokens[:, 1:]), self.patch_size)  # (B, N, P*P*3) -> (B, 3, H, W)


class ResNetRevDetHead(nn.Module):
    """1x1 conv to r*r channels + pixel shuffle by r: the stride-32 map becomes the token grid.

    r = 32 / token patch, e.g. 224 px with 16 px tokens: 7x7 map -> 4 channels -> 14x14 logits.
    width > 0 (not the paper's) puts a 3x3 conv + BN + ReLU to `width` channels before the 1x1, so the
    last stage feeds a detector instead of being one: with the 1x1 alone it needs to carry only r*r
    numbers per cell, and its pooled feature can collapse onto them (docs/study.md, ResNet-18).
    earlier (not the paper's): (channels, r) of earlier stages the head also reads, each by its own
    1x1 conv + pixel shuffle to the token grid, the logits summed: a linear detector on all of them,
    so the last stage shares the detection with the stages before it.
    """

    def __init__(self, channels, upscale, width=0, earlier=()):
        super().__init__()
        self.upscale = upscale
        self.hidden = (nn.Sequential(*conv_bn(channels, width, 3), nn.ReLU(inplace=True)) if width
                       else nn.Identity())
        self.proj = nn.Conv2d(width or channels, upscale * upscale, kernel_size=1)
        self.earlier_upscales = [r for _, r in earlier]
        self.earlier = nn.ModuleList(nn.Conv2d(c, r * r, kernel_size=1) for c, r in earlier)

    def forward(self, fmap, earlier_maps=()):
        x = F.pixel_shuffle(self.proj(self.hidden(fmap)), self.upscale)  # (B, 1, H/32*r, W/32*r)
        for proj, r, f in zip(self.earlier, self.earlier_upscales, earlier_maps, strict=True):
            x = x + F.pixel_shuffle(proj(f), r)
        return x.flatten(1)  # (B, N), row-major like the ViT tokens


class ResNetResPixHead(nn.Module):
    """1x1 conv to 3*32*32 channels + pixel shuffle by 32: the stride-32 map becomes the image."""

    def __init__(self, channels, stride=32):
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(channels, 3 * stride * stride, kernel_size=1)

    def forward(self, fmap):
        return F.pixel_shuffle(self.proj(fmap), self.stride)  # (B, 3, H, W)


# ----------------------------------------------------------------------------------------------------
# Enhancer = backbone + head + loss
# ----------------------------------------------------------------------------------------------------

OBJECTIVES = ("revdet", "respix")


class Enhancer(nn.Module):
    """The network CIM pre-trains: backbone + the objective's head + its loss.

    token_grid: side of the generator/tokenizer token grid (S/p, 14 for 224 px and 16 px patches);
    RevDet predicts one logit per token of that grid, and `--norm-pix patch` uses its patch S/token_grid.
    For a ViT the backbone's own grid must equal it (one token, one label).
    """

    def __init__(self, backbone, objective, token_grid, norm_pix="window", norm_window=9, head_width=0,
                 head_stages=1):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown --objective {objective!r}; choose {' or '.join(OBJECTIVES)}")
        if norm_pix not in ("none", "patch", "window"):
            raise ValueError(f"unknown --norm-pix {norm_pix!r}; choose none, patch or window")
        if norm_pix == "window" and (norm_window < 1 or norm_window % 2 == 0):
            raise ValueError(f"--norm-window must be an odd positive integer, got {norm_window}")
        S = backbone.img_size
        if S % token_grid:
            raise ValueError(f"image size {S} is not a multiple of the token grid {token_grid}")
        self.backbone, self.objective, self.token_grid = backbone, objective, token_grid
        self.norm_pix, self.norm_window = norm_pix, norm_window
        self.token_patch = S // token_grid
        if (head_width or head_stages != 1) and not (isinstance(backbone, ResNet) and objective == "revdet"):
            raise ValueError("--head-width and --head-stages are for a ResNet's RevDet head: drop them")
        self.head_stages = head_stages
        self.head = self.build_head(backbone, objective, head_width)
        self.head.apply(init_vit_weights)

    def build_head(self, backbone, objective, head_width=0):
        if isinstance(backbone, VisionTransformer):
            if backbone.grid_size != self.token_grid:
                raise ValueError(f"the ViT's token grid {backbone.grid_size} differs from the tokenizer grid "
                                 f"{self.token_grid}: use patch size {self.token_patch}")
            if objective == "revdet":
                return ViTRevDetHead(backbone.num_features)
            return ViTResPixHead(backbone.num_features, backbone.patch_size)
        if isinstance(backbone, ResNet):
            if objective == "respix":
                return ResNetResPixHead(backbone.num_features, backbone.patch_size)
            n, strides = backbone.num_stages, backbone.stage_strides()
            if not 1 <= self.head_stages <= n:
                raise ValueError(f"--head-stages {self.head_stages}: the ResNet has stages 1..{n}")
            read = list(range(n - self.head_stages + 1, n + 1))  # the stages the head reads, the last one last
            for s in read:
                if strides[s - 1] % self.token_patch:
                    raise ValueError(f"token patch {self.token_patch} does not divide the stride {strides[s - 1]} of "
                                     f"ResNet stage {s}; the pixel shuffle needs an integer factor"
                                     + (": lower --head-stages" if s < n else ""))
            earlier = [(backbone.stage_channels[s - 1], strides[s - 1] // self.token_patch) for s in read[:-1]]
            return ResNetRevDetHead(backbone.num_features, backbone.patch_size // self.token_patch, head_width,
                                    earlier)
        raise TypeError(f"unsupported backbone {type(backbone).__name__}")

    def no_weight_decay(self):
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, corrupted, target_images, replaced):
        """corrupted: normalised x~ (B, 3, S, S); target_images: the normalised original (ResPix only,
        may be None for RevDet); replaced: (B, N) or (B, G, G), 1 = replaced (RevDet only).

        Returns (out, loss, metrics): RevDet logits (B, N) or the ResPix image (B, 3, S, S); a scalar
        loss in float32; a dict of detached 0-dim tensors (no .item(), so no GPU sync per step).
        """
        if self.head_stages > 1:
            n = self.backbone.num_stages
            *earlier, last = self.backbone.get_layer_outputs(corrupted, range(n - self.head_stages + 1, n + 1))
            out = self.head(last, earlier)
        else:
            out = self.head(self.backbone(corrupted))
        if self.objective == "revdet":
            loss, metrics = self.revdet_loss(out, replaced)
        else:
            loss, metrics = self.respix_loss(out, target_images)
        return out, loss, metrics

    def revdet_loss(self, logits, replaced):
        """BCE with logits over ALL tokens (replaced and kept alike), label 1 = replaced."""
        labels = replaced.reshape(replaced.shape[0], -1).to(torch.float32)  # (B, N)
        if labels.shape != logits.shape:
            raise ValueError(f"RevDet labels {tuple(labels.shape)} do not match the head's logits "
                             f"{tuple(logits.shape)}; check the token grid")
        logits = logits.float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            acc = ((logits > 0).float() == labels).float().mean()
        return loss, {"revdet_acc": acc, "replaced_frac": labels.mean()}

    def respix_loss(self, pred, images):
        """MSE over all pixels against the normalised original."""
        with torch.no_grad():
            target = normalize_target(images, self.norm_pix, self.token_patch, self.norm_window)
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"respix_mse": loss.detach()}


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

def export_backbone(model):
    """Backbone weights under timm / torchvision names, as an OrderedDict of contiguous copies.

    Accepts an Enhancer, a bare backbone (either possibly wrapped by DDP `module` or torch.compile
    `_orig_mod`), or an Enhancer state_dict (keys `backbone.*`, any wrapper prefix). Our names already
    are the reference names, so this is backbone.state_dict() with the head and prefixes dropped.
    Loading elsewhere:
        timm:        timm.create_model('vit_base_patch16_224', num_classes=0).load_state_dict(sd, strict=True)
        torchvision: r = torchvision.models.resnet50(); res = r.load_state_dict(sd, strict=False)
                     gives res.missing_keys == ['fc.weight', 'fc.bias'] and no unexpected keys
                     (torchvision's resnet50 always has `fc`; train a new one for your task).
    """
    if isinstance(model, nn.Module):
        while any(hasattr(model, a) for a in ("module", "_orig_mod", "backbone")):
            for attr in ("module", "_orig_mod", "backbone"):
                model = getattr(model, attr, model)
        sd = model.state_dict()
    else:
        sd = OrderedDict()
        for k, v in model.items():
            for prefix in ("module.", "_orig_mod."):
                k = k[len(prefix):] if k.startswith(prefix) else k
            sd[k] = v
        if any(k.startswith("backbone.") for k in sd):  # an Enhancer's: keep the backbone, drop the head
            sd = OrderedDict((k[len("backbone."):], v) for k, v in sd.items() if k.startswith("backbone."))
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in sd.items())


# ----------------------------------------------------------------------------------------------------
# Checkpoint -> backbone: every kind people have, for the downstream stages' --init
# ----------------------------------------------------------------------------------------------------

HEAD_KEYS = ("head.", "fc.", "fc_norm.", "head_drop.")  # timm / torchvision classifiers, dropped


def read_backbone(path, what="--init"):
    """A checkpoint file -> (backbone state dict under timm / torchvision names, what the file says
    about the network: {"arch", "img_size", "patch_size", "init_values"} where known, the kind of
    file). Reads pre-training checkpoints (the enhancer's backbone is taken out), exported
    backbone.pth, fine-tuning checkpoints and timm / torchvision / MAE / BEiT state dicts (plain or
    under "model" / "state_dict"); classifier heads are dropped. `what` names the file in errors."""
    accepts = (f"{what} takes a pre-training checkpoint (checkpoint-latest.pth), its export (backbone.pth), a "
               f"fine-tuning checkpoint, a timm / torchvision / MAE / BEiT state dict, or 'scratch'")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder; {accepts}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ValueError(f"{what} {path!r} is not a torch checkpoint of tensors; {accepts}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path!r} holds a {type(ckpt).__name__}, not a state dict; {accepts}")
    if "encoder_config" in ckpt or ckpt.get("kind") == "kmeans":
        raise ValueError(f"{what} {path!r} is a dvae.py tokenizer checkpoint (pretrain.py's --dvae), not a "
                         f"backbone; {accepts}")
    meta, kind = {}, "state dict"
    if "model" in ckpt and isinstance(ckpt["model"], dict):  # ours, MAE's and BEiT's checkpoints
        sd, kind = ckpt["model"], "checkpoint"
        saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
        for k in ("arch", "img_size", "patch_size", "init_values"):
            if k in ckpt or k in saved:
                meta[k] = ckpt.get(k, saved.get(k))
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        sd = ckpt["state_dict"]
    else:
        sd = ckpt
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    for prefix in ("module.", "_orig_mod."):
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    if any(k.startswith("neck.backbone.") for k in sd):
        raise ValueError(f"{what} {path!r} is a segment.py checkpoint (a trained UperNet), not a backbone "
                         f"to start from; to evaluate it again: segment.py --eval-only --output-dir "
                         f"{os.path.dirname(path) or '.'}")
    for prefix, name in (("enhancer.backbone.", "pre-training checkpoint"),
                         ("backbone.", "enhancer/classifier checkpoint")):
        if any(k.startswith(prefix) for k in sd):
            sd, kind = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, name
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(HEAD_KEYS)}
    if not ("patch_embed.proj.weight" in sd or "conv1.weight" in sd):
        raise ValueError(f"{what} {path!r} holds no ViT (patch_embed.proj.weight) or ResNet (conv1.weight) "
                         f"weights (its first keys: {list(sd)[:5]}); {accepts}")
    return sd, meta, kind


def backbone_shape(sd):
    """(shape, ARCHS name or None, what the weights fix: patch_size, img_size, init_values for a ViT)
    of the network a backbone state dict holds."""
    if "patch_embed.proj.weight" in sd:
        D, _, P, _ = sd["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        shape = dict(embed_dim=D, depth=depth)
        names = [n for n, c in ARCHS.items() if c.get("embed_dim") == D and c.get("depth") == depth]
        extra = dict(patch_size=P, img_size=int(round(math.sqrt(sd["pos_embed"].shape[1] - 1))) * P,
                     init_values=0.1 if "blocks.0.ls1.gamma" in sd else None)
    else:
        layers = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in (1, 2, 3, 4))
        block = "Bottleneck" if "layer1.0.conv3.weight" in sd else "BasicBlock"
        shape = dict(layers=layers, block=block)
        names = [n for n, c in ARCHS.items() if c.get("layers") == layers and c["block"].__name__ == block]
        extra = dict(small_stem=sd["conv1.weight"].shape[-1] == 3)
    return shape, (names[0] if names else None), extra


def load_backbone(init, arch=None, img_size=None, patch_size=None, drop_path_rate=0.0, init_values=None,
                  what="--init", zero_init_residual=False, small_stem=False):
    """A path, read_backbone's result, or "scratch" -> (backbone, its config {"arch", "img_size",
    "patch_size", "init_values"}). From a checkpoint, arch / img_size / patch_size are what the caller
    asks for (None: the checkpoint's): a different arch or patch size is an error, a different
    img_size interpolates a ViT's position embeddings (bicubic, as BEiT / MAE fine-tuning).
    "scratch": a freshly initialised `arch` (seed the RNG first for a repeatable one; a ResNet's last
    BatchNorm of each block zero with zero_init_residual, as timm's scratch baselines; small_stem for
    a ResNet's small-image stem, which a checkpoint's conv1 shape gives away by itself)."""
    if isinstance(init, str) and init == "scratch":
        config = dict(img_size=img_size, patch_size=patch_size, init_values=init_values)
        extra = dict(zero_init_residual=True) if zero_init_residual else {}
        if small_stem:
            config["small_stem"] = True
        return build_backbone(arch, drop_path_rate=drop_path_rate, **config, **extra), dict(config, arch=arch)
    sd, meta, kind = read_backbone(init, what) if isinstance(init, str) else init
    shape, name, extra = backbone_shape(sd)
    path = init if isinstance(init, str) else "the checkpoint"
    if name is None:
        raise ValueError(f"{what} {path!r} ({kind}) holds a network {shape} that matches no arch in {list(ARCHS)}")
    if arch is not None and arch != name:
        raise ValueError(f"{what} {path!r} ({kind}) holds a {name} backbone {shape}, not a {arch}: drop --arch "
                         f"(it is read from the checkpoint) or pass a {arch} checkpoint")
    config = dict(patch_size=None, init_values=None)
    if name.startswith("vit"):
        if patch_size not in (None, extra["patch_size"]):
            raise ValueError(f"--patch-size {patch_size}, but {what} {path!r} was trained with patch "
                             f"{extra['patch_size']}")
        config.update(patch_size=extra["patch_size"], img_size=img_size or meta.get("img_size") or extra["img_size"],
                      init_values=meta.get("init_values", extra["init_values"]))
        grid = config["img_size"] // config["patch_size"]
        if sd["pos_embed"].shape[1] != grid * grid + 1:  # BEiT / MAE: interpolate to the new grid
            sd = dict(sd, pos_embed=resize_pos_embed(sd["pos_embed"].float(), grid))
    else:
        config.update(img_size=img_size or meta.get("img_size") or 224, small_stem=extra["small_stem"])
    backbone = build_backbone(name, drop_path_rate=drop_path_rate, **config)
    config["arch"] = name
    missing, unexpected = backbone.load_state_dict(sd, strict=False)
    if missing == ["norm.weight", "norm.bias"] and not unexpected:
        pass  # MAE / BEiT fine-tuned ViTs replace the final norm by fc_norm; ours starts fresh
    elif missing or unexpected:
        raise ValueError(f"{what} {path!r} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return backbone, config
