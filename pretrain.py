"""CIM pre-training: a small BEiT generator corrupts images, an enhancer learns from the corruption.

    python pretrain.py                         # built-in data on a CPU, ~4 minutes: fits a k-means
                                               # tokenizer first, pre-trains, prints a k-NN check
    python pretrain.py --explain               # one batch through one step, every tensor printed
    # the paper's ViT-B/16 run (README, "The paper's path"): 2048 images a step, 64 x 4 x 8 GPUs
    torchrun --nproc_per_node 8 pretrain.py --arch vit_b --objective revdet --data $IMAGENET \
        --dalle-encoder $DALLE/encoder.pkl --dalle-decoder $DALLE/decoder.pkl \
        --batch-size 64 --accum-iter 4 --amp bf16 --output-dir $OUT/vit_b/pretrain

One step (paper Sec. 2, Fig. 1), numbered as in `CIM.forward`, the README and docs/walkthrough.md:
    0  batch   = one crop twice (network view, tokenizer view), mask M   `train_step`
    1  tokens  = dVAE-encode(tokenizer view)                        frozen, no grad
    2  logits  = generator(image with masked patches -> [MASK])      L_gen = CE on masked tokens
    3  z'      ~ softmax(logits / T) at the masked patches            no grad
    4  mixed   = where(M, z', tokens); replaced = mixed != tokens    the RevDet label
    5  x~      = dVAE-decode(mixed), resized to the image size      no grad
    6  enhancer(x~): RevDet (was this token replaced?) or ResPix (original pixels, window-normalised)
    7  L = L_gen + lambda * L_enh; one optimiser over generator + enhancer (`train_step`)
"""
from contextlib import nullcontext
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import dvae
import enhancer as enh
import generator as gen
import runs
import training

# ----------------------------------------------------------------------------------------------------
# Recipes: the values of the flags left unset. "builtin" runs on a laptop CPU in minutes; "photos" is
# for a folder of small real photos (the study behind it: docs/study.md, "Your own photos"); "imagenet" is
# the paper's setting (CIM Sec. 4 / appendix, BEiT's recipe where CIM says nothing).
# ----------------------------------------------------------------------------------------------------

# The paper's setting. From the paper: ViT-B/16 (and ViT-S/16, ResNet-50 via --arch), 300 epochs, 50%
# random masking, softmax sampling (T = 1), a small BEiT generator of 4 blocks (its ablation favours 4-6).
# From BEiT's run_beit_pretraining.py and README command, where the paper is silent or could not be read
# here: batch 2048, lr 1.5e-3 (blr = 1.5e-3 * 256 / 2048), AdamW (0.9, 0.999), weight decay 0.05, 10
# warm-up epochs, cosine to 1e-5, drop path 0.1, random-resized crop 0.08-1 and colour jitter 0.4. This
# project's choice, no reference: generator width 256 with 4 heads, ResPix's 9 x 9 normalisation window.
IMAGENET = dict(arch="vit_b", img_size=224, patch_size=16, epochs=300, batch_size=64, blr=1.5e-3 * 256 / 2048,
                min_lr=1e-5, warmup_epochs=10, weight_decay=0.05, opt_betas=[0.9, 0.999], gen_dim=256,
                gen_depth=4, gen_heads=4, crop_min=0.08, color_jitter=0.4, norm_window=9, drop_path=0.1,
                num_workers=10, knn_k=20, tokenizer=None, mask_ratio=0.5, temperature=1.0, resnet_stem="imagenet")
# The small-scale recipes, as differences from it (why each value: docs/pretrain.md, "Recipes"): a 6-block
# ViT at 32 px with patch 4, a 2-block generator, a k-means codebook fitted first as the tokenizer, a
# quarter of the patches re-drawn.
SMALL = dict(arch="vit_mini", img_size=32, patch_size=4, blr=2e-3, opt_betas=[0.9, 0.98], gen_dim=64,
             gen_depth=2, gen_heads=2, color_jitter=0.0, norm_window=5, drop_path=0.0, num_workers=1,
             tokenizer="kmeans", mask_ratio=0.25)
RECIPES = {
    "builtin": dict(IMAGENET, **SMALL, epochs=4, min_lr=1e-5, warmup_epochs=1, crop_min=0.35),
    "photos": dict(IMAGENET, **SMALL, epochs=60, batch_size=128, min_lr=None, warmup_epochs=0, crop_min=1.0,
                   resnet_stem="small"),  # constant lr after no warm-up, flips only
    "imagenet": IMAGENET,
}
# the photos recipe with a ResNet: chosen on the selection split (per-stage k-NN every 2 epochs: stages
# 1-3 best at 6, the last stage below random init from the first check on, under the 1x1 head and a wider
# one alike; docs/study.md, ResNet-18)
PHOTOS_RESNET_EPOCHS = 6
# ... and its RevDet head (not the paper's 1x1 on the last stage alone): a 1x1 on each of the last two
# stages, logits summed. On the selection split its last stage ends above random init (33.5 vs 32.75, rank
# 8.3) where the 1x1's ends below (30.0, rank 3.5), and it fine-tunes as well (51.75 vs 51.25)
PHOTOS_RESNET_HEAD_STAGES = 2
# --method beit masks as BEiT does, whatever the recipe's CIM masking: blockwise, 75 of 196 patches
BEIT_MASKING = dict(mask_type="block", mask_ratio=75 / 196)
# ... except the ratio under the photos recipe, chosen on the selection split by k-NN as CIM's was (0.25 /
# 0.38 / 0.5 / 0.6: 21.5 / 24.0 / 28.75 / 27.25; docs/study.md, BEiT's mask ratio)
PHOTOS_BEIT_MASK_RATIO = 0.5
TOKENIZER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



# ----------------------------------------------------------------------------------------------------
# The model: the whole CIM step in one forward
# ----------------------------------------------------------------------------------------------------

def no_trace(name, value):
    pass


class CIM(nn.Module):
    """Generator + enhancer, and the step that joins them (paper Sec. 2, Fig. 1).

    The frozen dVAE is held in a plain tuple, not as a submodule, so it stays out of state_dict(),
    the optimiser and DDP's gradient buckets. Settings come in at construction:
    temperature and sample (how replacement tokens are drawn), enh_weight (lambda).
    """

    def __init__(self, generator, enhancer, encoder, decoder, temperature=1.0, sample="softmax",
                 enh_weight=1.0, tokenizer_dtype=torch.float32, channels_last=False):
        super().__init__()
        if decoder.vocab_size != encoder.vocab_size:
            raise ValueError(f"the dVAE encoder has {encoder.vocab_size} codes but the decoder "
                             f"{decoder.vocab_size}: load both halves of the same tokenizer")
        if encoder.vocab_size > generator.vocab_size:
            raise ValueError(f"the tokenizer's vocabulary ({encoder.vocab_size}) is larger than the "
                             f"generator's lm_head ({generator.vocab_size})")
        self.generator, self.enhancer = generator, enhancer
        self.tokenizer = (encoder, decoder)
        self.temperature, self.sample, self.enh_weight = temperature, sample, enh_weight
        # speed only (docs/pretrain.md): the frozen tokenizer in a half type as dall_e runs it, and a
        # channels-last input for a channels-last (ResNet) enhancer
        self.tokenizer_dtype, self.channels_last = tokenizer_dtype, channels_last

    def forward(self, images, tok_images, mask, trace=no_trace):
        """images (B, 3, S, S) normalised; tok_images (B, 3, G*f, G*f), the same crops in [0, 1];
        mask (B, N) bool, True = masked. Returns (L, outputs). trace(name, tensor) is called with
        every intermediate (--explain prints them, bench.py times the phases between them)."""
        encoder, decoder = self.tokenizer
        B, G = images.shape[0], self.generator.grid
        mask = mask.bool()  # a 0/1 integer mask would index by value, not select
        # 1. targets: the frozen dVAE's token for every patch (no grad; in --tokenizer-dtype)
        tokens = dvae.tokenize(encoder, tok_images, self.tokenizer_dtype)  # (B, G, G)
        check_token_grid(tokens, self.generator, encoder, "generator")
        tokens = tokens.flatten(1)                                    # (B, N)
        trace("tokens", tokens)
        # 2. the generator predicts the masked tokens; L_gen is the only loss that reaches it
        logits, loss_gen = self.generator(images, mask, tokens)      # (M, V), M = mask.sum()
        trace("logits", logits)
        trace("loss_gen", loss_gen)
        with torch.no_grad():
            # 3. sample replacements z' ~ softmax(logits / T), only among the decoder's codes
            sampled = gen.sample_tokens(logits[:, :decoder.vocab_size], self.temperature, self.sample)
            # 4. mix: z' at masked positions (row-major, as the logits), the original elsewhere. A
            #    sample equal to the original changes nothing visible: it counts as not replaced
            mixed = tokens.masked_scatter(mask, sampled)              # (B, N)
            replaced = mixed != tokens                                # (B, N) bool, the RevDet label
            trace("mixed", mixed)
            trace("replaced", replaced)
            # 5. decode the mix, resize to the input size (bilinear keeps [0, 1]): the corrupted image
            corrupted = dvae.decode(decoder, mixed.view(B, G, G), self.tokenizer_dtype)  # (B, 3, G*f, G*f)
            if corrupted.shape[-2:] != images.shape[-2:]:
                corrupted = F.interpolate(corrupted, size=images.shape[-2:], mode="bilinear",
                                          align_corners=False)        # (B, 3, S, S)
            trace("corrupted", corrupted)
            acc_gen = (logits.argmax(-1) == tokens[mask]).float().mean()
        # 6. the enhancer sees only the normalised corrupted image; `corrupted` carries no gradient,
        #    so nothing of L_enh reaches the generator (Sec. 2: the two are not adversarial)
        x = data.normalize(corrupted)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out, loss_enh, metrics = self.enhancer(x, images, replaced)
        trace("enhancer output", out)
        trace("loss_enh", loss_enh)
        # 7. one loss, one backward, one optimiser
        loss = loss_gen + self.enh_weight * loss_enh
        trace("loss", loss)
        return loss, dict(metrics, tokens=tokens, mask=mask, mixed=mixed, replaced=replaced,
                          corrupted=corrupted, out=out, loss_gen=loss_gen, acc_gen=acc_gen,
                          loss_enh=loss_enh)

    @property
    def backbone(self):  # what pre-training is for: exported, k-NN-checked, fine-tuned
        return self.enhancer.backbone

    @property
    def grid(self):
        return self.generator.grid

    @property
    def vocab_size(self):
        return self.generator.vocab_size

    def no_weight_decay(self):
        """Position embeddings, cls / mask tokens and the relative position table of both networks."""
        return {f"generator.{n}" for n in self.generator.no_weight_decay()} | \
            {f"enhancer.{n}" for n in self.enhancer.no_weight_decay()}


def check_token_grid(tokens, vit, encoder, who):
    """The tokenizer view must be (S/P)*f px, the grid of `vit` (the generator, or BEiT's backbone):
    a clear error instead of a shape crash."""
    embed = vit.patch_embed
    G = embed.grid_size
    if tuple(tokens.shape[1:]) != (G, G):
        raise ValueError(f"the tokenizer gives a {tokens.shape[1]}x{tokens.shape[2]} token grid but the {who} "
                         f"expects {G}x{G} (image {embed.img_size} / patch {embed.patch_size}): feed the "
                         f"tokenizer {G}*downsample = {G * encoder.downsample} px images")


def backbone_from_args(args):
    """The enhancer's backbone as the flags ask (a ResNet's stem by --resnet-stem)."""
    kw = dict(small_stem=args.resnet_stem == "small") if args.arch.startswith("resnet") else {}
    return enh.build_backbone(args.arch, img_size=args.img_size, patch_size=args.patch_size,
                              drop_path_rate=args.drop_path, init_values=args.init_values, **kw)


def check_network(args):
    """Before any work (a tokenizer can take minutes to fit): build the generator and the enhancer's
    backbone these flags describe and pass one image through the backbone, so flags that contradict
    each other stop the run now, named, and leave nothing behind."""
    try:
        if args.method == "cim":
            gen.BEiTGenerator(args.img_size, args.patch_size, 16, args.gen_dim, args.gen_depth, args.gen_heads)
        with torch.no_grad():
            backbone_from_args(args).eval()(torch.zeros(1, 3, args.img_size, args.img_size))
    except (AssertionError, ValueError, RuntimeError) as err:
        raise ValueError(f"these flags describe no network that runs ({str(err).splitlines()[0]}): check --arch "
                         f"{args.arch}, --img-size {args.img_size}, --patch-size {args.patch_size}"
                         + (f", --gen-dim {args.gen_dim}, --gen-heads {args.gen_heads}" if args.method == "cim" else "")
                         + (f", --resnet-stem {args.resnet_stem}" if args.arch.startswith("resnet") else "")) from None


def build_model(args, encoder, decoder):
    grid = args.img_size // args.patch_size
    backbone = backbone_from_args(args)
    tok_dtype = training.AMP_DTYPES[args.amp] if args.tokenizer_dtype == "auto" else \
        TOKENIZER_DTYPES[args.tokenizer_dtype]
    if args.method == "beit":
        return BEiT(backbone, encoder, tok_dtype)
    generator = gen.BEiTGenerator(args.img_size, args.patch_size, encoder.vocab_size, args.gen_dim,
                                  args.gen_depth, args.gen_heads)
    enhancer = enh.Enhancer(backbone, args.objective, grid, args.norm_pix, args.norm_window, args.head_width,
                            args.head_stages)
    channels_last = args.arch.startswith("resnet") and torch.cuda.is_available() and args.device != "cpu"
    if channels_last:  # NHWC convolutions: the fast layout of cuDNN's tensor-core kernels
        backbone.to(memory_format=torch.channels_last)
    return CIM(generator, enhancer, encoder, decoder, args.temperature, args.sample, args.enh_weight,
               tok_dtype, channels_last)



def compile_in_place(model):
    """torch.compile the generator, the enhancer and the tokenizer in place (nn.Module.compile):
    state_dict keys keep no `_orig_mod.` prefix and the DDP wrapper around the CIM stays as it is.
    A dVAE is compiled layer group by layer group, since dvae.tokenize/decode call them apart."""
    for net in (model.generator, model.enhancer) if isinstance(model, CIM) else (model.backbone,):
        net.compile()
    for part in model.tokenizer:
        for m in (part.blocks if hasattr(part, "blocks") else [part]):
            m.compile()


# ----------------------------------------------------------------------------------------------------
# One training step (optimiser step over `accum_iter` micro-batches)
# ----------------------------------------------------------------------------------------------------

def train_step(ddp_model, model, batches, optimizer, scaler, args, device, trace=no_trace):
    """One optimiser step over the micro-batches in `batches` (each (images, tok_images)).
    Returns (outputs of the last micro-batch, training.optimizer_step's status: "ok", "skipped"
    (a non-finite loss or gradient: no update on any rank) or "overflow" (fp16))."""
    optimizer.zero_grad(set_to_none=True)
    finite = torch.ones((), device=device)
    for i, (images, tok_images) in enumerate(batches):
        # 0. the batch: one crop as the network view and as the tokenizer view; the patches to mask
        images = images.to(device, non_blocking=True)
        tok_images = tok_images.to(device, non_blocking=True)
        mask = gen.mask_patches(args.mask_type, images.shape[0], model.grid, args.mask_ratio,
                                args.mask_min_patches).to(device)  # (B, N), True = masked
        trace("images", images)
        trace("tokenizer view", tok_images)
        trace("mask", mask)
        # no_sync: only the last micro-batch all-reduces the gradients
        last = i == len(batches) - 1
        ddp = isinstance(ddp_model, nn.parallel.DistributedDataParallel)
        with ddp_model.no_sync() if (ddp and not last) else nullcontext():
            with training.autocast(device, args.amp):
                loss, out = ddp_model(images, tok_images, mask, trace=trace)
            scaler.scale(loss / len(batches)).backward()
        trace("backward", None)  # per micro-batch: bench.py books each backward to its own phase
        finite = finite * torch.isfinite(loss.detach())
    grad_norm, status = training.optimizer_step(model, optimizer, scaler, finite, args.clip_grad, device)
    trace("optimizer", None)
    return dict(out, loss=loss.detach(), grad_norm=grad_norm), status


def binary_auc(scores, labels):
    """ROC-AUC of `scores` for binary `labels` via the rank-sum statistic, tied scores sharing their
    average rank (a tie counts half, as in the pairwise definition; bf16 logits tie often). None if
    one class only: log.jsonl stays standard JSON."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = labels.sum().item(), (~labels).sum().item()
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)  # sorted values
    last = counts.cumsum(0).double()                  # rank of each distinct value's last copy
    ranks = (last - (counts - 1) / 2)[inverse]        # average rank of each score
    return (ranks[labels].sum().item() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def border_jumps(images, patch):
    """(B, C, S, S) -> (B, G, G): for each patch, the mean absolute pixel difference across its borders
    with its neighbours (G = S / patch; the image's own edges do not count). The score of a detector
    with no parameters: a corruption that pastes replacements on the patch grid makes jumps there."""
    B, _, S, _ = images.shape
    G = S // patch
    rows = (images[:, :, 1:] - images[:, :, :-1]).abs().mean(1)          # (B, S-1, S): row i vs i+1
    cols = (images[..., 1:] - images[..., :-1]).abs().mean(1)            # (B, S, S-1)
    h = rows[:, patch - 1::patch].reshape(B, G - 1, G, patch).mean(-1)   # (B, G-1, G): cell row r | r+1
    v = cols[..., patch - 1::patch].reshape(B, G, patch, G - 1).mean(2)  # (B, G, G-1): cell col c | c+1
    total, count = images.new_zeros(B, G, G), images.new_zeros(G, G)
    total[:, :-1] += h                                                   # a border counts for both cells
    total[:, 1:] += h
    total[:, :, :-1] += v
    total[:, :, 1:] += v
    count[:-1] += 1
    count[1:] += 1
    count[:, :-1] += 1
    count[:, 1:] += 1
    return total / count


def gradient_energy(images, patch, ring=0):
    """(B, C, S, S) -> (B, G, G): the mean absolute difference between neighbouring pixels over each
    patch grown by `ring` px on every side. A second detector with no parameters, for cues that sit
    inside a patch or just outside it rather than on its borders (a decoder can move a jump there)."""
    rows = F.pad((images[:, :, 1:] - images[:, :, :-1]).abs().mean(1, keepdim=True), (0, 0, 0, 1))
    cols = F.pad((images[..., 1:] - images[..., :-1]).abs().mean(1, keepdim=True), (0, 1, 0, 0))
    grown = F.pad(rows + cols, (ring,) * 4, mode="replicate")                # (B, 1, S+2r, S+2r)
    return F.avg_pool2d(grown, patch + 2 * ring, stride=patch).squeeze(1)    # (B, G, G)


def local_cue_auc(corrupted, replaced, patch):
    """The best ROC-AUC of gradient_energy over rings of 0 .. patch/2 px: a replaced token found from
    the sharpness of its own neighbourhood, wherever the decoder put the jump."""
    labels = replaced.view(replaced.shape[0], -1)
    return max(binary_auc(gradient_energy(corrupted.float(), patch, r), labels) for r in range(patch // 2 + 1))


def border_cue_auc(corrupted, replaced, patch):
    """ROC-AUC with which border_jumps alone tells replaced patches from kept ones: 0.5 = no cue at
    the patch borders (what a dVAE decoder gives, rendering the whole mixed map), near 1 = the
    corruption is solved from patch borders without looking at content."""
    if corrupted.shape[-1] // patch < 2:
        return None  # a single patch has no borders with neighbours
    return binary_auc(border_jumps(corrupted.float(), patch), replaced.view(replaced.shape[0], -1))


def log_record(out, args):
    """Scalars of one step for the JSON log (reads tensors back from the device: only at log time)."""
    rec = {"loss": out["loss"].item(), "loss_gen": out["loss_gen"].item(), "acc_gen": out["acc_gen"].item(),
           "grad_norm": out["grad_norm"].item(), "mask_frac": out["mask"].float().mean().item()}
    if args.method == "beit":  # loss_gen / acc_gen: the backbone's own masked-token loss and accuracy
        return rec
    rec.update(loss_enh=out["loss_enh"].item(), replaced_frac=out["replaced"].float().mean().item())
    if args.objective == "revdet":
        rec["revdet_acc"] = out["revdet_acc"].item()
        rec["revdet_auc"] = binary_auc(out["out"].detach(), out["replaced"])
        # the zero-parameter detector on the same corruptions: how much of the AUC borders explain
        rec["border_cue_auc"] = border_cue_auc(out["corrupted"], out["replaced"], args.patch_size)
    else:
        rec["respix_mse"] = out["respix_mse"].item()
    return rec


# ----------------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------------

def main(args):
    # ---------------------------------------------------------------- setup: checks, data, model, resume
    args = resolve_args(args)
    check_network(args)  # flags that contradict each other stop here, before any work
    rank, world_size, device = training.init_distributed(args.device, args.dist_backend)
    runs.prepare_output_dir(args.output_dir)
    runs.check_output_owner(args, "pretrain.py")  # before fitting a tokenizer for minutes
    announce(args, rank)
    tokenizer = setup_tokenizer(args, rank, device)
    train_set, loader, sampler, knn = build_data(args, tokenizer, rank, world_size)
    steps_per_epoch, total_steps, warmup_steps, total_batch = schedule(args, train_set, loader, world_size)
    tok_stats = {} if args.explain else check_tokenizer(tokenizer, train_set, args, device)
    if args.check_tokenizer:  # the start checks alone, as a tool
        print(json.dumps(tok_stats))
        return tok_stats
    model, ddp_model, optimizer, scaler, step, skips = build_training(args, tokenizer, rank, world_size, device)
    if args.explain:
        return explain(ddp_model, model, loader, optimizer, scaler, args, device)
    runs.record_args(args, rank, "pretrain.py")  # the flags, once every check has passed
    log = training.JsonLog(os.path.join(args.output_dir, "log.jsonl"), rank == 0, resumed_at=step)
    if rank == 0:
        print(f"{model_sizes(model)}, {total_steps} steps of {total_batch} images, lr {args.lr:.2e}")
        if step == 0:
            log.write(step=0, **tok_stats)
    if knn and args.knn_every and step == 0:
        log_knn(model, knn, log, step, args, device)

    # ---------------------------------------------------------------- training loop
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="cim", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < total_steps:
        # resume mid-epoch: the sampler replays the epoch's order from where the checkpoint left off
        epoch, steps_left, start = training.resume_point(step, steps_per_epoch, total_steps,
                                                         args.accum_iter * args.batch_size)
        sampler.set_epoch(epoch, start=start)
        batches = iter(loader)
        for _ in range(steps_left):
            lr = training.set_lr(optimizer, training.cosine_lr(step, total_steps, warmup_steps, args.lr, args.min_lr))
            micro = [next(batches)[0] for _ in range(args.accum_iter)]
            out, status = train_step(ddp_model, model, micro, optimizer, scaler, args, device)
            step += 1
            seen += total_batch
            bar.update(1)
            skips(status, step)  # stops the run past --max-skips
            if status != "skipped" and training.due(step, args.log_every, total_steps):
                rec = dict(step=step, epoch=epoch, lr=lr, **log_record(out, args), img_per_s=seen / (time.time() - t0),
                           peak_mem_mb=training.peak_memory_mb(device), **skips.state())
                bar.set_postfix({k: f"{rec[k]:.3f}" for k in ("loss_gen", "loss_enh") if k in rec})
                log.write(**rec)
            if rank == 0 and status != "skipped" and training.due(step, args.sample_every, total_steps):
                save_samples(out, micro[-1][0], args, os.path.join(args.output_dir, f"sample-{step:06d}.png"))
            stop = runs.stop_requested(device)  # SIGINT / SIGTERM on any rank: save now, then exit
            if stop or training.due(step, args.save_every, total_steps) or step % steps_per_epoch == 0:
                save_training_state(model, optimizer, scaler, skips, step, args, rank, device)
            if stop:
                runs.STOP.exit(step, os.path.join(args.output_dir, "checkpoint-latest.pth"), rank)
            if knn and args.knn_every and step % args.knn_every == 0 and step < total_steps:
                log_knn(model, knn, log, step, args, device)
    bar.close()

    # ---------------------------------------------------------------- finish: export, k-NN check
    return finish(model, knn, step, t0, log, args, rank, device)


def announce(args, rank):
    """What the run is, before anything slow: the recipe, and where the built-in data stands."""
    if rank != 0:
        return
    print(f"pretrain.py: recipe {args.recipe} (flags not given take its values; see --help)")
    if args.data is None:
        grid = args.img_size // args.patch_size
        print(f"pretrain.py: no --data: {args.arch} trains on the built-in procedural shapes at "
              f"{args.img_size} px, patch {args.patch_size} ({grid}x{grid} tokens), a CPU demo. The "
              f"paper's setting: --data /path/imagenet --dalle-encoder encoder.pkl --dalle-decoder "
              f"decoder.pkl (recipe imagenet: 224 px, patch 16, 300 epochs; docs/pretrain.md)")


def setup_tokenizer(args, rank, device):
    """The frozen (encoder, decoder): given, cached in OUTPUT_DIR/tokenizer, fitted now, or (--explain
    with none trained yet) an untrained stand-in. Seeds the run before and after: fitting one draws
    random numbers, and a run that finds it cached must start from the same RNG state as the run
    that fitted it."""
    training.seed_everything(args.seed, rank)
    if args.explain and not (args.dvae or args.dalle_encoder) and (
            args.tokenizer is None or cached_tokenizer(args) is None):
        kind = f"{args.tokenizer} tokenizer" if args.tokenizer else "DALL-E-sized dVAE"
        print(f"pretrain.py --explain: no trained tokenizer (none given, none in {args.output_dir}/"
              f"tokenizer): an UNTRAINED {kind} stands in. Shapes and flow are those of training; "
              f"tokens, samples and the corrupted image are noise until a tokenizer is trained (run "
              f"the same command without --explain once, or pass --dvae)")
        tokenizer = untrained_tokenizer(args, device)
    else:
        tokenizer = build_tokenizer(args, device)
    training.seed_everything(args.seed, rank)
    return tokenizer


def build_data(args, tokenizer, rank, world_size):
    """The training set and its resumable loader, and the k-NN check's sets and loaders (None
    without the check), all built and checked now: a missing val/ stops the run before training."""
    tok_size = args.img_size // args.patch_size * tokenizer[0].downsample  # the tokenizer's view: (S/P)*f px
    transform = data.PretrainTransform(args.img_size, tok_size, scale=(args.crop_min, 1.0),
                                       color_jitter=args.color_jitter)
    train_set = data.build_dataset(args.data, data.EVAL_SPLITS[args.eval_split][0], transform, seed=args.seed)
    knn_sets = knn_datasets(args) if args.knn_k and not args.explain else None
    loader, sampler = data.build_loader(train_set, args.batch_size, args.num_workers, rank, world_size,
                                        seed=args.seed)
    knn = knn_sets and (knn_sets, [data.build_eval_loader(ds, 128, 0, rank, world_size) for ds in knn_sets])
    return train_set, loader, sampler, knn


def schedule(args, train_set, loader, world_size):
    """(optimiser steps per epoch, total steps, warm-up steps, images per step); fills in --lr by
    the linear scaling rule and --min-lr (a constant schedule after the warm-up) where unset."""
    steps_per_epoch = len(loader) // args.accum_iter
    if steps_per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) is smaller than one step "
                         f"(--batch-size {args.batch_size} x --accum-iter {args.accum_iter} x "
                         f"{world_size} processes)")
    total_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * total_batch / 256  # MAE/BEiT linear scaling rule
    if args.min_lr is None:
        args.min_lr = args.lr
    return (steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch,
            int(args.warmup_epochs * steps_per_epoch), total_batch)


def build_training(args, tokenizer, rank, world_size, device):
    """(model, its DDP wrapper (the model itself in one process), AdamW, GradScaler, the step to
    start from, training.SkipCount), restored from a checkpoint where the run resumes one."""
    model = build_model(args, *tokenizer).to(device)
    groups = training.param_groups(model, args.weight_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.opt_betas), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, skips = resume(args, model, optimizer, scaler, rank, world_size, device)
    if args.compile:
        compile_in_place(model)
    ddp_model = model
    if world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, ddp_model, optimizer, scaler, step, skips


def model_sizes(model):
    parts = (("generator", model.generator), ("enhancer", model.enhancer)) if isinstance(model, CIM) else \
        (("BEiT backbone + head", model),)
    return ", ".join(f"{name} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params" for name, m in parts)


def save_training_state(model, optimizer, scaler, skips, step, args, rank, device):
    """OUTPUT_DIR/checkpoint-latest.pth: everything a bit-exact continuation needs. A collective (the
    RNG states of every rank): every rank calls it; rank 0 writes."""
    rng = training.gather_rng_states(device)
    if rank == 0:
        training.save_checkpoint(
            {"stage": "pretrain.py", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "step": step, **skips.state(), "args": vars(args), "rng": rng},
            os.path.join(args.output_dir, "checkpoint-latest.pth"), keep_previous=True)


def log_knn(model, knn, log, step, args, device):
    """The enhancer's k-NN now (--knn-every), without touching any RNG the run depends on."""
    (sets, loaders) = knn
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = training.knn_accuracy(model.backbone, *loaders, len(sets[0].classes), device, args.knn_k)
        layers = knn_layers(model.backbone, sets, loaders, args, device)
    log.write(step=step, knn=result["top1"], feature_rank=result["feature_rank"], **layers)


def knn_layers(backbone, sets, loaders, args, device):
    """--knn-blocks: {"knn_blocks" (ViT) or "knn_stages" (ResNet): k-NN top-1 after every block or
    stage}, else {}. The curves against steps show where the enhancer learns, and a last stage that
    peaks and then collapses onto what the RevDet head reads."""
    if not args.knn_blocks:
        return {}
    return training.knn_per_layer(backbone, *loaders, len(sets[0].classes), device, args.knn_k)


def finish(model, knn, step, t0, log, args, rank, device):
    """backbone.pth for the next stage, the k-NN check against its two floors, the last line."""
    if rank == 0:
        torch.save(export(model, args), os.path.join(args.output_dir, "backbone.pth"))
    result = {"steps": step, "minutes": (time.time() - t0) / 60}
    if knn:
        result.update(knn_report(model.backbone, *knn, args, device))
    if rank == 0:
        log.write(**result)
        print(json.dumps(result))
    training.finish_distributed()
    return result


def resume(args, model, optimizer, scaler, rank, world_size, device):
    """Restore everything a bit-exact continuation needs; returns (step, training.SkipCount)."""
    free = get_args_parser().resume_free
    path, ckpt = runs.find_resume_checkpoint(args, "pretrain.py", free, ("backbone.pth", "log.jsonl"))
    skips = training.SkipCount("pretrain.py", args.max_skips, args.output_dir, ckpt)
    if ckpt is None:
        return 0, skips
    saved = dict({"head_stages": 1}, **ckpt.get("args", {}))  # runs from before --head-stages: the 1x1 alone
    runs.check_same_network(saved, args, ("method", "arch", "objective", "img_size", "patch_size",
                                          "gen_dim", "gen_depth", "gen_heads", "resnet_stem", "head_width",
                                          "head_stages"), path)
    saved_vocab = next((v.shape[0] for k, v in ckpt["model"].items() if k.endswith("lm_head.weight")), None)
    if saved_vocab != model.vocab_size:
        raise ValueError(f"--resume {path!r} holds a token head for a {saved_vocab}-code tokenizer, this "
                         f"run's tokenizer has {model.vocab_size} codes: pass the tokenizer it "
                         f"was trained with (--dvae or --dalle-encoder/--dalle-decoder)")
    changed = runs.check_resume_flags(saved, vars(args), free, path,
                                      args.allow_flag_changes)
    training.restore_training_state(ckpt, model, optimizer, scaler, rank, world_size, device, path, changed)
    return ckpt["step"], skips


# ----------------------------------------------------------------------------------------------------
# The baseline (--method beit): BEiT's masked image modelling on the same backbone, data and tokenizer
# ----------------------------------------------------------------------------------------------------

class BEiT(nn.Module):
    """The baseline CIM is measured against (the paper compares CIM with BEiT): the enhancer's own
    backbone trained by BEiT's masked image modelling, with no generator and no corruption. Masked
    patch embeddings become a learnable mask token, and a linear head on each masked patch token
    predicts the frozen tokenizer's token. Same data, tokenizer, masks and steps as a CIM run; its
    backbone.pth goes to finetune.py and segment.py the same way: what CIM adds over BEiT at equal
    size and budget. forward has CIM.forward's signature, so train_step runs both."""

    def __init__(self, backbone, encoder, tokenizer_dtype=torch.float32):
        super().__init__()
        if not isinstance(backbone, enh.VisionTransformer):
            raise ValueError("--method beit needs a ViT --arch: a mask token cannot enter a CNN (which is why "
                             "CIM corrupts the image instead)")
        self.backbone, self.tokenizer, self.tokenizer_dtype = backbone, (encoder,), tokenizer_dtype
        self.grid, self.vocab_size = backbone.grid_size, encoder.vocab_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.num_features))
        self.lm_head = nn.Linear(backbone.num_features, encoder.vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head.apply(enh.init_vit_weights)

    def no_weight_decay(self):
        return {"mask_token"} | {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def forward(self, images, tok_images, mask, trace=no_trace):
        mask = mask.bool()
        tokens = dvae.tokenize(self.tokenizer[0], tok_images, self.tokenizer_dtype)  # (B, G, G), no grad
        check_token_grid(tokens, self.backbone, self.tokenizer[0], "backbone")
        tokens = tokens.flatten(1)                                    # (B, N)
        trace("tokens", tokens)
        x = self.backbone(images, mask, self.mask_token)[:, 1:]      # (B, N, D), masked patches -> [MASK]
        logits = self.lm_head(x[mask])                               # (M, V): masked positions only
        trace("logits", logits)
        loss = gen.BEiTGenerator.loss(logits, tokens[mask])
        trace("loss", loss)
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens[mask]).float().mean()
        return loss, dict(tokens=tokens, mask=mask, loss_gen=loss, acc_gen=acc)


# ----------------------------------------------------------------------------------------------------
# Flags: each once, with its check and recipe default
# ----------------------------------------------------------------------------------------------------

def get_args_parser():
    """Every flag once: its type and range check (runs.number), whether a resume may change it
    (free), and for [recipe] flags the default each recipe gives, listed in --help."""
    p, a, free = runs.stage_parser("pretrain.py", "CIM pre-training (generator + enhancer)", "out/pretrain",
                                   "checkpoints, log.jsonl, PNG grids, backbone", save_every=500, log_every=20)
    pos_int, pos_float, nonneg_int, nonneg_float = (runs.POS_INT, runs.POS_FLOAT, runs.NONNEG_INT,
                                                    runs.NONNEG_FLOAT)

    def r(name, help, resume_free=False, **kw):  # default from the recipe; --help shows every recipe's
        key = name[2:].replace("-", "_")
        values = ", ".join(f"{k} {v}" for k, v in ((k, RECIPES[k][key]) for k in RECIPES))
        (free if resume_free else a)(name, default=None, help=f"{help} [recipe: {values}]", **kw)

    a("--recipe", default=None, choices=list(RECIPES),
      help="defaults of every flag marked [recipe]: builtin (CPU minutes; the default without --data), "
           f"photos (the default for --data of images up to {data.PHOTOS_MAX_SIDE} px) or imagenet (the "
           "paper's ViT-B setting; the default for --data of larger images)")
    # what to train
    a("--method", default="cim", choices=["cim", "beit"],
      help="cim: generator + enhancer (the paper); beit: the baseline the paper compares with, the same "
           "backbone trained by BEiT's masked image modelling (mask token, token prediction), same data, "
           "tokenizer, masks and steps; its backbone.pth goes downstream like CIM's")
    r("--arch", f"enhancer backbone, one of {list(enh.ARCHS)}", choices=list(enh.ARCHS))
    r("--resnet-stem", "ResNet stem: imagenet (7x7 stride-2 conv + max-pool, torchvision's) or small (3x3 "
      "stride-1 conv, no max-pool, for 32-64 px images: a 32 px image ends in a 4x4 map, not 1x1; "
      "every key but conv1's shape stays torchvision's)", choices=["imagenet", "small"])
    a("--objective", default=None, choices=["revdet", "respix"],
      help="revdet (default): per-token 'was it replaced?' (BCE); respix: regress all original pixels")
    r("--img-size", "input size S", type=pos_int)
    r("--patch-size", "ViT patch P; the token grid is S/P", type=pos_int)
    a("--head-width", type=nonneg_int, default=0, help="ResNet RevDet head: 0 = the paper's 1x1 conv on the "
      "last stage; N = a 3x3 conv + BN + ReLU to N channels before it (docs/study.md: ResNet-18)")
    a("--head-stages", type=pos_int, default=None, help="ResNet RevDet head: 1 = the paper's, on the last "
      "stage; K = a 1x1 conv on each of the last K stages, their logits summed on the token grid [default: "
      f"{PHOTOS_RESNET_HEAD_STAGES} under the photos recipe, else 1; docs/study.md, ResNet-18]")
    a("--enh-weight", type=nonneg_float, default=1.0, help="lambda in L = L_gen + lambda * L_enh")
    r("--drop-path", "enhancer stochastic depth", type=runs.number(float, "in [0, 1)"))
    a("--init-values", type=pos_float, default=None, help="enhancer layer scale init (off by default)")
    # generator
    r("--gen-dim", "generator width", type=pos_int)
    r("--gen-depth", "generator blocks; the paper finds 4-6 best", type=pos_int)
    r("--gen-heads", "generator attention heads", type=pos_int)
    a("--mask-type", default=None, choices=["random", "block"],
      help="random: exact round(r*N) patches per image (CIM's choice; the default for --method cim); "
           "block: BEiT blockwise (the default for --method beit)")
    a("--mask-ratio", type=runs.number(float, "in (0, 1)"), default=None,
      help=f"fraction of patches the generator re-draws (the paper: 0.5); --method beit: the fraction "
           f"masked, {BEIT_MASKING['mask_ratio']:.3f} as BEiT's 75 of 196 (photos recipe: "
           f"{PHOTOS_BEIT_MASK_RATIO}) [recipe: " +
           ", ".join(f"{k} {v['mask_ratio']}" for k, v in RECIPES.items()) + "]")
    a("--mask-min-patches", type=pos_int, default=None,
      help="--mask-type block: fewest patches in one block; default BEiT's 16 of 196 scaled to the "
           "grid (5 on an 8x8 grid, where 16 would draw about one rectangle per image)")
    a("--sample", default="softmax", choices=["softmax", "argmax"],
      help="how replacement tokens are drawn; softmax sampling beats argmax in the paper")
    r("--temperature", "softmax temperature T for sampling", type=pos_float)
    # enhancer targets
    a("--norm-pix", default="window", choices=["none", "patch", "window"],
      help="ResPix target normalisation; window (per-pixel k x k statistics) is the paper's best")
    r("--norm-window", "odd window size k for --norm-pix window", type=pos_int)
    # tokenizer
    a("--dvae", default="", help="own tokenizer checkpoint from `python dvae.py`")
    a("--dalle-encoder", default="", help="OpenAI DALL-E encoder.pkl (official weights)")
    a("--dalle-decoder", default="", help="OpenAI DALL-E decoder.pkl (official weights)")
    r("--tokenizer", "dvae.py preset trained on the data first (and cached in OUTPUT_DIR/tokenizer) "
      "when no --dvae/--dalle-* is given: small (a dVAE) or kmeans (a patch codebook, seconds)",
      choices=["small", "kmeans"])
    free("--min-tokenizer-perplexity", type=nonneg_float, default=16.0,
         help="stop at start if the tokenizer's code perplexity on 512 training images is below this: "
              "a collapsed codebook makes every corruption trivial (0 = skip the check)")
    a("--tokenizer-dtype", default="auto", choices=["auto", *TOKENIZER_DTYPES],
      help="precision of the frozen dVAE's convolutions: auto = the --amp dtype (fp32 without AMP); "
           "a half type runs all but the logit / one-hot layers in it, channels-last on CUDA, as "
           "OpenAI's dall_e (token agreement with fp32: docs/tokenizer.md)")
    # data
    a("--data", default=None, help="ImageNet-layout root (DIR/train/<class>/*, DIR/val/...); omit to "
      "use the built-in procedural dataset")
    a("--eval-split", default="val", choices=["val", "select"],
      help="what the k-NN checks read: val (DIR/val/, for numbers you report) or select (a fixed "
           f"{100 * data.SELECT_FRACTION:.0f}%% of each class of train/, left out of training: for choosing "
           "settings without looking at val/)")
    r("--crop-min", "random-resized-crop min scale", type=runs.number(float, "in (0, 1]"))
    r("--color-jitter", "colour jitter strength (0 = off)", type=nonneg_float)
    # optimisation
    r("--epochs", f"training epochs (300 in the paper; photos recipe with a ResNet: {PHOTOS_RESNET_EPOCHS})",
      type=pos_int)
    a("--max-steps", type=pos_int, default=None, help="stop after this many optimiser steps (tests, "
      "benchmarks); schedules then span this many steps")
    r("--batch-size", "images per process per micro-step", type=pos_int)
    a("--accum-iter", type=pos_int, default=1, help="micro-steps per optimiser step (gradient accumulation)")
    a("--lr", type=pos_float, default=None, help="absolute peak lr; default blr * total_batch / 256")
    r("--blr", "base lr per 256 images (BEiT: 1.5e-3 at batch 2048)", type=pos_float)
    r("--min-lr", "final lr of the cosine schedule (None: constant at the peak lr)", type=nonneg_float)
    r("--warmup-epochs", "linear warm-up length", type=nonneg_float)
    r("--weight-decay", "AdamW weight decay (not on norms, biases, position embeddings, special "
      "tokens)", type=nonneg_float)
    r("--opt-betas", "AdamW betas", type=runs.number(float, "in [0, 1)"), nargs=2)
    a("--clip-grad", type=nonneg_float, default=3.0, help="max global grad norm (BEiT: 3.0; 0 = off)")
    a("--amp", default="none", choices=["bf16", "fp16", "none"],
      help="autocast dtype; bf16 on A100/H100 (fp16 needs the GradScaler and NaNs more often)")
    free("--max-skips", type=nonneg_int, default=20, help="stop after this many skipped steps (non-finite "
         "loss or gradients; fp16 overflows are counted apart); a few over 300 epochs are normal")
    a("--seed", type=runs.SEED, default=0, help="seed for data order, augmentation, masks and sampling")
    # more flags free on resume (runs.stage_parser adds output, logging, processes)
    free("--sample-every", type=pos_int, default=500, help="PNG grid every N optimiser steps")
    r("--num-workers", "DataLoader workers per process", type=nonneg_int, resume_free=True)
    r("--knn-k", "neighbours for the final k-NN check (0 = skip it)", type=nonneg_int, resume_free=True)
    free("--knn-every", type=nonneg_int, default=0, help="also log the enhancer's k-NN accuracy at step 0 "
         "and every N optimiser steps (0 = only at the end); the curve of k-NN against steps")
    free("--knn-blocks", action="store_true", help="the k-NN checks also read every ViT block or ResNet "
         "stage (knn_blocks / knn_stages in log.jsonl and the last line): where the enhancer learns")
    free("--compile", action="store_true", help="torch.compile the generator, the enhancer and the tokenizer")
    free("--check-tokenizer", action="store_true", help="run the start checks on the tokenizer (its code "
         "usage, and the border cue of its corruptions at --mask-ratio: docs/tokenizer.md), print them as "
         "one JSON line, exit")
    free("--explain", action="store_true", help="print every tensor of one step and draw it (a teaching "
         "aid), exit")
    return p


def resolve_args(args):
    """Fill unset flags from the recipe (see --recipe); the checks that involve more than one flag.
    (Each flag's own range is checked as it is parsed: runs.number.)"""
    if args.recipe is None:
        args.recipe = data.default_recipe(args.data)
    recipe = dict(RECIPES[args.recipe])
    arch = args.arch or recipe["arch"]
    if args.resnet_stem is not None and not arch.startswith("resnet"):
        raise ValueError(f"--resnet-stem applies to ResNets; --arch is {arch}: drop the flag")
    if args.objective is not None and args.method == "beit":
        raise ValueError("--objective is the CIM enhancer's loss; --method beit predicts the masked tokens and "
                         "has none: drop --objective")
    args.objective = args.objective or "revdet"
    resnet_revdet = args.method == "cim" and args.objective == "revdet" and arch.startswith("resnet")
    for flag, given in (("--head-width", args.head_width != 0), ("--head-stages", args.head_stages not in (None, 1))):
        if given and not resnet_revdet:
            raise ValueError(f"{flag} shapes a ResNet's RevDet head; this run has none: drop the flag")
    if args.head_stages is None:
        args.head_stages = PHOTOS_RESNET_HEAD_STAGES if args.recipe == "photos" and resnet_revdet else 1
    if args.recipe == "photos" and arch.startswith("resnet"):
        recipe["epochs"] = PHOTOS_RESNET_EPOCHS
    recipe.update(BEIT_MASKING if args.method == "beit" else dict(mask_type="random"))
    if args.method == "beit" and args.recipe == "photos":
        recipe["mask_ratio"] = PHOTOS_BEIT_MASK_RATIO
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.mask_min_patches is None:  # BEiT's 16 of 196, scaled to this grid
        args.mask_min_patches = max(1, round(16 * (args.img_size // args.patch_size) ** 2 / 196))
    if args.img_size % args.patch_size:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of --patch-size {args.patch_size}")
    if args.method == "beit" and args.arch.startswith("resnet"):
        raise ValueError(f"--method beit needs a ViT --arch, not {args.arch}: a mask token cannot enter a CNN "
                         f"(which is why CIM corrupts the image instead)")
    if args.method == "beit" and args.explain:
        raise ValueError("--explain draws CIM's step (generator, corruption, enhancer); --method beit has none")
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
        fitted_on = torch.load(args.dvae, map_location="cpu", weights_only=True, mmap=True).get("args", {})
        if "data" in fitted_on and not runs.same_value(fitted_on["data"], args.data):
            print(f"note: --dvae {args.dvae} was fitted on {fitted_on['data'] or 'the built-in data'}; this run "
                  f"trains on {args.data or 'the built-in data'} (its codes describe the images it was fitted on)")
    elif args.tokenizer:
        encoder, decoder = train_own_tokenizer(args)
    else:
        raise ValueError(f"recipe {args.recipe} needs a tokenizer: pass --dalle-encoder encoder.pkl "
                         f"--dalle-decoder decoder.pkl (OpenAI's DALL-E weights), --dvae CKPT (trained "
                         f"with `python dvae.py --data DIR --preset dalle`), or --tokenizer kmeans|small "
                         f"to fit one here first")
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # as dall_e on GPUs
    return tuple(m.to(device, memory_format=fmt).eval().requires_grad_(False) for m in (encoder, decoder))


def untrained_tokenizer(args, device):
    """A tokenizer of the kind and size this run would train (--tokenizer) or load (DALL-E's when the
    recipe names none), with random weights: what bench.py times and what --explain shows when no
    trained one exists yet. A random k-means codebook costs what a fitted one does."""
    if args.tokenizer == "kmeans":
        cfg = dvae.DVAE_PRESETS["kmeans"]
        codebook = torch.rand(cfg["vocab_size"], 3 * (cfg["patch_size"] + 2 * cfg["margin"]) ** 2)
        parts = dvae.build_patch_tokenizer(codebook, cfg["patch_size"], cfg["margin"])
    else:
        parts = dvae.build_from_config(dvae.DVAE_PRESETS[args.tokenizer or "dalle"])
    return tuple(m.to(device).eval().requires_grad_(False) for m in parts)


def own_tokenizer_flags(args):
    """dvae.fit_tokenizer's values for the tokenizer this run fits itself (--tokenizer PRESET on --data,
    in OUTPUT_DIR/tokenizer): what train_own_tokenizer fits it with and what cached_tokenizer holds a
    cached one to, in one place."""
    grid = args.img_size // args.patch_size
    return dict(output_dir=os.path.join(args.output_dir, "tokenizer"), preset=args.tokenizer,
                img_size=grid * dvae.preset_downsample(args.tokenizer), seed=args.seed, device=args.device,
                num_workers=args.num_workers, data=args.data)


TOKENIZER_KEY = ("preset", "data", "img_size")  # what makes a cached tokenizer this run's


def cached_tokenizer(args):
    """OUTPUT_DIR/tokenizer/checkpoint-latest.pth when an earlier run finished training it, else None.
    One made by other flags (another --tokenizer, --data or size) is refused by name, never reused."""
    flags = own_tokenizer_flags(args)
    ckpt = os.path.join(flags["output_dir"], "checkpoint-latest.pth")
    if not os.path.isfile(ckpt):
        return None
    cached, wanted = training.load_checkpoint(ckpt, "cached tokenizer"), vars(dvae.stage_args(**flags))
    made = cached.get("args", {})
    diff = [f"{runs.flag(k)} {made.get(k)!r}, not {wanted[k]!r}" for k in TOKENIZER_KEY
            if not runs.same_value(made.get(k), wanted[k])]
    if diff:
        raise ValueError(f"{ckpt} was fitted with other flags ({'; '.join(diff)}) than this run's --tokenizer "
                         f"{args.tokenizer} on --data {args.data}: delete {os.path.dirname(ckpt)} to fit it "
                         f"again, or use another --output-dir")
    return ckpt if cached["step"] >= cached["total_steps"] else None


def train_own_tokenizer(args):
    """No tokenizer given: train dvae.py's --tokenizer preset on the same data (every rank joins under
    torchrun), cached in OUTPUT_DIR/tokenizer so later runs and resumes reuse it."""
    ckpt = cached_tokenizer(args)
    if ckpt is None:  # absent or interrupted: (re)train
        flags = own_tokenizer_flags(args)
        print(f"pretrain.py: no tokenizer given: fitting dvae.py --preset {args.tokenizer} on "
              f"{args.data or 'the built-in data'} first (cached in {flags['output_dir']}; pass --dvae to use another)")
        ckpt = dvae.fit_tokenizer(**flags)
    return dvae.load_tokenizer(ckpt)


def check_tokenizer(tokenizer, train_set, args, device):
    """The start checks on 512 training images: code usage (stops on a collapsed codebook) and the
    border cue of this run's corruptions. Returns their numbers for the step-0 log record."""
    source = args.dvae or args.dalle_encoder or os.path.join(args.output_dir, "tokenizer")
    codes = tokenizer_sample(tokenizer[0], train_set, device)
    return dict(check_tokenizer_usage(codes, tokenizer[0].vocab_size, args.min_tokenizer_perplexity,
                                      what=f"tokenizer {source}"),
                **check_border_cue(codes, tokenizer[1], args))


@torch.no_grad()
def tokenizer_sample(encoder, dataset, device, n=512):
    """Tokens (n, G, G) of n training images spread over the dataset (fixed indices, per-sample
    augmentation seeds: every rank gets the same without a collective)."""
    indices = torch.linspace(0, len(dataset) - 1, min(n, len(dataset))).long().tolist()
    codes = []
    for chunk in torch.tensor(indices).split(64):
        tok_images = torch.stack([dataset[i][0][1] for i in chunk.tolist()]).to(device)
        codes.append(dvae.tokenize(encoder, tok_images))
    return torch.cat(codes)


def check_tokenizer_usage(codes, vocab_size, floor, what="the tokenizer"):
    """Code perplexity and usage of the tokenizer on the tokens of tokenizer_sample.

    A collapsed codebook (a few codes for every patch) gives the generator nothing to predict and the
    enhancer nothing to find: training goes on with 100% RevDet accuracy and learns nothing. Stop
    before that, naming the cause."""
    perplexity, usage = dvae.codebook_stats(codes.cpu(), vocab_size)
    stats = {"tokenizer_perplexity": perplexity, "tokenizer_usage": usage}
    print(f"pretrain.py: {what} uses {100 * usage:.1f}% of its {vocab_size} codes on "
          f"{len(codes)} training images, perplexity {perplexity:.1f}")
    if perplexity < floor:
        raise ValueError(f"{what} has collapsed: code perplexity {perplexity:.1f} (of "
                         f"{vocab_size} codes, {100 * usage:.1f}% in use) on {len(codes)} "
                         f"training images, below --min-tokenizer-perplexity {floor:g}. Retrain it "
                         f"(dvae.py: more steps, a larger --kl-weight) or pass "
                         f"--min-tokenizer-perplexity 0 to train on it anyway")
    return stats


@torch.no_grad()
def check_border_cue(codes, decoder, args, seed=0):
    """The border-cue check: how well border_jumps, a detector with no parameters, finds the replaced
    tokens of this run's corruptions. The tokens of tokenizer_sample are re-drawn at --mask-ratio
    (--mask-type) from their own code frequencies (what the generator samples after its first
    steps), decoded and resized to the input size as CIM.forward does; the AUC is of the enhancer's
    patch grid. Near 0.5: replacements are plausible at their borders and must be found from their
    content (the DALL-E decoder's case); near 1: the task is solved from patch borders, a shortcut
    (docs/tokenizer.md, "The border cue"). Its own RNG: the run's random stream is not touched."""
    n, G, _ = codes.shape
    if G != args.img_size // args.patch_size:
        return {}  # the first step refuses the grid by name (check_token_grid)
    g = torch.Generator(codes.device).manual_seed(seed)
    mask = gen.mask_patches(args.mask_type, n, G, args.mask_ratio, args.mask_min_patches,
                            device=codes.device, generator=g)                   # (n, N)
    freq = torch.bincount(codes.flatten(), minlength=decoder.vocab_size).float()
    drawn = torch.multinomial(freq, int(mask.sum()), replacement=True, generator=g)
    mixed = codes.flatten(1).masked_scatter(mask, drawn)                        # (n, N)
    replaced = mixed != codes.flatten(1)
    corrupted = torch.cat([dvae.decode(decoder, m.view(-1, G, G)) for m in mixed.split(64)])
    if corrupted.shape[-1] != args.img_size:
        corrupted = F.interpolate(corrupted, size=(args.img_size, args.img_size), mode="bilinear",
                                  align_corners=False)                          # (n, 3, S, S)
    auc = border_cue_auc(corrupted, replaced, args.patch_size)
    if auc is None:
        return {}
    local = local_cue_auc(corrupted, replaced, args.patch_size)
    print(f"pretrain.py: border cue: pixel jumps across patch borders alone find the replaced tokens "
          f"with ROC-AUC {auc:.3f} (local sharpness: {local:.3f}) on {n} training images "
          f"({100 * replaced.float().mean():.0f}% replaced; 0.5 = no cue, 1 = solved without looking at "
          f"content; docs/tokenizer.md)")
    return {"border_cue_auc": auc, "local_cue_auc": local}


# ----------------------------------------------------------------------------------------------------
# Feedback: PNG grids and --explain (it runs train_step and CIM.forward themselves)
# ----------------------------------------------------------------------------------------------------

def patch_map(values, grid, size):
    """(B, N) per-token values -> (B, 1, size, size) image (nearest upsampling)."""
    return F.interpolate(values.float().view(-1, 1, grid, grid), size=(size, size), mode="nearest")


def enhancer_view(out, objective, grid, size, n):
    """The enhancer's output as pictures: RevDet p(replaced) per token, ResPix the predicted image
    (min-max scaled per image)."""
    pred = out[:n].detach().float().cpu()
    if objective == "revdet":
        return patch_map(torch.sigmoid(pred), grid, size)
    lo, hi = pred.amin(dim=(1, 2, 3), keepdim=True), pred.amax(dim=(1, 2, 3), keepdim=True)
    return (pred - lo) / (hi - lo + 1e-6)


@torch.no_grad()
def save_samples(out, images, args, path, n=8):
    """Rows: original | generator input (masked patches grey) | corrupted | enhancer output
    (RevDet: p(replaced), then the true replaced map; ResPix: the prediction)."""
    images = data.denormalize(images[:n].float().cpu())
    S, G = images.shape[-1], args.img_size // args.patch_size
    masked = patch_map(out["mask"][:n].cpu(), G, S)
    if args.method == "beit":  # no corruption: what the backbone sees
        return data.save_grid([images, images * (1 - masked) + 0.5 * masked], path, ["original", "BEiT input"])
    rows = [images, images * (1 - masked) + 0.5 * masked, out["corrupted"][:n].float().cpu(),
            enhancer_view(out["out"], args.objective, G, S, n)]
    names = ["original", "generator input", "corrupted", "enhancer output"]
    if args.objective == "revdet":
        rows.append(patch_map(out["replaced"][:n].cpu(), G, S))
        names = names[:3] + ["p(replaced)", "replaced (label)"]
    data.save_grid(rows, path, names)


def describe(name, t):
    if isinstance(t, torch.Tensor):
        rng = f"[{t.float().min().item():.3g}, {t.float().max().item():.3g}]" if t.numel() else "[]"
        print(f"  {name:<42} {str(tuple(t.shape)):<18} {str(t.dtype).replace('torch.', ''):<8} {rng}")
    else:
        print(f"  {name}")


def explain(ddp_model, model, loader, optimizer, scaler, args, device):
    """One batch through one training step, each tensor in pipeline order as CIM.forward makes it
    (the paper's Fig. 1 as shapes), and OUTPUT_DIR/explain.png: the same step as pictures."""
    (images, tok_images), _ = next(iter(loader))
    batch = [(images[:4], tok_images[:4])]
    print("one CIM step, in the order pretrain.py runs it (train_step -> CIM.forward):")
    seen = {}

    def trace(name, value):
        describe(name, value)
        if isinstance(value, torch.Tensor):
            seen[name] = value.detach()

    hook = model.backbone.register_forward_hook(
        lambda module, inputs, output: describe("enhancer backbone: features", output))
    out, status = train_step(ddp_model, model, batch, optimizer, scaler, args, device, trace=trace)
    hook.remove()
    norm = lambda m: sum(p.grad.norm() ** 2 for p in m.parameters() if p.grad is not None) ** 0.5  # noqa: E731
    describe("grad norm after clipping, generator (L_gen only)", norm(model.generator))
    describe("grad norm after clipping, enhancer (L_enh only)", norm(model.enhancer))
    path = os.path.join(args.output_dir, "explain.png")
    save_explain(seen, model.generator.vocab_size, args, path)
    print(f"the same step as pictures: {path} (a column per image; rows: docs/walkthrough.md)")
    return {"loss": out["loss"].item(), "applied": status == "ok", "figure": path}


# the rows of explain.png, named after the numbered steps of CIM.forward that make them
# the rows of explain.png, each named after the step of CIM.forward that makes it (0: train_step's batch)
EXPLAIN_ROWS = ("0 original x", "1 tokens z", "2 generator input", "2 prediction (argmax)",
                "3 samples z'", "4 replaced (label)", "5 corrupted x~", "6 enhancer output")


@torch.no_grad()
def save_explain(seen, vocab_size, args, path):
    """explain.png from the tensors --explain traced: one column per image, one row per step.
    Token maps get a colour per code; in the prediction and sample rows the masked cells are at full
    brightness and the rest (kept from z) dimmed."""
    images = data.denormalize(seen["images"].float().cpu())
    B, S, G = images.shape[0], images.shape[-1], args.img_size // args.patch_size
    mask, tokens = seen["mask"].cpu(), seen["tokens"].cpu()
    palette = torch.rand(vocab_size, 3, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1

    def colours(codes, dim=False):  # (B, N) codes -> (B, 3, G, G); dim: unmasked cells at 35%
        rgb = palette[codes].permute(0, 2, 1).reshape(B, 3, G, G)
        return rgb * (0.35 + 0.65 * mask.float().view(B, 1, G, G)) if dim else rgb

    predicted = tokens.masked_scatter(mask, seen["logits"].float().cpu().argmax(-1))
    masked = patch_map(mask, G, S)
    rows = [images, colours(tokens), images * (1 - masked) + 0.5 * masked, colours(predicted, dim=True),
            colours(seen["mixed"].cpu(), dim=True), patch_map(seen["replaced"].cpu(), G, S),
            seen["corrupted"].float().cpu(), enhancer_view(seen["enhancer output"], args.objective, G, S, B)]
    names = list(EXPLAIN_ROWS[:-1]) + ["6 p(replaced)" if args.objective == "revdet" else "6 restored x"]
    data.save_grid(rows, path, names)


# ----------------------------------------------------------------------------------------------------
# Evaluation and export: weighted k-NN on pooled features, backbone weights under timm/torchvision names
# ----------------------------------------------------------------------------------------------------

def knn_datasets(args):
    """The k-NN check's train and val sets, built at start so a missing val/ split stops the run
    before training, not after it."""
    tf = data.EvalTransform(args.img_size, crop_pct=1.0)
    if args.eval_split == "val" and args.data is not None and not os.path.isdir(os.path.join(args.data, "val")):
        raise FileNotFoundError(f"--data {args.data}: no val/ split for the final k-NN check "
                                f"(expected {os.path.join(args.data, 'val', '<class>', '*')}); add "
                                f"one or pass --knn-k 0")
    train_set, val_set = (data.build_dataset(args.data, split, tf, seed=args.seed)
                          for split in data.EVAL_SPLITS[args.eval_split])
    data.check_same_classes(train_set, val_set, args.data)  # labels are indices into each set's folders
    data.check_readable(val_set, f"--data {args.data} {data.EVAL_SPLITS[args.eval_split][1]} set (k-NN check)")
    if args.data is None:  # a 4096-image memory bank keeps the CPU check to seconds
        train_set.length = 4096
    return train_set, val_set


def knn_report(backbone, knn_sets, loaders, args, device):
    """The run's evidence: k-NN accuracy of the pre-trained enhancer next to its two floors, the same
    architecture at random init (a random network's features already beat chance) and the
    mean-centred pixels of the same evaluation view (training.RawPixels), and the effective rank of
    both networks' features (training.effective_rank: near 1 is a collapsed representation)."""
    num_classes = len(knn_sets[0].classes)
    torch.manual_seed(args.seed)
    random_init = backbone_from_args(args).eval().to(device)
    ours, rand = (training.knn_accuracy(b, *loaders, num_classes, device, args.knn_k)
                  for b in (backbone, random_init))
    pixels = training.raw_pixel_knn(*loaders, num_classes, device, len(knn_sets[0]), args.img_size, args.knn_k)
    return {"knn_pretrained": ours["top1"], "knn_random_init": rand["top1"],
            "knn_raw_pixels": pixels, "knn_chance": 100.0 / num_classes,
            "rank_pretrained": ours["feature_rank"], "rank_random_init": rand["feature_rank"],
            **knn_layers(backbone, knn_sets, loaders, args, device)}


def export(model, args):
    """Enhancer backbone under timm (ViT) / torchvision (ResNet) names + what rebuilds it."""
    return {"model": enh.export_backbone(model.backbone),
            "arch": args.arch, "img_size": args.img_size, "patch_size": args.patch_size,
            "init_values": args.init_values, "args": vars(args)}


if __name__ == "__main__":
    runs.run_script(main, get_args_parser())
