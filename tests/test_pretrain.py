"""Tests for pretrain.py: real CIM steps on the built-in data (both objectives), the stop-gradient
between generator and enhancer, optimiser groups, bit-exact resume (also after SIGKILL), a
two-process gloo torchrun run, bf16 autocast, --explain, non-finite losses and bad
inputs. Tiny config: 16 px images, 4 px patches (4 x 4 grid), a 1-block generator of width 32,
vit_mini enhancer, the session's 64-code tokenizer (conftest.tiny_dvae_ckpt)."""
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import dvae
import enhancer as enh
import generator as gen
import pretrain
import training
from conftest import REPO, free_port, refused, subprocess_env

TINY = ["--img-size", "16", "--patch-size", "4", "--batch-size", "8", "--gen-dim", "32",
        "--gen-depth", "1", "--gen-heads", "2", "--arch", "vit_mini", "--knn-k", "0",
        "--log-every", "1", "--num-workers", "0", "--device", "cpu", "--mask-ratio", "0.5",
        # the builtin recipe warms up over one epoch (1024 steps here): lr would stay ~0
        "--warmup-epochs", "0", "--lr", "1e-3",
        # the session's 3-step tokenizer uses few codes; these tests are about the mechanics (the
        # usage check has its own tests below)
        "--min-tokenizer-perplexity", "0"]


def flags(out, dvae_ckpt, *extra):
    return TINY + ["--dvae", dvae_ckpt, "--output-dir", str(out), *extra]


def run(out, dvae_ckpt, *extra):
    return pretrain.main(pretrain.get_args_parser().parse_args(flags(out, dvae_ckpt, *extra)))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a, b):
    """Two checkpoint-latest.pth dicts describe the same training state, tensor for tensor."""
    assert a["step"] == b["step"] and a["skipped"] == b["skipped"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key in oa["state"][i]:
            assert torch.equal(oa["state"][i][key], ob["state"][i][key]), (i, key)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])  # the noise stream lines up too


def tiny_model(dvae_ckpt, *extra):
    args = pretrain.resolve_args(pretrain.get_args_parser().parse_args(flags("unused", dvae_ckpt, *extra)))
    tokenizer = dvae.load_tokenizer(dvae_ckpt)
    torch.manual_seed(0)
    return args, pretrain.build_model(args, *tokenizer), tokenizer


def batch(B=4, S=16, T=16):
    torch.manual_seed(1)
    images = torch.randn(B, 3, S, S)  # normalised network view
    tok_images = torch.rand(B, 3, T, T)  # tokenizer view in [0, 1]
    return images, tok_images, gen.mask_patches("random", B, 4, 0.5)


# ----------------------------------------------------------------------------------------------------
# A real run
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["revdet", "respix"])
def test_tiny_run_logs_samples_checkpoints_and_exports(tmp_path, tiny_dvae_ckpt, objective):
    steps = 3
    result = run(tmp_path, tiny_dvae_ckpt, "--objective", objective, "--max-steps", str(steps))
    assert result["steps"] == steps

    log = read_log(tmp_path)
    records = [r for r in log if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    keys = {"loss_gen", "acc_gen", "loss_enh", "replaced_frac", "mask_frac", "lr", "img_per_s",
            "peak_mem_mb", "skipped"}
    keys |= {"revdet_acc", "revdet_auc"} if objective == "revdet" else {"respix_mse"}
    for r in records:
        assert keys <= r.keys(), keys - r.keys()
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_gen", "loss_enh", "lr", "img_per_s"))
        assert r["mask_frac"] == 0.5 and 0 < r["replaced_frac"] <= 0.5  # replaced only where masked
        assert 0 <= r["acc_gen"] <= 1 and r["skipped"] == 0 and r["peak_mem_mb"] > 0
        assert r["loss"] == pytest.approx(r["loss_gen"] + r["loss_enh"], rel=1e-5)  # lambda = 1
    assert records[0]["lr"] == pytest.approx(1e-3) and records[-1]["lr"] < records[0]["lr"]
    assert log[-1]["steps"] == steps  # the final summary line

    # the grid: up to 8 images of 16 px, each scaled up 6x to 96 px, a 2 px gap, the row names on the left
    grid = Image.open(tmp_path / f"sample-{steps:06d}.png")
    rows = 5 if objective == "revdet" else 4
    assert grid.height == rows * (96 + 2) + 2 and (grid.width - 2) % (96 + 2) > 0  # the names' margin

    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert ckpt["step"] == steps and ckpt["args"]["objective"] == objective
    _, fresh, _ = tiny_model(tiny_dvae_ckpt, "--objective", objective)
    assert ckpt["model"].keys() == fresh.state_dict().keys()

    backbone = load(tmp_path / "backbone.pth")
    reference = enh.build_backbone("vit_mini", img_size=16, patch_size=4)
    assert list(backbone["model"]) == list(reference.state_dict())  # timm names, no prefixes
    reference.load_state_dict(backbone["model"], strict=True)
    assert (backbone["arch"], backbone["img_size"], backbone["patch_size"]) == ("vit_mini", 16, 4)
    for name, t in backbone["model"].items():  # the export is the trained enhancer backbone
        assert torch.equal(t, ckpt["model"]["enhancer.backbone." + name]), name


# ----------------------------------------------------------------------------------------------------
# Mechanisms: the stop-gradient between the two networks, optimiser groups, tokenizer mismatch
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["revdet", "respix"])
def test_no_gradient_crosses_between_generator_and_enhancer(tiny_dvae_ckpt, objective):
    args, model, tokenizer = tiny_model(tiny_dvae_ckpt, "--objective", objective)
    loss, out = model(*batch())
    assert torch.isfinite(loss) and not out["corrupted"].requires_grad

    out["loss_enh"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.generator.parameters())
    enh_grads = [p.grad for p in model.enhancer.parameters()]
    assert all(g is not None for g in enh_grads) and sum(g.abs().sum() for g in enh_grads) > 0

    model.zero_grad(set_to_none=True)
    out["loss_gen"].backward()
    assert all(p.grad is None for p in model.enhancer.parameters())
    assert sum(p.grad.abs().sum() for p in model.generator.parameters() if p.grad is not None) > 0
    assert model.generator.mask_token.grad.abs().sum() > 0  # the generator did see [MASK]
    assert all(p.grad is None for m in tokenizer for p in m.parameters())  # frozen tokenizer


def test_param_groups_split_decay_and_cover_every_parameter_once(tiny_dvae_ckpt):
    _, model, _ = tiny_model(tiny_dvae_ckpt)
    decay, no_decay = training.param_groups(model, 0.05, model.no_weight_decay())
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # once each
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}

    special = {"generator.cls_token", "generator.mask_token",
               "generator.rel_pos_bias.relative_position_bias_table",
               "enhancer.backbone.pos_embed", "enhancer.backbone.cls_token"}
    assert special <= no_decay_names
    for name, p in model.named_parameters():
        if p.ndim <= 1:  # norms, biases, q/v biases, layer scale
            assert name in no_decay_names, name
        elif name not in special:
            assert name in decay_names, name
    assert {"generator.blocks.0.attn.q_bias", "generator.blocks.0.ls1.gamma",
            "enhancer.backbone.norm.weight", "enhancer.head.proj.bias"} <= no_decay_names
    assert {"generator.blocks.0.attn.qkv.weight", "generator.lm_head.weight",
            "enhancer.backbone.patch_embed.proj.weight", "enhancer.head.proj.weight"} <= decay_names


def test_tokenizer_grid_mismatch_is_reported(tiny_dvae_ckpt):
    """The tokenizer view must be (S/P) * f px; a 20 px view gives 5 x 5 tokens for a 4 x 4 grid."""
    args, model, tokenizer = tiny_model(tiny_dvae_ckpt)
    images, _, mask = batch()
    with pytest.raises(ValueError, match=r"5x5 token grid but the generator expects 4x4.*16 px"):
        model(images, torch.rand(4, 3, 20, 20), mask)


# ----------------------------------------------------------------------------------------------------
# Resume: bit-exact, after an exception or a SIGKILL
# ----------------------------------------------------------------------------------------------------

K = 3  # the interrupted leg stops after step K of a 2K-step schedule
RESUME = ["--max-steps", str(2 * K), "--save-every", "1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_dvae_ckpt):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(out, tiny_dvae_ckpt, *RESUME)
    return load(out / "checkpoint-latest.pth")


class Crash(Exception):
    pass


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, tiny_dvae_ckpt, uninterrupted,
                                                           monkeypatch, capsys):
    """--max-steps sets the schedule length, so the first leg must also be launched with 2K; it is
    stopped in-process by an exception right after its step-K checkpoint (a crash)."""
    real_save = training.save_checkpoint

    def save_then_crash(state, path, **kw):
        real_save(state, path, **kw)
        if state["step"] == K:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(training, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            run(tmp_path, tiny_dvae_ckpt, *RESUME)
    mid = load(tmp_path / "checkpoint-latest.pth")
    assert mid["step"] == K
    assert any(not torch.equal(mid["model"][n], uninterrupted["model"][n]) for n in mid["model"])

    capsys.readouterr()
    run(tmp_path, tiny_dvae_ckpt, *RESUME)  # the same command: resumes OUTPUT_DIR/checkpoint-latest.pth
    assert f"at step {K}" in capsys.readouterr().out
    assert_same_training_state(uninterrupted, load(tmp_path / "checkpoint-latest.pth"))
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 2 * K + 1))


# The killed leg runs pretrain.py's main in a child process whose checkpoint writes are slowed
# down (a slow disk), so the test can SIGKILL it part-way through the schedule.
SLOW_SAVE = """
import sys, time
import pretrain, training
real_save = training.save_checkpoint
def slow_save(state, path, **kw):
    real_save(state, path, **kw)
    time.sleep(0.5)
training.save_checkpoint = slow_save
pretrain.main(pretrain.get_args_parser().parse_args(sys.argv[1:]))
"""


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, tiny_dvae_ckpt, uninterrupted):
    ckpt_path = tmp_path / "checkpoint-latest.pth"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *flags(tmp_path, tiny_dvae_ckpt, *RESUME)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    step, deadline = 0, time.time() + 120
    try:
        while step < K and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if ckpt_path.is_file():
                step = load(ckpt_path)["step"]  # os.replace: always a complete file
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{err[-3000:]}"
    killed_at = load(ckpt_path)["step"]
    assert K <= killed_at < 2 * K

    run(tmp_path, tiny_dvae_ckpt, *RESUME)
    assert_same_training_state(uninterrupted, load(ckpt_path))


# The stopped leg runs through runs.run_script (the entry point that installs the signal handlers),
# its steps slowed down so the signal lands part-way through the schedule.
SLOW_STEP = """
import sys, time
import pretrain, runs
real_step = pretrain.train_step
def slow_step(*a, **k):
    time.sleep(0.2)
    return real_step(*a, **k)
pretrain.train_step = slow_step
sys.argv[0] = "pretrain.py"
runs.run_script(pretrain.main, pretrain.get_args_parser())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_it_lands_in_and_the_resume_equals_the_uninterrupted_run(
        tmp_path, tiny_dvae_ckpt, uninterrupted, sig):
    """SIGTERM (a scheduler) or Ctrl-C: the run saves a checkpoint at the end of the step in progress
    (not only the last --save-every one), says so in one line, exits 128 + the signal, and the same
    command resumes to the uninterrupted run's state."""
    ckpt_path, log_path = tmp_path / "checkpoint-latest.pth", tmp_path / "log.jsonl"
    # no checkpoint before the signal (--save-every is free to change on resume)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEP, *flags(tmp_path, tiny_dvae_ckpt, *RESUME),
                             "--save-every", "100"], cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None and not (
                log_path.is_file() and '"step": 1,' in log_path.read_text()):
            time.sleep(0.05)  # the run is past its first step
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    stopped = re.search(rf"pretrain.py: stopped by {signal.Signals(sig).name} at step ([0-9]+); ", err)
    assert stopped and "Traceback" not in err, err[-3000:]
    at = int(stopped.group(1))
    assert 1 <= at < 2 * K and load(ckpt_path)["step"] == at  # saved where it landed
    assert not (tmp_path / "run.lock").exists()

    run(tmp_path, tiny_dvae_ckpt, *RESUME)
    assert_same_training_state(uninterrupted, load(ckpt_path))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_saved_step(tmp_path, tiny_dvae_ckpt):
    """Under torchrun a SIGTERM that reaches one rank only (rank 1 here): the ranks agree on it in one
    collective, rank 0 saves the step, and every rank exits 143 instead of waiting at a collective."""
    from conftest import free_port
    script = tmp_path / "slow.py"
    script.write_text("import os\n" + SLOW_STEP.replace(
        "runs.run_script", "open(os.path.join(sys.argv[sys.argv.index('--output-dir') + 1], "
        "f\"pid-{os.environ['RANK']}\"), 'w').write(str(os.getpid()))\nruns.run_script"))
    out, port, procs = tmp_path / "out", str(free_port()), []
    out.mkdir()
    for rank in range(2):
        env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), *flags(out, tiny_dvae_ckpt, "--max-steps", "40",
                                                                          "--save-every", "100")],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "log.jsonl").is_file() and
                                              '"step": 2,' in (out / "log.jsonl").read_text()):
            time.sleep(0.05)
        os.kill(int((out / "pid-1").read_text()), signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    at = int(re.search(r"stopped by another rank's signal at step ([0-9]+);", errs[0]).group(1))
    assert 2 <= at < 40 and load(out / "checkpoint-latest.pth")["step"] == at
    assert "Traceback" not in errs[0] + errs[1]


def test_resume_refuses_another_arch_or_objective(tmp_path, tiny_dvae_ckpt, uninterrupted):
    saved = tmp_path / "other.pth"
    torch.save(uninterrupted, saved)
    for flag, value in (("--objective", "respix"), ("--arch", "vit_t")):
        with pytest.raises(ValueError, match=f"was trained with {flag} "):
            run(tmp_path / flag.strip("-"), tiny_dvae_ckpt, "--resume", str(saved), "--max-steps", "1",
                flag, value)


def test_resume_refuses_a_tokenizer_of_another_vocabulary(tmp_path, tiny_dvae_ckpt, uninterrupted):
    """A checkpoint whose generator predicts 64 codes cannot continue with a 32-code tokenizer."""
    other = tmp_path / "tok32"
    dvae.main(dvae.get_args_parser().parse_args(
        ["--preset", "small", "--n-hid", "8", "--vocab-size", "32", "--img-size", "16", "--batch-size", "16",
         "--num-workers", "0", "--device", "cpu", "--output-dir", str(other), "--max-steps", "1"]))
    saved = tmp_path / "other.pth"
    torch.save(uninterrupted, saved)
    with pytest.raises(ValueError, match="64-code tokenizer.*32 codes.*--dvae"):
        run(tmp_path / "out", str(other / "checkpoint-latest.pth"), "--resume", str(saved), "--max-steps", "1")


# ----------------------------------------------------------------------------------------------------
# Two processes (gloo): the replicas stay identical
# ----------------------------------------------------------------------------------------------------

# pretrain.main saves only rank 0's weights, so to compare the replicas this driver wraps
# pretrain.build_model to keep a handle on each process's model and, after main returns, every
# rank writes its own state_dict to OUTPUT_DIR/rank<R>.pth.
DDP_DRIVER = """
import os, sys, torch
import pretrain
built = []
real_build = pretrain.build_model
def build_model(*a):
    built.append(real_build(*a))
    return built[-1]
pretrain.build_model = build_model
args = pretrain.get_args_parser().parse_args(sys.argv[1:])
pretrain.main(args)
torch.save(built[0].state_dict(), os.path.join(args.output_dir, "rank%s.pth" % os.environ["RANK"]))
"""



def test_two_process_gloo_run_keeps_replicas_identical(tmp_path, tiny_dvae_ckpt):
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(driver),
           # --accum-iter 2: the first micro-batch runs under no_sync(), the second all-reduces
           *flags(out, tiny_dvae_ckpt, "--dist-backend", "gloo", "--max-steps", "2", "--accum-iter", "2")]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    r0, r1 = load(out / "rank0.pth"), load(out / "rank1.pth")
    ckpt = load(out / "checkpoint-latest.pth")
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG state, for resume
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # masks differ per rank
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
        assert torch.equal(r0[name], ckpt["model"][name]), name
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2]


# ----------------------------------------------------------------------------------------------------
# Precision, teaching and timing modes
# ----------------------------------------------------------------------------------------------------

def test_bf16_autocast_step_on_cpu(tmp_path, tiny_dvae_ckpt):
    run(tmp_path, tiny_dvae_ckpt, "--amp", "bf16", "--max-steps", "2")
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(records) == 2 and records[-1]["skipped"] == 0
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "loss_gen", "loss_enh"))
    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())


def test_explain_prints_every_stage_and_stops(tmp_path, tiny_dvae_ckpt, capsys):
    result = run(tmp_path, tiny_dvae_ckpt, "--explain")
    text = capsys.readouterr().out
    lines = text[text.index("one CIM step"):]
    stages = ("images", "mask", "tokens", "logits", "loss_gen", "mixed", "replaced", "corrupted",
              "enhancer backbone: features", "enhancer output", "loss_enh", "backward", "optimizer",
              "grad norm after clipping, generator")
    positions = [lines.index("  " + s) for s in stages]
    assert positions == sorted(positions)  # pipeline order, as CIM.forward runs it
    assert math.isfinite(result["loss"]) and result["applied"]
    assert not (tmp_path / "checkpoint-latest.pth").exists()  # nothing saved but the picture
    assert not (tmp_path / "log.jsonl").exists()
    # explain.png: one column per image (4), one named row per step, tiles scaled up to >= 96 px
    figure = Image.open(tmp_path / "explain.png")
    assert result["figure"] == str(tmp_path / "explain.png")
    k = 6  # 16 px tiles -> 96 px
    assert figure.height == len(pretrain.EXPLAIN_ROWS) * (16 * k + 2) + 2
    assert figure.width > 4 * (16 * k + 2) + 2  # plus the margin with the row names


def test_explain_without_a_tokenizer_starts_with_an_untrained_one(tmp_path, capsys):
    """A fresh checkout's `python pretrain.py --explain` must not train a tokenizer for minutes first:
    an untrained one of the recipe's kind stands in, and the output says so; once a trained one is
    cached in OUTPUT_DIR/tokenizer it is used instead."""
    argv = TINY[:-2] + ["--output-dir", str(tmp_path), "--device", "cpu", "--explain"]
    args = pretrain.get_args_parser().parse_args(argv)
    result = pretrain.main(args)
    text = capsys.readouterr().out
    assert "UNTRAINED kmeans tokenizer stands in" in text
    assert math.isfinite(result["loss"]) and (tmp_path / "explain.png").is_file()
    assert not (tmp_path / "tokenizer").exists()  # nothing was trained


def test_no_data_says_what_it_trains_and_where_the_paper_setting_is(tmp_path, tiny_dvae_ckpt, capsys):
    run(tmp_path, tiny_dvae_ckpt, "--arch", "vit_mini", "--explain")
    text = capsys.readouterr().out
    assert "no --data: vit_mini trains on the built-in procedural shapes at 16 px, patch 4 (4x4 tokens)" in text
    assert "--data /path/imagenet --dalle-encoder encoder.pkl --dalle-decoder decoder.pkl" in text


def test_tokenizer_dtype_follows_amp_unless_given(tiny_dvae_ckpt):
    assert tiny_model(tiny_dvae_ckpt)[1].tokenizer_dtype == torch.float32
    assert tiny_model(tiny_dvae_ckpt, "--amp", "bf16")[1].tokenizer_dtype == torch.bfloat16
    assert tiny_model(tiny_dvae_ckpt, "--amp", "bf16", "--tokenizer-dtype", "fp32")[1].tokenizer_dtype == torch.float32
    assert tiny_model(tiny_dvae_ckpt, "--tokenizer-dtype", "fp16")[1].tokenizer_dtype == torch.float16


def test_compile_with_accumulation_in_one_process(tmp_path, tiny_dvae_ckpt, monkeypatch):
    """--compile used to wrap the model in an OptimizedModule that train_step then took for DDP
    (AttributeError: no_sync). Compilation is in place now; the eager backend keeps the test fast."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: real_compile(*a, **dict(kw, backend="eager")))
    run(tmp_path, tiny_dvae_ckpt, "--compile", "--accum-iter", "2", "--max-steps", "2")
    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert ckpt["step"] == 2 and not any("_orig_mod" in k for k in ckpt["model"])


# ----------------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------------

def test_a_non_finite_step_is_skipped_and_counted(tmp_path, tiny_dvae_ckpt, monkeypatch, capsys):
    calls = []
    real_forward = pretrain.CIM.forward

    def forward(self, *a, **kw):
        loss, out = real_forward(self, *a, **kw)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), out  # step 2 goes non-finite

    monkeypatch.setattr(pretrain.CIM, "forward", forward)
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "4")
    assert "non-finite loss or gradients at step 2, update skipped (1 so far)" in capsys.readouterr().out
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [(r["step"], r["skipped"]) for r in records] == [(1, 0), (3, 1), (4, 1)]
    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert (ckpt["step"], ckpt["skipped"]) == (4, 1)
    assert all(s["step"].item() == 3 for s in ckpt["optimizer"]["state"].values())  # 3 real updates
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def nan_loss(monkeypatch):
    real_forward = pretrain.CIM.forward

    def forward(self, *a, **kw):
        loss, out = real_forward(self, *a, **kw)
        return loss * float("nan"), out

    monkeypatch.setattr(pretrain.CIM, "forward", forward)


def test_too_many_non_finite_losses_stop_the_run(tmp_path, tiny_dvae_ckpt, monkeypatch):
    nan_loss(monkeypatch)
    # every loss is NaN: with --max-skips 1 the second skip stops the run, naming its step
    with pytest.raises(FloatingPointError, match="2 non-finite steps, the last at step 2"):
        run(tmp_path / "a", tiny_dvae_ckpt, "--max-skips", "1", "--max-steps", "3")

    # below the limit the run finishes without ever applying an update
    initial = []
    real_build = pretrain.build_model

    def build_model(*a):
        model = real_build(*a)
        initial.append(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(pretrain, "build_model", build_model)
    run(tmp_path / "b", tiny_dvae_ckpt, "--max-steps", "3")
    ckpt = load(tmp_path / "b" / "checkpoint-latest.pth")
    assert (ckpt["step"], ckpt["skipped"]) == (3, 3) and ckpt["optimizer"]["state"] == {}
    assert all(torch.equal(t, initial[0][name]) for name, t in ckpt["model"].items())
    assert [r for r in read_log(tmp_path / "b") if "loss" in r] == []


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_finite_loss_with_non_finite_gradients_is_skipped(tmp_path, tiny_dvae_ckpt, monkeypatch, amp):
    """0 * sqrt(p - p) is 0 in the forward pass and NaN in the backward pass (0 * inf): the loss is
    finite, the gradients are not. AdamW must not step with them."""
    real_forward = pretrain.CIM.forward

    def forward(self, *a, **kw):
        loss, out = real_forward(self, *a, **kw)
        p = self.generator.lm_head.bias
        return loss + 0.0 * torch.sqrt((p - p.detach()).sum()), out

    monkeypatch.setattr(pretrain.CIM, "forward", forward)
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "2", "--amp", amp)
    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert (ckpt["step"], ckpt["skipped"]) == (2, 2) and ckpt["optimizer"]["state"] == {}
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_diverged_generator_is_skipped_not_a_sampling_crash(tmp_path, tiny_dvae_ckpt, capsys):
    """--lr 1e30 makes the generator's logits non-finite after the first update; torch.multinomial
    used to raise before the skip decision. Now every later step is skipped, then the run stops."""
    with pytest.raises(FloatingPointError, match="non-finite steps"):
        run(tmp_path, tiny_dvae_ckpt, "--lr", "1e30", "--max-steps", "6", "--max-skips", "2")
    assert "update skipped (2 so far)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, error, pattern", [
    (["--img-size", "30", "--patch-size", "4"], ValueError, r"--img-size 30 .*--patch-size 4"),
    (["--dalle-encoder", "encoder.pkl"], ValueError, r"--dalle-encoder and --dalle-decoder"),
    (["--dalle-encoder", "e.pkl", "--dalle-decoder", "d.pkl", "--dvae", "x.pth"], ValueError,
     r"either --dvae or --dalle-encoder"),
])
def test_bad_flags_are_named(tmp_path, extra, error, pattern):
    args = TINY + ["--output-dir", str(tmp_path), "--max-steps", "1"] + extra
    with pytest.raises(error, match=pattern):
        pretrain.main(pretrain.get_args_parser().parse_args(args))


def test_imagenet_recipe_without_a_tokenizer_is_named(tmp_path):
    (tmp_path / "imagenet" / "train" / "cls").mkdir(parents=True)
    args = TINY + ["--output-dir", str(tmp_path / "out"), "--data", str(tmp_path / "imagenet"),
                   "--recipe", "imagenet"]
    with pytest.raises(ValueError, match=r"recipe imagenet needs a tokenizer.*--dalle-encoder.*--dvae.*"
                                         r"--tokenizer kmeans"):
        pretrain.main(pretrain.get_args_parser().parse_args(args))


def image_folder(root, side, classes=2, n=4):
    """root/{train,val}/c{k}/{i}.png of side x side px, each class its own colour ramp."""
    from PIL import Image
    for split in ("train", "val"):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (side, side), (40 * i, 200 * k, 90)).save(folder / f"{i}.png")
    return str(root)


def test_recipe_follows_the_image_size_of_data(tmp_path):
    def recipe(root):
        return pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--data", root])).recipe

    assert recipe(image_folder(tmp_path / "small", data.PHOTOS_MAX_SIDE)) == "photos"
    assert recipe(image_folder(tmp_path / "large", data.PHOTOS_MAX_SIDE + 1)) == "imagenet"
    assert pretrain.resolve_args(pretrain.get_args_parser().parse_args([])).recipe == "builtin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none" / "train"))):
        recipe(str(tmp_path / "none"))


def test_tokenizer_small_trains_the_small_dvae_on_the_builtin_data_once(tmp_path, monkeypatch, capsys):
    calls, real_main = [], dvae.main

    def tiny_main(targs):  # the real training stage, shrunk to 2 steps of a tiny dVAE
        calls.append(targs)
        targs.n_hid, targs.vocab_size, targs.max_steps, targs.batch_size = 8, 64, 2, 8
        targs.num_workers, targs.warmup_steps = 0, 1
        return real_main(targs)

    monkeypatch.setattr(dvae, "main", tiny_main)
    args = TINY + ["--output-dir", str(tmp_path), "--max-steps", "1", "--tokenizer", "small"]
    for _ in range(2):
        pretrain.main(pretrain.get_args_parser().parse_args(args))
    assert len(calls) == 1  # the second run reuses the cached tokenizer
    targs = calls[0]
    assert (targs.preset, targs.data, targs.img_size, targs.output_dir) == \
        ("small", None, 16, str(tmp_path / "tokenizer"))  # grid 4 x f 4
    assert "fitting dvae.py --preset small on the built-in data first" in capsys.readouterr().out


def test_photos_recipe_fits_a_kmeans_tokenizer_on_the_data_and_trains(tmp_path, capsys):
    root = image_folder(tmp_path / "photos", 16, classes=2, n=20)  # 640 patches for 512 codes
    out = tmp_path / "out"
    args = TINY + ["--output-dir", str(out), "--data", root, "--max-steps", "2", "--knn-k", "3"]
    args[args.index("--batch-size") + 1] = "4"
    del args[args.index("--mask-ratio"):args.index("--mask-ratio") + 2]  # the recipe's
    stats = pretrain.main(pretrain.get_args_parser().parse_args(args))
    text = capsys.readouterr().out
    assert "recipe photos" in text and "fitting dvae.py --preset kmeans on " + root in text
    enc, dec = dvae.load_tokenizer(str(out / "tokenizer" / "checkpoint-latest.pth"))
    assert isinstance(enc, dvae.PatchEncoder) and (enc.downsample, enc.margin, enc.vocab_size) == (4, 0, 512)
    assert read_log(out)[-1]["steps"] == 2 and set(stats) >= {"knn_pretrained", "knn_random_init", "knn_raw_pixels",
                                                              "rank_pretrained", "rank_random_init"}
    assert 0 <= stats["knn_raw_pixels"] <= 100
    start = read_log(out)[0]
    assert start["step"] == 0 and 0 <= start["border_cue_auc"] <= 1
    assert f"border cue: pixel jumps across patch borders alone find the replaced tokens with ROC-AUC " \
           f"{start['border_cue_auc']:.3f} (local sharpness: {start['local_cue_auc']:.3f})" in text
    assert all(0 <= r["border_cue_auc"] <= 1 for r in read_log(out) if "revdet_auc" in r)
    assert [r["lr"] for r in read_log(out) if "lr" in r] == [1e-3, 1e-3]  # min-lr None: constant
    assert load(out / "checkpoint-latest.pth")["args"]["mask_ratio"] == 0.25
    # the same command again finds the finished run and the cached codebook: nothing is refitted
    pretrain.main(pretrain.get_args_parser().parse_args(args))
    assert "fitting" not in capsys.readouterr().out
    # and the codebook serves another run through --dvae
    pretrain.main(pretrain.get_args_parser().parse_args(
        args + ["--output-dir", str(tmp_path / "out2"), "--dvae", str(out / "tokenizer" / "checkpoint-latest.pth")]))
    assert read_log(tmp_path / "out2")[-1]["steps"] == 2


def test_missing_tokenizer_checkpoint_is_named(tmp_path):
    missing = tmp_path / "tok.pth"
    args = TINY + ["--output-dir", str(tmp_path / "out"), "--dvae", str(missing), "--max-steps", "1"]
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        pretrain.main(pretrain.get_args_parser().parse_args(args))


def train_only_folder(root, n):
    """root/train/cls/{0..n-1}.png, 24 px, and no val/ split."""
    from PIL import Image
    folder = root / "train" / "cls"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (24, 24), (10 * i, 90, 30)).save(folder / f"{i}.png")
    return str(root)


def test_image_folder_smaller_than_a_batch_is_named(tmp_path, tiny_dvae_ckpt):
    train_only_folder(tmp_path / "imgs", 3)
    with pytest.raises(ValueError, match=r"training set \(3 images\) is smaller than one step"):
        run(tmp_path / "out", tiny_dvae_ckpt, "--data", str(tmp_path / "imgs"), "--max-steps", "1")


def test_fp16_step_with_grad_scaler_on_cpu(tmp_path, tiny_dvae_ckpt):
    """--amp fp16 goes through torch.amp.GradScaler (scale, unscale before clipping, step, update);
    the scaler's state is checkpointed for resume."""
    run(tmp_path, tiny_dvae_ckpt, "--amp", "fp16", "--max-steps", "2")
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    scaler = load(tmp_path / "checkpoint-latest.pth")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler  # an enabled scaler's state


# ----------------------------------------------------------------------------------------------------
# Flags: checked at start; a resume must be the same command
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, pattern", [
    (["--accum-iter", "-1"], r"--accum-iter: must be a number > 0, got -1"),   # used to hang
    (["--accum-iter", "0"], r"--accum-iter: must be a number > 0, got 0"),     # ZeroDivisionError
    (["--save-every", "0"], r"--save-every: must be a number > 0"),            # ZeroDivisionError
    (["--epochs", "0"], r"--epochs: must be a number > 0"),                    # 0 steps, untrained export
    (["--max-steps", "-3"], r"--max-steps: must be a number > 0"),
    (["--lr", "0"], r"--lr: must be a number > 0"),                            # silently replaced
    (["--blr", "nan"], r"--blr: must be a number > 0, got nan"),
    (["--mask-ratio", "1"], r"--mask-ratio: must be a number in \(0, 1\), got 1"),
    (["--temperature", "0"], r"--temperature: must be a number > 0"),
    (["--enh-weight", "nan"], r"--enh-weight: must be a number >= 0"),
    (["--drop-path", "1"], r"--drop-path: must be a number in \[0, 1\)"),
    (["--crop-min", "0"], r"--crop-min: must be a number in \(0, 1\]"),
    (["--opt-betas", "0.9", "1.0"], r"--opt-betas: must be a number in \[0, 1\), got 1.0"),
    (["--num-workers", "-1"], r"--num-workers: must be a number >= 0"),
    (["--min-tokenizer-perplexity", "-1"], r"--min-tokenizer-perplexity: must be a number >= 0"),
    (["--batch-size", "8.5"], r"--batch-size: expected a whole number, got '8.5'"),
    (["--arch", "vit_x"], r"--arch: invalid choice: 'vit_x'"),
])
def test_numeric_flags_are_checked_before_any_work(tmp_path, extra, pattern, capsys):
    args = TINY + ["--output-dir", str(tmp_path), "--dvae", str(tmp_path / "never_read.pth")] + extra
    err = refused(pretrain.get_args_parser(), args, capsys)
    assert re.search(r"^pretrain\.py: error: argument " + pattern, err), err
    assert not os.listdir(tmp_path)  # stopped before writing anything


def test_an_explicit_lr_is_used_as_given(tmp_path, tiny_dvae_ckpt):
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "1", "--lr", "3e-4")
    assert read_log(tmp_path)[1]["lr"] == pytest.approx(3e-4)


def test_resume_with_other_flags_is_refused_naming_each(tmp_path, tiny_dvae_ckpt, capsys):
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "2")
    before = load(tmp_path / "checkpoint-latest.pth")
    changed = ("--batch-size", "4", "--mask-ratio", "0.3", "--temperature", "2", "--seed", "1")
    with pytest.raises(ValueError, match=r"--batch-size 8 -> 4; --mask-ratio 0.5 -> 0.3; --seed 0 -> 1; "
                                         r"--temperature 1.0 -> 2.0\).*--allow-flag-changes"):
        run(tmp_path, tiny_dvae_ckpt, "--max-steps", "2", *changed)
    after = load(tmp_path / "checkpoint-latest.pth")
    assert after["args"] == before["args"]  # nothing overwritten
    # flags that only say where and how often things are written may change
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "2", "--log-every", "5", "--num-workers", "1")
    # explicitly allowed: continues from step 2 with the new flags
    capsys.readouterr()
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "3", "--mask-ratio", "0.3", "--allow-flag-changes")
    assert "at step 2 with changed flags: --mask-ratio, --max-steps" in capsys.readouterr().out
    assert load(tmp_path / "checkpoint-latest.pth")["args"]["mask_ratio"] == 0.3


def test_log_holds_each_step_once_after_a_resume(tmp_path, tiny_dvae_ckpt, monkeypatch):
    """The crashed leg logged steps 1..3 but checkpointed at 2: the resumed run must not append a
    second step-3 line (it re-runs step 3 from the step-2 state)."""
    real_write = training.JsonLog.write

    def write_then_crash(self, **rec):
        real_write(self, **rec)
        if rec.get("step") == 3:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(training.JsonLog, "write", write_then_crash)
        with pytest.raises(Crash):
            run(tmp_path, tiny_dvae_ckpt, "--max-steps", "5", "--save-every", "2")
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3]
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "5", "--save-every", "2")
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in read_log(tmp_path) if "tokenizer_perplexity" in r] == [0]


def test_missing_val_split_stops_before_training(tmp_path, tiny_dvae_ckpt):
    train_only_folder(tmp_path / "imgs", 16)
    with pytest.raises(FileNotFoundError, match=r"no val/ split.*--knn-k 0"):
        run(tmp_path / "out", tiny_dvae_ckpt, "--data", str(tmp_path / "imgs"), "--knn-k", "5")
    assert not (tmp_path / "out" / "checkpoint-latest.pth").exists()
    # without the k-NN check, a folder with train/ only is fine
    run(tmp_path / "out", tiny_dvae_ckpt, "--data", str(tmp_path / "imgs"), "--max-steps", "1")


def collapsed_tokenizer(tmp_path, tiny_dvae_ckpt, codes):
    """The session tokenizer with its logit layer's bias forcing `codes` codes: the argmax is then
    one of them everywhere."""
    ckpt = load(tiny_dvae_ckpt)
    bias = ckpt["encoder"]["blocks.output.conv.b"]
    bias.fill_(-1e4)
    bias[:codes] = 1e4
    path = tmp_path / f"collapsed{codes}.pth"
    torch.save(ckpt, path)
    return str(path)


def test_collapsed_tokenizer_stops_the_run_unless_overridden(tmp_path, tiny_dvae_ckpt):
    path = collapsed_tokenizer(tmp_path, tiny_dvae_ckpt, 1)
    args = flags(tmp_path / "a", path, "--max-steps", "1")
    args[args.index("--min-tokenizer-perplexity") + 1] = "4"
    with pytest.raises(ValueError, match=r"tokenizer .*collapsed0?.*collapsed: code perplexity 1.0 \(of 64 "
                                         r"codes, 1.6% in use\).*--min-tokenizer-perplexity 4"):
        pretrain.main(pretrain.get_args_parser().parse_args(args))
    assert not (tmp_path / "a" / "checkpoint-latest.pth").exists()
    run(tmp_path / "b", path, "--max-steps", "1")  # TINY passes --min-tokenizer-perplexity 0
    assert read_log(tmp_path / "b")[0] == {"step": 0, "tokenizer_perplexity": 1.0,
                                           "tokenizer_usage": 1 / 64}


class ValueCoder(torch.nn.Module):
    """Stand-in encoder: code k for an image of value k/3 (four codes of 64)."""
    vocab_size, downsample = 64, 4

    def forward(self, x):  # x went through dvae.map_pixels: [0, 1] -> [0.1, 0.9]
        code = ((x[:, 0, ::4, ::4] - 0.1) / 0.8 * 3).round().long()      # (B, h, w)
        return torch.nn.functional.one_hot(code, 64).permute(0, 3, 1, 2).float()


class Blocks(torch.utils.data.Dataset):
    """1000 images in 4 contiguous blocks of one value each: ((view, tokenizer view), label)."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        return (torch.zeros(3, 16, 16), torch.full((3, 16, 16), (i // 250) / 3)), 0


def test_usage_check_measures_perplexity_over_spread_images():
    """The first 64 images would all be of block 0 (perplexity 1): the check samples the whole set."""
    codes = pretrain.tokenizer_sample(ValueCoder(), Blocks(), torch.device("cpu"), n=64)
    stats = pretrain.check_tokenizer_usage(codes, 64, floor=0)
    assert stats["tokenizer_usage"] == 4 / 64
    assert 3.95 < stats["tokenizer_perplexity"] <= 4.0
    with pytest.raises(ValueError, match="perplexity 4.0 .*below --min-tokenizer-perplexity 5"):
        pretrain.check_tokenizer_usage(codes, 64, floor=5)


def test_binary_auc_is_the_pairwise_probability_with_ties_counted_half():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 4, (60,), generator=g).float()  # many ties
        labels = torch.rand(60, generator=g) < 0.3
        pos, neg = scores[labels], scores[~labels]
        pairs = (pos[:, None] > neg).double() + 0.5 * (pos[:, None] == neg).double()
        assert pretrain.binary_auc(scores, labels) == pytest.approx(pairs.mean().item(), abs=1e-12)
    # all tied: 0.5 whatever the label order (the plain rank sum gave 0.25 / 0.75 / 1.0)
    for labels in ([1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]):
        assert pretrain.binary_auc(torch.zeros(4), torch.tensor(labels)) == 0.5
    assert pretrain.binary_auc(torch.rand(5), torch.ones(5)) is None


def smooth_images(B=64, S=32):
    """Smooth random images (a coarse noise map upsampled): neighbouring pixels are close."""
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(B, 3, 4, 4, generator=g), size=(S, S), mode="bilinear", align_corners=False)


def test_border_cue_is_chance_on_a_corruption_that_changes_nothing():
    images = smooth_images()
    replaced = gen.random_masking(64, 64, 0.25, generator=torch.Generator().manual_seed(1))
    assert abs(pretrain.border_cue_auc(images, replaced, 4) - 0.5) < 0.03


def test_border_cue_finds_pasted_flat_patches():
    images = smooth_images()
    replaced = gen.random_masking(64, 64, 0.25, generator=torch.Generator().manual_seed(1))  # (B, N)
    colour = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cells = replaced.view(64, 1, 8, 8).float()
    pasted = lambda x: x.repeat_interleave(4, 2).repeat_interleave(4, 3)  # noqa: E731  (8x8 -> 32x32, blocky)
    blocky = images * (1 - pasted(cells)) + pasted(colour * cells)
    assert pretrain.border_cue_auc(blocky, replaced, 4) > 0.93  # kept neighbours share a jumping border
    assert pretrain.border_jumps(blocky, 4).shape == (64, 8, 8)
    assert pretrain.local_cue_auc(blocky, replaced, 4) > 0.8
    assert abs(pretrain.local_cue_auc(images, replaced, 4) - 0.5) < 0.05  # nothing changed: max of 3 near 0.5
    assert pretrain.border_cue_auc(blocky, replaced, 32) is None  # one patch: no borders


def test_the_start_check_reads_the_recipes_tokenizers():
    """check_border_cue on flat images (one code each) re-drawn from 64 flat colours: a pasted codebook
    (margin 0) puts every jump on a replaced cell's borders; overlap-added with a 2 px margin, a
    replaced cell moves its whole footprint alike and its borders show nothing."""
    args = pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--recipe", "builtin", "--data", "x"]))
    g = torch.Generator().manual_seed(0)
    flat = torch.rand(64, 3, generator=g)
    codes = torch.randint(64, (128, 1, 1), generator=g).expand(128, 8, 8)
    pasted = dvae.build_patch_tokenizer(flat.repeat_interleave(16, 1), 4)[1]
    blended = dvae.build_patch_tokenizer(flat.repeat_interleave(64, 1), 4, 2)[1]
    hard, soft = (pretrain.check_border_cue(codes, d, args) for d in (pasted, blended))
    assert hard["border_cue_auc"] > 0.95 and soft["border_cue_auc"] < 0.6
    # the local detector sees the blended footprint's edges, 2 px into the neighbours, from a ring of 2 px
    assert hard["local_cue_auc"] > 0.9 and soft["local_cue_auc"] > 0.7
    assert pretrain.check_border_cue(codes[:, :4, :4], pasted, args) == {}  # a grid the model refuses later


def test_beit_masks_blockwise_at_its_own_ratio_and_the_min_block_scales_with_the_grid():
    parse = lambda *a: pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--recipe", "builtin", "--data", "x", *a]))  # noqa: E731
    cim, beit = parse(), parse("--method", "beit")
    assert (cim.mask_type, cim.mask_ratio, cim.mask_min_patches) == ("random", 0.25, 5)  # 16 * 64 / 196
    assert (beit.mask_type, beit.mask_ratio) == ("block", 75 / 196)
    assert parse("--method", "beit", "--mask-ratio", "0.5", "--mask-type", "random").mask_type == "random"
    assert parse("--img-size", "224", "--patch-size", "16").mask_min_patches == 16   # BEiT's own grid
    assert parse("--mask-min-patches", "3").mask_min_patches == 3
    photos = pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--recipe", "photos", "--method", "beit"]))
    assert (photos.mask_type, photos.mask_ratio, photos.mask_min_patches) == ("block", 0.5, 5)  # chosen on select
    assert parse("--recipe", "photos", "--method", "beit", "--mask-ratio", "0.4").mask_ratio == 0.4


def test_help_shows_each_recipe_and_the_run_prints_its_recipe(tmp_path, tiny_dvae_ckpt, capsys):
    text = " ".join(pretrain.get_args_parser().format_help().split())
    assert "[recipe: builtin vit_mini, photos vit_mini, imagenet vit_b]" in text
    assert "[recipe: builtin [0.9, 0.98], photos [0.9, 0.98], imagenet [0.9, 0.999]]" in text
    assert "[recipe: builtin 0.0, photos 0.0, imagenet 0.4]" in text  # colour jitter
    assert "[recipe: builtin kmeans, photos kmeans, imagenet None]" in text  # tokenizer
    assert "[recipe: builtin 0.25, photos 0.25, imagenet 0.5]" in text  # mask ratio
    imagenet = pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--data", "x", "--recipe",
                                                                            "imagenet"]))
    assert (imagenet.recipe, imagenet.arch, imagenet.opt_betas, imagenet.color_jitter) == \
        ("imagenet", "vit_b", [0.9, 0.999], 0.4)
    builtin = pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--recipe", "builtin",
                                                                           "--data", "x"]))
    assert (builtin.recipe, builtin.arch, builtin.img_size) == ("builtin", "vit_mini", 32)
    run(tmp_path, tiny_dvae_ckpt, "--max-steps", "1")
    assert "recipe builtin" in capsys.readouterr().out


def test_knn_every_logs_the_curve_and_leaves_training_unchanged(tmp_path, tiny_dvae_ckpt):
    root = image_folder(tmp_path / "photos", 16, classes=2, n=12)
    common = ["--data", root, "--max-steps", "4", "--knn-k", "3"]
    run(tmp_path / "plain", tiny_dvae_ckpt, *common)
    run(tmp_path / "curve", tiny_dvae_ckpt, *common, "--knn-every", "2")
    curve = [r for r in read_log(tmp_path / "curve") if "knn" in r]
    assert [r["step"] for r in curve] == [0, 2]  # the end is the final check's knn_pretrained
    assert all(0 <= r["knn"] <= 100 and r["feature_rank"] >= 1 for r in curve)
    assert not any("knn" in r for r in read_log(tmp_path / "plain"))
    # the evaluations draw no random numbers the run depends on: the same weights, step for step
    assert_same_training_state(load(tmp_path / "plain" / "checkpoint-latest.pth"),
                               load(tmp_path / "curve" / "checkpoint-latest.pth"))
    assert read_log(tmp_path / "plain")[-1]["knn_pretrained"] == read_log(tmp_path / "curve")[-1]["knn_pretrained"]


def test_knn_blocks_logs_a_curve_per_stage_and_leaves_training_unchanged(tmp_path, tiny_dvae_ckpt):
    """--knn-blocks: every check also reads each ResNet stage; the last stage's pooled map is what the
    plain check reads, so the two agree, and the extra pass changes no weight."""
    root = image_folder(tmp_path / "photos", 16, classes=2, n=12)
    common = ["--data", root, "--max-steps", "4", "--knn-k", "3", "--arch", "resnet18", "--resnet-stem", "small",
              "--knn-every", "2"]
    run(tmp_path / "plain", tiny_dvae_ckpt, *common)
    run(tmp_path / "stages", tiny_dvae_ckpt, *common, "--knn-blocks")
    curve = [r for r in read_log(tmp_path / "stages") if "knn" in r]
    assert [r["step"] for r in curve] == [0, 2]
    assert all(len(r["knn_stages"]) == 4 and r["knn_stages"][-1] == pytest.approx(r["knn"]) for r in curve)
    assert not any("knn_stages" in r for r in read_log(tmp_path / "plain"))
    last = read_log(tmp_path / "stages")[-1]
    assert last["knn_stages"][-1] == pytest.approx(last["knn_pretrained"]) and "knn_blocks" not in last
    assert_same_training_state(load(tmp_path / "plain" / "checkpoint-latest.pth"),
                               load(tmp_path / "stages" / "checkpoint-latest.pth"))


def test_knn_blocks_of_a_vit_reads_each_block(tmp_path, tiny_dvae_ckpt):
    root = image_folder(tmp_path / "photos", 16, classes=2, n=12)
    result = run(tmp_path, tiny_dvae_ckpt, "--data", root, "--max-steps", "1", "--knn-k", "3", "--knn-blocks")
    assert len(result["knn_blocks"]) == 6 and "knn_stages" not in result  # vit_mini's 6 blocks


def test_head_width_puts_a_conv_layer_before_the_resnet_detector(tiny_dvae_ckpt):
    _, plain, _ = tiny_model(tiny_dvae_ckpt, "--arch", "resnet18", "--resnet-stem", "small")
    args, wide, _ = tiny_model(tiny_dvae_ckpt, "--arch", "resnet18", "--resnet-stem", "small",
                               "--head-width", "24")
    head = wide.enhancer.head
    assert isinstance(plain.enhancer.head.hidden, torch.nn.Identity)
    conv, bn, relu = head.hidden
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, bn.num_features) == (512, 24, (3, 3), 24)
    assert (head.proj.in_channels, head.proj.out_channels) == (24, 4)  # 2x2 tokens per cell of the stride-8 map
    images, tok_images, mask = batch()
    fmap = wide.enhancer.backbone(images)
    assert head(fmap).shape == plain.enhancer.head(fmap).shape == (4, 16)
    out, loss, _ = wide.enhancer(images, None, mask)
    loss.backward()
    assert conv.weight.grad.abs().sum() > 0 and out.shape == (4, 16)


@pytest.mark.parametrize("extra", [[], ["--method", "beit"], ["--arch", "resnet18", "--objective", "respix"]])
@pytest.mark.parametrize("flag", [["--head-width", "8"], ["--head-stages", "2"]])
def test_head_flags_without_a_resnet_revdet_head_are_refused(tmp_path, tiny_dvae_ckpt, extra, flag):
    with pytest.raises(ValueError, match=f"{flag[0]} shapes a ResNet's RevDet head.*drop the flag"):
        run(tmp_path, tiny_dvae_ckpt, *flag, "--max-steps", "1", *extra)
    assert not os.listdir(tmp_path)


def test_head_stages_sums_a_detector_on_each_of_the_last_stages(tiny_dvae_ckpt):
    """--head-stages 2 on the small stem at 16 px with 4 px tokens: the last stage (stride 8, a 2x2 map)
    gives 2x2 logits per cell as before, stage 3 (stride 4, a 4x4 map of 256 channels) one per cell; the
    logits are their sum, and the loss trains both stages through the head."""
    _, plain, _ = tiny_model(tiny_dvae_ckpt, "--arch", "resnet18", "--resnet-stem", "small")
    _, two, _ = tiny_model(tiny_dvae_ckpt, "--arch", "resnet18", "--resnet-stem", "small", "--head-stages", "2")
    head, backbone = two.enhancer.head, two.enhancer.backbone
    assert len(plain.enhancer.head.earlier) == 0 and len(head.earlier) == 1
    (conv,) = head.earlier
    assert (conv.in_channels, conv.out_channels, head.proj.out_channels) == (256, 1, 4)
    images, _, mask = batch()
    stage3, stage4 = backbone.get_layer_outputs(images, (3, 4))
    expected = F.pixel_shuffle(head.proj(stage4), 2) + conv(stage3)  # (B, 1, 4, 4): one logit per token
    out, loss, _ = two.enhancer(images, None, mask)
    torch.testing.assert_close(out, expected.flatten(1))
    loss.backward()
    assert conv.weight.grad.abs().sum() > 0 and backbone.layer3[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("stages, message", [(5, "stages 1..4"),
                                             (3, "stride 2 of ResNet stage 2.*lower --head-stages")])
def test_head_stages_the_token_grid_cannot_take_are_refused(tmp_path, tiny_dvae_ckpt, stages, message):
    with pytest.raises(ValueError, match=message):
        run(tmp_path, tiny_dvae_ckpt, "--arch", "resnet18", "--resnet-stem", "small", "--head-stages", str(stages),
            "--max-steps", "1")


def test_beit_baseline_trains_the_enhancer_backbone_by_masked_image_modelling(tmp_path, tiny_dvae_ckpt):
    """--method beit: the same backbone, data, tokenizer and masks, no generator; its export is an
    ordinary backbone.pth (finetune.py reads it as the same arch)."""
    run(tmp_path, tiny_dvae_ckpt, "--method", "beit", "--max-steps", "3")
    ckpt = load(tmp_path / "checkpoint-latest.pth")
    assert not any(k.startswith(("generator.", "enhancer.")) for k in ckpt["model"])
    assert {"mask_token", "lm_head.weight", "backbone.pos_embed"} <= set(ckpt["model"])
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert len(records) == 3 and all(math.isfinite(r["loss_gen"]) for r in records)
    assert all(r["loss"] == r["loss_gen"] and "loss_enh" not in r for r in records)
    exported = load(tmp_path / "backbone.pth")
    assert exported["arch"] == "vit_mini"
    for k, v in exported["model"].items():
        assert torch.equal(v, ckpt["model"]["backbone." + k]), k
    backbone, config = enh.load_backbone(str(tmp_path / "backbone.pth"))
    assert config["arch"] == "vit_mini" and config["img_size"] == 16


def test_beit_baseline_needs_a_vit(tmp_path, tiny_dvae_ckpt):
    with pytest.raises(ValueError, match="--method beit needs a ViT --arch, not resnet18"):
        run(tmp_path, tiny_dvae_ckpt, "--method", "beit", "--arch", "resnet18")


def test_the_photos_recipe_gives_a_resnet_the_small_stem(tmp_path, tiny_dvae_ckpt):
    root = image_folder(tmp_path / "photos", 16, classes=2, n=12)
    run(tmp_path / "out", tiny_dvae_ckpt, "--data", root, "--arch", "resnet18", "--max-steps", "1",
        "--knn-k", "2")
    exported = load(tmp_path / "out" / "backbone.pth")
    assert exported["model"]["conv1.weight"].shape == (64, 3, 3, 3)
    assert exported["args"]["resnet_stem"] == "small" and exported["args"]["recipe"] == "photos"
    assert exported["args"]["epochs"] == pretrain.PHOTOS_RESNET_EPOCHS == 6  # chosen on the selection split
    assert exported["args"]["head_stages"] == pretrain.PHOTOS_RESNET_HEAD_STAGES == 2  # so was its head
    # a run from before --head-stages (no such key) had the 1x1 alone: resuming it under this head is refused
    ckpt = load(tmp_path / "out" / "checkpoint-latest.pth")
    del ckpt["args"]["head_stages"]
    torch.save(ckpt, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="was trained with --head-stages 1, this run has 2"):
        run(tmp_path / "resumed", tiny_dvae_ckpt, "--data", root, "--arch", "resnet18", "--max-steps", "2",
            "--knn-k", "2", "--resume", str(tmp_path / "old.pth"))


def test_the_photos_recipe_gives_a_resnets_revdet_head_two_stages_unless_told(tmp_path):
    root = image_folder(tmp_path / "photos", 16)

    def head_stages(*argv):
        return pretrain.resolve_args(pretrain.get_args_parser().parse_args(argv)).head_stages

    assert head_stages("--data", root, "--arch", "resnet18") == head_stages("--data", root, "--arch", "resnet50") == 2
    assert head_stages("--data", root, "--arch", "resnet18", "--head-stages", "1") == 1  # the paper's head
    assert head_stages("--data", root, "--arch", "resnet18", "--objective", "respix") == 1  # no RevDet head
    assert head_stages("--data", root) == head_stages("--data", root, "--head-stages", "1") == 1  # a ViT
    assert head_stages("--arch", "resnet18") == head_stages("--recipe", "imagenet", "--arch", "resnet50") == 1


def test_the_photos_recipe_trains_a_resnet_for_fewer_epochs_unless_told(tmp_path):
    root = image_folder(tmp_path / "photos", 16)

    def epochs(*argv):
        return pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--data", root, *argv])).epochs

    assert epochs("--arch", "resnet18") == 6 and epochs("--arch", "resnet50") == 6
    assert epochs() == epochs("--arch", "vit_mini") == pretrain.RECIPES["photos"]["epochs"] == 60
    assert epochs("--arch", "resnet18", "--epochs", "7") == 7
    assert pretrain.resolve_args(pretrain.get_args_parser().parse_args(["--arch", "resnet18"])).epochs == 4  # builtin
