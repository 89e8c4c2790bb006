"""A stand-in `dall_e` package for the tests: OpenAI's class paths, attribute names and module tree
(attrs is not installed, so plain nn.Module subclasses). `torch.save` of its modules gives files with
the layout of the official encoder.pkl / decoder.pkl; the package is importable only inside
`standin_dall_e`, so the loader under test cannot lean on it."""
import contextlib
import sys
import textwrap

_STANDIN = {
    "__init__.py": "",
    "utils.py": """
        import math
        import torch
        import torch.nn as nn
        import torch.nn.functional as F

        class Conv2d(nn.Module):
            def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device('cpu'),
                         requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.kw = n_in, n_out, kw
                self.use_float16, self.device, self.requires_grad = use_float16, device, requires_grad
                w = torch.empty((n_out, n_in, kw, kw), dtype=torch.float32, device=device)
                w.normal_(std=1 / math.sqrt(n_in * kw ** 2))
                b = torch.zeros((n_out,), dtype=torch.float32, device=device)
                self.w, self.b = nn.Parameter(w, requires_grad), nn.Parameter(b, requires_grad)

            def forward(self, x):
                return F.conv2d(x.float(), self.w.float(), self.b.float(), padding=(self.kw - 1) // 2)
    """,
    "encoder.py": """
        from collections import OrderedDict
        from functools import partial
        import torch
        import torch.nn as nn
        from dall_e.utils import Conv2d

        class EncoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = device, requires_grad
                self.n_hid = n_out // 4
                self.post_gain = 1 / (n_layers ** 2)
                conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                self.res_path = nn.Sequential(OrderedDict([
                    ('relu_1', nn.ReLU()), ('conv_1', conv(n_in, self.n_hid, 3)),
                    ('relu_2', nn.ReLU()), ('conv_2', conv(self.n_hid, self.n_hid, 3)),
                    ('relu_3', nn.ReLU()), ('conv_3', conv(self.n_hid, self.n_hid, 3)),
                    ('relu_4', nn.ReLU()), ('conv_4', conv(self.n_hid, n_out, 1))]))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Encoder(nn.Module):
            def __init__(self, group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192,
                         device=torch.device('cpu'), requires_grad=False, use_mixed_precision=True):
                super().__init__()
                self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
                self.input_channels, self.vocab_size = input_channels, vocab_size
                self.device, self.requires_grad = device, requires_grad
                self.use_mixed_precision = use_mixed_precision
                blk = partial(EncoderBlock, n_layers=group_count * n_blk_per_group, device=device,
                              requires_grad=requires_grad)
                h, r = n_hid, range(n_blk_per_group)
                self.blocks = nn.Sequential(OrderedDict([
                    ('input', Conv2d(input_channels, h, 7, device=device, requires_grad=requires_grad)),
                    ('group_1', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(h, h)) for i in r],
                        ('pool', nn.MaxPool2d(kernel_size=2))]))),
                    ('group_2', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(h if i == 0 else 2 * h, 2 * h)) for i in r],
                        ('pool', nn.MaxPool2d(kernel_size=2))]))),
                    ('group_3', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(2 * h if i == 0 else 4 * h, 4 * h)) for i in r],
                        ('pool', nn.MaxPool2d(kernel_size=2))]))),
                    ('group_4', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(4 * h if i == 0 else 8 * h, 8 * h)) for i in r]]))),
                    ('output', nn.Sequential(OrderedDict([
                        ('relu', nn.ReLU()),
                        ('conv', Conv2d(8 * h, vocab_size, 1, use_float16=False, device=device,
                                        requires_grad=requires_grad))]))),
                ]))

            def forward(self, x):
                return self.blocks(x)
    """,
    "decoder.py": """
        from collections import OrderedDict
        from functools import partial
        import torch
        import torch.nn as nn
        from dall_e.utils import Conv2d

        class DecoderBlock(nn.Module):
            def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
                super().__init__()
                self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
                self.device, self.requires_grad = device, requires_grad
                self.n_hid = n_out // 4
                self.post_gain = 1 / (n_layers ** 2)
                conv = partial(Conv2d, device=device, requires_grad=requires_grad)
                self.id_path = conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
                self.res_path = nn.Sequential(OrderedDict([
                    ('relu_1', nn.ReLU()), ('conv_1', conv(n_in, self.n_hid, 1)),
                    ('relu_2', nn.ReLU()), ('conv_2', conv(self.n_hid, self.n_hid, 3)),
                    ('relu_3', nn.ReLU()), ('conv_3', conv(self.n_hid, self.n_hid, 3)),
                    ('relu_4', nn.ReLU()), ('conv_4', conv(self.n_hid, n_out, 3))]))

            def forward(self, x):
                return self.id_path(x) + self.post_gain * self.res_path(x)

        class Decoder(nn.Module):
            def __init__(self, group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3,
                         vocab_size=8192, device=torch.device('cpu'), requires_grad=False,
                         use_mixed_precision=True):
                super().__init__()
                self.group_count, self.n_init, self.n_hid = group_count, n_init, n_hid
                self.n_blk_per_group, self.output_channels = n_blk_per_group, output_channels
                self.vocab_size = vocab_size
                self.device, self.requires_grad = device, requires_grad
                self.use_mixed_precision = use_mixed_precision
                blk = partial(DecoderBlock, n_layers=group_count * n_blk_per_group, device=device,
                              requires_grad=requires_grad)
                h, r = n_hid, range(n_blk_per_group)
                self.blocks = nn.Sequential(OrderedDict([
                    ('input', Conv2d(vocab_size, n_init, 1, use_float16=False, device=device,
                                     requires_grad=requires_grad)),
                    ('group_1', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(n_init if i == 0 else 8 * h, 8 * h)) for i in r],
                        ('upsample', nn.Upsample(scale_factor=2, mode='nearest'))]))),
                    ('group_2', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(8 * h if i == 0 else 4 * h, 4 * h)) for i in r],
                        ('upsample', nn.Upsample(scale_factor=2, mode='nearest'))]))),
                    ('group_3', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(4 * h if i == 0 else 2 * h, 2 * h)) for i in r],
                        ('upsample', nn.Upsample(scale_factor=2, mode='nearest'))]))),
                    ('group_4', nn.Sequential(OrderedDict([
                        *[(f'block_{i + 1}', blk(2 * h if i == 0 else 1 * h, 1 * h)) for i in r]]))),
                    ('output', nn.Sequential(OrderedDict([
                        ('relu', nn.ReLU()),
                        ('conv', Conv2d(1 * h, 2 * output_channels, 1, device=device,
                                        requires_grad=requires_grad))]))),
                ]))

            def forward(self, x):
                return self.blocks(x)
    """,
}


@contextlib.contextmanager
def standin_dall_e(root):
    """Write the package under `root` and make it importable inside the block only."""
    (root / "dall_e").mkdir(exist_ok=True)
    for name, source in _STANDIN.items():
        (root / "dall_e" / name).write_text(textwrap.dedent(source))
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
            del sys.modules[name]
        while str(root) in sys.path:
            sys.path.remove(str(root))


def write_official_pickles(root, encoder_kw, decoder_kw, seed=0):
    """encoder.pkl and decoder.pkl under `root`: whole stand-in modules with random weights, saved as
    OpenAI published theirs; returns their paths. The encoder's logit layer standardises the features
    of smooth random images, so that its argmax spreads over many codes as a trained tokenizer's does
    (pretrain.py refuses a collapsed tokenizer, and plain random weights give a handful of codes)."""
    import torch
    import torch.nn.functional as F

    with standin_dall_e(root):
        from dall_e.decoder import Decoder
        from dall_e.encoder import Encoder

        torch.manual_seed(seed)
        encoder, decoder = Encoder(**encoder_kw), Decoder(**decoder_kw)
        with torch.no_grad():
            images = F.interpolate(torch.rand(64, 3, 8, 8), size=32, mode="bilinear")
            features = torch.relu(encoder.blocks[:-1](0.8 * images + 0.1))  # map_pixels: eps 0.1
            features = features.transpose(0, 1).flatten(1)  # (C, B*h*w)
            conv = encoder.blocks.output.conv
            w = conv.w[:, :, 0, 0] / (features.std(1) + 1e-6)
            conv.w.copy_(w[:, :, None, None])
            conv.b.copy_(-(w @ features.mean(1)))
        paths = root / "encoder.pkl", root / "decoder.pkl"
        torch.save(encoder, paths[0])
        torch.save(decoder, paths[1])
    return paths
