"""Bad input and faults: found before training, one line on the command line, finished work kept.

Every refusal of a stage script is one line, `SCRIPT: error: MESSAGE`, exit status 2 (a test per class:
flag, file, data, resume, run as commands); a bad validation set costs seconds, never a training;
a folder holding another run's results is not overwritten; a finished run run again says so and
prints its result; the study records a cell only when its result is complete.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import enhancer as enh
import finetune
import segment
import study
from conftest import REPO, subprocess_env
from test_finetune import image_folder, tiny
from test_segment import ade_folder, seg_flags


def ft(*argv):
    return finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))


def seg(*argv):
    return segment.main(segment.get_args_parser().parse_args([str(a) for a in argv]))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def command(script, *argv):
    """Run a stage script as a user does; (exit status, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


# ----------------------------------------------------------------------------------------------------
# One line per refusal, as a command: a flag, a file, the data, a resume
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    photos = image_folder(root / "photos")
    out = root / "ft"
    ft(*tiny(photos, out, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
             "--max-steps", "2"))
    return photos, out


def test_every_class_of_refusal_is_one_line_with_status_2(tmp_path, finetuned):
    photos, ft_out = finetuned
    (tmp_path / "empty" / "train").mkdir(parents=True)
    cases = [  # (script, argv, what the one line must say)
        ("pretrain.py", ["--accum-iter", "0"], "argument --accum-iter: must be a number > 0, got 0"),   # flag
        ("finetune.py", ["--init", tmp_path / "nope.pth"], "--init"),                                      # file
        ("finetune.py", ["--init", "scratch", "--data", tmp_path / "empty"], "holds no images"),          # data
        ("pretrain.py", ["--output-dir", ft_out, "--device", "cpu"], "written by finetune.py, not pretrain.py"),  # resume
    ]
    for script, argv, says in cases:
        status, err = command(script, *argv)
        assert status == 2, (script, argv, err[-2000:])
        assert err.count("\n") == 1 and err.startswith(f"{script}: error: ") and says in err, err
        assert "Traceback" not in err


def test_cim_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "finetune.py"), "--init", str(tmp_path / "nope.pth")],
                          cwd=REPO, env=dict(subprocess_env(), CIM_DEBUG="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("kind, says", [
    ("text", "is not a torch checkpoint of tensors"),
    ("bytes", "is not a torch checkpoint of tensors"),
    ("folder", "is a folder"),
    ("tokenizer", "is a dvae.py tokenizer checkpoint (pretrain.py's --dvae), not a backbone"),
])
def test_a_wrong_init_file_says_what_it_is_and_what_init_takes(tmp_path, kind, says, tiny_dvae_ckpt):
    path = tmp_path / "init"
    if kind == "text":
        path.write_text("just some notes\n")
    elif kind == "bytes":
        path.write_bytes(os.urandom(300))
    elif kind == "folder":
        path.mkdir()
    else:
        path = tiny_dvae_ckpt  # the session's tokenizer (tests/conftest.py)
    with pytest.raises(ValueError) as err:
        enh.read_backbone(str(path))
    assert says in str(err.value) and "--init takes a pre-training checkpoint" in str(err.value)
    assert "weights_only" not in str(err.value) and "KeyError" not in str(err.value)


def test_resume_from_another_stage_or_an_export_names_what_wrote_it(tmp_path, pretrained):
    photos = image_folder(tmp_path / "photos")
    with pytest.raises(ValueError, match=r"was written by pretrain.py, not finetune.py"):
        ft(*tiny(photos, tmp_path / "a", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                 "--patch-size", "4", "--resume", pretrained / "checkpoint-latest.pth"))
    with pytest.raises(ValueError, match=r"written by an export \(backbone.pth or classifier.pth\)"):
        ft(*tiny(photos, tmp_path / "b", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                 "--patch-size", "4", "--resume", pretrained / "backbone.pth"))


# ----------------------------------------------------------------------------------------------------
# Finished work is never lost
# ----------------------------------------------------------------------------------------------------

def test_a_folder_with_another_runs_results_is_not_overwritten(tmp_path, finetuned):
    photos, _ = finetuned
    out = tmp_path / "ft"
    flags = tiny(photos, out, "--init", "scratch", "--arch", "vit_mini", "--img-size", "16", "--patch-size", "4",
                 "--max-steps", "2")
    ft(*flags)
    os.remove(out / "checkpoint-latest.pth")  # a finished run, its latest checkpoint cleaned away
    kept = {f: os.path.getmtime(out / f) for f in ("checkpoint-best.pth", "classifier.pth", "log.jsonl")}
    for again in (flags, flags + ["--blr", "5e-3"]):  # nothing to continue from: never retrained over
        with pytest.raises(ValueError, match=r"holds results of an earlier run \(checkpoint-best.pth, "
                                             r"classifier.pth, log.jsonl\) and no checkpoint to continue it from"):
            ft(*again)
    os.remove(out / "run.json")  # a folder written before run.json existed: its flags are unknown
    with pytest.raises(ValueError, match=r"holds results of an earlier run \(checkpoint-best.pth, classifier.pth, "
                                         r"log.jsonl\)"):
        ft(*flags, "--blr", "5e-3")
    assert {f: os.path.getmtime(out / f) for f in kept} == kept


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--output-dir .*file' is a file, not a folder"):
        ft("--init", "scratch", "--arch", "vit_mini", "--output-dir", tmp_path / "file", "--device", "cpu")


def test_a_bad_validation_set_costs_no_training_then_the_epoch_is_evaluated(tmp_path, monkeypatch):
    photos = image_folder(tmp_path / "photos")
    good = {p: p.read_bytes() for p in (photos / "val").rglob("*.png")}
    for p in good:
        p.write_bytes(b"not an image")
    flags = tiny(photos, tmp_path / "out", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                 "--patch-size", "4", "--epochs", "1")
    with pytest.raises(ValueError, match=r"val set: none of the 9 images in .* can be read"):
        ft(*flags)  # found by the headers at start (data.check_readable)
    assert not (tmp_path / "out" / "checkpoint-latest.pth").exists()
    with monkeypatch.context() as m:  # a set that breaks after the start (a network disk): found at evaluation
        m.setattr(data, "check_readable", lambda *a: None)
        with pytest.raises(ValueError, match="none of the 9 validation images could be read"):
            ft(*flags)
    ckpt = load(tmp_path / "out" / "checkpoint-latest.pth")
    assert ckpt["step"] == 4 and ckpt["pending_eval"]  # the epoch was saved before its evaluation
    for p, b in good.items():
        p.write_bytes(b)
    result = ft(*flags)  # resumes: evaluates the saved epoch, trains nothing again
    assert result["epoch"] == 1 and result["n_val"] == 9 and result["step"] == 4
    assert [r["epoch"] for r in map(json.loads, open(tmp_path / "out" / "log.jsonl"))] == [1]


def test_an_unreadable_validation_image_is_left_out_and_counted_once(tmp_path):
    photos = image_folder(tmp_path / "photos")
    (photos / "val" / "c0" / "0.png").write_bytes(b"corrupt")
    result = ft(*tiny(photos, tmp_path / "out", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                      "--patch-size", "4", "--max-steps", "1"))
    assert result["n_val"] == 8 and result["n_val_unreadable"] == 1  # not its neighbour counted twice


def test_a_finished_run_run_again_says_so_and_prints_its_result(tmp_path, finetuned, capsys):
    photos, _ = finetuned
    flags = tiny(photos, tmp_path / "ft", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                 "--patch-size", "4", "--max-steps", "2")
    first = ft(*flags)
    os.remove(tmp_path / "ft" / "classifier.pth")  # killed while it wrote the classifier
    capsys.readouterr()
    again = ft(*flags)
    out = capsys.readouterr().out
    assert "holds a finished run (2 of 2 steps)" in out
    assert json.loads(out.strip().splitlines()[-1])["top1"] == first["val_top1"] == again["val_top1"]
    assert (tmp_path / "ft" / "classifier.pth").is_file()
    # segmentation: the same
    root = ade_folder(tmp_path / "ade")
    sflags = seg_flags(root, tmp_path / "seg", "--iters", "2", "--eval-every", "2")
    first = seg(*sflags)
    capsys.readouterr()
    again = seg(*sflags)
    assert "holds a finished run (2 of 2 iterations)" in capsys.readouterr().out
    assert again["mIoU"] == first["mIoU"]


def test_finetune_that_diverges_ends_in_the_max_skips_error(tmp_path, finetuned):
    photos, _ = finetuned
    with pytest.raises(FloatingPointError, match=r"finetune.py: 2 non-finite steps"):
        ft(*tiny(photos, tmp_path / "out", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
                 "--patch-size", "4", "--max-steps", "8", "--lr", "1e30", "--max-skips", "1"))
    assert not (tmp_path / "out" / "classifier.pth").exists()


# ----------------------------------------------------------------------------------------------------
# Data and segmentation checks at start
# ----------------------------------------------------------------------------------------------------

def test_one_class_is_refused_and_an_empty_class_folder_warned(tmp_path, capsys):
    photos = image_folder(tmp_path / "photos", n_train=(8, 0), n_val=(3, 0))
    with pytest.raises(ValueError, match="train/ has 1 class folder; classification needs at least 2"):
        os.rmdir(photos / "train" / "c1")
        os.rmdir(photos / "val" / "c1")
        ft(*tiny(photos, tmp_path / "out", "--init", "scratch", "--arch", "vit_mini", "--img-size", "16"))
    (photos / "train" / "c1").mkdir()
    data.ImageFolder(str(photos / "train"))
    assert f"class folder {photos / 'train' / 'c1'} holds no images" in capsys.readouterr().err


def test_an_int32_image_of_8_bit_values_keeps_its_brightness(tmp_path):
    values = np.arange(0, 256, dtype=np.int32).reshape(16, 16)
    Image.fromarray(values).save(tmp_path / "i32.tif")
    img = data.load_rgb(tmp_path / "i32.tif")
    assert np.asarray(img)[..., 0].tolist() == values.tolist()


@pytest.mark.parametrize("case, says", [
    ("value", "holds value 9, outside the 3 classes"),
    ("size", "px, its image"),
    ("rgb", "has mode RGB"),
    ("all_ignored", "every pixel of every validation label is ignored"),
])
def test_a_bad_validation_label_is_found_before_training(tmp_path, case, says):
    root = ade_folder(tmp_path / "ade")
    labels = sorted((root / "annotations" / "validation").glob("*.png"))
    if case == "value":
        lab = np.asarray(Image.open(labels[1])).copy()
        lab[0, 0] = 9
        Image.fromarray(lab).save(labels[1])
    elif case == "size":
        Image.fromarray(np.ones((3, 3), np.uint8)).save(labels[2])
    elif case == "rgb":
        Image.open(labels[0]).convert("RGB").save(labels[0])
    else:
        for path in labels:
            Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)
    with pytest.raises(ValueError, match=says):
        seg(*seg_flags(root, tmp_path / "out", "--iters", "50"))
    assert not (tmp_path / "out" / "checkpoint-latest.pth").exists() and not (tmp_path / "out" / "log.jsonl").exists()


def test_evaluation_batches_images_of_any_size(tmp_path):
    root = ade_folder(tmp_path / "ade")  # validation images of three sizes
    result = seg(*seg_flags(root, tmp_path / "out", "--iters", "1", "--eval-every", "1", "--eval-batch-size", "3"))
    assert 0 <= result["mIoU"] <= 100


def test_layers_and_crops_that_cannot_fit_are_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match=r"--layers 2 3 4 9: the backbone has 6 blocks"):
        seg("--init", "scratch", "--arch", "vit_mini", "--layers", "2", "3", "4", "9", "--output-dir", tmp_path / "a",
            "--device", "cpu", "--num-workers", "0")
    with pytest.raises(ValueError, match=r"--crop-size 512 on a patch-4 backbone is 16384 tokens a crop: one "
                                         r"attention map of a batch of 4096 takes .* GiB"):
        seg("--init", "scratch", "--arch", "vit_mini", "--crop-size", "512", "--batch-size", "4096",
            "--output-dir", tmp_path / "b", "--device", "cpu", "--num-workers", "0")
    assert not os.listdir(tmp_path / "b")


# ----------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------

def test_study_refuses_unknown_groups_missing_data_and_empty_reports(tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.get_args_parser().parse_args(["--only", "bogus"])
    err = capsys.readouterr().err
    assert err.startswith("study.py: error: argument --only: invalid choice: 'bogus'") and "main" in err
    with pytest.raises(FileNotFoundError, match=r"--data .*nowhere: no such folder"):
        study.main(study.get_args_parser().parse_args(["--data", str(tmp_path / "nowhere"),
                                                       "--output-dir", str(tmp_path / "s")]))
    with pytest.raises(FileNotFoundError, match=r"no results there"):
        study.main(study.get_args_parser().parse_args(["--report", "--output-dir", str(tmp_path / "typo")]))
    assert not (tmp_path / "typo").exists()


def test_study_records_a_cell_only_with_its_whole_result(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "PRETRAIN", {"revdet-vit": ("main", ["--objective", "revdet"])})
    monkeypatch.setattr(study, "DOWNSTREAM", {"linear": ("finetune.py", ["--mode", "linear"], "top1")})
    monkeypatch.setattr(study, "tokenizer", lambda args, seed, log: "tok.pth")

    def run_stage(script, flags, log_path):
        if script == "pretrain.py":
            return {"knn_pretrained": 30.0, "knn_random_init": 20.0}, 0.1
        return {"top1": None}, 0.1  # a finished run that printed no result (killed while it saved)

    monkeypatch.setattr(study, "run_stage", run_stage)
    with pytest.raises(ChildProcessError, match=r"printed no top1"):
        study.main(study.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--seeds", "0"]))
    done = study.read_results(tmp_path / "results.jsonl")
    assert list(done) == ["pretrain/revdet-vit/s0"]  # the incomplete cell is not recorded: a rerun redoes it


def test_study_passes_its_recipe_to_every_downstream_stage():
    """--segment-flags without --recipe once put the imagenet recipe's 512 px crops on a patch-4 backbone."""
    cells = study.plan(study.get_args_parser().parse_args(["--seeds", "0"]))
    downstream = [flags for key, script, flags, _, _ in cells if script != "pretrain.py"]
    assert downstream and all(f[f.index("--recipe") + 1] == "builtin" for f in downstream)
