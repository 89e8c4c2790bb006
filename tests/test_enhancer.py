"""Tests for enhancer.py: reference key sets, target normalisation, heads, losses, bad input.

Tiny configs only (32-128 px, depth 1-2); full-size models are built on the meta device, which
allocates no memory and runs no init kernels, so the key-list tests are instant.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from enhancer import (ARCHS, Enhancer, ResNet, VisionTransformer, build_backbone, export_backbone,
                      normalize_target, patchify, unpatchify)

# ----------------------------------------------------------------------------------------------------
# Reference key lists, written out from timm / torchvision (neither is installed here)
# ----------------------------------------------------------------------------------------------------

# timm.create_model('vit_base_patch16_224', num_classes=0).state_dict(), in order
VIT_B_BLOCK = [  # (suffix, shape) for D = 768, MLP 3072
    ("norm1.weight", [768]), ("norm1.bias", [768]),
    ("attn.qkv.weight", [2304, 768]), ("attn.qkv.bias", [2304]),
    ("attn.proj.weight", [768, 768]), ("attn.proj.bias", [768]),
    ("norm2.weight", [768]), ("norm2.bias", [768]),
    ("mlp.fc1.weight", [3072, 768]), ("mlp.fc1.bias", [3072]),
    ("mlp.fc2.weight", [768, 3072]), ("mlp.fc2.bias", [768]),
]
TIMM_VIT_B = (
    [("cls_token", [1, 1, 768]), ("pos_embed", [1, 197, 768]),
     ("patch_embed.proj.weight", [768, 3, 16, 16]), ("patch_embed.proj.bias", [768])]
    + [(f"blocks.{i}.{k}", s) for i in range(12) for k, s in VIT_B_BLOCK]
    + [("norm.weight", [768]), ("norm.bias", [768])]
)


def bn_keys(prefix, c):
    return [(f"{prefix}.weight", [c]), (f"{prefix}.bias", [c]), (f"{prefix}.running_mean", [c]),
            (f"{prefix}.running_var", [c]), (f"{prefix}.num_batches_tracked", [])]


def torchvision_resnet50_keys():
    """torchvision.models.resnet50().state_dict() without fc, in order (v1.5 bottlenecks)."""
    keys = [("conv1.weight", [64, 3, 7, 7])] + bn_keys("bn1", 64)
    cin = 64
    for s, n in enumerate([3, 4, 6, 3]):
        planes = 64 * 2 ** s
        for i in range(n):
            p = f"layer{s + 1}.{i}"
            keys += [(f"{p}.conv1.weight", [planes, cin, 1, 1])] + bn_keys(f"{p}.bn1", planes)
            keys += [(f"{p}.conv2.weight", [planes, planes, 3, 3])] + bn_keys(f"{p}.bn2", planes)
            keys += [(f"{p}.conv3.weight", [planes * 4, planes, 1, 1])] + bn_keys(f"{p}.bn3", planes * 4)
            if i == 0:  # first block of each stage changes width (and stride after stage 1)
                keys += [(f"{p}.downsample.0.weight", [planes * 4, cin, 1, 1])]
                keys += bn_keys(f"{p}.downsample.1", planes * 4)
            cin = planes * 4
    return keys


def shapes(sd):
    return [(k, list(v.shape)) for k, v in sd.items()]


def test_vit_b_matches_timm_keys_and_count():
    with torch.device("meta"):
        m = build_backbone("vit_b")
    assert shapes(m.state_dict()) == TIMM_VIT_B
    assert shapes(export_backbone(m)) == TIMM_VIT_B
    assert sum(p.numel() for p in m.parameters()) == 85_798_656
    assert (m.patch_size, m.grid_size, m.embed_dim, m.num_features) == (16, 14, 768, 768)


def test_vit_layer_scale_adds_timm_ls_keys():
    with torch.device("meta"):
        m = build_backbone("vit_s", depth=1, init_values=0.1)
    keys = list(m.state_dict())
    assert "blocks.0.ls1.gamma" in keys and "blocks.0.ls2.gamma" in keys


def test_resnet50_matches_torchvision_keys_and_count():
    ref = torchvision_resnet50_keys()
    with torch.device("meta"):
        m = build_backbone("resnet50")
        enh = Enhancer(m, "revdet", token_grid=14)
    assert shapes(m.state_dict()) == ref
    assert shapes(export_backbone(enh)) == ref  # head and `backbone.` prefix dropped
    assert sum(p.numel() for p in m.parameters()) == 23_508_032
    assert (m.num_features, m.patch_size) == (2048, 32)


def test_small_stem_resnet_keeps_torchvision_keys_and_ends_in_a_4x4_map_at_32px():
    """The small-image stem: 3x3 stride-1 conv1, no max-pool. Every key is torchvision's; only conv1's
    shape differs; stride 8, so the RevDet head's pixel shuffle goes from 4x4 to the 8x8 token grid,
    and a checkpoint's conv1 tells load_backbone to rebuild the stem."""
    ref = torchvision_resnet50_keys()
    with torch.device("meta"):
        small = build_backbone("resnet50", small_stem=True)
    got = shapes(small.state_dict())
    assert [k for k, _ in got] == [k for k, _ in ref]
    assert [k for (k, a), (_, b) in zip(got, ref) if a != b] == ["conv1.weight"]
    assert dict(got)["conv1.weight"] == [64, 3, 3, 3] and small.patch_size == 8
    torch.manual_seed(0)
    r18 = build_backbone("resnet18", img_size=32, small_stem=True)
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    model = Enhancer(r18, "revdet", token_grid=8)
    out, loss, _ = model(torch.randn(2, 3, 32, 32), None, torch.rand(2, 64) > 0.5)
    assert out.shape == (2, 64) and torch.isfinite(loss)
    import enhancer
    shape, name, extra = enhancer.backbone_shape(export_backbone(model))
    assert name == "resnet18" and extra == {"small_stem": True}


def test_a_mask_token_replaces_masked_patches_and_nothing_else():
    """VisionTransformer(x, mask, mask_token), the hook pretrain.py's BEiT baseline uses: no mask is
    the plain forward, and a masked patch's pixels no longer reach the output."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    token = torch.randn(1, 1, 32)
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.allclose(vit(x, mask, token), vit(x))
    mask[:, 5] = True  # patch 5: row 1, column 1
    y = x.clone()
    y[:, :, 4:8, 4:8] = torch.randn(2, 3, 4, 4)
    assert torch.allclose(vit(x, mask, token), vit(y, mask, token))
    assert not torch.allclose(vit(x), vit(y))


def test_export_strips_wrappers_and_copies():
    m = build_backbone("vit_t", img_size=32, patch_size=8, depth=1)
    enh = Enhancer(m, "respix", token_grid=4)
    wrapped = {f"module.{k}": v for k, v in enh.state_dict().items()}
    sd = export_backbone(wrapped)
    assert list(sd) == list(m.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    sd["cls_token"].add_(1.0)  # a copy: editing it leaves the model alone
    assert not torch.equal(sd["cls_token"], m.cls_token)
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3)
    fresh.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------------
# Target normalisation
# ----------------------------------------------------------------------------------------------------

def naive_window_norm(img, k, eps=1e-6):
    """Per-pixel loop: mean / biased variance of the in-image pixels of the k x k window."""
    B, C, H, W = img.shape
    out, r = torch.empty_like(img), k // 2
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    win = img[b, c, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
                    mean = win.mean()
                    var = ((win - mean) ** 2).mean()
                    out[b, c, i, j] = (img[b, c, i, j] - mean) / math.sqrt(var + eps)
    return out


@pytest.mark.parametrize("k", [3, 5])
def test_window_norm_matches_naive_loop(k):
    g = torch.Generator().manual_seed(k)
    img = torch.rand(1, 3, 7, 9, generator=g, dtype=torch.float64) * 2 - 1
    ref = naive_window_norm(img, k)
    got = normalize_target(img, "window", window=k)
    assert torch.allclose(got, ref, atol=1e-5)
    got32 = normalize_target(img.float(), "window", window=k)  # the training dtype
    assert torch.allclose(got32.double(), ref, atol=1e-4)


def test_window_norm_has_no_border_artefact():
    # a constant-plus-ramp image: zero padding would bend the border means, valid-pixel counting does not
    img = torch.full((1, 3, 8, 8), 5.0) + torch.arange(8.0).view(1, 1, 1, 8)
    out = normalize_target(img, "window", window=3)
    ref = naive_window_norm(img.double(), 3)
    assert torch.allclose(out.double(), ref, atol=1e-4)
    assert out[..., 1:-1].abs().max() < 1e-4  # interior: each pixel is the mean of its window row


def test_patch_norm_gives_zero_mean_unit_var_per_patch():
    img = torch.randn(2, 3, 16, 24) * 3 + 2
    out = normalize_target(img, "patch", patch_size=8)
    x = out.reshape(2, 3, 2, 8, 3, 8)  # (B, 3, H/P, P, W/P, P)
    assert torch.allclose(x.mean(dim=(3, 5)), torch.zeros(2, 3, 2, 3), atol=1e-5)
    assert torch.allclose(x.var(dim=(3, 5), unbiased=False), torch.ones(2, 3, 2, 3), atol=1e-4)
    assert normalize_target(img, "none") is img


def test_bad_norm_options_name_the_flag():
    img = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="--norm-window"):
        normalize_target(img, "window", window=4)
    with pytest.raises(ValueError, match="--norm-pix"):
        normalize_target(img, "zca")
    with pytest.raises(ValueError, match="--norm-pix"):
        Enhancer(build_backbone("resnet18", width=8), "respix", token_grid=7, norm_pix="zca")
    with pytest.raises(ValueError, match="--norm-window"):
        Enhancer(build_backbone("resnet18", width=8), "respix", token_grid=7, norm_window=8)


def test_patchify_round_trip_and_layout():
    img = torch.randn(2, 3, 16, 24)
    x = patchify(img, 8)
    assert x.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(x[0, 4].view(8, 8, 3).permute(2, 0, 1), img[0, :, 8:16, 8:16])  # row 1, col 1
    assert torch.equal(unpatchify(x, 8, grid_hw=(2, 3)), img)


# ----------------------------------------------------------------------------------------------------
# Heads, losses, gradients
# ----------------------------------------------------------------------------------------------------

def tiny_vit(img_size):
    return build_backbone("vit_t", img_size=img_size, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_resnet(img_size):
    return build_backbone("resnet18", img_size=img_size, width=8)


@pytest.mark.parametrize("family, S, grid",
                         [("vit", 32, 4), ("vit", 48, 6), ("resnet", 64, 8), ("resnet", 128, 16)])
@pytest.mark.parametrize("objective", ["revdet", "respix"])
def test_head_shapes_and_finite_backward(family, S, grid, objective):
    torch.manual_seed(0)
    backbone = tiny_vit(S) if family == "vit" else tiny_resnet(S)
    enh = Enhancer(backbone, objective, token_grid=grid)
    B = 2
    x, orig = torch.randn(B, 3, S, S), torch.randn(B, 3, S, S)
    replaced = torch.rand(B, grid, grid) < 0.5
    out, loss, metrics = enh(x, orig, replaced)
    assert out.shape == ((B, grid * grid) if objective == "revdet" else (B, 3, S, S))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    first = next(backbone.parameters())  # cls_token / conv1.weight: gradient reached the input end
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert all(v.ndim == 0 and not v.requires_grad for v in metrics.values())


def test_revdet_loss_is_bce_over_all_tokens_and_accuracy():
    torch.manual_seed(1)
    enh = Enhancer(tiny_vit(32), "revdet", token_grid=4)
    x = torch.randn(3, 3, 32, 32)
    replaced = torch.rand(3, 16) < 0.4
    logits, loss, m = enh(x, None, replaced)
    y = replaced.float()
    p = torch.sigmoid(logits.detach())
    manual = -(y * p.log() + (1 - y) * (1 - p).log()).mean()  # all 48 tokens, replaced or not
    assert torch.allclose(loss.detach(), manual, atol=1e-5)
    assert torch.allclose(m["revdet_acc"], ((logits > 0) == replaced).float().mean())
    assert torch.allclose(m["replaced_frac"], y.mean())


def test_revdet_label_shape_mismatch_is_explained():
    enh = Enhancer(tiny_vit(32), "revdet", token_grid=4)
    with pytest.raises(ValueError, match="token grid"):
        enh(torch.randn(1, 3, 32, 32), None, torch.zeros(1, 25, dtype=torch.bool))


@pytest.mark.parametrize("norm_pix", ["none", "patch", "window"])
def test_respix_target_is_normalised_original(norm_pix):
    torch.manual_seed(2)
    enh = Enhancer(tiny_resnet(64), "respix", token_grid=8, norm_pix=norm_pix, norm_window=5)
    x, orig = torch.randn(2, 3, 64, 64), torch.rand(2, 3, 64, 64) * 4 + 1
    pred, loss, m = enh(x, orig, None)
    target = normalize_target(orig, norm_pix, patch_size=8, window=5)
    assert torch.allclose(loss.detach(), F.mse_loss(pred.detach(), target), atol=1e-6)
    assert torch.equal(m["respix_mse"], loss.detach())
    if norm_pix != "none":  # the target the loss used is centred, not the raw [1, 5] image
        assert target.mean().abs() < 0.1


def test_vit_layer_outputs_and_resized_positions():
    vit = tiny_vit(32).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = vit.get_layer_outputs(x, [2, 1])
    assert [o.shape for o in outs] == [(2, 17, 32)] * 2
    assert torch.allclose(vit.norm(outs[0]), vit(x), atol=1e-6)  # block 2 is the last one
    assert vit(torch.randn(1, 3, 48, 48)).shape == (1, 37, 32)  # position table resized to 6x6
    with pytest.raises(ValueError):
        vit.get_layer_outputs(x, [3])
    r = tiny_resnet(64)
    maps = r.get_layer_outputs(torch.randn(1, 3, 64, 64), [1, 4])
    assert [m.shape[1:] for m in maps] == [(8, 16, 16), (64, 2, 2)]  # strides 4 and 32


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------

def test_bad_arch_and_objective_name_the_flag():
    with pytest.raises(ValueError, match="--arch") as e:
        build_backbone("vit_huge")
    assert all(name in str(e.value) for name in ARCHS)
    with pytest.raises(ValueError, match="--objective"):
        Enhancer(tiny_vit(32), "mim", token_grid=4)


def test_resnet_kwargs_policy():
    r = build_backbone("resnet18", img_size=64, patch_size=8, drop_path_rate=0.1, init_values=None, width=8)
    assert isinstance(r, ResNet) and r.patch_size == 32 and r.num_features == 64
    with pytest.raises(ValueError, match="embed_dim"):
        build_backbone("resnet18", embed_dim=32)
    with pytest.raises(ValueError, match="width"):
        build_backbone("vit_t", width=8)


def test_grid_mismatch_errors():
    with pytest.raises(ValueError, match="patch size 4"):
        Enhancer(tiny_vit(32), "revdet", token_grid=8)  # ViT grid 4 != tokenizer grid 8
    with pytest.raises(ValueError, match="does not divide"):
        Enhancer(tiny_resnet(96), "revdet", token_grid=2)  # token patch 48 > stride 32


def test_channels_last_resnet_gives_the_same_features():
    """pretrain.py runs ResNet enhancers channels-last on CUDA (NHWC tensor-core kernels): the
    layout must not change the numbers beyond float rounding."""
    torch.manual_seed(0)
    net = build_backbone("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        net.to(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
