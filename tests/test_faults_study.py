"""study.py's folder bookkeeping, each a fault once reported: a study keyed to its data and flags
(study.json), a cell done only for the command it ran, results.jsonl replaced whole and a cut line
named, every command's flags checked before the tokenizer trains, an unreadable tokenizer named.
No test trains: study.run_stage is replaced by a stand-in that returns a result at once."""
import json
import os
import sys

import pytest
import torch

import study
import runs
from test_finetune import image_folder


@pytest.fixture
def small_plan(monkeypatch):
    """One pre-training cell and its linear probe (and the scratch probe): three cells, no ablation."""
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {"linear": ("finetune.py", ["--mode", "linear"], "top1")})


@pytest.fixture
def stages(monkeypatch):
    """study.run_stage stood in for: records each command, answers each stage with a result line."""
    calls = []

    def run_stage(script, flags, log_path):
        calls.append((script, list(flags)))
        if script == "dvae.py":  # the tokenizer: a finished checkpoint where the study reads it
            out = flags[flags.index("--output-dir") + 1]
            os.makedirs(out, exist_ok=True)
            torch.save({"step": 1, "total_steps": 1}, os.path.join(out, "checkpoint-latest.pth"))
            return {}, 0.0
        if script == "pretrain.py":
            return {"knn_pretrained": 30.0, "knn_random_init": 20.0}, 0.0
        return {"top1": 40.0}, 0.0

    monkeypatch.setattr(study, "run_stage", run_stage)
    return calls


def no_stage_runs(monkeypatch):
    monkeypatch.setattr(study, "run_stage", lambda *a: pytest.fail("a stage ran"))


def study_args(out, *extra):
    return study.get_args_parser().parse_args(["--output-dir", str(out), "--seeds", "0", *extra])


def results(out):
    return [json.loads(line) for line in open(out / "results.jsonl")]


# ----------------------------------------------------------------------------------------------------
# 1. One study per folder: study.json, and records done only for the command they ran
# ----------------------------------------------------------------------------------------------------

def test_a_second_data_folder_or_other_flags_in_one_folder_is_refused_before_any_work(
        tmp_path, monkeypatch, capsys, small_plan, stages):
    a, b, out = image_folder(tmp_path / "a"), image_folder(tmp_path / "b"), tmp_path / "study"
    study.main(study_args(out, "--data", str(a)))
    assert json.load(open(out / "study.json")) == {
        "data": str(a), "seg_data": None, "eval_split": "val", "dvae_flags": [], "pretrain_flags": [],
        "finetune_flags": [], "segment_flags": []}
    lines = results(out)
    assert [r["cell"] for r in lines] == ["pretrain/revdet-vit/s0", "linear/revdet-vit/s0",
                                          "linear/scratch-vit_mini/s0"]
    assert all(r["data"] == str(a) and r["eval_split"] == "val" for r in lines)  # what each cell ran on
    assert lines[1]["flags"][:2] == ["--init", str(out / "runs" / "pretrain-revdet-vit-s0" / "backbone.pth")]
    probe = [f for s, f in stages if s == "finetune.py"][0]
    assert probe[-2:] == ["--output-dir", str(out / "runs" / "linear-revdet-vit-s0")]
    no_stage_runs(monkeypatch)
    with pytest.raises(ValueError, match=rf"^--output-dir {out} holds another study: it ran with --data {a}, not "
                                         rf"--data {b} \({out}/study.json\): use another --output-dir"):
        study.main(study_args(out, "--data", str(b)))
    with pytest.raises(ValueError, match=r'ran with --pretrain-flags="", not --pretrain-flags="--max-steps 7"'):
        study.main(study_args(out, "--data", str(a), "--pretrain-flags=--max-steps 7"))
    with pytest.raises(ValueError, match=r"--eval-split val, not --eval-split select"):
        study.main(study_args(out, "--data", str(a), "--eval-split", "select"))
    with pytest.raises(ValueError, match=rf"ran with --data {a}, not no --data \(built-in data\)"):
        study.main(study_args(out))
    # what is there is still listed and reported; the same study goes on as before
    capsys.readouterr()
    study.main(study_args(out, "--list", "--data", str(b)))
    listed = capsys.readouterr().out
    assert listed.startswith(f"note: {out} holds another study (--data {a}, not --data {b}): a run would be refused")
    study.main(study_args(out, "--list", "--data", str(a)))
    assert capsys.readouterr().out.count("done ") == 3
    assert set(study.main(study_args(out, "--report", "--data", str(a)))) == {
        "pretrain/revdet-vit", "linear/revdet-vit", "linear/scratch-vit_mini"}
    study.main(study_args(out, "--data", str(a)))  # every cell done: nothing runs


def test_a_cell_recorded_with_other_flags_than_the_plan_gives_is_refused_and_listed_stale(
        tmp_path, monkeypatch, capsys, small_plan, stages):
    study.main(study_args(tmp_path))
    no_stage_runs(monkeypatch)
    # study.py's budget changed since: the recorded numbers answer another question, and the run folders
    # hold checkpoints of other flags; the user chooses (delete the line, or another --output-dir)
    monkeypatch.setitem(study.BUDGET, "linear", ["--max-steps", "64", "--warmup-epochs", "0.25"])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/results.jsonl: cell linear/revdet-vit/s0 ran as `.*--max-steps "
                                         r"32 .*`, the plan now runs `.*--max-steps 64 .*` \(and 1 more cells\): "
                                         r"delete its line and its folder runs/linear-revdet-vit-s0 to run it again"):
        study.main(study_args(tmp_path))
    capsys.readouterr()
    study.main(study_args(tmp_path, "--list"))
    states = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert states == [["done", "pretrain/revdet-vit/s0"], ["stale", "linear/revdet-vit/s0"],
                      ["stale", "linear/scratch-vit_mini/s0"]]


def test_the_same_study_named_another_way_and_one_recorded_before_study_json_are_done(
        tmp_path, monkeypatch, capsys, small_plan, stages):
    monkeypatch.chdir(tmp_path)
    study.main(study_args("rel"))  # relative --output-dir
    no_stage_runs(monkeypatch)
    study.main(study_args(tmp_path / "rel"))  # the same folder, absolute: every cell done
    os.rename(tmp_path / "rel", tmp_path / "moved")
    study.main(study_args(tmp_path / "moved"))  # moved: its backbone and tokenizer paths move with it
    # a study written before records held their data and before study.json: its records count, keyed now
    old = tmp_path / "old"
    os.makedirs(old / "tokenizer")
    torch.save({"step": 1, "total_steps": 1}, old / "tokenizer" / "checkpoint-latest.pth")
    lines = results(tmp_path / "moved")
    for r in lines:
        del r["data"], r["eval_split"]
        r["flags"] = [f.replace(str(tmp_path / "rel"), "out/study") for f in r["flags"]]
    (old / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    study.main(study_args(old))
    note = f"study.py: {old} holds results from before study.json: keyed to this run's no --data"
    assert note in capsys.readouterr().out
    assert json.load(open(old / "study.json"))["data"] is None


# ----------------------------------------------------------------------------------------------------
# 2. results.jsonl: replaced whole; a line that is not a record is named with its fix
# ----------------------------------------------------------------------------------------------------

def test_a_cut_line_in_results_jsonl_is_named_with_its_number_and_fix(tmp_path, monkeypatch, capsys, small_plan):
    good = json.dumps({"cell": "pretrain/revdet-vit/s0", "value": 30.0, "random_init": 20.0})
    (tmp_path / "results.jsonl").write_text(good + "\n\n" + '{"cell": "linear/revdet-vit/s0", "val' + "\n")
    for flag in ("--list", "--report", None):
        with pytest.raises(ValueError, match=rf"^{tmp_path}/results.jsonl line 3 is not a JSON record "
                                             r"\('{\"cell\": \"linear/revdet-vit/s0\", \"val': a write cut short\?\): "
                                             r"delete that line and run the study again, which reruns its cell$"):
            study.main(study_args(tmp_path, *[flag] if flag else []))
    # through the script's entry point: one line on stderr, exit status 2
    monkeypatch.setattr(sys, "argv", ["study.py", "--report", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        runs.run_script(study.main, study.get_args_parser())
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"study.py: error: {tmp_path}/results.jsonl line 3")
    (tmp_path / "results.jsonl").write_text(good + "\n\n")  # the line deleted (a blank line holds no cell)
    assert list(study.read_results(tmp_path / "results.jsonl")) == ["pretrain/revdet-vit/s0"]


def test_results_jsonl_is_replaced_whole_keeping_other_processes_records(tmp_path, monkeypatch, small_plan, stages):
    path = tmp_path / "results.jsonl"
    study.add_result(str(path), {"cell": "a", "value": 1.0})
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        study.add_result(str(path), {"cell": "b", "value": 2.0})
    assert path.read_text() == json.dumps({"cell": "a", "value": 1.0}) + "\n"  # the old file, whole
    assert sorted(os.listdir(tmp_path)) == ["results.jsonl"]  # no temp file left behind
    monkeypatch.setattr(os, "fsync", real_fsync)
    # another writer records a cell while this study runs a stage: read again before the replace, both kept
    fake = study.run_stage

    def run_stage(script, flags, log_path):
        if script == "finetune.py" and not any(r["cell"] == "x" for r in results(tmp_path)):
            with open(path, "a") as f:
                f.write(json.dumps({"cell": "x", "value": 3.0}) + "\n")
        return fake(script, flags, log_path)
    monkeypatch.setattr(study, "run_stage", run_stage)
    path.unlink()
    study.main(study_args(tmp_path))
    assert [r["cell"] for r in results(tmp_path)] == ["pretrain/revdet-vit/s0", "x", "linear/revdet-vit/s0",
                                                      "linear/scratch-vit_mini/s0"]


# ----------------------------------------------------------------------------------------------------
# 3. Every command's flags, parsed by its own script before the tokenizer trains
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--pretrain-flags", "--no-such-flag", r"--pretrain-flags: pretrain.py: unrecognized arguments: --no-such-flag "
                                           r"\(cell pretrain/revdet-vit/s0\)"),
    ("--pretrain-flags", "--mask-ratio 2", r"--pretrain-flags: pretrain.py: argument --mask-ratio: must be a number "
                                           r"in \(0, 1\), got 2"),
    ("--pretrain-flags", "--img-size 20 --patch-size 8",  # the recipe's checks too (resolve_args)
     r"--pretrain-flags: pretrain.py: --img-size 20 is not a multiple of --patch-size 8 "
     r"\(cell pretrain/revdet-vit/s0\)"),
    ("--finetune-flags", "--lr -1",
     r"--finetune-flags: finetune.py: argument --lr: .*got -1 \(cell linear/revdet-vit/s0\)"),
    ("--segment-flags", "--iters x",
     r"--segment-flags: segment.py: argument --iters: expected a whole number, got 'x'"),
    ("--dvae-flags", "--vocab-size", r"--dvae-flags: dvae.py: argument --vocab-size: expected one argument "
                                     r"\(cell the tokenizer of seed 0\)"),
    ("--pretrain-flags", "--help",
     r"--pretrain-flags: pretrain.py: these flags make it exit before any work \(--help\?\)"),
])
def test_a_bad_stage_flag_is_refused_before_the_tokenizer_naming_the_study_flag(
        tmp_path, monkeypatch, capsys, flag, value, message):
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {"linear": ("finetune.py", ["--mode", "linear"], "top1"),
                                              "segment": ("segment.py", ["--recipe", "builtin"], "mIoU")})
    no_stage_runs(monkeypatch)
    out = tmp_path / "study"
    with pytest.raises(ValueError, match=f"^{message}"):
        study.main(study_args(out, f"{flag}={value}"))
    assert not out.exists()  # refused before the folder, study.json or the tokenizer
    # as the script says it: one line, no argparse usage block
    monkeypatch.setattr(sys, "argv", ["study.py", "--output-dir", str(out), f"{flag}={value}"])
    with pytest.raises(SystemExit) as stop:
        runs.run_script(study.main, study.get_args_parser())
    captured = capsys.readouterr()
    assert stop.value.code == 2 and captured.err.count("\n") == 1
    assert captured.err.startswith(f"study.py: error: {flag}: ")
    assert "usage:" not in captured.out + captured.err


# ----------------------------------------------------------------------------------------------------
# 4. The study's tokenizer: an unreadable one is named, with what to do
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not a dvae checkpoint"])
def test_an_unreadable_study_tokenizer_is_named_with_its_fix(tmp_path, monkeypatch, small_plan, damage):
    ckpt = tmp_path / "tokenizer" / "checkpoint-latest.pth"
    ckpt.parent.mkdir()
    torch.save({"step": 3, "total_steps": 3, "model": {"w": torch.zeros(4096)}}, ckpt)
    whole = ckpt.read_bytes()
    ckpt.write_bytes({"garbage": os.urandom(4096), "truncated": whole[:len(whole) // 2], "empty": b"",
                      "not a dvae checkpoint": whole}[damage])
    if damage == "not a dvae checkpoint":
        torch.save({"model": {}}, ckpt)
    no_stage_runs(monkeypatch)
    with pytest.raises(ValueError, match=rf"^study tokenizer {ckpt} cannot be read \(\w+: [^\n]*\): delete it and "
                                         r"run again to fit it anew"):
        study.main(study_args(tmp_path))
