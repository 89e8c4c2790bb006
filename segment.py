"""Semantic segmentation after CIM: UperNet on an enhancer backbone (ViT or ResNet), ADE20K layout.

CIM's second downstream task (Sec. 4.2): ADE20K, UperNet, ViT-B/16 enhancer, 43.5-43.6 mIoU. Written
without mmseg, following BEiT's semantic-segmentation setup:

    ViT      features after 4 blocks spread like BEiT's (4, 6, 8, 12 of 12), cls dropped, tokens ->
             maps; a 4-level pyramid: fpn1 = deconv 2x, BN, GELU, deconv 2x (1/4 of the patch grid's
             stride ... i.e. stride P/4), fpn2 = deconv 2x, fpn3 = identity, fpn4 = max-pool 2
    ResNet   C2..C5 (strides 4, 8, 16, 32)
    UperHead pyramid pooling (1, 2, 3, 6) on the last level + FPN fusion of all four, dropout 0.1
    FCNHead  auxiliary head on level 3, loss weight 0.4

It reads checkpoints, never another stage's code: `--init` goes through enhancer.load_backbone (every
kind finetune.py reads) and layer decay through training.param_groups. Data: the ADE20K layout (`--data ROOT`: images/{training,validation}
and annotations/...), any class count (`--nb-classes`) and image size, or with no --data the built-in
shapes with their per-pixel masks (background + 8 shape classes).

    python segment.py --init out/pretrain/backbone.pth                  # built-in masks, CPU minutes
    python segment.py --init scratch --arch vit_mini                    # the same recipe from scratch
    torchrun --nproc_per_node 8 segment.py --data /path/ADEChallengeData2016 --nb-classes 150 \\
        --init cim_vit_b.pth --batch-size 2 --amp bf16 --output-dir out/seg_vit_b   # 160k iters, batch 16
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import enhancer as enh
import runs
import training

# ----------------------------------------------------------------------------------------------------
# Recipes. "imagenet": BEiT's ADE20K UperNet setting for ImageNet-scale pre-trained backbones (CIM
# follows BEiT); "builtin": the built-in masks on a CPU in minutes.
# ----------------------------------------------------------------------------------------------------

RECIPES = {
    "builtin": dict(arch="vit_mini", patch_size=4, crop_size=32, scale=[128, 32],
                    iters=300, batch_size=16, lr=1e-3, layer_decay=0.75, weight_decay=0.05, warmup_iters=30,
                    channels=32, aux_channels=16, drop_path=0.1, stride=21, num_workers=1,
                    eval_every=300, cat_max_ratio=0.75, eval_batch_size=32),
    # BEiT-B: AdamW lr 7e-4 (0.9, 0.999), wd 0.05, layer decay 0.65, poly, 1500 warm-up iterations,
    # 160k iterations, batch 16 (2 per GPU x 8), crop 512, scale (2048, 512) x [0.5, 2], slide 512 / 341
    "imagenet": dict(arch="vit_b", patch_size=16, crop_size=512, scale=[2048, 512],
                     iters=160000, batch_size=2, lr=7e-4, layer_decay=0.65, weight_decay=0.05,
                     warmup_iters=1500, channels=768, aux_channels=256, drop_path=0.1, stride=341,
                     num_workers=4, eval_every=16000, cat_max_ratio=0.75, eval_batch_size=1),
}
def get_args_parser():
    """Every flag once: its type and range check (runs.number), whether a resume may change it
    (free: output, processes, and how evaluation is done, not what is trained), and for [recipe]
    flags each recipe's default, listed in --help."""
    p, a, free = runs.stage_parser("segment.py", "UperNet semantic segmentation on a CIM enhancer",
                                   "out/segment", "checkpoints, log.jsonl, metrics.json, overlay PNGs",
                                   save_every=1000, log_every=20)
    pos_int, pos_float, nonneg_int, nonneg_float = (runs.POS_INT, runs.POS_FLOAT, runs.NONNEG_INT,
                                                    runs.NONNEG_FLOAT)

    def r(name, help, resume_free=False, **kw):  # default from the recipe; --help shows every recipe's
        key = name[2:].replace("-", "_")
        values = ", ".join(f"{k} {RECIPES[k][key]}" for k in RECIPES)
        (free if resume_free else a)(name, default=None, help=f"{help} [recipe: {values}]", **kw)

    a("--recipe", default=None, choices=list(RECIPES),
      help="defaults of every flag marked [recipe]: builtin without --data, imagenet (BEiT's ADE20K "
           "setting) with --data")
    a("--init", default=None, help="pre-training checkpoint, backbone.pth, timm/torchvision state dict, "
      "or 'scratch' (as finetune.py)")
    r("--arch", f"backbone, one of {list(enh.ARCHS)}; taken from --init when it is a checkpoint",
      choices=list(enh.ARCHS))
    r("--patch-size", "ViT patch size for --init scratch (else the checkpoint's)", type=pos_int)
    a("--nb-classes", type=runs.number(int, "> 0"), default=None, help="classes (150 for ADE20K, at "
      "most 255); default: 9 on the built-in data; required with --data")
    a("--no-reduce-zero-label", dest="reduce_zero_label", action="store_false",
      help="labels are 0..K-1 already (by default 0 = ignore and 1..K -> 0..K-1, as ADE20K)")
    a("--layers", type=pos_int, nargs=4, default=None, help="ViT blocks to tap (1-based); default spread "
      "like BEiT's 4, 6, 8, 12 of 12")
    r("--channels", "UperHead width (BEiT: 768)", type=pos_int)
    r("--aux-channels", "auxiliary FCN head width (256)", type=pos_int)
    a("--aux-weight", type=nonneg_float, default=0.4, help="auxiliary loss weight")
    r("--drop-path", "backbone stochastic depth", type=runs.number(float, "in [0, 1)"))
    # data
    a("--data", default=None, help="ADE20K-layout root; omit for the built-in shapes and masks")
    r("--crop-size", "training crop (and sliding-window) size", type=pos_int)
    r("--scale", "rescale target (long, short) before the random ratio (mmseg's img_scale)", type=pos_int,
      nargs=2)
    a("--ratio-range", type=pos_float, nargs=2, default=[0.5, 2.0], help="random rescale ratio range")
    r("--cat-max-ratio", "a training crop is redrawn (10 tries) while one class covers more than "
      "this share of its labelled pixels", type=runs.number(float, "in (0, 1]"))
    # optimisation
    r("--iters", "training iterations", type=pos_int)
    r("--batch-size", "images per process per iteration (at least 2: the UperHead's BatchNorm)", type=pos_int)
    r("--lr", "peak AdamW lr", type=pos_float)
    r("--layer-decay", "layer-wise lr decay of the backbone (heads at 1)", type=runs.number(float, "in (0, 1]"))
    r("--weight-decay", "AdamW weight decay (none on 1-D params, position embedding, cls token)",
      type=nonneg_float)
    r("--warmup-iters", "linear warm-up iterations of the poly schedule", type=nonneg_int)
    a("--amp", default="none", choices=["bf16", "fp16", "none"], help="autocast dtype")
    a("--clip-grad", type=nonneg_float, default=None, help="max global grad norm (None = off, as BEiT)")
    free("--max-skips", type=nonneg_int, default=20, help="stop after this many skipped (non-finite) "
         "iterations; fp16 overflows are counted apart")
    a("--seed", type=runs.SEED, default=0, help="seed for data order, augmentation, head init")
    # evaluation
    free("--mode", default="slide", choices=["slide", "whole"], help="inference: sliding crops or whole image")
    r("--stride", "sliding-window stride", type=pos_int, resume_free=True)
    r("--eval-every", "evaluate every N iterations (and at the end)", type=pos_int, resume_free=True)
    r("--eval-batch-size", "validation images per batch (1 where image sizes differ)", type=pos_int,
      resume_free=True)
    free("--eval-only", action="store_true", help="evaluate the trained run in --output-dir (or --resume) "
         "again, no training; flags not given take the run's values")
    free("--overlays", type=nonneg_int, default=4, help="validation images written as PNG overlays at each "
         "evaluation")
    # more flags free on resume (runs.stage_parser adds output, logging, processes)
    r("--num-workers", "DataLoader workers per process", type=nonneg_int, resume_free=True)
    return p


# ----------------------------------------------------------------------------------------------------
# Model: backbone -> 4-level pyramid -> UperHead (+ auxiliary FCNHead)
# ----------------------------------------------------------------------------------------------------

def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def default_layers(depth):
    """Blocks to tap, spread like BEiT's (4, 6, 8, 12) for 12 blocks: depth/3, depth/2, 2depth/3, depth."""
    return [max(1, round(depth / 3)), max(1, round(depth / 2)), max(1, round(2 * depth / 3)), depth]


class ViTPyramid(nn.Module):
    """Token maps after 4 blocks -> feature maps at 4x, 2x, 1x and 0.5x the patch grid (BEiT)."""

    def __init__(self, backbone, layers):
        super().__init__()
        self.backbone, self.layers = backbone, list(layers)
        backbone.norm = nn.Identity()  # the taps are un-normalised block outputs; an unused norm would
        D = backbone.embed_dim         # also leave DDP waiting for its gradients
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                                  nn.ConvTranspose2d(D, D, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(D, D, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2)
        self.out_channels = [D] * 4

    def forward(self, x):
        B, _, H, W = x.shape
        gh, gw = H // self.backbone.patch_size, W // self.backbone.patch_size
        maps = [t[:, 1:].transpose(1, 2).reshape(B, -1, gh, gw)  # (B, N, D) -> (B, D, H/P, W/P)
                for t in self.backbone.get_layer_outputs(x, self.layers)]
        return [f(m) for f, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]


class ResNetPyramid(nn.Module):
    """C2..C5 of a ResNet (strides 4, 8, 16, 32)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        C = backbone.num_features
        self.out_channels = [C // 8, C // 4, C // 2, C]

    def forward(self, x):
        return self.backbone.get_layer_outputs(x, (1, 2, 3, 4))


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's UPerHead: PPM on the last level, lateral 1x1 convs,
    top-down sums, 3x3 FPN convs, all levels upsampled to the first, fused by a 3x3 conv."""

    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels[-1], channels, 1))
                                 for s in pool_scales)
        self.bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def psp(self, x):
        outs = [x] + [F.interpolate(p(x), size=x.shape[2:], mode="bilinear", align_corners=False)
                      for p in self.ppm]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats):
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.psp(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarse maps refine the finer ones
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[2:], mode="bilinear", align_corners=False)
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(outs, dim=1))))


class FCNHead(nn.Module):
    """Auxiliary head (mmseg FCNHead, one conv): 3x3 conv-BN-ReLU, dropout, 1x1 to the classes."""

    def __init__(self, in_channels, channels, num_classes, dropout=0.1):
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        return self.conv_seg(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """Backbone pyramid + UperHead + auxiliary FCNHead on level 3. forward(x) returns logits at the
    input size (B, classes, H, W) and, in training, the auxiliary logits too."""

    def __init__(self, backbone, num_classes, channels=768, aux_channels=256, layers=None):
        super().__init__()
        if isinstance(backbone, enh.VisionTransformer):
            self.neck = ViTPyramid(backbone, layers or default_layers(len(backbone.blocks)))
        else:
            self.neck = ResNetPyramid(backbone)
        self.decode_head = UperHead(self.neck.out_channels, channels, num_classes)
        self.auxiliary_head = FCNHead(self.neck.out_channels[2], aux_channels, num_classes)
        self.size_multiple = 32 if not isinstance(backbone, enh.VisionTransformer) else backbone.patch_size

    def forward(self, x):
        feats = self.neck(x)
        out = F.interpolate(self.decode_head(feats), size=x.shape[2:], mode="bilinear", align_corners=False)
        if not self.training:
            return out
        aux = F.interpolate(self.auxiliary_head(feats[2]), size=x.shape[2:], mode="bilinear", align_corners=False)
        return out, aux


def segmentation_loss(out, aux, labels, aux_weight=0.4):
    """Pixel cross-entropy + aux_weight x the auxiliary head's. As mmseg (0.11, BEiT's version, and
    its later default avg_non_ignore=False): the mean over ALL pixels of the crop, an ignored pixel
    (255: padding, ADE20K's "other") counting 0, not the mean over the labelled ones."""
    def pixel_ce(logits):
        return F.cross_entropy(logits.float(), labels, ignore_index=data.IGNORE_INDEX, reduction="none").mean()
    main = pixel_ce(out)
    return main + aux_weight * pixel_ce(aux), main


# ----------------------------------------------------------------------------------------------------
# Inference: whole image or sliding window; metrics from a confusion matrix
# ----------------------------------------------------------------------------------------------------

def pad_to(x, h, w):
    return F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))


@torch.no_grad()
def infer_whole(model, x):
    """Logits (B, classes, H, W) of the whole image, padded to the backbone's size multiple first."""
    m = model.size_multiple
    H, W = x.shape[-2:]
    out = model(pad_to(x, -(-H // m) * m, -(-W // m) * m))
    return out[..., :H, :W]


@torch.no_grad()
def infer_slide(model, x, crop, stride, num_classes):
    """Average the logits of crop x crop windows every `stride` pixels (the last window of each row
    and column flush with the border, as mmseg's slide_inference); windows sticking out of a small
    image are zero-padded and cut back. Every pixel is covered at least once: a stride above the crop
    would leave the pixels between two windows with no logits (0 / 0 = NaN, argmax class 0), so it
    is refused."""
    if not 0 < stride <= crop:
        raise ValueError(f"sliding window: stride {stride} must be in 1..{crop} (the crop size), or pixels "
                         f"between windows get no prediction")
    B, _, H, W = x.shape
    rows = max(H - crop + stride - 1, 0) // stride + 1
    cols = max(W - crop + stride - 1, 0) // stride + 1
    logits = x.new_zeros(B, num_classes, H, W)
    count = x.new_zeros(1, 1, H, W)
    for r in range(rows):
        for c in range(cols):
            y0, x0 = max(min(r * stride, H - crop), 0), max(min(c * stride, W - crop), 0)
            y1, x1 = min(y0 + crop, H), min(x0 + crop, W)
            out = model(pad_to(x[:, :, y0:y1, x0:x1], crop, crop))
            logits[:, :, y0:y1, x0:x1] += out[:, :, :y1 - y0, :x1 - x0]
            count[:, :, y0:y1, x0:x1] += 1
    if not count.all():  # the windows above cover every pixel; a change that breaks it must not score NaNs
        raise RuntimeError(f"infer_slide: windows of {crop} px every {stride} px left pixels of a {H}x{W} "
                           f"image uncovered")
    return logits / count


def confusion_matrix(pred, label, num_classes):
    """(classes, classes) counts, rows = true class, columns = prediction; 255 pixels left out."""
    keep = label != data.IGNORE_INDEX
    idx = label[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(conf):
    """aAcc (pixel accuracy), per-class IoU and Acc, mIoU / mAcc over the classes that occur
    (in the labels or the predictions; mmseg's nan-mean)."""
    conf = conf.double()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    return {"aAcc": 100 * (tp.sum() / conf.sum()).item(), "mIoU": 100 * iou.nanmean().item(),
            "mAcc": 100 * acc.nanmean().item(), "IoU": (100 * iou).tolist(), "Acc": (100 * acc).tolist()}


@torch.no_grad()
def evaluate(model, loader, args, device, overlay_dir=None):
    """Confusion matrix over the whole validation set (each rank its exact shard, summed), the
    metrics, and PNG overlays of the first few images of rank 0's shard."""
    was_training = model.training
    model.eval()
    conf = torch.zeros(args.nb_classes, args.nb_classes, dtype=torch.int64, device=device)
    seen, skipped = 0, 0
    for groups, unreadable in loader:  # groups: images of one size (sizes differ in ADE20K)
        skipped += unreadable
        for x, y in groups:
            x, y = x.to(device), y.to(device)
            with training.autocast(device, args.amp):
                if args.mode == "slide":
                    logits = infer_slide(model, x, args.crop_size, args.stride, args.nb_classes)
                else:
                    logits = infer_whole(model, x)
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=False)
            pred = logits.argmax(1)
            conf += confusion_matrix(pred.flatten(), y.flatten(), args.nb_classes)
            for j in range(len(x)) if overlay_dir is not None else ():
                if seen + j < args.overlays:
                    save_overlay(x[j], y[j], pred[j], os.path.join(overlay_dir, f"val-{seen + j:02d}.png"))
            seen += len(x)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(conf)
    model.train(was_training)
    metrics = segmentation_metrics(conf.cpu())
    metrics["n_unreadable"] = int(training.all_reduce_sum([skipped], device)[0])
    return metrics


def palette(n):
    rng = np.random.default_rng(3)
    return rng.integers(40, 256, size=(max(n, 1), 3)).astype(np.uint8)


def save_overlay(x, label, pred, path, min_size=96):
    """image | ground truth over the image | prediction over the image (ignore pixels left bare), each
    panel at the label's size, scaled up by a whole factor (nearest) to at least `min_size` px."""
    H, W = label.shape
    img = data.denormalize(x.float().cpu())[None]
    img = F.interpolate(img, size=(H, W), mode="bilinear", align_corners=False)[0]
    img = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    colours = palette(256)  # one fixed colour per class index
    panels = [img]
    for m in (label.cpu().numpy(), pred.cpu().numpy()):
        over = img.copy()
        keep = m != data.IGNORE_INDEX
        over[keep] = (0.4 * img[keep] + 0.6 * colours[m[keep]]).astype(np.uint8)
        panels.append(over)
    k = max(1, -(-min_size // min(H, W)))
    panels = [p.repeat(k, 0).repeat(k, 1) for p in panels]
    gap = np.full((H * k, 2, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)).save(path)


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def eval_only_args(args):
    """--eval-only evaluates a trained run: OUTPUT_DIR/checkpoint-latest.pth (or --resume). Flags left
    unset take the run's values, so `--eval-only --output-dir DIR` and the training command with
    --eval-only added both work; a network of another shape is refused on resume."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-latest.pth")
    if not os.path.isfile(path):
        raise ValueError(f"--eval-only evaluates a trained segmentation model, and there is none at {path}: "
                         f"train first (the same command without --eval-only), or point --output-dir or "
                         f"--resume at a run's checkpoint-latest.pth")
    ckpt = training.load_checkpoint(path, "--eval-only checkpoint")
    if runs.checkpoint_stage(ckpt) != "segment.py":
        raise ValueError(f"--eval-only: {path} is not a segment.py checkpoint (it was written by "
                         f"{runs.checkpoint_stage(ckpt)})")
    for k, v in ckpt["args"].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def resolve_args(args):
    if args.eval_only:
        eval_only_args(args)
    if args.init is None:
        raise ValueError("--init is required: a pre-training checkpoint, backbone.pth, a timm/torchvision "
                         "state dict, or 'scratch' for the random-init baseline")
    if args.init != "scratch" and not args.eval_only and not os.path.exists(args.init):
        raise FileNotFoundError(f"--init {args.init!r} does not exist")
    if args.recipe is None:
        args.recipe = "builtin" if args.data is None else "imagenet"
    recipe = dict(RECIPES[args.recipe])
    if args.init != "scratch":  # the checkpoint decides the network
        for k in ("arch", "patch_size"):
            recipe.pop(k)
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.data is not None and args.nb_classes is None:
        raise ValueError("--nb-classes is required with --data (150 for ADE20K)")
    if args.data is None:
        if args.nb_classes not in (None, len(data.SyntheticShapes.CLASSES) + 1):
            raise ValueError(f"--nb-classes {args.nb_classes}: the built-in masks have "
                             f"{len(data.SyntheticShapes.CLASSES) + 1} classes")
        args.nb_classes = len(data.SyntheticShapes.CLASSES) + 1
    if args.batch_size < 2:  # the pyramid pooling's 1x1 branch: BatchNorm over one value per channel
        raise ValueError(f"--batch-size {args.batch_size}: the UperHead's BatchNorm needs at least 2 images "
                         f"per process (BEiT's ADE20K setting: 2 per GPU x 8 GPUs)")
    if args.nb_classes > 255:
        raise ValueError(f"--nb-classes {args.nb_classes}: at most 255 (label 255 means ignore)")
    if args.mode == "slide" and args.stride > args.crop_size:  # gaps between windows: no logits, class 0
        raise ValueError(f"--stride {args.stride} is larger than --crop-size {args.crop_size}: sliding-window "
                         f"inference would leave the pixels between two windows without a prediction; use "
                         f"--stride {args.crop_size} or less (BEiT: 341 for a 512 crop, two thirds)")
    return args


def build_data(args):
    train_tf = data.SegTrainTransform(args.crop_size, tuple(args.scale), tuple(args.ratio_range),
                                      args.cat_max_ratio)
    eval_tf = data.SegEvalTransform(tuple(args.scale))
    if args.data is None:
        train = data.SyntheticShapes("train", transform=train_tf, seed=args.seed, segmentation=True)
        val = data.SyntheticShapes("val", transform=eval_tf, seed=args.seed, segmentation=True)
        return train, val
    kw = dict(seed=args.seed, reduce_zero_label=args.reduce_zero_label, num_classes=args.nb_classes)
    train, val = data.ADE20K(args.data, "training", train_tf, **kw), data.ADE20K(args.data, "validation", eval_tf, **kw)
    # before any training: every image and label header of both sets (an RGB or wrongly sized training
    # label would stop the run at the iteration that draws it, with nothing saved), then every
    # validation label in full (values too: seconds), not after the last iteration
    if not args.eval_only:  # an evaluation reads no training image
        data.check_readable(train, f"--data {args.data} training set")
    data.check_readable(val, f"--data {args.data} validation set")
    if val.check_labels() == 0:
        raise ValueError(f"--data {args.data}: every pixel of every validation label is ignored (0"
                         f"{' with reduce_zero_label' if args.reduce_zero_label else ' or 255'}): nothing to "
                         f"evaluate; are the labels 0..K-1 already (--no-reduce-zero-label)?")
    return train, val


def build_model(args):
    """Backbone from --init (enhancer.load_backbone: any checkpoint kind), built at the crop size with
    its position embeddings interpolated to it (BEiT), + pyramid + heads."""
    torch.manual_seed(args.seed)  # a scratch backbone's init
    check_crop_size(args)
    if args.eval_only:  # every weight comes from the trained run's checkpoint, not from --init
        backbone = enh.build_backbone(args.arch, img_size=args.crop_size, patch_size=args.patch_size,
                                      drop_path_rate=args.drop_path, init_values=args.init_values)
    else:  # the checkpoint decides the network: its values go into args, and so into checkpoints
        backbone, net = enh.load_backbone(args.init, args.arch, args.crop_size, args.patch_size, args.drop_path)
        args.arch, args.patch_size, args.init_values = net["arch"], net["patch_size"], net["init_values"]
    check_fits(backbone, args)
    torch.manual_seed(args.seed)
    return Segmenter(backbone, args.nb_classes, args.channels, args.aux_channels, args.layers)


def check_crop_size(args):
    """--crop-size must be a whole number of a ViT's patches, or the backbone refuses it naming no flag.
    The patch size is --init's (its weights are read once more here: seconds, once) or, from scratch
    and on --eval-only, --patch-size. A ResNet takes any crop."""
    if args.eval_only or args.init == "scratch":
        patch = args.patch_size if args.arch.startswith("vit") else None
    else:
        _, name, extra = enh.backbone_shape(enh.read_backbone(args.init)[0])
        patch = extra.get("patch_size") if name is not None and name.startswith("vit") else None
    if patch and args.crop_size % patch:
        below = args.crop_size // patch * patch
        raise ValueError(f"--crop-size {args.crop_size} is not a multiple of the backbone's patch size {patch}: "
                         f"use a multiple of {patch}, e.g. {below or patch} or {below + patch}")


def check_fits(backbone, args):
    """Before any work: --layers within the ViT's blocks, and one attention map of a training batch
    within this machine's memory (a 512 px crop on a patch-4 backbone is 16,384 tokens a crop; its
    attention maps alone take tens of GB, and the run would end in the out-of-memory killer)."""
    if not isinstance(backbone, enh.VisionTransformer):
        return
    depth = len(backbone.blocks)
    if args.layers and not all(1 <= k <= depth for k in args.layers):
        raise ValueError(f"--layers {' '.join(map(str, args.layers))}: the backbone has {depth} blocks "
                         f"(taps are 1-based, 1..{depth})")
    tokens = (args.crop_size // args.patch_size) ** 2
    attention = args.batch_size * backbone.blocks[0].attn.num_heads * tokens ** 2 * 4  # fp32 bytes
    memory = (torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
              if torch.cuda.is_available() and args.device != "cpu"
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if attention > memory / 2:
        raise ValueError(f"--crop-size {args.crop_size} on a patch-{args.patch_size} backbone is {tokens} tokens "
                         f"a crop: one attention map of a batch of {args.batch_size} takes {attention / 2**30:.0f} "
                         f"GiB, more than half of this machine's {memory / 2**30:.0f} GiB. Use a smaller "
                         f"--crop-size (and --scale, --stride) for this backbone, e.g. --recipe builtin")


def main(args):
    # ---------------------------------------------------------------- setup: checks, model, data, resume
    args = resolve_args(args)
    rank, world_size, device = training.init_distributed(args.device, args.dist_backend)
    runs.prepare_output_dir(args.output_dir)
    runs.check_output_owner(args, "segment.py")  # another stage's folder: refused before any work
    model = build_model(args).to(device)
    if rank == 0:  # after build_model: the arch is --init's
        print(f"segment.py: recipe {args.recipe}, {args.arch} from {args.init}, {args.nb_classes} classes")
    training.seed_everything(args.seed, rank)
    train_set, loader, sampler, val_loader, steps_per_epoch = build_loaders(args, rank, world_size)
    overlays = overlay_folder(args, rank)
    optimizer, scaler, step, skips = setup_optimizer(model, args, rank, world_size, device)
    if args.eval_only:
        return evaluate_trained(model, val_loader, overlays, step, train_set, args, rank, device)
    model, ddp_model = distribute(model, world_size, device)
    runs.record_args(args, rank, "segment.py")  # the flags, once every check has passed
    log = training.JsonLog(os.path.join(args.output_dir, "log.jsonl"), rank == 0, resumed_at=step)

    # ---------------------------------------------------------------- training loop
    model.train()
    bar = tqdm(total=args.iters, initial=step, disable=rank != 0, desc="segment", dynamic_ncols=True)
    t0, seen, metrics = time.time(), 0, None
    while step < args.iters:
        # resume mid-epoch: the sampler replays the epoch's order from where the checkpoint left off
        epoch, steps_left, start = training.resume_point(step, steps_per_epoch, args.iters, args.batch_size)
        sampler.set_epoch(epoch, start=start)
        batches = iter(loader)
        for _ in range(steps_left):
            lr = training.set_lr(optimizer, training.poly_lr(step, args.iters, args.warmup_iters, args.lr))
            x, y = (t.to(device, non_blocking=True) for t in next(batches))
            loss, main_loss, status = train_step(ddp_model, model, x, y, optimizer, scaler, args, device)
            step += 1
            seen += args.batch_size * world_size
            bar.update(1)
            skips(status, step)  # stops the run past --max-skips
            if status != "skipped" and training.due(step, args.log_every, args.iters):
                log.write(step=step, lr=lr, loss=loss, loss_main=main_loss, img_per_s=seen / (time.time() - t0),
                          peak_mem_mb=training.peak_memory_mb(device), **skips.state())
                bar.set_postfix(loss=f"{loss:.3f}")
            evaluate_now = training.due(step, args.eval_every, args.iters)
            stop = runs.stop_requested(device)  # SIGINT / SIGTERM on any rank: save now, then exit
            if stop or evaluate_now or step % args.save_every == 0:
                # before evaluating: a bad validation image costs no training
                save_training_state(model, optimizer, scaler, skips, step, args, rank, device)
            if stop:
                runs.STOP.exit(step, os.path.join(args.output_dir, "checkpoint-latest.pth"), rank)
            if evaluate_now:
                metrics = evaluate(model, val_loader, args, device, overlays)
                log.write(step=step, **{k: v for k, v in metrics.items() if k in ("aAcc", "mIoU", "mAcc")})
    bar.close()

    # ---------------------------------------------------------------- finish: metrics.json, the last line
    return finish(model, metrics, val_loader, overlays, step, t0, train_set, args, rank, device)


def build_loaders(args, rank, world_size):
    """The training set and its resumable loader, the validation loader, and the iterations in one
    epoch (a training set smaller than one iteration stops the run here)."""
    train_set, val_set = build_data(args)
    loader, sampler = data.build_loader(train_set, args.batch_size, args.num_workers, rank, world_size,
                                        seed=args.seed)
    val_loader = data.build_eval_loader(val_set, args.eval_batch_size, args.num_workers, rank, world_size)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one iteration "
                         f"(--batch-size {args.batch_size} x {world_size} processes)")
    return train_set, loader, sampler, val_loader, steps_per_epoch


def overlay_folder(args, rank):
    """OUTPUT_DIR/overlays, made on every rank; where evaluate writes its PNGs: rank 0's path, None on
    the other ranks (they write none)."""
    overlay_dir = os.path.join(args.output_dir, "overlays")
    os.makedirs(overlay_dir, exist_ok=True)
    return overlay_dir if rank == 0 else None


def setup_optimizer(model, args, rank, world_size, device):
    """(AdamW over layer-decayed groups, GradScaler, the step to start from, training.SkipCount),
    restored from a checkpoint where the run resumes one (--eval-only: the trained run's)."""
    backbone = model.neck.backbone
    groups = training.param_groups(model, args.weight_decay,
                                   {f"neck.backbone.{n}" for n in backbone.no_weight_decay()},
                                   args.layer_decay, training.num_backbone_layers(backbone))
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, skips = resume(args, model, optimizer, scaler, rank, world_size, device)
    return optimizer, scaler, step, skips


def evaluate_trained(model, val_loader, overlays, step, train_set, args, rank, device):
    """--eval-only: the trained run's model on the validation set, reported as a run's end is."""
    metrics = evaluate(model, val_loader, args, device, overlays)
    return report(metrics, step, args, rank, train_set, None)


def distribute(model, world_size, device):
    """(model, what the loop calls it through): DDP over several processes (SyncBatchNorm on GPUs), the
    model itself in one."""
    ddp_model = model
    if world_size > 1:
        if device.type == "cuda":  # BatchNorm statistics over the global batch (mmseg's SyncBN)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN layers in place
        # (torch's SyncBatchNorm runs on GPUs only: CPU processes keep per-process statistics)
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp_model


def save_training_state(model, optimizer, scaler, skips, step, args, rank, device):
    """OUTPUT_DIR/checkpoint-latest.pth: everything a bit-exact continuation needs. A collective (the
    RNG states of every rank): every rank calls it; rank 0 writes."""
    rng = training.gather_rng_states(device)
    if rank == 0:
        training.save_checkpoint({"stage": "segment.py", "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "step": step, **skips.state(),
                                  "args": vars(args), "rng": rng},
                                 os.path.join(args.output_dir, "checkpoint-latest.pth"), keep_previous=True)


def finish(model, metrics, val_loader, overlays, step, t0, train_set, args, rank, device):
    """The result of the last evaluation: the per-class table, metrics.json and the last line. A run
    that evaluated nothing now (a finished run, run again, or one stopped in its last evaluation)
    reports its saved result, or evaluates now."""
    minutes = (time.time() - t0) / 60
    if metrics is None:
        result = finished_run_result(step, args, rank)
        if result is not None:
            training.finish_distributed()
            return result
        metrics, minutes = evaluate(model, val_loader, args, device, overlays), None
    result = report(metrics, step, args, rank, train_set, minutes)
    training.finish_distributed()
    return result


def finished_run_result(step, args, rank):
    """A finished run, run again: the result in its metrics.json (rank 0 prints it), or None where
    the log holds no evaluation, so the run evaluates now."""
    saved = os.path.join(args.output_dir, "metrics.json")
    if not (os.path.isfile(saved) and training.last_log_record(os.path.join(args.output_dir, "log.jsonl"),
                                                               "mIoU") is not None):
        return None
    with open(saved) as f:
        result = {k: v for k, v in json.load(f).items() if k not in ("classes", "IoU", "Acc")}
    if rank == 0:
        print(f"segment.py: {args.output_dir} holds a finished run ({step} of {args.iters} iterations); "
              f"its result:\n{json.dumps(result)}")
    return result


def report(metrics, step, args, rank, train_set, minutes):
    """Per-class IoU table and one summary JSON line (rank 0 prints), also in metrics.json."""
    classes = getattr(train_set, "classes", None) or [str(c) for c in range(args.nb_classes)]
    result = {"init": args.init, "seed": args.seed, "iters": step, "mIoU": metrics["mIoU"],
              "aAcc": metrics["aAcc"], "mAcc": metrics["mAcc"], "minutes": minutes}
    if rank == 0:
        print(f"{'class':<16} {'IoU':>6} {'Acc':>6}")
        for name, iou, acc in zip(classes, metrics["IoU"], metrics["Acc"]):
            print(f"{name:<16} {iou:6.2f} {acc:6.2f}")
        print(json.dumps(result))
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(dict(result, classes=classes, IoU=metrics["IoU"], Acc=metrics["Acc"]), f)
    return result


def train_step(ddp_model, model, x, y, optimizer, scaler, args, device):
    optimizer.zero_grad(set_to_none=True)
    with training.autocast(device, args.amp):
        out, aux = ddp_model(x)
    loss, main = segmentation_loss(out, aux, y, args.aux_weight)
    scaler.scale(loss).backward()
    _, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(loss.detach()),
                                        args.clip_grad, device)
    return loss.item(), main.item(), status


def resume(args, model, optimizer, scaler, rank, world_size, device):
    """Returns (step, training.SkipCount)."""
    free = get_args_parser().resume_free
    path, ckpt = runs.find_resume_checkpoint(args, "segment.py", free, ("metrics.json", "log.jsonl"))
    skips = training.SkipCount("segment.py", args.max_skips, args.output_dir, ckpt)
    if ckpt is None:
        return 0, skips
    saved = ckpt.get("args", {})
    runs.check_same_network(saved, args, ("arch", "nb_classes", "crop_size", "patch_size", "channels",
                                          "aux_channels"), path)
    # evaluation trains nothing: only the network must match (above); data, precision and
    # inference settings are the evaluation's own
    changed = () if args.eval_only else runs.check_resume_flags(
        saved, vars(args), free, path, args.allow_flag_changes)
    training.restore_training_state(ckpt, model, optimizer, scaler, rank, world_size, device, path, changed)
    return ckpt["step"], skips


if __name__ == "__main__":
    runs.run_script(main, get_args_parser())
