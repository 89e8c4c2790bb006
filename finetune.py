"""Classification after CIM: end-to-end fine-tuning, linear probe and k-NN of an enhancer.

After pre-training the generator is thrown away and the enhancer's backbone is trained for the
downstream task (CIM Sec. 4.1: ImageNet-1K top-1 after fine-tuning, 300 pre-training epochs: ViT-B/16
83.3; ResNet-50 RevDet 78.8, and 80.6 with a longer fine-tuning schedule, the arXiv abstract's figure;
docs/finetune.md says what could not be checked).
This file reads pre-training CHECKPOINTS, never pretrain.py's code: `--init` goes through
enhancer.load_backbone and takes

    out/pretrain/checkpoint-latest.pth   a pre-training checkpoint (the enhancer's backbone is taken out)
    out/pretrain/backbone.pth            the exported backbone (what pretrain.py writes at the end)
    a timm ViT / torchvision ResNet state dict (plain, or under "model" / "state_dict"; heads dropped)
    scratch                              random init (the baseline every number needs next to it)

Three modes (--mode):
    finetune  every weight trains. ViT: the BEiT/MAE recipe (layer-wise lr decay, mean pooling +
              fc_norm, mixup/cutmix, label smoothing, RandAugment, random erasing, drop path, AdamW,
              optional EMA); ViT-L as MAE-L. ResNet: "ResNet strikes back" A2 (LAMB, BCE on mixed
              targets, repeated augmentation).
    linear    frozen backbone, BatchNorm without affine + one linear layer on the cls token, LARS
              (MAE's linear probe).
    knn       no training: weighted k-NN on pooled features (DINO's protocol), next to the k-NN of the
              raw pixels; --knn-blocks adds one k-NN per ViT block / ResNet stage.

    python finetune.py --init out/pretrain/backbone.pth                    # built-in data, CPU minutes
    python finetune.py --init scratch --arch vit_mini                      # the random-init baseline
    python finetune.py --init out/pretrain/backbone.pth --mode knn
    torchrun --nproc_per_node 8 finetune.py --data /path/imagenet --init cim_vit_b.pth --amp bf16 \\
        --batch-size 128 --output-dir out/ft_vit_b                        # BEiT-B recipe, 1024 images/step

--eval-split select trains on train/ less a fixed 10% of each class and evaluates on that 10%
(data.SELECT_FRACTION): for choosing lr, epochs or layer decay without looking at val/.

Evaluation: resize + center crop (--crop-pct), top-1 / top-5, each validation image counted once
under DDP (data.EvalSampler). Per-epoch JSON log, checkpoint-latest.pth (resume: rerun the command),
checkpoint-best.pth (the best epoch's weights), and at the end classifier.pth under timm /
torchvision names.
"""
import copy
import itertools
import json
import math
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import enhancer as enh
import runs
import training

# ----------------------------------------------------------------------------------------------------
# Recipes: the values of flags left unset, per recipe and per kind of run (ViT fine-tuning, ResNet
# fine-tuning, linear probe). Each is a published recipe or another one plus its differences, so a
# new flag is one line in BEIT_B. "imagenet" is the paper's scale, "builtin" runs on a CPU in minutes.
# ----------------------------------------------------------------------------------------------------

# BEiT-B fine-tuning (CIM follows BEiT; BEiT's run_class_finetuning.py and its README command): batch
# 1024, lr 4e-3 (blr 1e-3), 100 epochs, 20 warm-up from 0, layer decay 0.65, drop path 0.1, mixup 0.8 /
# cutmix 1.0, label smoothing 0.1, RandAugment m9 mstd 0.5 (bicubic), random erasing 0.25, mean-pooled
# patch tokens + fc_norm, head init x 0.001, eval resize 256 -> crop 224
BEIT_B = dict(arch="vit_b", img_size=224, patch_size=16, epochs=100, batch_size=128, blr=1e-3, min_lr=1e-6,
              warmup_epochs=20, warmup_lr=0.0, weight_decay=0.05, layer_decay=0.65, drop_path=0.1,
              smoothing=0.1, mixup=0.8, cutmix=1.0, aa="m9-mstd0.5", reprob=0.25, color_jitter=0.4,
              crop_min=0.08, crop_pct=0.875, opt="adamw", loss="ce", bce_target_thresh=None,
              head_init_scale=0.001, clip_grad=None, pool="avg", aug_repeats=1, resnet_stem="imagenet",
              num_workers=10)
# ViT-S/16: the CIM paper's appendix gives its own values; they could not be read for this project,
# so ViT-S takes BEiT-B's until they are checked
VIT_S = dict(BEIT_B, arch="vit_s")
# ViT-L/16: MAE's FINETUNE.md (and BEiT-L): 50 epochs, 5 warm-up, layer decay 0.75, drop path 0.2
MAE_L = dict(BEIT_B, arch="vit_l", epochs=50, warmup_epochs=5, layer_decay=0.75, drop_path=0.2)
# "ResNet strikes back" A2 (its paper's table, timm's published command): LAMB lr 5e-3 at batch 2048 with
# timm's global grad-norm clip 1.0, wd 0.02, 300 epochs, 5 warm-up from 1e-4, BCE with targets above
# 0.2 set to 1, mixup 0.1 / cutmix 1.0, RandAugment m7 mstd 0.5, repeated augmentation x3, drop path
# 0.05, test crop 0.95
RSB_A2 = dict(BEIT_B, arch="resnet50", patch_size=None, epochs=300, batch_size=256, blr=5e-3 * 256 / 2048,
              warmup_epochs=5, warmup_lr=1e-4, weight_decay=0.02, layer_decay=1.0, drop_path=0.05,
              smoothing=0.0, mixup=0.1, aa="m7-mstd0.5", reprob=0.0, color_jitter=0.0, crop_pct=0.95,
              opt="lamb", loss="bce", bce_target_thresh=0.2, head_init_scale=1.0, clip_grad=1.0,
              aug_repeats=3)
# MAE's linear probe (main_linprobe.py): LARS (trust coefficient 0.001) at batch 16384 (2048 x 8 GPUs),
# blr 0.1, 90 epochs, 10 warm-up, no weight decay, crop + flip only, BatchNorm without affine + linear
# head on the cls token
MAE_LINEAR = dict(BEIT_B, epochs=90, batch_size=2048, blr=0.1, min_lr=0.0, warmup_epochs=10, weight_decay=0.0,
                  layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, aa="none",
                  reprob=0.0, color_jitter=0.0, opt="lars", pool="cls", head_init_scale=1.0)
# 32 px built-in data, CPU minutes. Mixup, cutmix, RandAugment and erasing kept both inits at chance
# over so short a run (docs/finetune.md), so they are off; the built-in linear probe keeps SGD on the
# mean-pooled tokens it was measured with
CPU = dict(img_size=32, warmup_epochs=1, crop_min=0.35, crop_pct=1.0, mixup=0.0, cutmix=0.0, aa="none",
           reprob=0.0, num_workers=1)
BUILTIN = {"vit": dict(BEIT_B, **CPU, arch="vit_mini", patch_size=4, epochs=2, batch_size=64, blr=2e-3,
                       layer_decay=0.75),
           "resnet": dict(BEIT_B, **CPU, arch="resnet18", patch_size=None, epochs=2, batch_size=64, blr=2e-3,
                          weight_decay=0.02, layer_decay=1.0, drop_path=0.05, smoothing=0.0, opt="lamb",
                          loss="bce", head_init_scale=1.0),
           "linear": dict(MAE_LINEAR, **CPU, arch="vit_mini", patch_size=4, epochs=3, batch_size=256, opt="sgd",
                          pool="avg")}
# A ViT fine-tuned from random init (--init scratch, --mode finetune): layer decay is a setting for a
# pre-trained network, whose lower layers already hold general features and should move little (BEiT's
# fine-tuning recipe). Kept for a random network, its patch embedding would train at decay^(L+1) of the
# lr (0.75^7 for vit_mini's 6 blocks): the baseline would be held back by a setting, not by the lack of
# pre-training. So every layer trains at the lr.
BUILTIN["vit_scratch"] = dict(BUILTIN["vit"], layer_decay=1.0)
RECIPES = {
    "builtin": BUILTIN,
    # a folder of small photos (a few thousand, 32-64 px): the built-in recipe, long enough for scratch to
    # stop improving (10 epochs: docs/study.md), and the ResNet's small-image stem
    # (a ViT from scratch gets 30 epochs: with no pre-trained features to start from it is given a
    # longer schedule, so that the baseline is not cut short). A ResNet's LAMB lr was chosen on the
    # selection split (docs/study.md): 5x the built-in one pre-trained, and 10x from scratch below
    "photos": {"vit": dict(BUILTIN["vit"], epochs=10),
               "resnet": dict(BUILTIN["resnet"], epochs=10, resnet_stem="small", blr=1e-2),
               "linear": dict(BUILTIN["linear"], epochs=10),
               "vit_scratch": dict(BUILTIN["vit_scratch"], epochs=30)},
    # (no scratch kind: a ViT from scratch takes the recipe of its size)
    "imagenet": {"vit": BEIT_B, "vit_s": VIT_S, "vit_b": BEIT_B, "vit_l": MAE_L, "resnet": RSB_A2,
                 "linear": MAE_LINEAR},
}
# a ResNet from scratch on the photos: its own lr, chosen as CIM's was but from five values (its
# best of 1e-3 ... 2e-2, where CIM's recipe compared 2e-3, 1e-2 and 2e-2)
RECIPES["photos"]["resnet_scratch"] = dict(RECIPES["photos"]["resnet"], blr=2e-2)
MODES = ("finetune", "linear", "knn")

def get_args_parser():
    """Every flag once: its type and range check (runs.number), whether a resume may change it
    (free), and for [recipe] flags the default of every recipe and kind, listed in --help."""
    p, a, free = runs.stage_parser("finetune.py", "fine-tuning, linear probe and k-NN of a CIM enhancer",
                                   "out/finetune", "checkpoints, log.jsonl, classifier.pth", save_every=1000,
                                   log_every=50)
    pos_int, pos_float, nonneg_int, nonneg_float = (runs.POS_INT, runs.POS_FLOAT, runs.NONNEG_INT,
                                                    runs.NONNEG_FLOAT)
    fraction, unit = runs.number(float, "in [0, 1)"), runs.number(float, "in (0, 1]")

    def r(name, help, resume_free=False, **kw):  # default from the recipe: --help shows every recipe's
        key = name[2:].replace("-", "_")
        values = "; ".join(f"{k} " + ", ".join(f"{kind} {v[key]}" for kind, v in RECIPES[k].items())
                           for k in RECIPES)
        (free if resume_free else a)(name, default=None, help=f"{help} [recipe: {values}]", **kw)

    a("--mode", default="finetune", choices=MODES,
      help="finetune: all weights; linear: frozen backbone + BN + linear head; knn: weighted k-NN")
    a("--recipe", default=None, choices=list(RECIPES),
      help="defaults of every flag marked [recipe]: builtin without --data (CPU minutes), photos with "
           f"--data of images up to {data.PHOTOS_MAX_SIDE} px, imagenet "
           "with --data (BEiT-B for ViTs, MAE-L for ViT-L, 'ResNet strikes back' A2 for ResNets, MAE's "
           "linear probe)")
    a("--init", default=None, help="pre-training checkpoint, exported backbone.pth, timm/torchvision "
      "state dict, or 'scratch' (required: say which)")
    r("--arch", f"backbone, one of {list(enh.ARCHS)}; taken from --init when it is a checkpoint",
      choices=list(enh.ARCHS))
    r("--img-size", "training input size; default: the checkpoint's pre-training size (position "
      "embeddings are interpolated when it differs)", type=pos_int)
    a("--eval-size", type=pos_int, default=None, help="test input size (default --img-size; the 'train "
      "low, test high' option of ResNet recipes: e.g. --img-size 160 --eval-size 224)")
    r("--patch-size", "ViT patch size for --init scratch (else the checkpoint's)", type=pos_int)
    r("--resnet-stem", "ResNet stem for --init scratch (a checkpoint's is read from its conv1): imagenet or "
      "small (3x3 stride-1 conv, no max-pool; pretrain.py --resnet-stem)", choices=["imagenet", "small"])
    a("--nb-classes", type=pos_int, default=None, help="classes; default and check: the data's class folders")
    r("--pool", "ViT feature, in every mode: avg = mean of the patch tokens (fine-tuning: + a LayerNorm "
      "fc_norm, BEiT/MAE), cls = the final-normed cls token (MAE's linear probe)", choices=["avg", "cls"])
    r("--drop-path", "stochastic depth rate (linear over blocks)", type=fraction)
    r("--head-init-scale", "scale of the head's initial weights (BEiT: 0.001)", type=nonneg_float)
    # data and augmentation
    a("--data", default=None, help="ImageNet-layout root (DIR/train/<class>/*, DIR/val/<class>/*); omit "
      "to use the built-in procedural dataset")
    a("--eval-split", default="val", choices=["val", "select"],
      help="what every mode evaluates on: val (DIR/val/, for numbers you report) or select (a fixed "
           f"{100 * data.SELECT_FRACTION:.0f}%% of each class of train/, left out of training: for choosing lr, "
           "epochs or layer decay without looking at val/; no val/ needed)")
    r("--crop-min", "random-resized-crop min scale", type=unit)
    r("--crop-pct", "eval: resize the shorter side to size / crop_pct, center-crop size (0.875: 256 "
      "-> 224)", type=unit)
    r("--aa", "RandAugment 'mM-mstdS' (magnitude M, its per-op std S), or none", type=str)
    r("--color-jitter", "colour jitter strength, used only with --aa none (as timm)", type=nonneg_float)
    r("--reprob", "random erasing probability", type=fraction)
    r("--mixup", "mixup Beta(alpha, alpha) (0 = off)", type=nonneg_float)
    r("--cutmix", "cutmix Beta(alpha, alpha) (0 = off)", type=nonneg_float)
    a("--mixup-switch-prob", type=unit, default=0.5, help="with both on: chance a batch uses cutmix")
    a("--mixup-prob", type=unit, default=1.0, help="chance a batch is mixed at all")
    r("--smoothing", "label smoothing", type=fraction)
    r("--loss", "ce: soft-target cross-entropy; bce: binary cross-entropy per class (RSB)",
      choices=["ce", "bce"])
    r("--bce-target-thresh", "bce: mixed targets above this become 1", type=fraction)
    r("--aug-repeats", "repeated augmentation: each image this many times an epoch, its copies on different "
      "processes (timm's RepeatAugSampler)", type=pos_int)
    # optimisation
    r("--opt", "adamw, lamb or lars (both written out below), or sgd (momentum 0.9)",
      choices=["adamw", "lamb", "lars", "sgd"])
    r("--epochs", "training epochs", type=pos_int)
    a("--max-steps", type=pos_int, default=None, help="stop after this many steps (tests); schedules span them")
    r("--batch-size", "images per process per step", type=pos_int)
    a("--lr", type=pos_float, default=None, help="absolute peak lr; default blr * total_batch / 256")
    r("--blr", "base lr per 256 images", type=pos_float)
    r("--min-lr", "final lr of the cosine schedule", type=nonneg_float)
    r("--warmup-epochs", "linear warm-up length", type=nonneg_float)
    r("--warmup-lr", "lr the warm-up starts from", type=nonneg_float)
    r("--weight-decay", "weight decay (none on 1-D params, biases, position embedding, cls token)",
      type=nonneg_float)
    r("--layer-decay", "layer-wise lr decay: block i of L trains at lr * decay^(L+1-i), patch "
      "embedding at decay^(L+1), head at 1 (1.0 = off)", type=unit)
    r("--clip-grad", "max global grad norm (None = off)", type=nonneg_float)
    a("--model-ema", action="store_true", help="keep an exponential moving average of the weights; "
      "evaluated next to the model every epoch")
    a("--model-ema-decay", type=runs.number(float, "in (0, 1)"), default=0.9999, help="EMA decay per step")
    a("--amp", default="none", choices=["bf16", "fp16", "none"], help="autocast dtype")
    free("--max-skips", type=nonneg_int, default=20, help="stop after this many skipped (non-finite) steps; "
         "fp16 overflows are counted apart")
    # k-NN
    a("--knn-k", type=pos_int, default=20, help="k-NN neighbours (DINO: 20)")
    a("--knn-t", type=pos_float, default=0.07, help="k-NN temperature of the exp(sim / T) vote weights")
    a("--knn-blocks", action="store_true", help="--mode knn: also the k-NN of every ViT block's output "
      "(a LayerNorm without affine parameters, then the mean of the patch tokens) or ResNet stage's "
      "(global average), to see where in the network the features are best; holds one feature bank "
      "per block in memory")
    a("--seed", type=runs.SEED, default=0, help="seed for data order, augmentation, mixing, head init")
    # more flags free on resume (runs.stage_parser adds output, logging, processes)
    r("--num-workers", "DataLoader workers per process", type=nonneg_int, resume_free=True)
    free("--eval-batch-size", type=pos_int, default=256, help="images per process in evaluation")
    return p


# ----------------------------------------------------------------------------------------------------
# The classifier: backbone + pooling + head (timm / torchvision names)
# ----------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """Backbone -> pooled feature -> [fc_norm] -> linear head.

    ViT, pool 'avg' (BEiT/MAE fine-tuning): the backbone's final norm becomes Identity, patch tokens
        are averaged and normalised by a fresh LayerNorm `fc_norm` (timm's global_pool='avg' names).
    ViT, pool 'cls': the final-normed cls token.   ResNet: global average of the last map.
    linear=True (MAE's linear probe): the backbone is frozen and kept in eval mode; its pooled feature
        (`pool`: MAE's probe reads the cls token) goes through BatchNorm without affine parameters,
        then the head.
    """

    def __init__(self, backbone, num_classes, pool="avg", head_init_scale=1.0, linear=False):
        super().__init__()
        self.backbone, self.pool, self.linear = backbone, pool, linear
        self.is_vit = isinstance(backbone, enh.VisionTransformer)
        D = backbone.num_features
        if linear:
            backbone.requires_grad_(False)
            self.fc_norm = nn.BatchNorm1d(D, affine=False, eps=1e-6)
        elif self.is_vit and pool == "avg":
            backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02 if not linear else 0.01)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def train(self, mode=True):
        super().train(mode)
        if self.linear:
            self.backbone.eval()  # frozen: no BatchNorm statistics updates, no drop path
        return self

    def features(self, x):
        if self.linear:
            with torch.no_grad():
                return training.pooled_features(self.backbone, x, self.pool)
        f = self.backbone(x)
        if not self.is_vit:
            return f.mean((2, 3))                  # (B, C)
        return f[:, 1:].mean(1) if self.pool == "avg" else f[:, 0]  # (B, D)

    def forward(self, x):
        return self.head(self.fc_norm(self.features(x)))  # (B, classes)

    def no_weight_decay(self):
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def export_classifier(model):
    """The fine-tuned network under the names its framework uses: timm ViT (global_pool='avg' gives
    fc_norm + head and an Identity norm) or torchvision ResNet (`fc`)."""
    sd = {}
    for k, v in model.state_dict().items():
        k = k[len("backbone."):] if k.startswith("backbone.") else k
        if not model.is_vit and k.startswith("head."):
            k = "fc." + k[len("head."):]
        sd[k] = v.detach().clone()
    return sd


# ----------------------------------------------------------------------------------------------------
# LAMB (You et al. 2020), written out as timm's: Adam moments, then a per-tensor trust ratio
# ----------------------------------------------------------------------------------------------------

class Lamb(torch.optim.Optimizer):
    """update = m_hat / (sqrt(v_hat) + eps) + wd * p;   p -= lr * (|p| / |update|) * update.

    The trust ratio |p| / |update| (1 where either norm is 0) makes each tensor's step proportional to
    its own size, which keeps large-batch training stable. Like timm, parameters without weight decay
    (norms, biases) take the plain Adam step (ratio 1)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                m_hat = m / (1 - b1 ** state["step"])
                v_hat = v / (1 - b2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                ratio = 1.0
                if group["weight_decay"] != 0:
                    update.add_(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm,
                                        torch.ones_like(w_norm))
                p.add_(update * ratio, alpha=-group["lr"])


class Lars(torch.optim.Optimizer):
    """LARS as MAE's linear probe runs it: for a tensor of 2 or more dimensions (the head's weight),
    update = (g + wd * p) * trust, trust = trust_coefficient * |p| / |g + wd * p| (1 where either norm
    is 0); 1-D tensors (biases) take the plain update g. Then SGD momentum: mu = momentum * mu + update,
    p -= lr * mu."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm, u_norm = p.norm(), update.norm()
                    trust = torch.where((p_norm > 0) & (u_norm > 0), group["trust_coefficient"] * p_norm / u_norm,
                                        torch.ones_like(p_norm))
                    update = update * trust
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(args, groups, device):
    if args.opt == "adamw":  # fused: one kernel for all parameters on CUDA
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    if args.opt == "lamb":
        return Lamb(groups, lr=args.lr)
    if args.opt == "lars":
        return Lars(groups, lr=args.lr)
    return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)


# ----------------------------------------------------------------------------------------------------
# Mixup / CutMix with label smoothing, and the losses on soft targets
# ----------------------------------------------------------------------------------------------------

def smooth_one_hot(y, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], 1 - smoothing + off)


def cutmix_box(H, W, lam, rng):
    """Box (y0, y1, x0, x1) of area about (1 - lam) H W centred at a uniform point, clipped to the
    image (CutMix, Yun et al. 2019)."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy, cx = rng.randrange(H), rng.randrange(W)
    return max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)


class Mixup:
    """One mixing per batch (timm's 'batch' mode): image i is mixed with image B-1-i.

    mixup:  x = lam x + (1 - lam) x_flipped,    lam ~ Beta(mixup, mixup)
    cutmix: a box of x_flipped pasted into x,   lam = 1 - box area / image area (after clipping)
    targets = lam * smooth(y) + (1 - lam) * smooth(y_flipped): every row sums to 1.
    With both on, a batch uses cutmix with probability `switch_prob`; with probability 1 - `prob`
    it is not mixed (targets are still smoothed). Draws come from `rng` (python random)."""

    def __init__(self, mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=1000):
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    def __call__(self, x, y, rng=random):
        lam, box = 1.0, None
        if (self.mixup > 0 or self.cutmix > 0) and rng.random() < self.prob:
            use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
            alpha = self.cutmix if use_cutmix else self.mixup
            lam = rng.betavariate(alpha, alpha)
            if use_cutmix:
                H, W = x.shape[-2:]
                box = cutmix_box(H, W, lam, rng)
                y0, y1, x0, x1 = box
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
            else:
                x = x * lam + x.flip(0) * (1 - lam)
        t = smooth_one_hot(y, self.num_classes, self.smoothing)
        return x, lam * t + (1 - lam) * t.flip(0)


def soft_target_loss(logits, target, kind="ce", bce_thresh=None):
    """ce: -sum(target * log_softmax(logits)); bce: per-class binary cross-entropy on the (optionally
    thresholded) soft targets, averaged over classes and batch as timm's BinaryCrossEntropy."""
    logits = logits.float()
    if kind == "ce":
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    if bce_thresh is not None:
        target = (target > bce_thresh).to(target.dtype)
    return F.binary_cross_entropy_with_logits(logits, target)


# ----------------------------------------------------------------------------------------------------
# EMA of the weights (optional; evaluated next to the model)
# ----------------------------------------------------------------------------------------------------

class ModelEma:
    """ema = decay * ema + (1 - decay) * model after every step, for every floating-point entry of
    the state dict, BatchNorm running statistics included (averaged like the weights, as timm's
    ModelEmaV2); integer buffers (BatchNorm's batch counter) are copied."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model):
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(self.decay).add_(m.detach(), alpha=1 - self.decay)
            else:
                e.copy_(m)


# ----------------------------------------------------------------------------------------------------
# Evaluation: exact top-1 / top-5 under DDP
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, device, amp="none"):
    """Top-1 / top-5 accuracy (%) and loss over the whole evaluation set: each rank counts its exact
    shard (data.EvalSampler), the counts are summed over ranks."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = loss_sum = n = skipped = 0
    for groups, unreadable in loader:
        skipped += unreadable
        for x, y in groups:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with training.autocast(device, amp):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            c1, c5 = training.topk_correct(logits.float(), y, (1, 5))
            correct1, correct5, n = correct1 + c1, correct5 + c5, n + len(y)
    model.train(was_training)
    correct1, correct5, loss_sum, n, skipped = training.all_reduce_sum([correct1, correct5, loss_sum, n, skipped],
                                                                       device)
    if n == 0:
        raise ValueError(f"evaluation: none of the {int(skipped)} validation images could be read")
    return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "loss": loss_sum / n, "n": int(n),
            "n_unreadable": int(skipped)}


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------

def resolve_args(args, init=None):
    """Recipe values for unset flags (per mode and backbone family); the checks that involve more than
    the flag itself (each flag's range is checked as it is parsed: runs.number). `init`:
    enhancer.read_backbone's result for --init, when the caller has it already."""
    if args.init is None:
        raise ValueError("--init is required: a pre-training checkpoint, backbone.pth, a timm/torchvision "
                         "state dict, or 'scratch' for the random-init baseline")
    if args.recipe is None:
        args.recipe = data.default_recipe(args.data)
    family = args.arch
    if family is None and args.init != "scratch":
        family = enh.backbone_shape((init or enh.read_backbone(args.init))[0])[1] or "vit"
    family = family or RECIPES[args.recipe]["vit"]["arch"]
    kind = "linear" if args.mode == "linear" else "resnet" if family.startswith("resnet") else \
        family if family in RECIPES[args.recipe] else "vit"  # a recipe per ViT size where there is one
    scratch = args.init == "scratch" and args.mode == "finetune"
    if scratch and f"{kind}_scratch" in RECIPES[args.recipe]:
        kind = f"{kind}_scratch"  # a random network's own recipe (see BUILTIN["vit_scratch"])
    if args.knn_blocks and args.mode != "knn":
        raise ValueError(f"--knn-blocks is a k-NN of every block: it needs --mode knn, not {args.mode}")
    if args.resnet_stem is not None and not family.startswith("resnet"):
        raise ValueError(f"--resnet-stem applies to ResNets; the backbone is {family}: drop the flag")
    if args.resnet_stem is not None and args.init != "scratch":  # the checkpoint's conv1 decides
        sd = (init or enh.read_backbone(args.init))[0]
        used = "small" if sd["conv1.weight"].shape[-1] == 3 else "imagenet"
        if args.resnet_stem != used:
            raise ValueError(f"--resnet-stem {args.resnet_stem}, but --init {args.init} has the {used} stem (its "
                             f"conv1): drop the flag, the checkpoint decides")
    recipe = dict(RECIPES[args.recipe][kind])
    if args.init != "scratch":  # the checkpoint decides the network and its input size
        for k in ("arch", "img_size", "patch_size"):
            recipe.pop(k)
    elif kind == "linear" and (args.arch or "").startswith("resnet"):
        recipe["patch_size"] = None
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    parse_aa(args.aa)
    return args


def parse_aa(spec):
    """'m9-mstd0.5' -> RandAugment(magnitude 9, std 0.5); 'none' -> None."""
    if spec in (None, "none"):
        return None
    try:
        parts = dict((p[:4], float(p[4:])) if p.startswith("mstd") else ("m", float(p[1:]))
                     for p in spec.split("-"))
        return data.RandAugment(magnitude=parts["m"], magnitude_std=parts.get("mstd", 0.0))
    except (ValueError, KeyError):
        raise ValueError(f"--aa {spec!r}: expected 'mM' or 'mM-mstdS' (e.g. m9-mstd0.5) or none") from None


def build_data(args, rank, world_size):
    """The training set, its resumable loader and sampler, the batch mixing (Mixup) and the evaluation
    loader, all built and checked now (classes, readable evaluation images, --nb-classes): a bad set
    stops the run before training."""
    train_tf = data.FinetuneTransform(args.img_size, scale=(args.crop_min, 1.0), rand_augment=parse_aa(args.aa),
                                      color_jitter=args.color_jitter, reprob=args.reprob)
    if args.mode == "linear":  # MAE's linear probe: crop + flip only
        train_tf = data.FinetuneTransform(args.img_size, scale=(args.crop_min, 1.0))
    eval_tf = data.EvalTransform(args.eval_size, crop_pct=args.crop_pct)
    train_split, eval_split = data.EVAL_SPLITS[args.eval_split]
    train_set = data.build_dataset(args.data, train_split, train_tf, seed=args.seed)
    if args.eval_split == "val" and args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        raise FileNotFoundError(f"--data {args.data}: no val/ split (expected "
                                f"{os.path.join(args.data, 'val', '<class>', '*')}); add one, or pass "
                                f"--eval-split select to evaluate on a part of train/")
    val_set = data.build_dataset(args.data, eval_split, eval_tf, seed=args.seed)
    data.check_same_classes(train_set, val_set, args.data)
    data.check_readable(val_set, f"--data {args.data} {eval_split} set")  # now, not after an epoch
    num_classes = len(train_set.classes)
    if num_classes < 2:
        raise ValueError(f"--data {args.data}: train/ has {num_classes} class folder; classification needs at "
                         f"least 2 (one sub-folder per class: {data.ImageFolder.LAYOUT})")
    if args.nb_classes is not None and args.nb_classes != num_classes:
        raise ValueError(f"--nb-classes {args.nb_classes}, but the data has {num_classes} classes")
    args.nb_classes = num_classes
    loader, sampler = data.build_loader(train_set, args.batch_size, args.num_workers, rank, world_size,
                                        seed=args.seed, repeats=args.aug_repeats)
    val_loader = data.build_eval_loader(val_set, args.eval_batch_size, args.num_workers, rank, world_size)
    mixup = Mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                  args.nb_classes)
    return train_set, loader, sampler, mixup, val_loader


def knn_main(args, backbone, rank, world_size, device):
    """--mode knn: no training. Its result goes to OUTPUT_DIR/knn.json, in a folder of its own: a
    training run's folder (its checkpoint or its results) is refused, never appended to."""
    saved = runs.read_run_record(args.output_dir)
    other = runs.saved_work(args.output_dir, ("checkpoint-latest.pth", "checkpoint-best.pth", "classifier.pth",
                                              "log.jsonl"))
    if other or saved and (saved["stage"], saved["args"].get("mode")) != ("finetune.py", "knn"):
        raise ValueError(f"--output-dir {args.output_dir!r} holds a training run ({', '.join(other) or 'run.json'}): "
                         f"give --mode knn a folder of its own")
    if saved:  # an earlier k-NN run here: the same command again, or a refusal
        runs.check_resume_flags(saved["args"], vars(args), get_args_parser().resume_free,
                                os.path.join(args.output_dir, "run.json"), args.allow_flag_changes)
    tf = data.EvalTransform(args.eval_size, crop_pct=args.crop_pct)
    sets = [data.build_dataset(args.data, s, tf, seed=args.seed) for s in data.EVAL_SPLITS[args.eval_split]]
    data.check_same_classes(*sets, args.data)  # labels are indices into each set's class folders
    for split, s in zip(data.EVAL_SPLITS[args.eval_split], sets):
        data.check_readable(s, f"--data {args.data} {split} set")
    loaders = [data.build_eval_loader(s, args.eval_batch_size, args.num_workers, rank, world_size)
               for s in sets]
    num_classes, backbone = len(sets[0].classes), backbone.to(device)
    knn = training.knn_accuracy(backbone, *loaders, num_classes, device, args.knn_k, args.knn_t, ks=(1, 5),
                                pool=args.pool)
    # the floor the features must beat: the same evaluation view's mean-centred pixels
    pixels = training.raw_pixel_knn(*loaders, num_classes, device, len(sets[0]), args.eval_size, args.knn_k,
                                    args.knn_t)
    result = {"mode": "knn", "init": args.init, "arch": args.arch, "knn_k": args.knn_k, "top1": knn["top1"],
              "knn_raw_pixels": pixels, "top5": knn["top5"], "feature_rank": knn["feature_rank"]}
    if args.knn_blocks:
        result.update(training.knn_per_layer(backbone, *loaders, num_classes, device, args.knn_k, args.knn_t))
    train_split, eval_split = data.EVAL_SPLITS[args.eval_split]
    result.update(n_train=len(sets[0]), n_val=len(sets[1]), train_split=train_split, eval_split=eval_split)
    if rank == 0:
        runs.record_args(args, rank, "finetune.py")
        runs.write_json(result, os.path.join(args.output_dir, "knn.json"))
        print(json.dumps(result))
    return result


def main(args):
    # ---------------------------------------------------------------- setup: network, data, model, resume
    init = read_init(args)
    args = resolve_args(args, init)
    rank, world_size, device = training.init_distributed(args.device, args.dist_backend)
    runs.prepare_output_dir(args.output_dir)
    backbone = setup_backbone(args, init)
    announce(args, rank)
    training.seed_everything(args.seed, rank)
    if args.mode == "knn":
        return knn_main(args, backbone, rank, world_size, device)
    train_set, loader, sampler, mixup, val_loader = build_data(args, rank, world_size)
    steps_per_epoch, total_steps, warmup_steps, total_batch = schedule(args, train_set, loader, world_size)
    model, ddp_model, optimizer, scaler, ema, step, state, skips = build_training(args, backbone, rank,
                                                                                 world_size, device)
    runs.record_args(args, rank, "finetune.py")  # the flags, once every check has passed
    log = training.JsonLog(os.path.join(args.output_dir, "log.jsonl"), rank == 0, resumed_at=step)
    announce_training(model, total_steps, total_batch, args, rank)

    # ---------------------------------------------------------------- training loop
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc=args.mode, dynamic_ncols=True)
    began, result = time.time(), {}
    if state["pending_eval"]:  # the run stopped while it evaluated an epoch it had trained: evaluate it now
        lr = training.cosine_lr(step - 1, total_steps, warmup_steps, args.lr, args.min_lr, args.warmup_lr)
        result = close_epoch(model, ema, optimizer, scaler, skips, state, val_loader, log,
                             (step - 1) // steps_per_epoch, step, lr, None, args, rank, device)
    while step < total_steps:
        # resume mid-epoch: the sampler replays the epoch's order from where the checkpoint left off
        epoch, steps_left, start = training.resume_point(step, steps_per_epoch, total_steps, args.batch_size)
        sampler.set_epoch(epoch, start=start)
        t0, seen = time.time(), 0
        for x, y in itertools.islice(loader, steps_left):  # its workers end with the loop, not kept to evaluate
            lr = training.set_lr(optimizer, training.cosine_lr(step, total_steps, warmup_steps, args.lr,
                                                               args.min_lr, args.warmup_lr))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = mixup(x, y)
            loss, status = train_step(ddp_model, model, x, target, optimizer, scaler, args, device)
            step += 1
            seen += total_batch
            bar.update(1)
            if skips(status, step):  # stops the run past --max-skips
                state["loss_sum"], state["n_loss"] = state["loss_sum"] + loss, state["n_loss"] + 1
                if ema is not None:
                    ema.update(model)
            if step % args.log_every == 0 and state["n_loss"]:
                bar.set_postfix(loss=f"{state['loss_sum'] / state['n_loss']:.3f}", lr=f"{lr:.2e}")
            stop = runs.stop_requested(device)  # SIGINT / SIGTERM on any rank: save now, then exit
            if step == total_steps or step % steps_per_epoch == 0:
                break  # the epoch's last step: saved (and a stop obeyed) with the epoch's evaluation below
            if stop or step % args.save_every == 0:  # mid-epoch: the running loss sums go with it
                save_training_state(model, optimizer, scaler, ema, skips, state, step, args, rank, device)
            if stop:
                runs.STOP.exit(step, os.path.join(args.output_dir, "checkpoint-latest.pth"), rank)
        # ------------------------------------------------------------ end of epoch: save, evaluate, log
        state["pending_eval"] = True
        save_training_state(model, optimizer, scaler, ema, skips, state, step, args, rank, device)
        if stop:  # the epoch's evaluation waits for the resume (pending_eval)
            runs.STOP.exit(step, os.path.join(args.output_dir, "checkpoint-latest.pth"), rank)
        result = close_epoch(model, ema, optimizer, scaler, skips, state, val_loader, log, epoch, step, lr,
                             seen / (time.time() - t0), args, rank, device)
    bar.close()

    # ---------------------------------------------------------------- finish: classifier.pth, the last line
    return finish(model, result, state["best"], step, total_steps, began, args, rank)


def read_init(args):
    """The --init file's contents (enhancer.read_backbone, which names a bad file), or None for scratch
    or no --init. Read once: a pre-training checkpoint also holds the generator and optimiser."""
    return enh.read_backbone(args.init) if args.init not in (None, "scratch") else None


def announce(args, rank):
    """What the run is, before any data is read."""
    if rank == 0:
        print(f"finetune.py: mode {args.mode}, recipe {args.recipe}, {args.arch} from {args.init}")


def announce_training(model, total_steps, total_batch, args, rank):
    """The network's size and the schedule, once the flags are recorded."""
    if rank == 0:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{args.arch} {args.img_size}px, {args.nb_classes} classes, {n_train / 1e6:.2f}M trained "
              f"params, {total_steps} steps of {total_batch} images, lr {args.lr:.2e}")


def setup_backbone(args, init):
    """The backbone --init names (random from --seed for scratch). The network it holds goes into args
    (arch, img_size, patch_size, init_values), so checkpoints and resumes record it; --eval-size
    defaults to its input size and must fit its patch grid."""
    torch.manual_seed(args.seed)  # a scratch backbone's init
    # a ResNet trained from scratch zero-inits the last BatchNorm of each block, as timm / RSB do (not a
    # frozen random one: the linear-probe and k-NN baselines keep plain random features)
    zero_init = args.init == "scratch" and args.arch.startswith("resnet") and args.mode == "finetune"
    backbone, net = enh.load_backbone(init or args.init, args.arch, args.img_size, args.patch_size, args.drop_path,
                                      zero_init_residual=zero_init, small_stem=args.resnet_stem == "small")
    # the checkpoint decides the network: its values go into args, so checkpoints and resumes record them
    args.arch, args.img_size, args.patch_size, args.init_values = (
        net[k] for k in ("arch", "img_size", "patch_size", "init_values"))
    args.eval_size = args.eval_size or args.img_size
    if args.patch_size and args.arch.startswith("vit") and args.eval_size % args.patch_size:
        raise ValueError(f"--eval-size {args.eval_size} is not a multiple of the ViT's patch size {args.patch_size}: "
                         f"use a multiple, e.g. {args.eval_size // args.patch_size * args.patch_size}")
    return backbone


def schedule(args, train_set, loader, world_size):
    """(steps per epoch, total steps, warm-up steps, images per step); fills in --lr by the linear
    scaling rule where unset."""
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one step "
                         f"(--batch-size {args.batch_size} x {world_size} processes)")
    total_batch = args.batch_size * world_size
    if args.lr is None:
        args.lr = args.blr * total_batch / 256
    return (steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch,
            int(args.warmup_epochs * steps_per_epoch), total_batch)


def build_training(args, backbone, rank, world_size, device):
    """(classifier, its DDP wrapper (the classifier itself in one process), optimiser, GradScaler, EMA or
    None, the step to start from, the loop's state (see resume), training.SkipCount), restored from a
    checkpoint where the run resumes one."""
    model = Classifier(backbone, args.nb_classes, args.pool, args.head_init_scale,
                       linear=args.mode == "linear").to(device)
    groups = training.param_groups(model, args.weight_decay, model.no_weight_decay(), args.layer_decay,
                                   training.num_backbone_layers(backbone))
    optimizer = build_optimizer(args, groups, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ema = ModelEma(model, args.model_ema_decay) if args.model_ema else None
    step, state, skips = resume(args, model, optimizer, scaler, ema, rank, world_size, device)
    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp_model, optimizer, scaler, ema, step, state, skips


def save_training_state(model, optimizer, scaler, ema, skips, state, step, args, rank, device):
    """OUTPUT_DIR/checkpoint-latest.pth: everything a bit-exact continuation needs, the loop's state
    (see resume) included. A collective (the RNG states of every rank): every rank calls it; rank 0
    writes."""
    rng = training.gather_rng_states(device)
    if rank == 0:
        training.save_checkpoint(
            {"stage": "finetune.py", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "ema": ema.module.state_dict() if ema else None,
             "step": step, **state, **skips.state(), "args": vars(args), "rng": rng},
            os.path.join(args.output_dir, "checkpoint-latest.pth"), keep_previous=True)


def save_best_weights(model, ema, epoch, step, best, args, rank):
    """OUTPUT_DIR/checkpoint-best.pth: the weights of the best epoch so far, without the optimiser's
    state (a third of the bytes under AdamW): a run resumes from checkpoint-latest.pth."""
    if rank == 0:
        training.save_checkpoint(
            {"stage": "finetune.py", "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
             "epoch": epoch + 1, "step": step, "best": best, "args": vars(args)},
            os.path.join(args.output_dir, "checkpoint-best.pth"))


def close_epoch(model, ema, optimizer, scaler, skips, state, val_loader, log, epoch, step, lr, img_per_s, args,
                rank, device):
    """Evaluate the epoch just trained (its checkpoint is already saved: a bad validation set costs no
    training), log it, keep the best, save again with the evaluation recorded. Returns the log record."""
    stats = evaluate(model, val_loader, device, args.amp)
    train_split, eval_split = data.EVAL_SPLITS[args.eval_split]
    result = {"epoch": epoch + 1, "step": step, "lr": lr,
              "train_loss": state["loss_sum"] / max(state["n_loss"], 1), "img_per_s": img_per_s,
              "val_top1": stats["top1"], "val_top5": stats["top5"], "val_loss": stats["loss"],
              "n_val": stats["n"], "n_val_unreadable": stats["n_unreadable"],
              "peak_mem_mb": training.peak_memory_mb(device), **skips.state(), "train_split": train_split,
              "eval_split": eval_split}
    if ema is not None:
        ema_stats = evaluate(ema.module, val_loader, device, args.amp)
        result.update(ema_top1=ema_stats["top1"], ema_top5=ema_stats["top5"])
    state.update(pending_eval=False, loss_sum=0.0, n_loss=0)
    if stats["top1"] > state["best"]:
        state["best"] = stats["top1"]
        save_best_weights(model, ema, epoch, step, state["best"], args, rank)
    result["best_top1"] = state["best"]
    log.write(**result)
    if rank == 0:  # above the progress bar
        tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    save_training_state(model, optimizer, scaler, ema, skips, state, step, args, rank, device)
    return result


def finish(model, result, best, step, total_steps, began, args, rank):
    """classifier.pth under timm / torchvision names and the run's last line: the last epoch's
    result, or a finished run's as it logged it."""
    if rank == 0:
        if not result:
            result = finished_run_result(args, step, total_steps)
        torch.save(export_classifier(model), os.path.join(args.output_dir, "classifier.pth"))
        train_split, eval_split = data.EVAL_SPLITS[args.eval_split]
        print(json.dumps({"mode": args.mode, "init": args.init, "seed": args.seed, "epochs": result.get("epoch"),
                          "top1": result.get("val_top1"), "top5": result.get("val_top5"),
                          "best_top1": best, "train_split": train_split, "eval_split": eval_split,
                          "minutes": round((time.time() - began) / 60, 2)}))
    training.finish_distributed()
    return result


def finished_run_result(args, step, total_steps):
    """A finished run, run again, trains nothing: its result is its last evaluation as logged (its
    classifier is written again)."""
    result = dict(training.last_log_record(os.path.join(args.output_dir, "log.jsonl"), "val_top1") or {})
    print(f"finetune.py: {args.output_dir} holds a finished run ({step} of {total_steps} steps); "
          f"its last evaluation:")
    return result


def train_step(ddp_model, model, x, target, optimizer, scaler, args, device):
    """Forward, loss, backward; the rest is every stage's training.optimizer_step (clip, one skip
    decision on all ranks, update). Returns (loss, status: "ok", "skipped" or "overflow")."""
    optimizer.zero_grad(set_to_none=True)
    with training.autocast(device, args.amp):
        logits = ddp_model(x)
    loss = soft_target_loss(logits, target, args.loss, args.bce_target_thresh)
    scaler.scale(loss).backward()
    _, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(loss.detach()),
                                        args.clip_grad, device)
    return loss.item(), status


def resume(args, model, optimizer, scaler, ema, rank, world_size, device):
    """Returns (step, the loop's state: best top-1 so far, whether the last trained epoch still awaits
    its evaluation, the running loss sums of the epoch in progress; training.SkipCount)."""
    free = get_args_parser().resume_free
    path, ckpt = runs.find_resume_checkpoint(args, "finetune.py", free,
                                             ("checkpoint-best.pth", "classifier.pth", "log.jsonl", "knn.json"))
    skips = training.SkipCount("finetune.py", args.max_skips, args.output_dir, ckpt)
    state = {"best": -1.0, "pending_eval": False, "loss_sum": 0.0, "n_loss": 0}
    if ckpt is None:
        return 0, state, skips
    if "optimizer" not in ckpt:
        raise ValueError(f"--resume {path!r} holds the best epoch's weights, not a training state: resume from "
                         f"the run's checkpoint-latest.pth, or start a run from these weights with --init")
    saved = ckpt.get("args", {})
    runs.check_same_network(saved, args, ("arch", "mode", "img_size", "patch_size", "nb_classes", "pool"),
                            path)
    changed = runs.check_resume_flags(saved, vars(args), free, path,
                                      args.allow_flag_changes)
    training.restore_training_state(ckpt, model, optimizer, scaler, rank, world_size, device, path, changed)
    if ema is not None and ckpt.get("ema") is not None:
        ema.module.load_state_dict(ckpt["ema"])
    state.update({k: ckpt.get(k, v) for k, v in state.items()})  # (older checkpoints lack the last three)
    return ckpt["step"], state, skips


if __name__ == "__main__":
    runs.run_script(main, get_args_parser())
