"""The DALL-E-architecture discrete VAE that CIM uses as its frozen tokenizer, and a loader for
OpenAI's official `encoder.pkl` / `decoder.pkl`.

CIM (Fang et al., ICLR 2023, arXiv 2202.03382) never trains through the dVAE: the encoder turns the
tokenizer view of a crop into a (H/f, W/f) map of token ids (the generator's MIM targets), and the
decoder turns the generator's mixed token map back into the corrupted image the enhancer sees.
Module tree and parameter names are exactly those of OpenAI's `dall_e` package
(blocks.input, blocks.group_k.block_i.{id_path,res_path.conv_j}.{w,b}, blocks.output.conv), so the
official weights load with strict key matching and no renaming table; widths, group count and
vocabulary are constructor arguments so tiny CPU configs use the same code.

The official files are pickles of whole `dall_e` modules. They are read through a restricted
unpickler that maps the known class paths to inert records and refuses every other global, so
loading them runs no code from the file and does not need the `dall_e` package (see
`load_openai_dvae`).

`python dvae.py` trains an own tokenizer (Gumbel-softmax, last section) or fits a k-means patch
codebook; `fit_tokenizer(output_dir, preset, **flags)` runs the same stage from Python (pretrain.py
fits its own tokenizer so). That training stage uses the loop parts every stage shares from
training.py and the data from data.py, imported inside its functions.

Needs torch alone (tqdm, data.py and training.py only when run as a training script). Shape letters as in the rest of the repo: B batch, V vocabulary, H/W image
height/width, h/w token-grid height/width, f = the dVAE's down-sampling factor (8 for DALL-E).
"""
import json
import math
import os
import pickle
import time
import types
import warnings
import zipfile
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder (same module tree and parameter names as OpenAI's dall_e)
# ----------------------------------------------------------------------------------------------------

class Conv2d(nn.Module):
    """kw x kw convolution, 'same' padding, with dall_e's parameter names `w` (out, in, kw, kw), `b`."""

    def __init__(self, n_in, n_out, kw):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd for 'same' padding, got {kw}")
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        # dall_e's init: normal with std 1/sqrt(fan_in), so outputs start at about the input's scale
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


def _residual_path(n_in, n_out, kernels):
    """relu/conv x 4 with a bottleneck of n_out/4 channels; `kernels` are the four kernel widths."""
    n_mid = n_out // 4
    widths = [n_in, n_mid, n_mid, n_mid, n_out]
    layers = []
    for j, kw in enumerate(kernels, start=1):
        layers += [(f"relu_{j}", nn.ReLU()), (f"conv_{j}", Conv2d(widths[j - 1], widths[j], kw))]
    return nn.Sequential(OrderedDict(layers))


class EncoderBlock(nn.Module):
    """Residual block id(x) + res(x) / n_layers**2; the small post-gain keeps the deep stack stable
    at init. The res path's kernels are 3, 3, 3, 1 (DecoderBlock: 1, 3, 3, 3)."""

    kernels = (3, 3, 3, 1)

    def __init__(self, n_in, n_out, n_layers):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be a multiple of 4 (bottleneck n_out/4), got {n_out}")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers ** 2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = _residual_path(n_in, n_out, kernels=self.kernels)

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class Encoder(nn.Module):
    """map_pixels'ed images (B, C, H, W) -> token logits (B, V, H/f, W/f), f = 2**(group_count-1).

    Group k (1-based) has width 2**(k-1) * n_hid (1, 2, 4, 8 x n_hid for DALL-E's 4 groups) and
    is followed by a 2x2 max-pool, except the last group.
    """

    def __init__(self, group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192):
        super().__init__()
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [2 ** k * n_hid for k in range(group_count)]

        layers = [("input", Conv2d(input_channels, n_hid, 7))]
        n_in = n_hid
        for k, width in enumerate(widths, start=1):
            group = [(f"block_{i + 1}", EncoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if k < group_count:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{k}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(widths[-1], vocab_size, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def downsample(self):
        return 2 ** (self.group_count - 1)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"encoder expects (B, {self.input_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            # max-pool would silently drop the last rows/columns and misalign tokens with patches
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of the dVAE "
                             f"down-sampling factor {self.downsample}")
        return self.blocks(x).float()  # (B, V, H/f, W/f)


class DecoderBlock(EncoderBlock):
    """Decoder residual block: EncoderBlock with the res path's kernels 1, 3, 3, 3."""

    kernels = (1, 3, 3, 3)


class Decoder(nn.Module):
    """One-hot tokens (B, V, h, w) -> logit-Laplace parameters (B, 2C, h*f, w*f).

    The first C output channels are the means before the sigmoid (see `decode`); the other C are
    log-scales, used only by the reconstruction loss when training a tokenizer. Group widths are
    2**(group_count-k) * n_hid (8, 4, 2, 1 x n_hid for DALL-E), each followed by a nearest 2x
    up-sampling except the last.
    """

    def __init__(self, group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3,
                 vocab_size=8192):
        super().__init__()
        self.group_count, self.n_init, self.n_hid = group_count, n_init, n_hid
        self.n_blk_per_group, self.output_channels = n_blk_per_group, output_channels
        self.vocab_size = vocab_size
        n_layers = group_count * n_blk_per_group
        widths = [2 ** (group_count - k) * n_hid for k in range(1, group_count + 1)]

        layers = [("input", Conv2d(vocab_size, n_init, 1))]
        n_in = n_init
        for k, width in enumerate(widths, start=1):
            group = [(f"block_{i + 1}", DecoderBlock(n_in if i == 0 else width, width, n_layers))
                     for i in range(n_blk_per_group)]
            if k < group_count:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{k}", nn.Sequential(OrderedDict(group))))
            n_in = width
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", Conv2d(widths[-1], 2 * output_channels, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def downsample(self):
        return 2 ** (self.group_count - 1)

    def forward(self, z):
        if z.ndim != 4 or z.shape[1] != self.vocab_size:
            raise ValueError(f"decoder expects one-hot tokens (B, {self.vocab_size}, h, w), "
                             f"got {tuple(z.shape)}")
        return self.blocks(z).float()  # (B, 2C, h*f, w*f)


# ----------------------------------------------------------------------------------------------------
# Pixels <-> tokens
# ----------------------------------------------------------------------------------------------------

def map_pixels(x, eps=0.1):
    """[0, 1] -> [eps, 1-eps]: the logit-Laplace likelihood of DALL-E is undefined at 0 and 1."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x, eps=0.1):
    """Inverse of map_pixels, clamped back to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


@torch.no_grad()
def tokenize(encoder, images, dtype=torch.float32):
    """Images in [0, 1] (B, C, H, W) -> token ids (B, H/f, W/f), int64.

    dtype float32 (the default): every layer in fp32, autocast off (BEiT computes its targets
    outside autocast). dtype bfloat16 / float16: what OpenAI's dall_e does on GPUs, every
    convolution in the half type (channels-last on CUDA) except the output layer, the logits,
    which stays fp32 so the argmax is decided in full precision. `pretrain.py --tokenizer-dtype`;
    tests/test_dvae.py measures the token agreement of the two. Codebook tokenizers run in fp32.
    """
    x, device = map_pixels(images.float()), images.device.type
    if dtype == torch.float32 or not isinstance(encoder, Encoder):
        with torch.autocast(device_type=device, enabled=False):
            return encoder(x).argmax(dim=1)                            # (B, H/f, W/f)
    if x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device_type=device, dtype=dtype):
        h = encoder.blocks[:-1](x)                                     # (B, 8 n_hid, H/f, W/f) half
    with torch.autocast(device_type=device, enabled=False):
        logits = encoder.blocks.output(h.float())                      # (B, V, H/f, W/f) fp32
    return logits.argmax(dim=1)


@torch.no_grad()
def decode(decoder, tokens, dtype=torch.float32):
    """Token ids (B, h, w) -> images in [0, 1] (B, C, h*f, w*f), float32 out. dtype as in
    `tokenize`: half runs every convolution but the input layer (on the one-hot tokens) in the half
    type, as dall_e; float32 runs all of them in fp32, autocast off."""
    device = tokens.device.type
    with torch.autocast(device_type=device, enabled=False):
        z = F.one_hot(tokens, decoder.vocab_size).permute(0, 3, 1, 2).float()  # (B, h, w, V) -> (B, V, h, w)
        if dtype == torch.float32 or not isinstance(decoder, Decoder):
            x = decoder(z)                                                      # (B, 2C, h*f, w*f)
        else:
            h = decoder.blocks.input(z)                                         # fp32, as dall_e
            if h.is_cuda:
                h = h.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device, dtype=dtype):
                x = decoder.blocks[1:](h)
        return unmap_pixels(torch.sigmoid(x.float()[:, :decoder.output_channels]))  # (B, C, h*f, w*f)


def dvae_config(module):
    """Constructor kwargs of an Encoder or Decoder, as a plain dict a checkpoint can store."""
    if isinstance(module, Encoder):
        names = ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size")
    elif isinstance(module, Decoder):
        names = ("group_count", "n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size")
    else:
        raise TypeError(f"expected a dvae.Encoder or dvae.Decoder, got {type(module).__name__}")
    return {name: getattr(module, name) for name in names}


def build_dvae(enc_cfg, dec_cfg):
    """(Encoder, Decoder) from two dvae_config dicts."""
    return Encoder(**enc_cfg), Decoder(**dec_cfg)


# ----------------------------------------------------------------------------------------------------
# A k-means patch codebook: the tokenizer for small images (`--preset kmeans`)
# ----------------------------------------------------------------------------------------------------
# On 32 px photos a CPU-sized dVAE needs minutes and still reconstructs worse than a k-means codebook
# of patches fitted in seconds (docs/study.md). The codebook has the dVAE's interface: the encoder gives
# logits over codes (minus the distance to each centroid), the decoder gives pre-sigmoid values whose
# `decode` is the rendered image, so `tokenize`, `decode` and CIM need no second code path.
#
# Each of the G x G tokens stands for an f x f cell; its code is chosen by, and its centroid is, the
# cell with a margin of m pixels around it, (f + 2m) x (f + 2m) (the image reflect-padded by m). The
# decoder overlap-adds the centroids and divides each pixel by the number of centroids covering it.
# With m = 0 that is pasting the f x f centroids on the grid: a replaced token then ends in a jump
# exactly on the cell's borders, a cue a detector with no parameters finds (pretrain.border_cue_auc).
# With m = f/2 a pixel is the mean of the 4 centroids around it, so a replaced token blends into its
# neighbours as a dVAE decoder renders one (docs/tokenizer.md, "The border cue").

class PatchEncoder(nn.Module):
    """map_pixels'ed images (B, C, H, W) -> logits (B, V, H/f, W/f): -||context - centroid_v||, the
    context being each f x f cell with `margin` pixels around it."""

    def __init__(self, codebook, patch_size, margin=0):
        super().__init__()
        self.register_buffer("codebook", codebook)  # (V, C*k*k) pixels in [0, 1], channel-major, k = f + 2m
        self.vocab_size, self.downsample, self.margin = codebook.shape[0], patch_size, margin
        self.input_channels = codebook.shape[1] // (patch_size + 2 * margin) ** 2

    def forward(self, x):
        B, C, H, W = x.shape
        f = self.downsample
        if C != self.input_channels or H % f or W % f:
            raise ValueError(f"patch encoder expects (B, {self.input_channels}, H, W) with H, W multiples "
                             f"of {f}, got {tuple(x.shape)}")
        patches = cell_contexts(unmap_pixels(x), f, self.margin)                 # (B, L, C*k*k)
        dist = torch.cdist(patches.reshape(-1, patches.shape[2]), self.codebook)  # (B*L, V)
        return -dist.view(B, H // f, W // f, -1).permute(0, 3, 1, 2)           # (B, V, H/f, W/f)


class PatchDecoder(nn.Module):
    """One-hot tokens (B, V, h, w) -> (B, C, h*f, w*f): the centroids overlap-added and averaged where
    they overlap, before `decode`'s sigmoid and unmap_pixels (so decode(tokens) is that average)."""

    def __init__(self, codebook, patch_size, margin=0):
        super().__init__()
        self.register_buffer("codebook", codebook)
        self.vocab_size, self.downsample, self.margin = codebook.shape[0], patch_size, margin
        self.output_channels = codebook.shape[1] // (patch_size + 2 * margin) ** 2

    def forward(self, z):
        B, V, h, w = z.shape
        if V != self.vocab_size:
            raise ValueError(f"decoder expects one-hot tokens (B, {self.vocab_size}, h, w), got {tuple(z.shape)}")
        f, m = self.downsample, self.margin
        k, size = f + 2 * m, (h * f, w * f)
        patches = torch.einsum("bvl,vd->bdl", z.flatten(2).float(), self.codebook)  # (B, C*k*k, h*w)
        pixels = F.fold(patches, size, k, stride=f, padding=m)                    # (B, C, h*f, w*f) sums
        cover = F.fold(torch.ones_like(patches[:1]), size, k, stride=f, padding=m)  # centroids per pixel
        return torch.logit(map_pixels(pixels / cover))


def cell_contexts(images, patch_size, margin=0):
    """(B, C, H, W) -> (B, L, C*k*k): each f x f cell with `margin` pixels around it (k = f + 2m),
    row-major over the cells, the image reflect-padded at its borders."""
    if margin:
        images = F.pad(images, (margin,) * 4, mode="reflect")
    return F.unfold(images, patch_size + 2 * margin, stride=patch_size).transpose(1, 2)


def build_patch_tokenizer(codebook, patch_size, margin=0):
    """(PatchEncoder, PatchDecoder) sharing one codebook (V, C*k*k), k = patch_size + 2 * margin."""
    return PatchEncoder(codebook, patch_size, margin), PatchDecoder(codebook, patch_size, margin)


@torch.no_grad()
def fit_patch_kmeans(images, vocab_size, patch_size, iters=25, max_patches=2 ** 18, seed=0, margin=0):
    """Lloyd's k-means with k-means++ seeding on the cells of `images` (N, C, H, W) in [0, 1], each f x f
    cell with `margin` pixels around it (cell_contexts).

    Returns the codebook (V, C*f*f) and the mean squared error per pixel. Deterministic for a seed;
    an empty cluster is re-seeded with the patch worst served by its centroid.
    """
    g = torch.Generator().manual_seed(seed)
    patches = cell_contexts(images.float(), patch_size, margin)
    patches = patches.reshape(-1, patches.shape[2])                  # (N*L, D), D = C*k*k
    patches = patches[torch.randperm(len(patches), generator=g)[:max_patches]]
    if len(patches) < vocab_size:
        raise ValueError(f"{len(patches)} patches cannot seed {vocab_size} codes: add images, or fit fewer codes "
                         f"(python dvae.py --preset kmeans --vocab-size N, then pass its checkpoint to "
                         f"pretrain.py as --dvae)")
    # k-means++ on the first 32 V (shuffled) patches: each new centroid drawn with probability
    # proportional to the squared distance to the nearest one so far, so flat sky patches do not take
    # most of the codebook
    pool = patches[:32 * vocab_size]
    centroids = [pool[torch.randint(len(pool), (1,), generator=g)]]
    d2 = (pool - centroids[0]).pow(2).sum(1)
    for _ in range(vocab_size - 1):
        c = pool[torch.multinomial(d2 + 1e-12, 1, generator=g)]
        centroids.append(c)
        d2 = torch.minimum(d2, (pool - c).pow(2).sum(1))
    codebook = torch.cat(centroids)                                  # (V, D)

    def assign(codebook):
        dist = torch.cat([torch.cdist(chunk, codebook) for chunk in patches.split(32768)])  # (N, V)
        return dist.min(1)

    for _ in range(iters):
        dist, nearest = assign(codebook)
        sums = torch.zeros_like(codebook).index_add_(0, nearest, patches)
        counts = torch.bincount(nearest, minlength=vocab_size)
        codebook = sums / counts.clamp(min=1)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            codebook[empty] = patches[dist.topk(len(empty)).indices]
    dist, _ = assign(codebook)
    return codebook, dist.pow(2).mean().item() / patches.shape[1]


# ----------------------------------------------------------------------------------------------------
# Official OpenAI weights through a restricted unpickler
# ----------------------------------------------------------------------------------------------------
# OpenAI's encoder.pkl / decoder.pkl are torch.save of whole attrs-decorated dall_e modules. A plain
# torch.load would import `dall_e` and run whatever the pickle names; it also fails on the decoder in
# current torch (its pickled Upsample predates `recompute_scale_factor`). Instead every class the
# files name becomes an inert record holding the instance __dict__, from which we read the
# parameters and the config and rebuild our own modules.

class _PickledModule:
    """Inert stand-in for one pickled module: keeps its attributes, defines no behaviour."""

    pickled_class = None  # "module.Class" path the pickle named, set on the per-path subclasses
    dump_patches = False  # read by torch's legacy loader when it compares saved class sources

    def __setstate__(self, state):
        if isinstance(state, tuple):  # (dict state, slots state) for classes with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        self.__dict__.update(state)


# The dall_e and torch.nn classes the official files name. Unpickling one only creates the record.
_RECORD_CLASSES = {
    path: type(f"Pickled_{path.rsplit('.', 1)[1]}", (_PickledModule,), {"pickled_class": path})
    for path in (
        "dall_e.encoder.Encoder", "dall_e.encoder.EncoderBlock",
        "dall_e.decoder.Decoder", "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
        "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.upsampling.Upsample",
        "torch.nn.modules.linear.Identity",
    )
}

# Everything else a module pickle legitimately contains: tensor rebuilds, containers, devices.
_ALLOWED_GLOBALS = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    # torch.load's own Unpickler wrapper resolves "*Storage" names before asking us; these entries
    # only matter if this unpickler is used on its own
    **{f"torch.{name}": getattr(torch, name)
       for name in ("FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage")
       if hasattr(torch, name)},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; anything else (os.system, eval, ...) is refused
    before it can be called."""

    def find_class(self, module, name):
        # torch.save writes protocol 2, which spells `builtins` the Python 2 way; the stock
        # find_class undoes that (fix_imports), an override has to do it itself
        if module == "__builtin__":
            module = "builtins"
        path = f"{module}.{name}"
        if path in _RECORD_CLASSES:
            return _RECORD_CLASSES[path]
        if path in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[path]
        raise pickle.UnpicklingError(f"refusing to load global '{path}' (not a dall_e module, "
                                     f"torch.nn container or tensor rebuild function)")


def _restricted_load(file, **kwargs):
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs from `pickle_module`: `Unpickler` (subclassed by both the zip and the legacy
# loader for their find_class/persistent_load hooks), `load` (the legacy format reads its magic
# number, version, sys-info and storage keys with it) and `__name__` (checked against "dill").
_restricted_pickle = types.ModuleType("dvae_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load


def _read_records(path, flag, map_location):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file (OpenAI's dVAE weights are "
                                f"https://cdn.openai.com/dall-e/encoder.pkl and .../decoder.pkl)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            # torch.load hands TorchScript archives to torch.jit.load, past our unpickler
            if any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist()):
                raise ValueError(f"{flag} {path}: a TorchScript archive, not a pickled dall_e module")
    with warnings.catch_warnings():
        # The legacy format stores each module's source and warns that our records differ from it.
        warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        try:
            return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle,
                              weights_only=False)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{flag} {path}: {e}") from None


def _flat_state_dict(record, prefix=""):
    """Parameters and buffers of a record tree under their dotted state-dict names."""
    state = {}
    for group in ("_parameters", "_buffers"):
        for name, tensor in getattr(record, group, {}).items():
            if tensor is not None:
                state[prefix + name] = tensor.detach()
    for name, child in getattr(record, "_modules", {}).items():
        if child is not None:
            state.update(_flat_state_dict(child, f"{prefix}{name}."))
    return state


def _config_from_record(record, state, kind):
    """Constructor kwargs: the pickled attributes where present, else read off the weight shapes."""
    group_count = len({key.split(".")[1] for key in state if key.startswith("blocks.group_")})
    n_blk_per_group = len({key.split(".")[2] for key in state if key.startswith("blocks.group_1.block_")})
    w_in, w_out = state["blocks.input.w"], state["blocks.output.conv.w"]  # (out, in, k, k)
    if kind == "encoder":
        inferred = dict(group_count=group_count, n_hid=w_in.shape[0], n_blk_per_group=n_blk_per_group,
                        input_channels=w_in.shape[1], vocab_size=w_out.shape[0])
    else:
        inferred = dict(group_count=group_count, n_init=w_in.shape[0], n_hid=w_out.shape[1],
                        n_blk_per_group=n_blk_per_group, output_channels=w_out.shape[0] // 2,
                        vocab_size=w_in.shape[1])
    return {name: int(getattr(record, name, value)) for name, value in inferred.items()}


def _load_one(path, flag, expected, map_location):
    record = _read_records(path, flag, map_location)
    found = getattr(record, "pickled_class", type(record).__name__)
    if found != expected:
        raise ValueError(f"{flag} {path}: expected a pickled {expected}, found {found}")
    state = _flat_state_dict(record)
    if "blocks.input.w" not in state or "blocks.output.conv.w" not in state:
        raise ValueError(f"{flag} {path}: no blocks.input / blocks.output.conv weights in the pickled module")
    kind = "encoder" if expected.endswith("Encoder") else "decoder"
    cfg = _config_from_record(record, state, kind)
    module = Encoder(**cfg) if kind == "encoder" else Decoder(**cfg)
    try:
        # copies into our float32 parameters, which also upcasts files saved in half precision
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{flag} {path}: weights do not fit a {kind} with {cfg}: {e}") from None
    device = next(iter(state.values())).device
    # frozen: CIM never trains the tokenizer
    return module.to(device).eval().requires_grad_(False)


def load_openai_dvae(encoder_path, decoder_path, map_location="cpu"):
    """(Encoder, Decoder) with OpenAI's official weights, frozen and in eval mode.

    Reads `encoder.pkl` / `decoder.pkl` through the restricted unpickler above (zip or legacy
    torch.save format), so neither the `dall_e` package nor any code named in the files runs.
    """
    encoder = _load_one(encoder_path, "--dalle-encoder", "dall_e.encoder.Encoder", map_location)
    decoder = _load_one(decoder_path, "--dalle-decoder", "dall_e.decoder.Decoder", map_location)
    return encoder, decoder


# ----------------------------------------------------------------------------------------------------
# Own tokenizer training: Gumbel-softmax relaxation (DALL-E, Ramesh et al. 2021, section 2.1)
# ----------------------------------------------------------------------------------------------------
#   python dvae.py --output-dir out/dvae                        # built-in data, "small" preset, CPU
#   torchrun --nproc_per_node 8 dvae.py --preset dalle --data /path/imagenet --output-dir out/dvae

DVAE_PRESETS = {
    # 32 px crops of the built-in data -> 8 x 8 tokens of 512 codes; minutes on a CPU (docs/tokenizer.md).
    # lr 1e-2 reached half the reconstruction error of 3e-3 in 512 steps (docs/tokenizer.md)
    "small": dict(group_count=3, n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=64, img_size=32,
                  lr=1e-2, kl_weight=1e-3, kl_warmup=0.2),
    # DALL-E's own architecture (the official weights' shapes), trained at 256 px
    "dalle": dict(group_count=4, n_hid=256, n_blk_per_group=2, vocab_size=8192, n_init=128,
                  img_size=256, lr=1e-3, kl_weight=1e-2, kl_warmup=0.0),
    # not a dVAE: a k-means codebook of 4 x 4 pixel patches (section above), seconds on a CPU; the
    # tokenizer of pretrain.py's builtin and photos recipes. Margin 0: the blended corruptions of a 2 px
    # margin remove the border cue but taught less in every downstream measure tried (docs/tokenizer.md)
    "kmeans": dict(vocab_size=512, img_size=32, patch_size=4, margin=0),
}
KMEANS_ITERS = 25          # Lloyd iterations of the kmeans preset (--kmeans-iters)
KMEANS_MAX_IMAGES = 10000  # images spread over the training split; their patches are capped at 2**18
DVAE_ONLY = ("group_count", "n_hid", "n_blk_per_group", "n_init", "lr", "kl_weight", "kl_warmup")


def preset_downsample(preset):
    """Pixels per token side of a preset's tokenizer (f)."""
    cfg = DVAE_PRESETS[preset]
    return cfg["patch_size"] if preset == "kmeans" else 2 ** (cfg["group_count"] - 1)


class DVAE(nn.Module):
    """Encoder + decoder trained jointly; forward returns the loss parts for one batch."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x, temperature, kl_weight, recon_loss="mse", hard=False):
        logits = self.encoder(map_pixels(x)).float()              # (B, V, h, w)
        # hard=True: the decoder sees one-hot samples while gradients take the relaxed path
        # (straight-through), so training decodes what tokenize() + decode() will feed it later
        z = F.gumbel_softmax(logits, tau=temperature, hard=hard, dim=1)  # (B, V, h, w)
        stats = self.decoder(z).float()                           # (B, 6, H, W)
        if recon_loss == "mse":
            recon = F.mse_loss(unmap_pixels(torch.sigmoid(stats[:, :3])), x)
        else:  # DALL-E's logit-Laplace likelihood of the mapped pixels
            y = map_pixels(x)
            mu, log_b = stats[:, :3], stats[:, 3:]
            recon = (torch.abs(torch.logit(y) - mu) * torch.exp(-log_b) + log_b
                     + torch.log(y * (1 - y)) + math.log(2)).mean()
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform prior) per position, summed over the vocabulary
        kl = (log_q.exp() * (log_q + math.log(logits.shape[1]))).sum(1).mean()
        return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl,
                "codes": logits.argmax(1)}


def gumbel_schedule(step, total_steps, args, cfg):
    """(Gumbel-softmax temperature, KL weight) at `step`: the temperature decays exponentially from
    --temp-start to --temp-end over the first --temp-anneal of the run; the KL weight ramps linearly
    from 0 to the preset's (or --kl-weight's) value over the first --kl-warmup."""
    frac = step / total_steps
    temperature = args.temp_start * (args.temp_end / args.temp_start) ** min(1.0, frac / args.temp_anneal)
    warmup = cfg["kl_warmup"]
    kl_weight = cfg["kl_weight"] * (min(1.0, frac / warmup) if warmup else 1.0)
    return temperature, kl_weight


def codebook_stats(codes, vocab_size):
    """Perplexity exp(H(p)) of the batch's code histogram, and the fraction of codes used."""
    counts = torch.bincount(codes.flatten(), minlength=vocab_size).float()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return perplexity, (counts > 0).float().mean().item()


def get_args_parser():
    """The tokenizer-training stage's flags, each once: its type and range check (runs.number) and
    whether a resume may change it (free)."""
    import runs  # the training stage's import: the model code above needs torch alone
    p, a, free = runs.stage_parser("dvae.py", "train a DALL-E-architecture dVAE tokenizer (or fit a k-means "
                                   "patch codebook)", "out/dvae", "checkpoints, log.jsonl and PNG grids",
                                   save_every=200, log_every=20)
    pos_int, pos_float, nonneg_int, nonneg_float = (runs.POS_INT, runs.POS_FLOAT, runs.NONNEG_INT,
                                                    runs.NONNEG_FLOAT)
    a("--data", default=None, help="image-folder root (ImageNet layout: DIR/train/<class>/*); omit to use "
      "the built-in procedural dataset")
    a("--preset", default="small", choices=list(DVAE_PRESETS),
      help="small: CPU-sized dVAE for the built-in data; dalle: the official architecture (n_hid 256, "
           "8192 codes) for real images; kmeans: a k-means codebook of pixel patches, fitted in seconds "
           "(small photos)")
    for name in ("group_count", "n_hid", "n_blk_per_group", "vocab_size", "n_init", "img_size", "patch_size"):
        a("--" + name.replace("_", "-"), type=pos_int, default=None,
          help=f"override the preset's {name}" + (" (kmeans only: f)" if name == "patch_size" else ""))
    a("--margin", type=nonneg_int, default=None,
      help="kmeans preset: pixels of context around each f x f cell in its code and centroid; the decoder "
           "overlap-adds the centroids. 0 (preset): pasted cells, a replaced token ends in jumps on the cell "
           "borders, a cue pretrain.py's border check finds; 2 (f/2): a replaced token blends into its "
           "neighbours, no such cue, but less learnt at CPU scale (docs/tokenizer.md)")
    a("--kmeans-iters", type=pos_int, default=None, help=f"kmeans preset: Lloyd iterations ({KMEANS_ITERS})")
    a("--lr", type=pos_float, default=None,
      help="peak AdamW learning rate, not scaled by batch (preset: small 1e-2, dalle 1e-3)")
    a("--epochs", type=pos_int, default=4, help="passes over the training split")
    a("--max-steps", type=pos_int, default=None,
      help="stop after this many optimiser steps (schedules use it as their length)")
    a("--batch-size", type=pos_int, default=64, help="images per process per step")
    a("--min-lr", type=nonneg_float, default=1e-5, help="final lr of the cosine schedule")
    a("--warmup-steps", type=nonneg_int, default=100, help="linear lr warm-up steps")
    a("--weight-decay", type=nonneg_float, default=0.0, help="AdamW weight decay")
    a("--temp-start", type=pos_float, default=1.0, help="Gumbel-softmax temperature at step 0")
    a("--temp-end", type=pos_float, default=1 / 16,
      help="final temperature (DALL-E anneals 1 -> 1/16); lower = closer to hard codes")
    a("--temp-anneal", type=pos_float, default=0.7,
      help="fraction of training over which the temperature decays exponentially")
    a("--kl-weight", type=nonneg_float, default=None,
      help="weight of KL(q || uniform) after warm-up; larger spreads codebook usage (preset: small 1e-3, "
           "dalle 1e-2)")
    a("--kl-warmup", type=runs.number(float, "in [0, 1)"), default=None,
      help="fraction of training over which the KL weight ramps up from 0 (preset: small 0.2, dalle 0: "
           "full weight from the first step)")
    a("--relaxation", default="soft", choices=["hard", "soft"],
      help="soft: DALL-E's relaxed one-hot mixture; hard: straight-through one-hot samples (the decoder "
           "sees what tokenize() gives it)")
    a("--recon-loss", default="mse", choices=["mse", "logit_laplace"],
      help="mse on [0,1] pixels (stable in short runs) or DALL-E's logit-Laplace NLL")
    a("--amp", default="none", choices=["bf16", "fp16", "none"],
      help="autocast dtype; bf16 on Ampere+ GPUs. Tokens are always computed in fp32")
    a("--clip-grad", type=nonneg_float, default=1.0, help="max gradient norm (0 = off)")
    free("--max-skips", type=nonneg_int, default=20, help="stop after this many skipped steps (non-finite "
         "loss or gradients); fp16 overflows of the GradScaler are counted apart")
    a("--seed", type=runs.SEED, default=0, help="seeds data order, augmentation and noise")
    # more flags free on resume (runs.stage_parser adds output, logging, processes)
    free("--num-workers", type=nonneg_int, default=2, help="DataLoader worker processes")
    free("--sample-every", type=pos_int, default=500, help="reconstruction PNG every N steps")
    return p


def resolve_config(args):
    """Preset values, overridden by explicit flags; a flag the preset's kind has no use for is an error."""
    cfg = dict(DVAE_PRESETS[args.preset])
    unused = ("patch_size", "margin", "kmeans_iters") if args.preset != "kmeans" else DVAE_ONLY
    given = [k for k in unused if getattr(args, k) is not None]
    if given:
        raise ValueError(f"--preset {args.preset} takes no " + ", ".join("--" + k.replace("_", "-")
                                                                        for k in given))
    for k in cfg:
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    return cfg


def build_from_config(cfg):
    """(Encoder, Decoder) from a preset-style dict (shared group_count, n_hid, ... keys)."""
    shared = {k: cfg[k] for k in ("group_count", "n_hid", "n_blk_per_group", "vocab_size")}
    return build_dvae(shared, dict(shared, n_init=cfg["n_init"]))


def load_tokenizer(path):
    """(Encoder, Decoder) from a checkpoint written by `python dvae.py` (weights + config)."""
    import training
    ckpt = training.load_checkpoint(path, "tokenizer checkpoint (--dvae)")
    if ckpt.get("kind") == "kmeans":
        enc, dec = build_patch_tokenizer(ckpt["codebook"], ckpt["patch_size"], ckpt.get("margin", 0))
        return enc.eval().requires_grad_(False), dec.eval().requires_grad_(False)
    if "encoder_config" not in ckpt:
        raise ValueError(f"{path!r} is not a dvae.py checkpoint (no 'encoder_config'); for OpenAI's "
                         f"weights pass --dalle-encoder/--dalle-decoder instead")
    enc, dec = build_dvae(ckpt["encoder_config"], ckpt["decoder_config"])
    enc.load_state_dict(ckpt["encoder"])
    dec.load_state_dict(ckpt["decoder"])
    return enc.eval().requires_grad_(False), dec.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_tokenizer(enc, dec, loader, device, max_batches=8):
    """Hard-token reconstruction: MSE of decode(tokenize(x)) vs x, code perplexity and usage."""
    mse, codes = [], []
    for i, (x, _) in enumerate(loader):
        if i == max_batches:
            break
        x = x.to(device)
        z = tokenize(enc, x)
        mse.append(F.mse_loss(decode(dec, z), x).item())
        codes.append(z.cpu())
    perplexity, usage = codebook_stats(torch.cat(codes), enc.vocab_size)
    return {"val_recon_mse": sum(mse) / len(mse), "val_perplexity": perplexity, "val_usage": usage}


# Below this validation perplexity the run ends with a warning (pretrain.py's default floor, too)
COLLAPSE_PERPLEXITY = 16

def main(args):
    """The stage (`python dvae.py`; fit_tokenizer): a dVAE trained by Gumbel-softmax, or with --preset
    kmeans a patch codebook fitted at once. Returns the validation numbers (rank 0; {} on the others)."""
    import runs  # the training stage's imports stay here: the model code above needs torch alone
    import training
    from tqdm import tqdm

    # ---------------------------------------------------------------- setup: config, data, model, resume
    owns_group = not torch.distributed.is_initialized()  # pretrain.py may call us inside its group
    rank, world_size, device = training.init_distributed(args.device, args.dist_backend)
    training.seed_everything(args.seed, rank)
    cfg = resolve_config(args)
    runs.prepare_output_dir(args.output_dir)
    if args.preset == "kmeans":  # no training loop: the codebook is fitted at once
        stats = fit_codebook(args, cfg, rank, device)
        training.finish_distributed(owns_group)
        return stats
    train_set, loader, sampler, val_set, val_loader = build_data(args, cfg, rank, world_size)
    steps_per_epoch, total_steps = schedule(args, train_set, loader, world_size)
    model, ddp_model, optimizer, scaler, step, skips = build_training(args, cfg, rank, world_size, device)
    runs.record_args(args, rank, "dvae.py")  # the flags, once every check has passed
    log = training.JsonLog(os.path.join(args.output_dir, "log.jsonl"), rank == 0, resumed_at=step or None)

    # ---------------------------------------------------------------- training loop
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="dvae", dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < total_steps:
        # resume mid-epoch: the sampler replays the epoch's order from where the checkpoint left off
        epoch, steps_left, start = training.resume_point(step, steps_per_epoch, total_steps, args.batch_size)
        sampler.set_epoch(epoch, start=start)
        batches = iter(loader)
        for _ in range(steps_left):
            x = next(batches)[0].to(device, non_blocking=True)
            temperature, kl_weight = gumbel_schedule(step, total_steps, args, cfg)
            lr = training.set_lr(optimizer, training.cosine_lr(step, total_steps, args.warmup_steps, cfg["lr"],
                                                               args.min_lr))
            with training.autocast(device, args.amp):
                out = ddp_model(x, temperature, kl_weight, args.recon_loss, args.relaxation == "hard")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            _, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(out["loss"].detach()),
                                                args.clip_grad, device)
            step += 1
            seen += x.shape[0] * world_size
            bar.update(1)
            skips(status, step)  # stops the run past --max-skips
            if status != "skipped" and training.due(step, args.log_every, total_steps):
                rec = dict(step=step, epoch=epoch, **log_record(out, cfg), temperature=temperature,
                           kl_weight=kl_weight, lr=lr, img_per_s=seen / (time.time() - t0), **skips.state())
                bar.set_postfix(recon=f"{rec['recon']:.4f}", ppl=f"{rec['perplexity']:.0f}", tau=f"{temperature:.2f}")
                log.write(**rec)
            if rank == 0 and training.due(step, args.sample_every, total_steps):
                save_reconstructions(model.encoder, model.decoder, val_set, device,
                                     os.path.join(args.output_dir, f"recon-{step:06d}.png"))
            stop = runs.stop_requested(device)  # SIGINT / SIGTERM on any rank: save now, then exit
            if stop or training.due(step, args.save_every, total_steps):
                save_training_state(model, optimizer, scaler, skips, step, total_steps, args, rank, device)
            if stop:
                runs.STOP.exit(step, os.path.join(args.output_dir, "checkpoint-latest.pth"), rank)
    bar.close()

    # ---------------------------------------------------------------- finish: validation numbers
    return finish(model, val_loader, cfg, step, t0, log, rank, device, owns_group)


def build_data(args, cfg, rank, world_size):
    """(training set, its resumable loader and sampler, validation set, its loader): random crops of
    the tokenizer's size to train on, the whole image to validate on, both in [0, 1]."""
    import data
    train_tf = data.PretrainTransform(cfg["img_size"], scale=(0.35, 1.0), normalized=False)
    val_tf = data.EvalTransform(cfg["img_size"], crop_pct=1.0, normalized=False)
    train_set = data.build_dataset(args.data, "train", train_tf, seed=args.seed)
    val_set = data.build_dataset(args.data, "val", val_tf, seed=args.seed)
    loader, sampler = data.build_loader(train_set, args.batch_size, args.num_workers, rank,
                                        world_size, seed=args.seed)
    val_loader, _ = data.build_loader(val_set, args.batch_size, 0, shuffle=False, drop_last=False)
    return train_set, loader, sampler, val_set, val_loader


def schedule(args, train_set, loader, world_size):
    """(optimiser steps per epoch, total steps): --max-steps, else --epochs of the loader."""
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} x {world_size} processes is larger than the "
                         f"training set ({len(train_set)} images)")
    return steps_per_epoch, args.max_steps or args.epochs * steps_per_epoch


def build_training(args, cfg, rank, world_size, device):
    """(the DVAE, its DDP wrapper (the model itself in one process), AdamW, GradScaler, the step to
    start from, training.SkipCount), restored from a checkpoint where the run resumes one."""
    enc, dec = build_from_config(cfg)
    model = DVAE(enc, dec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step, skips = resume(args, model, optimizer, scaler, rank, world_size, device)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    return model, ddp_model, optimizer, scaler, step, skips


def resume(args, model, optimizer, scaler, rank, world_size, device):
    """Restore everything a bit-exact continuation needs; returns (step, training.SkipCount)."""
    import runs
    import training
    step, free = 0, get_args_parser().resume_free
    path, ckpt = runs.find_resume_checkpoint(args, "dvae.py", free, ("log.jsonl",))
    if ckpt is not None and "encoder" not in ckpt:
        raise ValueError(f"--resume {path!r} holds a k-means codebook, not a dVAE: give --preset "
                         f"{args.preset} another --output-dir")
    if ckpt is not None:
        runs.check_resume_flags(ckpt["args"], vars(args), free, path, args.allow_flag_changes)
        model.encoder.load_state_dict(ckpt["encoder"])
        model.decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        training.restore_rng_states(ckpt["rng"], rank, world_size, device, path)
        if rank == 0:
            print(f"resumed from {path} at step {step}")
    return step, training.SkipCount("dvae.py", args.max_skips, args.output_dir, ckpt)


def log_record(out, cfg):
    """The loss parts of one step and its batch's code perplexity and usage, for the JSON log (reads
    tensors back from the device: only at log time)."""
    perplexity, usage = codebook_stats(out["codes"], cfg["vocab_size"])
    return {"loss": out["loss"].item(), "recon": out["recon"].item(), "kl": out["kl"].item(),
            "perplexity": perplexity, "usage": usage}


def save_training_state(model, optimizer, scaler, skips, step, total_steps, args, rank, device):
    """OUTPUT_DIR/checkpoint-latest.pth: the tokenizer pretrain.py reads (weights + config) and
    everything a bit-exact continuation needs. A collective (the RNG states of every rank): every
    rank calls it; rank 0 writes."""
    import training
    rng = training.gather_rng_states(device)
    if rank == 0:
        training.save_checkpoint(
            {"stage": "dvae.py", "encoder": model.encoder.state_dict(), "decoder": model.decoder.state_dict(),
             "encoder_config": dvae_config(model.encoder), "decoder_config": dvae_config(model.decoder),
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
             "total_steps": total_steps, **skips.state(), "args": vars(args), "rng": rng},
            os.path.join(args.output_dir, "checkpoint-latest.pth"), keep_previous=True)


def finish(model, val_loader, cfg, step, t0, log, rank, device, owns_group):
    """The hard-token reconstruction numbers on the validation set (logged, the last line), a warning
    if the codebook has collapsed, the process group left as found. Returns the numbers."""
    import training
    stats = {}
    if rank == 0:
        stats = evaluate_tokenizer(model.encoder, model.decoder, val_loader, device)
        stats.update(step=step, minutes=(time.time() - t0) / 60)
        log.write(**stats)
        print(json.dumps(stats))
        if stats["val_perplexity"] < COLLAPSE_PERPLEXITY:
            print(f"dvae.py: WARNING the codebook has collapsed: validation perplexity "
                  f"{stats['val_perplexity']:.1f} of {cfg['vocab_size']} codes "
                  f"({100 * stats['val_usage']:.1f}% in use). CIM needs diverse tokens; train longer "
                  f"(short runs anneal the temperature before the codes spread) or raise --kl-weight. "
                  f"pretrain.py refuses tokenizers below --min-tokenizer-perplexity (16)")
    training.finish_distributed(owns_group)
    return stats


def stage_args(**values):
    """dvae.py's flags as the command line gives them, from keyword values named as the flags' dests
    (`img_size=32` for --img-size 32): the parser's defaults for the rest, and each value held to
    its flag's own check, as if typed (its `type`, range included, and its choices), so a bad value
    is refused as the command line refuses it. None leaves a flag whose default is None unset."""
    import argparse
    import runs
    parser = get_args_parser()
    args, actions = parser.parse_args([]), {a.dest: a for a in parser._actions if a.dest != "help"}
    for name, value in values.items():
        if name not in actions:
            raise TypeError(f"dvae.py has no flag {runs.flag(name)}")
        action = actions[name]
        if action.nargs == 0:  # a switch (store_true)
            if not isinstance(value, bool):
                raise ValueError(f"{runs.flag(name)} is a switch: True or False, not {value!r}")
        elif value is not None or action.default is not None:
            try:
                value = (action.type or str)(str(value))
            except (argparse.ArgumentTypeError, ValueError) as err:
                raise ValueError(f"argument {runs.flag(name)}: {err}") from None
            if action.choices is not None and value not in action.choices:
                raise ValueError(f"argument {runs.flag(name)}: invalid choice: {value!r} (choose from "
                                 f"{', '.join(map(repr, action.choices))})")
        setattr(args, name, value)
    return args


def fit_tokenizer(output_dir, preset, **flags):
    """Fit dvae.py's --preset PRESET into OUTPUT_DIR, as `python dvae.py --output-dir OUTPUT_DIR
    --preset PRESET ...` would, and return the path of its checkpoint (what load_tokenizer and
    pretrain.py --dvae read). `flags`: any other flag of dvae.py by its dest name (data, img_size,
    seed, device, num_workers, max_steps...), checked as the command line checks it (stage_args);
    the rest take the parser's defaults. The same code path as the command line: main."""
    args = stage_args(output_dir=output_dir, preset=preset, **flags)
    main(args)
    return os.path.join(args.output_dir, "checkpoint-latest.pth")


def fit_codebook(args, cfg, rank, device):
    """--preset kmeans: fit the codebook on the training split's un-augmented patches (every rank
    computes the same one; rank 0 writes it), then the validation numbers a dVAE run reports.
    An existing checkpoint is reused, as a finished dVAE run is, if the flags match; other flags are
    refused, or with --allow-flag-changes fitted again."""
    import data
    import runs
    import training
    t0 = time.time()
    f, m, iters = cfg["patch_size"], cfg["margin"], args.kmeans_iters or KMEANS_ITERS
    if cfg["img_size"] % f:
        raise ValueError(f"--img-size {cfg['img_size']} is not a multiple of --patch-size {f}")
    if m > f or m >= cfg["img_size"]:
        raise ValueError(f"--margin {m} is larger than --patch-size {f}: a centroid would reach past the "
                         f"cells next to its own (f/2 = {f / 2:g} averages 4 centroids per pixel)")
    tf = data.EvalTransform(cfg["img_size"], crop_pct=1.0, normalized=False)
    train_set = data.build_dataset(args.data, "train", tf, seed=args.seed)
    val_set = data.build_dataset(args.data, "val", tf, seed=args.seed)
    free = get_args_parser().resume_free
    path, ckpt = runs.find_resume_checkpoint(args, "dvae.py", free, ("log.jsonl",))
    if ckpt is not None and ckpt.get("kind") != "kmeans":
        raise ValueError(f"--resume {path!r} holds a trained dVAE, not a k-means codebook: give --preset kmeans "
                         f"another --output-dir")
    if ckpt is not None and runs.check_resume_flags(ckpt["args"], vars(args), free, path,
                                                    args.allow_flag_changes):
        ckpt = None  # --allow-flag-changes: fit again with the new flags (seconds)
    runs.record_args(args, rank, "dvae.py")
    if ckpt is not None:
        codebook, train_mse, m = ckpt["codebook"], ckpt["train_recon_mse"], ckpt.get("margin", 0)  # older: 0
    else:
        n = min(len(train_set), KMEANS_MAX_IMAGES)
        images = torch.stack([train_set[int(i)][0] for i in torch.linspace(0, len(train_set) - 1, n)])
        codebook, train_mse = fit_patch_kmeans(images, cfg["vocab_size"], f, iters, seed=args.seed, margin=m)
        if rank == 0:
            training.save_checkpoint({"stage": "dvae.py", "kind": "kmeans", "codebook": codebook, "patch_size": f,
                                      "margin": m,
                                      "train_recon_mse": train_mse, "step": iters, "total_steps": iters,
                                      "args": vars(args)}, os.path.join(args.output_dir, "checkpoint-latest.pth"))
    enc, dec = (part.to(device) for part in build_patch_tokenizer(codebook, f, m))
    stats = {}
    if rank == 0:
        val_loader, _ = data.build_loader(val_set, args.batch_size, 0, shuffle=False, drop_last=False)
        stats = dict(evaluate_tokenizer(enc, dec, val_loader, device), train_recon_mse=train_mse,
                     step=iters, minutes=(time.time() - t0) / 60)
        training.JsonLog(os.path.join(args.output_dir, "log.jsonl"), True).write(**stats)
        print(json.dumps(stats))
        save_reconstructions(enc, dec, val_set, device, os.path.join(args.output_dir, f"recon-{iters:06d}.png"))
    return stats


def save_reconstructions(enc, dec, dataset, device, path, n=16):
    """PNG: a row of validation images above their hard-token reconstructions."""
    import data
    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)
    data.save_grid([x, decode(dec, tokenize(enc, x))], path, ["input x", "decode(tokenize(x))"])


if __name__ == "__main__":
    import runs
    runs.run_script(main, get_args_parser())
