"""Data for every CIM stage: image folders, ADE20K layout, a built-in procedural dataset, transforms.

Needs torch, numpy and pillow; nothing else (no torchvision: the transforms below are plain PIL/numpy).

- `ImageFolder`      ImageNet layout `root/<class>/<image>`, classes sorted, images converted to RGB.
- `ADE20K`           `images/{training,validation}/*.jpg` + `annotations/.../*.png`; 0 = ignore -> 255,
                     classes 1..K -> 0..K-1 (mmseg's reduce_zero_label).
- `SyntheticShapes`  the built-in dataset every stage falls back to when `--data` is not given: shapes of
                     K classes over textured backgrounds, generated on the fly and deterministic from
                     (seed, split, index), with a class label AND a per-pixel mask per image.
- transforms         `RandomResizedCrop` that returns the network view (S px, bicubic) and the tokenizer
                     view ((S/P)*f px, Lanczos) of ONE crop, flip, colour jitter, to-tensor + normalize,
                     eval resize + center crop; for fine-tuning `RandAugment` (its 15 PIL operations
                     written out) and `RandomErasing`.
- segmentation      `SegTrainTransform` (rescale, crop with a max single-class ratio, flip, photometric
                     distortion, pad with the ignore label) and `SegEvalTransform`, mmseg's ADE20K pipeline.
- `EvalSampler`      an exact split of an evaluation set over ranks: every sample counted once.

Unreadable images: an image that PIL cannot decode (corrupt or truncated file) is SKIPPED: a warning
naming the file and the running count is printed and the next image is returned instead, so one bad
file in 1.28M does not kill a multi-day run. Ten unreadable files in a row stop with an error naming
the last one (that is a broken dataset, not a bad file). `check_readable` opens every image of a set
by its header before training: a set none of whose images can be read stops at once, and some
unreadable ones are warned about once. Images are loaded upright (EXIF orientation applied).

Symlinks: class folders may be links, and links inside them are followed, each real folder once per
class; each image file counts once by its real path, and one reached from two class folders (a link
into another class, a loop through the root) is refused, since it would carry two labels.
"""
import math
import os
import random
import signal
import struct
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Photo formats only: PIL also registers e.g. .h5, .grib, .mpg, .eps, which would be "skipped as
# unreadable" on every epoch if they sat in a class folder.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


# ----------------------------------------------------------------------------------------------------
# Reading images
# ----------------------------------------------------------------------------------------------------

def load_rgb(path, draft_size=None):
    """Open any image PIL reads and return it as 8-bit RGB, upright (its EXIF orientation applied).

    JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= draft_size on both
    sides: much faster for large photos, and lossless for what the transform keeps.
    """
    with Image.open(path) as img:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))  # square: the same for either orientation
        return to_rgb(upright(img))


# EXIF tag 0x0112: how the stored pixels must be turned for display (1 = as stored). Phones store a
# portrait photo as landscape pixels with orientation 6 or 8; every viewer shows it upright, and the
# network must see what the labeller saw (values 5..8 swap width and height).
EXIF_ORIENTATION = 0x0112


def exif_orientation(img):
    """The EXIF orientation of an opened image (headers only), 1 where there is none or it cannot be
    parsed: a damaged EXIF block must not make a decodable photo unreadable."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except (OSError, ValueError, SyntaxError, TypeError, KeyError, struct.error):
        return 1


def upright(img):
    """The image turned as its EXIF orientation says (ImageOps.exif_transpose), or itself (no copy)."""
    return img if exif_orientation(img) == 1 else ImageOps.exif_transpose(img)


def image_size(path):
    """(width, height) of an image file as load_rgb returns it, from its header (no pixel decoded)."""
    with Image.open(path) as img:
        w, h = img.size
        return (h, w) if exif_orientation(img) in (5, 6, 7, 8) else (w, h)


# What PIL raises for a file it cannot read as an image: not an image, truncated, a decompression bomb
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def first_readable_side(folder):
    """Longer side of the first image below `folder` that PIL can open (headers only), or None. An
    unreadable file is passed over, as training skips it: one corrupt first file must not stop the
    recipe choice."""
    for dirpath, files in walk_once(folder, warn=False):  # ImageFolder warns about links, once
        for name, _ in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                try:
                    with Image.open(os.path.join(dirpath, name)) as img:
                        return max(img.size)
                except UNREADABLE:
                    continue
    return None


def typical_image_side(root, n=16):
    """Median longer side of the first readable image of up to n class folders of `root` (headers
    only), to tell a folder of small photos from an ImageNet-sized one without scanning it."""
    check_folder(root, "image folder", ImageFolder.LAYOUT)
    sides = []
    for name in sorted(e.name for e in os.scandir(root) if e.is_dir())[:n]:
        side = first_readable_side(os.path.join(root, name))
        if side is not None:
            sides.append(side)
    if not sides:
        raise FileNotFoundError(f"image folder {root!r} holds no images in class sub-folders (or none PIL "
                                f"can open); expected layout: {ImageFolder.LAYOUT}")
    return sorted(sides)[len(sides) // 2]


PHOTOS_MAX_SIDE = 64  # --data of images this small (median longer side) gets a stage's photos recipe


def default_recipe(data_dir):
    """The recipe a stage picks when --recipe is not given: builtin without --data, photos for a folder
    of images up to PHOTOS_MAX_SIDE px (typical_image_side of its train/), imagenet otherwise."""
    if data_dir is None:
        return "builtin"
    return "photos" if typical_image_side(os.path.join(data_dir, "train")) <= PHOTOS_MAX_SIDE else "imagenet"


def to_rgb(img):
    """Grayscale, palette, RGBA/LA, CMYK and 16/32-bit images -> 8-bit RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("L") clips at 255 (a white image). 16-bit modes hold 0..65535: scale by 257.
        # Mode I (32-bit) says nothing of its range: 8-bit values stored as int32 stay as they are,
        # 16-bit ones are scaled by 257, anything larger by its own maximum.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max(initial=0)
        scale = 257.0 if img.mode != "I" or 255 < top <= 65535 else 1.0 if top <= 255 else top / 255
        img = Image.fromarray(np.clip(arr / scale, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette image with transparency goes to RGB
    return img.convert("RGB")


def check_folder(path, what, layout):
    """Stop with a message naming the path and the expected layout when a data folder is unusable."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {path!r} does not exist; expected layout: {layout}")


class DatasetBase(torch.utils.data.Dataset):
    """What every dataset here shares: the skip-and-warn policy for unreadable files (module
    docstring) and per-sample augmentation randomness.

    Transforms are called as `transform(img, rng)` with `rng = random.Random("seed/epoch/index")`:
    the augmentation of a sample is a pure function of (seed, epoch, index), the same for any number
    of workers or ranks, so a resumed run replays exactly the crops the uninterrupted run would
    have drawn. Call `set_epoch(e)` together with the sampler's.
    """

    max_consecutive_failures = 10
    seed, epoch = 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def sample_rng(self, index):
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    skip_unreadable = False  # evaluation (build_eval_loader): an unreadable image gives None

    def load_with_skip(self, index, load_fn, path_fn):
        """load_fn(index), or for an unreadable file: in training the next readable sample in its
        place (a corrupt file in 1.28M must not end a multi-day run), in evaluation None (the
        sample is dropped and counted, not replaced: every image counts once). A label file that
        contradicts its image is a broken dataset, never skipped."""
        if self.skip_unreadable:
            try:
                return load_fn(index)
            except LabelFileError:
                raise
            except UNREADABLE as err:
                print(f"data.py: WARNING unreadable image {path_fn(index)} ({err}) left out of the evaluation",
                      file=sys.stderr)
                return None
        for attempt in range(self.max_consecutive_failures):
            i = (index + attempt) % len(self)
            try:
                return load_fn(i)
            except LabelFileError:
                raise
            except UNREADABLE as err:
                self.num_skipped = getattr(self, "num_skipped", 0) + 1
                print(f"data.py: WARNING skipping unreadable image {path_fn(i)} ({err}); "
                      f"{self.num_skipped} skipped so far in this process", file=sys.stderr)
        raise ValueError(f"data.py: {self.max_consecutive_failures} unreadable images in a row, the "
                           f"last {path_fn(i)}; check the dataset")


# ----------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------

def walk_once(top, warn=True):
    """(folder, sorted [(file name, real path)]) for `top` and every folder below it, depth first in
    sorted order (as os.walk with sorted sub-folders), following symlinks (datasets are often
    assembled from links) but entering each real folder once: a link loop (`cls/loop -> ..`) or two
    links to one folder would otherwise list the same images again and again. A folder reached a
    second time is skipped (with a warning naming the link). Real paths cost no system call for plain
    files (the real folder + the name); only a file that is itself a link is resolved."""
    seen, stack = set(), [top]
    while stack:
        dirpath = stack.pop()
        real = os.path.realpath(dirpath)
        if real in seen:
            if warn:
                print(f"data.py: WARNING {dirpath} leads to {real}, already listed under {top} (a symlink "
                      f"loop or a second link to it); its images are counted once", file=sys.stderr)
            continue  # do not descend: everything below was listed too
        seen.add(real)
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError:
            continue  # as os.walk: a folder that cannot be listed lists nothing
        dirs, files = [], []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows a link to a folder
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(e)
        yield dirpath, [(e.name, os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name))
                        for e in files]
        stack.extend(e.path for e in reversed(dirs))  # the first sub-folder is popped next


class ImageFolder(DatasetBase):
    """`root/<class>/**/<image>` -> (transform(RGB image), class index). Classes are the sorted
    sub-folder names, images sorted within each, so indices agree on every rank and machine.

    Each image file counts once, by its real path: reached twice within its class (two links to it),
    it is listed once with a warning; reached from two class folders (`train/cat/dogs -> ../dog`, or
    a loop `train/cat/loop -> ..`) it is refused, since it would be a sample of both classes."""

    LAYOUT = "root/<class_name>/<image>.{jpg,JPEG,png,...} (ImageNet's train/ or val/ folder)"

    def __init__(self, root, transform=None, seed=0):
        check_folder(root, "image folder", self.LAYOUT)
        self.root, self.transform, self.seed = root, transform, seed
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = []
        listed = {}  # real path of an image -> index of its sample
        twice = []   # (path, the sample path it repeats) within one class
        for label, name in enumerate(self.classes):
            before = len(self.samples)
            for dirpath, files in walk_once(os.path.join(root, name)):
                for f, real in files:
                    if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                        continue
                    path = os.path.join(dirpath, f)
                    first = listed.get(real)
                    if first is None:
                        listed[real] = len(self.samples)
                        self.samples.append((path, label))
                    elif self.samples[first][1] == label:
                        twice.append((path, self.samples[first][0]))
                    else:
                        raise ValueError(self.two_classes_message(real, self.samples[first], (path, label)))
            if len(self.samples) == before:
                print(f"data.py: WARNING class folder {os.path.join(root, name)} holds no images; the class "
                      f"keeps its index {label} but has no samples", file=sys.stderr)
        if twice:
            print(f"data.py: WARNING {len(twice)} image file(s) of {root} are reached twice within their class "
                  f"through symlinks (the first: {twice[0][0]} is {twice[0][1]}); each is counted once",
                  file=sys.stderr)
        if not self.samples:
            raise FileNotFoundError(f"image folder {root!r} holds no images in class sub-folders "
                                    f"({len(self.classes)} sub-folders found); expected layout: "
                                    f"{self.LAYOUT}")

    def two_classes_message(self, real, first, second):
        """The refusal of an image reached from two class folders: the file, both folders, the links."""
        folders = [os.path.join(self.root, self.classes[label]) for _, label in (first, second)]
        links = [link for link in (last_link(path, self.root) for path, _ in (first, second)) if link]
        fix = (f"remove the link {links[0]}" if len(links) == 1 else
               f"remove one of the links {' and '.join(links)}" if links else "remove the second copy")
        return (f"image {real!r} is reached from two class folders, {folders[0]} (as {first[0]}) and "
                f"{folders[1]} (as {second[0]}), so it would be a sample of both classes; {fix} (a class "
                f"folder must not lead into another class's images)")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")  # ends `for x in dataset`
        draft = getattr(self.transform, "draft_size", None)
        loaded = self.load_with_skip(
            index, lambda i: (load_rgb(self.samples[i][0], draft), self.samples[i][1]),
            lambda i: self.samples[i][0])
        if loaded is None:  # evaluation: an unreadable image, left out and counted
            return None
        img, label = loaded
        return (self.transform(img, self.sample_rng(index)) if self.transform else img), label


def last_link(path, root):
    """The last symlink on `path` below `root` (the one to remove when a path leads where it should
    not: class folders themselves are often links into a shared store), or None."""
    link, cur = None, root
    for part in os.path.relpath(path, root).split(os.sep):
        cur = os.path.join(cur, part)
        if os.path.islink(cur):
            link = cur
    return link


def reduce_zero_label(label):
    """ADE20K: 0 ("other") -> 255 (ignored by the loss), classes 1..K -> 0..K-1. uint8 in, uint8 out."""
    label = np.asarray(label).astype(np.int64) - 1
    label[label < 0] = 255
    return label.astype(np.uint8) if label.max(initial=0) <= 255 else label


class LabelFileError(ValueError):
    """A label file that contradicts its image or the class count: a broken dataset, never skipped."""


class ADE20K(DatasetBase):
    """ADE20K layout: `root/images/<split>/X.jpg` with `root/annotations/<split>/X.png`.

    Returns transform(RGB image, label, rng) where label is a uint8 array (255 = ignore); with
    `reduce_zero_label` (ADE20K's convention, the default) 0 becomes 255 and 1..K become 0..K-1.
    A label whose size differs from its image's, or (given `num_classes`) holds a value that is
    neither a class nor 255, stops with LabelFileError naming the file. Without a transform:
    (PIL image, numpy label).
    """

    LAYOUT = "root/images/{training,validation}/*.jpg and root/annotations/{training,validation}/*.png"
    LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # one channel of class indices

    def __init__(self, root, split="training", transform=None, seed=0, reduce_zero_label=True,
                 num_classes=None):
        img_dir, ann_dir = (os.path.join(root, d, split) for d in ("images", "annotations"))
        check_folder(img_dir, "ADE20K images", self.LAYOUT)
        check_folder(ann_dir, "ADE20K annotations", self.LAYOUT)
        self.img_dir, self.transform, self.seed = img_dir, transform, seed
        self.reduce_zero_label, self.num_classes = reduce_zero_label, num_classes
        names = sorted(f for f in os.listdir(img_dir)
                       if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
        if not names:
            raise FileNotFoundError(f"ADE20K images folder {img_dir!r} is empty; expected layout: "
                                    f"{self.LAYOUT}")
        self.samples = []
        for f in names:
            ann = os.path.join(ann_dir, os.path.splitext(f)[0] + ".png")
            if not os.path.isfile(ann):
                raise FileNotFoundError(f"ADE20K: image {os.path.join(img_dir, f)!r} has no "
                                        f"annotation {ann!r}; add its label file or remove the image")
            self.samples.append((os.path.join(img_dir, f), ann))

    def __len__(self):
        return len(self.samples)

    def check_labels(self):
        """Check every label file against its image without decoding the image (its size comes from
        the header): mode, size, values. Raises LabelFileError naming the first bad file; returns how
        many labelled (not ignored) pixels the split has. A sample whose image or label cannot be read
        is passed over: training skips it and evaluation leaves it out (check_readable warns)."""
        labelled = 0
        for img_path, ann_path in self.samples:
            try:
                label = self.read_label(ann_path, image_size(img_path), img_path)
            except LabelFileError:
                raise
            except UNREADABLE:
                continue
            labelled += int((label != 255).sum())
        return labelled

    def check_label_header(self, ann, ann_path, size, img_path):
        """What an opened (not decoded) label file shows: one channel of class indices, its image's size."""
        if ann.mode not in self.LABEL_MODES:
            raise LabelFileError(f"label file {ann_path!r} has mode {ann.mode}: expected one class index per "
                                 f"pixel; convert it to class indices (one 8-bit channel: a grayscale or "
                                 f"palette PNG)")
        if ann.size != tuple(size):
            raise LabelFileError(f"label file {ann_path!r} is {ann.size[0]}x{ann.size[1]} px, its image "
                                 f"{img_path!r} is {size[0]}x{size[1]}; a label must have its image's size")

    def read_label(self, ann_path, size, img_path):
        """A label file as uint8 classes (255 = ignore), checked against its image's size and the classes."""
        with Image.open(ann_path) as ann:
            self.check_label_header(ann, ann_path, size, img_path)
            label = np.asarray(ann).astype(np.int64)
        if self.reduce_zero_label:
            label = reduce_zero_label(label).astype(np.int64)
        if label.max(initial=0) > 255:
            raise LabelFileError(f"label file {ann_path!r} holds value {int(label.max())}: labels are "
                                 f"stored as 8 bits here (up to 255 classes, 255 = ignore)")
        if self.num_classes is not None:
            bad = (label >= self.num_classes) & (label != 255)
            if bad.any():
                raw = int(label[bad].max()) + (1 if self.reduce_zero_label else 0)
                raise LabelFileError(f"label file {ann_path!r} holds value {raw}, outside the "
                                     f"{self.num_classes} classes (--nb-classes {self.num_classes}"
                                     f"{', reduce_zero_label' if self.reduce_zero_label else ''}; 255 = ignore)")
        return label.astype(np.uint8)

    def load(self, i):
        img_path, ann_path = self.samples[i]
        img = load_rgb(img_path)
        return img, self.read_label(ann_path, img.size, img_path)

    def __getitem__(self, index):
        loaded = self.load_with_skip(index, self.load, lambda i: self.samples[i][0])
        if loaded is None:  # evaluation: an unreadable image, left out and counted
            return None
        img, label = loaded
        return self.transform(img, label, self.sample_rng(index)) if self.transform else (img, label)


class SyntheticShapes(DatasetBase):
    """The built-in procedural dataset. Each image holds one large object of one of `num_classes`
    shape classes (the label) and up to MAX_DISTRACTORS smaller objects of the other classes, each
    in a random colour at a random place, size and angle, over a random texture. A smaller object
    lies behind the labelled one or in front of it, where it hides part of it. Colour and texture
    carry no class information, so a classifier (and a k-NN on pre-trained features) must see
    shape, and tell the large object from the small ones; a tokenizer must model edges, flat
    regions, textures and overlaps.

    Sample i of a split is a pure function of (seed, split, i): identical on every rank and run.
    `sample(i)` -> (PIL RGB image, per-pixel uint8 mask with 0 = background and c+1 = class c of the
    object in front at that pixel, label). `__getitem__(i)` -> (transform(image), label), like
    ImageFolder; with segmentation=True transform(image, mask, rng) like ADE20K (classes:
    background + the shapes).
    """

    CLASSES = ("disc", "square", "triangle", "cross", "ring", "star", "bar", "diamond")
    SPLIT_LENGTH = {"train": 8192, "val": 1024, "select": 1024}  # select: data.SELECT_FRACTION's split
    # large labelled objects: at 32 px the class must be readable from a handful of 4 x 4 tokens
    # (smaller radii taught the default run less: docs/data.md, "The built-in data")
    OBJECT_RADIUS = (0.32, 0.45)
    DISTRACTOR_RADIUS = (0.12, 0.2)
    MAX_DISTRACTORS = 2

    def __init__(self, split="train", size=64, num_classes=8, length=None, seed=0, transform=None,
                 segmentation=False):
        if split not in self.SPLIT_LENGTH:
            raise ValueError(f"SyntheticShapes split must be one of {list(self.SPLIT_LENGTH)}, "
                             f"got {split!r}")
        if not 2 <= num_classes <= len(self.CLASSES):
            raise ValueError(f"SyntheticShapes has 2..{len(self.CLASSES)} classes, got {num_classes}")
        self.split, self.size, self.num_classes = split, size, num_classes
        self.length = self.SPLIT_LENGTH[split] if length is None else length
        self.seed, self.transform = seed, transform
        self.classes = list(self.CLASSES[:num_classes])
        self.segmentation = segmentation  # __getitem__ gives (transform(img, mask, rng)) instead
        if segmentation:
            self.classes = ["background"] + self.classes

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        img, mask, label = self.sample(index)
        if self.segmentation:  # per-pixel labels: 0 background, c + 1 shape class c
            return self.transform(img, mask, self.sample_rng(index)) if self.transform else (img, mask)
        return (self.transform(img, self.sample_rng(index)) if self.transform else img), label

    def sample(self, index):
        rng = np.random.default_rng([self.seed, list(self.SPLIT_LENGTH).index(self.split), index])
        label = int(rng.integers(self.num_classes))
        img = self.texture(rng)
        mask = Image.new("L", (self.size, self.size), 0)
        for cls, polygons, colour in self.layout(label, rng):  # back to front: later ones occlude
            fg = Image.new("L", (self.size, self.size), 0)
            for p, hole in polygons:
                ImageDraw.Draw(fg).polygon(p, fill=0 if hole else 255)
            img.paste(Image.new("RGB", img.size, colour), (0, 0), fg)
            mask.paste(cls + 1, (0, 0), fg)
        return img, np.asarray(mask, dtype=np.uint8).copy(), label

    def layout(self, label, rng):
        """The objects of one image back to front: [(class, polygons, colour)]. The labelled object
        is the large one; each smaller object, of another class, goes behind or in front of it."""
        objects = [(label, self.OBJECT_RADIUS)]
        for _ in range(int(rng.integers(self.MAX_DISTRACTORS + 1))):
            other = int((label + rng.integers(1, self.num_classes)) % self.num_classes)
            objects.insert(len(objects) if rng.random() < 0.5 else 0, (other, self.DISTRACTOR_RADIUS))
        return [(cls, self.shape_polygon(cls, rng, radius), self.colour(rng)) for cls, radius in objects]

    def colour(self, rng):
        return tuple(int(c) for c in rng.integers(0, 256, size=3))

    def texture(self, rng):
        """A background of one of four texture families: gradient, stripes, checks, smooth noise."""
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        a, b = np.array(self.colour(rng), np.float32), np.array(self.colour(rng), np.float32)
        theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 6)
        u = np.cos(theta) * xx + np.sin(theta) * yy
        kind = rng.integers(4)
        if kind == 0:
            t = u / max(u.max(), 1e-6)
        elif kind == 1:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u)
        elif kind == 2:
            t = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(np.float32)
        else:
            g = rng.random((6, 6)).astype(np.float32)
            t = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).resize((s, s), Image.BICUBIC),
                           np.float32) / 255
        t = 0.35 * t[..., None]  # low contrast: the object stands out, the texture is context
        rgb = a * (1 - t) + b * t + rng.normal(0, 6, size=(s, s, 3))
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")

    def shape_polygon(self, label, rng, radius):
        """Polygons (list of (points, is_hole)) of class `label` at a random place and angle, radius
        a uniform fraction of the image side in `radius`, the whole shape inside the image."""
        s = self.size
        r = s * rng.uniform(*radius)
        cx, cy = rng.uniform(r, s - r, size=2)
        angle = rng.uniform(0, 2 * np.pi)

        def ring(n, radius, phase=0.0):
            t = angle + phase + 2 * np.pi * np.arange(n) / n
            return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in t]

        def rect(w, h):
            c, sn = np.cos(angle), np.sin(angle)
            corners = [(-w, -h), (w, -h), (w, h), (-w, h)]
            return [(cx + x * c - y * sn, cy + x * sn + y * c) for x, y in corners]

        name = self.CLASSES[label]
        if name == "disc":
            return [(ring(48, r), False)]
        if name == "square":
            return [(ring(4, r, np.pi / 4), False)]
        if name == "triangle":
            return [(ring(3, r), False)]
        if name == "cross":
            return [(rect(r, r * 0.3), False), (rect(r * 0.3, r), False)]
        if name == "ring":
            return [(ring(48, r), False), (ring(48, r * 0.55), True)]
        if name == "star":
            t = angle + np.pi * np.arange(10) / 5
            rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
            return [([(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(rad, t)], False)]
        if name == "bar":
            return [(rect(r, r * 0.28), False)]
        # diamond: a rhombus with axes 1 : 0.55
        radius = [r, r * 0.55, r, r * 0.55]
        return [([(cx + q * np.cos(angle + k * np.pi / 2), cy + q * np.sin(angle + k * np.pi / 2))
                  for k, q in enumerate(radius)], False)]


# ----------------------------------------------------------------------------------------------------
# Transforms (PIL in, PIL or tensors out)
# ----------------------------------------------------------------------------------------------------

def to_tensor(img):
    """PIL RGB -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)                        # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Inverse of `normalize`, clamped to [0, 1] (for PNG grids)."""
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def random_resized_crop_box(width, height, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=random):
    """Inception-style crop box (left, top, right, bottom): area U[scale]·W·H, log-uniform aspect.
    Ten tries, then the central crop with the aspect clamped to `ratio` (as in torchvision)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ColorJitter:
    """Brightness, contrast and saturation factors drawn from U[1-s, 1+s], applied in random order
    (PIL ImageEnhance). Hue jitter is left out: BEiT/MAE pre-training recipes do not use it."""

    def __init__(self, strength=0.4):
        self.strength = strength

    def __call__(self, img, rng=random):
        ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        rng.shuffle(ops)
        for op in ops:
            img = op(img).enhance(rng.uniform(1 - self.strength, 1 + self.strength))
        return img


class PretrainTransform:
    """CIM pre-training view: [colour jitter] -> flip -> ONE random-resized crop, returned twice:
    the network view (img_size px, bicubic, ImageNet-normalised) and the tokenizer view
    (tok_size = (img_size / patch) * f px, Lanczos as in BEiT, in [0, 1] because the dVAE does its
    own pixel mapping). Both views must show the same pixels, or the generator's targets describe
    a different image than the one it sees. tok_size=None returns the network view alone.
    """

    def __init__(self, img_size, tok_size=None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 color_jitter=0.0, hflip=0.5, normalized=True):
        self.img_size, self.tok_size, self.scale, self.ratio = img_size, tok_size, scale, ratio
        self.jitter = ColorJitter(color_jitter) if color_jitter > 0 else None
        self.hflip, self.normalized = hflip, normalized
        self.draft_size = int(math.ceil(max(img_size, tok_size or 0) / math.sqrt(scale[0])))

    def __call__(self, img, rng=random):
        if self.jitter is not None:
            img = self.jitter(img, rng)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        box = random_resized_crop_box(*img.size, self.scale, self.ratio, rng)
        view = to_tensor(img.resize((self.img_size,) * 2, Image.BICUBIC, box=box))
        view = normalize(view) if self.normalized else view
        if self.tok_size is None:
            return view
        return view, to_tensor(img.resize((self.tok_size,) * 2, Image.LANCZOS, box=box))


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct (bicubic), center-crop img_size, normalise.
    crop_pct = 0.875 is the 256 -> 224 convention."""

    def __init__(self, img_size, crop_pct=0.875, normalized=True):
        self.img_size, self.normalized = img_size, normalized
        self.resize = int(math.floor(img_size / crop_pct))
        self.draft_size = self.resize

    def __call__(self, img, rng=None):
        w, h = img.size
        s = self.resize / min(w, h)
        img = img.resize((max(self.resize, round(w * s)), max(self.resize, round(h * s))),
                         Image.BICUBIC)
        w, h = img.size
        left, top = (w - self.img_size) // 2, (h - self.img_size) // 2
        x = to_tensor(img.crop((left, top, left + self.img_size, top + self.img_size)))
        return normalize(x) if self.normalized else x


# ----------------------------------------------------------------------------------------------------
# Fine-tuning augmentation (BEiT / MAE / DeiT recipe): RandAugment and random erasing, written out
# ----------------------------------------------------------------------------------------------------

FILL = (124, 116, 104)  # ImageNet mean in 0..255: what geometric ops fill the uncovered corners with


def _signed(value, rng):
    return -value if rng.random() < 0.5 else value


def _affine(img, coeffs, rng):
    """PIL affine warp (output pixel (x, y) reads input (a x + b y + c, d x + e y + f)), bicubic as BEiT
    and MAE ask timm for (interpolation='bicubic'), corners filled with FILL."""
    return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BICUBIC, fillcolor=FILL)


def _solarize_add(img, add, threshold=128):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# name -> op(img, m, rng), m = magnitude in [0, 10]. The "increasing" variants (timm's `inc1`): a
# larger m is always a stronger change (fewer posterize bits, lower solarize threshold, enhance
# factors further from 1 on either side).
RAND_AUGMENT_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(30 * m / 10, rng), resample=Image.BICUBIC, fillcolor=FILL),
    # 4 bits at m = 0 down to 1 at m >= 7.5 (PIL refuses 0 bits, which m = 10 would give)
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, 4 - int(4 * m / 10))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(256 * m / 10)),
    "SolarizeAdd": lambda img, m, rng: _solarize_add(img, int(110 * m / 10)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(1 + _signed(0.9 * m / 10, rng)),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(0.3 * m / 10, rng), 0, 0, 1, 0), rng),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(0.3 * m / 10, rng), 1, 0), rng),
    "TranslateXRel": lambda img, m, rng: _affine(
        img, (1, 0, _signed(0.45 * m / 10, rng) * img.size[0], 0, 1, 0), rng),
    "TranslateYRel": lambda img, m, rng: _affine(
        img, (1, 0, 0, 0, 1, _signed(0.45 * m / 10, rng) * img.size[1]), rng),
}


class RandAugment:
    """RandAugment (Cubuk et al. 2020) as timm's `rand-m9-mstd0.5-inc1` that BEiT and MAE fine-tune
    with: `num_ops` operations drawn with replacement from RAND_AUGMENT_OPS, each applied with
    probability `prob` at a magnitude drawn per op from N(magnitude, magnitude_std) clipped to
    [0, 10]. Every draw comes from `rng`, so a sample's augmentation repeats under its seed."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, ops=tuple(RAND_AUGMENT_OPS)):
        unknown = [o for o in ops if o not in RAND_AUGMENT_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {list(RAND_AUGMENT_OPS)}")
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.ops = list(ops)

    def __call__(self, img, rng=random):
        for _ in range(self.num_ops):
            name = rng.choice(self.ops)
            if rng.random() > self.prob:
                continue
            m = rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            img = RAND_AUGMENT_OPS[name](img, min(10.0, max(0.0, m)), rng)
        return img


class RandomErasing:
    """Random erasing (Zhong et al. 2020) in timm's 'pixel' mode, on a normalised (3, H, W) tensor:
    with probability `prob`, one rectangle of area U[0.02, 1/3] of the image and log-uniform aspect
    in [0.3, 1/0.3] is filled with N(0, 1) noise (ten tries to fit it, else nothing)."""

    def __init__(self, prob=0.25, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)):
        self.prob, self.area = prob, area
        self.log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, x, rng=random):
        if rng.random() >= self.prob:
            return x
        _, H, W = x.shape
        for _ in range(10):
            target = rng.uniform(*self.area) * H * W
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if h < H and w < W:
                top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                noise = torch.Generator().manual_seed(rng.getrandbits(63))
                x = x.clone()
                x[:, top:top + h, left:left + w] = torch.randn(3, h, w, generator=noise, dtype=x.dtype)
                return x
        return x


class FinetuneTransform:
    """Classification training view (timm's `create_transform(is_training=True)` order):
    random-resized crop (bicubic) -> flip -> RandAugment, or colour jitter when RandAugment is off
    (timm uses one or the other) -> to-tensor + normalise -> random erasing."""

    def __init__(self, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, rand_augment=None,
                 color_jitter=0.0, reprob=0.0):
        self.img_size, self.scale, self.ratio, self.hflip = img_size, scale, ratio, hflip
        self.rand_augment = rand_augment
        self.jitter = ColorJitter(color_jitter) if color_jitter > 0 and rand_augment is None else None
        self.erase = RandomErasing(reprob) if reprob > 0 else None
        self.draft_size = int(math.ceil(img_size / math.sqrt(scale[0])))

    def __call__(self, img, rng=random):
        box = random_resized_crop_box(*img.size, self.scale, self.ratio, rng)
        img = img.resize((self.img_size,) * 2, Image.BICUBIC, box=box)
        if rng.random() < self.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.jitter is not None:
            img = self.jitter(img, rng)
        x = normalize(to_tensor(img))
        return self.erase(x, rng) if self.erase is not None else x


# ----------------------------------------------------------------------------------------------------
# Segmentation transforms (mmseg's ADE20K pipeline, written out): image and label move together
# ----------------------------------------------------------------------------------------------------

IGNORE_INDEX = 255


def rescale_size(width, height, scale):
    """Size that fits (long, short) = `scale` keeping the aspect ratio (mmseg's keep_ratio Resize):
    the long side at most scale[0] and the short side at most scale[1], one of them equal."""
    f = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * f + 0.5), int(height * f + 0.5)


def photometric_distortion(img, rng):
    """mmseg's PhotoMetricDistortion: brightness +-32, contrast x[0.5, 1.5] (before or after the
    HSV part, at random), saturation x[0.5, 1.5], hue shifted by randint(-18, 18) in OpenCV's units
    (0..179 for 360 degrees, so up to +-36 degrees); each applied with p = 0.5."""
    a = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.5:
        a = np.clip(a + rng.uniform(-32, 32), 0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        a = np.clip(a * rng.uniform(0.5, 1.5), 0, 255)
    hsv = np.asarray(Image.fromarray(a.astype(np.uint8)).convert("HSV"), dtype=np.float32)
    if rng.random() < 0.5:
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 255)
    if rng.random() < 0.5:  # OpenCV's hue unit is 2 degrees; PIL's hue runs 0..255 for 0..360 degrees
        hsv[..., 0] = (hsv[..., 0] + 2 * rng.randint(-18, 18) * 256 / 360) % 256
    a = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=np.float32)
    if not contrast_first and rng.random() < 0.5:
        a = np.clip(a * rng.uniform(0.5, 1.5), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


class SegTrainTransform:
    """Segmentation training view: rescale to `scale` x U[ratio_range] (aspect kept), random crop of
    crop_size in which no single class covers more than `cat_max_ratio` of the labelled pixels (ten
    tries, then the last), flip, photometric distortion, normalise, pad to crop_size (image 0,
    label 255). Returns (image (3, C, C) float, label (C, C) int64)."""

    def __init__(self, crop_size, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 hflip=0.5, photometric=True):
        self.crop, self.scale, self.ratio_range = crop_size, scale, ratio_range
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric

    def crop_box(self, label, rng):
        H, W = label.shape
        for _ in range(10):
            top, left = rng.randint(0, max(H - self.crop, 0)), rng.randint(0, max(W - self.crop, 0))
            part = label[top:top + self.crop, left:left + self.crop]
            counts = np.unique(part[part != IGNORE_INDEX], return_counts=True)[1]
            if self.cat_max_ratio >= 1 or (len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio):
                break
        return left, top, min(left + self.crop, W), min(top + self.crop, H)

    def __call__(self, img, label, rng=random):
        r = rng.uniform(*self.ratio_range)
        size = rescale_size(*img.size, (self.scale[0] * r, self.scale[1] * r))
        img = img.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(np.asarray(label, dtype=np.uint8)).resize(size, Image.NEAREST))
        box = self.crop_box(label, rng)
        img, label = img.crop(box), label[box[1]:box[3], box[0]:box[2]]
        if rng.random() < self.hflip:
            img, label = img.transpose(Image.FLIP_LEFT_RIGHT), label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        x = normalize(to_tensor(img))
        out_x = torch.zeros(3, self.crop, self.crop)
        out_y = torch.full((self.crop, self.crop), IGNORE_INDEX, dtype=torch.int64)
        h, w = label.shape
        out_x[:, :h, :w] = x
        out_y[:h, :w] = torch.from_numpy(label.astype(np.int64))
        return out_x, out_y


class SegEvalTransform:
    """Evaluation view: the image rescaled to fit `scale` (aspect kept) and normalised; the label
    at its original size (predictions are resized back to it, as mmseg evaluates)."""

    def __init__(self, scale=(2048, 512)):
        self.scale = scale

    def __call__(self, img, label, rng=None):
        img = img.resize(rescale_size(*img.size, self.scale), Image.BILINEAR)
        return normalize(to_tensor(img)), torch.from_numpy(np.asarray(label).astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# Dataset and loader construction shared by the stage scripts
# ----------------------------------------------------------------------------------------------------

# The selection split: choices (recipe values, epochs, lr) are made on a part of train/ carved out with
# a fixed seed, so that val/ reports numbers no choice has seen. `--eval-split select` in pretrain.py
# and finetune.py trains on "fit" (train/ less the selection) and evaluates on "select".
SELECT_FRACTION = 0.1   # of each class of train/
SPLITS = ("train", "val", "fit", "select")
EVAL_SPLITS = {"val": ("train", "val"), "select": ("fit", "select")}  # --eval-split -> (train on, evaluate on)


def build_dataset(data, split, transform, synthetic_size=64, seed=0):
    """`--data DIR` -> ImageFolder(DIR/<split>); no --data -> the built-in SyntheticShapes. Split
    "fit" / "select": train/ less / only the selection split (`carve_selection`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if data is None:  # the built-in data draws its selection split as a stream of its own
        return SyntheticShapes("train" if split == "fit" else split, size=synthetic_size, seed=seed,
                               transform=transform)
    folder = os.path.join(data, "train" if split in ("fit", "select") else split)
    if not os.path.isdir(folder) and split != "val" and os.path.isdir(data):
        folder = data  # --data may point straight at a class-folder root
    dataset = ImageFolder(folder, transform, seed=seed)  # seed: the augmentation stream (--seed)
    return carve_selection(dataset, split == "select") if split in ("fit", "select") else dataset


def carve_selection(dataset, select):
    """Keep the selection split of an ImageFolder (select=True) or all but it: round(SELECT_FRACTION * n)
    images of each class of n, drawn by a seed fixed to the class name (not --seed), so every run, seed
    and stage carves the same images."""
    by_class = {}
    for i, (_, label) in enumerate(dataset.samples):
        by_class.setdefault(label, []).append(i)
    chosen = set()
    for label, indices in by_class.items():
        random.Random(f"select/{dataset.classes[label]}").shuffle(indices)
        chosen.update(indices[:round(SELECT_FRACTION * len(indices))])
    dataset.samples = [s for i, s in enumerate(dataset.samples) if (i in chosen) == select]
    if not dataset.samples:
        raise ValueError(f"image folder {dataset.root!r} is too small for a selection split "
                         f"({SELECT_FRACTION:.0%} of each class): add images or use --eval-split val")
    return dataset


def check_same_classes(train_set, val_set, data_dir):
    """Stop before training when the training and evaluation sets name different classes: labels are
    indices into each set's sorted class folders, so one folder more or less in val/ shifts every
    later label and the accuracy measures nothing. Sets without class names (ADE20K: its classes are
    label values) pass; so do the built-in data and train/'s selection split (same classes)."""
    train, val = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train is None or val is None or list(train) == list(val):
        return
    names = [set_name(ds, data_dir) for ds in (train_set, val_set)]
    only = [sorted(set(a) - set(b)) for a, b in ((train, val), (val, train))]
    parts = [f"only in {name}: {name_list(o)}" for name, o in zip(names, only) if o]
    raise ValueError(f"--data {data_dir}: {names[0]} and {names[1]} hold different class folders: "
                     f"{'; '.join(parts) or 'the same names in another order'}; use the same class "
                     f"folders in both")


def set_name(dataset, data_dir):
    """How messages name a dataset's folder: "train/" for DIR/train, its path elsewhere."""
    root = getattr(dataset, "img_dir", None) or getattr(dataset, "root", None)
    if root is None:
        return f"the built-in {getattr(dataset, 'split', 'data')} split"
    rel = os.path.relpath(root, data_dir) if data_dir is not None else root
    return f"{rel}/" if rel != "." and not rel.startswith("..") else f"{root}/"


def name_list(names, most=5):
    """A one-line list of names: the first `most` and how many in all (ImageNet has 1,000 classes)."""
    return ", ".join(names) if len(names) <= most else f"{', '.join(names[:most])}, ... ({len(names)} in all)"


def check_readable(dataset, what):
    """Before training: open every image of an (evaluation) set by its header, no pixel decoded
    (thousands a second), so a folder of unreadable files stops the run now and not after an epoch.
    None readable: a ValueError naming the folder. Some: one warning (how many, the first), and
    training skips them / evaluation leaves them out as it would have. For an ADE20K set every label
    file is checked by header too, against its image (ADE20K.check_label_header: one channel, the
    image's size; LabelFileError naming the file): cheap enough for the training labels, which
    would otherwise stop a run at the iteration that first draws a bad one. Its values need the
    decode: ADE20K.check_labels. `what` names the set in messages ("--data D validation set").
    Returns how many images can be read; sets that read no files (SyntheticShapes) pass as they are."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return len(dataset)
    bad = [problem for problem in (unreadable_file(dataset, *sample) for sample in samples) if problem]
    folder = set_name(dataset, None)
    if samples and len(bad) == len(samples):
        raise ValueError(f"{what}: none of the {len(bad)} images in {folder} can be read (the first, "
                         f"{bad[0][0]}: {bad[0][1]}); replace the folder with a complete copy (an interrupted "
                         f"copy or download leaves such files)")
    if bad:
        print(f"data.py: WARNING {what}: {len(bad)} of {len(samples)} images in {folder} cannot be read (the "
              f"first, {bad[0][0]}: {bad[0][1]}); they are skipped in training and left out of evaluation",
              file=sys.stderr)
    return len(samples) - len(bad)


def unreadable_file(dataset, img_path, target):
    """(path, error) of the file of one sample that PIL cannot open, or None; for an ADE20K sample
    its label's header is checked against the image (LabelFileError: a broken dataset, raised)."""
    try:
        if not isinstance(dataset, ADE20K):
            with Image.open(img_path):
                return None
        size = image_size(img_path)
    except UNREADABLE as err:
        return img_path, err
    try:
        with Image.open(target) as ann:
            dataset.check_label_header(ann, target, size, img_path)
    except LabelFileError:
        raise
    except UNREADABLE as err:  # training skips such a sample as it skips an unreadable image
        return target, err
    return None


def build_loader(dataset, batch_size, num_workers=4, rank=0, world_size=1, shuffle=True,
                 drop_last=True, seed=0, repeats=1):
    """DataLoader over a `ResumableSampler` (`repeats` > 1: repeated augmentation). Returns (loader,
    sampler); call `sampler.set_epoch(e)` at every epoch start (it also sets the dataset's epoch for
    the augmentation seeds)."""
    sampler = ResumableSampler(dataset, world_size, rank, shuffle, seed, drop_last, repeats)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last,
        # workers are re-created each epoch so they pick up dataset.set_epoch(); an own generator
        # keeps the loader from drawing on the global torch RNG (which resume restores exactly)
        persistent_workers=False, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=single_thread_worker)
    return loader, sampler


class EvalSampler(torch.utils.data.Sampler):
    """Rank r of R takes samples r, r+R, r+2R, ...: shards differ by at most one sample and nothing
    is padded or dropped, so sums of per-rank counts are exact (DistributedSampler pads the last
    shard with repeats, which counts some samples twice)."""

    def __init__(self, dataset, num_replicas=1, rank=0):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_eval_loader(dataset, batch_size, num_workers=4, rank=0, world_size=1):
    """In-order loader over this rank's exact shard (EvalSampler), every sample read once: an
    unreadable image is left out, not replaced by a neighbour, and images of different sizes are
    batched apart. Each batch is (groups, skipped): a list of (x, y) batches of equal-size samples,
    and how many unreadable samples were left out (see eval_collate)."""
    dataset.skip_unreadable = True
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EvalSampler(dataset, world_size, rank),
        num_workers=num_workers, pin_memory=torch.cuda.is_available(), collate_fn=eval_collate,
        worker_init_fn=single_thread_worker)


def eval_collate(samples):
    """Evaluation batches: (list of default-collated groups of samples whose tensors have equal
    shapes, number of None samples, i.e. unreadable images left out). Segmentation sets keep their
    images at their own size, so a batch of 4 may hold 4 sizes."""
    kept = [s for s in samples if s is not None]
    groups = {}
    for s in kept:
        groups.setdefault(tuple(tuple(np.shape(part)) for part in s), []).append(s)
    return [torch.utils.data.default_collate(g) for g in groups.values()], len(samples) - len(kept)


def single_thread_worker(worker_id):
    """Loader workers do PIL/numpy work; torch intra-op threads there would only compete with the
    training process for the same cores. Ctrl-C and a scheduler's SIGTERM reach the whole process
    group: the workers leave them to the training process, which saves a checkpoint and then ends
    them (a worker that died first would stop the loader mid-step)."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (also for one process) that can start part-way into an epoch.

    The order is a pure function of (seed, epoch), so `set_epoch(e, start=k)` replays epoch e from
    its k-th sample of this rank on: resuming mid-epoch skips what was trained, without loading it.
    """

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True, repeats=1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start, self.repeats = 0, repeats

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        if self.repeats == 1:
            order = list(super().__iter__())
        else:  # repeated augmentation, as timm's RepeatAugSampler (RSB A2 uses 3): each sample
            # `repeats` times in a row, the rows dealt out to the ranks in turn, so a sample's copies go
            # to different ranks (different augmentations in one global batch); the epoch keeps its
            # length, so it covers len / repeats distinct samples
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            n = len(self.dataset)
            base = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
            order = [i for i in base for _ in range(self.repeats)]
            total = -(-len(order) // self.num_replicas) * self.num_replicas
            order = (order + order[:total - len(order)])[self.rank:total:self.num_replicas][:self.num_samples]
        return iter(order[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def save_grid(rows, path, names=None, min_size=96, pad=2):
    """Save a PNG whose rows are batches of images (B, 3, H, W) in [0, 1] (or (B, 1, H, W) maps).
    Tiles are scaled up by a whole factor to at least `min_size` px a side (nearest neighbour, so a
    token stays a crisp square), rows of other resolutions are resized to the first row's tiles
    (nearest), and names[r], when given, is written to the left of row r."""
    H, W = rows[0].shape[-2:]
    B = rows[0].shape[0]
    k = max(1, -(-min_size // min(H, W)))  # ceil: the whole factor that reaches min_size
    H, W = H * k, W * k
    font = ImageFont.load_default()
    margin = 0
    if names:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = max(int(probe.textlength(n, font=font)) for n in names) + 2 * pad + 4
    canvas = np.full((len(rows) * (H + pad) + pad, margin + B * (W + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        row = row.detach().float().cpu()
        if row.shape[-2:] != (H, W):
            row = torch.nn.functional.interpolate(row, size=(H, W), mode="nearest")
        row = row.expand(-1, 3, -1, -1).clamp(0, 1)
        arr = (row.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
        for b in range(min(B, arr.shape[0])):
            y, x = pad + r * (H + pad), margin + pad + b * (W + pad)
            canvas[y:y + H, x:x + W] = arr[b]
    img = Image.fromarray(canvas)
    if names:
        draw = ImageDraw.Draw(img)
        for r, name in enumerate(names):
            top, bottom = draw.textbbox((0, 0), name, font=font)[1::2]
            y = pad + r * (H + pad) + (H - (bottom - top)) // 2 - top
            draw.text((pad + 2, y), name, fill=(0, 0, 0), font=font)
    img.save(path)
