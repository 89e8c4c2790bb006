"""Tests for data.py: folder datasets (layout, sorting, colour modes, unreadable files, bad folders),
ADE20K labels, the built-in SyntheticShapes, the transforms (one crop -> two views), the resumable
sampler and the PNG grid.

Every image is written with PIL into pytest's tmp_path; everything is a few pixels large, so the whole
file runs in seconds on a laptop CPU.
"""
import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, features

import data
from data import (ADE20K, IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ImageFolder,
                  PretrainTransform, ResumableSampler, SyntheticShapes, build_dataset, build_loader,
                  denormalize, load_rgb, normalize, random_resized_crop_box, reduce_zero_label,
                  save_grid, to_tensor)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def write(path, img, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)
    return str(path)


def solid(rgb, size=(6, 5)):
    return Image.new("RGB", size, rgb)


def noise_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth_image(w, h, seed=0):
    """Smooth random colour field: neighbouring pixels agree, distant regions differ."""
    g = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(g).resize((w, h), Image.BICUBIC)


def truncate(path, fmt):
    """Write a valid 64x64 noise image, then keep only the first half of its bytes."""
    write(path, noise_image(64, 64), format=fmt)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])


def rel_samples(ds, root):
    return [(os.path.relpath(p, root), label) for p, label in ds.samples]


# ----------------------------------------------------------------------------------------------------
# ImageFolder: layout, ordering
# ----------------------------------------------------------------------------------------------------

def test_imagefolder_classes_sorted_and_indices_independent_of_creation_order(tmp_path):
    names = ["zebra", "Apple", "b2", "b10"]
    roots = []
    for k, order in enumerate((names, names[::-1])):
        root = tmp_path / f"root{k}"
        for i, c in enumerate(order):
            for f in (["z.png", "a.png", "m.png"] if k == 0 else ["m.png", "a.png", "z.png"]):
                write(root / c / f, solid((10 * i, 0, 0)))
        roots.append(root)
    a, b = ImageFolder(str(roots[0])), ImageFolder(str(roots[1]))
    assert a.classes == b.classes == sorted(names) == ["Apple", "b10", "b2", "zebra"]
    assert rel_samples(a, roots[0]) == rel_samples(b, roots[1])
    assert rel_samples(a, roots[0])[:3] == [(os.path.join("Apple", f), 0)
                                            for f in ("a.png", "m.png", "z.png")]
    assert [label for _, label in a.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # Labels are what __getitem__ returns, and stay put on a second construction.
    assert [ImageFolder(str(roots[0]))[i][1] for i in range(len(a))] == [l for _, l in a.samples]


def test_imagefolder_finds_nested_and_mixed_case_extensions(tmp_path):
    root = tmp_path / "train"
    expected = {
        os.path.join("cat", "a.JPEG"): ((200, 10, 10), "JPEG"),
        os.path.join("cat", "sub", "deeper", "b.Png"): ((10, 200, 10), "PNG"),
        os.path.join("dog", "c.BMP"): ((10, 10, 200), "BMP"),
    }
    if features.check("webp"):
        expected[os.path.join("dog", "d.WebP")] = ((90, 80, 70), "WEBP")
    for rel, (rgb, fmt) in expected.items():
        kw = {"lossless": True} if fmt == "WEBP" else {}
        write(root / rel, solid(rgb, (16, 16)), format=fmt, **kw)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "labels.csv").write_text("1,2")
    write(root / "stray.png", solid((0, 0, 0)))  # outside any class folder: not a sample

    ds = ImageFolder(str(root))
    assert ds.classes == ["cat", "dog"]
    got = dict(rel_samples(ds, root))
    assert set(got) == set(expected)
    for i, (path, label) in enumerate(ds.samples):
        rel = os.path.relpath(path, root)
        assert label == (0 if rel.startswith("cat") else 1)
        img, lab = ds[i]
        assert img.mode == "RGB" and img.size == (16, 16) and lab == label
        # JPEG is lossy; the others are exact.
        tol = 6 if rel.endswith("JPEG") else 0
        assert np.abs(np.asarray(img, np.int16) - np.array(expected[rel][0])).max() <= tol


def test_imagefolder_lists_each_image_once_through_symlink_loops(tmp_path, capsys):
    """`cat/sub/up -> ..` used to be followed until the path grew too long, listing the class's
    images dozens of times; a second link to a listed folder doubled its images. Links within a class
    are still followed (datasets are often assembled from them), each real folder once, with a
    warning; a link into another class is refused (tests/test_faults_data.py)."""
    root = tmp_path / "train"
    for rel in ("cat/a.png", "cat/sub/b.png", "dog/c.png"):
        write(root / rel, solid((10, 20, 30), (8, 8)))
    os.symlink(root / "cat", root / "cat" / "sub" / "up")   # a loop
    os.symlink(root / "cat" / "sub", root / "cat" / "zz")   # a second way into cat/sub
    ds = ImageFolder(str(root))
    assert sorted(rel_samples(ds, root)) == [
        (os.path.join("cat", "a.png"), 0), (os.path.join("cat", "sub", "b.png"), 0), (os.path.join("dog", "c.png"), 1)]
    err = capsys.readouterr().err
    assert str(root / "cat" / "sub" / "up") in err and str(root / "cat" / "zz") in err
    assert err.count("already listed") == 2


def write_mode_images(root):
    """One file per PIL mode with known pixel values; returns {filename: expected (H, W, 3) uint8}."""
    exp = {}

    l = np.array([[0, 77], [128, 255]], np.uint8)
    write(root / "c" / "L.png", Image.fromarray(l, "L"))
    exp["L.png"] = np.repeat(l[..., None], 3, 2)

    one = Image.new("1", (2, 2), 0)
    one.putpixel((1, 0), 1)
    write(root / "c" / "one.bmp", one)
    exp["one.bmp"] = np.array([[[0] * 3, [255] * 3], [[0] * 3, [0] * 3]], np.uint8)

    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1], [2, 1]], np.uint8)
    # Transparency as one index (an int in img.info) and as per-entry alpha (bytes: PIL warns when
    # such an image goes straight to RGB).
    for name, info in (("P.png", {}), ("Ptrans.png", {"transparency": 0}),
                       ("Palpha.png", {"transparency": bytes([0, 128, 255])})):
        p = Image.fromarray(idx, "P")
        p.putpalette(palette)
        write(root / "c" / name, p, **info)
        exp[name] = np.array(palette[:9], np.uint8).reshape(3, 3)[idx]

    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128]], [[70, 80, 90, 255], [1, 2, 3, 7]]], np.uint8)
    write(root / "c" / "RGBA.png", Image.fromarray(rgba, "RGBA"))
    exp["RGBA.png"] = rgba[..., :3]

    la = np.array([[[90, 0], [91, 128]], [[250, 255], [3, 9]]], np.uint8)
    write(root / "c" / "LA.png", Image.fromarray(la, "LA"))
    exp["LA.png"] = np.repeat(la[..., :1], 3, 2)

    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))      # white
    cmyk.putpixel((1, 0), (255, 0, 0, 0))    # cyan
    write(root / "c" / "CMYK.tif", cmyk)
    exp["CMYK.tif"] = np.array([[[255, 255, 255], [0, 255, 255]]], np.uint8)

    # 16-bit: 65535 -> 255 and 32768 -> 128 (PIL's own convert("L") would clip them all to 255).
    v16 = np.array([[0, 32768], [65535, 1000]], np.uint16)
    i16 = Image.fromarray(v16)
    assert i16.mode == "I;16"
    write(root / "c" / "I16.png", i16)
    write(root / "c" / "I32.tif", Image.fromarray(v16.astype(np.int32)))
    g = np.array([[0, 128], [255, 4]], np.uint8)
    exp["I16.png"] = exp["I32.tif"] = np.repeat(g[..., None], 3, 2)
    return exp


def test_imagefolder_converts_every_mode_to_8bit_rgb(tmp_path):
    root = tmp_path / "modes"
    expected = write_mode_images(root)
    # The files really are in the modes under test (not silently converted on save).
    modes, infos = {}, {}
    for f in expected:
        with Image.open(root / "c" / f) as img:
            modes[f], infos[f] = img.mode, dict(img.info)
    assert modes["I16.png"] == "I;16" and modes["I32.tif"] == "I" and modes["CMYK.tif"] == "CMYK"
    assert modes["Ptrans.png"] == modes["Palpha.png"] == "P"
    assert modes["LA.png"] == "LA" and modes["one.bmp"] == "1"
    assert isinstance(infos["Palpha.png"]["transparency"], bytes)

    ds = ImageFolder(str(root))
    assert sorted(os.path.basename(p) for p, _ in ds.samples) == sorted(expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # palette + transparency must not warn on the way to RGB
        for i, (path, _) in enumerate(ds.samples):
            img, _ = ds[i]
            name = os.path.basename(path)
            assert img.mode == "RGB", name
            np.testing.assert_array_equal(np.asarray(img), expected[name], err_msg=name)


def test_to_rgb_16bit_byte_orders_and_float():
    v16 = np.array([[0, 32768], [65535, 1000]], np.uint16)
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16", "<u2")):
        img = data.to_rgb(Image.frombytes(mode, (2, 2), v16.astype(dtype).tobytes()))
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 128], [255, 4]], err_msg=mode)
    f = Image.fromarray(np.array([[0.4, 300.0], [-5.0, 127.6]], np.float32))
    assert f.mode == "F"
    np.testing.assert_array_equal(np.asarray(data.to_rgb(f)), np.repeat(
        np.array([[0, 255], [0, 128]], np.uint8)[..., None], 3, 2))


def test_imagefolder_transform_gets_sample_rng_and_draft_keeps_view(tmp_path):
    root = tmp_path / "train"
    path = write(root / "a" / "big.jpg", smooth_image(800, 600), quality=95)
    seen = []

    def record(img, rng):
        seen.append((img.size, rng.random()))
        return img

    record.draft_size = 100
    ds = ImageFolder(str(root), transform=record, seed=4)
    ds.set_epoch(2)
    ds[0]
    size, draw = seen[0]
    assert draw == random.Random("4/2/0").random()
    assert min(size) >= 100 and size[0] < 800  # the transform's draft_size reached the JPEG decoder
    # A drafted decode shows the same view as a full decode (EvalTransform, 32 px).
    t = EvalTransform(32, normalized=False)
    x, _ = ImageFolder(str(root), transform=t)[0]
    assert x.shape == (3, 32, 32)
    assert (x - t(load_rgb(path))).abs().mean() < 0.02


def test_load_rgb_jpeg_draft_stays_above_requested_size(tmp_path):
    path = write(tmp_path / "big.jpg", smooth_image(800, 600))
    assert load_rgb(path).size == (800, 600)
    small = load_rgb(path, draft_size=100)
    assert small.mode == "RGB" and min(small.size) >= 100 and small.size[0] < 800
    # Draft is a JPEG-only shortcut: PNGs keep their size.
    png = write(tmp_path / "big.png", smooth_image(300, 200))
    assert load_rgb(png, draft_size=50).size == (300, 200)


# ----------------------------------------------------------------------------------------------------
# ImageFolder: unreadable files and bad folders
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["truncated", "truncated_png", "garbage"])
def test_imagefolder_skips_unreadable_with_warning(tmp_path, capsys, kind):
    root = tmp_path / "train"
    good = write(root / "a" / "y_good.png", solid((1, 2, 3), (4, 4)))
    bad = str(root / "a" / {"truncated": "0_bad.jpg", "truncated_png": "0_bad.png"}.get(kind, "x.jpg"))
    if kind.startswith("truncated"):
        truncate(bad, "JPEG" if kind == "truncated" else "PNG")
        Image.open(bad).close()  # the header still parses: the damage shows only when decoding
    else:
        with open(bad, "wb") as f:
            f.write(b"this is not a jpeg at all" * 10)
    write(root / "b" / "other.png", solid((9, 9, 9), (4, 4)))
    ds = ImageFolder(str(root))
    assert [p for p, _ in ds.samples][:2] == sorted([bad, good])
    bad_index = [p for p, _ in ds.samples].index(bad)
    good_index = [p for p, _ in ds.samples].index(good)
    assert good_index == bad_index + 1

    capsys.readouterr()
    img, label = ds[bad_index]
    err = capsys.readouterr().err
    assert bad in err and "skipping" in err.lower()
    assert ds.num_skipped == 1
    np.testing.assert_array_equal(np.asarray(img), np.full((4, 4, 3), (1, 2, 3), np.uint8))
    assert label == 0
    # The readable images still load, and the count keeps running on the next bad read.
    assert ds[good_index][1] == 0 and ds.num_skipped == 1
    ds[bad_index]
    assert ds.num_skipped == 2 and "2 skipped" in capsys.readouterr().err


def test_imagefolder_ten_unreadable_in_a_row_stops(tmp_path, capsys):
    root = tmp_path / "train"
    bad = [str(root / "a" / f"{i:02d}.jpg") for i in range(10)]
    for p in bad:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"\x00garbage")
    write(root / "a" / "99_good.png", solid((5, 5, 5)))
    ds = ImageFolder(str(root))
    with pytest.raises(ValueError, match="10 unreadable") as e:
        ds[0]
    assert bad[-1] in str(e.value)
    assert ds.num_skipped == 10
    # From index 1 on, the 10th try reaches the good image.
    img, _ = ds[1]
    assert np.asarray(img)[0, 0].tolist() == [5, 5, 5]


def test_imagefolder_all_unreadable_small_folder_stops(tmp_path, capsys):
    # Fewer than ten files, all bad: the retries wrap around and still end in an error, not a hang.
    root = tmp_path / "train"
    for i in range(3):
        os.makedirs(root / "a", exist_ok=True)
        (root / "a" / f"{i}.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=str(root / "a")):
        ImageFolder(str(root))[0]


def test_imagefolder_missing_folder_names_path_and_layout(tmp_path):
    missing = str(tmp_path / "no" / "such" / "train")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolder(missing)
    assert missing in str(e.value) and "root/<class_name>/<image>" in str(e.value)


def test_imagefolder_empty_folders_name_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images") as e:
        ImageFolder(str(empty))
    assert str(empty) in str(e.value)

    classes_only = tmp_path / "classes_only"
    for c in ("a", "b"):
        (classes_only / c / "nested").mkdir(parents=True)
        (classes_only / c / "readme.txt").write_text("x")
    write(classes_only / "loose.png", solid((0, 0, 0)))  # images at the root are not in a class
    with pytest.raises(FileNotFoundError) as e:
        ImageFolder(str(classes_only))
    assert str(classes_only) in str(e.value) and "2 sub-folders" in str(e.value)


def test_build_dataset_paths(tmp_path):
    assert isinstance(build_dataset(None, "val", None), SyntheticShapes)
    root = tmp_path / "imagenet"
    write(root / "train" / "n01" / "a.png", solid((1, 1, 1)))
    write(root / "val" / "n01" / "b.png", solid((2, 2, 2)))
    assert build_dataset(str(root), "train", None).samples[0][0].endswith("a.png")
    assert build_dataset(str(root), "val", None).samples[0][0].endswith("b.png")
    # --data may point straight at the class folders for training, but not for val.
    flat = tmp_path / "flat"
    write(flat / "n01" / "c.png", solid((3, 3, 3)))
    assert build_dataset(str(flat), "train", None).classes == ["n01"]
    with pytest.raises(FileNotFoundError, match=str(flat / "val")):
        build_dataset(str(flat), "val", None)


# ----------------------------------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------------------------------

def make_ade(root, names=("a", "b"), split="training"):
    for k, n in enumerate(names):
        write(root / "images" / split / f"{n}.jpg", solid((50 * k, 100, 150), (4, 2)))
        lab = np.array([[0, 1, 2, 150], [151, 255, 0, 37]], np.uint8) if k == 0 else \
            np.full((2, 4), k, np.uint8)
        write(root / "annotations" / split / f"{n}.png", Image.fromarray(lab, "L"))


def test_ade20k_reduce_zero_label(tmp_path):
    make_ade(tmp_path)
    ds = ADE20K(str(tmp_path))
    assert len(ds) == 2
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (4, 2)
    assert label.dtype == np.uint8 and label.shape == (2, 4)
    np.testing.assert_array_equal(label, [[255, 0, 1, 149], [150, 254, 255, 36]])
    np.testing.assert_array_equal(ds[1][1], np.zeros((2, 4), np.uint8))
    # The function alone, over every possible value: 0 -> 255, k -> k - 1.
    allv = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(allv), np.r_[255, np.arange(255)].astype(np.uint8))


def test_ade20k_transform_gets_image_label_and_sample_rng(tmp_path):
    make_ade(tmp_path)
    calls = []

    def transform(img, label, rng):
        calls.append(rng.random())
        return np.asarray(img).shape, label.copy()

    ds = ADE20K(str(tmp_path), transform=transform, seed=3)
    shape, label = ds[0]
    assert shape == (2, 4, 3) and label[0, 0] == 255
    assert calls[0] == random.Random("3/0/0").random()


def test_ade20k_missing_annotation_names_image(tmp_path):
    make_ade(tmp_path)
    write(tmp_path / "images" / "training" / "orphan.jpg", solid((0, 0, 0)))
    with pytest.raises(FileNotFoundError) as e:
        ADE20K(str(tmp_path))
    assert str(tmp_path / "images" / "training" / "orphan.jpg") in str(e.value)


@pytest.mark.parametrize("missing", ["annotations", "images"])
def test_ade20k_missing_folder_names_path_and_layout(tmp_path, missing):
    make_ade(tmp_path)
    shutil.rmtree(tmp_path / missing)
    with pytest.raises(FileNotFoundError) as e:
        ADE20K(str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / missing / "training") in msg and "root/annotations/" in msg


def test_ade20k_empty_images_and_other_split(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        ADE20K(str(tmp_path))
    make_ade(tmp_path, names=("v",), split="validation")
    assert len(ADE20K(str(tmp_path), split="validation")) == 1


# ----------------------------------------------------------------------------------------------------
# SyntheticShapes
# ----------------------------------------------------------------------------------------------------

def test_synthetic_deterministic_per_seed_split_index():
    a, b = SyntheticShapes("train", seed=0), SyntheticShapes("train", seed=0)
    for i in (0, 1, 4095):
        ia, ma, la = a.sample(i)
        ib, mb, lb = b.sample(i)
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.array_equal(ma, mb) and la == lb
    # __getitem__ returns the same image and label as sample().
    img, label = a[7]
    assert np.array_equal(np.asarray(img), np.asarray(a.sample(7)[0])) and label == a.sample(7)[2]
    # Another seed, another split, another index: other pixels.
    ref = [np.asarray(a.sample(i)[0]) for i in range(5)]
    for other in (SyntheticShapes("train", seed=1), SyntheticShapes("val", seed=0)):
        assert all(not np.array_equal(r, np.asarray(other.sample(i)[0])) for i, r in enumerate(ref))
    assert not np.array_equal(ref[0], ref[1])


def fill(polygons, size):
    """Boolean (size, size) coverage of (points, is_hole) polygons, drawn as SyntheticShapes does."""
    canvas = Image.new("L", (size, size), 0)
    for points, hole in polygons:
        ImageDraw.Draw(canvas).polygon(points, fill=0 if hole else 255)
    return np.asarray(canvas) > 0


def test_synthetic_masks_labels_objects_and_occlusion():
    ds = SyntheticShapes("train", size=64)
    counts, hidden_label, hidden_small = [], 0, 0
    for i in range(60):
        img, mask, label = ds.sample(i)
        arr = np.asarray(img)
        assert img.mode == "RGB" and img.size == (64, 64) and mask.dtype == np.uint8 and mask.shape == (64, 64)
        assert 0 <= label < 8 and set(np.unique(mask).tolist()) <= set(range(9))
        # the same draws as sample(): label, texture, then the objects back to front
        rng = np.random.default_rng([0, 0, i])
        assert int(rng.integers(8)) == label
        ds.texture(rng)
        objects = ds.layout(label, rng)
        counts.append(len(objects))
        assert [c for c, _, _ in objects].count(label) == 1  # the small ones are of other classes
        covered = np.zeros((64, 64), bool)
        for k in range(len(objects) - 1, -1, -1):  # front to back
            cls, polygons, colour = objects[k]
            area = fill(polygons, 64)
            visible = area & ~covered
            # each object shows in its own flat colour and class exactly where nothing is in front
            assert (mask[visible] == cls + 1).all() and (arr[visible] == colour).all(), (i, k)
            if cls == label:
                assert visible.mean() > 0.05, i  # the labelled object stays in view
                hidden_label += bool((area & covered).any())
            else:
                hidden_small += bool((area & covered).any())
            covered |= area
        assert (mask[~covered] == 0).all()
    # 0, 1 or 2 smaller objects; some hide part of the labelled one, some are hidden by it
    assert set(counts) == {1, 2, 3} and hidden_label >= 5 and hidden_small >= 5, (counts, hidden_label, hidden_small)


def test_synthetic_class_balance_and_num_classes():
    ds = SyntheticShapes("train")
    labels = np.array([ds.sample(i)[2] for i in range(400)])
    counts = np.bincount(labels, minlength=8)
    assert (counts > 0).all() and len(counts) == 8
    assert counts.min() >= 25 and counts.max() <= 80, counts  # 50 expected, std ~6.6
    four = SyntheticShapes("val", num_classes=4)
    assert four.classes == ["disc", "square", "triangle", "cross"]
    assert {four.sample(i)[2] for i in range(60)} == {0, 1, 2, 3}


def test_synthetic_lengths_and_bad_arguments():
    assert len(SyntheticShapes("train")) == 8192 and len(SyntheticShapes("val")) == 1024
    assert len(SyntheticShapes("train", length=10)) == 10
    with pytest.raises(ValueError, match="'test'"):
        SyntheticShapes("test")
    for k in (1, 9):
        with pytest.raises(ValueError, match=str(k)):
            SyntheticShapes("train", num_classes=k)
    SyntheticShapes("train", num_classes=2)
    SyntheticShapes("train", num_classes=8)


# ----------------------------------------------------------------------------------------------------
# to_tensor / normalize / denormalize
# ----------------------------------------------------------------------------------------------------

def test_imagenet_stats():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_to_tensor_channel_order_and_scale():
    img = noise_image(5, 3)
    x = to_tensor(img)
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), np.asarray(img) / 255.0, atol=1e-7)
    red = to_tensor(solid((255, 0, 0), (2, 2)))
    assert red[0].eq(1).all() and red[1:].eq(0).all()


def test_normalize_round_trip_and_mean_colour():
    x = torch.rand(2, 3, 4, 5)
    y = normalize(x)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(y, (x - mean) / std)
    torch.testing.assert_close(denormalize(y), x, atol=1e-6, rtol=0)
    assert denormalize(torch.full((3, 2, 2), 50.0)).eq(1).all()
    assert denormalize(torch.full((3, 2, 2), -50.0)).eq(0).all()
    # A picture filled with the mean colour normalises to (nearly) zero; mean + std to one.
    mean_rgb = tuple(round(255 * m) for m in IMAGENET_MEAN)
    z = normalize(to_tensor(solid(mean_rgb, (3, 3))))
    assert z.abs().max() < 0.5 / 255 / min(IMAGENET_STD) + 1e-6
    assert normalize(mean.expand(3, 2, 2)).abs().max() < 1e-6
    torch.testing.assert_close(normalize((mean + std).expand(3, 2, 2)), torch.ones(3, 2, 2))


# ----------------------------------------------------------------------------------------------------
# random_resized_crop_box
# ----------------------------------------------------------------------------------------------------

def test_random_resized_crop_box_within_scale_and_ratio():
    W, H = 640, 480
    scale, ratio = (0.1, 0.5), (3 / 4, 4 / 3)
    rng = random.Random(0)
    fracs, aspects, fallbacks = [], [], 0
    for _ in range(300):
        l, t, r, b = random_resized_crop_box(W, H, scale, ratio, rng)
        assert 0 <= l < r <= W and 0 <= t < b <= H
        w, h = r - l, b - t
        if (l, t, r, b) == (0, 0, W, H):  # fallback: 4:3 is inside the ratio range
            fallbacks += 1
            continue
        fracs.append(w * h / (W * H))
        aspects.append(w / h)
    assert fallbacks <= 15
    fracs, aspects = np.array(fracs), np.array(aspects)
    assert fracs.min() >= scale[0] * 0.98 and fracs.max() <= scale[1] * 1.02
    assert aspects.min() >= ratio[0] * 0.99 and aspects.max() <= ratio[1] * 1.01
    # The draws span the ranges (log-uniform aspect: both sides of 1).
    assert fracs.min() < 0.15 and fracs.max() > 0.45
    assert aspects.min() < 0.85 and aspects.max() > 1.2


def test_random_resized_crop_box_reproducible():
    a = [random_resized_crop_box(300, 200, rng=random.Random(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    assert random_resized_crop_box(300, 200, rng=random.Random(6)) != a[0]


@pytest.mark.parametrize("W,H", [(1000, 10), (10, 1000)])
def test_random_resized_crop_box_fallback_on_elongated_image(W, H):
    # No crop of >= 8% of the area with aspect in [3/4, 4/3] fits: the central crop with the aspect
    # clamped into the ratio range is returned.
    for seed in range(5):
        l, t, r, b = random_resized_crop_box(W, H, rng=random.Random(seed))
        w, h = r - l, b - t
        assert 0 <= l < r <= W and 0 <= t < b <= H
        assert min(w, h) == 10 and 3 / 4 <= w / h <= 4 / 3
        assert (l, t) == ((W - w) // 2, (H - h) // 2)


# ----------------------------------------------------------------------------------------------------
# PretrainTransform
# ----------------------------------------------------------------------------------------------------

def views_diff(net, tok):
    """Mean |network view brought to tokenizer size - tokenizer view|, in [0, 1] pixel units."""
    S, T = net.shape[-1], tok.shape[-1]
    small = F.avg_pool2d(denormalize(net)[None], S // T)[0]
    return (small - tok).abs().mean().item()


def test_pretrain_transform_shapes_ranges_and_same_crop():
    img = smooth_image(256, 192)
    t = PretrainTransform(64, 32, color_jitter=0.4)
    outs = [t(img, random.Random(s)) for s in range(6)]
    for net, tok in outs:
        assert net.shape == (3, 64, 64) and tok.shape == (3, 32, 32)
        assert tok.min() >= 0 and tok.max() <= 1
        assert net.min() < 0  # normalised, not [0, 1]
    same = [views_diff(net, tok) for net, tok in outs]
    crossed = [views_diff(outs[i][0], outs[(i + 1) % 6][1]) for i in range(6)]
    assert max(same) < 0.05, same
    assert min(crossed) > 2 * max(same), (same, crossed)


def test_pretrain_transform_reproducible_from_rng():
    img = smooth_image(120, 90, seed=1)
    t = PretrainTransform(32, 16, color_jitter=0.4)
    a, b = t(img, random.Random(11)), t(img, random.Random(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = t(img, random.Random(12))
    assert not torch.equal(a[0], c[0])
    # The global random state plays no part.
    random.seed(0)
    d = t(img, random.Random(11))
    random.seed(1)
    e = t(img, random.Random(11))
    assert torch.equal(d[0], e[0]) and torch.equal(d[0], a[0])


def test_pretrain_transform_flip_and_unnormalized_single_view():
    img = noise_image(40, 40)
    full = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), normalized=False)
    plain = PretrainTransform(40, None, hflip=0.0, **full)(img, random.Random(0))
    flipped = PretrainTransform(40, None, hflip=1.0, **full)(img, random.Random(0))
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 40, 40)
    torch.testing.assert_close(plain, to_tensor(img))
    torch.testing.assert_close(flipped, to_tensor(img).flip(-1))
    # The tokenizer view is flipped with the network view.
    net, tok = PretrainTransform(40, 20, hflip=1.0, **full)(img, random.Random(0))
    ref = to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT).resize((20, 20), Image.LANCZOS))
    torch.testing.assert_close(tok, ref)


def test_pretrain_transform_draft_size():
    t = PretrainTransform(224, 112, scale=(0.25, 1.0))
    assert t.draft_size == 448


def test_dataset_sample_rng_follows_seed_epoch_index():
    t = PretrainTransform(32, 16, color_jitter=0.4)
    ds = SyntheticShapes("train", size=48, length=16, transform=t)
    a, b = ds[3], ds[3]
    assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1]) and a[1] == b[1]
    ds.set_epoch(1)
    c = ds[3]
    assert not torch.equal(a[0][0], c[0][0]) and c[1] == a[1]  # new crop, same label
    ds.set_epoch(0)
    assert torch.equal(ds[3][0][0], a[0][0])
    assert ds.sample_rng(3).random() == SyntheticShapes("val", seed=0).sample_rng(3).random()
    assert ds.sample_rng(3).random() != ds.sample_rng(4).random()
    assert ds.sample_rng(3).random() != SyntheticShapes("train", seed=1).sample_rng(3).random()


# ----------------------------------------------------------------------------------------------------
# EvalTransform
# ----------------------------------------------------------------------------------------------------

def test_eval_transform_crop_pct_math():
    assert EvalTransform(224).resize == 256
    assert EvalTransform(384, crop_pct=1.0).resize == 384
    assert EvalTransform(32).resize == 36  # floor(32 / 0.875) = floor(36.57)


def test_eval_transform_center_crop_exact_pixels():
    # The shorter side already equals resize (256 for 224): no resampling, so the output is exactly
    # the central 224 x 224 window.
    img = noise_image(256, 300, seed=4)
    x = EvalTransform(224, normalized=False)(img)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x, to_tensor(img.crop((16, 38, 240, 262))))
    torch.testing.assert_close(EvalTransform(224)(img), normalize(x))


def test_eval_transform_half_black_half_white_is_symmetric():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 40:] = 255
    x = EvalTransform(32, normalized=False)(Image.fromarray(arr))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x + x.flip(-1), torch.ones_like(x), atol=2 / 255, rtol=0)
    assert x[:, :, :8].max() < 0.02 and x[:, :, -8:].min() > 0.98
    # Portrait images: resized on the width, cropped vertically, still the output size.
    assert EvalTransform(32)(noise_image(50, 130)).shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------------
# ResumableSampler / build_loader
# ----------------------------------------------------------------------------------------------------

class IndexDataset(torch.utils.data.Dataset):
    """Returns its index and the first draw of its augmentation rng; records set_epoch."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, random.Random(f"{self.seed}/{self.epoch}/{i}").random()


@pytest.mark.parametrize("n", [12, 13])
def test_sampler_ranks_disjoint_and_cover(n):
    ds = IndexDataset(n)
    parts = [list(ResumableSampler(ds, 2, r, seed=1)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == n // 2
    assert not set(parts[0]) & set(parts[1])
    union = set(parts[0]) | set(parts[1])
    assert len(union) == n - n % 2  # drop_last: at most world_size - 1 samples left out per epoch
    if n % 2 == 0:
        assert union == set(range(n))
    # Without drop_last every index appears (padding repeats some).
    pad = [list(ResumableSampler(ds, 2, r, drop_last=False)) for r in range(2)]
    assert set(pad[0]) | set(pad[1]) == set(range(n))


def test_sampler_order_is_function_of_seed_and_epoch():
    ds = IndexDataset(50)

    def order(seed, epoch):
        torch.manual_seed(random.randrange(10**6))  # the global RNG must not matter
        s = ResumableSampler(ds, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 3) == order(0, 3)
    assert sorted(order(0, 3)) == list(range(50))
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    assert list(ResumableSampler(ds, shuffle=False)) == list(range(50))


def test_sampler_resume_mid_epoch_yields_tail():
    ds = IndexDataset(30)
    full_s = ResumableSampler(ds, 2, 1, seed=7)
    full_s.set_epoch(5)
    full = list(full_s)
    for k in (0, 1, 6, 15):
        s = ResumableSampler(ds, 2, 1, seed=7)
        s.set_epoch(5, start=k)
        assert list(s) == full[k:] and len(s) == len(full) - k
    s.set_epoch(6)  # a new epoch starts from the beginning again
    assert len(list(s)) == len(full)


def test_build_loader_set_epoch_propagates_to_dataset_and_workers():
    ds = IndexDataset(12)
    loader, sampler = build_loader(ds, batch_size=3, num_workers=2, rank=0, world_size=2, seed=0)
    sampler.set_epoch(2, start=3)
    assert ds.epoch == 2
    batches = list(loader)
    idx = torch.cat([b[0] for b in batches]).tolist()
    draws = torch.cat([b[1] for b in batches]).tolist()
    full = ResumableSampler(IndexDataset(12), 2, 0, seed=0)
    full.set_epoch(2)
    assert idx == list(full)[3:]
    # The workers saw epoch 2 (they were created after set_epoch).
    assert draws == pytest.approx([random.Random(f"0/2/{i}").random() for i in idx])


def test_build_loader_ranks_cover_dataset():
    ds = IndexDataset(12)
    seen = []
    for rank in range(2):
        loader, sampler = build_loader(ds, batch_size=2, num_workers=0, rank=rank, world_size=2)
        sampler.set_epoch(0)
        seen.append([i for b in loader for i in b[0].tolist()])
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))


# ----------------------------------------------------------------------------------------------------
# save_grid
# ----------------------------------------------------------------------------------------------------

def test_save_grid_size_and_content(tmp_path):
    B, H, W, pad = 3, 8, 10, 2
    rgb = torch.rand(B, 3, H, W)
    maps = torch.rand(B, 1, H // 2, W // 2)  # other resolution, one channel
    path = str(tmp_path / "grid.png")
    save_grid([rgb, maps], path, min_size=1, pad=pad)  # no upscaling: pixels as given
    out = np.asarray(Image.open(path))
    assert out.shape == (2 * (H + pad) + pad, B * (W + pad) + pad, 3)
    expect = (rgb[1].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x0 = pad + 1 * (W + pad)
    np.testing.assert_array_equal(out[pad:pad + H, x0:x0 + W], expect)
    # Map row: grey, nearest-upsampled 2x.
    y1 = pad + H + pad
    cell = out[y1:y1 + H, pad:pad + W]
    assert (cell[..., 0] == cell[..., 1]).all() and (cell[..., 1] == cell[..., 2]).all()
    up = maps[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)
    np.testing.assert_array_equal(cell[..., 0], (up.numpy() * 255).round().astype(np.uint8))
    # Padding is white.
    assert (out[:pad] == 255).all() and (out[:, :pad] == 255).all()


def test_save_grid_upscales_by_whole_factor_and_names_rows(tmp_path):
    """Tiles reach min_size by nearest-neighbour upscaling (a token stays a crisp square) and each
    row's name is written in a white margin to its left."""
    B, H, W, pad, names = 2, 8, 8, 2, ["original", "p(replaced)"]
    rgb = torch.rand(B, 3, H, W)
    maps = (torch.rand(B, 1, H, W) > 0.5).float()
    path, bare = str(tmp_path / "named.png"), str(tmp_path / "bare.png")
    save_grid([rgb, maps], path, names=names, min_size=96, pad=pad)
    save_grid([rgb, maps], bare, min_size=96, pad=pad)
    out, plain = np.asarray(Image.open(path)), np.asarray(Image.open(bare))
    k = 12  # the whole factor that takes 8 px to at least 96
    assert plain.shape == (2 * (k * H + pad) + pad, B * (k * W + pad) + pad, 3)
    margin = out.shape[1] - plain.shape[1]
    assert out.shape[0] == plain.shape[0] and margin > 0
    np.testing.assert_array_equal(out[:, margin:], plain)  # the tiles are the same, shifted right
    tile = plain[pad:pad + k * H, pad:pad + k * W]
    expect = (rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(tile, expect.repeat(k, 0).repeat(k, 1))
    for r in range(2):  # dark text pixels in each row's band of the margin, none between rows
        band = out[pad + r * (k * H + pad):(r + 1) * (k * H + pad), :margin]
        assert (band < 128).any(), names[r]
    assert (out[:pad, :margin] == 255).all()


@pytest.mark.parametrize("op", ["ShearX", "TranslateYRel", "Rotate"])
def test_randaugment_geometric_ops_are_bicubic(op):
    """BEiT and MAE ask timm for interpolation='bicubic': every geometric op resamples bicubically."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    seed = random.Random(3)
    out = data.RAND_AUGMENT_OPS[op](img, 9, random.Random(3))
    sign = -1 if seed.random() < 0.5 else 1
    if op == "ShearX":
        ref = img.transform(img.size, Image.AFFINE, (1, sign * 0.27, 0, 0, 1, 0), resample=Image.BICUBIC,
                            fillcolor=data.FILL)
    elif op == "TranslateYRel":
        ref = img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * 0.405 * 24), resample=Image.BICUBIC,
                            fillcolor=data.FILL)
    else:
        ref = img.rotate(sign * 27.0, resample=Image.BICUBIC, fillcolor=data.FILL)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_repeated_augmentation_spreads_each_samples_copies_over_the_ranks():
    """timm's RepeatAugSampler with 3 repeats on 2 ranks: each sample's copies go to both ranks in
    turn, each rank's epoch is as long as without repeats, and the order is a function of the epoch."""
    ds = list(range(12))
    ranks = [data.ResumableSampler(ds, 2, r, shuffle=True, seed=5, repeats=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(1)
    seen = [list(s) for s in ranks]
    assert [len(x) for x in seen] == [6, 6] == [len(s) for s in ranks]
    g = torch.Generator().manual_seed(5 + 1)
    rows = [i for i in torch.randperm(12, generator=g).tolist() for _ in range(3)]
    assert seen[0] == rows[0:12:2] and seen[1] == rows[1:12:2]  # dealt out in turn
    for i in set(rows[:12]):  # the 4 samples of this epoch: each on both ranks
        assert i in seen[0] and i in seen[1]
    ranks[0].set_epoch(1, start=4)
    assert list(ranks[0]) == seen[0][4:]  # resumable mid-epoch
    plain = data.ResumableSampler(ds, 2, 0, shuffle=True, seed=5)
    plain.set_epoch(1)
    assert len(list(plain)) == 6 and len(set(plain)) == 6


def test_selection_split_carves_a_fixed_tenth_of_each_class_out_of_train(tmp_path):
    """round(0.1 n) images per class, fit and select partition train/, the same whatever --seed, and
    the carve depends on the class name, not on the folder's other classes."""
    for name, n in (("a", 30), ("b", 14), ("c", 5)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / name / f"{i}.png")
    train = data.build_dataset(str(tmp_path), "train", None).samples
    fit, select = (data.build_dataset(str(tmp_path), s, None, seed=7).samples for s in ("fit", "select"))
    assert sorted(fit + select) == sorted(train) and not set(fit) & set(select)
    assert [sum(label == k for _, label in select) for k in range(3)] == [3, 1, 0]  # round(3.0, 1.4, 0.5)
    assert select == data.build_dataset(str(tmp_path), "select", None, seed=0).samples
    shutil.rmtree(tmp_path / "train" / "c")
    assert [p for p, label in data.build_dataset(str(tmp_path), "select", None).samples if label == 0] == \
        [p for p, label in select if label == 0]
    assert data.EVAL_SPLITS == {"val": ("train", "val"), "select": ("fit", "select")}
    with pytest.raises(ValueError, match="split must be one of"):
        data.build_dataset(str(tmp_path), "test", None)
    # the built-in data draws its selection split as a stream of its own
    assert data.SyntheticShapes("select").sample(0)[2] != data.SyntheticShapes("train").sample(0)[2] or \
        not np.array_equal(np.asarray(data.SyntheticShapes("select").sample(0)[0]),
                           np.asarray(data.SyntheticShapes("train").sample(0)[0]))


def test_image_folder_ends_iteration_at_its_last_image(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "a" / f"{i}.png")
    assert len(list(data.ImageFolder(str(tmp_path)))) == 3
