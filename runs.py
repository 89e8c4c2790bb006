"""Run bookkeeping: what makes a stage script safe to run, stop and run again in one --output-dir.

training.py holds the loop parts a reader copies (processes, precision, the step, schedules, exact
resume, k-NN); this file holds what keeps a run's folder honest around them:

    run_script          a stage's entry point: flags, the folder's lock, signals, refusals as one line
    claim_output_dir    --output-dir made, writable, and held by one run at a time (OUTPUT_DIR/run.lock)
    StopSignal          SIGINT / SIGTERM: checkpoint at the end of the step on every rank, then exit
    read_json           run.json, study.json...: unreadable files are named, with what to do
    write_text          an atomic write (tmp file, fsync, rename); write_json for records

Needs torch (through training.py) and the standard library.
"""
import argparse
import atexit
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

import training

# ----------------------------------------------------------------------------------------------------
# The entry point
# ----------------------------------------------------------------------------------------------------

def run_script(main, parser, writes=lambda args: True):
    """A stage script's entry point: parse the flags (a bad one is refused by argparse, one line), take
    --output-dir's lock when `writes(args)`, turn SIGINT / SIGTERM into a stop request (STOP), run main,
    and turn a refusal into one line too, `SCRIPT: error: MESSAGE`, exit status 2. The traceback is for
    bugs: any other exception keeps it, and CIM_DEBUG=1 shows it for refusals too."""
    args = parser.parse_args()
    STOP.prog = parser.prog
    try:
        if writes(args):
            prepare_output_dir(args.output_dir)
            claim_output_dir(args.output_dir, int(os.environ.get("RANK", 0)))
        STOP.install()
        return main(args)
    except REFUSALS as err:
        if os.environ.get("CIM_DEBUG"):
            raise
        parser.exit(2, f"{parser.prog}: error: {err}\n")


# ----------------------------------------------------------------------------------------------------
# One run per folder
# ----------------------------------------------------------------------------------------------------

LOCK_NAME = "run.lock"
LOCK_GRACE_S = 10  # an empty lock younger than this is a run that is just starting, not a dead one


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim_output_dir(path, rank=0):
    """Hold OUTPUT_DIR/run.lock (this process's PID and host inside) until the process exits: a second
    run in the same folder is refused at its start, before it can interleave checkpoints and logs with
    this one. A lock left by a process that no longer runs on this host is taken over, with a note.
    Only rank 0 holds it: the other ranks of a torchrun job belong to the same run."""
    if rank != 0:
        return
    lock = os.path.join(path, LOCK_NAME)
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    holder = f.read().split()
                age = time.time() - os.path.getmtime(lock)
            except FileNotFoundError:  # released in between: try again
                continue
            if holder == me.split():
                return  # this process holds it already (a stage called twice in one process)
            if len(holder) == 2 and holder[0].isdigit():
                pid, host = int(holder[0]), holder[1]
                if host != socket.gethostname() or pid_alive(pid):
                    raise ValueError(f"--output-dir {path!r} is in use by another run (PID {pid} on {host}, "
                                     f"{lock}): wait for it to end or use another --output-dir; if that run "
                                     f"is gone, delete {lock}")
                print(f"note: {lock} was left by PID {pid}, which no longer runs: taking the folder over",
                      file=sys.stderr)
            elif age < LOCK_GRACE_S:
                raise ValueError(f"--output-dir {path!r} is being claimed by another run that is starting "
                                 f"now ({lock}): use another --output-dir")
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        atexit.register(release_output_dir, lock, me)
        return
    raise ValueError(f"--output-dir {path!r}: could not take {lock} (other runs keep claiming it): use another "
                     f"--output-dir")


def release_output_dir(lock, me):
    try:
        with open(lock) as f:
            if f.read().split() == me.split():
                os.remove(lock)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------------
# Stopping on a signal without losing the steps since the last save
# ----------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job) are turned
    into a request that the stage loop reads once per step through `requested(device)`: every rank
    learns of it at the same step (one collective), the loop saves its checkpoint and calls
    `exit(step, path)`, which says so in one line and exits with the conventional status 128 + signal
    (130 for SIGINT, 143 for SIGTERM). A second signal stops the process at once."""

    def __init__(self, prog):
        self.prog, self.signum = prog, None

    def install(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:  # the second one: stop now, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{self.prog}: {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
              f"stopping (send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, device):
        """True on every rank once any rank got a signal (a collective: every rank calls it each step).
        One process: the flag itself, no tensor and no host sync in the step."""
        if not torch.distributed.is_initialized():
            return self.signum is not None
        return not training.all_ranks_true(self.signum is None, device)

    def exit(self, step, path, rank=0):
        signum = self.signum or signal.SIGTERM  # (a rank the signal did not reach ends as a SIGTERM would)
        name = signal.Signals(self.signum).name if self.signum else "another rank's signal"
        if rank == 0:
            print(f"\n{self.prog}: stopped by {name} at step {step}; {path} holds it, "
                  f"and the same command resumes from there", file=sys.stderr, flush=True)
        training.finish_distributed()
        raise SystemExit(128 + signum)


STOP = StopSignal(os.path.basename(sys.argv[0]) or "python")  # what the stage loops read


def stop_requested(device):
    return STOP.requested(device)


# ----------------------------------------------------------------------------------------------------
# The folder's record and the resume: which run wrote it, with which flags, where to continue
# ----------------------------------------------------------------------------------------------------

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# what a stage raises when it refuses its input (a flag, a file, the data, a resume) or stops a
# diverged run: a one-line message for the user, not a bug report
REFUSALS = (ValueError, OSError, FloatingPointError, pickle.UnpicklingError)


def record_args(args, rank, stage):
    """Print the run's flags (once every check has passed) and keep them in OUTPUT_DIR/run.json: the
    record a later run in the same folder is checked against (find_resume_checkpoint)."""
    if rank == 0:
        print(f"git commit: {git_commit() or 'unknown'}")
        print(json.dumps(vars(args), indent=1, sort_keys=True))
        write_json({"stage": stage, "args": vars(args)}, os.path.join(args.output_dir, "run.json"))


def read_run_record(output_dir):
    """OUTPUT_DIR/run.json ({"stage", "args"}), or None; an unreadable one is named with what to do."""
    path = os.path.join(output_dir, "run.json")
    if not os.path.isfile(path):
        return None
    return read_json(path, ("stage", "args"), fix=f"delete it if the run in {output_dir} is gone or was "
                          f"never started, or use another --output-dir")


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
            return  # find_resume_checkpoint names the problem (or falls back to the previous checkpoint)
        if wrote != stage:
            raise ValueError(f"--resume {path!r} was written by {wrote}, not {stage}: resume it with the program "
                             f"that wrote it, or give {stage} another --output-dir")
    elif not args.resume:
        saved = read_run_record(args.output_dir)
        if saved is not None and saved["stage"] != stage:
            raise ValueError(f"--output-dir {args.output_dir!r} holds a {saved['stage']} run: give {stage} another "
                             f"--output-dir")


def load_resume_checkpoint(path):
    """(path, checkpoint) from `path`, or, when `path` cannot be read (cut short by a crash, a full disk
    or a copy), from the one save_checkpoint kept before it, saying so."""
    try:
        return path, training.load_checkpoint(path, "--resume checkpoint")
    except ValueError as err:
        prev = training.previous_path(path)
        if not os.path.isfile(prev):
            raise ValueError(f"{err}; no previous checkpoint ({prev}) to fall back to: delete it to start "
                             f"again from step 0") from None
        ckpt = training.load_checkpoint(prev, "the previous checkpoint")
        print(f"note: {err}; resuming from the previous checkpoint {prev} (step {ckpt.get('step')})",
              file=sys.stderr)
        return prev, ckpt


def saved_work(output_dir, outputs):
    """What in --output-dir a fresh start would overwrite: the `outputs` files an earlier run left, its
    log only where it got past step 0 (a run stopped by a bad flag at the start saved nothing)."""
    found = [f for f in outputs if f != "log.jsonl" and os.path.exists(os.path.join(output_dir, f))]
    last = training.last_log_record(os.path.join(output_dir, "log.jsonl"), "step") if "log.jsonl" in outputs else None
    return found + (["log.jsonl"] if last and last["step"] > 0 else [])


def find_resume_checkpoint(args, stage, free, outputs=()):
    """(path, checkpoint) to continue from: --resume if given (it must exist), else
    OUTPUT_DIR/checkpoint-latest.pth if a previous run left one (or the previous save, when that one is
    unreadable), else (path, None): a fresh start. A checkpoint another stage wrote is refused, naming
    that stage. A fresh start must not overwrite an earlier run's work: with `outputs` of an earlier run
    (a log past step 0 among them) in the folder, OUTPUT_DIR/run.json must repeat this run's flags but
    the `free` ones, and results without a checkpoint to continue from (a finished run's last checkpoint
    removed, or a folder written before run.json existed) are refused."""
    path = args.resume or os.path.join(args.output_dir, "checkpoint-latest.pth")
    if args.resume or os.path.isfile(path):
        path, ckpt = load_resume_checkpoint(path)
        wrote = checkpoint_stage(ckpt)
        if wrote != stage:
            raise ValueError(f"--resume {path!r} was written by {wrote}, not {stage}: resume it with the program "
                             f"that wrote it, or give {stage} another --output-dir")
        return path, ckpt
    saved, work = read_run_record(args.output_dir), saved_work(args.output_dir, outputs)
    if saved is not None and saved["stage"] != stage:
        raise ValueError(f"--output-dir {args.output_dir!r} holds a {saved['stage']} run "
                         f"({os.path.join(args.output_dir, 'run.json')}): give {stage} another --output-dir")
    results = [f for f in work if f != "log.jsonl"]
    if saved is None and work or results:
        raise ValueError(f"--output-dir {args.output_dir!r} holds results of an earlier run ({', '.join(work)}) "
                         f"and no checkpoint to continue it from, so this run would overwrite them: use another "
                         f"--output-dir, or move them away")
    if work:  # a log of steps: the same run, started again from step 0, or a refusal
        check_resume_flags(saved["args"], vars(args), free, f"{os.path.join(args.output_dir, 'run.json')} (an "
                           f"earlier run in --output-dir)", args.allow_flag_changes)
    return path, None


def check_same_network(saved, args, keys, path):
    """A checkpoint of another network cannot be resumed at all, whatever the user allows: each of
    `keys` (flags that shape the model) must equal the checkpoint's."""
    for k in keys:
        if k in saved and saved[k] != getattr(args, k):
            raise ValueError(f"--resume {path!r} was trained with {flag(k)} {saved[k]}, this run has "
                             f"{getattr(args, k)}: use another --output-dir or the same flags")


# ----------------------------------------------------------------------------------------------------
# Flags: checked where they are declared, and compared with a checkpoint's on resume
# ----------------------------------------------------------------------------------------------------

def flag(name):
    return "--" + name.replace("_", "-")


RULES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 2**32)": lambda v: 0 <= v < 2 ** 32, "in [0, 1)": lambda v: 0 <= v < 1,
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
SEED = number(int, "in [0, 2**32)")  # numpy's seeds end at 2**32 - 1


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


def same_value(a, b):
    """Flag values equal as the run sees them: two spellings of one existing path (relative, a
    trailing slash, a link) are the same."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and (os.path.exists(a) or os.path.exists(b)):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def check_resume_flags(saved, current, free, path, allow=False, allow_flag="--allow-flag-changes"):
    """A resumed run must be the command that wrote the checkpoint: any other flag would silently
    continue a different experiment under the old run's name (and overwrite its stored args).
    `free` names the flags that may change (where output goes, workers, logging intervals...).
    Returns the differing flags; raises unless `allow` (the user asked for it)."""
    diff = {k: (saved[k], current[k]) for k in sorted(set(saved) & set(current))
            if k not in free and not same_value(saved[k], current[k])}
    if diff and not allow:
        listed = "; ".join(f"{flag(k)} {old!r} -> {new!r}" for k, (old, new) in diff.items())
        raise ValueError(f"{path} was written with other flags ({listed}). Use another --output-dir "
                         f"for a new run, the same flags to resume, or add {allow_flag} to resume "
                         f"with the new ones")
    return diff


# ----------------------------------------------------------------------------------------------------
# JSON records: written atomically, unreadable ones named
# ----------------------------------------------------------------------------------------------------

def write_text(path, text):
    """Write a temp file in the same folder, fsync, rename over `path`: readers (and a process that
    dies here) see the old file or the new one, never a cut line; a failed write leaves no temp file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path):
    write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path, needs=(), fix="delete it if the run it describes is gone, or use another --output-dir"):
    """A JSON object from `path`, holding every key of `needs`; a one-line ValueError naming the file
    and `fix` when it is empty, cut short, or not such an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({'empty' if os.path.getsize(path) == 0 else err}): {fix}") from None
    if not isinstance(obj, dict) or any(k not in obj for k in needs):
        missing = [k for k in needs if not isinstance(obj, dict) or k not in obj]
        raise ValueError(f"{path} is not a record of this project (a JSON object with "
                         f"{', '.join(repr(k) for k in missing) or 'keys'} expected): {fix}")
    return obj
