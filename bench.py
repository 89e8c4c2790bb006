"""Measuring one CIM pre-training step: time and FLOPs per phase, img/s, MFU.

    python bench.py                                      # the quick start's step on this machine
    python bench.py --recipe imagenet --steps 2 --batch-size 8   # ViT-B/16, 224 px, DALL-E-sized tokenizer
    python bench.py --recipe imagenet --amp bf16 --steps 20      # on a GPU: the paper's step, with MFU

Every flag of pretrain.py is accepted and means what it means there: the model is pretrain.py's
`build_model`, and each measured step is pretrain.py's own `train_step`, so `CIM.forward` itself runs,
phase by phase through its `trace` hook. Only the data is synthetic (random tensors, no loading), and
the tokenizer is the given one (--dvae / --dalle-*) or an untrained one of the size the run would
use. Three measurements:
    1. one step under torch's FlopCounterMode: FLOPs per image per phase (FLOP = 2 multiply-adds);
    2. --steps steps with the trace hook timing each phase (synchronising at phase ends);
    3. --steps un-instrumented steps: the whole-step time, img/s, TFLOP/s and MFU.
If timm (ViTs) or torchvision (ResNets) happens to be installed (never a dependency), our backbone's
forward + backward is also timed against theirs on the same inputs.
"""
import importlib
import json
import time

import torch

import enhancer as enh
import pretrain
import runs
import training

# Dense peak TFLOP/s by GPU name and precision, for the MFU (vendor data sheets, SXM parts;
# fp32 without TF32). Other cards: --peak-tflops.
PEAK_TFLOPS = {"H200": {"bf16": 989, "fp16": 989, "none": 67}, "H100": {"bf16": 989, "fp16": 989, "none": 67},
               "A100": {"bf16": 312, "fp16": 312, "none": 19.5}}

# trace events that end a phase of the step -> the phase they end (events between them add to the next)
BENCH_PHASES = {"mask": "batch + mask", "tokens": "tokenize", "loss_gen": "generator fwd",
                "replaced": "sample + mix", "corrupted": "decode + resize", "loss": "enhancer fwd",
                "backward": "backward (both)", "optimizer": "clip + optimizer"}


def benchmark(args, device):
    """args.steps training steps on random tensors through pretrain.py's train_step and
    CIM.forward, with --compile honoured: FLOPs and time per phase, then the un-instrumented step."""
    grid = args.img_size // args.patch_size
    encoder, decoder = pretrain.build_tokenizer(args, device) if args.dvae or args.dalle_encoder else \
        pretrain.untrained_tokenizer(args, device)
    model = pretrain.build_model(args, encoder, decoder).to(device).train()
    optimizer = torch.optim.AdamW(training.param_groups(model, args.weight_decay, model.no_weight_decay()), lr=1e-4,
                                  betas=tuple(args.opt_betas), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    B, S, T = args.batch_size, args.img_size, grid * encoder.downsample
    batch = [(torch.randn(B, 3, S, S), torch.rand(B, 3, T, T)) for _ in range(args.accum_iter)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, mems, mark = {}, {}, [0.0]

    def timer(name, value):
        if name in BENCH_PHASES:
            sync()
            now = time.perf_counter()
            phase = BENCH_PHASES[name]
            times[phase] = times.get(phase, 0.0) + now - mark[0]
            if device.type == "cuda":
                mems[phase] = max(mems.get(phase, 0), torch.cuda.max_memory_allocated(device) / 2 ** 20)
            mark[0] = now

    def step(trace):
        sync()
        mark[0] = t = time.perf_counter()
        pretrain.train_step(model, model, batch, optimizer, scaler, args, device, trace)
        sync()
        return time.perf_counter() - t

    flops = count_flops(lambda trace: pretrain.train_step(model, model, batch, optimizer, scaler, args, device, trace))
    if args.compile:  # FLOPs were counted in eager mode: the compiled graph does the same arithmetic
        pretrain.compile_in_place(model)
    for _ in range(2):  # warm-up (and compilation), not counted
        step(pretrain.no_trace)
    times.clear()
    for _ in range(args.steps):
        step(timer)
    whole = sum(step(pretrain.no_trace) for _ in range(args.steps)) / args.steps
    phased = sum(times.values()) / args.steps
    n = B * args.accum_iter
    print(f"bench: {args.arch} {args.objective} {S}px batch {n} amp {args.amp} compile {args.compile} "
          f"on {device}: whole step {1000 * whole:.1f} ms, {n / whole:.1f} img/s "
          f"(instrumented: {1000 * phased:.1f} ms)")
    total = sum(flops.values())
    peak = args.peak_tflops or peak_tflops(device, args.amp)
    report = {"img_per_s": n / whole, "step_ms": 1000 * whole, "gflop_per_image": total / n / 1e9,
              "tflop_per_s": total / whole / 1e12, "mfu": total / whole / 1e12 / peak if peak else None}
    print(f"  {'phase':<18} {'ms':>8}  {'share':>6}  {'GFLOP/img':>9}")
    for phase in BENCH_PHASES.values():
        ms = 1000 * times.get(phase, 0.0) / args.steps
        report[phase] = ms
        report[phase + " GFLOP"] = flops.get(phase, 0) / n / 1e9
        print(f"  {phase:<18} {ms:8.2f}  {100 * ms / (1000 * phased):5.1f}%  {flops.get(phase, 0) / n / 1e9:9.3f}"
              + (f"  peak {mems[phase]:.0f} MiB" if phase in mems else ""))
    print(f"  {total / n / 1e9:.3f} GFLOP per image (FLOP = 2 MAC, counted), {report['tflop_per_s']:.2f} TFLOP/s"
          + (f", MFU {100 * report['mfu']:.1f}% of {peak:g} TFLOP/s" if peak else ", MFU: no peak known "
             "(--peak-tflops)"))
    reference = bench_reference(args, device)
    if reference:
        report.update(reference)
    return report


def bench_reference(args, device, steps=10):
    """Our enhancer backbone against the reference implementation, when it happens to be importable
    (timm for ViTs, torchvision for ResNets; never a dependency): forward + backward of a summed
    output on the same inputs, the two timed in turn, median of `steps`. Returns
    {"ours_ms", "reference_ms", "speedup"} (speedup > 1: ours is faster) or None."""
    B, S = args.batch_size, args.img_size
    try:  # looked up by name: the project never depends on either library
        if args.arch.startswith("vit"):
            vit = importlib.import_module("timm.models.vision_transformer")
            cfg = enh.ARCHS[args.arch]
            theirs = vit.VisionTransformer(img_size=S, patch_size=args.patch_size, embed_dim=cfg["embed_dim"],
                                           depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=0)
        else:
            models = importlib.import_module("torchvision.models")
            theirs = getattr(models, args.arch)()  # its default (NCHW) layout
    except (ImportError, AttributeError):
        return None
    ours = enh.build_backbone(args.arch, img_size=S, patch_size=args.patch_size).to(device)
    fmt = torch.contiguous_format
    if args.arch.startswith("resnet") and device.type == "cuda":  # as training runs it
        ours.to(memory_format=torch.channels_last)
        fmt = torch.channels_last
    theirs = theirs.to(device)
    x = torch.randn(B, 3, S, S, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fwd_bwd(net, inp):
        sync()
        t = time.perf_counter()
        with training.autocast(device, args.amp):
            out = net(inp)
        out.float().sum().backward()
        sync()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        fwd_bwd(ours, x.contiguous(memory_format=fmt)), fwd_bwd(theirs, x)
    times = [(fwd_bwd(ours, x.contiguous(memory_format=fmt)), fwd_bwd(theirs, x)) for _ in range(steps)]
    ours_s = sorted(t[0] for t in times)[steps // 2]
    theirs_s = sorted(t[1] for t in times)[steps // 2]
    name = "timm" if args.arch.startswith("vit") else "torchvision"
    print(f"  {args.arch} backbone fwd+bwd, batch {B}, {S}px: ours {1000 * ours_s:.1f} ms, {name} "
          f"{1000 * theirs_s:.1f} ms: {theirs_s / ours_s:.2f}x")
    return {"ours_ms": 1000 * ours_s, "reference_ms": 1000 * theirs_s, "speedup": theirs_s / ours_s}


def count_flops(run_step):
    """FLOPs of one training step per bench phase, from torch's FlopCounterMode (matmuls and
    convolutions, forward and backward, FLOP = 2 x multiply-add); run_step(trace) runs the step."""
    from torch.utils.flop_counter import FlopCounterMode
    counter, flops, last = FlopCounterMode(display=False), {}, [0]

    def mark(name, value):
        if name in BENCH_PHASES:
            total = counter.get_total_flops()
            flops[BENCH_PHASES[name]] = flops.get(BENCH_PHASES[name], 0) + total - last[0]
            last[0] = total

    with counter:
        run_step(mark)
    return flops


def peak_tflops(device, amp):
    """The table's peak for this GPU and --amp, or None (CPUs, unknown cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[amp] for key, p in PEAK_TFLOPS.items() if key in name), None)


def get_args_parser():
    """pretrain.py's flags (the same recipes and defaults) plus the measurement's own."""
    p = pretrain.get_args_parser()
    p.prog = "bench.py"
    p.description = "time and count one CIM pre-training step (pretrain.py's train_step) per phase"
    p.add_argument("--steps", type=runs.number(int, "> 0"), default=10,
                   help="steps timed per measurement (after 2 warm-up steps)")
    p.add_argument("--peak-tflops", type=runs.number(float, "> 0"), default=None, help="the accelerator's "
                   f"peak TFLOP/s for the MFU (default: a table for {', '.join(PEAK_TFLOPS)})")
    return p


def main(args):
    args = pretrain.resolve_args(args)
    _, _, device = training.init_distributed(args.device, args.dist_backend)
    training.seed_everything(args.seed)
    report = benchmark(args, device)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}))
    return report


if __name__ == "__main__":
    runs.run_script(main, get_args_parser())
