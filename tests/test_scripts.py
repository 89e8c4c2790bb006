"""The helpers around the stages: scripts/cifar10_folder.py on a small archive in CIFAR-10's own format,
scripts/gpu_check.sh's usage and refusal (no GPU here), the citation file, and the timm / torchvision
loading snippets of docs/pretrain.md run as written."""
import argparse
import ast
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import tarfile
import textwrap
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, subprocess_env
from test_enhancer import TIMM_VIT_B, torchvision_resnet50_keys

sys.path.insert(0, os.path.join(REPO, "scripts"))
import cifar10_folder  # noqa: E402

SCRIPT = os.path.join(REPO, "scripts", "cifar10_folder.py")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_PER_BATCH, VAL_PER_CLASS = 2, 3  # per class: 2 in each of the 5 training batches, 3 in the test batch


# ----------------------------------------------------------------------------------------------------
# A CIFAR-10 archive in the official format, a few images per class
# ----------------------------------------------------------------------------------------------------

def image_rows(labels, seed):
    """(N, 3072) uint8 rows: red plane, green plane, blue plane of 32x32, random but reproducible."""
    return np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)


def make_batch(labels, seed, name):
    return {b"batch_label": name.encode(), b"labels": list(labels), b"data": image_rows(labels, seed),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(len(labels))]}


def add_pickle(tar, name, obj):
    raw = pickle.dumps(obj, protocol=2)  # the real batches are Python 2 pickles: protocol 2 at most
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(path, {batch name: dict}) of a tar.gz laid out like cifar-10-python.tar.gz. Labels interleave
    the classes in a shuffled order, so 'first N of each class' is not 'the first 10 N rows'."""
    rng = np.random.default_rng(0)
    batches = {}
    for b in range(1, 6):
        labels = rng.permutation(np.repeat(np.arange(10), TRAIN_PER_BATCH)).tolist()
        batches[f"data_batch_{b}"] = make_batch(labels, b, f"training batch {b} of 5")
    labels = rng.permutation(np.repeat(np.arange(10), VAL_PER_CLASS)).tolist()
    batches["test_batch"] = make_batch(labels, 9, "testing batch 1 of 1")
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 20, b"num_vis": 3072}
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_pickle(tar, "batches.meta", meta)
        for name, batch in batches.items():
            add_pickle(tar, name, batch)
        add_pickle(tar, "readme.html", {})  # the real archive holds one too; it is not read
    return str(path), batches


def convert(archive_path, out, train=None, val=None, md5=False):
    args = argparse.Namespace(archive=archive_path, output_dir=str(out), train_per_class=train,
                              val_per_class=val, skip_md5=not md5)
    return cifar10_folder.main(args)


def listing(folder):
    return {c: sorted(os.listdir(os.path.join(folder, c))) for c in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------------------------------
# scripts/cifar10_folder.py
# ----------------------------------------------------------------------------------------------------

def test_cifar10_folder_writes_every_image_under_its_class_name(archive, tmp_path):
    path, batches = archive
    out = tmp_path / "cifar"
    assert convert(path, out) == {"train": 10 * 5 * TRAIN_PER_BATCH, "val": 10 * VAL_PER_CLASS}
    assert sorted(os.listdir(out)) == ["train", "val"]  # no partial folder left
    train, val = listing(out / "train"), listing(out / "val")
    assert list(train) == sorted(CLASSES) and list(val) == sorted(CLASSES)  # folders named from batches.meta
    assert all(len(files) == 5 * TRAIN_PER_BATCH for files in train.values())
    assert all(len(files) == VAL_PER_CLASS for files in val.values())
    # each file's name is its index in the split; its folder is its label's name
    train_labels = sum((batches[f"data_batch_{b}"][b"labels"] for b in range(1, 6)), [])
    for name, files in train.items():
        assert [int(f[:-4]) for f in files] == [i for i, y in enumerate(train_labels) if CLASSES[y] == name]
    assert all(len(f) == len("00.png") for files in train.values() for f in files)  # 100 images: 2 digits


def test_cifar10_folder_pixels_round_trip_exactly(archive, tmp_path):
    path, batches = archive
    convert(path, tmp_path / "cifar")
    # training image 27: the 7th row of data_batch_2 (20 images a batch)
    row, label = batches["data_batch_2"][b"data"][7], batches["data_batch_2"][b"labels"][7]
    img = Image.open(tmp_path / "cifar" / "train" / CLASSES[label] / "27.png")
    assert img.mode == "RGB" and img.size == (32, 32)
    pixels = np.asarray(img)                                             # (H, W, 3)
    assert np.array_equal(pixels[..., 0], row[:1024].reshape(32, 32))    # red plane, row-major
    assert np.array_equal(pixels[..., 1], row[1024:2048].reshape(32, 32))
    assert np.array_equal(pixels[..., 2], row[2048:].reshape(32, 32))
    row, label = batches["test_batch"][b"data"][0], batches["test_batch"][b"labels"][0]
    val = np.asarray(Image.open(tmp_path / "cifar" / "val" / CLASSES[label] / "00.png"))
    assert np.array_equal(val, row.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar10_folder_keeps_the_first_n_of_each_class_in_archive_order(archive, tmp_path):
    path, batches = archive
    assert convert(path, tmp_path / "a", train=3, val=1) == {"train": 30, "val": 10}
    train_labels = sum((batches[f"data_batch_{b}"][b"labels"] for b in range(1, 6)), [])
    val_labels = batches["test_batch"][b"labels"]
    for name, files in listing(tmp_path / "a" / "train").items():
        assert [int(f[:-4]) for f in files] == [i for i, y in enumerate(train_labels) if CLASSES[y] == name][:3]
    for name, files in listing(tmp_path / "a" / "val").items():
        assert [int(f[:-4]) for f in files] == [i for i, y in enumerate(val_labels) if CLASSES[y] == name][:1]
    convert(path, tmp_path / "b", train=3, val=1)  # the same flags, the same images
    assert listing(tmp_path / "a" / "train") == listing(tmp_path / "b" / "train")


def test_cifar10_folder_output_reads_as_the_projects_image_folder(archive, tmp_path):
    import data
    path, _ = archive
    convert(path, tmp_path / "cifar", train=2, val=1)
    train = data.ImageFolder(str(tmp_path / "cifar" / "train"))
    val = data.ImageFolder(str(tmp_path / "cifar" / "val"))
    assert train.classes == sorted(CLASSES) and len(train) == 20 and len(val) == 10
    data.check_same_classes(train, val, str(tmp_path / "cifar"))


def test_cifar10_folder_refuses_a_wrong_archive_by_md5_naming_it(archive, tmp_path):
    path, _ = archive
    with pytest.raises(ValueError) as err:
        convert(path, tmp_path / "out", md5=True)  # made here, so not the official file
    msg = str(err.value)
    found = hashlib.md5(open(path, "rb").read()).hexdigest()
    assert path in msg and found in msg and cifar10_folder.CIFAR10_MD5 in msg
    assert "curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert not (tmp_path / "out").exists()  # checked before anything is written
    cifar10_folder.check_md5(path, expected=found)  # the check itself passes the right md5


def test_cifar10_folder_refuses_a_folder_holding_anything(archive, tmp_path):
    path, _ = archive
    out = tmp_path / "out"
    (out / "train" / "cat").mkdir(parents=True)
    (out / "train" / "cat" / "0.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds train: pass a new or empty folder"):
        convert(path, out)
    assert os.listdir(out / "train" / "cat") == ["0.png"]
    (tmp_path / "empty").mkdir()
    convert(path, tmp_path / "empty", train=1, val=1)  # an empty folder is fine


def test_cifar10_folder_refuses_counts_above_what_the_archive_holds(archive, tmp_path):
    path, _ = archive
    with pytest.raises(ValueError, match=r"--val-per-class 4: the archive's val images hold only 3 of class "
                                         r"airplane; pass 3 or less"):
        convert(path, tmp_path / "out", train=10, val=4)
    with pytest.raises(ValueError, match="--train-per-class 11: .* hold only 10 "):
        convert(path, tmp_path / "out", train=11)
    assert not (tmp_path / "out").exists()


def test_cifar10_folder_refuses_an_archive_that_is_not_cifar10(tmp_path):
    bad = tmp_path / "other.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        add_pickle(tar, "batches.meta", {b"label_names": [b"a", b"b"]})
    with pytest.raises(ValueError, match=r"holds no cifar-10-batches-py/data_batch_1 \(6 of the 7 files missing\)"):
        convert(str(bad), tmp_path / "out")
    bad.write_bytes(b"not a gzip")
    with pytest.raises(ValueError, match="cannot be read as CIFAR-10's python archive"):
        convert(str(bad), tmp_path / "out")


def test_cifar10_folder_unpickles_only_what_a_batch_holds():
    evil = pickle.dumps(types.SimpleNamespace(), protocol=2)  # any class outside numpy's arrays
    with pytest.raises(pickle.UnpicklingError, match="types.SimpleNamespace is not part of a CIFAR-10 batch"):
        cifar10_folder.BatchUnpickler(io.BytesIO(evil), encoding="bytes").load()


def test_cifar10_folder_as_a_command(archive, tmp_path):
    """Exit status 0 with one summary line; 2 with one line for a missing archive, a folder in use and a
    bad flag; the md5 refusal without --skip-md5."""
    path, _ = archive
    out = tmp_path / "out"

    def run(*argv):
        return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True,
                              env=subprocess_env(), cwd=tmp_path, timeout=120)

    ok = run("--archive", path, "--output-dir", str(out), "--skip-md5", "--train-per-class", "2",
             "--val-per-class", "1")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("\n") == 1 and "wrote 20 training and 10 validation images of 10 classes" in ok.stdout
    refusals = [run("--archive", str(tmp_path / "missing.tar.gz"), "--output-dir", str(tmp_path / "x")),
                run("--archive", path, "--output-dir", str(out), "--skip-md5"),
                run("--archive", path, "--output-dir", str(tmp_path / "y")),
                run("--archive", path, "--output-dir", str(tmp_path / "z"), "--train-per-class", "0")]
    for r, words in zip(refusals, ["missing.tar.gz: no such file; download it with `curl -O",
                                   "already holds train, val: pass a new or empty folder",
                                   f"has md5 {hashlib.md5(open(path, 'rb').read()).hexdigest()}, not CIFAR-10's",
                                   "--train-per-class: must be a whole number > 0, got 0"]):
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith("cifar10_folder.py: error: ") and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_cifar10_folder_needs_standard_library_numpy_and_pil_only():
    names = set()
    for node in ast.walk(ast.parse(open(SCRIPT).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0])
    assert names - set(sys.stdlib_module_names) == {"numpy", "PIL"}
    assert '"""' in open(SCRIPT).read()[:3] and "curl -O" in cifar10_folder.__doc__


# ----------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh
# ----------------------------------------------------------------------------------------------------

def gpu_check(*argv, cwd, env=None):
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), *argv], capture_output=True,
                          text=True, cwd=cwd, env=env or subprocess_env(), timeout=120)


def repo_files():
    return set(subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=REPO,
                              capture_output=True, text=True).stdout.split())


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_gpu_check_help_prints_usage_and_writes_nothing(flag, tmp_path):
    before = repo_files()
    for cwd in (tmp_path, REPO):
        r = gpu_check(flag, cwd=cwd)
        assert r.returncode == 0 and r.stdout.startswith("usage: bash scripts/gpu_check.sh [LOG]"), r.stderr
    assert os.listdir(tmp_path) == [] and repo_files() == before
    assert not os.path.exists(os.path.join(REPO, flag))


def test_gpu_check_refuses_without_cuda_before_any_work(tmp_path):
    """One line, exit status 2, no log written (CUDA_VISIBLE_DEVICES="" hides a GPU where there is one)."""
    before = repo_files()
    env = dict(subprocess_env(), CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    for argv in ((), (str(tmp_path / "log.txt"),), ("rel.log",)):
        r = gpu_check(*argv, cwd=tmp_path, env=env)
        assert r.returncode == 2 and r.stdout == "", r.stderr
        assert r.stderr.startswith("gpu_check.sh: error: no CUDA device visible to torch") and r.stderr.count("\n") == 1
    bad = gpu_check("--lg", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "unknown option --lg" in bad.stderr
    assert os.listdir(tmp_path) == [] and repo_files() == before


# ----------------------------------------------------------------------------------------------------
# CITATION.cff and LICENSE
# ----------------------------------------------------------------------------------------------------

def test_citation_file_has_the_keys_github_reads():
    """No YAML parser here: every line is `key: value`, `key:` or a `- ` list item, indented by twos,
    and the keys CFF 1.2.0 requires are there, with the paper's five authors in order."""
    text = open(os.path.join(REPO, "CITATION.cff")).read()
    assert "\t" not in text
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, line
        assert re.fullmatch(r" *(- )?([a-z][a-z0-9-]*:( .+)?|[^:]+)", line), line
    top = {m.group(1) for m in re.finditer(r"^([a-z-]+):", text, re.M)}
    assert {"cff-version", "message", "title", "authors", "type", "license", "preferred-citation"} <= top
    assert re.search(r"^cff-version: 1\.2\.0$", text, re.M) and re.search(r"^license: MIT$", text, re.M)
    paper = text[text.index("preferred-citation:"):]
    assert "Corrupted Image Modeling for Self-Supervised Visual Pre-Training" in paper
    names = re.findall(r"family-names: (\S+)\n\s+given-names: (\S+)", paper)
    assert names == [("Fang", "Yuxin"), ("Dong", "Li"), ("Bao", "Hangbo"), ("Wang", "Xinggang"), ("Wei", "Furu")]
    assert "2202.03382" in paper and re.search(r"^  year: 2023$", paper, re.M)
    assert open(os.path.join(REPO, "LICENSE")).read().startswith("MIT License\n\nCopyright (c) 2026 ")


# ----------------------------------------------------------------------------------------------------
# docs/pretrain.md: the snippets that load backbone.pth into timm and torchvision, run as written
# ----------------------------------------------------------------------------------------------------

def doc_snippet(library):
    """The fenced ```python block of docs/pretrain.md that imports `library`."""
    text = open(os.path.join(REPO, "docs", "pretrain.md")).read()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    found = [b for b in blocks if re.search(rf"^import .*\b{library}\b", b, re.M)]
    assert len(found) == 1, f"docs/pretrain.md: {len(found)} python blocks import {library}"
    return found[0]


def export_backbone_file(arch, folder):
    """backbone.pth as pretrain.py writes it (pretrain.export), for an `arch` backbone. The weights are
    left uninitialised (built on the meta device, then given memory): only names and shapes matter."""
    import enhancer
    import pretrain
    with torch.device("meta"):
        backbone = enhancer.build_backbone(arch)
    backbone = backbone.to_empty(device="cpu")
    args = argparse.Namespace(arch=arch, img_size=224, patch_size=16, init_values=None)
    torch.save(pretrain.export(types.SimpleNamespace(backbone=backbone), args), folder / "backbone.pth")


class StandIn(torch.nn.Module):
    """A module holding tensors under the given (name, shape) list, nested like the library's model:
    what load_state_dict checks (names and shapes) without the library."""

    def __init__(self, keys):
        super().__init__()
        for name, shape in keys:
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            dtype = torch.long if leaf == "num_batches_tracked" else torch.float32
            module.register_buffer(leaf, torch.zeros(shape, dtype=dtype))


def run_snippet(code, folder, monkeypatch, fake=None):
    """exec the snippet in `folder` (where backbone.pth is); `fake` stands in for missing libraries."""
    monkeypatch.chdir(folder)
    for name, module in (fake or {}).items():
        monkeypatch.setitem(sys.modules, name, module)
    scope = {}
    exec(compile(code, "docs/pretrain.md", "exec"), scope)
    return scope


def test_pretrain_md_torchvision_snippet_loads_our_resnet50_export(tmp_path, monkeypatch):
    """torchvision is not installed here: its resnet50() is stood in for by a module with the stored
    torchvision key list (tests/test_enhancer.py) plus `fc`, so the snippet runs as written and
    load_state_dict checks every name and shape, and the snippet's own assert the missing keys."""
    code = doc_snippet("torchvision")
    export_backbone_file("resnet50", tmp_path)
    keys = torchvision_resnet50_keys() + [("fc.weight", [1000, 2048]), ("fc.bias", [1000])]
    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet50=lambda: StandIn(keys))
    scope = run_snippet(code, tmp_path, monkeypatch, {"torchvision": fake})
    assert list(scope["sd"]) == [k for k, _ in torchvision_resnet50_keys()]  # fc.weight / fc.bias left out
    assert scope["result"].missing_keys == ["fc.weight", "fc.bias"]


def test_pretrain_md_timm_snippet_loads_our_vit_b_export(tmp_path, monkeypatch):
    """timm likewise, through the stored timm ViT-B/16 key list (strict load: every key, no more)."""
    code = doc_snippet("timm")
    export_backbone_file("vit_b", tmp_path)
    fake = types.ModuleType("timm")
    fake.create_model = lambda name, num_classes: StandIn(TIMM_VIT_B)
    assert "create_model(\"vit_base_patch16_224\", num_classes=0)" in code
    scope = run_snippet(code, tmp_path, monkeypatch, {"timm": fake})
    assert list(scope["sd"]) == [k for k, _ in TIMM_VIT_B]


@pytest.mark.parametrize("library,arch", [("timm", "vit_b"), ("torchvision", "resnet50")])
def test_pretrain_md_snippets_with_the_real_library(library, arch, tmp_path, monkeypatch):
    """Where timm / torchvision happen to be installed (never a dependency), the snippet as written."""
    pytest.importorskip(library)
    export_backbone_file(arch, tmp_path)
    run_snippet(doc_snippet(library), tmp_path, monkeypatch)
