"""Tests for bench.py: it times pretrain.py's own train_step / CIM.forward per phase, counts FLOPs per
phase (the quick start's step: 0.514 GFLOP per image), computes the MFU, honours --compile, and times
a reference backbone when one is importable."""
import sys

import pytest
import torch

import bench
import enhancer as enh
import pretrain
from test_pretrain import TINY


def run(out, dvae_ckpt, *extra):
    argv = TINY + ["--dvae", dvae_ckpt, "--output-dir", str(out), *extra]
    return bench.main(bench.get_args_parser().parse_args(argv))


def test_bench_runs_the_training_step_per_phase_and_whole(tmp_path, tiny_dvae_ckpt, monkeypatch):
    calls = []
    real_forward = pretrain.CIM.forward

    def forward(self, *a, **kw):
        calls.append(1)
        return real_forward(self, *a, **kw)

    monkeypatch.setattr(pretrain.CIM, "forward", forward)
    vocab = []
    real_build = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", lambda args, enc, dec: vocab.append(enc.vocab_size) or
                        real_build(args, enc, dec))
    report = run(tmp_path, tiny_dvae_ckpt, "--steps", "2", "--accum-iter", "2", "--peak-tflops", "2.0")
    assert vocab == [64]  # the run's --dvae tokenizer (64 codes), not an untrained preset
    phases = list(bench.BENCH_PHASES.values())
    assert set(report) == {"img_per_s", "step_ms", "gflop_per_image", "tflop_per_s", "mfu", *phases,
                           *(p + " GFLOP" for p in phases)}
    assert all(report[p] > 0 for p in phases)
    assert sum(report[p] for p in phases) >= 0.5 * report["step_ms"]
    assert len(calls) == 2 * (1 + 2 + 2 + 2)  # 2 micro-batches x (FLOP count, warm-up, per phase, whole)
    # FLOPs: counted per phase; the forward of each network and the backward of both carry them
    assert report["gflop_per_image"] == pytest.approx(sum(report[p + " GFLOP"] for p in phases))
    for p in ("tokenize", "generator fwd", "enhancer fwd", "backward (both)"):
        assert report[p + " GFLOP"] > 0, p
    fwd = report["generator fwd GFLOP"] + report["enhancer fwd GFLOP"]
    assert 1.5 * fwd < report["backward (both) GFLOP"] < 2.5 * fwd  # backward ~ 2x forward
    assert report["mfu"] == pytest.approx(report["tflop_per_s"] / 2.0)


def test_count_flops_splits_a_step_at_its_phase_marks():
    lin = torch.nn.Linear(10, 20)
    x = torch.randn(4, 10)

    def step(trace):
        trace("tokens", lin(x))           # phase "tokenize": 2 * 4 * 10 * 20 FLOPs
        trace("loss_gen", lin(lin(x)[:, :10]))  # phase "generator fwd": twice that
    flops = bench.count_flops(step)
    assert flops == {"tokenize": 1600, "generator fwd": 3200}


def test_bench_times_the_reference_backbone_when_importable(tmp_path, tiny_dvae_ckpt, monkeypatch):
    """timm is never installed here: a stand-in module whose VisionTransformer is ours checks the
    plumbing (same inputs, both timed, the ratio reported)."""
    import types
    built = []

    def reference(num_classes, **kw):
        built.append(kw)
        return enh.VisionTransformer(**kw)

    vt = types.ModuleType("timm.models.vision_transformer")
    vt.VisionTransformer = reference
    for name, mod in (("timm", types.ModuleType("timm")), ("timm.models", types.ModuleType("timm.models")),
                      ("timm.models.vision_transformer", vt)):
        monkeypatch.setitem(sys.modules, name, mod)
    report = run(tmp_path, tiny_dvae_ckpt, "--steps", "1")
    assert built == [dict(img_size=16, patch_size=4, embed_dim=128, depth=6, num_heads=4)]
    assert report["ours_ms"] > 0 and report["reference_ms"] > 0
    assert report["speedup"] == pytest.approx(report["reference_ms"] / report["ours_ms"])


def test_compile_is_honoured(tmp_path, tiny_dvae_ckpt, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: real_compile(*a, **dict(kw, backend="eager")))
    report = run(tmp_path, tiny_dvae_ckpt, "--compile", "--steps", "1")
    assert report["img_per_s"] > 0


def test_the_quick_start_step_counts_0_514_gflop_per_image(tmp_path):
    """The figure in docs/pretrain.md's table: vit_mini at 32 px, generator 64 x 2, a quarter of the
    patches masked, the k-means tokenizer (a random codebook here: the same arithmetic), per image
    and independent of the batch."""
    args = bench.get_args_parser().parse_args(["--steps", "1", "--batch-size", "2", "--device", "cpu",
                                               "--output-dir", str(tmp_path)])
    report = bench.main(args)
    assert round(report["gflop_per_image"], 3) == 0.514
    assert not (tmp_path / "tokenizer").exists()  # nothing trained, nothing written


def test_pretrain_holds_no_measuring_code():
    for name in ("benchmark", "bench_reference", "count_flops", "peak_tflops", "BENCH_PHASES", "PEAK_TFLOPS"):
        assert not hasattr(pretrain, name), name
    assert "--bench" not in pretrain.get_args_parser().format_help()
