"""CIM pre-training: a small BEiT generator corrupts images, an enhancer learns from the corruption.

    python pretrain.py                         # built-in data on a CPU, ~5 minutes: trains the small
                                               # tokenizer first, pre-trains, prints a k-NN check
    python pretrain.py --explain               # one batch through one step, every tensor printed
    python pretrain.py --bench 20              # time each component on synthetic tensors
    torchrun --nproc_per_node 8 pretrain.py --arch vit_b --objective revdet --data /path/imagenet \\
        --dalle-encoder encoder.pkl --dalle-decoder decoder.pkl --output-dir out/cim_vit_b

One step (paper Sec. 2, Fig. 1), read `train_step` below top to bottom:
    tokens  = dVAE-encode(tokenizer view)                        frozen, no grad, fp32
    logits  = generator(image with masked patches -> [MASK])      L_gen = CE on masked tokens
    mixed   = tokens with masked ones replaced by samples        no grad
    x~      = dVAE-decode(mixed), resized to the image size      no grad
    enhancer(x~): RevDet (was this token replaced?) or ResPix (original pixels, window-normalised)
    L = L_gen + lambda * L_enh; one optimiser over generator + enhancer

Also holds the training helpers finetune.py and segment.py reuse (re-exported from dvae.py:
distributed init, AMP, schedule, atomic checkpoints, RNG state; defined here: optimiser groups,
k-NN evaluation, backbone export).
"""
import argparse
from contextlib import nullcontext
import json
import math
import os
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dvae
import enhancer as enh
import generator as gen
from dvae import (JsonLog, autocast, cosine_lr, gather_rng_states, init_distributed, load_checkpoint,
                  print_args, save_checkpoint, seed_everything, set_rng_state, unwrap)

# ----------------------------------------------------------------------------------------------------
# Recipes: defaults for the flags left unset. "builtin" runs on a laptop CPU in minutes; "imagenet"
# is the paper's setting (BEiT recipe, Sec. 4 / Appendix of the CIM paper).
# ----------------------------------------------------------------------------------------------------

RECIPES = {
    "builtin": dict(arch="vit_mini", img_size=32, patch_size=4, epochs=4, batch_size=64, blr=2e-3,
                    min_lr=1e-5, warmup_epochs=1, weight_decay=0.05, gen_dim=64, gen_depth=2,
                    gen_heads=2, crop_min=0.35, norm_window=5, drop_path=0.0, num_workers=1,
                    knn_k=20),
    "imagenet": dict(arch="vit_b", img_size=224, patch_size=16, epochs=300, batch_size=64,
                     blr=1.5e-3 * 256 / 2048, min_lr=1e-5, warmup_epochs=10, weight_decay=0.05,
                     gen_dim=256, gen_depth=4, gen_heads=4, crop_min=0.08, norm_window=9,
                     drop_path=0.1, num_workers=10, knn_k=20),
}


def get_args_parser():
    p = argparse.ArgumentParser("pretrain.py: CIM pre-training (generator + enhancer)")
    a = p.add_argument
    # what to train
    a("--arch", default=None, help=f"enhancer backbone: one of {list(enh.ARCHS)} "
      "(builtin: vit_mini, imagenet: vit_b)")
    a("--objective", default="revdet", choices=["revdet", "respix"],
      help="revdet: per-token 'was it replaced?' (BCE); respix: regress all original pixels")
    a("--img-size", type=int, default=None, help="input size S (224; builtin 32)")
    a("--patch-size", type=int, default=None, help="ViT patch P; the token grid is S/P (16; builtin 4)")
    a("--enh-weight", type=float, default=1.0, help="lambda in L = L_gen + lambda * L_enh")
    a("--drop-path", type=float, default=None, help="enhancer stochastic depth (0.1 for ViT-B)")
    a("--init-values", type=float, default=None, help="enhancer layer scale init (off by default)")
    # generator
    a("--gen-dim", type=int, default=None, help="generator width (256 at 224 px)")
    a("--gen-depth", type=int, default=None, help="generator blocks; the paper finds 4-6 best")
    a("--gen-heads", type=int, default=None, help="generator attention heads")
    a("--mask-type", default="random", choices=["random", "block"],
      help="random: exact round(r*N) patches per image (CIM's choice); block: BEiT blockwise")
    a("--mask-ratio", type=float, default=0.5, help="fraction of patches the generator re-draws")
    a("--sample", default="softmax", choices=["softmax", "argmax"],
      help="how replacement tokens are drawn; softmax sampling beats argmax in the paper")
    a("--temperature", type=float, default=1.0, help="softmax temperature T for sampling")
    # enhancer targets
    a("--norm-pix", default="window", choices=["none", "patch", "window"],
      help="ResPix target normalisation; window (per-pixel k x k statistics) is the paper's best")
    a("--norm-window", type=int, default=None, help="odd window size k for --norm-pix window (9)")
    # tokenizer
    a("--dvae", default="", help="own tokenizer checkpoint from `python dvae.py`")
    a("--dalle-encoder", default="", help="OpenAI DALL-E encoder.pkl (official weights)")
    a("--dalle-decoder", default="", help="OpenAI DALL-E decoder.pkl (official weights)")
    # data
    a("--data", default=None, help="ImageNet-layout root (DIR/train/<class>/*, DIR/val/...); omit to "
      "use the built-in procedural dataset")
    a("--crop-min", type=float, default=None, help="random-resized-crop min scale (0.08)")
    a("--color-jitter", type=float, default=0.0, help="colour jitter strength (0 = off, BEiT: 0.4)")
    a("--num-workers", type=int, default=None, help="DataLoader workers per process")
    # optimisation
    a("--epochs", type=int, default=None, help="training epochs (300 in the paper)")
    a("--max-steps", type=int, default=None, help="stop after this many optimiser steps (tests, "
      "benchmarks); schedules then span this many steps")
    a("--batch-size", type=int, default=None, help="images per process per micro-step")
    a("--accum-iter", type=int, default=1, help="micro-steps per optimiser step (gradient accumulation)")
    a("--lr", type=float, default=None, help="absolute peak lr; default blr * total_batch / 256")
    a("--blr", type=float, default=None, help="base lr per 256 images (BEiT: 1.5e-3 at batch 2048)")
    a("--min-lr", type=float, default=None, help="final lr of the cosine schedule")
    a("--warmup-epochs", type=float, default=None, help="linear warm-up length")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay (not on norms, biases, "
      "position embeddings, special tokens)")
    a("--clip-grad", type=float, default=3.0, help="max global grad norm (BEiT: 3.0; 0 = off)")
    a("--amp", default="none", choices=["bf16", "fp16", "none"],
      help="autocast dtype; bf16 on A100/H100 (fp16 needs the GradScaler and NaNs more often)")
    a("--max-skips", type=int, default=20, help="stop after this many non-finite losses (skipped "
      "steps); a few over 300 epochs are normal with fp16")
    # runtime
    a("--output-dir", default="out/pretrain", help="checkpoints, log.jsonl, PNG grids, backbone")
    a("--resume", default="", help="checkpoint to resume (default: OUTPUT_DIR/checkpoint-latest.pth)")
    a("--save-every", type=int, default=500, help="also checkpoint every N optimiser steps")
    a("--log-every", type=int, default=20, help="JSON log line every N optimiser steps")
    a("--sample-every", type=int, default=500, help="PNG grid every N optimiser steps")
    a("--knn-k", type=int, default=None, help="neighbours for the final k-NN check (0 = skip it)")
    a("--seed", type=int, default=0, help="seed for data order, augmentation, masks and sampling")
    a("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    a("--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo)")
    a("--compile", action="store_true", help="torch.compile generator and enhancer")
    a("--bench", type=int, default=0, help="time N steps on synthetic tensors per component, exit")
    a("--explain", action="store_true", help="print every tensor of one step (a teaching aid), exit")
    a("--local-rank", "--local_rank", type=int, default=0,
      help="accepted for torch.distributed.launch; torchrun passes LOCAL_RANK in the environment")
    return p


def resolve_args(args):
    """Fill unset flags from the recipe (builtin without --data, imagenet with it) and check them."""
    recipe = RECIPES["builtin" if args.data is None else "imagenet"]
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.arch not in enh.ARCHS:
        raise ValueError(f"--arch {args.arch!r} is unknown; choose one of {list(enh.ARCHS)}")
    if args.img_size % args.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    if bool(args.dalle_encoder) != bool(args.dalle_decoder):
        raise ValueError("pass both --dalle-encoder and --dalle-decoder (the official tokenizer has two "
                         "files)")
    if args.dvae and args.dalle_encoder:
        raise ValueError("pass either --dvae or --dalle-encoder/--dalle-decoder, not both")
    return args


# ----------------------------------------------------------------------------------------------------
# Tokenizer: frozen dVAE (own checkpoint, OpenAI weights, or trained here on the built-in data)
# ----------------------------------------------------------------------------------------------------

def build_tokenizer(args, device):
    """Returns a frozen (encoder, decoder) on `device`."""
    if args.dalle_encoder:
        encoder, decoder = dvae.load_openai_dvae(args.dalle_encoder, args.dalle_decoder)
    elif args.dvae:
        encoder, decoder = dvae.load_tokenizer(args.dvae)
    elif args.data is None:
        encoder, decoder = train_builtin_tokenizer(args)
    else:
        raise ValueError("--data needs a tokenizer: pass --dalle-encoder encoder.pkl --dalle-decoder "
                         "decoder.pkl (OpenAI's DALL-E weights) or --dvae CKPT (trained with "
                         "`python dvae.py --data DIR --preset dalle`)")
    return encoder.to(device).eval().requires_grad_(False), decoder.to(device).eval().requires_grad_(False)


def train_builtin_tokenizer(args):
    """No tokenizer given and no --data: train dvae.py's small preset (every rank joins under
    torchrun), cached in OUTPUT_DIR/tokenizer so later runs and resumes reuse it."""
    out = os.path.join(args.output_dir, "tokenizer")
    ckpt = os.path.join(out, "checkpoint-latest.pth")
    grid = args.img_size // args.patch_size
    f = 2 ** (dvae.DVAE_PRESETS["small"]["group_count"] - 1)
    targs = dvae.get_args_parser().parse_args([
        "--output-dir", out, "--preset", "small", "--img-size", str(grid * f),
        "--seed", str(args.seed), "--device", args.device, "--num-workers", str(args.num_workers)])
    cached = load_checkpoint(ckpt) if os.path.isfile(ckpt) else None
    if cached is None or cached["step"] < cached["total_steps"]:  # absent or interrupted: (re)train
        print(f"pretrain.py: no tokenizer given: training the small dVAE on the built-in data first "
              f"(cached in {out}; pass --dvae to use another)")
        dvae.main(targs)
    return dvae.load_tokenizer(ckpt)


# ----------------------------------------------------------------------------------------------------
# The model: generator + enhancer in one module (one DDP wrapper, one optimiser)
# ----------------------------------------------------------------------------------------------------

def build_model(args, vocab_size):
    grid = args.img_size // args.patch_size
    generator = gen.BEiTGenerator(args.img_size, args.patch_size, vocab_size, args.gen_dim,
                                  args.gen_depth, args.gen_heads)
    backbone = enh.build_backbone(args.arch, img_size=args.img_size, patch_size=args.patch_size,
                                  drop_path_rate=args.drop_path, init_values=args.init_values)
    enhancer = enh.Enhancer(backbone, args.objective, grid, args.norm_pix, args.norm_window)
    return CIM(generator, enhancer)


class CIM(nn.Module):
    """Holds the two trained networks. The frozen tokenizer is passed to each call instead of being
    a submodule, so it stays out of state_dict(), the optimiser and DDP's gradient buckets."""

    def __init__(self, generator, enhancer):
        super().__init__()
        self.generator, self.enhancer = generator, enhancer

    def forward(self, images, tok_images, mask, tokenizer, args):
        encoder, decoder = tokenizer
        # 1-3: tokenize, generator guesses (L_gen), sample + decode -> corrupted image in [0, 1]
        c = gen.corrupt(self.generator, encoder, decoder, images, tok_images, mask,
                        args.temperature, args.sample, out_size=images.shape[-1])
        # 4: the enhancer sees the normalised corrupted image; `corrupted` carries no gradient, so
        # nothing of L_enh reaches the generator (paper Sec. 2: the two are not adversarial)
        out, loss_enh, metrics = self.enhancer(data.normalize(c["corrupted"]), images, c["replaced"])
        loss = c["loss_gen"] + args.enh_weight * loss_enh
        return loss, dict(c, out=out, loss_enh=loss_enh, **metrics)


def param_groups(model, weight_decay):
    """AdamW groups: no decay on 1-D tensors (norms, biases, layer scale, q/v bias) nor on position
    embeddings, cls/mask tokens and the relative position table (BEiT/MAE convention)."""
    skip = {f"generator.{n}" for n in model.generator.no_weight_decay()}
    skip |= {f"enhancer.{n}" for n in model.enhancer.no_weight_decay()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------------
# One training step (optimiser step over `accum_iter` micro-batches)
# ----------------------------------------------------------------------------------------------------

def train_step(ddp_model, model, batches, tokenizer, optimizer, scaler, args, device):
    """One optimiser step over the micro-batches in `batches`. Returns (outputs of the last
    micro-batch, whether the update was applied)."""
    optimizer.zero_grad(set_to_none=True)
    finite = torch.ones((), device=device)
    for i, (images, tok_images) in enumerate(batches):
        images = images.to(device, non_blocking=True)
        tok_images = tok_images.to(device, non_blocking=True)
        mask = gen.mask_patches(args.mask_type, images.shape[0], model.generator.grid,
                                args.mask_ratio).to(device)  # (B, N), True = masked
        # no_sync: only the last micro-batch all-reduces the gradients
        last = i == len(batches) - 1
        sync = ddp_model.no_sync() if (not last and ddp_model is not model) else nullcontext()
        with sync:
            with autocast(device, args.amp):
                loss, out = ddp_model(images, tok_images, mask, tokenizer, args)
            scaler.scale(loss / len(batches)).backward()
        finite = finite * torch.isfinite(loss.detach())
    # One decision for all ranks (a NaN on any rank skips the update everywhere, so the replicas
    # stay identical), taken after backward so every rank ran the same collectives. Skipping beats
    # exiting: fp16 runs of the public MIM code die late in training on a single bad batch.
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN)
    if not finite.item():
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update(scaler.get_scale() / 2)  # back off as GradScaler does on overflow
        return dict(out, loss=loss.detach()), False
    if args.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return dict(out, loss=loss.detach()), True


def binary_auc(scores, labels):
    """ROC-AUC of `scores` for binary `labels` via the rank-sum statistic (None if one class only:
    log.jsonl stays standard JSON)."""
    scores, labels = scores.float().flatten(), labels.bool().flatten()
    n_pos, n_neg = labels.sum().item(), (~labels).sum().item()
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = torch.empty_like(scores)
    ranks[scores.argsort()] = torch.arange(1, len(scores) + 1, dtype=scores.dtype, device=scores.device)
    return ((ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_record(out, args):
    """Scalars of one step for the JSON log (reads tensors back from the device: only at log time)."""
    rec = {"loss": out["loss"].item(), "loss_gen": out["loss_gen"].item(),
           "acc_gen": out["acc_gen"].item(), "loss_enh": out["loss_enh"].item(),
           "mask_frac": out["mask"].float().mean().item(),
           "replaced_frac": out["replaced"].float().mean().item()}
    if args.objective == "revdet":
        rec["revdet_acc"] = out["revdet_acc"].item()
        rec["revdet_auc"] = binary_auc(out["out"].detach(), out["replaced"])
    else:
        rec["respix_mse"] = out["respix_mse"].item()
    return rec


# ----------------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------------

def main(args):
    args = resolve_args(args)
    rank, world_size, device = init_distributed(args.device, args.dist_backend)
    os.makedirs(args.output_dir, exist_ok=True)
    print_args(args, rank)
    seed_everything(args.seed, rank)
    if args.bench:
        return benchmark(args, device)

    tokenizer = build_tokenizer(args, device)
    # seeded again after the tokenizer: training the built-in one draws random numbers, and a run
    # that finds it cached must start from the same RNG state as the run that trained it
    seed_everything(args.seed, rank)
    grid = args.img_size // args.patch_size
    tok_size = grid * tokenizer[0].downsample  # the tokenizer sees the same crop at (S/P)*f px

    # ---------------------------------------------------------------- data
    transform = data.PretrainTransform(args.img_size, tok_size, scale=(args.crop_min, 1.0),
                                       color_jitter=args.color_jitter)
    train_set = data.build_dataset(args.data, "train", transform, seed=args.seed)
    loader, sampler = data.build_loader(train_set, args.batch_size, args.num_workers, rank, world_size,
                                        seed=args.seed)
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one step "
                         f"(--batch-size {args.batch_size} x --accum-iter {args.accum_iter} x "
                         f"{world_size} processes)")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    total_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr or args.blr * total_batch / 256  # MAE/BEiT linear scaling rule
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    # ---------------------------------------------------------------- model, optimiser, resume
    model = build_model(args, tokenizer[0].vocab_size).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, skipped = resume(args, model, optimizer, scaler, rank, world_size, device)
    ddp_model = model
    if args.compile:
        ddp_model = torch.compile(ddp_model)
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            ddp_model, device_ids=[device.index] if device.type == "cuda" else None)
    log = JsonLog(os.path.join(args.output_dir, "log.jsonl"), rank == 0)
    if rank == 0:
        n_gen = sum(p.numel() for p in model.generator.parameters())
        n_enh = sum(p.numel() for p in model.enhancer.parameters())
        print(f"generator {n_gen / 1e6:.2f}M params, enhancer {n_enh / 1e6:.2f}M params, "
              f"{total_steps} steps of {total_batch} images, lr {args.lr:.2e}")

    def checkpoint():
        rng = gather_rng_states(device)  # a collective: every rank calls checkpoint()
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "step": step, "skipped": skipped,
                             "args": vars(args), "rng": rng},
                            os.path.join(args.output_dir, "checkpoint-latest.pth"))

    if args.explain:
        return explain(model, tokenizer, train_set, args, device)

    # ---------------------------------------------------------------- training loop
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="cim", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        # resume mid-epoch: the sampler replays the epoch's order from where the checkpoint left off
        sampler.set_epoch(epoch, start=offset * args.accum_iter * args.batch_size)
        batches = iter(loader)
        for _ in range(steps_per_epoch - offset):
            lr = cosine_lr(step, total_steps, warmup_steps, args.lr, args.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [next(batches)[0] for _ in range(args.accum_iter)]
            out, ok = train_step(ddp_model, model, micro, tokenizer, optimizer, scaler, args, device)
            step += 1
            seen += total_batch
            bar.update(1)
            if not ok:
                skipped += 1
                print(f"pretrain.py: non-finite loss at step {step}, update skipped ({skipped} so far)")
                if skipped > args.max_skips:
                    raise FloatingPointError(f"pretrain.py: {skipped} non-finite losses, the last at step "
                                             f"{step}; lower --lr, use --amp bf16 or none, or resume "
                                             f"from {args.output_dir}/checkpoint-latest.pth")
            elif step % args.log_every == 0 or step == total_steps:
                rec = dict(step=step, epoch=epoch, lr=lr, **log_record(out, args),
                           img_per_s=seen / (time.time() - t0), peak_mem_mb=peak_memory_mb(device),
                           skipped=skipped)
                bar.set_postfix(gen=f"{rec['loss_gen']:.3f}", enh=f"{rec['loss_enh']:.3f}")
                log.write(**rec)
            if rank == 0 and ok and (step % args.sample_every == 0 or step == total_steps):
                save_samples(out, micro[-1][0], args, os.path.join(args.output_dir, f"sample-{step:06d}.png"))
            if step % args.save_every == 0 or step == total_steps or step % steps_per_epoch == 0:
                checkpoint()
            if step == total_steps:
                break
    bar.close()
    if rank == 0:
        torch.save(export(model, args), os.path.join(args.output_dir, "backbone.pth"))
    result = {"steps": step, "minutes": (time.time() - t0) / 60}
    if args.knn_k:
        result.update(knn_report(model.enhancer.backbone, args, device))
    if rank == 0:
        log.write(**result)
        print(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


def resume(args, model, optimizer, scaler, rank, world_size, device):
    """Restore everything a bit-exact continuation needs; returns (step, skipped)."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-latest.pth")
    if not (args.resume or os.path.isfile(path)):
        return 0, 0
    ckpt = load_checkpoint(path, "--resume checkpoint")
    saved = ckpt.get("args", {})
    for k in ("arch", "objective", "img_size", "patch_size", "gen_dim", "gen_depth", "gen_heads"):
        if k in saved and saved[k] != getattr(args, k):
            raise ValueError(f"--resume {path!r} was trained with --{k.replace('_', '-')} {saved[k]}, "
                             f"this run has {getattr(args, k)}: use another --output-dir or the same flags")
    saved_vocab = ckpt["model"]["generator.lm_head.weight"].shape[0]
    if saved_vocab != model.generator.vocab_size:
        raise ValueError(f"--resume {path!r} holds a generator for a {saved_vocab}-code tokenizer, this "
                         f"run's tokenizer has {model.generator.vocab_size} codes: pass the tokenizer it "
                         f"was trained with (--dvae or --dalle-encoder/--dalle-decoder)")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == world_size:
        set_rng_state(ckpt["rng"][rank], device)
    elif rank == 0:
        print(f"pretrain.py: {path} was written by {len(ckpt['rng'])} processes, this run has "
              f"{world_size}: RNG streams restart from the seed")
    if rank == 0:
        print(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("skipped", 0)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Feedback: PNG grids, --explain, --bench
# ----------------------------------------------------------------------------------------------------

def patch_map(values, grid, size):
    """(B, N) per-token values -> (B, 1, size, size) image (nearest upsampling)."""
    return F.interpolate(values.float().view(-1, 1, grid, grid), size=(size, size), mode="nearest")


@torch.no_grad()
def save_samples(out, images, args, path, n=8):
    """Rows: original | generator input (masked patches grey) | corrupted | enhancer output
    (ResPix: prediction, min-max scaled per image) or detection map (RevDet: p(replaced)), then
    the true replaced map (RevDet)."""
    images = data.denormalize(images[:n].float().cpu())
    S, G = images.shape[-1], args.img_size // args.patch_size
    masked = patch_map(out["mask"][:n].cpu(), G, S)
    rows = [images, images * (1 - masked) + 0.5 * masked, out["corrupted"][:n].float().cpu()]
    if args.objective == "respix":
        pred = out["out"][:n].float().cpu()
        lo = pred.amin(dim=(1, 2, 3), keepdim=True)
        hi = pred.amax(dim=(1, 2, 3), keepdim=True)
        rows.append((pred - lo) / (hi - lo + 1e-6))
    else:
        rows += [patch_map(torch.sigmoid(out["out"][:n].float().cpu()), G, S),
                 patch_map(out["replaced"][:n].cpu(), G, S)]
    data.save_grid(rows, path)


def describe(name, t):
    if isinstance(t, torch.Tensor):
        rng = f"[{t.float().min().item():.3g}, {t.float().max().item():.3g}]" if t.numel() else "[]"
        print(f"  {name:<42} {str(tuple(t.shape)):<18} {str(t.dtype).replace('torch.', ''):<8} {rng}")
    else:
        print(f"  {name:<42} {t}")


def explain(model, tokenizer, dataset, args, device):
    """One batch through one step, each tensor in pipeline order (the paper's Fig. 1 as shapes)."""
    encoder, decoder = tokenizer
    loader, _ = data.build_loader(dataset, min(args.batch_size, 4), 0, seed=args.seed)
    images, tok_images = next(iter(loader))[0]
    images, tok_images = images.to(device), tok_images.to(device)
    print("one CIM step, in the order pretrain.py runs it:")
    describe("data.PretrainTransform: image", images)
    describe("data.PretrainTransform: tokenizer view", tok_images)
    tokens = dvae.tokenize(encoder, tok_images)
    describe("dvae.tokenize: tokens", tokens)
    mask = gen.mask_patches(args.mask_type, images.shape[0], model.generator.grid, args.mask_ratio).to(device)
    describe("generator.mask_patches: mask (1=masked)", mask)
    logits, loss_gen = model.generator(images, mask, tokens)
    describe("BEiTGenerator.forward: logits (M, V)", logits)
    describe("BEiTGenerator.loss: L_gen", loss_gen)
    mixed, replaced, corrupted = gen.sample_and_decode(decoder, logits.detach(), tokens.flatten(1), mask,
                                                       args.temperature, args.sample, args.img_size)
    describe("generator.sample_and_decode: mixed", mixed)
    describe("  replaced = mixed != tokens", replaced)
    describe("  dvae.decode + resize: corrupted", corrupted)
    x = data.normalize(corrupted)
    feats = model.enhancer.backbone(x)
    describe("enhancer backbone: features", feats)
    out, loss_enh, metrics = model.enhancer(x, images, replaced)
    describe(f"Enhancer.forward: {args.objective} output", out)
    describe("Enhancer.forward: L_enh", loss_enh)
    loss = loss_gen + args.enh_weight * loss_enh
    describe("L = L_gen + lambda * L_enh", loss)
    loss.backward()
    g_gen = sum(p.grad.norm() ** 2 for p in model.generator.parameters() if p.grad is not None) ** 0.5
    g_enh = sum(p.grad.norm() ** 2 for p in model.enhancer.parameters() if p.grad is not None) ** 0.5
    describe("grad norm, generator", g_gen)
    describe("grad norm, enhancer", g_enh)
    return {"loss": loss.item()}


def benchmark(args, device):
    """--bench N: N steps on random tensors (no data loading, untrained tokenizer of the right
    shape) with each component timed separately; prints img/s and per-component ms and memory."""
    grid = args.img_size // args.patch_size
    preset = "dalle" if args.data is not None or args.img_size >= 112 else "small"
    cfg = dvae.DVAE_PRESETS[preset]
    encoder, decoder = (m.to(device).eval().requires_grad_(False) for m in dvae.build_from_config(cfg))
    model = build_model(args, cfg["vocab_size"]).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=1e-4, betas=(0.9, 0.98))
    B, S, T = args.batch_size, args.img_size, grid * encoder.downsample
    images = torch.randn(B, 3, S, S, device=device)
    tok_images = torch.rand(B, 3, T, T, device=device)
    times, mems = {}, {}

    def timed(name, fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            mems[name] = max(mems.get(name, 0), torch.cuda.max_memory_allocated(device) / 2 ** 20)
        times.setdefault(name, []).append(time.perf_counter() - t)
        return result

    for it in range(args.bench + 2):  # 2 warm-up steps, not counted
        mask = gen.mask_patches(args.mask_type, B, grid, args.mask_ratio).to(device)
        optimizer.zero_grad(set_to_none=True)
        tokens = timed("tokenize", lambda: dvae.tokenize(encoder, tok_images).flatten(1))
        with autocast(device, args.amp):
            logits, loss_gen = timed("generator fwd", lambda: model.generator(images, mask, tokens))
        timed("generator bwd", lambda: loss_gen.backward())
        mixed, replaced, corrupted = timed("sample + decode", lambda: gen.sample_and_decode(
            decoder, logits.detach(), tokens, mask, args.temperature, args.sample, S))
        with autocast(device, args.amp):
            _, loss_enh, _ = timed("enhancer fwd", lambda: model.enhancer(data.normalize(corrupted),
                                                                         images, replaced))
        timed("enhancer bwd", lambda: (args.enh_weight * loss_enh).backward())
        timed("optimizer", lambda: optimizer.step())
        if it < 2:
            times.clear()
    total = sum(sum(v) for v in times.values()) / args.bench
    print(f"bench: {args.arch} {args.objective} {S}px batch {B} amp {args.amp} on {device}: "
          f"{B / total:.1f} img/s, {1000 * total:.1f} ms/step")
    report = {"img_per_s": B / total}
    for name, v in times.items():
        ms = 1000 * sum(v) / len(v)
        report[name] = ms
        print(f"  {name:<16} {ms:8.2f} ms  {100 * ms / (1000 * total):5.1f}%"
              + (f"  peak {mems[name]:.0f} MiB" if name in mems else ""))
    return report


# ----------------------------------------------------------------------------------------------------
# Evaluation and export: weighted k-NN on pooled features, backbone weights under timm/torchvision names
# ----------------------------------------------------------------------------------------------------

def pooled_features(backbone, x):
    """Global feature of a backbone: mean of ViT patch tokens (cls dropped) or of the ResNet map."""
    f = backbone(x)
    return f[:, 1:].mean(1) if f.ndim == 3 else f.mean((2, 3))  # (B, D)


@torch.no_grad()
def extract_features(backbone, loader, device):
    feats, labels = [], []
    for x, y in loader:
        feats.append(F.normalize(pooled_features(backbone, x.to(device)).float(), dim=1))
        labels.append(y.to(device))
    feats, labels = torch.cat(feats), torch.cat(labels)
    if torch.distributed.is_initialized():  # every rank holds an equal shard (padded sampler)
        world = torch.distributed.get_world_size()
        gathered = [torch.empty_like(feats) for _ in range(world)]
        torch.distributed.all_gather(gathered, feats)
        glabels = [torch.empty_like(labels) for _ in range(world)]
        torch.distributed.all_gather(glabels, labels)
        feats, labels = torch.cat(gathered), torch.cat(glabels)
    return feats, labels


def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07):
    """Weighted k-NN (Wu et al. 2018, as in DINO): the k most cosine-similar training features vote
    with weight exp(sim / T). Features must be L2-normalised. Returns predicted labels."""
    preds = []
    for chunk in test_feats.split(1024):
        sim = chunk @ train_feats.T                         # (b, n_train)
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)  # (b, k)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(backbone, train_set, val_set, device, k=20, batch_size=128, num_workers=0):
    """Top-1 weighted k-NN accuracy (%) of the backbone's pooled features, train -> val."""
    was_training = backbone.training
    backbone.eval()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_initialized() else (0, 1)
    feats = []
    for ds in (train_set, val_set):
        loader, _ = data.build_loader(ds, batch_size, num_workers, rank, world, shuffle=False,
                                      drop_last=False)
        feats.append(extract_features(backbone, loader, device))
    backbone.train(was_training)
    (tr_f, tr_y), (va_f, va_y) = feats
    pred = knn_classify(tr_f, tr_y, va_f, len(train_set.classes), k)
    return 100.0 * (pred == va_y).float().mean().item()


def knn_report(backbone, args, device):
    """The default run's evidence: k-NN accuracy of the pre-trained enhancer next to the same
    architecture at random init (a random network's features already beat chance)."""
    tf = data.EvalTransform(args.img_size, crop_pct=1.0)
    train_set = data.build_dataset(args.data, "train", tf, seed=args.seed)
    val_set = data.build_dataset(args.data, "val", tf, seed=args.seed)
    if args.data is None:  # a 4096-image memory bank keeps the CPU check to seconds
        train_set.length = 4096
    torch.manual_seed(args.seed)
    random_init = enh.build_backbone(args.arch, img_size=args.img_size, patch_size=args.patch_size,
                                     init_values=args.init_values).to(device)
    result = {"knn_pretrained": knn_accuracy(backbone, train_set, val_set, device, args.knn_k),
              "knn_random_init": knn_accuracy(random_init, train_set, val_set, device, args.knn_k),
              "knn_chance": 100.0 / len(train_set.classes)}
    return result


def export(model, args):
    """Enhancer backbone under timm (ViT) / torchvision (ResNet) names + what rebuilds it."""
    return {"model": enh.export_backbone(model.enhancer.backbone),
            "arch": args.arch, "img_size": args.img_size, "patch_size": args.patch_size,
            "init_values": args.init_values, "args": vars(args)}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
