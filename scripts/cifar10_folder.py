"""CIFAR-10's python archive -> the ImageNet folder layout the stage scripts read (`--data OUT`):
OUT/train/<class>/<index>.png from the five training batches, OUT/val/<class>/<index>.png from the
test batch, class names from batches.meta. The archive is read in place, never extracted.

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
    python scripts/cifar10_folder.py --archive cifar-10-python.tar.gz --output-dir data/cifar10
    # 400 training and 100 validation images per class: 5,000 in all, the size of the photos folder
    # the docs measured on (docs/study.md; that one drew its val/ from the training batches too, so
    # its numbers are a guide here, not a target), then the README's "Your own photos" commands:
    python scripts/cifar10_folder.py --archive cifar-10-python.tar.gz --output-dir data/photos \\
        --train-per-class 400 --val-per-class 100
    python pretrain.py --data data/photos --output-dir out/photos

<index> is the image's position in the split as the archive orders it (training batches 1..5 in
turn: 0..49999; test batch: 0..9999), zero-padded, so the sorted file names keep the archive's order
and a file can be found again in the original. `--train-per-class N` keeps the first N of each class
in that order, so the same flags give the same images on every machine. PNG is lossless: the pixels
are the archive's bytes. Standard library, numpy and PIL only.
"""
import argparse
import hashlib
import os
import pickle
import sys
import tarfile

import numpy as np
from PIL import Image

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz, as torchvision's CIFAR10 checks it
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"  # the archive's one top-level folder
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
SIDE = 32
PARTIAL = ".partial"  # OUT/.partial/{train,val} while writing; renamed into place when complete


# ----------------------------------------------------------------------------------------------------
# Reading the archive
# ----------------------------------------------------------------------------------------------------

def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path, expected=CIFAR10_MD5):
    """Refuse anything but the expected archive: a cut download is a valid gzip up to where it stops."""
    found = file_md5(path)
    if found != expected:
        raise ValueError(f"--archive {path} has md5 {found}, not CIFAR-10's {expected} (a cut or other "
                         f"download): download it again with `curl -O {URL}`")


class BatchUnpickler(pickle.Unpickler):
    """pickle that builds only what a CIFAR-10 batch holds (dicts, lists, bytes, numpy uint8 arrays):
    unpickling can run any function a file names, and --skip-md5 lets an unchecked file through."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        if module.startswith("numpy.core."):  # numpy >= 2 renamed numpy.core (the old name warns)
            try:
                return super().find_class("numpy._core." + module[len("numpy.core."):], name)
            except ImportError:
                pass
        return super().find_class(module, name)


def read_archive(path):
    """{member name: unpickled dict (bytes keys)} for batches.meta and every batch, in one pass
    over the gzip stream (a tar.gz has no index, so a lookup by name would read it again)."""
    wanted = {f"{FOLDER}/{name}" for name in ["batches.meta"] + SPLITS["train"] + SPLITS["val"]}
    found = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    found[member.name.split("/")[-1]] = BatchUnpickler(tar.extractfile(member),
                                                                       encoding="bytes").load()
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"--archive {path} cannot be read as CIFAR-10's python archive ({type(err).__name__}: "
                         f"{err}): download it again with `curl -O {URL}`") from None
    missing = sorted(w.split("/")[-1] for w in wanted if w.split("/")[-1] not in found)
    if missing:
        raise ValueError(f"--archive {path} holds no {FOLDER}/{missing[0]} ({len(missing)} of the 7 files "
                         f"missing): not CIFAR-10's python archive; download it with `curl -O {URL}`")
    return found


def class_names(meta, path):
    """batches.meta's label_names as folder names (label i -> classes[i])."""
    classes = [n.decode() for n in meta[b"label_names"]]
    if len(set(classes)) != len(classes) or any(n in ("", ".", "..") or n != os.path.basename(n) for n in classes):
        raise ValueError(f"--archive {path}: batches.meta names classes {classes}, which cannot all be folder "
                         f"names; not CIFAR-10's python archive")
    return classes


def split_arrays(batches, names, num_classes, path):
    """(images (N, 32, 32, 3) uint8, labels (N,)) of the batches `names`, concatenated in that order."""
    data = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
    labels = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(data) != len(labels) or \
            labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--archive {path}: {', '.join(names)} hold data {data.shape} and {len(labels)} labels "
                         f"in {labels.min()}..{labels.max()}, not (N, 3072) images of {num_classes} classes; "
                         f"not CIFAR-10's python archive")
    # each row is 3072 bytes: the red plane (32 rows of 32), then green, then blue
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3)
    return images, labels


def first_per_class(labels, count, classes, flag, split):
    """Indices of the first `count` images of each class in archive order (all when count is None)."""
    if count is None:
        return np.arange(len(labels))
    held = np.bincount(labels, minlength=len(classes))
    if count > held.min():
        raise ValueError(f"{flag} {count}: the archive's {split} images hold only {held.min()} of class "
                         f"{classes[held.argmin()]}; pass {held.min()} or less")
    rank = np.zeros(len(labels), dtype=np.int64)  # rank[i] = how many of i's class come before it
    for c in range(len(classes)):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.flatnonzero(rank < count)


# ----------------------------------------------------------------------------------------------------
# Writing the folders
# ----------------------------------------------------------------------------------------------------

def check_output_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output-dir {path} is a file, not a folder: pass a new or empty folder")
    held = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if PARTIAL in held:
        raise ValueError(f"--output-dir {path} holds an interrupted conversion ({PARTIAL}): delete "
                         f"{path} and run the same command again")
    if held:
        raise ValueError(f"--output-dir {path} already holds {', '.join(held[:3])}"
                         f"{', ...' if len(held) > 3 else ''}: pass a new or empty folder (nothing is "
                         f"written over)")


def write_split(images, labels, keep, classes, folder):
    digits = len(str(len(labels) - 1))
    for name in classes:
        os.makedirs(os.path.join(folder, name))
    for i in keep:
        path = os.path.join(folder, classes[labels[i]], f"{i:0{digits}d}.png")
        Image.fromarray(images[i], "RGB").save(path)


def main(args):
    if not os.path.isfile(args.archive):
        raise FileNotFoundError(f"--archive {args.archive}: no such file; download it with `curl -O {URL}`")
    check_output_dir(args.output_dir)
    if not args.skip_md5:
        check_md5(args.archive)
    batches = read_archive(args.archive)
    classes = class_names(batches["batches.meta"], args.archive)
    counts = {"train": args.train_per_class, "val": args.val_per_class}
    flags = {"train": "--train-per-class", "val": "--val-per-class"}
    chosen = {}
    for split, names in SPLITS.items():  # every count checked before anything is written
        images, labels = split_arrays(batches, names, len(classes), args.archive)
        keep = first_per_class(labels, counts[split], classes, flags[split], split)
        chosen[split] = (images, labels, keep)
    partial = os.path.join(args.output_dir, PARTIAL)
    for split, (images, labels, keep) in chosen.items():
        write_split(images, labels, keep, classes, os.path.join(partial, split))
    for split in SPLITS:  # complete: into place
        os.rename(os.path.join(partial, split), os.path.join(args.output_dir, split))
    os.rmdir(partial)
    n = {split: len(keep) for split, (_, _, keep) in chosen.items()}
    print(f"cifar10_folder.py: wrote {n['train']} training and {n['val']} validation images of "
          f"{len(classes)} classes ({', '.join(classes)}) to {os.path.join(args.output_dir, '{train,val}')}; "
          f"next: python pretrain.py --data {args.output_dir}")
    return n


# ----------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, as the stage scripts do (argparse's usage block hides it)
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text}")
    return value


def get_args_parser():
    p = ArgumentParser(prog="cifar10_folder.py", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archive", required=True, metavar="PATH",
                   help=f"cifar-10-python.tar.gz as downloaded ({URL}); read in place, its md5 checked first")
    p.add_argument("--output-dir", required=True, metavar="OUT",
                   help="new or empty folder: train/ and val/ go here; pass it to the stage scripts as --data")
    p.add_argument("--train-per-class", type=positive_int, default=None, metavar="N",
                   help="keep the first N training images of each class (archive order; default all 5,000); "
                        "400 with --val-per-class 100 gives 5,000 images, the size the docs measured on")
    p.add_argument("--val-per-class", type=positive_int, default=None, metavar="M",
                   help="keep the first M test images of each class as val/ (archive order; default all 1,000)")
    p.add_argument("--skip-md5", action="store_true",
                   help="skip the md5 check: for tests of this script on a made-up archive only")
    return p


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except (ValueError, FileNotFoundError) as err:
        print(f"cifar10_folder.py: error: {err}", file=sys.stderr)
        sys.exit(2)
