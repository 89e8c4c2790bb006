"""Tests for segment.py and its data: mIoU / aAcc against a hand-computed confusion matrix, sliding
windows that cover every pixel and agree with whole-image inference, pyramid shapes for ViT and
ResNet at two crop sizes, the poly schedule, layer-decay groups, the training transform (pad with
the ignore label, image and label moved together), a loss that falls on the built-in masks, a run
on an ADE20K-layout folder of odd sizes, a 2-process gloo evaluation equal to the 1-process one,
and bad label files named in the error."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import enhancer as enh
import segment
import training
from conftest import REPO, refused, torchrun


def run(*argv):
    return segment.main(segment.get_args_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------

def test_metrics_match_a_hand_computed_confusion_matrix():
    label = torch.tensor([0, 0, 1, 1, 1, 2, 255, 255, 2, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 1, 0])
    conf = segment.confusion_matrix(pred, label, 4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in zip(label.tolist(), pred.tolist()):
        if t != 255:
            expected[t, p] += 1
    assert torch.equal(conf, expected)
    assert conf.sum() == 8  # the two ignored pixels are not counted
    m = segment.segmentation_metrics(conf)
    # IoU = tp / (gt + pred - tp). class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 3, pred 4
    # -> 2/5; class 2: tp 1, gt 2, pred 1 -> 1/2 (predictions on ignored pixels do not count);
    # class 3 never occurs -> left out of the mean
    assert m["IoU"][:3] == pytest.approx([50.0, 40.0, 50.0]) and np.isnan(m["IoU"][3])
    assert m["mIoU"] == pytest.approx(140 / 3)
    assert m["aAcc"] == pytest.approx(100 * 5 / 8)
    assert m["Acc"][:3] == pytest.approx([200 / 3, 200 / 3, 50.0])


def test_poly_schedule_with_linear_warmup():
    assert training.poly_lr(0, 100, 10, 1.0) == pytest.approx(1e-6)
    assert training.poly_lr(5, 100, 10, 1.0) == pytest.approx(0.95 * (0.5 + 0.5 * 1e-6))
    assert training.poly_lr(50, 100, 10, 1.0) == pytest.approx(0.5)
    assert training.poly_lr(100, 100, 10, 1.0) == 0.0


# ----------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------

class PointwiseModel(nn.Module):
    """A 1x1 conv: its output at a pixel depends on that pixel only, so any tiling gives the same."""
    size_multiple = 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("H, W, crop, stride", [(37, 50, 16, 11), (20, 9, 16, 10), (16, 16, 16, 5)])
def test_sliding_window_covers_every_pixel_and_equals_whole_image(H, W, crop, stride):
    model = PointwiseModel().eval()
    x = torch.randn(2, 3, H, W)
    slide = segment.infer_slide(model, x, crop, stride, 5)
    whole = segment.infer_whole(model, x)
    assert slide.shape == whole.shape == (2, 5, H, W)
    assert torch.allclose(slide, whole, atol=1e-5)

    class Ones(PointwiseModel):
        def forward(self, x):
            return torch.ones(x.shape[0], 5, *x.shape[2:])

    covered = segment.infer_slide(Ones(), x, crop, stride, 5)
    assert torch.equal(covered, torch.ones_like(covered))  # every pixel seen, averaged exactly


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("crop", [32, 48])
def test_vit_pyramid_shapes(crop):
    bb = enh.build_backbone("vit_mini", img_size=32, patch_size=4)
    model = segment.Segmenter(bb, 7, channels=16, aux_channels=8)
    assert model.neck.layers == [2, 3, 4, 6]
    g = crop // 4
    feats = model.neck(torch.randn(2, 3, crop, crop))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 4 * g, 4 * g), (2, 128, 2 * g, 2 * g), (2, 128, g, g),
                                               (2, 128, g // 2, g // 2)]
    model.train()
    out, aux = model(torch.randn(2, 3, crop, crop))
    assert out.shape == aux.shape == (2, 7, crop, crop)


@pytest.mark.parametrize("crop", [64, 96])
def test_resnet_pyramid_shapes(crop):
    model = segment.Segmenter(enh.build_backbone("resnet18"), 4, channels=16, aux_channels=8)
    feats = model.neck(torch.randn(1, 3, crop, crop))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, crop // 4, crop // 4), (128, crop // 8, crop // 8),
                                                   (256, crop // 16, crop // 16), (512, crop // 32, crop // 32)]
    model.eval()
    assert model(torch.randn(1, 3, crop, crop)).shape == (1, 4, crop, crop)


def test_default_layers_spread_like_beit():
    assert segment.default_layers(12) == [4, 6, 8, 12]
    assert segment.default_layers(24) == [8, 12, 16, 24]
    assert segment.default_layers(6) == [2, 3, 4, 6]


def test_layer_decay_scales_the_backbone_only():
    bb = enh.build_backbone("vit_mini", img_size=32, patch_size=4)
    model = segment.Segmenter(bb, 5, channels=16, aux_channels=8)
    groups = training.param_groups(model, 0.05, {"neck.backbone.pos_embed", "neck.backbone.cls_token"}, 0.5, 6)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["neck.backbone.patch_embed.proj.weight"] == 0.5 ** 7
    assert scale["neck.backbone.blocks.5.mlp.fc1.weight"] == 0.5
    assert scale["neck.fpn1.0.weight"] == scale["decode_head.conv_seg.weight"] == scale["auxiliary_head.conv.0.weight"] == 1.0
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"neck.backbone.pos_embed", "neck.backbone.cls_token", "decode_head.conv_seg.bias"} <= no_decay
    assert "decode_head.bottleneck.0.weight" not in no_decay


def test_a_few_steps_on_the_builtin_masks_lower_the_loss():
    ds = data.SyntheticShapes("train", transform=data.SegTrainTransform(32, (128, 32)), segmentation=True)
    x, y = map(torch.stack, zip(*[ds[i] for i in range(8)]))
    assert set(torch.unique(y).tolist()) <= set(range(9)) | {255}
    torch.manual_seed(0)
    model = segment.Segmenter(enh.build_backbone("vit_mini", img_size=32, patch_size=4), 9, 16, 8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss, _ = segment.segmentation_loss(*model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------

def test_train_transform_pads_small_images_with_the_ignore_label():
    img, label = Image.new("RGB", (10, 6), (200, 30, 30)), np.ones((6, 10), np.uint8)
    tf = data.SegTrainTransform(16, scale=(10, 6), ratio_range=(1.0, 1.0), photometric=False)
    x, y = tf(img, label, random.Random(0))
    assert x.shape == (3, 16, 16) and y.shape == (16, 16)
    assert (y[:6, :10] == 1).all() and (y[6:] == 255).all() and (y[:, 10:] == 255).all()
    assert (x[:, 6:] == 0).all()


def test_train_transform_moves_image_and_label_together():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    label = np.zeros((40, 60), np.uint8)
    label[:, 30:] = 1
    tf = data.SegTrainTransform(24, scale=(60, 40), ratio_range=(0.5, 2.0), cat_max_ratio=0.9, photometric=False)
    for s in range(10):
        x, y = tf(Image.fromarray(arr), label, random.Random(s))
        rgb = data.denormalize(x)
        for k, (hot, cold) in ((0, (0, 2)), (1, (2, 0))):
            inside = y == k
            if inside.sum() > 0:
                # the label's colour dominates everywhere (ties only on the blended boundary column)
                assert (rgb[hot][inside] >= rgb[cold][inside] - 1e-3).all()
                assert (rgb[hot][inside] > rgb[cold][inside]).any()


def test_cat_max_ratio_prefers_crops_with_several_classes():
    label = np.zeros((64, 64), np.uint8)
    label[:32, :32] = 1  # one quadrant

    def balanced(box):  # both classes, neither above 75% of the crop
        l, t, r, b = box
        counts = np.unique(label[t:b, l:r], return_counts=True)[1]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    def share(cat_max_ratio):
        tf = data.SegTrainTransform(16, scale=(64, 64), ratio_range=(1.0, 1.0), cat_max_ratio=cat_max_ratio)
        return sum(balanced(tf.crop_box(label, random.Random(s))) for s in range(40))

    assert share(0.75) >= 25 and share(1.0) <= 10  # measured: 29 and 4 of 40


# ----------------------------------------------------------------------------------------------------
# ADE20K layout: a run, bad label files, two processes
# ----------------------------------------------------------------------------------------------------

def ade_folder(root, sizes=((40, 28), (20, 20), (64, 48)), val_sizes=((36, 24), (18, 30), (48, 40)), classes=3):
    """images/annotations in the ADE20K layout; label 0 = ignore, 1..classes; one image per size,
    one smaller than the 32 px crop; a vertical split of two classes plus an ignored stripe."""
    for split, szs in (("training", sizes), ("validation", val_sizes)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, (w, h) in enumerate(szs):
            lab = np.zeros((h, w), np.uint8)
            lab[:, : w // 2] = 1 + i % classes
            lab[:, w // 2:] = 1 + (i + 1) % classes
            lab[:2] = 0
            img = np.stack([lab * 60, 255 - lab * 60, np.full_like(lab, 90)], -1).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"im{i}.jpg")
            Image.fromarray(lab).save(root / "annotations" / split / f"im{i}.png")
    return root


def seg_flags(root, out, *extra):
    return ["--data", root, "--nb-classes", "3", "--init", "scratch", "--arch", "vit_mini", "--patch-size", "4",
            "--crop-size", "32", "--scale", "64", "32", "--stride", "20", "--channels", "16", "--aux-channels", "8",
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--output-dir", out, "--lr", "1e-3",
            "--warmup-iters", "0", "--log-every", "1", *extra]


def test_run_on_an_ade20k_layout_folder_of_odd_sizes(tmp_path):
    root = ade_folder(tmp_path / "ade")
    out = tmp_path / "out"
    result = run(*seg_flags(root, out, "--iters", "3", "--eval-every", "3"))
    assert result["iters"] == 3 and 0 <= result["mIoU"] <= 100
    metrics = json.load(open(out / "metrics.json"))
    assert len(metrics["IoU"]) == 3
    assert sorted(os.listdir(out / "overlays")) == ["val-00.png", "val-01.png", "val-02.png"]
    overlay = Image.open(out / "overlays" / "val-00.png")
    assert overlay.size == (3 * 36 * 4 + 4, 24 * 4)  # image | truth | prediction, the label's size x 4 >= 96
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3]
    assert load(out / "checkpoint-latest.pth")["step"] == 3
    # whole-image inference on the same checkpoint: resumes nothing, evaluates
    result = run(*seg_flags(root, out, "--iters", "3", "--eval-every", "3", "--eval-only", "--mode", "whole"))
    assert 0 <= result["mIoU"] <= 100


def test_eval_only_reads_the_trained_run_with_nothing_but_its_folder(tmp_path):
    """The documented re-evaluation: `--data ROOT --eval-only --output-dir DIR` (no --init, no sizes)
    takes the network and flags from DIR's checkpoint and reproduces the training run's last
    evaluation; precision and inference flags are the evaluation's own."""
    root = ade_folder(tmp_path / "ade")
    out = tmp_path / "out"
    trained = run(*seg_flags(root, out, "--iters", "2", "--eval-every", "2"))
    again = run("--data", root, "--eval-only", "--output-dir", out, "--num-workers", "0", "--device", "cpu")
    assert again["iters"] == 2 and again["init"] == "scratch"
    assert again["mIoU"] == pytest.approx(trained["mIoU"], abs=1e-9)
    assert json.load(open(out / "metrics.json"))["mIoU"] == again["mIoU"]
    bf16 = run("--data", root, "--eval-only", "--output-dir", out, "--num-workers", "0", "--device", "cpu",
               "--amp", "bf16", "--mode", "whole")  # not a training flag change: allowed
    assert 0 <= bf16["mIoU"] <= 100


def test_eval_only_without_a_trained_run_is_refused(tmp_path):
    """Evaluating a fresh folder would report a random head's mIoU as a result."""
    root = ade_folder(tmp_path / "ade")
    for init in ("scratch", None):
        extra = ["--init", init] if init else []
        with pytest.raises(ValueError, match="--eval-only evaluates a trained segmentation model.*train first"):
            run("--data", root, "--nb-classes", "3", "--eval-only", "--output-dir", tmp_path / "fresh",
                "--num-workers", "0", "--device", "cpu", *extra)
    assert not (tmp_path / "fresh" / "metrics.json").exists()


def test_a_segmentation_checkpoint_as_init_names_the_command_that_evaluates_it(tmp_path):
    root = ade_folder(tmp_path / "ade")
    out = tmp_path / "out"
    run(*seg_flags(root, out, "--iters", "1", "--eval-every", "1"))
    flags = seg_flags(root, tmp_path / "other", "--iters", "1")
    flags[flags.index("scratch")] = str(out / "checkpoint-latest.pth")
    del flags[flags.index("--arch"):flags.index("--arch") + 2]
    with pytest.raises(ValueError, match=r"segment\.py checkpoint.*--eval-only --output-dir " + str(out)):
        run(*flags)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case, pattern", [
    ("size", r"label file '.*im1.png' is 19x20 px, its image '.*im1.jpg' is 20x20"),
    ("value", r"label file '.*im1.png' holds value 7, outside the 3 classes"),
    ("missing", r"image '.*im1.jpg' has no annotation '.*im1.png'"),
])
def test_bad_label_files_are_named(tmp_path, case, pattern):
    root = ade_folder(tmp_path / "ade")
    ann = root / "annotations" / "training" / "im1.png"
    if case == "size":
        Image.fromarray(np.ones((20, 19), np.uint8)).save(ann)
    elif case == "value":
        Image.fromarray(np.full((20, 20), 7, np.uint8)).save(ann)
    else:
        ann.unlink()
    with pytest.raises((data.LabelFileError, FileNotFoundError), match=pattern):
        ds = data.ADE20K(str(root), "training", num_classes=3)
        for i in range(len(ds)):
            ds[i]


def test_nb_classes_is_required_with_data(tmp_path):
    with pytest.raises(ValueError, match="--nb-classes is required with --data"):
        run("--data", tmp_path, "--init", "scratch")


def test_labels_without_reduce_zero_label(tmp_path):
    root = ade_folder(tmp_path / "ade")
    ds = data.ADE20K(str(root), "validation", reduce_zero_label=False, num_classes=4)
    _, label = ds[0]
    assert label.min() == 0 and label.max() <= 3  # 0 stays a class
    _, reduced = data.ADE20K(str(root), "validation", num_classes=3)[0]
    assert (reduced[:2] == 255).all() and reduced.max() == 255 and set(np.unique(reduced)) <= {0, 1, 2, 255}


EVAL_DRIVER = """
import json, os, sys, torch
import data, segment, training
rank, world, device = training.init_distributed("cpu", "gloo")
args = segment.resolve_args(segment.get_args_parser().parse_args(sys.argv[3:]))
model = segment.build_model(args)
val = data.ADE20K(sys.argv[1], "validation", data.SegEvalTransform(tuple(args.scale)), num_classes=3)
loader = data.build_eval_loader(val, 1, 0, rank, world)
metrics = segment.evaluate(model, loader, args, device)
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump(dict(metrics, shard=len(loader.sampler)), f)
training.finish_distributed()
"""



def test_two_process_evaluation_equals_one_process(tmp_path):
    root = ade_folder(tmp_path / "ade")
    driver = tmp_path / "driver.py"
    driver.write_text(EVAL_DRIVER)
    flags = [str(a) for a in seg_flags(root, tmp_path / "unused")]
    proc = torchrun([driver, root, tmp_path, *flags])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert sorted(r["shard"] for r in res) == [1, 2]  # 3 images: 2 + 1
    args = segment.resolve_args(segment.get_args_parser().parse_args(flags))
    model = segment.build_model(args)
    val = data.ADE20K(str(root), "validation", data.SegEvalTransform(tuple(args.scale)), num_classes=3)
    single = segment.evaluate(model, data.build_eval_loader(val, 1, 0), args, torch.device("cpu"))
    for r in res:
        assert r["aAcc"] == pytest.approx(single["aAcc"]) and r["mIoU"] == pytest.approx(single["mIoU"])


def test_two_process_gloo_training_run(tmp_path):
    """DDP training as torchrun starts it: both ranks step, rank 0 saves, evaluation is summed."""
    root = ade_folder(tmp_path / "ade", sizes=((40, 28), (20, 20), (64, 48), (30, 50)))
    out = tmp_path / "out"
    proc = torchrun([os.path.join(REPO, "segment.py"),
                     *seg_flags(root, out, "--iters", "2", "--eval-every", "2", "--dist-backend", "gloo")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = load(out / "checkpoint-latest.pth")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2
    assert len(json.load(open(out / "metrics.json"))["IoU"]) == 3


def test_batch_of_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 1: the UperHead's BatchNorm"):
        run(*seg_flags(ade_folder(tmp_path / "ade"), tmp_path / "out", "--batch-size", "1"))


@pytest.mark.parametrize("extra, pattern", [
    (["--cat-max-ratio", "0"], r"--cat-max-ratio: must be a number in \(0, 1\]"),
    (["--layer-decay", "1.5"], r"--layer-decay: must be a number in \(0, 1\]"),
    (["--nb-classes", "0"], r"--nb-classes: must be a number > 0"),
    (["--layers", "2", "3", "4", "x"], r"--layers: expected a whole number, got 'x'"),
])
def test_bad_numeric_flags_are_refused_on_one_line(tmp_path, extra, pattern, capsys):
    err = refused(segment.get_args_parser(), ["--init", "scratch", "--output-dir", tmp_path / "o", *extra], capsys)
    assert re.search(r"^segment\.py: error: argument " + pattern, err), err


def test_the_loss_averages_over_every_pixel_as_mmseg():
    """mmseg's CrossEntropyLoss (avg_non_ignore=False): ignored pixels count 0 in the mean over the
    whole crop, so a crop with half its pixels ignored has half the loss of its labelled mean."""
    torch.manual_seed(0)
    out, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[:, :2] = data.IGNORE_INDEX  # half the pixels ignored
    loss, main = segment.segmentation_loss(out, aux, labels, aux_weight=0.4)
    per_pixel = torch.nn.functional.cross_entropy(out, labels.clamp(max=2), reduction="none")
    keep = labels != data.IGNORE_INDEX
    assert torch.allclose(main, (per_pixel * keep).sum() / labels.numel())
    assert torch.allclose(main, 0.5 * per_pixel[keep].mean())
    aux_pixel = torch.nn.functional.cross_entropy(aux, labels.clamp(max=2), reduction="none")
    assert torch.allclose(loss, main + 0.4 * (aux_pixel * keep).sum() / labels.numel())


class ScriptedRng:
    """random() answers from a script; randint(a, b) gives `shift`."""

    def __init__(self, answers, shift):
        self.answers, self.shift = list(answers), shift

    def random(self):
        return self.answers.pop(0)

    def randint(self, a, b):
        assert (a, b) == (-18, 18)  # mmseg's hue_delta in OpenCV's units
        return self.shift

    def uniform(self, a, b):
        raise AssertionError("only the hue branch runs")


@pytest.mark.parametrize("shift", [18, -18, 5])
def test_photometric_hue_shift_is_mmsegs_in_opencv_units(shift):
    """randint(-18, 18) OpenCV hue units of 2 degrees: +-36 degrees at the ends (0.1: the hue branch
    runs; 0.9: brightness, contrast and saturation do not)."""
    red = Image.new("RGB", (4, 4), (255, 0, 0))  # hue 0
    out = data.photometric_distortion(red, ScriptedRng([0.9, 0.9, 0.9, 0.1, 0.9], shift))
    hue = np.asarray(out.convert("HSV"))[..., 0].astype(float)
    degrees = ((hue * 360 / 256 + 180) % 360) - 180
    assert np.allclose(degrees, 2 * shift, atol=3.0), degrees[0, 0]  # 8-bit HSV round trips: +-3 degrees
