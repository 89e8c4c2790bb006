"""The loop parts every CIM stage shares: processes, precision, schedule, checkpoints, logs, k-NN.

Every stage script (dvae.py's tokenizer training, pretrain.py, finetune.py, segment.py) runs the same
plumbing around its own step; it lives here once, written out plainly:

    init_distributed    torchrun's environment -> (rank, world_size, device); one CPU process without it
    autocast            one autocast context from the --amp flag (bf16 | fp16 | none)
    param_groups        AdamW groups: no weight decay on norms, biases, positions, tokens; layer decay
    cosine_lr           per-iteration linear warm-up + cosine schedule (poly_lr: segmentation's)
    save_checkpoint     atomic write (tmp file, fsync, rename); load_checkpoint reads weights_only=True
    get/set/gather_rng  every RNG stream a bit-exact resume needs, for every rank
    JsonLog             one JSON line per log interval; a resume cuts the lines written after the checkpoint
    number              an argparse type: a numeric flag checked where it is declared
    stage_parser        every stage's parser: one-line errors, the flags free to change on resume
    check_resume_flags  a resumed run must be the same command (or say that it changes flags)
    knn_classify        weighted k-NN on pooled features (Wu et al. 2018, as in DINO)
    all_gather_uneven   exact evaluation under DDP: every rank's part, no padding repeats
    optimizer_step      the end of every step: unscale, clip, one skip decision on all ranks, update;
                        SkipCount counts skipped steps against --max-skips (fp16 overflows apart)

Needs torch alone (tqdm in the stage scripts). Nothing model-specific: models come in as arguments.
"""
import argparse
import json
import math
import os
import pickle
import random
import resource
import subprocess

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

def save_checkpoint(state, path):
    """Write to `path.tmp`, fsync, then rename: a crash mid-save leaves the previous file intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) with an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{what} {path!r} could not be loaded ({type(err).__name__}: {err})") from None


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
            for line in lines:
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


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# what a stage raises when it refuses its input (a flag, a file, the data, a resume) or stops a
# diverged run: a one-line message for the user, not a bug report
REFUSALS = (ValueError, OSError, FloatingPointError, pickle.UnpicklingError)


def run_script(main, parser):
    """A stage script's entry point: parse the flags (a bad one is refused by argparse, one line),
    run main, and turn a refusal into one line too, `SCRIPT: error: MESSAGE`, exit status 2. The
    traceback is for bugs: any other exception keeps it, and CIM_DEBUG=1 shows it for refusals too."""
    args = parser.parse_args()
    try:
        return main(args)
    except REFUSALS as err:
        if os.environ.get("CIM_DEBUG"):
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def record_args(args, rank, stage):
    """Print the run's flags (once every check has passed) and keep them in OUTPUT_DIR/run.json: the
    record a later run in the same folder is checked against (find_resume_checkpoint)."""
    if rank == 0:
        print(f"git commit: {git_commit() or 'unknown'}")
        print(json.dumps(vars(args), indent=1, sort_keys=True))
        with open(os.path.join(args.output_dir, "run.json"), "w") as f:
            json.dump({"stage": stage, "args": vars(args)}, f, indent=1, sort_keys=True)


def checkpoint_stage(ckpt):
    """Which stage script wrote a checkpoint: its "stage" entry, or for files written before
    checkpoints carried one, what their keys give away."""
    if not isinstance(ckpt, dict):
        return "no stage script (not a checkpoint dict)"
    if "stage" in ckpt:
        return ckpt["stage"]
    model = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else {}
    if "encoder_config" in ckpt or ckpt.get("kind") == "kmeans":
        return "dvae.py"
    if "generator.lm_head.weight" in model:
        return "pretrain.py"
    if any(k.startswith("neck.backbone.") for k in model):
        return "segment.py"
    if any(k.startswith("backbone.") for k in model) and "head.weight" in model:
        return "finetune.py"
    if model and "optimizer" not in ckpt:
        return "an export (backbone.pth or classifier.pth), which holds no training state to resume"
    return "an unknown program"


def prepare_output_dir(path):
    """--output-dir as a writable folder, made if missing; a one-line refusal otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path!r} is a file, not a folder: pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output-dir {path!r} cannot be made ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir {path!r} is not writable: pass another folder")


def check_output_owner(args, stage):
    """Early and cheap (before a stage does minutes of work, e.g. fitting a tokenizer): a checkpoint to
    resume, or the run.json of --output-dir, written by another stage is refused now. The flags are
    compared later, once they are resolved (find_resume_checkpoint)."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-latest.pth")
    if os.path.isfile(path):
        try:  # memory-mapped: the tensors are not read
            wrote = checkpoint_stage(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception:
            return  # find_resume_checkpoint names the problem
        if wrote != stage:
            raise ValueError(f"--resume {path!r} was written by {wrote}, not {stage}: resume it with the program "
                             f"that wrote it, or give {stage} another --output-dir")
    elif not args.resume and os.path.isfile(os.path.join(args.output_dir, "run.json")):
        with open(os.path.join(args.output_dir, "run.json")) as f:
            owner = json.load(f).get("stage")
        if owner != stage:
            raise ValueError(f"--output-dir {args.output_dir!r} holds a {owner} run: give {stage} another --output-dir")


def find_resume_checkpoint(args, stage, free, outputs=()):
    """(path, checkpoint) to continue from: --resume if given (it must exist), else
    OUTPUT_DIR/checkpoint-latest.pth if a previous run left one, else (path, None): a fresh start.
    A checkpoint another stage wrote is refused, naming that stage. A fresh start must not overwrite
    another run's results: OUTPUT_DIR/run.json (the flags of the run that wrote the folder) must
    repeat this run's flags but the `free` ones, and a folder holding `outputs` without a run.json
    (written before run.json existed) is refused."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-latest.pth")
    if args.resume or os.path.isfile(path):
        ckpt = load_checkpoint(path, "--resume checkpoint")
        wrote = checkpoint_stage(ckpt)
        if wrote != stage:
            raise ValueError(f"--resume {path!r} was written by {wrote}, not {stage}: resume it with the program "
                             f"that wrote it, or give {stage} another --output-dir")
        return path, ckpt
    record = os.path.join(args.output_dir, "run.json")
    if os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f)
        if saved.get("stage") != stage:
            raise ValueError(f"--output-dir {args.output_dir!r} holds a {saved.get('stage')} run ({record}): "
                             f"give {stage} another --output-dir")
        check_resume_flags(saved["args"], vars(args), free, f"{record} (a finished or earlier run in "
                           f"--output-dir)", args.allow_flag_changes)
    else:
        found = [f for f in outputs if os.path.exists(os.path.join(args.output_dir, f))]
        if found:
            raise ValueError(f"--output-dir {args.output_dir!r} holds results of an earlier run ({', '.join(found)}) "
                             f"whose flags are unknown, and this run would overwrite them: use another "
                             f"--output-dir, or move them away")
    return path, None


def check_same_network(saved, args, keys, path):
    """A checkpoint of another network cannot be resumed at all, whatever the user allows: each of
    `keys` (flags that shape the model) must equal the checkpoint's."""
    for k in keys:
        if k in saved and saved[k] != getattr(args, k):
            raise ValueError(f"--resume {path!r} was trained with {flag(k)} {saved[k]}, this run has "
                             f"{getattr(args, k)}: use another --output-dir or the same flags")


def restore_training_state(ckpt, model, optimizer, scaler, rank, world_size, device, path, changed=()):
    """Model, optimiser, GradScaler and this rank's RNG streams from a checkpoint written by the
    stage's own loop; says so on rank 0 (naming flags the user chose to change)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng_states(ckpt["rng"], rank, world_size, device, path)
    if rank == 0:
        print(f"resumed from {path} at step {ckpt['step']}"
              + (f" with changed flags: {', '.join(flag(k) for k in changed)}" if changed else ""))


# ----------------------------------------------------------------------------------------------------
# Flags: checked where they are declared, and compared with a checkpoint's on resume
# ----------------------------------------------------------------------------------------------------

def flag(name):
    return "--" + name.replace("_", "-")


RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1)": lambda v: 0 <= v < 1,
         "in (0, 1)": lambda v: 0 < v < 1, "in (0, 1]": lambda v: 0 < v <= 1}


def number(cast, rule):
    """An argparse `type` that reads a number and holds it to `rule` (a key of RULES), so a flag's check
    is declared with the flag: `a("--lr", type=number(float, "> 0"))`. A NaN or out-of-range value
    stops the script before any work, with argparse's one-line error naming the flag."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole' if cast is int else 'a'} number, got {text!r}")
        if not (math.isfinite(value) and RULES[rule](value)):
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text}")
        return value
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its error on one line, `SCRIPT: error: MESSAGE`, and exit status 2 (the usage
    block that argparse prints first hides the message; --help still prints everything)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


POS_INT, POS_FLOAT = number(int, "> 0"), number(float, "> 0")
NONNEG_INT, NONNEG_FLOAT = number(int, ">= 0"), number(float, ">= 0")


def stage_parser(prog, description, output_dir, outputs, save_every, log_every):
    """The parser every stage script starts from: one-line errors (ArgumentParser), and a group of
    the flags a resumed run may change, with those every stage has (where output goes, how often it
    is written, how the processes run). Returns (parser, add, add_free): `add_free` adds a flag to
    that group and its name to parser.resume_free; any other flag must repeat the checkpoint's value
    (check_resume_flags)."""
    p = ArgumentParser(prog=prog, description=description)
    group = p.add_argument_group("free on resume (a resumed run may change these; any other flag must "
                                 "repeat the checkpoint's value)")
    p.resume_free = set()

    def add_free(*names, **kw):
        action = group.add_argument(*names, **kw)
        p.resume_free.add(action.dest)
        return action

    add_free("--output-dir", default=output_dir, help=outputs)
    add_free("--resume", default="", help="checkpoint to resume (default: OUTPUT_DIR/checkpoint-latest.pth)")
    add_free("--allow-flag-changes", action="store_true", help="resume although flags differ from the "
             "checkpoint's; without it a resume must repeat the command that wrote the checkpoint")
    add_free("--save-every", type=POS_INT, default=save_every, help="also checkpoint every N steps")
    add_free("--log-every", type=POS_INT, default=log_every, help="log every N steps")
    add_free("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    add_free("--dist-backend", default=None, help="torch.distributed backend (default: nccl on GPU, gloo)")
    add_free("--local-rank", "--local_rank", type=int, default=0,
             help="accepted for torch.distributed.launch; torchrun passes LOCAL_RANK in the environment")
    return p, p.add_argument, add_free


def check_resume_flags(saved, current, free, path, allow=False, allow_flag="--allow-flag-changes"):
    """A resumed run must be the command that wrote the checkpoint: any other flag would silently
    continue a different experiment under the old run's name (and overwrite its stored args).
    `free` names the flags that may change (where output goes, workers, logging intervals...).
    Returns the differing flags; raises unless `allow` (the user asked for it)."""
    diff = {k: (saved[k], current[k]) for k in sorted(set(saved) & set(current))
            if k not in free and saved[k] != current[k]}
    if diff and not allow:
        listed = "; ".join(f"{flag(k)} {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ValueError(f"{path} was written with other flags ({listed}). Use another --output-dir "
                         f"for a new run, the same flags to resume, or add {allow_flag} to resume "
                         f"with the new ones")
    return diff


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
