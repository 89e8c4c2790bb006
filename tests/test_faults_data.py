"""Tests of the data faults found before training (data.py, segment.py): symlinks that would give an
image two labels, class folders that differ between train/ and val/, EXIF orientation, a corrupt
first image in recipe detection, evaluation sets and label files checked by header, sliding-window
strides that leave pixels uncovered, and a crop size that is not a whole number of patches.

Every image is written with PIL into pytest's tmp_path, 8 to 32 px a side."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import enhancer as enh
import segment
from conftest import REPO, subprocess_env
from test_segment import ade_folder, seg_flags


def write(path, img=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (img or Image.new("RGB", (8, 8), (90, 40, 200))).save(path, **kw)
    return str(path)


def corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"not an image at all")
    return str(path)


def folder(root, counts):
    """root/<class>/<i>.png, counts = {class: number of images}."""
    for name, n in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(n):
            write(root / name / f"{i:02d}.png")
    return root


def rel_samples(ds, root):
    return [(os.path.relpath(p, root), label) for p, label in ds.samples]


def seg_run(*argv):
    return segment.main(segment.get_args_parser().parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------------
# 1. Symlinks: an image counts once, and never under two classes
# ----------------------------------------------------------------------------------------------------

def test_a_link_into_another_class_is_refused_naming_file_folders_and_link(tmp_path):
    """`train/cat/dogs -> ../dog` used to file every dog image under cat as well (81 samples for 48
    images in the fault report)."""
    root = folder(tmp_path / "train", {"cat": 24, "dog": 24})
    assert len(data.ImageFolder(str(root))) == 48
    os.symlink(os.path.join("..", "dog"), root / "cat" / "dogs")
    with pytest.raises(ValueError) as err:
        data.ImageFolder(str(root))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"image {os.path.realpath(root / 'dog' / '00.png')!r} is reached from two class folders" in msg
    assert f"{root / 'cat'} (as {root / 'cat' / 'dogs' / '00.png'})" in msg
    assert f"{root / 'dog'} (as {root / 'dog' / '00.png'})" in msg
    assert f"remove the link {root / 'cat' / 'dogs'} " in msg


def test_a_link_from_a_later_class_into_an_earlier_one_is_refused_too(tmp_path):
    root = folder(tmp_path / "train", {"cat": 2, "dog": 3})
    os.symlink(root / "cat", root / "dog" / "cats")
    with pytest.raises(ValueError, match=f"remove the link {root / 'dog' / 'cats'} "):
        data.ImageFolder(str(root))


def test_a_loop_through_the_root_ends_and_is_refused(tmp_path, capsys):
    """`train/cat/loop -> ..` reaches train/cat again (a loop: skipped) and train/dog (another
    class: refused); the walk ends."""
    root = folder(tmp_path / "train", {"cat": 3, "dog": 2})
    os.symlink("..", root / "cat" / "loop")
    with pytest.raises(ValueError) as err:
        data.ImageFolder(str(root))
    msg = str(err.value)
    assert f"{root / 'cat'} (as {root / 'cat' / 'loop' / 'dog' / '00.png'})" in msg
    assert f"remove the link {root / 'cat' / 'loop'} " in msg
    assert f"{root / 'cat' / 'loop' / 'cat'} leads to {os.path.realpath(root / 'cat')}" in capsys.readouterr().err


def test_links_within_one_class_count_each_image_once_with_a_true_warning(tmp_path, capsys):
    root = folder(tmp_path / "train", {"cat": 2, "dog": 3})
    write(root / "cat" / "sub" / "s.png")
    os.symlink("..", root / "cat" / "sub" / "up")               # a loop back into cat
    os.symlink(root / "cat" / "sub", root / "cat" / "zz")       # a second way into cat/sub
    os.symlink("00.png", root / "dog" / "again.png")            # a second name for one file
    os.symlink(tmp_path / "outside", root / "dog" / "more")     # a linked folder outside: followed
    write(tmp_path / "outside" / "o.png")
    ds = data.ImageFolder(str(root))
    assert rel_samples(ds, root) == [
        ("cat/00.png", 0), ("cat/01.png", 0), ("cat/sub/s.png", 0),
        ("dog/00.png", 1), ("dog/01.png", 1), ("dog/02.png", 1), ("dog/more/o.png", 1)]
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 3, err
    assert f"{root / 'cat' / 'sub' / 'up'} leads to" in err[0] and "already listed under" in err[0]
    assert f"{root / 'cat' / 'zz'} leads to" in err[1]
    assert err[2] == (f"data.py: WARNING 1 image file(s) of {root} are reached twice within their class through "
                      f"symlinks (the first: {root / 'dog' / 'again.png'} is {root / 'dog' / '00.png'}); each is "
                      f"counted once")


def test_class_folders_that_are_links_are_fine_unless_two_share_a_folder(tmp_path):
    store = folder(tmp_path / "store", {"a": 2, "b": 1})
    root = tmp_path / "train"
    root.mkdir()
    os.symlink(store / "a", root / "cat")
    os.symlink(store / "b", root / "dog")
    assert rel_samples(data.ImageFolder(str(root)), root) == [("cat/00.png", 0), ("cat/01.png", 0),
                                                              ("dog/00.png", 1)]
    os.symlink(store / "a", root / "emu")
    with pytest.raises(ValueError, match=f"remove one of the links {root / 'cat'} and {root / 'emu'} "):
        data.ImageFolder(str(root))


# ----------------------------------------------------------------------------------------------------
# 2. The same classes in train/ and val/
# ----------------------------------------------------------------------------------------------------

def test_different_class_folders_are_named_on_each_side(tmp_path):
    d = tmp_path / "d"
    folder(d / "train", {"cat": 2, "dog": 2})
    folder(d / "val", {"cow": 1, "dog": 1})
    train, val = (data.build_dataset(str(d), s, None) for s in ("train", "val"))
    with pytest.raises(ValueError) as err:
        data.check_same_classes(train, val, str(d))
    assert str(err.value) == (f"--data {d}: train/ and val/ hold different class folders: only in train/: cat; "
                              f"only in val/: cow; use the same class folders in both")


def test_a_class_missing_from_val_alone_and_long_lists_stay_one_line(tmp_path):
    d = tmp_path / "d"
    folder(d / "train", {c: 1 for c in "abcdefgh"})
    folder(d / "val", {"a": 1})
    train, val = (data.build_dataset(str(d), s, None) for s in ("train", "val"))
    with pytest.raises(ValueError) as err:
        data.check_same_classes(train, val, str(d))
    assert str(err.value) == (f"--data {d}: train/ and val/ hold different class folders: only in train/: b, c, "
                              f"d, e, f, ... (7 in all); use the same class folders in both")


def test_same_classes_pass_for_every_kind_of_split(tmp_path):
    d = tmp_path / "d"
    folder(d / "train", {"cat": 10, "dog": 10})
    folder(d / "val", {"cat": 1, "dog": 1})
    for (train_split, eval_split), sizes in zip(data.EVAL_SPLITS.values(), ((20, 2), (18, 2))):
        train, val = (data.build_dataset(str(d), s, None) for s in (train_split, eval_split))  # train/val, fit/select
        assert data.check_same_classes(train, val, str(d)) is None
        assert (len(train), len(val)) == sizes
    builtin = [data.build_dataset(None, s, None, synthetic_size=16) for s in ("train", "val")]
    assert data.check_same_classes(*builtin, None) is None
    ade = ade_folder(tmp_path / "ade")
    assert data.check_same_classes(data.ADE20K(str(ade), "training"), data.ADE20K(str(ade), "validation"),
                                   str(ade)) is None


# ----------------------------------------------------------------------------------------------------
# 3. EXIF orientation
# ----------------------------------------------------------------------------------------------------

def sideways_jpeg(path, orientation=6):
    """16 x 8 stored pixels, left half red, right half blue, tagged to be shown turned 90 degrees
    clockwise (orientation 6): upright it is 8 x 16, red on top."""
    arr = np.zeros((8, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = orientation
    return write(path, Image.fromarray(arr), exif=exif, quality=95)


def test_exif_orientation_is_applied(tmp_path):
    path = sideways_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as raw:
        assert raw.size == (16, 8)  # what the file stores
    for draft in (None, 8):
        img = data.load_rgb(path, draft)
        assert img.size == (8, 16)
        arr = np.asarray(img, np.int16)
        assert (arr[:6, :, 0] > 200).all() and (arr[:6, :, 2] < 60).all()    # top: red
        assert (arr[10:, :, 2] > 200).all() and (arr[10:, :, 0] < 60).all()  # bottom: blue
    assert data.image_size(path) == (8, 16)
    plain = write(tmp_path / "plain.jpg", Image.new("RGB", (16, 8)))
    assert data.load_rgb(plain).size == data.image_size(plain) == (16, 8)


def test_an_ade20k_label_matches_its_upright_image(tmp_path):
    root = ade_folder(tmp_path / "ade")
    img = root / "images" / "validation" / "im0.jpg"
    ann = root / "annotations" / "validation" / "im0.png"
    sideways_jpeg(img)
    Image.fromarray(np.ones((16, 8), np.uint8)).save(ann)  # the upright size
    ds = data.ADE20K(str(root), "validation", num_classes=3)
    assert data.check_readable(ds, "val") == 3 and ds.check_labels() > 0
    image, label = ds[0]
    assert image.size == (8, 16) and label.shape == (16, 8)
    Image.fromarray(np.ones((8, 16), np.uint8)).save(ann)  # the stored size: contradicts the image
    with pytest.raises(data.LabelFileError, match=r"label file '.*im0.png' is 16x8 px, its image '.*im0.jpg' "
                                                  r"is 8x16; a label must have its image's size"):
        data.check_readable(ds, "val")


# ----------------------------------------------------------------------------------------------------
# 4. Recipe detection passes over an unreadable first image
# ----------------------------------------------------------------------------------------------------

def test_typical_image_side_skips_unreadable_images(tmp_path):
    root = tmp_path / "d" / "train"
    corrupt(root / "a" / "0.jpg")                                   # first of its folder
    write(root / "a" / "1.png", Image.new("RGB", (20, 10)))
    corrupt(root / "b" / "0.png")
    write(root / "b" / "sub" / "1.png", Image.new("RGB", (12, 24)))  # the next readable one, below
    corrupt(root / "c" / "only.jpg")                                # nothing readable: not counted
    write(root / "e" / "0.png", Image.new("RGB", (32, 8)))
    assert data.typical_image_side(str(root)) == 24  # median of 20, 24, 32
    assert data.default_recipe(str(tmp_path / "d")) == "photos"
    bad = tmp_path / "bad"
    corrupt(bad / "a" / "0.jpg")
    with pytest.raises(FileNotFoundError, match="holds no images in class sub-folders \\(or none PIL can open\\)"):
        data.typical_image_side(str(bad))


# ----------------------------------------------------------------------------------------------------
# 5. Evaluation sets and label files checked by header before training
# ----------------------------------------------------------------------------------------------------

def test_check_readable_refuses_a_set_of_unreadable_images_naming_the_folder(tmp_path):
    val = tmp_path / "d" / "val"
    corrupt(val / "cat" / "a.jpg")
    corrupt(val / "dog" / "b.png")
    with pytest.raises(ValueError) as err:
        data.check_readable(data.ImageFolder(str(val)), "--data D val/")
    msg = str(err.value)
    assert msg.startswith(f"--data D val/: none of the 2 images in {val}/ can be read (the first, "
                          f"{val / 'cat' / 'a.jpg'}: ")
    assert msg.endswith("replace the folder with a complete copy (an interrupted copy or download leaves such "
                        "files)") and "\n" not in msg


def test_check_readable_warns_once_about_some_unreadable_images(tmp_path, capsys):
    val = folder(tmp_path / "val", {"cat": 2, "dog": 2})
    corrupt(val / "cat" / "bad.jpg")
    corrupt(val / "dog" / "worse.png")
    ds = data.ImageFolder(str(val))
    capsys.readouterr()
    assert data.check_readable(ds, "val/") == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"data.py: WARNING val/: 2 of 6 images in {val}/ cannot be read (the first, "
                          f"{val / 'cat' / 'bad.jpg'}: ")
    assert data.check_readable(data.ImageFolder(str(folder(tmp_path / "ok", {"a": 3}))), "ok") == 3
    assert capsys.readouterr().err == ""
    assert data.check_readable(data.SyntheticShapes("val", size=16, length=5), "built-in") == 5


def test_check_readable_on_the_selection_split(tmp_path):
    d = folder(tmp_path / "d", {"a": 10, "b": 10})  # --data pointing straight at the class folders
    select = data.build_dataset(str(d), "select", None)
    assert data.check_readable(select, "select") == len(select) == 2


def test_an_rgb_training_label_is_refused_by_header(tmp_path):
    root = ade_folder(tmp_path / "ade")
    ann = root / "annotations" / "training" / "im2.png"
    Image.open(ann).convert("RGB").save(ann)
    train = data.ADE20K(str(root), "training", num_classes=3)
    with pytest.raises(data.LabelFileError) as err:
        data.check_readable(train, "training set")
    assert str(err.value) == (f"label file {str(ann)!r} has mode RGB: expected one class index per pixel; "
                              f"convert it to class indices (one 8-bit channel: a grayscale or palette PNG)")


@pytest.mark.parametrize("mode", ["L", "P", "I;16"])  # what PNG stores in one channel
def test_single_channel_label_modes_pass(tmp_path, mode):
    root = ade_folder(tmp_path / "ade")
    ann = root / "annotations" / "training" / "im1.png"
    Image.fromarray(np.ones((20, 20), np.uint8)).convert(mode).save(ann)
    with Image.open(ann) as saved:
        assert saved.mode == mode
    train = data.ADE20K(str(root), "training", num_classes=3)
    assert data.check_readable(train, "training set") == 3
    assert int((train[1][1] == 0).sum()) == 400  # class 1 -> 0 everywhere


def test_an_unreadable_label_counts_as_an_unreadable_sample(tmp_path, capsys):
    root = ade_folder(tmp_path / "ade")
    ann = corrupt(root / "annotations" / "validation" / "im1.png")
    val = data.ADE20K(str(root), "validation", num_classes=3)
    assert data.check_readable(val, "validation set") == 2
    assert f"1 of 3 images in {root / 'images' / 'validation'}/ cannot be read (the first, {ann}: " in \
        capsys.readouterr().err
    assert val.check_labels() > 0  # passed over, as evaluation leaves the sample out


def test_segment_refuses_an_rgb_training_label_before_training(tmp_path):
    root = ade_folder(tmp_path / "ade")
    ann = root / "annotations" / "training" / "im0.png"
    Image.open(ann).convert("RGB").save(ann)
    out = tmp_path / "out"
    with pytest.raises(data.LabelFileError, match="im0.png' has mode RGB: .* convert it to class indices"):
        seg_run(*seg_flags(root, out, "--iters", "50"))
    assert not (out / "checkpoint-latest.pth").exists() and not (out / "log.jsonl").exists()


def test_segment_refuses_a_validation_folder_of_unreadable_images_before_training(tmp_path):
    root = ade_folder(tmp_path / "ade")
    for img in (root / "images" / "validation").iterdir():
        corrupt(img)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"--data {root} validation set: none of the 3 images in "
                                         f"{root / 'images' / 'validation'}/ can be read"):
        seg_run(*seg_flags(root, out, "--iters", "50"))
    assert not (out / "checkpoint-latest.pth").exists() and not (out / "log.jsonl").exists()


# ----------------------------------------------------------------------------------------------------
# 6. Sliding-window stride
# ----------------------------------------------------------------------------------------------------

class Ones(nn.Module):
    size_multiple = 1

    def forward(self, x):
        return torch.ones(x.shape[0], 3, *x.shape[2:])


def test_infer_slide_refuses_a_stride_above_the_crop_and_covers_every_pixel():
    x = torch.randn(1, 3, 30, 30)
    with pytest.raises(ValueError, match=r"sliding window: stride 12 must be in 1\.\.8 \(the crop size\)"):
        segment.infer_slide(Ones(), x, 8, 12, 3)  # windows at 0, 12, 22: rows 8..11 and 20, 21 uncovered
    for stride in (8, 7, 1):
        out = segment.infer_slide(Ones(), x, 8, stride, 3)
        assert torch.equal(out, torch.ones_like(out))  # every pixel covered, averaged exactly


def test_segment_refuses_a_stride_larger_than_the_crop_on_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "segment.py"), "--init", "scratch", "--crop-size",
                           "32", "--stride", "40", "--output-dir", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("segment.py: error: --stride 40 is larger than --crop-size 32: sliding-window inference "
                           "would leave the pixels between two windows without a prediction; use --stride 32 or "
                           "less (BEiT: 341 for a 512 crop, two thirds)\n")
    assert os.listdir(tmp_path / "out") == []  # the folder was claimed (its lock), nothing written
    args = segment.get_args_parser().parse_args(["--init", "scratch", "--crop-size", "32", "--stride", "40",
                                                 "--mode", "whole"])
    assert segment.resolve_args(args).stride == 40  # whole-image inference uses no stride


# ----------------------------------------------------------------------------------------------------
# 7. A crop size that is not a whole number of patches names --crop-size
# ----------------------------------------------------------------------------------------------------

def test_a_crop_size_off_the_patch_grid_names_the_flag(tmp_path):
    with pytest.raises(ValueError) as err:
        seg_run("--init", "scratch", "--crop-size", "30", "--output-dir", tmp_path / "a", "--device", "cpu",
                "--num-workers", "0")
    assert str(err.value) == ("--crop-size 30 is not a multiple of the backbone's patch size 4: use a multiple "
                              "of 4, e.g. 28 or 32")
    assert not os.listdir(tmp_path / "a")
    init = tmp_path / "vit_mini.pth"
    torch.save(enh.build_backbone("vit_mini", img_size=32, patch_size=8).state_dict(), init)
    with pytest.raises(ValueError, match=r"^--crop-size 36 is not a multiple of the backbone's patch size 8: "
                                         r"use a multiple of 8, e.g. 32 or 40$"):
        seg_run("--init", init, "--crop-size", "36", "--stride", "20", "--output-dir", tmp_path / "b",
                "--device", "cpu", "--num-workers", "0")


def test_a_resnet_takes_any_crop_size():
    args = SimpleNamespace(eval_only=False, init="scratch", arch="resnet18", patch_size=4, crop_size=30)
    assert segment.check_crop_size(args) is None
    assert segment.check_crop_size(SimpleNamespace(**(vars(args) | dict(arch="vit_mini", crop_size=32)))) is None
