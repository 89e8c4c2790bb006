"""study.py: does CIM learn? Pre-training against scratch, and the paper's ablations, cell by cell.

Every number comes from the stage scripts themselves (dvae.py, pretrain.py, finetune.py, segment.py)
run as subprocesses with the flags listed below; this file only plans the runs, skips the ones
already in OUTPUT_DIR/results.jsonl (so an interrupted study resumes cell by cell), and turns the
results into tables.

    python study.py --list                                   # the plan, and what is done
    python study.py                                          # built-in data, every cell not yet done
    python study.py --data PHOTOS --output-dir out/study-photos   # any ImageNet-layout folder
    OMP_NUM_THREADS=1 python study.py --jobs 2               # two cells at a time on 2 cores
    python study.py --report                                 # docs/study.md's tables, from results.jsonl
    python study.py --plot docs/study-knn-builtin.png        # k-NN against pre-training steps
    python study.py --cells respix-vit argmax --seeds 2      # a third seed for chosen pre-training cells
    python study.py --only main --seeds 2                    # one group (downstream included), seed 2
    python study.py --pretrain-flags="--max-steps 512"       # extra flags for every run of a stage

One tokenizer per seed (the built-in data: dvae.py's small preset; --data: the k-means codebook),
trained first with that seed and shared by the seed's pre-training runs: a second seed varies the
whole pipeline, as a second hand-run pretrain.py (which fits its own) does. A pre-training cell is
one pretrain.py run (its last line: k-NN of the pre-trained enhancer and of the same network at
random init); a downstream cell (linear probe, fine-tuning, segmentation) runs on that cell's
backbone.pth and on `--init scratch` with the same flags.

An --output-dir holds one study: OUTPUT_DIR/study.json keeps what defines it (--data, --seg-data,
--eval-split and the four --*-flags), and a run with other values there is refused (use another
--output-dir). A cell is done when results.jsonl holds its record with the very command the plan
gives it now; a record of the same cell with other flags (study.py's budget or a cell changed since)
is refused before any work, naming the line to delete to run it again.
"""
import contextlib
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import torch

import runs

REPO = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# The plan: pre-training settings (flags on top of pretrain.py's recipe) and what runs on each
# ----------------------------------------------------------------------------------------------------

PRETRAIN = {  # name -> (group, flags)
    "revdet-vit": ("main", ["--objective", "revdet"]),
    "respix-vit": ("main", ["--objective", "respix"]),
    # the baseline the paper compares with: the same ViT by BEiT's masked image modelling, with BEiT's
    # own masking (pretrain.py --method beit: blockwise, 75 of 196, the min block scaled to the grid)
    "beit-vit": ("main", ["--method", "beit"]),
    "revdet-resnet18": ("main", ["--objective", "revdet", "--arch", "resnet18"]),
    "respix-resnet18": ("main", ["--objective", "respix", "--arch", "resnet18"]),
    "mask-0.3": ("mask ratio", ["--mask-ratio", "0.3"]),
    "mask-0.5": ("mask ratio", ["--mask-ratio", "0.5"]),
    "mask-0.7": ("mask ratio", ["--mask-ratio", "0.7"]),
    "argmax": ("sampling", ["--sample", "argmax"]),
    "respix-norm-none": ("respix normalisation", ["--objective", "respix", "--norm-pix", "none"]),
    "respix-norm-patch": ("respix normalisation", ["--objective", "respix", "--norm-pix", "patch"]),
    "gen-depth-4": ("generator depth", ["--gen-depth", "4"]),
}
# the reference each ablation is read against (the same recipe) and the pretrain.py setting it varies;
# an ablation cell that the recipe already is on this data (mask 0.5 under the imagenet recipe) is not
# run twice: the reference is that row
BASELINE = {"mask ratio": "revdet-vit", "sampling": "revdet-vit", "generator depth": "revdet-vit",
            "respix normalisation": "respix-vit"}
ABLATED = {"mask ratio": "mask_ratio", "sampling": "sample", "generator depth": "gen_depth",
           "respix normalisation": "norm_pix"}
DOWNSTREAM = {  # name -> (script, flags, metric in its last JSON line); run for the "main" cells
    "linear": ("finetune.py", ["--mode", "linear"], "top1"),
    "finetune": ("finetune.py", [], "top1"),
    "segment": ("segment.py", [], "mIoU"),
    # where in the network the features are: k-NN of every block (ViT) or stage (ResNet); its scratch
    # cell reads the random-init network the same way
    "blocks": ("finetune.py", ["--mode", "knn", "--knn-blocks"], "top1"),
}
SPLIT_AWARE = ("pretrain.py", "finetune.py")  # the scripts that take --eval-split
# The study's budget: every run is cut to a fixed number of optimiser steps, the same on any data,
# so one dataset's study takes about an hour on 2 CPU cores (two 1-thread runs at a time). Flags
# given with --pretrain-flags etc. come after these and win.
BUDGET = {
    "pretrain.py": ["--max-steps", "128", "--batch-size", "64", "--warmup-epochs", "0.25"],
    "linear": ["--max-steps", "32", "--warmup-epochs", "0.25"],
    "finetune": ["--max-steps", "96", "--warmup-epochs", "0.25"],
    "segment": ["--iters", "120", "--warmup-iters", "12"],
}
# the k-NN-against-steps plot (study.py --plot); the ResNet's per stage, where a last stage that peaks and
# then collapses onto the RevDet head's few numbers shows (the report's "k-NN per stage against steps")
KNN_CURVE = {"revdet-vit": ["--knn-every", "32"], "revdet-resnet18": ["--knn-every", "32", "--knn-blocks"]}


def budget(args, task):
    """The flags --budget adds to a run of `task` (a DOWNSTREAM key or "pretrain.py"). study: the
    step cut of BUDGET, and every downstream stage in its builtin recipe (the CPU-minutes one, on any
    data). recipe (the fair protocol, docs/study.md): nothing, so each run is as long as its recipe and
    each downstream stage takes the recipe it picks for the data (photos: finetune.py's 10 epochs with
    layer decay for a pre-trained ViT, 30 without it from scratch)."""
    if args.budget == "recipe":
        return []
    return BUDGET["pretrain.py"] if task == "pretrain.py" else ["--recipe", "builtin"] + BUDGET.get(task, [])


def ablation_values(args, group):
    """{cell: value of the pretrain.py flag that ablation `group` varies} for the group's reference
    cell and its own cells, as pretrain.py resolves them on this study's data (the flags given,
    then the recipe's), each resolved once."""
    import pretrain  # torch and the stage scripts: only for planning, never to train
    values = {}
    for name in [BASELINE[group]] + [n for n, (g, _) in PRETRAIN.items() if g == group]:
        a = pretrain.get_args_parser().parse_args((["--data", args.data] if args.data else []) + PRETRAIN[name][1])
        pretrain.resolve_args(a)
        values[name] = getattr(a, ABLATED[group])
    return values


def plan(args):
    """Every cell, in run order: (key, script, flags, metric, needs). `needs` names the pre-training
    cell whose backbone a downstream cell starts from (None: it is scratch or pre-training)."""
    cells = []
    values = {g: ablation_values(args, g) for g in BASELINE if BASELINE[g] in PRETRAIN
              and (not args.only or g in args.only)}
    for name, (group, flags) in PRETRAIN.items():
        if (args.only and group not in args.only) or (args.cells and name not in args.cells):
            continue
        if group in values and values[group][name] == values[group][BASELINE[group]]:
            continue  # the recipe's own value: the reference row already is this cell
        for seed in args.seeds:
            cells.append((f"pretrain/{name}/s{seed}", "pretrain.py",
                          flags + KNN_CURVE.get(name, []) + budget(args, "pretrain.py") + ["--seed", str(seed)],
                          "knn", None))
    for name, (group, flags) in PRETRAIN.items():
        if group != "main" or (args.only and "main" not in args.only) or (args.cells and name not in args.cells):
            continue
        arch = dict(zip(flags[::2], flags[1::2])).get("--arch", "vit_mini")
        for task, (script, extra, metric) in DOWNSTREAM.items():
            if args.tasks and task not in args.tasks:
                continue
            extra = extra + budget(args, task)
            for seed in args.seeds:
                cells.append((f"{task}/{name}/s{seed}", script, extra + ["--seed", str(seed)], metric,
                              f"pretrain/{name}/s{seed}"))
                scratch = f"{task}/scratch-{arch}/s{seed}"
                if scratch not in {c[0] for c in cells}:
                    cells.append((scratch, script, extra + ["--init", "scratch", "--arch", arch, "--seed", str(seed)],
                                  metric, None))
    return cells


# ----------------------------------------------------------------------------------------------------
# The study's folder: what defines it (study.json) and what is done (results.jsonl), both replaced
# whole, never appended to: a study killed mid-write leaves the old file or the new one
# ----------------------------------------------------------------------------------------------------

# what makes two runs one study (a field of study.json -> its flag); --seeds, --only and --cells only
# choose which of its cells run
STUDY_FIELDS = {"data": "--data", "seg_data": "--seg-data", "eval_split": "--eval-split",
                "dvae_flags": "--dvae-flags", "pretrain_flags": "--pretrain-flags",
                "finetune_flags": "--finetune-flags", "segment_flags": "--segment-flags"}


def read_results(path):
    """{cell: record} from results.jsonl. A line that is not a JSON record (results.jsonl was appended
    to before study.py wrote it whole, so a killed study could cut one) is refused with its number:
    the study cannot tell which cells it held."""
    if not os.path.isfile(path):
        return {}
    done = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # holds no cell: nothing to redo
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record = err
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {n} is not a JSON record ({line.strip()[:60]!r}: a write cut "
                                 f"short?): delete that line and run the study again, which reruns its cell")
            if "cell" in record:
                done[record["cell"]] = record
    return done


def add_result(path, record):
    """results.jsonl with `record` added (or put in place of its cell's), replaced whole; read again
    first, so a record another writer added meanwhile is kept."""
    done = read_results(path)
    done[record["cell"]] = record
    runs.write_text(path, "".join(json.dumps(r) + "\n" for r in done.values()))


def read_study(output_dir):
    """OUTPUT_DIR/study.json as a dict, or None where the folder holds no study yet."""
    path = os.path.join(output_dir, "study.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        saved = err
    if not isinstance(saved, dict) or set(saved) != set(STUDY_FIELDS):
        raise ValueError(f"{path}: not the record of a study's flags ({str(saved).splitlines()[0][:80]}): restore "
                         f"it, or delete it and the next run keys --output-dir {output_dir} to its own flags")
    return saved


def shown(field, value):
    if field.endswith("_flags"):
        return f'{STUDY_FIELDS[field]}="{shlex.join(value)}"'
    return f"{STUDY_FIELDS[field]} {value}" if value is not None else f"no {STUDY_FIELDS[field]} (built-in data)"


def study_changes(args, saved):
    """'--data A, not --data B'-style differences between this run's study and the folder's."""
    return [f"{shown(k, saved[k])}, not {shown(k, getattr(args, k))}" for k in STUDY_FIELDS
            if saved is not None and saved[k] != getattr(args, k)]


def check_study(args):
    """Refuse a run whose study differs from the one OUTPUT_DIR holds; returns study.json's dict or None."""
    saved = read_study(args.output_dir)
    changes = study_changes(args, saved)
    if changes:
        raise ValueError(f"--output-dir {args.output_dir} holds another study: it ran with {'; '.join(changes)} "
                         f"({os.path.join(args.output_dir, 'study.json')}): use another --output-dir for this one")
    return saved


def key_study(args):
    """study.json written at a folder's first run (the folder is this process's: runs.run_script holds
    its run.lock while a study runs)."""
    path = os.path.join(args.output_dir, "study.json")
    if check_study(args) is None:
        if os.path.isfile(os.path.join(args.output_dir, "results.jsonl")):
            print(f"study.py: {args.output_dir} holds results from before study.json: keyed to this run's "
                  f"{', '.join(shown(k, getattr(args, k)) for k in STUDY_FIELDS)}", flush=True)
        runs.write_text(path, json.dumps({k: getattr(args, k) for k in STUDY_FIELDS}, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------
# A cell's command, and the checks of every command before the first runs
# ----------------------------------------------------------------------------------------------------

def tokenizer_path(args, seed):
    """Seed `seed`'s tokenizer: seed 0's in OUTPUT_DIR/tokenizer/ (where a study kept its one tokenizer
    before there was one per seed), seed S's in OUTPUT_DIR/tokenizer-sS/."""
    folder = "tokenizer" if seed == 0 else f"tokenizer-s{seed}"
    return os.path.join(args.output_dir, folder, "checkpoint-latest.pth")


def tokenizer_flags(args, seed):
    return ["--output-dir", os.path.dirname(tokenizer_path(args, seed)), "--seed", str(seed)] + \
        (["--preset", "kmeans", "--data", args.data] if args.data else [])


def cell_seed(key):
    return int(key.rsplit("/s", 1)[1])  # "pretrain/revdet-vit/s1" -> 1


def pretrain_seeds(cells):
    """The seeds of the pre-training cells among `cells`: the tokenizers they read."""
    return sorted({cell_seed(c[0]) for c in cells if c[1] == "pretrain.py"})


def cell_command(args, cell):
    """(data, flags, extra, run_dir) of one cell: its run is `script data flags extra --output-dir
    run_dir`, with `data` the folder and split, `flags` the plan's (with the backbone or tokenizer it
    starts from) and `extra` the stage's --*-flags, last so that they win."""
    key, script, flags, _, needs = cell
    if script == "pretrain.py":
        flags, extra = flags + ["--dvae", tokenizer_path(args, cell_seed(key)), "--min-tokenizer-perplexity", "0"], \
            args.pretrain_flags
    else:
        flags = (["--init", os.path.join(args.output_dir, "runs", needs.replace("/", "-"), "backbone.pth")]
                 if needs else []) + flags
        extra = args.finetune_flags if script == "finetune.py" else args.segment_flags
    folder = args.seg_data if script == "segment.py" else args.data  # None: the built-in data
    data = (["--data", folder] if folder else []) + (["--eval-split", args.eval_split] if script in SPLIT_AWARE else [])
    return data, flags, list(extra), os.path.join(args.output_dir, "runs", key.replace("/", "-"))


def ran_as(data, flags):
    """A command as results.jsonl compares it: the study's own files (its tokenizer, a cell's backbone)
    named from OUTPUT_DIR, so a folder named another way (relative, absolute, moved) is the same study."""
    out = list(data + flags)
    for i in range(1, len(out)):
        parts = os.path.normpath(out[i]).split(os.sep)
        if out[i - 1] == "--dvae" and parts[-1] == "checkpoint-latest.pth" and len(parts) > 1 and \
                re.fullmatch(r"tokenizer(-s\d+)?", parts[-2]):
            out[i] = f"OUTPUT_DIR/{parts[-2]}/checkpoint-latest.pth"
        elif out[i - 1] == "--init" and len(parts) > 2 and parts[-3] == "runs" and parts[-1] == "backbone.pth":
            out[i] = "OUTPUT_DIR/" + "/".join(parts[-3:])
    return out


def recorded_data(record, data):
    """The --data/--eval-split of a record (one written before records held them: this run's)."""
    if "data" not in record:
        return data
    return (["--data", record["data"]] if record["data"] else []) + \
        (["--eval-split", record["eval_split"]] if "eval_split" in record else [])


def cell_state(args, cell, done):
    """("todo" | "done" | "stale", command as recorded, command as planned now): a record counts as
    done only for the command it ran; "stale" where it ran another one."""
    data, flags, extra, _ = cell_command(args, cell)
    new = ran_as(data, flags + extra)
    if cell[0] not in done:
        return "todo", None, new
    old = ran_as(recorded_data(done[cell[0]], data), done[cell[0]].get("flags", []))
    return "done" if old == new else "stale", old, new


def check_records(args, cells, done):
    """Refuse to go on where results.jsonl holds a cell run with another command than the plan gives it
    now (study.py's budget or the cell changed since), rather than redo it: its number answers another
    question, and its folder holds a checkpoint of other flags, which the stage would refuse to resume.
    The user chooses between it and the new one."""
    stale = [(cell[0], old, new) for cell in cells for state, old, new in [cell_state(args, cell, done)]
             if state == "stale"]
    if stale:
        key, old, new = stale[0]
        more = f" (and {len(stale) - 1} more cells)" if len(stale) > 1 else ""
        raise ValueError(f"{os.path.join(args.output_dir, 'results.jsonl')}: cell {key} ran as `{shlex.join(old)}`, "
                         f"the plan now runs `{shlex.join(new)}`{more}: delete its line and its folder "
                         f"runs/{key.replace('/', '-')} to run it again, or use another --output-dir")


def parse_stage(script, argv):
    """`script`'s own parser on argv (pretrain.py: and its recipe's checks), a refusal as a ValueError
    'SCRIPT: MESSAGE' (no usage block, no exit): what the stage would say at its start."""
    import dvae, finetune, pretrain, segment  # their parsers, for planning only: nothing here trains
    module = {"dvae.py": dvae, "pretrain.py": pretrain, "finetune.py": finetune, "segment.py": segment}[script]
    parser = module.get_args_parser()

    def refuse(message):
        raise ValueError(f"{script}: {message}")
    parser.error = refuse  # runs.ArgumentParser.error exits the process; here the study decides
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # --help/--version would print, then exit
            parsed = parser.parse_args(argv)
    except SystemExit:
        raise ValueError(f"{script}: these flags make it exit before any work (--help?): run `python {script} "
                         f"--help` yourself") from None
    if script == "pretrain.py":
        try:
            pretrain.resolve_args(parsed)
        except (ValueError, OSError) as err:
            raise ValueError(f"{script}: {err}") from None
    return parsed


def check_flags(args, cells):
    """Every command the study will run, parsed by its own script before the first (the tokenizer takes
    minutes; a typo in --pretrain-flags used to surface after it). A refusal names the study flag that
    brought it. The plan's own flags are left to the stage: its failure names its command and log."""
    extra = {"dvae.py": args.dvae_flags, "pretrain.py": args.pretrain_flags, "finetune.py": args.finetune_flags,
             "segment.py": args.segment_flags}
    flag = {"dvae.py": "--dvae-flags", "pretrain.py": "--pretrain-flags", "finetune.py": "--finetune-flags",
            "segment.py": "--segment-flags"}
    commands = [(f"the tokenizer of seed {seed}", "dvae.py", tokenizer_flags(args, seed))
                for seed in pretrain_seeds(cells)]
    for cell in cells:
        data, flags, _, run_dir = cell_command(args, cell)
        commands.append((cell[0], cell[1], data + flags + ["--output-dir", run_dir]))
    for key, script, argv in commands:
        try:
            parse_stage(script, argv + extra[script])
        except (ValueError, OSError) as err:
            try:
                parse_stage(script, argv)
            except (ValueError, OSError):
                continue  # the plan's own flags fail: not the user's to fix
            raise ValueError(f"{flag[script]}: {err} (cell {key})") from None


# ----------------------------------------------------------------------------------------------------
# Running: one subprocess per cell, the last JSON line of its stdout is the result
# ----------------------------------------------------------------------------------------------------

def last_json(stdout, what):
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ChildProcessError(f"{what} printed no JSON result line")


LOG_LOCK = threading.Lock()  # one run's output is appended whole, never interleaved with another's


def run_stage(script, flags, log_path):
    """Run `python script flags`, its output appended to log_path; returns its last JSON line."""
    cmd = [sys.executable, os.path.join(REPO, script), *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    with LOG_LOCK, open(log_path, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr[-20000:] + "\n")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ChildProcessError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {last} (its whole output is "
                                f"in {log_path})")
    return last_json(proc.stdout, " ".join(cmd)), (time.time() - t0) / 60


def tokenizer(args, seed, log_path):
    """Seed `seed`'s tokenizer, trained once. A study stopped while it trained finds a checkpoint short
    of its last step and runs the same dvae.py command again, which resumes from it. One that cannot be
    read is refused, not refitted: the cells already run were pre-trained with it."""
    ckpt = tokenizer_path(args, seed)
    saved = None
    if os.path.isfile(ckpt):
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            if not isinstance(saved, dict) or not {"step", "total_steps"} <= saved.keys():
                raise ValueError("no step and total_steps in it: not a dvae.py checkpoint")
        except Exception as err:  # torch.load's errors run from EOFError to OSError [Errno 22]
            why = (str(err).strip().splitlines() or [""])[0][:120]
            raise ValueError(f"study tokenizer {ckpt} cannot be read ({type(err).__name__}: {why}): delete it "
                             f"and run again to fit it anew (results.jsonl's pre-training cells used the old "
                             f"one; redo them too, or use another --output-dir)") from None
    if saved is None or saved["step"] < saved["total_steps"]:
        run_stage("dvae.py", tokenizer_flags(args, seed) + args.dvae_flags, log_path)
    return ckpt


def run_cell(args, cell, log_path):
    """Run one cell's stage; returns its results.jsonl record (recorded only complete: a cell whose
    stage printed no number raises, and a rerun does it again)."""
    key, script, _, metric, _ = cell
    data, flags, extra, run_dir = cell_command(args, cell)
    result, minutes = run_stage(script, data + flags + extra + ["--output-dir", run_dir], log_path)
    record = {"cell": key, "script": script, "data": args.seg_data if script == "segment.py" else args.data,
              "flags": flags + extra, "minutes": round(minutes, 2)}
    if script in SPLIT_AWARE:
        record["eval_split"] = args.eval_split
    if metric == "knn":
        record.update(value=result.get("knn_pretrained"), random_init=result.get("knn_random_init"),
                      raw_pixels=result.get("knn_raw_pixels"))
    else:
        record.update(value=result.get(metric))
    layers = result.get("knn_blocks") or result.get("knn_stages")
    if layers:
        record["layers"] = layers
    if any(v is None for k, v in record.items() if k in ("value", "random_init")):
        raise ChildProcessError(f"{script} (cell {key}) printed no {metric} in {json.dumps(result)}; see {log_path}")
    return record


def run_cells(args, todo, done, results_path, log_path):
    """Run the cells of `todo` in plan order, up to --jobs at once, each as soon as the pre-training it
    starts from is recorded; every finished cell goes into results.jsonl at once. A failure stops new
    cells; the ones already running finish and are recorded before it is raised."""
    running, failure = {}, None
    with ThreadPoolExecutor(args.jobs) as pool:
        while todo or running:
            ready = [c for c in todo if c[4] is None or c[4] in done] if failure is None else []
            for cell in ready[:args.jobs - len(running)]:
                todo.remove(cell)
                print(f"study.py: {cell[0]}", flush=True)
                running[pool.submit(run_cell, args, cell, log_path)] = cell
            if not running:
                break
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                cell = running.pop(future)
                try:
                    record = future.result()
                except Exception as err:
                    if failure is None and running:
                        print(f"study.py: {cell[0]} failed; waiting for the {len(running)} running cell(s) to "
                              f"finish and be recorded (Ctrl-C stops them: their stages resume)", flush=True)
                    failure = failure or err
                    continue
                add_result(results_path, record)
                done[cell[0]] = record
    if failure is not None:
        raise failure


def main(args):
    results_path = os.path.join(args.output_dir, "results.jsonl")
    if (args.report or args.plot) and not os.path.isfile(results_path):
        raise FileNotFoundError(f"--output-dir {args.output_dir}: no results there ({results_path} does not "
                                f"exist); run the study first, or pass the --output-dir it wrote to")
    for flag, path in (("--data", args.data), ("--seg-data", args.seg_data)):
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"{flag} {path}: no such folder")
    # absolute: study.json keys the folders themselves, and the stages run from the repository (cwd=REPO),
    # where a path relative to the caller's folder names another one
    args.data, args.seg_data = (os.path.abspath(p) if p else None for p in (args.data, args.seg_data))
    args.output_dir = os.path.abspath(args.output_dir)
    results_path, log_path = (os.path.join(args.output_dir, f) for f in ("results.jsonl", "study.log"))
    done, cells = read_results(results_path), plan(args)
    if args.list:
        changes = study_changes(args, read_study(args.output_dir))
        if changes:
            print(f"note: {args.output_dir} holds another study ({'; '.join(changes)}): a run would be refused")
        for cell in cells:
            key, script, flags, _, needs = cell
            print(f"{cell_state(args, cell, done)[0]:<5} {key:<34} {script} {' '.join(flags)}"
                  + (f"  (from {needs})" if needs else ""))
        return done
    if args.report:
        return report(done, args)
    if args.plot:
        plot_knn(knn_curves(args.output_dir), args.plot, "k-NN top-1 of the enhancer against pre-training "
                 f"steps: CIM-RevDet, vit_mini, {os.path.basename(os.path.normpath(args.data)) if args.data else 'built-in data'}")
        return done
    check_study(args)
    check_flags(args, cells)
    check_records(args, cells, done)
    os.makedirs(args.output_dir, exist_ok=True)
    key_study(args)
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # the stages would each take every core
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        print(f"study.py: --jobs {args.jobs}: each stage runs with OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
              f"(set OMP_NUM_THREADS to choose)", flush=True)
    todo = [c for c in cells if c[0] not in done]
    with ThreadPoolExecutor(args.jobs) as pool:  # each at tokenizer_path(args, seed), which its pre-training names
        list(pool.map(lambda seed: tokenizer(args, seed, log_path), pretrain_seeds(todo)))
    run_cells(args, todo, done, results_path, log_path)
    return report(done, args)


# ----------------------------------------------------------------------------------------------------
# Report: mean +- spread over seeds per cell
# ----------------------------------------------------------------------------------------------------

def summarise(done):
    """{cell without seed: (mean, std over seeds, n, mean random-init k-NN or None)}."""
    groups = {}
    for key, r in done.items():
        groups.setdefault(key.rsplit("/", 1)[0], []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        values = [r["value"] for r in rs]
        rand = [r["random_init"] for r in rs if "random_init" in r]
        out[name] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                     len(values), statistics.mean(rand) if rand else None)
    return out


def cell(rows, name):
    """'mean ± std' of one cell (seeds in brackets when not 2), or '-' where it has not run."""
    if name not in rows:
        return "-"
    mean, std, n, _ = rows[name]
    return f"{mean:.1f} ± {std:.1f}" + (f" ({n})" if n != 2 else "")


def seed_cell(record):
    """One seed's number of a cell as docs/study.md's tables give it: '32.7 (27.1, 32.3)' for a
    pre-training (its random init and raw pixels), '32.1 [28.3 29.6 ...]' where it read every block."""
    if record is None:
        return "-"
    text = f"{record['value']:.1f}"
    if record.get("random_init") is not None:
        pixels = record.get("raw_pixels")
        text += f" ({record['random_init']:.1f}, {'-' if pixels is None else f'{pixels:.1f}'})"
    if record.get("layers"):
        text += " [" + " ".join(f"{v:.1f}" for v in record["layers"]) + "]"
    return text


def too_close(rows, a, b):
    """Two cells whose means differ by less than their seed-to-seed spread (and have < 3 seeds)."""
    if a not in rows or b not in rows:
        return False
    (ma, sa, na, _), (mb, sb, nb, _) = rows[a], rows[b]
    return abs(ma - mb) < max(sa, sb) and min(na, nb) < 3


def report(done, args=None):
    """docs/study.md's tables (markdown), from results.jsonl; returns summarise(done). `args` gives the
    data whose recipe names the reference rows (default: the built-in data)."""
    args = args or get_args_parser().parse_args([])
    rows = summarise(done)
    tasks = [t for t in DOWNSTREAM if t != "blocks"]
    pixels = [r["raw_pixels"] for r in done.values() if r.get("raw_pixels") is not None]
    split = getattr(args, "eval_split", "val")
    print(f"evaluated on {'val/' if split == 'val' else 'the selection split carved from train/'}\n")
    print("| pre-training | k-NN | linear probe | fine-tuning | segmentation mIoU |\n| --- | --- | --- | --- | --- |")
    print(f"| raw pixels, mean-centred (no network) | {statistics.mean(pixels):.1f} | - | - | - |" if pixels else
          "| raw pixels, mean-centred (no network) | - | - | - | - |")
    close = []
    for arch, names in (("vit_mini", ("revdet-vit", "respix-vit", "beit-vit")),
                        ("resnet18", ("revdet-resnet18", "respix-resnet18"))):
        rand = [r for n in names for r in [rows.get(f"pretrain/{n}")] if r and r[3] is not None]
        knn_rand = f"{statistics.mean(r[3] for r in rand):.1f}" if rand else "-"
        print(f"| {arch}, scratch (random init) | {knn_rand} | "
              + " | ".join(cell(rows, f"{t}/scratch-{arch}") for t in tasks) + " |")
        for n in names:
            label = "BEiT" if n.startswith("beit") else f"CIM-{n.split('-')[0]}"
            print(f"| {arch}, {label} | {cell(rows, f'pretrain/{n}')} | "
                  + " | ".join(cell(rows, f"{t}/{n}") for t in tasks) + " |")
            close += [(f"{t}/{n}", f"{t}/scratch-{arch}", "main") for t in tasks]
    seeds = sorted({cell_seed(k) for k in done})
    print("\n| each cell, seed by seed (k-NN: random init, raw pixels; [per block / stage]) | "
          + " | ".join(f"seed {s}" for s in seeds) + " |\n| --- |" + " --- |" * len(seeds))
    for name in sorted({k.rsplit("/", 1)[0] for k in done}):
        print(f"| {name} | " + " | ".join(seed_cell(done.get(f"{name}/s{s}")) for s in seeds) + " |")
    layer_rows = [(k, [r["layers"] for r in done.values() if r["cell"].rsplit("/", 1)[0] == k and "layers" in r])
                  for k in sorted({key.rsplit("/", 1)[0] for key in done if key.startswith("blocks/")})]
    if layer_rows:
        print("\n| k-NN per block / stage (mean over seeds) | 1 | 2 | ... |\n| --- | --- | --- | --- |")
        for k, seeds in layer_rows:
            means = [statistics.mean(v) for v in zip(*seeds)]
            print(f"| {k.split('/', 1)[1]} ({len(seeds)} seeds) | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    for name, curves in layer_curves(getattr(args, "output_dir", "")).items():
        print(f"\n| {name}: k-NN per block / stage against steps | step | 1 | 2 | ... |\n| --- | --- | --- | --- | --- |")
        for seed, points in sorted(curves.items()):
            for step, values in points:
                print(f"| seed {seed} | {step} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    print("\n| ablation | setting | k-NN | vs the recipe |\n| --- | --- | --- | --- |")
    for group, base in BASELINE.items():
        if base not in PRETRAIN:
            continue
        values = ablation_values(args, group)
        names = [n for n in values if n == base or values[n] != values[base]]
        for n in sorted(names, key=lambda n: str(values[n])):
            delta = "" if n == base or f"pretrain/{n}" not in rows or f"pretrain/{base}" not in rows else \
                f"{rows[f'pretrain/{n}'][0] - rows[f'pretrain/{base}'][0]:+.1f}"
            label = f"{values[n]}" + (" (recipe)" if n == base else "")
            print(f"| {group} | {label} | {cell(rows, f'pretrain/{n}')} | {delta} |")
            if n != base:
                close.append((f"pretrain/{n}", f"pretrain/{base}", group))
    close = [c for c in close if too_close(rows, c[0], c[1])]
    if close:
        print("\nwithin the seed-to-seed spread, fewer than 3 seeds (a third: --seeds 2 with --cells NAME... for "
              "pre-training cells, --only main for the downstream ones):")
        for a, b, group in close:
            print(f"  {a} vs {b} ({group})")
    return rows


# ----------------------------------------------------------------------------------------------------
# Plot: k-NN accuracy against pre-training steps (PIL only)
# ----------------------------------------------------------------------------------------------------

def layer_curves(output_dir):
    """{cell name: {seed: [(step, k-NN of each block / stage)]}} from the pre-training runs that logged
    --knn-blocks with --knn-every (the last point is the final check)."""
    curves = {}
    folder = os.path.join(output_dir, "runs")
    for d in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        log = os.path.join(folder, d, "log.jsonl")
        if not d.startswith("pretrain-") or "-s" not in d or not os.path.isfile(log):
            continue
        with open(log) as f:
            recs = [json.loads(line) for line in f]
        points = [(r.get("step", r.get("steps")), r.get("knn_blocks") or r.get("knn_stages")) for r in recs]
        points = [p for p in points if p[1]]
        if points:
            name, seed = d[len("pretrain-"):].rsplit("-s", 1)
            curves.setdefault(name, {})[int(seed)] = points
    return curves


def knn_curves(output_dir, name="revdet-vit"):
    """{seed: ([(step, k-NN)], random-init k-NN)} from the runs of one pre-training cell that logged
    --knn-every (the last point is the final check)."""
    curves = {}
    folder = os.path.join(output_dir, "runs")
    for d in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not d.startswith(f"pretrain-{name}-s") or not os.path.isfile(os.path.join(folder, d, "log.jsonl")):
            continue
        with open(os.path.join(folder, d, "log.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        points = [(r["step"], r["knn"]) for r in recs if "knn" in r]
        final = [r for r in recs if "knn_pretrained" in r]
        if points and final:
            curves[int(d.rsplit("-s", 1)[1])] = (points + [(final[-1]["steps"], final[-1]["knn_pretrained"])],
                                                 final[-1]["knn_random_init"])
    return curves


def plot_knn(curves, path, title, size=(640, 400)):
    """Each seed's CIM curve (solid) and its random-init network (dashed) on step/accuracy axes."""
    from PIL import Image, ImageDraw
    if not curves:
        raise ValueError("study.py --plot: no finished pre-training run with a k-NN curve (--knn-every) yet")
    w, h = size
    left, right, bottom = 60, 30, 50
    top = 40 + 14 * len(curves)  # the title and one legend line per seed above the plot, off the curves
    steps = [s for pts, _ in curves.values() for s, _ in pts]
    accs = [a for pts, r in curves.values() for a in [r] + [a for _, a in pts]]
    tick = 1 if max(accs) - min(accs) < 8 else 2 if max(accs) - min(accs) < 16 else 5  # % per grid line
    x1, y0, y1 = max(steps), tick * int(min(accs) // tick), tick * (int(max(accs) // tick) + 1)
    X = lambda s: left + (w - left - right) * s / x1
    Y = lambda a: h - bottom - (h - top - bottom) * (a - y0) / (y1 - y0)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 12), title, fill="black")
    for a in range(y0, y1 + 1, tick):  # horizontal grid and y labels
        d.line([(left, Y(a)), (w - right, Y(a))], fill=(225, 225, 225))
        d.text((8, Y(a) - 6), f"{a}%", fill="black")
    for s in sorted({s for s, _ in next(iter(curves.values()))[0]}):
        d.text((X(s) - 8, h - bottom + 6), str(s), fill="black")
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    d.text((w // 2 - 60, h - 22), "pre-training step", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    for i, (seed, (pts, rand)) in enumerate(sorted(curves.items())):
        c = colours[i % len(colours)]
        d.line([(X(s), Y(a)) for s, a in pts], fill=c, width=2)
        for s, a in pts:
            d.ellipse([X(s) - 3, Y(a) - 3, X(s) + 3, Y(a) + 3], fill=c)
        for x in range(left, w - right, 12):  # dashed: the same architecture at random init
            d.line([(x, Y(rand)), (min(x + 6, w - right), Y(rand))], fill=c, width=1)
        d.text((left, 30 + 14 * i), f"seed {seed}: CIM (solid), random init (dashed)", fill=c)
    img.save(path)
    return img


def get_args_parser():
    p = runs.ArgumentParser(prog="study.py", description="CIM against scratch and the paper's ablations, "
                            "resumable")
    a = p.add_argument
    a("--data", default=None, help="ImageNet-layout photo folder (default: the built-in data)")
    a("--seg-data", default=None, help="ADE20K-layout root for the segmentation cells, with --nb-classes "
      "in --segment-flags (default: the built-in masks, also when --data is photos: a transfer test)")
    a("--output-dir", default="out/study", help="runs/, results.jsonl (one line per finished cell), study.log, "
      "study.json (the --data, --seg-data, --eval-split and --*-flags of the one study it holds)")
    a("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every cell")
    a("--jobs", type=runs.POS_INT, default=1,
      help="cells run at once, each its own process (a downstream cell waits for its pre-training); each "
           "gets OMP_NUM_THREADS=cores/jobs unless OMP_NUM_THREADS is set")
    a("--eval-split", default="val", choices=["val", "select"],
      help="what pretrain.py's k-NN and finetune.py evaluate on: select (a fixed 10%% of each class of "
           "train/, left out of training) to make choices, then val (DIR/val/) for the numbers you report, "
           "in another --output-dir")
    a("--only", nargs="+", default=None, choices=sorted({g for g, _ in PRETRAIN.values()}), metavar="GROUP",
      help=f"groups to run, of {sorted({g for g, _ in PRETRAIN.values()})}")
    a("--cells", nargs="+", default=None, choices=list(PRETRAIN), metavar="NAME",
      help=f"only these pre-training cells and, for cells of the main group, their downstream cells and "
           f"scratch's (e.g. a third seed where two cells are within the spread: --cells respix-vit "
           f"respix-norm-patch --seeds 2); of {list(PRETRAIN)}")
    a("--tasks", nargs="+", default=None, choices=list(DOWNSTREAM), metavar="TASK",
      help=f"only these downstream tasks, of {list(DOWNSTREAM)}")
    a("--budget", default="study", choices=["study", "recipe"],
      help="study: every run cut to study.BUDGET's steps (about an hour a dataset on 2 cores); recipe: each "
           "run as long as its recipe, downstream stages in the recipe they pick for the data (the fair "
           "protocol's tables, docs/study.md)")
    a("--list", action="store_true", help="print the plan and what is done, run nothing")
    a("--report", action="store_true", help="print the tables from results.jsonl, run nothing")
    a("--plot", default=None, metavar="PNG", help="draw k-NN against pre-training steps of the revdet-vit "
      "runs (CIM and random init) to this PNG, run nothing")
    # extra flags for every run of one stage, one quoted string each (the tests shrink the runs with
    # them): --pretrain-flags="--epochs 8 --gen-dim 128"
    a("--dvae-flags", type=shlex.split, default=[], help="extra dvae.py flags (tokenizer)")
    a("--pretrain-flags", type=shlex.split, default=[], help="extra pretrain.py flags, every pre-training cell")
    a("--finetune-flags", type=shlex.split, default=[], help="extra finetune.py flags (linear probe, fine-tuning)")
    a("--segment-flags", type=shlex.split, default=[], help="extra segment.py flags")
    return p


if __name__ == "__main__":
    runs.run_script(main, get_args_parser(), writes=lambda a: not (a.list or a.report or a.plot))
