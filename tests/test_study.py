"""Tests for study.py: the plan (every downstream cell starts from its own pre-training run, one
scratch baseline per arch and seed), a real tiny study through the stage scripts, resuming without
re-running a finished cell, and the mean +- spread report."""
import json
import os
import shutil
import threading
import time

import pytest
import torch

import study
from conftest import TINY_DVAE
from test_finetune import image_folder

TINY = dict(
    dvae_flags=[f for f in TINY_DVAE if f not in ("--device", "cpu")] + ["--max-steps", "3", "--warmup-steps", "1"],
    pretrain_flags=["--img-size", "16", "--patch-size", "4", "--batch-size", "8", "--gen-dim", "32",
                    "--gen-depth", "1", "--gen-heads", "2", "--max-steps", "2", "--num-workers", "0",
                    "--device", "cpu", "--warmup-epochs", "0", "--lr", "1e-3",
                    "--knn-every", "0"],  # the curve's extra k-NN pass: its flag is checked in the plan test
    finetune_flags=["--max-steps", "2", "--batch-size", "8", "--num-workers", "0", "--device", "cpu"],
    segment_flags=[])


def args(tmp_path, *extra):
    a = study.get_args_parser().parse_args(["--output-dir", str(tmp_path), *extra])
    for k, v in TINY.items():
        setattr(a, k, list(v))
    return a


def trained_tokenizer(tmp_path, tiny_dvae_ckpt):
    """The session's tiny tokenizer where the study keeps its own: the study reuses a finished one
    (test_a_tokenizer_stopped_midway_is_trained_on_and_a_finished_one_reused checks the command that
    would train it)."""
    (tmp_path / "tokenizer").mkdir()
    shutil.copy(tiny_dvae_ckpt, tmp_path / "tokenizer" / "checkpoint-latest.pth")


def test_plan_links_each_downstream_cell_to_its_pretraining_and_one_scratch_per_arch(tmp_path):
    cells = study.plan(args(tmp_path, "--only", "main", "--seeds", "0", "1"))
    keys = [c[0] for c in cells]
    assert len(keys) == len(set(keys))
    pre = [c for c in cells if c[1] == "pretrain.py"]
    assert len(pre) == 5 * 2  # 5 main settings (BEiT among them) x 2 seeds
    assert [c[2][:2] for c in pre if c[0].startswith("pretrain/beit-vit/")] == [["--method", "beit"]] * 2
    curve = [c[2] for c in pre if c[0].startswith("pretrain/revdet-vit/")]
    assert len(curve) == 2 and all(f[f.index("--knn-every") + 1] == "32" for f in curve)  # study.py --plot
    for key, script, flags, metric, needs in cells:
        if script == "pretrain.py":
            continue
        task, name, seed = key.split("/")
        if name.startswith("scratch-"):
            assert needs is None and flags[flags.index("--init") + 1] == "scratch"
            assert flags[flags.index("--arch") + 1] == name[len("scratch-"):]
        else:
            assert needs == f"pretrain/{name}/{seed}" and needs in keys
            assert keys.index(needs) < keys.index(key)  # pre-training runs first
        assert flags[flags.index("--seed") + 1] == seed[1:]
    scratch = sorted(k for k in keys if "/scratch-" in k)
    assert scratch == sorted(f"{t}/scratch-{a}/s{s}" for t in study.DOWNSTREAM for a in ("vit_mini", "resnet18")
                             for s in (0, 1))
    ablation = study.plan(args(tmp_path, "--only", "mask ratio", "--seeds", "0"))
    assert [c[0] for c in ablation] == ["pretrain/mask-0.3/s0", "pretrain/mask-0.5/s0", "pretrain/mask-0.7/s0"]
    third = study.plan(args(tmp_path, "--cells", "respix-vit", "respix-norm-patch", "--seeds", "2",
                            "--tasks", "finetune"))
    assert [c[0] for c in third] == ["pretrain/respix-vit/s2", "pretrain/respix-norm-patch/s2",
                                     "finetune/respix-vit/s2", "finetune/scratch-vit_mini/s2"]  # an ablation: no downstream


def test_budget_recipe_runs_each_stage_at_its_recipes_length(tmp_path):
    """--budget recipe (the fair protocol's tables): no step cut and no --recipe builtin on any cell,
    so each stage runs the recipe it picks for the data; the study budget cuts every one of them."""
    chosen = ["--cells", "revdet-vit", "beit-vit", "--tasks", "finetune", "blocks", "--seeds", "0"]
    fair, short = (study.plan(args(tmp_path, *chosen, *b)) for b in (["--budget", "recipe"], []))
    assert [c[0] for c in fair] == [c[0] for c in short] == [
        "pretrain/revdet-vit/s0", "pretrain/beit-vit/s0", "finetune/revdet-vit/s0", "finetune/scratch-vit_mini/s0",
        "blocks/revdet-vit/s0", "blocks/scratch-vit_mini/s0", "finetune/beit-vit/s0", "blocks/beit-vit/s0"]
    for (key, _, flags, _, _), (_, _, cut, _, _) in zip(fair, short):
        assert "--max-steps" not in flags and "--recipe" not in flags, key
        added = {"pretrain": ["--max-steps", "128", "--batch-size", "64", "--warmup-epochs", "0.25"],
                 "finetune": ["--recipe", "builtin", "--max-steps", "96", "--warmup-epochs", "0.25"],
                 "blocks": ["--recipe", "builtin"]}[key.split("/")[0]]  # the k-NN trains nothing: no cut
        # the study budget's flags, in one block; the rest is the same command
        assert any(cut == flags[:i] + added + flags[i:] for i in range(len(flags) + 1)), key
    assert fair[3][2] == ["--init", "scratch", "--arch", "vit_mini", "--seed", "0"]  # finetune.py's scratch recipe


def test_a_tiny_study_runs_resumes_and_reports(tmp_path, monkeypatch, capsys, tiny_dvae_ckpt):
    trained_tokenizer(tmp_path, tiny_dvae_ckpt)
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet", "--arch", "vit_mini"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {"finetune": ("finetune.py", [], "top1")})
    photos = image_folder(tmp_path / "photos")  # 25 images: the k-NN and evaluations take no time
    rows = study.main(args(tmp_path, "--seeds", "0", "--data", str(photos)))
    lines = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
    assert [r["cell"] for r in lines] == ["pretrain/revdet-vit/s0", "finetune/revdet-vit/s0",
                                          "finetune/scratch-vit_mini/s0"]
    assert 0 <= lines[0]["value"] <= 100 and 0 <= lines[0]["random_init"] <= 100
    assert 0 <= lines[0]["raw_pixels"] <= 100
    commands = [l for l in open(tmp_path / "study.log") if l.startswith("$ ")]
    assert len(commands) == 3 and all("--eval-split val" in c for c in commands)  # every cell: the split asked
    assert "--init" in lines[1]["flags"] and lines[1]["flags"][1].endswith("pretrain-revdet-vit-s0/backbone.pth")
    assert set(rows) == {"pretrain/revdet-vit", "finetune/revdet-vit", "finetune/scratch-vit_mini"}
    # a second call finds every cell done: nothing runs again, the report is the same
    monkeypatch.setattr(study, "run_stage", lambda *a: pytest.fail("a finished cell ran again"))
    assert study.main(args(tmp_path, "--seeds", "0", "--data", str(photos))) == rows
    study.main(args(tmp_path, "--list", "--seeds", "0", "--data", str(photos)))
    assert capsys.readouterr().out.count("done ") == 3


def test_a_tokenizer_stopped_midway_is_trained_on_and_a_finished_one_reused(tmp_path, monkeypatch):
    ckpt = tmp_path / "tokenizer" / "checkpoint-latest.pth"
    ckpt.parent.mkdir()
    calls = []
    monkeypatch.setattr(study, "run_stage", lambda script, flags, log: calls.append((script, flags)))
    torch.save({"step": 3, "total_steps": 10}, ckpt)
    assert study.tokenizer(args(tmp_path), 0, tmp_path / "study.log") == str(ckpt)
    assert [c[0] for c in calls] == ["dvae.py"]
    assert calls[0][1][:4] == ["--output-dir", str(ckpt.parent), "--seed", "0"]
    torch.save({"step": 10, "total_steps": 10}, ckpt)
    study.tokenizer(args(tmp_path), 0, tmp_path / "study.log")
    assert len(calls) == 1


def test_each_seed_fits_its_own_tokenizer_and_pretrains_with_it(tmp_path, monkeypatch):
    """A second seed varies the whole pipeline, the tokenizer's fit included (as a second hand-run
    pretrain.py does): dvae.py --seed S into tokenizer/ (seed 0) or tokenizer-sS/, and seed S's
    pre-training reads that one. A seed whose pre-training is done fits nothing."""
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {})
    calls = []

    def fake_stage(script, flags, log):
        calls.append((script, flags))
        out = flags[flags.index("--output-dir") + 1]
        if script == "dvae.py":
            os.makedirs(out)
            torch.save({"step": 1, "total_steps": 1}, os.path.join(out, "checkpoint-latest.pth"))
            return {}, 0.0
        return {"knn_pretrained": 30.0, "knn_random_init": 20.0, "knn_raw_pixels": 25.0}, 0.0
    monkeypatch.setattr(study, "run_stage", fake_stage)
    study.main(args(tmp_path, "--seeds", "0", "1"))
    fits = [f for s, f in calls if s == "dvae.py"]
    assert [(f[f.index("--seed") + 1], f[f.index("--output-dir") + 1]) for f in fits] == [
        ("0", str(tmp_path / "tokenizer")), ("1", str(tmp_path / "tokenizer-s1"))]
    read = {f[f.index("--seed") + 1]: f[f.index("--dvae") + 1] for s, f in calls if s == "pretrain.py"}
    assert read == {"0": str(tmp_path / "tokenizer" / "checkpoint-latest.pth"),
                    "1": str(tmp_path / "tokenizer-s1" / "checkpoint-latest.pth")}
    records = [json.loads(l) for l in open(tmp_path / "results.jsonl")]
    recorded = [study.ran_as([], r["flags"]) for r in records]
    assert [f[f.index("--dvae") + 1] for f in recorded] == [
        "OUTPUT_DIR/tokenizer/checkpoint-latest.pth", "OUTPUT_DIR/tokenizer-s1/checkpoint-latest.pth"]
    calls.clear()
    study.main(args(tmp_path, "--seeds", "0", "1", "2"))  # seeds 0 and 1 done: only seed 2 fits and trains
    assert [(s, f[f.index("--seed") + 1]) for s, f in calls] == [("dvae.py", "2"), ("pretrain.py", "2")]



def fake_study(monkeypatch, stage):
    """One pre-training cell and fine-tuning on it (and scratch); `stage(key, flags)` plays every cell's
    stage (a dvae.py fit writes a finished tokenizer), returning its result."""
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {"finetune": ("finetune.py", [], "top1")})

    def run_stage(script, flags, log):
        out = flags[flags.index("--output-dir") + 1]
        if script == "dvae.py":
            os.makedirs(out)
            torch.save({"step": 1, "total_steps": 1}, os.path.join(out, "checkpoint-latest.pth"))
            return {}, 0.0
        base, seed = os.path.basename(out).rsplit("-s", 1)  # runs/<task>-<name>-s<seed>
        key = "/".join(base.split("-", 1)) + f"/s{seed}"
        return stage(key, flags), 0.0
    monkeypatch.setattr(study, "run_stage", run_stage)


def test_jobs_run_cells_side_by_side_each_after_its_pretraining(tmp_path, monkeypatch):
    both = threading.Barrier(2, timeout=10)  # broken unless the two pre-trainings run at once
    lock, events, now = threading.Lock(), [], [0, 0]

    def stage(key, flags):
        if key.startswith("pretrain/"):
            both.wait()
        with lock:
            now[0] += 1
            now[1] = max(now[1], now[0])
            events.append(("start", key))
        time.sleep(0.05)
        with lock:
            now[0] -= 1
            events.append(("end", key))
        return {"knn_pretrained": 30.0, "knn_random_init": 20.0, "knn_raw_pixels": 25.0, "top1": 50.0}
    fake_study(monkeypatch, stage)
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.delenv("OMP_NUM_THREADS")  # restored (unset) after the test
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    study.main(args(tmp_path, "--seeds", "0", "1", "--jobs", "2"))
    assert os.environ["OMP_NUM_THREADS"] == "2"  # 4 cores / 2 jobs, for every stage it started
    assert now[1] == 2  # never more than --jobs at once
    done = [json.loads(l)["cell"] for l in open(tmp_path / "results.jsonl")]
    assert sorted(done) == sorted(c[0] for c in study.plan(args(tmp_path, "--seeds", "0", "1")))
    for seed in (0, 1):  # fine-tuning starts only once its backbone's pre-training has ended
        assert events.index(("end", f"pretrain/revdet-vit/s{seed}")) < \
            events.index(("start", f"finetune/revdet-vit/s{seed}"))


def test_with_jobs_a_failure_lets_the_running_cell_finish_and_be_recorded(tmp_path, monkeypatch, capsys):
    failed = threading.Event()

    def stage(key, flags):
        if key == "pretrain/revdet-vit/s0":
            failed.set()
            raise ChildProcessError("pretrain.py failed (exit 1): boom")
        assert failed.wait(10)
        time.sleep(1.0)  # still running when the study sees seed 0 fail
        return {"knn_pretrained": 30.0, "knn_random_init": 20.0, "knn_raw_pixels": 25.0, "top1": 50.0}
    fake_study(monkeypatch, stage)
    with pytest.raises(ChildProcessError, match="boom"):
        study.main(args(tmp_path, "--seeds", "0", "1", "--jobs", "2"))
    # seed 1's pre-training finished and is kept; nothing new started after the failure
    assert [json.loads(l)["cell"] for l in open(tmp_path / "results.jsonl")] == ["pretrain/revdet-vit/s1"]
    assert "waiting for the 1 running cell(s) to finish" in capsys.readouterr().out


def test_report_gives_mean_and_spread_over_seeds():
    done = {f"pretrain/a/s{s}": {"value": v, "random_init": 10.0} for s, v in enumerate((20.0, 22.0, 24.0))}
    done["finetune/a/s0"] = {"value": 50.0}
    rows = study.summarise(done)
    assert rows["pretrain/a"] == (22.0, 2.0, 3, 10.0)
    assert rows["finetune/a"] == (50.0, 0.0, 1, None)


def test_a_failing_stage_names_its_command_and_log(tmp_path, monkeypatch, tiny_dvae_ckpt):
    trained_tokenizer(tmp_path, tiny_dvae_ckpt)
    monkeypatch.setattr(study, "PRETRAIN", {"bad": ("main", ["--arch", "no_such_arch"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {})
    with pytest.raises(ChildProcessError, match=r"pretrain.py .*--arch no_such_arch.* failed \(exit 2\): "
                                                r"pretrain.py: error: argument --arch: invalid choice.*study.log"):
        study.main(args(tmp_path, "--seeds", "0"))


def test_report_prints_the_readme_tables_and_names_cells_within_the_spread(capsys):
    done = {"pretrain/revdet-vit/s0": {"value": 20.0, "random_init": 12.0},
            "pretrain/revdet-vit/s1": {"value": 22.0, "random_init": 14.0},
            "pretrain/mask-0.3/s0": {"value": 17.0, "random_init": 12.0},
            "pretrain/mask-0.3/s1": {"value": 19.0, "random_init": 14.0},
            "pretrain/argmax/s0": {"value": 21.0, "random_init": 12.0},
            "pretrain/argmax/s1": {"value": 22.0, "random_init": 14.0},
            "linear/revdet-vit/s0": {"value": 30.0}, "linear/scratch-vit_mini/s0": {"value": 25.0}}
    done["pretrain/revdet-vit/s0"]["raw_pixels"] = done["pretrain/revdet-vit/s1"]["raw_pixels"] = 19.0
    done["pretrain/beit-vit/s0"] = {"value": 16.0, "random_init": 12.0, "raw_pixels": 19.0}
    done["pretrain/beit-vit/s1"] = {"value": 18.0, "random_init": 14.0, "raw_pixels": 19.0}
    for seed, layers in ((0, [10.0, 20.0]), (1, [12.0, 22.0])):
        done[f"blocks/revdet-vit/s{seed}"] = {"cell": f"blocks/revdet-vit/s{seed}", "value": 22.0, "layers": layers}
    for key in done:
        done[key].setdefault("cell", key)
    study.report(done)
    out = capsys.readouterr().out
    assert "evaluated on val/" in out
    assert "| raw pixels, mean-centred (no network) | 19.0 | - | - | - |" in out
    assert "| vit_mini, BEiT | 17.0 ± 1.4 | - | - | - |" in out
    assert "| revdet-vit (2 seeds) | 11.0 | 21.0 |" in out
    assert "| vit_mini, scratch (random init) | 13.0 | 25.0 ± 0.0 (1) | - | - |" in out
    assert "| vit_mini, CIM-revdet | 21.0 ± 1.4 | 30.0 ± 0.0 (1) | - | - |" in out
    assert "| mask ratio | 0.3 | 18.0 ± 1.4 | -3.0 |" in out
    # each seed's own numbers, as docs/study.md's seed 0 / seed 1 tables give them
    assert "| pretrain/revdet-vit | 20.0 (12.0, 19.0) | 22.0 (14.0, 19.0) |" in out
    assert "| pretrain/argmax | 21.0 (12.0, -) | 22.0 (14.0, -) |" in out
    assert "| blocks/revdet-vit | 22.0 [10.0 20.0] | 22.0 [12.0 22.0] |" in out
    assert "| linear/scratch-vit_mini | 25.0 | - |" in out
    assert "| mask ratio | 0.25 (recipe) | 21.0 ± 1.4 |  |" in out
    assert "| sampling | argmax | 21.5 ± 0.7 | +0.5 |" in out
    # mask 0.3 is 3.0 below the default with a spread of 1.4: settled; argmax is 0.5 off: 3 seeds
    close = out.split("within the seed-to-seed spread")[1]
    assert "pretrain/argmax vs pretrain/revdet-vit (sampling)" in close and "mask-0.3" not in close


def test_plot_draws_each_seed_curve_from_the_runs_logs(tmp_path):
    for seed, accs in ((0, (20.0, 24.0, 30.0)), (1, (21.0, 25.0, 28.0))):
        run = tmp_path / "runs" / f"pretrain-revdet-vit-s{seed}"
        run.mkdir(parents=True)
        lines = [{"step": 0, "knn": accs[0]}, {"step": 32, "loss": 1.0}, {"step": 32, "knn": accs[1]},
                 {"steps": 64, "knn_pretrained": accs[2], "knn_random_init": 18.0}]
        (run / "log.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (tmp_path / "runs" / "pretrain-mask-0.3-s0").mkdir()  # other cells are not drawn
    curves = study.knn_curves(str(tmp_path))
    assert curves == {0: ([(0, 20.0), (32, 24.0), (64, 30.0)], 18.0), 1: ([(0, 21.0), (32, 25.0), (64, 28.0)], 18.0)}
    img = study.plot_knn(curves, str(tmp_path / "knn.png"), "test", size=(640, 400))
    assert img.size == (640, 400) and (tmp_path / "knn.png").is_file()
    # accuracies 18..30: a grid line every 2 %, y 18..32 % over pixels 350..68 (the title and two
    # legend lines above), x 0..64 over 60..610; seed 0's last point is blue
    x, y = 60 + 550 * 64 / 64, 350 - 282 * (30.0 - 18) / 14
    assert img.getpixel((round(x) - 1, round(y))) == (31, 119, 180)
    # the legend lines lie above the plot, not over its curves: seed 1's red text (anti-aliased) is
    # in the band at y 44..56, and between the plot's top (68) and its highest red point (28 % at
    # y 148) nothing is red
    reddish = lambda p: p[0] > 150 and p[1] < 120 and p[2] < 120
    red = lambda ys: [(x, y) for x in range(60, 610) for y in ys if reddish(img.getpixel((x, y)))]
    assert red(range(44, 57)) and not red(range(68, 140))
    with pytest.raises(ValueError, match="no finished pre-training run"):
        study.plot_knn(study.knn_curves(str(tmp_path / "empty")), str(tmp_path / "x.png"), "t")


def test_ablations_are_read_against_the_recipe_pretrain_py_picks_for_the_data(tmp_path):
    from PIL import Image
    for name, side in (("photos", 32), ("large", 128)):  # pretrain.py's photos / imagenet recipe
        for split in ("train", "val"):
            (tmp_path / name / split / "a").mkdir(parents=True)
            Image.new("RGB", (side, side)).save(tmp_path / name / split / "a" / "0.png")
    builtin = [c[0] for c in study.plan(args(tmp_path, "--only", "mask ratio", "--seeds", "0"))]
    large = [c[0] for c in study.plan(args(tmp_path, "--only", "mask ratio", "--seeds", "0",
                                           "--data", str(tmp_path / "large")))]
    assert builtin == ["pretrain/mask-0.3/s0", "pretrain/mask-0.5/s0", "pretrain/mask-0.7/s0"]  # recipe: 0.25
    assert large == ["pretrain/mask-0.3/s0", "pretrain/mask-0.7/s0"]  # 0.5 is the imagenet recipe's
    assert study.ablation_values(args(tmp_path, "--data", str(tmp_path / "photos")), "mask ratio") == \
        {"revdet-vit": 0.25, "mask-0.3": 0.3, "mask-0.5": 0.5, "mask-0.7": 0.7}
    assert study.ablation_values(args(tmp_path, "--data", str(tmp_path / "large")), "mask ratio") == \
        {"revdet-vit": 0.5, "mask-0.3": 0.3, "mask-0.5": 0.5, "mask-0.7": 0.7}


def test_report_lists_each_stage_against_steps_from_the_per_stage_curves(tmp_path, capsys):
    """The ResNet cell logs --knn-blocks at every --knn-every check; the report prints each point's
    stages, the final check last, so a last stage that peaks and collapses shows."""
    cells = study.plan(args(tmp_path, "--cells", "revdet-resnet18", "--tasks", "blocks", "--seeds", "0"))
    flags = cells[0][2]
    assert flags[flags.index("--knn-every") + 1] == "32" and "--knn-blocks" in flags
    run = tmp_path / "runs" / "pretrain-revdet-resnet18-s0"
    run.mkdir(parents=True)
    records = [{"step": 0, "tokenizer_perplexity": 300.0}, {"step": 0, "knn": 30.0, "knn_stages": [30, 31, 32, 33]},
               {"step": 32, "loss": 1.0}, {"step": 32, "knn": 36.0, "knn_stages": [35, 36, 37, 38.25]},
               {"steps": 64, "knn_pretrained": 31.0, "knn_stages": [36, 37, 38, 31]}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study.layer_curves(str(tmp_path)) == {"revdet-resnet18": {0: [
        (0, [30, 31, 32, 33]), (32, [35, 36, 37, 38.25]), (64, [36, 37, 38, 31])]}}
    study.report({}, args(tmp_path))
    out = capsys.readouterr().out
    assert "| revdet-resnet18: k-NN per block / stage against steps |" in out
    assert "| seed 0 | 32 | 35.0 | 36.0 | 37.0 | 38.2 |" in out and "| seed 0 | 64 | 36.0 | 37.0 | 38.0 | 31.0 |" in out
