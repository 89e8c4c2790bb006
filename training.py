"""The loop parts every CIM stage shares: processes, precision, the step, schedules, exact resume, k-NN.

Every stage script (dvae.py's tokenizer training, pretrain.py, finetune.py, segment.py) runs the same
plumbing around its own step; it lives here once, written out plainly, and copies out alone (it needs
torch and nothing else of this project; tests/test_layout.py runs it so):

    init_distributed    torchrun's environment -> (rank, world_size, device); one CPU process without it
    autocast            one autocast context from the --amp flag (bf16 | fp16 | none)
    optimizer_step      the end of every step: unscale, clip, one skip decision on all ranks, update;
                        SkipCount counts skipped steps against --max-skips (fp16 overflows apart)
    param_groups        AdamW groups: no weight decay on norms, biases, positions, tokens; layer decay
    cosine_lr           per-iteration linear warm-up + cosine schedule (poly_lr: segmentation's)
    get/set/gather_rng  every RNG stream a bit-exact resume needs, for every rank
    save_checkpoint     atomic write (tmp file, fsync, rename), the previous one kept; a full disk named
    JsonLog             one JSON line per log interval; a resume cuts the lines written after the checkpoint
    knn_classify        weighted k-NN on pooled features (Wu et al. 2018, as in DINO)
    all_gather_uneven   exact evaluation under DDP: every rank's part, no padding repeats

The run bookkeeping around them (flags, one-line errors, the output folder's owner and lock, the
resume lookup, signals) is runs.py. Nothing model-specific: models come in as arguments.
"""
import errno
import json
import math
import os
import random
import resource
import shutil

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Processes and precision
# ----------------------------------------------------------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}


def init_distributed(device="auto", backend=None):
    """Process setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT:
    also multi-node through its rendezvous); without torchrun, one process. NCCL on GPUs, gloo on
    CPUs unless `backend` says otherwise. Returns (rank, world_size, device)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device, local_rank) if device == "cuda" else torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        torch.distributed.init_process_group(backend, rank=rank, world_size=world_size)
    return rank, world_size, device


def finish_distributed(owns_group=True):
    """End of a stage: every rank waits for the others (so nobody reads a checkpoint before rank 0
    has written it), then the process group is torn down. Leaving it to interpreter exit instead
    can abort a rank while gloo's threads still run ("terminate called without an active
    exception"). `owns_group=False` when a caller's group must outlive this stage."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if owns_group:
            torch.distributed.destroy_process_group()


def autocast(device, amp):
    """One autocast context for the whole forward; `amp` is the --amp flag (bf16|fp16|none)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {list(AMP_DTYPES)}, got {amp!r}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none")


def all_ranks_true(flag, device):
    """True on every rank iff `flag` (a bool tensor or float 0/1) is true on every rank. One
    collective and one host sync: stage loops take every skip/stop decision through it, so no rank
    steps (or waits in a collective) alone."""
    flag = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------------------
# The end of every stage's step: one update rule and one skip rule
# ----------------------------------------------------------------------------------------------------

def optimizer_step(model, optimizer, scaler, finite, clip_grad, device):
    """What every stage does after its backward: unscale, the global grad norm (clipped at
    `clip_grad`; measured anyway, for the log), one skip decision taken by all ranks together, the
    update. `finite`: this rank's loss was finite (a 0-dim tensor). The rule, the same everywhere:

        non-finite loss, or non-finite gradients in fp32 / bf16   no update on any rank: "skipped"
        fp16 gradients that overflow the GradScaler's scale        the scaler skips the update and
                                                                   halves its scale: "overflow"
                                                                   (routine calibration)
    The decision comes after backward, so every rank ran the same collectives, and a NaN on any rank
    skips the update everywhere, so the replicas stay identical. Skipping beats exiting: fp16 runs of
    the public MIM code die late in training on a single bad batch. Returns (grad_norm, status) with
    status "ok", "skipped" or "overflow"."""
    scaler.unscale_(optimizer)  # a no-op without fp16: the gradients are not scaled then
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or float("inf"))
    finite = torch.as_tensor(finite, dtype=torch.float32, device=device)
    if not scaler.is_enabled():  # under fp16 the scaler checks the gradients itself
        finite = finite * torch.isfinite(grad_norm)
    if not all_ranks_true(finite, device):
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update(scaler.get_scale() / 2)  # back off, as the GradScaler does on overflow
        return grad_norm, "skipped"
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return grad_norm, "overflow" if scaler.get_scale() < scale else "ok"


class SkipCount:
    """The stages' accounting of optimizer_step's status: "skipped" steps count toward --max-skips
    (past it the run stops, naming the step and the way out), fp16 "overflow" steps are counted
    apart and never stop a run. Both numbers go into checkpoints and the log."""

    def __init__(self, stage, max_skips, output_dir, ckpt=None):
        """ckpt: the checkpoint a run resumes from (its counts carry on), or None."""
        self.stage, self.max_skips, self.output_dir = stage, max_skips, output_dir
        self.skipped, self.overflows = ((ckpt or {}).get(k, 0) for k in ("skipped", "overflows"))

    def __call__(self, status, step):
        if status == "overflow":
            self.overflows += 1
        elif status == "skipped":
            self.skipped += 1
            print(f"{self.stage}: non-finite loss or gradients at step {step}, update skipped "
                  f"({self.skipped} so far)")
            if self.skipped > self.max_skips:
                raise FloatingPointError(
                    f"{self.stage}: {self.skipped} non-finite steps, the last at step {step}, more than "
                    f"--max-skips {self.max_skips}; lower --lr, use --amp bf16 or none, or resume from "
                    f"{os.path.join(self.output_dir, 'checkpoint-latest.pth')}")
        return status == "ok"

    def state(self):
        return {"skipped": self.skipped, "overflows": self.overflows}


def peak_memory_mb(device):
    """Peak CUDA memory allocated, or on a CPU the process max-RSS, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------
# Optimiser groups: weight decay where it belongs, layer-wise lr decay (BEiT)
# ----------------------------------------------------------------------------------------------------

def layer_id(name, num_layers):
    """Depth of a parameter for layer decay (BEiT): ViT patch embedding, cls token and positions 0,
    block k -> k+1; ResNet stem 0, stage s -> s; everything outside the backbone (heads, segment.py's
    pyramid and decoder) num_layers + 1. Backbone parameters are the ones named `...backbone.<name>`."""
    if "backbone." not in name:
        return num_layers + 1  # heads, necks
    name = name.split("backbone.", 1)[1]
    if name in ("cls_token", "pos_embed", "mask_token") or name.startswith(("patch_embed.", "conv1.", "bn1.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith("layer") and name[5].isdigit():
        return int(name[5])
    return num_layers + 1


def num_backbone_layers(backbone):
    """Blocks of a ViT, stages of a ResNet: the L of layer decay."""
    return len(backbone.blocks) if hasattr(backbone, "blocks") else backbone.num_stages


def param_groups(model, weight_decay, no_weight_decay=(), layer_decay=None, num_layers=0):
    """Optimiser groups, each with an "lr_scale" (a loop sets lr = schedule * lr_scale). No weight decay
    on 1-D tensors (norms, biases, layer scale, q/v bias) nor on the names in `no_weight_decay`
    (position embeddings, cls / mask tokens, the relative position table: BEiT / MAE). With
    `layer_decay`, one group per (layer, decay or not) at layer_decay ** (num_layers + 1 - layer_id);
    without, two groups at scale 1. Frozen parameters are left out."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in no_weight_decay)
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        key = (lid, not decay)  # within a layer the decayed group first
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr_scale": 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - lid)}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------

def cosine_lr(step, total_steps, warmup_steps, base_lr, final_lr, warmup_lr=0.0):
    """Per-iteration schedule: linear warm-up from warmup_lr (BEiT, MAE: 0; timm's RSB commands: 1e-4),
    then half a cosine down to final_lr."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer, lr):
    """Every group's lr for this step (a group's "lr_scale", layer decay's, multiplies it); returns lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def due(step, every, total_steps):
    """Whether something done every `every` steps (logging, samples, checkpoints) is due after
    `step`; the last step always is."""
    return step % every == 0 or step == total_steps


def resume_point(step, steps_per_epoch, total_steps, samples_per_step):
    """Where a run at optimiser step `step` stands: (epoch, steps left to run in it, the epoch's first
    sample not yet seen, for the sampler to start from). The arithmetic of every stage's loop, so a
    run resumed mid-epoch sees the same samples in the same order as one that never stopped."""
    epoch, offset = divmod(step, steps_per_epoch)
    return epoch, min(steps_per_epoch - offset, total_steps - step), offset * samples_per_step


def poly_lr(step, total_steps, warmup_steps, base_lr, final_lr=0.0, power=1.0, warmup_ratio=1e-6):
    """mmseg's schedule (segmentation): (base - final) * (1 - step/total)^power + final, scaled up
    linearly from warmup_ratio over the first warmup_steps."""
    lr = (base_lr - final_lr) * (1 - min(step, total_steps) / total_steps) ** power + final_lr
    if step < warmup_steps:
        lr *= 1 - (1 - step / warmup_steps) * (1 - warmup_ratio)
    return lr


# ----------------------------------------------------------------------------------------------------
# RNG state: every stream the code draws from, for every rank
# ----------------------------------------------------------------------------------------------------

def seed_everything(seed, rank=0):
    """Different streams per rank (masks and Gumbel noise must differ across GPUs), same per run."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def get_rng_state(device):
    """The RNG streams the code draws from (python `random`, torch CPU and CUDA), in types that
    `torch.load(weights_only=True)` accepts. Data augmentation has its own per-sample seeds."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device):
    """Every rank's RNG state (rank-ordered list) so a checkpoint written by rank 0 resumes all.
    A collective: every rank must call it."""
    state = get_rng_state(device)
    if not torch.distributed.is_initialized():
        return [state]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def restore_rng_states(states, rank, world_size, device, path):
    """This rank's stream from a checkpoint; a different world size restarts the streams (said)."""
    if len(states) == world_size:
        set_rng_state(states[rank], device)
    elif rank == 0:
        print(f"{path} was written by {len(states)} processes, this run has {world_size}: RNG streams "
              f"restart from the seed")


# ----------------------------------------------------------------------------------------------------
# Checkpoints and logs
# ----------------------------------------------------------------------------------------------------

def previous_path(path):
    """Where save_checkpoint(keep_previous=True) keeps the checkpoint it replaces:
    checkpoint-latest.pth -> checkpoint-latest.prev.pth."""
    root, ext = os.path.splitext(path)
    return root + ".prev" + ext


def tensor_bytes(obj):
    """Bytes of the tensors in a nested dict/list: about what torch.save writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(state, path, keep_previous=False):
    """Write to `path.tmp`, fsync, then rename: a crash mid-save leaves the previous file intact.
    keep_previous: the file it replaces becomes previous_path(path), the fallback when the new one
    turns out unreadable. A failed write (a full disk: torch says "basic_ios::clear") removes the
    partial file and says how much room the folder has."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        need, free = tensor_bytes(state), shutil.disk_usage(folder).free
        if free < 2 * need or getattr(err, "errno", None) == errno.ENOSPC:
            raise OSError(f"no space left on {folder} to save {os.path.basename(path)} (needs ~{need / 2 ** 20:.0f} "
                          f"MiB, free {free / 2 ** 20:.0f} MiB): free some room, then run the same command "
                          f"again to resume from the last checkpoint") from None
        raise OSError(f"could not write {tmp} ({type(err).__name__}: {err})") from None
    if keep_previous and os.path.exists(path):  # a second name for it: `path` itself never goes missing
        prev = previous_path(path)
        if os.path.exists(prev):
            os.remove(prev)
        try:
            os.link(path, prev)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, prev)
    os.replace(tmp, path)


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) with an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch's own message can run to 7 lines of weights_only advice: its first
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise ValueError(f"{what} {path!r} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{first[:200]}): pass a file written by this project's scripts or torch.save") from None


def last_log_record(path, key):
    """The last line of a JSON log that holds `key`, or None."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return next((r for r in reversed(records) if key in r), None)


class JsonLog:
    """One JSON object per line in `path` (rank 0 only), flushed at once so `tail -f` works.

    resumed_at=STEP: the run continues from a checkpoint of that step, so lines logged after it (by
    the run that crashed) are dropped first; otherwise the continuation would log those steps twice.
    """

    def __init__(self, path, enabled=True, resumed_at=None):
        self.file = None
        if not enabled:
            return
        if resumed_at is not None and os.path.isfile(path):
            with open(path) as f:
                lines = f.readlines()
            keep = []
            for line in lines if resumed_at > 0 else ():  # a fresh start (step 0) keeps nothing
                try:
                    if json.loads(line).get("step", 0) > resumed_at:
                        break
                except json.JSONDecodeError:  # a line cut short by the crash
                    break
                keep.append(line)
            if len(keep) < len(lines):
                with open(path + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def restore_training_state(ckpt, model, optimizer, scaler, rank, world_size, device, path, changed=()):
    """Model, optimiser, GradScaler and this rank's RNG streams from a checkpoint written by the
    stage's own loop; says so on rank 0 (naming flags the user chose to change)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_states(ckpt["rng"], rank, world_size, device, path)
    if rank == 0:
        print(f"resumed from {path} at step {ckpt['step']}"
              + (f" with changed flags: {', '.join('--' + k.replace('_', '-') for k in changed)}" if changed else ""))


# ----------------------------------------------------------------------------------------------------
# k-NN evaluation of pooled features (pretrain.py's check, finetune.py --mode knn)
# ----------------------------------------------------------------------------------------------------

def pooled_features(backbone, x, pool="avg"):
    """Global feature of a backbone: of a ViT's tokens (B, 1+N, D) the mean of the patch tokens (avg)
    or the cls token (cls; MAE's linear probe), of a CNN's map (B, C, H, W) the mean."""
    f = backbone(x)
    if f.ndim == 2:  # already one vector per image (RawPixels)
        return f
    if f.ndim == 4:
        return f.mean((2, 3))  # (B, C)
    return f[:, 1:].mean(1) if pool == "avg" else f[:, 0]  # (B, D)


def all_gather_uneven(t):
    """Concatenate a tensor from every rank along dim 0 when ranks hold different lengths (an exact
    evaluation split): lengths first, then equal-size padded copies, then the padding cut off."""
    if not torch.distributed.is_initialized():
        return t
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes),) + t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (exact evaluation counts); one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def extract_features(backbone, loader, device, pool="avg"):
    """L2-normalised pooled features and labels of every readable sample of `loader` (a
    data.build_eval_loader: each sample once), gathered from all ranks."""
    feats, labels = [], []
    for groups, _ in loader:
        for x, y in groups:
            feats.append(F.normalize(pooled_features(backbone, x.to(device), pool).float(), dim=1))
            labels.append(y.to(device))
    return all_gather_uneven(torch.cat(feats)), all_gather_uneven(torch.cat(labels))


def knn_classify(train_feats, train_labels, test_feats, num_classes, k=20, temperature=0.07):
    """Weighted k-NN (Wu et al. 2018, as in DINO): the k most cosine-similar training features vote
    with weight exp(sim / T). Features must be L2-normalised. Returns the votes (B, classes): argmax
    is the prediction, the top 5 give top-5 accuracy."""
    votes = []
    for chunk in test_feats.split(1024):
        sim = chunk @ train_feats.T                                # (b, n_train)
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)   # (b, k)
        v = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        v.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        votes.append(v)
    return torch.cat(votes)


def topk_correct(scores, labels, ks=(1, 5)):
    """Number of samples whose label is among the k highest scores, for each k (k capped at the
    number of classes)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (B, kmax)
    hit = top == labels[:, None]
    return [hit[:, :k].any(1).sum().item() for k in ks]


def knn_accuracy(backbone, train_loader, val_loader, num_classes, device, k=20, temperature=0.07,
                 ks=(1,), pool="avg", center=False):
    """Weighted k-NN of the backbone's pooled features (pooled_features), train -> val. Exact under
    DDP with data.build_eval_loader. center: subtract the training features' mean from both sets
    before the cosine similarity (RawPixels' floor is read so). Returns {"top1": %, ... one
    "top<k>" per k in `ks`, "feature_rank": effective_rank of the training features}."""
    was_training = backbone.training
    backbone.eval()
    tr_f, tr_y = extract_features(backbone, train_loader, device, pool)
    va_f, va_y = extract_features(backbone, val_loader, device, pool)
    backbone.train(was_training)
    if center:
        mean = tr_f.mean(0)
        tr_f, va_f = F.normalize(tr_f - mean, dim=1), F.normalize(va_f - mean, dim=1)
    votes = knn_classify(tr_f, tr_y, va_f, num_classes, k, temperature)
    result = {f"top{j}": 100.0 * c / len(va_y) for j, c in zip(ks, topk_correct(votes, va_y, ks))}
    return dict(result, feature_rank=effective_rank(tr_f))


@torch.no_grad()
def knn_per_layer(backbone, train_loader, val_loader, num_classes, device, k=20, temperature=0.07):
    """{"knn_blocks" (ViT) or "knn_stages" (ResNet): k-NN top-1 (%) of the feature after every block or
    stage}, train -> val, with the features of all of them taken in one pass over each loader. ViT: a
    LayerNorm without affine parameters on the block's tokens (the blocks' outputs are un-normalised;
    the backbone's own final norm belongs to the last block only), then the mean of the patch tokens.
    ResNet: the global average of the stage's map. Exact under DDP as training.knn_accuracy."""
    vit = hasattr(backbone, "blocks")  # a ViT (timm names); else a ResNet with num_stages
    layers = list(range(1, (len(backbone.blocks) if vit else backbone.num_stages) + 1))
    was_training = backbone.training
    backbone.eval()
    banks = []  # per loader: (one (n, D_l) feature bank per layer, labels (n,))
    for loader in (train_loader, val_loader):
        feats, labels = [[] for _ in layers], []
        for groups, _ in loader:
            for x, y in groups:
                for bank, out in zip(feats, backbone.get_layer_outputs(x.to(device), layers)):
                    pooled = (F.layer_norm(out, out.shape[-1:], eps=1e-6)[:, 1:].mean(1) if vit  # (B, D)
                              else out.mean((2, 3)))                                             # (B, C)
                    bank.append(F.normalize(pooled.float(), dim=1))
                labels.append(y.to(device))
        banks.append(([all_gather_uneven(torch.cat(f)) for f in feats],
                      all_gather_uneven(torch.cat(labels))))
    backbone.train(was_training)
    (train_feats, train_y), (val_feats, val_y) = banks
    top1 = []
    for t, v in zip(train_feats, val_feats):
        votes = knn_classify(t, train_y, v, num_classes, k, temperature)  # (n_val, classes)
        top1.append(100.0 * topk_correct(votes, val_y, (1,))[0] / len(val_y))
    return {"knn_blocks" if vit else "knn_stages": top1}


class RawPixels(torch.nn.Module):
    """The floor a pre-trained network's frozen features must beat: the evaluation view's normalised
    pixels themselves, (B, C, H, W) -> (B, C*H*W), for knn_accuracy(..., center=True)."""

    def forward(self, x):
        return x.flatten(1)


# the raw-pixel floor holds every training image's pixels: 1.28M ImageNet images at 224 px would take
# 3 * 224^2 * 4 bytes each, 770 GB, so above this it is left out
RAW_PIXELS_MAX_BYTES = 8 * 2 ** 30


def raw_pixel_knn(train_loader, val_loader, num_classes, device, n_train, img_size, k=20, temperature=0.07):
    """knn_accuracy's top-1 of RawPixels, mean-centred; None (and a line saying why) when the
    n_train training images of img_size px would exceed RAW_PIXELS_MAX_BYTES."""
    if n_train * 3 * img_size ** 2 * 4 > RAW_PIXELS_MAX_BYTES:
        print(f"knn_raw_pixels left out: {n_train} training images of {img_size} px would hold more than "
              f"{RAW_PIXELS_MAX_BYTES / 2 ** 30:.0f} GiB of pixels")
        return None
    return knn_accuracy(RawPixels(), train_loader, val_loader, num_classes, device, k, temperature,
                        center=True)["top1"]


def effective_rank(feats):
    """How many directions the features (N, D) really use: the participation ratio (sum l)^2 / sum l^2
    of the eigenvalues l of their correlation matrix, = D'^2 / ||C||_F^2 (the trace of C is D', the
    number of channels that vary). D' for uncorrelated channels, 1 when every channel moves with one
    shared direction. A collapse check: a pooled feature dominated by one direction still gives a
    k-NN, while a BatchNorm + SGD linear probe on it is badly conditioned and can fail to train.
    Sums run in float64 over row chunks, so no copy of the (N, D) features is made."""
    n, d = feats.shape
    if n < 2:
        return 0.0
    total = torch.zeros(d, dtype=torch.float64, device=feats.device)
    gram = torch.zeros(d, d, dtype=torch.float64, device=feats.device)
    for chunk in feats.split(65536):
        chunk = chunk.double()
        total += chunk.sum(0)
        gram += chunk.T @ chunk
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / (n - 1)  # (D, D)
    var = cov.diagonal()
    varies = var > 1e-12 * var.max()
    if not varies.any():
        return 0.0
    std = var[varies].sqrt()
    corr = cov[varies][:, varies] / torch.outer(std, std)  # (D', D')
    return float(varies.sum().item() ** 2 / corr.pow(2).sum().item())
