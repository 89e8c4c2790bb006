"""The README's paper path, run as written.

Every command of the README's copy-paste block (pre-train ViT-B/16 and ResNet-50 with the official
tokenizer, fine-tune, linear probe, k-NN, ADE20K UperNet train and evaluate) runs in order, literally,
in a temporary folder that holds generated ImageNet-layout photos at 224 px, an ADE20K-layout set and
DALL-E tokenizer files in the official whole-module pickle format (random weights). The test adds
only size flags (steps, batch, image and crop size, workers) and starts each `torchrun` command as
the one process torchrun would start, with its environment (conftest.torchrun; the two-process runs
of every stage have their own tests); every stage must find the previous stage's output where the
block says it is.
"""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, subprocess_env, torchrun
from dalle_standin import write_official_pickles

MARKER = "<!-- paper path: tests/test_paper_path.py runs this block as written -->"
# what the test adds to each kind of command: sizes only (the last value of a flag wins in argparse)
SIZE_FLAGS = {
    "pretrain.py": "--max-steps 2 --batch-size 2 --img-size 32 --num-workers 0",
    "finetune.py": "--max-steps 2 --batch-size 2 --eval-batch-size 4 --num-workers 0",
    "segment.py": "--iters 2 --batch-size 2 --crop-size 32 --scale 48 32 --stride 16 --eval-every 2 "
                  "--eval-batch-size 2 --num-workers 0",
    "segment.py --eval-only": "--num-workers 0",
}


def paper_block():
    """The README's paper-path block: (variables it sets, commands with continuation lines joined)."""
    text = open(os.path.join(REPO, "README.md")).read()
    assert MARKER in text, "README.md lost the paper-path marker"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split(" #", 1)[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    lines = [re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")]
    variables = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_0-9]+=", line))
    commands = [line for line in lines if not re.match(r"^[A-Z_0-9]+=", line)]
    return variables, commands


def smooth_image(rng, h, w):
    """A photo-like image: low-frequency colour fields plus a little noise."""
    small = rng.random((4, 4, 3)) * 255
    img = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_imagenet(root, rng, classes=2, train=10, val=4):
    """ImageNet layout, 224 px photos (one of them 240 x 200), JPEG."""
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                size = (200, 240) if i == 0 else (224, 224)
                smooth_image(rng, *size).save(folder / f"{split}_{c}_{i}.JPEG", quality=90)


def make_ade20k(root, rng, train=4, val=2, classes=150):
    """ADE20K layout: JPEG images of odd sizes, PNG labels with 0 = ignore and 1..150 classes."""
    for split, n in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            h, w = (72, 96) if i % 2 else (90, 70)
            smooth_image(rng, h, w).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            label = rng.integers(0, classes + 1, (h // 8, w // 8)).astype(np.uint8)
            Image.fromarray(label).resize((w, h), Image.NEAREST).save(
                root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def expand(command, variables):
    """$NAME and ${NAME} replaced by the block's (or the test's) values."""
    return re.sub(r"\$\{?([A-Z_0-9]+)\}?", lambda m: variables[m.group(1)], command)


def run(command, cwd):
    """Run a README command: its script from the repository plus the size flags for its kind; a
    `torchrun` command as one process with torchrun's environment."""
    argv = shlex.split(command)
    assert argv[0] in ("torchrun", "python"), command
    script = next(a for a in argv if a.endswith(".py"))
    kind = script + (" --eval-only" if "--eval-only" in argv else "")
    argv = [os.path.join(REPO, script)] + argv[argv.index(script) + 1:] + SIZE_FLAGS[kind].split()
    if command.startswith("torchrun"):
        return torchrun(argv, nproc=1, cwd=cwd, timeout=600)
    return subprocess.run([sys.executable] + argv, cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)


def test_readme_paper_path_block_is_complete():
    variables, commands = paper_block()
    assert {"IMAGENET", "ADE20K", "DALLE", "OUT"} <= set(variables)
    scripts = [(re.search(r"(\w+\.py)", c).group(1), re.search(r"--arch (\w+)", c)) for c in commands]
    pretrains = [arch.group(1) for script, arch in scripts if script == "pretrain.py"]
    assert pretrains == ["vit_b", "resnet50"]
    for arch in pretrains:  # each backbone goes through every downstream stage
        mine = [c for c in commands if f"/{arch}/" in c]
        assert any("finetune.py" in c and "--mode" not in c for c in mine), arch
        assert any("--mode linear" in c for c in mine) and any("--mode knn" in c for c in mine), arch
        assert any("segment.py" in c and "--eval-only" not in c for c in mine), arch
        assert any("segment.py" in c and "--eval-only" in c for c in mine), arch
    assert all(c.startswith("torchrun --nproc_per_node 8 ") for c in commands)


@pytest.mark.paper_path
@pytest.mark.parametrize("arch", ["vit_b", "resnet50"])
def test_readme_paper_path_runs_as_written(tmp_path, arch):
    """One backbone's chain of the block (its commands write and read $OUT/<arch>/...), in order."""
    rng = np.random.default_rng(0)
    variables, commands = paper_block()
    commands = [c for c in commands if f"/{arch}/" in c]
    given = {"IMAGENET": tmp_path / "imagenet", "ADE20K": tmp_path / "ade20k", "DALLE": tmp_path / "dall_e"}
    make_imagenet(given["IMAGENET"], rng)
    make_ade20k(given["ADE20K"], rng)
    given["DALLE"].mkdir()
    write_official_pickles(given["DALLE"], dict(n_hid=8, n_blk_per_group=1, vocab_size=8192),
                           dict(n_init=16, n_hid=8, n_blk_per_group=1, vocab_size=8192))
    # the data and tokenizer lines are the user's to edit; OUT stays as the README sets it
    variables.update({k: str(v) for k, v in given.items()})
    out = tmp_path / variables["OUT"] / arch
    for command in commands:
        command = expand(command, variables)
        for path in re.findall(r"--init (\S+)", command):  # an earlier stage left it there
            assert (tmp_path / path).is_file(), f"{command}: no {path}"
        proc = run(command, tmp_path)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    for path in ("pretrain/backbone.pth", "finetune/classifier.pth", "linear/classifier.pth", "ade20k/metrics.json"):
        assert (out / path).is_file(), path
