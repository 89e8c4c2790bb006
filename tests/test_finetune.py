"""Tests for finetune.py: layer-decay groups and the no-decay set, mixup/cutmix targets, RandAugment
and random erasing, LAMB against a hand-computed step, every --init kind (pre-training checkpoint,
exported backbone, timm / torchvision / MAE state dicts, scratch) and the bad ones, position-embedding
interpolation, exact evaluation counts over two gloo processes, a bit-exact resume, the three
modes on a tiny image folder, --eval-split select, the k-NN of raw pixels and of every block, and the
recipe of a ViT from scratch. Tiny config: 16 px images, vit_mini with patch 4, 2 classes."""
import json
import os
import random
import re
import shutil

import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import enhancer as enh
import finetune
import training
from conftest import REPO, refused, torchrun


def run(*argv):
    return finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def image_folder(root, side=16, n_train=(8, 8), n_val=(5, 4)):
    """root/{train,val}/c{k}/{i}.png: class 0 a vertical ramp, class 1 a horizontal one (a shape cue
    a few steps can learn), random noise on top. 9 validation images: an uneven 2-process split."""
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 255, side)
    for split, counts in (("train", n_train), ("val", n_val)):
        for k, n in enumerate(counts):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            base = ramp[:, None].expand(side, side) if k == 0 else ramp[None, :].expand(side, side)
            for i in range(n):
                px = (base[..., None] + 40 * torch.rand(side, side, 3, generator=g)).clamp(0, 255)
                Image.fromarray(px.byte().numpy(), "RGB").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("ft_data"))


def tiny(folder, out, *extra):
    return [str(a) for a in ["--data", folder, "--output-dir", out, "--batch-size", "4", "--num-workers", "0",
            "--device", "cpu", "--eval-batch-size", "3", "--warmup-epochs", "0", "--lr", "1e-3", *extra]]


def tiny_vit(depth=2, img=16):
    torch.manual_seed(0)
    return enh.VisionTransformer(img_size=img, patch_size=4, embed_dim=32, depth=depth, num_heads=2)


# ----------------------------------------------------------------------------------------------------
# Optimiser groups
# ----------------------------------------------------------------------------------------------------

def test_layer_decay_gives_the_exact_lr_scale_of_every_parameter():
    model = finetune.Classifier(tiny_vit(depth=2), 5, pool="avg")
    groups = training.param_groups(model, 0.05, model.no_weight_decay(), layer_decay=0.5, num_layers=2)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert sorted(scale) == sorted(n for n, _ in model.named_parameters())  # each once
    for name, s in scale.items():
        if name.startswith(("backbone.patch_embed.", "backbone.cls_token", "backbone.pos_embed")):
            expected = 0.5 ** 3      # layer 0 of L = 2: decay^(L + 1)
        elif name.startswith("backbone.blocks.0."):
            expected = 0.5 ** 2
        elif name.startswith("backbone.blocks.1."):
            expected = 0.5 ** 1
        else:
            assert name.startswith(("fc_norm.", "head.")), name
            expected = 1.0
        assert s == expected, name


def test_no_weight_decay_set_is_exact():
    model = finetune.Classifier(tiny_vit(depth=2), 5, pool="avg")
    groups = training.param_groups(model, 0.05, model.no_weight_decay(), 0.75, 2)
    decayed = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    expected = {"backbone.patch_embed.proj.weight", "head.weight"}
    for b in (0, 1):
        expected |= {f"backbone.blocks.{b}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert decayed == expected
    not_decayed = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "fc_norm.weight", "head.bias",
            "backbone.blocks.0.norm1.weight", "backbone.blocks.1.attn.qkv.bias"} <= not_decayed
    assert not decayed & not_decayed


def test_resnet_layer_ids_follow_the_stages():
    assert training.layer_id("backbone.conv1.weight", 4) == 0
    assert training.layer_id("backbone.bn1.bias", 4) == 0
    assert training.layer_id("backbone.layer3.1.conv2.weight", 4) == 3
    assert training.layer_id("head.weight", 4) == 5
    assert training.layer_id("backbone.blocks.11.mlp.fc1.weight", 12) == 12


def test_linear_probe_trains_only_the_head_through_a_bn_without_affine():
    model = finetune.Classifier(tiny_vit(), 3, linear=True)
    assert isinstance(model.fc_norm, nn.BatchNorm1d) and model.fc_norm.weight is None
    groups = training.param_groups(model, 0.0, model.no_weight_decay(), 1.0, 2)
    assert sorted(n for g in groups for n in g["names"]) == ["head.bias", "head.weight"]
    model.train()
    assert not model.backbone.training and model.fc_norm.training


# ----------------------------------------------------------------------------------------------------
# Mixup / CutMix, losses
# ----------------------------------------------------------------------------------------------------

def constant_batch(B=6, C=4, S=20):
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, S, S).clone()
    return x, torch.arange(B) % C


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_targets_match_the_pasted_area(seed):
    x, y = constant_batch()
    mix = finetune.Mixup(mixup=0.0, cutmix=1.0, smoothing=0.0, num_classes=4)
    xm, t = mix(x, y, random.Random(seed))
    assert torch.allclose(t.sum(1), torch.ones(len(y)))
    B = len(y)
    for i in range(B):
        pasted = (xm[i, 0] == B - 1 - i).float().mean().item()  # pixels that come from the partner
        lam = 1 - pasted if i != B - 1 - i else 1.0
        own, partner = y[i].item(), y[B - 1 - i].item()
        if own != partner:
            assert t[i, own].item() == pytest.approx(lam, abs=1e-6)
            assert t[i, partner].item() == pytest.approx(1 - lam, abs=1e-6)


def test_mixup_blends_images_and_targets_with_one_lambda():
    x, y = constant_batch()
    mix = finetune.Mixup(mixup=0.8, cutmix=0.0, smoothing=0.1, num_classes=4)
    xm, t = mix(x, y, random.Random(3))
    lam = (xm[0, 0, 0, 0] - 5) / (0 - 5)  # image 0 = lam * 0 + (1 - lam) * 5
    assert torch.allclose(xm[:, 0, 0, 0], lam * x[:, 0, 0, 0] + (1 - lam) * x.flip(0)[:, 0, 0, 0])
    assert torch.allclose(t.sum(1), torch.ones(len(y)))
    off = 0.1 / 4
    assert t[0, y[0]].item() == pytest.approx(lam.item() * (1 - 0.1 + off) + (1 - lam.item()) * off, abs=1e-6)


def test_no_mixing_still_smooths_labels():
    x, y = constant_batch()
    xm, t = finetune.Mixup(0.0, 0.0, smoothing=0.2, num_classes=4)(x, y, random.Random(0))
    assert torch.equal(xm, x)
    assert torch.allclose(t, finetune.smooth_one_hot(y, 4, 0.2))
    assert t[0, y[0]].item() == pytest.approx(0.8 + 0.05)


def test_soft_target_losses():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.7, 0.3, 0.0]])
    ce = -(0.7 * torch.log_softmax(logits, 1)[0, 0] + 0.3 * torch.log_softmax(logits, 1)[0, 1])
    assert finetune.soft_target_loss(logits, t, "ce").item() == pytest.approx(ce.item(), rel=1e-6)
    hard = torch.tensor([[1.0, 1.0, 0.0]])  # threshold 0.2
    bce = nn.functional.binary_cross_entropy_with_logits(logits, hard)
    assert finetune.soft_target_loss(logits, t, "bce", 0.2).item() == pytest.approx(bce.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# RandAugment, random erasing
# ----------------------------------------------------------------------------------------------------

def sample_image(side=24):
    g = torch.Generator().manual_seed(0)
    px = 60 + 120 * torch.rand(side, side, 3, generator=g)  # mid-range: autocontrast has work to do
    px[:, : side // 2] *= 0.5                                # an edge: sharpness and shear see it
    return Image.fromarray(px.byte().numpy(), "RGB")


@pytest.mark.parametrize("name", sorted(data.RAND_AUGMENT_OPS))
def test_every_rand_augment_op_changes_the_image_and_repeats_under_a_seed(name):
    img = sample_image()
    op = data.RAND_AUGMENT_OPS[name]
    a = op(img, 9.0, random.Random(1))
    b = op(img, 9.0, random.Random(1))
    assert a.size == img.size and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != img.tobytes(), f"{name} at magnitude 9 left the image unchanged"


def test_rand_augment_is_a_pure_function_of_its_rng():
    img, ra = sample_image(), data.RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    runs = [ra(img, random.Random(s)).tobytes() for s in (0, 0, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 2
    # every op is reachable: over many seeds each name is drawn
    drawn = set()
    for s in range(300):
        rng = random.Random(s)
        drawn.add(rng.choice(ra.ops))
    assert drawn == set(data.RAND_AUGMENT_OPS)


def test_random_erasing_fills_one_box_of_the_allowed_area():
    x = torch.zeros(3, 40, 40)
    for s in range(20):
        y = data.RandomErasing(prob=1.0)(x, random.Random(s))
        frac = (y[0] != 0).float().mean().item()
        assert 0.02 * 0.8 <= frac <= 1 / 3 * 1.2  # rounding of h and w
        assert torch.equal(y[0] != 0, y[1] != 0)
    assert torch.equal(data.RandomErasing(prob=0.0)(x, random.Random(0)), x)


def test_parse_aa():
    ra = finetune.parse_aa("m7-mstd0.5")
    assert (ra.magnitude, ra.magnitude_std, ra.num_ops) == (7.0, 0.5, 2)
    assert finetune.parse_aa("none") is None
    with pytest.raises(ValueError, match="--aa 'rand9'"):
        finetune.parse_aa("rand9")


# ----------------------------------------------------------------------------------------------------
# LAMB, EMA
# ----------------------------------------------------------------------------------------------------

def test_lamb_step_matches_the_formula():
    p = nn.Parameter(torch.tensor([3.0, -4.0]))
    opt = finetune.Lamb([p], lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1)
    p.grad = torch.tensor([1.0, 2.0])
    opt.step()
    g, w = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0])
    m_hat, v_hat = 0.1 * g / 0.1, 0.001 * g * g / 0.001
    update = m_hat / (v_hat.sqrt() + 1e-6) + 0.1 * w
    expected = w - 0.1 * (w.norm() / update.norm()) * update
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    q = nn.Parameter(torch.tensor([3.0, -4.0]))  # no weight decay: the plain Adam step, ratio 1
    opt = finetune.Lamb([q], lr=0.1, weight_decay=0.0)
    q.grad = torch.tensor([1.0, 2.0])
    opt.step()
    assert torch.allclose(q.detach(), w - 0.1 * torch.ones(2), atol=1e-5)


def test_lars_steps_match_the_formula():
    """MAE's LARS: a 2-D weight's update (g + wd p) scaled by 0.001 |p| / |g + wd p|, a 1-D bias's
    plain g, both through momentum 0.9; three steps against the formula written out."""
    w = nn.Parameter(torch.tensor([[3.0, -4.0], [1.0, 2.0]]))
    b = nn.Parameter(torch.tensor([0.5, -0.5]))
    opt = finetune.Lars([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=2.0)
    ew, eb, mw, mb = w.detach().clone(), b.detach().clone(), torch.zeros(2, 2), torch.zeros(2)
    for step in range(3):
        gw, gb = torch.full((2, 2), step + 1.0), torch.tensor([1.0, -2.0]) * (step + 1)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw + 0.1 * ew
        mw = 0.9 * mw + 0.001 * ew.norm() / u.norm() * u
        mb = 0.9 * mb + gb
        ew, eb = ew - 2.0 * mw, eb - 2.0 * mb
        assert torch.allclose(w.detach(), ew, atol=1e-6) and torch.allclose(b.detach(), eb, atol=1e-6), step


def test_the_linear_probe_reads_the_feature_pool_names():
    """--pool in every mode: MAE's probe reads the final-normed cls token, the k-NN the mean of the
    patch tokens unless told otherwise."""
    vit = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    tokens = vit(x)
    cls = finetune.Classifier(tiny_vit(), 3, pool="cls", linear=True)
    avg = finetune.Classifier(tiny_vit(), 3, pool="avg", linear=True)
    assert torch.equal(cls.features(x), tokens[:, 0]) and torch.equal(avg.features(x), tokens[:, 1:].mean(1))
    assert finetune.RECIPES["imagenet"]["linear"]["pool"] == "cls"


def test_a_resnet_from_scratch_zero_inits_each_blocks_last_batchnorm(tmp_path, folder):
    args = ["--init", "scratch", "--arch", "resnet18", "--img-size", "32", "--max-steps", "1"]
    captured = {}
    real = finetune.Classifier.__init__

    def keep(self, backbone, *a, **k):
        captured["gammas"] = [blk.bn2.weight.detach().clone() for stage in (backbone.layer1, backbone.layer2)
                              for blk in stage]
        real(self, backbone, *a, **k)

    import unittest.mock
    with unittest.mock.patch.object(finetune.Classifier, "__init__", keep):
        run(*tiny(folder, tmp_path / "ft", *args))
    assert all((g == 0).all() for g in captured["gammas"])
    with unittest.mock.patch.object(finetune.Classifier, "__init__", keep):  # a frozen random baseline: not
        run(*tiny(folder, tmp_path / "lin", *args, "--mode", "linear"))
    assert all((g == 1).all() for g in captured["gammas"])


def test_ema_moves_towards_the_model():
    model = nn.Linear(2, 1)
    ema = finetune.ModelEma(model, 0.9)
    with torch.no_grad():
        before = ema.module.weight.clone()
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * model.weight)


# ----------------------------------------------------------------------------------------------------
# --init: every kind of checkpoint, and the bad ones
# ----------------------------------------------------------------------------------------------------

def init_args(init, *extra):
    """finetune.py's reading of --init: the resolved flags and the backbone with its config in them."""
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(["--init", str(init), *extra]))
    backbone, net = enh.load_backbone(str(init), args.arch, args.img_size, args.patch_size, args.drop_path)
    args.arch, args.img_size, args.patch_size = net["arch"], net["img_size"], net["patch_size"]
    return args, backbone


def test_pretraining_checkpoint_and_export_give_the_same_backbone(pretrained):
    ckpt = load(pretrained / "checkpoint-latest.pth")
    args_a, a = init_args(pretrained / "checkpoint-latest.pth")
    args_b, b = init_args(pretrained / "backbone.pth")
    assert args_a.arch == args_b.arch == "vit_mini" and args_a.img_size == 16 and args_a.patch_size == 4
    for k, v in a.state_dict().items():
        assert torch.equal(v, ckpt["model"]["enhancer.backbone." + k]), k
        assert torch.equal(v, b.state_dict()[k]), k


def test_timm_torchvision_and_mae_state_dicts_load(tmp_path):
    vit = enh.build_backbone("vit_mini", img_size=32, patch_size=4)
    sd = dict(vit.state_dict(), **{"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "timm.pth")
    args, got = init_args(tmp_path / "timm.pth")
    assert args.arch == "vit_mini" and args.img_size == 32
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in vit.state_dict().items())
    # MAE / BEiT fine-tuned checkpoint: {"model": ...}, fc_norm instead of norm
    mae = {k: v for k, v in vit.state_dict().items() if not k.startswith("norm.")}
    mae.update({"fc_norm.weight": torch.ones(128), "fc_norm.bias": torch.zeros(128)})
    torch.save({"model": mae, "epoch": 3}, tmp_path / "mae.pth")
    _, got = init_args(tmp_path / "mae.pth")
    assert torch.equal(got.blocks[5].mlp.fc2.weight, vit.blocks[5].mlp.fc2.weight)
    # torchvision resnet18 with its fc
    res = enh.build_backbone("resnet18")
    sd = dict(res.state_dict(), **{"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save({"state_dict": sd}, tmp_path / "tv.pth")
    args, got = init_args(tmp_path / "tv.pth")
    assert args.arch == "resnet18"
    assert torch.equal(got.layer4[1].conv2.weight, res.layer4[1].conv2.weight)


def test_position_embeddings_are_interpolated_to_another_size(pretrained):
    args, got = init_args(pretrained / "backbone.pth", "--img-size", "24")
    saved = load(pretrained / "backbone.pth")["model"]["pos_embed"]
    assert got.pos_embed.shape == (1, 1 + 6 * 6, 128)
    assert torch.allclose(got.pos_embed, enh.resize_pos_embed(saved, 6))
    assert torch.equal(got.pos_embed[:, 0], saved[:, 0])  # cls position kept


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"--init '.*nope.pth' does not exist"),
    ("bytes", r"--init '.*junk.pth' is not a torch checkpoint of tensors"),
    ("other_arch", r"holds a vit_mini backbone .*, not a vit_s: drop --arch"),
    ("no_weights", r"holds no ViT .* or ResNet"),
    ("unknown_shape", r"matches no arch"),
])
def test_bad_init_is_named(tmp_path, pretrained, case, pattern):
    extra = []
    if case == "missing":
        path = tmp_path / "nope.pth"
    elif case == "bytes":
        path = tmp_path / "junk.pth"
        path.write_bytes(os.urandom(256))
    elif case == "other_arch":
        path, extra = pretrained / "backbone.pth", ["--arch", "vit_s"]
    elif case == "no_weights":
        path = tmp_path / "opt.pth"
        torch.save({"optimizer": {"lr": torch.zeros(1)}}, path)
    else:
        path = tmp_path / "odd.pth"
        torch.save(tiny_vit(depth=3).state_dict(), path)  # width 32, depth 3: no preset
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        init_args(path, *extra)


def test_init_is_required_and_the_data_class_count_checked(tmp_path, folder):
    with pytest.raises(ValueError, match="--init is required"):
        run("--data", folder)
    with pytest.raises(ValueError, match="--nb-classes 5, but the data has 2 classes"):
        run(*tiny(folder, tmp_path, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                  "--nb-classes", "5"))


# ----------------------------------------------------------------------------------------------------
# Real runs on a tiny image folder
# ----------------------------------------------------------------------------------------------------

def test_finetune_from_a_pretraining_checkpoint_logs_evaluates_and_exports(tmp_path, folder, pretrained):
    out = tmp_path / "ft"
    result = run(*tiny(folder, out, "--init", pretrained / "checkpoint-latest.pth", "--epochs", "2",
                       "--model-ema", "--model-ema-decay", "0.5"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in log] == [1, 2] and [r["step"] for r in log] == [4, 8]
    assert all(r["n_val"] == 9 and 0 <= r["val_top1"] <= r["val_top5"] == 100.0 for r in log)
    assert result["best_top1"] == max(r["val_top1"] for r in log) and "ema_top1" in result
    best, latest = load(out / "checkpoint-best.pth"), load(out / "checkpoint-latest.pth")
    assert latest["step"] == 8 and best["best"] == result["best_top1"]
    best_epoch = next(r for r in log if r["val_top1"] == result["best_top1"])  # the first to reach it
    assert (best["epoch"], best["step"]) == (best_epoch["epoch"], best_epoch["step"])
    assert "optimizer" not in best and set(best["ema"]) == set(best["model"])  # weights only
    with pytest.raises(ValueError, match=r"checkpoint-best.pth' holds the best epoch's weights, not a training "
                                         r"state: resume from the run's checkpoint-latest.pth"):
        run(*tiny(folder, out, "--init", pretrained / "checkpoint-latest.pth", "--epochs", "2", "--model-ema",
                  "--model-ema-decay", "0.5", "--resume", out / "checkpoint-best.pth"))
    # classifier.pth under timm names: norm is Identity in avg pooling, fc_norm + head instead
    sd = load(out / "classifier.pth")
    assert {"fc_norm.weight", "head.weight", "pos_embed", "blocks.5.mlp.fc2.weight"} <= set(sd)
    assert not any(k.startswith(("backbone.", "norm.")) for k in sd)
    pre = load(pretrained / "backbone.pth")["model"]
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], pre["blocks.0.attn.qkv.weight"])  # it trained


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, folder, pretrained, monkeypatch):
    # mixup, RandAugment, erasing, drop path on; a checkpoint in the middle of each 4-step epoch
    flags = ["--init", pretrained / "backbone.pth", "--epochs", "3", "--save-every", "2"]
    run(*tiny(folder, tmp_path / "a", *flags))
    real_step, calls = finetune.train_step, []

    def crash_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(finetune, "train_step", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(*tiny(folder, tmp_path / "b", *flags))
    assert load(tmp_path / "b" / "checkpoint-latest.pth")["step"] == 6  # the middle of epoch 2
    monkeypatch.setattr(finetune, "train_step", real_step)
    run(*tiny(folder, tmp_path / "b", *flags))
    a, b = load(tmp_path / "a" / "checkpoint-latest.pth"), load(tmp_path / "b" / "checkpoint-latest.pth")
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    # the resumed epoch's loss is the whole epoch's: the running sums came back with the checkpoint
    assert [r["train_loss"] for r in logs[0]] == [r["train_loss"] for r in logs[1]]


def test_resume_with_another_init_is_refused(tmp_path, folder, pretrained):
    run(*tiny(folder, tmp_path, "--init", pretrained / "backbone.pth", "--max-steps", "1"))
    with pytest.raises(ValueError, match="--init"):
        run(*tiny(folder, tmp_path, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                  "--patch-size", "4", "--max-steps", "1"))


def test_linear_probe_leaves_the_backbone_unchanged(tmp_path, folder, pretrained):
    out = tmp_path / "lin"
    run(*tiny(folder, out, "--init", pretrained / "backbone.pth", "--mode", "linear", "--max-steps", "3"))
    ckpt, pre = load(out / "checkpoint-latest.pth"), load(pretrained / "backbone.pth")["model"]
    for k, v in pre.items():
        assert torch.equal(ckpt["model"]["backbone." + k], v), k
    assert ckpt["model"]["fc_norm.running_mean"].abs().sum() > 0  # BN statistics did update


@pytest.mark.parametrize("arch", ["resnet18"])
def test_resnet_recipe_uses_lamb_and_bce_from_scratch(tmp_path, folder, arch):
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(
        tiny(folder, tmp_path, "--init", "scratch", "--arch", arch)))
    assert (args.opt, args.loss, args.layer_decay) == ("lamb", "bce", 1.0)
    result = run(*tiny(folder, tmp_path, "--init", "scratch", "--arch", arch, "--img-size", "32",
                       "--eval-size", "48", "--max-steps", "2"))
    assert result["n_val"] == 9


def test_knn_mode_counts_every_validation_image(tmp_path, folder, pretrained):
    result = run(*tiny(folder, tmp_path, "--init", pretrained / "backbone.pth", "--mode", "knn",
                       "--knn-k", "3"))
    assert result["n_val"] == 9 and result["top5"] == 100.0
    assert result["top1"] >= 50.0  # two ramp directions: trivially separable
    # the collapse check is the effective rank of the training features the k-NN searched
    flags = tiny(folder, tmp_path, "--init", pretrained / "backbone.pth", "--mode", "knn")
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(flags))
    backbone, net = enh.load_backbone(args.init, args.arch, args.img_size, args.patch_size)
    backbone.eval()
    args.img_size = net["img_size"]
    train = data.build_dataset(str(folder), "train", data.EvalTransform(args.img_size, crop_pct=args.crop_pct))
    feats, _ = training.extract_features(backbone, data.build_eval_loader(train, 4, 0), torch.device("cpu"))
    assert result["feature_rank"] == pytest.approx(training.effective_rank(feats), rel=1e-4)
    assert 1.0 <= result["feature_rank"] <= feats.shape[1]


# ----------------------------------------------------------------------------------------------------
# --eval-split select; the k-NN floor of raw pixels and the k-NN of every block
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["finetune", "linear", "knn"])
def test_eval_split_select_trains_on_fit_and_evaluates_on_select_without_val(tmp_path, pretrained, monkeypatch,
                                                                             mode):
    """Every mode: the training images are exactly train/ less the selection split, the evaluation
    images exactly the selection split (data.build_dataset's "fit" / "select"), and no val/ is read."""
    root = image_folder(tmp_path / "data", n_train=(10, 10))
    shutil.rmtree(root / "val")
    fit, select = (data.build_dataset(str(root), s, None).samples for s in ("fit", "select"))
    assert (len(fit), len(select)) == (18, 2) and not set(fit) & set(select)  # round(10%) of each class of 10
    seen = {"train": [], "eval": []}
    real_train, real_eval = data.build_loader, data.build_eval_loader
    monkeypatch.setattr(data, "build_loader", lambda ds, *a, **k: seen["train"].append(ds.samples)
                        or real_train(ds, *a, **k))
    monkeypatch.setattr(data, "build_eval_loader", lambda ds, *a, **k: seen["eval"].append(ds.samples)
                        or real_eval(ds, *a, **k))
    out = tmp_path / "out"
    result = run(*tiny(root, out, "--init", pretrained / "backbone.pth", "--mode", mode, "--eval-split", "select",
                       "--max-steps", "1", "--knn-k", "3"))
    if mode == "knn":  # both sets through evaluation loaders: the memory bank, then the queries
        assert seen == {"train": [], "eval": [fit, select]}
        assert (result["n_train"], result["n_val"]) == (18, 2)
    else:
        assert seen == {"train": [fit], "eval": [select]}
        assert result["n_val"] == 2
    record = (json.load(open(out / "knn.json")) if mode == "knn"  # k-NN trains nothing: one result file
              else [json.loads(line) for line in open(out / "log.jsonl")][-1])
    assert (record["train_split"], record["eval_split"]) == ("fit", "select") == (result["train_split"],
                                                                                  result["eval_split"])
    if mode != "knn":  # a resume compares it: another split is another experiment
        shutil.copytree(root / "train", root / "val")
        with pytest.raises(ValueError, match=r"--eval-split 'select' -> 'val'"):
            run(*tiny(root, out, "--init", pretrained / "backbone.pth", "--mode", mode, "--eval-split", "val",
                      "--max-steps", "1"))


def test_without_val_the_default_split_names_the_way_out(tmp_path, pretrained):
    root = image_folder(tmp_path / "data")
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match="no val/ split .* pass --eval-split select"):
        run(*tiny(root, tmp_path / "out", "--init", pretrained / "backbone.pth", "--max-steps", "1"))


class After(nn.Module):
    """The output after block (ViT) or stage (ResNet) j, written out: a ViT's tokens through a
    LayerNorm without affine parameters (B, 1+N, D), a ResNet's map (B, C, H, W); training's
    pooled_features then averages the patch tokens or the map."""

    def __init__(self, net, j):
        super().__init__()
        self.net, self.j = net, j

    def forward(self, x):
        if isinstance(self.net, enh.VisionTransformer):
            t = self.net.embed(x)
            for blk in self.net.blocks[:self.j]:
                t = blk(t)
            return nn.functional.layer_norm(t, t.shape[-1:], eps=1e-6)
        x = self.net.stem(x)
        for s in range(1, self.j + 1):
            x = getattr(self.net, f"layer{s}")(x)
        return x


def noise_folder(root, n=(24, 24), side=16):
    """root/{train,val}/c{0,1}/{i}.png: a brightness of its own per image plus noise, classes drawn at
    random: nothing to learn, and the pixels' shared component large, so centring changes the k-NN."""
    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), n):
        labels = torch.randint(0, 2, (count,), generator=g)
        for i, k in enumerate(labels.tolist()):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
            px = 200 * torch.rand(1, generator=g) + 55 * torch.rand(side, side, 3, generator=g)
            Image.fromarray(px.byte().numpy(), "RGB").save(root / split / f"c{k}" / f"{i}.png")
    return root


def knn_top1(train, val, k=3, temperature=0.07):
    """Weighted k-NN top-1 (%) written out: cosine similarity, the k nearest vote with exp(sim / T)."""
    (xt, yt), (xv, yv) = train, val
    sim = nn.functional.normalize(xv, dim=1) @ nn.functional.normalize(xt, dim=1).T  # (n_val, n_train)
    top_sim, top_idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(yv), int(yt.max()) + 1).scatter_add_(1, yt[top_idx], (top_sim / temperature).exp())
    return 100.0 * (votes.argmax(1) == yv).float().mean().item()


def test_knn_mode_reports_the_raw_pixel_floor(tmp_path):
    """knn_raw_pixels: the weighted k-NN of the evaluation view's pixels centred on the training
    mean, against a brute-force computation on the images themselves."""
    root = noise_folder(tmp_path / "data")
    result = run(*tiny(root, tmp_path / "out", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                       "--patch-size", "4", "--mode", "knn", "--knn-k", "3"))
    tf = data.EvalTransform(16, crop_pct=finetune.RECIPES["photos"]["vit"]["crop_pct"])

    def pixels(split):  # (n, 3*16*16), (n,): each image of the split through the evaluation transform
        ds = data.build_dataset(str(root), split, tf)
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        return torch.stack(xs).flatten(1), torch.tensor(ys)

    train, val = pixels("train"), pixels("val")
    mean = train[0].mean(0)
    centred = knn_top1((train[0] - mean, train[1]), (val[0] - mean, val[1]))
    assert centred != knn_top1(train, val)  # the data tells the two apart
    assert result["knn_raw_pixels"] == pytest.approx(centred)
    assert list(result)[4:6] == ["top1", "knn_raw_pixels"]  # next to the features' k-NN


@pytest.mark.parametrize("arch", ["vit_mini", "resnet18"])
def test_knn_blocks_gives_each_blocks_own_knn_from_one_pass(tmp_path, folder, pretrained, monkeypatch, arch):
    """--knn-blocks: one k-NN per ViT block / ResNet stage, each the k-NN of that layer's own feature
    written out (After), the feature banks of all of them from one pass over each set."""
    init = ["--init", pretrained / "backbone.pth"]
    if arch == "resnet18":
        init = ["--init", "scratch", "--arch", arch, "--img-size", "16"]
    seen, banks = {}, []
    real_per_layer, real_classify = training.knn_per_layer, training.knn_classify

    def spy(backbone, train_loader, val_loader, *a):
        seen.update(backbone=backbone, loaders=(train_loader, val_loader), passes=0)
        with monkeypatch.context() as m:
            m.setattr(training, "knn_classify",
                      lambda t, ty, v, *r: banks.append((t, v)) or real_classify(t, ty, v, *r))
            m.setattr(type(backbone), "get_layer_outputs", counted)
            return real_per_layer(backbone, train_loader, val_loader, *a)

    def counted(net, x, layers):
        seen["passes"] += len(x)
        return real_outputs(net, x, layers)

    real_outputs = {"vit_mini": enh.VisionTransformer, "resnet18": enh.ResNet}[arch].get_layer_outputs
    monkeypatch.setattr(training, "knn_per_layer", spy)
    result = run(*tiny(folder, tmp_path, *init, "--mode", "knn", "--knn-k", "3", "--knn-blocks"))
    backbone, loaders = seen["backbone"], seen["loaders"]
    name, depth = ("knn_blocks", 6) if arch == "vit_mini" else ("knn_stages", 4)
    other = ({"knn_blocks", "knn_stages"} - {name}).pop()
    assert len(result[name]) == depth == len(banks) and other not in result
    assert seen["passes"] == 16 + 9  # every image once, whatever the depth
    cpu = torch.device("cpu")
    for j in range(1, depth + 1):  # (eval mode: the recipe's drop path is on in training mode)
        direct = [training.extract_features(After(backbone, j).eval(), loader, cpu)[0] for loader in loaders]
        assert all(torch.allclose(got, want, atol=1e-5) for got, want in zip(banks[j - 1], direct)), j
        assert result[name][j - 1] == pytest.approx(
            training.knn_accuracy(After(backbone, j), *loaders, 2, cpu, 3)["top1"]), j


def test_raw_pixels_are_left_out_past_their_memory_bound(tmp_path, folder, pretrained, monkeypatch, capsys):
    monkeypatch.setattr(training, "RAW_PIXELS_MAX_BYTES", 16 * 3 * 16 ** 2 * 4 - 1)  # 16 images of 16 px
    result = run(*tiny(folder, tmp_path, "--init", pretrained / "backbone.pth", "--mode", "knn", "--knn-k", "3"))
    assert result["knn_raw_pixels"] is None and result["top1"] is not None
    assert "knn_raw_pixels left out: 16 training images of 16 px" in capsys.readouterr().out


def test_knn_blocks_needs_the_knn_mode(tmp_path, folder):
    with pytest.raises(ValueError, match="--knn-blocks is a k-NN of every block: it needs --mode knn, not linear"):
        finetune.resolve_args(finetune.get_args_parser().parse_args(
            tiny(folder, tmp_path, "--init", "scratch", "--mode", "linear", "--knn-blocks")))


# ----------------------------------------------------------------------------------------------------
# The recipe of a ViT from scratch
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, init, mode, expected", [
    ("photos", "scratch", "finetune", (1.0, 30)),         # no layer decay for a random ViT, a longer run
    ("photos", "checkpoint", "finetune", (0.75, 10)),     # the pre-trained recipe
    ("photos", "scratch", "linear", (1.0, 10)),           # the linear probe's own recipe
    ("photos", "scratch", "knn", (0.75, 10)),             # (nothing trains)
    ("builtin", "scratch", "finetune", (1.0, 2)),         # the built-in run keeps its epochs
    ("builtin", "checkpoint", "finetune", (0.75, 2)),
    ("imagenet", "scratch", "finetune", (0.65, 100)),     # unchanged there: BEiT-B's
])
def test_a_vit_from_scratch_gets_no_layer_decay(tmp_path, folder, pretrained, recipe, init, mode, expected):
    flags = ["--init", "scratch", "--arch", "vit_mini"]
    if init == "checkpoint":
        flags = ["--init", pretrained / "backbone.pth"]
    flags += ["--data", folder] if recipe == "photos" else ["--recipe", recipe] if recipe == "imagenet" else []
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(
        [str(f) for f in flags + ["--mode", mode, "--output-dir", tmp_path]]))
    assert (args.recipe, args.layer_decay, args.epochs) == (recipe, *expected)
    # the rest of the scratch recipe is the ViT recipe's
    if (init, mode) == ("scratch", "finetune") and recipe != "imagenet":
        kinds = finetune.RECIPES[recipe]
        assert {k: v for k, v in kinds["vit_scratch"].items() if k not in ("layer_decay", "epochs")} == \
            {k: v for k, v in kinds["vit"].items() if k not in ("layer_decay", "epochs")}
    # a flag given beats the recipe
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(
        [str(f) for f in flags + ["--mode", mode, "--output-dir", tmp_path, "--layer-decay", "0.9"]]))
    assert args.layer_decay == 0.9


@pytest.mark.parametrize("recipe, init, expected", [
    ("photos", "scratch", (2e-2, 10)),      # from scratch: its own LAMB lr, chosen on the selection split
    ("photos", "checkpoint", (1e-2, 10)),   # pre-trained: chosen the same way (docs/study.md)
    ("builtin", "scratch", (2e-3, 2)),      # the built-in run keeps its own
    ("imagenet", "scratch", (5e-3 * 256 / 2048, 300)),  # RSB A2's
])
def test_the_photos_recipe_trains_a_resnet_at_the_lr_chosen_for_its_init(tmp_path, folder, recipe, init, expected):
    flags = ["--init", "scratch", "--arch", "resnet18"]
    if init == "checkpoint":
        torch.save(enh.build_backbone("resnet18").state_dict(), tmp_path / "resnet.pth")
        flags = ["--init", tmp_path / "resnet.pth"]
    flags += ["--data", folder] if recipe == "photos" else ["--recipe", recipe] if recipe == "imagenet" else []
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(
        [str(f) for f in flags + ["--output-dir", tmp_path]]))
    assert (args.recipe, args.blr, args.epochs, args.opt, args.layer_decay) == (recipe, *expected, "lamb", 1.0)
    if recipe == "photos":  # the lr is all that differs between the two photos ResNet recipes
        photos = finetune.RECIPES["photos"]
        assert {k: v for k, v in photos["resnet_scratch"].items() if k != "blr"} == \
            {k: v for k, v in photos["resnet"].items() if k != "blr"}


def test_effective_rank_counts_the_directions_the_features_use():
    n = 64
    a = torch.tensor([1.0, -1.0]).repeat(n // 2)                 # two exactly uncorrelated signals
    b = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(n // 4)
    two = torch.stack([a, 3 * a + 5, b, -b, 0 * a + 7], dim=1)   # each twice (scaled), one constant
    assert training.effective_rank(two) == pytest.approx(2.0)    # the constant channel is left out
    eye = torch.eye(8).repeat(4, 1)                              # 8 one-hot channels: corr -1/7
    assert training.effective_rank(eye) == pytest.approx(64 / (8 + 56 / 49))
    torch.manual_seed(0)
    one = torch.randn(n, 1) * (torch.rand(1, 32) + 0.5) + 1e-3 * torch.randn(n, 32)  # one direction
    assert 1.0 <= training.effective_rank(one) < 1.01
    assert training.effective_rank(torch.ones(5, 3)) == 0.0
    # the definition itself, on more rows than one chunk of the float64 sums
    mixed = torch.randn(70_000, 4) @ torch.randn(4, 4) + torch.tensor([5.0, -3.0, 0.0, 100.0])
    eig = torch.linalg.eigvalsh(torch.corrcoef(mixed.double().T))
    assert training.effective_rank(mixed) == pytest.approx((eig.sum() ** 2 / (eig ** 2).sum()).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Two gloo processes over an uneven split: each validation image counted exactly once
# ----------------------------------------------------------------------------------------------------

EVAL_DRIVER = """
import json, os, sys, torch
import data, finetune, training
rank, world, device = training.init_distributed("cpu", "gloo")
torch.manual_seed(0)
model = finetune.Classifier(finetune.enh.build_backbone("vit_mini", img_size=16, patch_size=4), 2)
val = data.build_dataset(sys.argv[1], "val", data.EvalTransform(16, crop_pct=1.0))
loader = data.build_eval_loader(val, 3, 0, rank, world)
stats = finetune.evaluate(model, loader, device)
feats, labels = training.extract_features(model.backbone, loader, device)
stats["feat_rows"], stats["label_sum"] = feats.shape[0], int(labels.sum())
stats["shard"] = len(loader.sampler)
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(stats, f)
training.finish_distributed()
"""



def test_two_process_evaluation_counts_each_sample_once(tmp_path, folder):
    driver = tmp_path / "eval_driver.py"
    driver.write_text(EVAL_DRIVER)
    proc = torchrun([driver, folder, tmp_path])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {r: json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)}
    assert sorted(r["shard"] for r in res.values()) == [4, 5]  # 9 images: 5 + 4, nothing padded
    # one process over the same images
    torch.manual_seed(0)
    model = finetune.Classifier(enh.build_backbone("vit_mini", img_size=16, patch_size=4), 2)
    val = data.build_dataset(str(folder), "val", data.EvalTransform(16, crop_pct=1.0))
    single = finetune.evaluate(model, data.build_eval_loader(val, 3, 0), torch.device("cpu"))
    for r in res.values():
        assert r["n"] == 9 and r["feat_rows"] == 9 and r["label_sum"] == 4
        assert r["top1"] == pytest.approx(single["top1"]) and r["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_eval_sampler_splits_an_odd_count_without_repeats():
    ds = list(range(7))
    shards = [list(data.EvalSampler(ds, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == ds
    assert [len(s) for s in shards] == [3, 2, 2]


def test_two_process_gloo_finetune_run(tmp_path, folder, pretrained):
    """DDP training (replicas all-reduce), exact evaluation and rank-0 saving, as torchrun starts it."""
    out = tmp_path / "ddp"
    proc = torchrun([os.path.join(REPO, "finetune.py"),
                     *tiny(folder, out, "--init", pretrained / "backbone.pth", "--epochs", "1", "--dist-backend",
                           "gloo", "--batch-size", "2")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 1 and log[0]["step"] == 4 and log[0]["n_val"] == 9  # 16 images / (2 x 2) per step
    assert len(load(out / "checkpoint-latest.pth")["rng"]) == 2


def test_bf16_autocast_step_on_cpu(tmp_path, folder, pretrained):
    result = run(*tiny(folder, tmp_path, "--init", pretrained / "backbone.pth", "--max-steps", "2",
                       "--amp", "bf16"))
    assert result["step"] == 2 and 0 < result["train_loss"] < 10  # both steps applied, finite


def test_help_shows_every_recipes_value_for_vit_resnet_and_linear():
    """`--help` is where a user reads what the recipes set: each [recipe] flag lists the value of
    every recipe and kind, so the ResNet (RSB) and linear-probe settings are visible too."""
    text = " ".join(finetune.get_args_parser().format_help().split())
    for key, flag in (("blr", "--blr"), ("opt", "--opt"), ("epochs", "--epochs"), ("mixup", "--mixup")):
        values = "; ".join(f"{recipe} " + ", ".join(f"{kind} {v[key]}" for kind, v in kinds.items())
                           for recipe, kinds in finetune.RECIPES.items())
        assert f"[recipe: {values}]" in text, flag
    assert "imagenet vit adamw, vit_s adamw, vit_b adamw, vit_l adamw, resnet lamb, linear lars" in text


@pytest.mark.parametrize("extra, pattern", [
    (["--head-init-scale", "nan"], r"--head-init-scale: must be a number >= 0, got nan"),  # trained garbage
    (["--model-ema-decay", "2"], r"--model-ema-decay: must be a number in \(0, 1\), got 2"),  # EMA blew up
    (["--layer-decay", "0"], r"--layer-decay: must be a number in \(0, 1\]"),
    (["--crop-pct", "1.5"], r"--crop-pct: must be a number in \(0, 1\]"),
    (["--smoothing", "1"], r"--smoothing: must be a number in \[0, 1\)"),
    (["--epochs", "0"], r"--epochs: must be a number > 0"),
    (["--blr", "nan"], r"--blr: must be a number > 0, got nan"),
])
def test_bad_numeric_flags_are_refused_on_one_line(tmp_path, extra, pattern, capsys):
    err = refused(finetune.get_args_parser(), ["--init", "scratch", "--output-dir", tmp_path / "o", *extra], capsys)
    assert re.search(r"^finetune\.py: error: argument " + pattern, err), err


def test_small_photos_get_the_photos_recipe_and_a_resnet_its_small_stem(tmp_path, folder):
    """--data of images up to 64 px: the photos recipe (10 epochs, the built-in settings otherwise);
    a ResNet from scratch there gets the small-image stem, like pretrain.py's photos recipe."""
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(tiny(folder, tmp_path, "--init", "scratch",
                                                                              "--arch", "resnet18")))
    assert (args.recipe, args.epochs, args.resnet_stem) == ("photos", 10, "small")
    run(*tiny(folder, tmp_path / "ft", "--init", "scratch", "--arch", "resnet18", "--img-size", "16",
              "--max-steps", "1"))
    assert load(tmp_path / "ft" / "classifier.pth")["conv1.weight"].shape == (64, 3, 3, 3)
