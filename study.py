"""study.py: does CIM learn? Pre-training against scratch, and the paper's ablations, cell by cell.

Every number comes from the stage scripts themselves (dvae.py, pretrain.py, finetune.py, segment.py)
run as subprocesses with the flags listed below; this file only plans the runs, skips the ones
already in OUTPUT_DIR/results.jsonl (so an interrupted study resumes cell by cell), and turns the
results into tables.

    python study.py --list                                   # the plan, and what is done
    python study.py                                          # built-in data, every cell not yet done
    python study.py --data ../shared/data/photos-dev --output-dir out/study-photos
    python study.py --only main --seeds 0 1 2                # one group, three seeds
    python study.py --report                                 # mean +- spread per cell, from results.jsonl
    python study.py --pretrain-flags="--epochs 8"            # extra flags for every run of a stage

One tokenizer per study (the built-in data: dvae.py's small preset; --data: the k-means codebook)
is trained first and shared by every pre-training run. A pre-training cell is one pretrain.py run
(its last line: k-NN of the pre-trained enhancer and of the same network at random init); a
downstream cell (linear probe, fine-tuning, segmentation) runs on that cell's backbone.pth and on
`--init scratch` with the same flags.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------------
# The plan: pre-training settings (flags on top of pretrain.py's recipe) and what runs on each
# ----------------------------------------------------------------------------------------------------

PRETRAIN = {  # name -> (group, flags)
    "revdet-vit": ("main", ["--objective", "revdet"]),
    "respix-vit": ("main", ["--objective", "respix"]),
    "revdet-resnet18": ("main", ["--objective", "revdet", "--arch", "resnet18"]),
    "respix-resnet18": ("main", ["--objective", "respix", "--arch", "resnet18"]),
    "mask-0.3": ("mask ratio", ["--mask-ratio", "0.3"]),
    "mask-0.7": ("mask ratio", ["--mask-ratio", "0.7"]),
    "argmax": ("sampling", ["--sample", "argmax"]),
    "respix-norm-none": ("respix normalisation", ["--objective", "respix", "--norm-pix", "none"]),
    "respix-norm-patch": ("respix normalisation", ["--objective", "respix", "--norm-pix", "patch"]),
    "gen-depth-4": ("generator depth", ["--gen-depth", "4"]),
}
# the references each ablation is read against (same recipe, the paper's default in that one flag)
BASELINE = {"mask ratio": "revdet-vit", "sampling": "revdet-vit", "generator depth": "revdet-vit",
            "respix normalisation": "respix-vit"}
DOWNSTREAM = {  # name -> (script, flags, metric in its last JSON line); run for the "main" cells
    "linear": ("finetune.py", ["--mode", "linear"], "top1"),
    "finetune": ("finetune.py", [], "top1"),
    "segment": ("segment.py", [], "mIoU"),
}


def plan(args):
    """Every cell, in run order: (key, script, flags, metric, needs). `needs` names the pre-training
    cell whose backbone a downstream cell starts from (None: it is scratch or pre-training)."""
    cells = []
    for name, (group, flags) in PRETRAIN.items():
        if args.only and group not in args.only:
            continue
        for seed in args.seeds:
            cells.append((f"pretrain/{name}/s{seed}", "pretrain.py", flags + ["--seed", str(seed)], "knn", None))
    for name, (group, flags) in PRETRAIN.items():
        if group != "main" or (args.only and "main" not in args.only):
            continue
        arch = dict(zip(flags[::2], flags[1::2])).get("--arch", "vit_mini")
        for task, (script, extra, metric) in DOWNSTREAM.items():
            for seed in args.seeds:
                cells.append((f"{task}/{name}/s{seed}", script, extra + ["--seed", str(seed)], metric,
                              f"pretrain/{name}/s{seed}"))
                scratch = f"{task}/scratch-{arch}/s{seed}"
                if scratch not in {c[0] for c in cells}:
                    cells.append((scratch, script, extra + ["--init", "scratch", "--arch", arch, "--seed", str(seed)],
                                  metric, None))
    return cells


# ----------------------------------------------------------------------------------------------------
# Running: one subprocess per cell, the last JSON line of its stdout is the result
# ----------------------------------------------------------------------------------------------------

def read_results(path):
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {r["cell"]: r for r in map(json.loads, f) if "cell" in r}


def last_json(stdout, what):
    for line in reversed(stdout.splitlines()):
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise RuntimeError(f"study.py: {what} printed no JSON result line")


def run_stage(script, flags, log_path):
    """Run `python script flags`, its output appended to log_path; returns its last JSON line."""
    cmd = [sys.executable, os.path.join(REPO, script), *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    with open(log_path, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr[-20000:] + "\n")
    if proc.returncode != 0:
        raise RuntimeError(f"study.py: {' '.join(cmd)} failed (exit {proc.returncode}); its output is in "
                           f"{log_path}:\n{proc.stderr[-2000:]}")
    return last_json(proc.stdout, " ".join(cmd)), (time.time() - t0) / 60


def tokenizer(args, log_path):
    """The study's one tokenizer, trained once (dvae.py resumes / reuses a finished fit)."""
    out = os.path.join(args.output_dir, "tokenizer")
    ckpt = os.path.join(out, "checkpoint-latest.pth")
    if not os.path.isfile(ckpt):
        flags = ["--output-dir", out] + (["--preset", "kmeans", "--data", args.data] if args.data else [])
        run_stage("dvae.py", flags + args.dvae_flags, log_path)
    return ckpt


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.jsonl")
    log_path = os.path.join(args.output_dir, "study.log")
    done, cells = read_results(results_path), plan(args)
    if args.list:
        for key, script, flags, _, needs in cells:
            print(f"{'done' if key in done else 'todo':<5} {key:<34} {script} {' '.join(flags)}"
                  + (f"  (from {needs})" if needs else ""))
        return done
    if args.report:
        return report(done)
    data_flags = ["--data", args.data] if args.data else []
    tok = tokenizer(args, log_path)
    for key, script, flags, metric, needs in cells:
        if key in done:
            continue
        run_dir = os.path.join(args.output_dir, "runs", key.replace("/", "-"))
        if script == "pretrain.py":
            flags = flags + ["--dvae", tok, "--min-tokenizer-perplexity", "0"] + args.pretrain_flags
        else:
            flags = (["--init", os.path.join(args.output_dir, "runs", needs.replace("/", "-"), "backbone.pth")]
                     if needs else []) + flags
            flags = flags + (args.finetune_flags if script == "finetune.py" else args.segment_flags)
        print(f"study.py: {key}", flush=True)
        result, minutes = run_stage(script, data_flags + flags + ["--output-dir", run_dir], log_path)
        record = {"cell": key, "script": script, "flags": flags, "minutes": round(minutes, 2)}
        if metric == "knn":
            record.update(value=result["knn_pretrained"], random_init=result["knn_random_init"])
        else:
            record.update(value=result[metric])
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        done[key] = record
    return report(done)


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


def report(done):
    rows = summarise(done)
    print(f"{'cell':<34} {'mean':>7} {'± std':>7} {'seeds':>5} {'random init':>11}")
    for name, (mean, std, n, rand) in rows.items():
        print(f"{name:<34} {mean:7.2f} {std:7.2f} {n:5d} " + (f"{rand:11.2f}" if rand is not None else ""))
    return rows


def get_args_parser():
    p = argparse.ArgumentParser("study.py: CIM against scratch and the paper's ablations, resumable")
    a = p.add_argument
    a("--data", default=None, help="ImageNet-layout photo folder (default: the built-in data)")
    a("--output-dir", default="out/study", help="runs/, results.jsonl (one line per finished cell), study.log")
    a("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every cell")
    a("--only", nargs="+", default=None, help=f"groups to run: {sorted({g for g, _ in PRETRAIN.values()})}")
    a("--list", action="store_true", help="print the plan and what is done, run nothing")
    a("--report", action="store_true", help="print the table from results.jsonl, run nothing")
    # extra flags for every run of one stage, one quoted string each (the tests shrink the runs with
    # them): --pretrain-flags="--epochs 8 --gen-dim 128"
    a("--dvae-flags", type=shlex.split, default=[], help="extra dvae.py flags (tokenizer)")
    a("--pretrain-flags", type=shlex.split, default=[], help="extra pretrain.py flags, every pre-training cell")
    a("--finetune-flags", type=shlex.split, default=[], help="extra finetune.py flags (linear probe, fine-tuning)")
    a("--segment-flags", type=shlex.split, default=[], help="extra segment.py flags")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
