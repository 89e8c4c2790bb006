"""Faults around a run, by mechanism: the folder's lock, the checkpoint that falls back, a full disk,
the folder's record (run.json) and what it protects, flags that would do nothing, checks that must run
before any work, and evaluations on class folders that do not match. (Signals: tests/test_pretrain.py,
next to the kill -9 test; the data's own faults: tests/test_faults_data.py.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import finetune
import pretrain
import runs
import training
from conftest import REPO, subprocess_env
from test_finetune import image_folder, tiny


def ft(*argv):
    return finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))


def command(script, *argv):
    """Run a stage script as a user does; (exit status, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def one_line_refusal(status, err, script):
    assert status == 2 and err.count("\n") == 1 and err.startswith(f"{script}: error: "), err
    return err


PRETRAIN_TINY = ["--img-size", "16", "--patch-size", "4", "--batch-size", "4", "--gen-dim", "32", "--gen-depth",
                 "1", "--gen-heads", "2", "--arch", "vit_mini", "--knn-k", "0", "--num-workers", "0", "--device",
                 "cpu", "--min-tokenizer-perplexity", "0", "--max-steps", "2", "--lr", "1e-3",
                 "--warmup-epochs", "0"]

# ----------------------------------------------------------------------------------------------------
# One run per folder: OUTPUT_DIR/run.lock
# ----------------------------------------------------------------------------------------------------


def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "run.lock"
        lock.write_text(f"{other.pid} {__import__('socket').gethostname()}\n")
        with pytest.raises(ValueError, match=rf"--output-dir '{tmp_path}' is in use by another run \(PID "
                                             rf"{other.pid} on .*delete .*run.lock"):
            runs.claim_output_dir(str(tmp_path))
        assert lock.read_text().split()[0] == str(other.pid)  # left to its owner
    finally:
        other.kill()
        other.wait()
    runs.claim_output_dir(str(tmp_path))  # that PID is gone now: the folder is taken over, with a note
    assert f"was left by PID {other.pid}, which no longer runs" in capsys.readouterr().err
    assert lock.read_text().split()[0] == str(os.getpid())
    runs.claim_output_dir(str(tmp_path))  # the same process again (a stage called twice): fine
    runs.release_output_dir(str(lock), lock.read_text())
    assert not lock.exists()
    runs.claim_output_dir(str(tmp_path), rank=1)  # the other ranks of a torchrun job hold nothing
    assert not lock.exists()


def test_a_second_command_in_a_busy_folder_is_refused_on_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import runs, time; runs.claim_output_dir({str(tmp_path)!r}); "
                               f"print('held', flush=True); time.sleep(60)"], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_refusal(*command("finetune.py", "--init", "scratch", "--output-dir", tmp_path), "finetune.py")
        assert f"is in use by another run (PID {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait()
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]  # the refused run wrote nothing


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the previous one kept and used, a full disk named
# ----------------------------------------------------------------------------------------------------


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    path = str(tmp_path / "checkpoint-latest.pth")
    for step in (1, 2):
        training.save_checkpoint({"stage": "pretrain.py", "step": step, "w": torch.full((4,), float(step))}, path,
                                 keep_previous=True)
    assert training.load_checkpoint(training.previous_path(path))["step"] == 1
    with open(path, "r+b") as f:  # cut short, as a crash or a copy leaves it
        f.truncate(os.path.getsize(path) // 2)
    args = pretrain.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    found, ckpt = runs.find_resume_checkpoint(args, "pretrain.py", set())
    assert found == training.previous_path(path) and ckpt["step"] == 1
    assert "resuming from the previous checkpoint" in capsys.readouterr().err
    os.remove(training.previous_path(path))
    with pytest.raises(ValueError, match=r"is not a readable PyTorch checkpoint .*no previous checkpoint .*delete "
                                         r"it to start again from step 0"):
        runs.find_resume_checkpoint(args, "pretrain.py", set())


def test_a_full_disk_is_named_with_the_room_needed_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-latest.pth")
    training.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path, keep_previous=True)

    def full_disk_save(obj, f):  # torch writes part of the file, then the stream fails
        with open(f, "wb") as out:
            out.write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(OSError, match=rf"no space left on {tmp_path} to save checkpoint-latest.pth \(needs ~0 MiB, "
                                      r"free 0 MiB\): free some room"):
        training.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path, keep_previous=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-latest.pth"]  # no .tmp, no half-moved previous
    assert training.load_checkpoint(path)["step"] == 1


# ----------------------------------------------------------------------------------------------------
# The folder's record: run.json written whole, read or named; what it protects
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, says", [("", r"is unreadable \(empty\)"), ('{"stage": "finetune.py", "ar', "is unreadable"),
                                        ("[1, 2]", "is not a record of this project"),
                                        ('{"stage": "finetune.py"}', r"'args' expected")])
def test_an_unreadable_run_json_is_named_with_what_to_do(tmp_path, text, says):
    (tmp_path / "run.json").write_text(text)
    err = one_line_refusal(*command("finetune.py", "--init", "scratch", "--output-dir", tmp_path, "--max-steps", "1"),
                           "finetune.py")
    assert f"{tmp_path / 'run.json'} " in err and "delete it if the run in" in err
    assert __import__("re").search(says, err), err


def test_a_run_that_saved_nothing_does_not_block_the_next_and_paths_compare_resolved(tmp_path, monkeypatch):
    photos = image_folder(tmp_path / "photos")
    out = tmp_path / "ft"
    out.mkdir()
    runs.write_json({"stage": "finetune.py", "args": {"blr": 1.0, "data": "elsewhere"}}, str(out / "run.json"))
    ft(*tiny(photos, out, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
             "--max-steps", "2", "--save-every", "1"))  # other flags, but that run left no work: a fresh start
    assert json.load(open(out / "run.json"))["args"]["data"] == str(photos)
    os.remove(out / "checkpoint-latest.pth")
    os.remove(out / "checkpoint-latest.prev.pth")
    for f in ("classifier.pth", "checkpoint-best.pth"):
        os.remove(out / f)
    monkeypatch.chdir(tmp_path)  # the same data named relative and with a trailing slash: the same flag
    with pytest.raises(ValueError, match=r"was written with other flags \(--blr"):  # its log of steps is kept
        ft(*tiny("photos/", out, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
                 "--max-steps", "2", "--blr", "7e-3"))
    ft(*tiny("photos/", out, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
             "--max-steps", "2"))
    assert runs.same_value("photos/", str(photos)) and not runs.same_value("photos/", str(tmp_path))


def test_knn_mode_keeps_to_a_folder_of_its_own(tmp_path):
    photos = image_folder(tmp_path / "photos")
    trained = tmp_path / "ft"
    ft(*tiny(photos, trained, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
             "--max-steps", "1"))
    log = (trained / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="holds a training run .*give --mode knn a folder of its own"):
        ft(*tiny(photos, trained, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
                 "--mode", "knn", "--knn-k", "3"))
    assert (trained / "log.jsonl").read_text() == log
    knn = tmp_path / "knn"
    flags = tiny(photos, knn, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
                 "--mode", "knn", "--knn-k", "3")
    first = ft(*flags)
    assert ft(*flags) == first == json.load(open(knn / "knn.json"))  # the same command again: the same result
    with pytest.raises(ValueError, match=r"was written with other flags \(--knn-k 3 -> 5\)"):
        ft(*flags, "--knn-k", "5")


# ----------------------------------------------------------------------------------------------------
# Flags that would do nothing, and contradictions found before any work
# ----------------------------------------------------------------------------------------------------


def test_flags_that_would_do_nothing_are_refused_naming_them(tmp_path):
    cases = [
        ("pretrain.py", ["--arch", "vit_mini", "--resnet-stem", "small"], "--resnet-stem applies to ResNets; --arch is vit_mini"),
        ("pretrain.py", ["--method", "beit", "--objective", "respix"], "--objective is the CIM enhancer's loss"),
        ("finetune.py", ["--init", "scratch", "--arch", "vit_mini", "--resnet-stem", "small"],
         "--resnet-stem applies to ResNets; the backbone is vit_mini"),
        ("finetune.py", ["--init", "scratch", "--arch", "vit_mini", "--eval-size", "30"],
         "--eval-size 30 is not a multiple of the ViT's patch size 4: use a multiple, e.g. 28"),
        ("pretrain.py", ["--gen-dim", "65", "--gen-heads", "2"],
         "these flags describe no network that runs (width 65 is not divisible by 2 heads): check --arch vit_mini"),
        ("pretrain.py", ["--seed", str(2 ** 64)], "argument --seed: must be a number in [0, 2**32)"),
        ("segment.py", ["--init", "scratch", "--seed", "-1"], "argument --seed: must be a number in [0, 2**32)"),
    ]
    for i, (script, argv, says) in enumerate(cases):
        out = tmp_path / str(i)
        err = one_line_refusal(*command(script, *argv, "--output-dir", out, "--max-steps", "1"), script)
        assert says in err, err
        assert not out.exists() or os.listdir(out) == []  # before any work: no tokenizer, no run.json


def test_a_resnet_stem_other_than_the_checkpoints_is_refused(tmp_path):
    import enhancer as enh
    path = tmp_path / "r18.pth"
    torch.save(enh.build_backbone("resnet18", img_size=32, small_stem=True).state_dict(), path)
    args = finetune.get_args_parser().parse_args(["--init", str(path), "--resnet-stem", "imagenet"])
    with pytest.raises(ValueError, match="--resnet-stem imagenet, but --init .* has the small stem"):
        finetune.resolve_args(args)
    args = finetune.get_args_parser().parse_args(["--init", str(path), "--resnet-stem", "small"])
    assert finetune.resolve_args(args).resnet_stem == "small"


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"hello\n"], ids=["bytes", "text"])
def test_a_tokenizer_file_that_is_no_checkpoint_is_one_line(tmp_path, content):
    bad = tmp_path / "tok.pth"
    bad.write_bytes(content)
    err = one_line_refusal(*command("pretrain.py", "--dvae", bad, "--output-dir", tmp_path / "out"), "pretrain.py")
    assert f"tokenizer checkpoint (--dvae) '{bad}' is not a readable PyTorch checkpoint" in err


def test_a_cached_tokenizer_made_by_other_flags_is_refused_not_reused(tmp_path, tiny_dvae_ckpt, capsys):
    out = tmp_path / "out"
    argv = PRETRAIN_TINY + ["--output-dir", str(out)]
    pretrain.main(pretrain.get_args_parser().parse_args(argv))  # fits the k-means codebook, caches it
    cached = torch.load(out / "tokenizer" / "checkpoint-latest.pth", weights_only=True)
    assert cached["args"]["preset"] == "kmeans"
    for f in os.listdir(out):  # keep the cached tokenizer alone: a new run in the folder
        if f != "tokenizer":
            os.remove(out / f)
    with pytest.raises(ValueError, match=r"tokenizer/checkpoint-latest.pth was fitted with other flags \(--preset "
                                         r"'kmeans', not 'small'\).*delete .*tokenizer to fit it again"):
        pretrain.main(pretrain.get_args_parser().parse_args(argv + ["--tokenizer", "small"]))
    capsys.readouterr()
    pretrain.main(pretrain.get_args_parser().parse_args(PRETRAIN_TINY + ["--output-dir", str(tmp_path / "o2"),
                                                                         "--dvae", tiny_dvae_ckpt]))
    assert "was fitted on" not in capsys.readouterr().out  # the data it was fitted on: no note
    photos = image_folder(tmp_path / "photos")
    pretrain.main(pretrain.get_args_parser().parse_args(PRETRAIN_TINY + ["--output-dir", str(tmp_path / "o3"),
                                                                         "--dvae", tiny_dvae_ckpt, "--data", str(photos)]))
    assert f"note: --dvae {tiny_dvae_ckpt} was fitted on the built-in data; this run trains on {photos}" in \
        capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Class folders that differ between the training and the evaluation set: every evaluating stage
# ----------------------------------------------------------------------------------------------------


def test_every_evaluation_refuses_class_folders_that_differ_naming_them(tmp_path):
    photos = image_folder(tmp_path / "photos")
    (photos / "val" / "c1").rename(photos / "val" / "c9")
    says = "train/ and val/ hold different class folders: only in train/: c1; only in val/: c9"
    for i, mode in enumerate(("knn", "finetune", "linear")):
        with pytest.raises(ValueError, match=says):
            ft(*tiny(photos, tmp_path / f"ft{i}", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                     "--patch-size", "4", "--max-steps", "1", "--mode", mode))
    args = pretrain.get_args_parser().parse_args(["--data", str(photos), "--img-size", "16", "--patch-size", "4"])
    with pytest.raises(ValueError, match=says):
        pretrain.knn_datasets(pretrain.resolve_args(args))
