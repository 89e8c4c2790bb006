"""Tests for dvae.py's training script (`main`) and the training helpers pretrain.py, finetune.py and
segment.py reuse: real steps on the built-in data, exact resume, the tokenizer checkpoint format,
bad inputs, the lr schedule and crash-safe checkpoints. Tiny config: 16 px, 4 x 4 tokens of 64
codes, n_hid 8 (about 20 ms a step on one CPU thread)."""
import copy
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data
import dvae
import training
from conftest import TINY_DVAE, refused, subprocess_env, torchrun
from test_finetune import image_folder


def dvae_args(out, *extra):
    return dvae.get_args_parser().parse_args(TINY_DVAE + ["--output-dir", str(out), *extra])


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


class Crash(Exception):
    """Stands in for a killed job: raised right after the checkpoint of a chosen step is written."""


def crash_after_checkpoint(monkeypatch, module, at_step):
    real = module.save_checkpoint

    def save_then_crash(state, path, **kw):
        real(state, path)
        if state["step"] >= at_step:
            raise Crash(f"simulated crash after the step-{state['step']} checkpoint")

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)


def record_models(monkeypatch):
    """Make dvae.main's DVAE(...) keep a reference (and an untrained copy) we can inspect."""
    built = []

    class RecordingDVAE(dvae.DVAE):
        def __init__(self, encoder, decoder):
            super().__init__(encoder, decoder)
            self.initial = copy.deepcopy((encoder, decoder))
            built.append(self)

    monkeypatch.setattr(dvae, "DVAE", RecordingDVAE)
    return built


def val_loader():
    """The validation batches dvae.main evaluates on (same transform, order and batch size)."""
    val_set = data.build_dataset(None, "val", data.EvalTransform(16, crop_pct=1.0, normalized=False))
    return data.build_loader(val_set, 16, 0, shuffle=False, drop_last=False)[0]


# ----------------------------------------------------------------------------------------------------
# A real run: it learns, and writes what pretrain.py reads
# ----------------------------------------------------------------------------------------------------

def test_training_learns_and_writes_a_loadable_tokenizer(tmp_path, monkeypatch):
    built = record_models(monkeypatch)
    steps = 100
    stats = dvae.main(dvae_args(tmp_path, "--max-steps", str(steps), "--lr", "1e-2",
                                "--warmup-steps", "5", "--log-every", "1"))
    (model,) = built

    # Hard-token reconstruction on fixed validation batches: the trained tokenizer beats its own
    # initialisation (measured for seeds 0-2: 0.066 -> 0.048-0.052).
    before = dvae.evaluate_tokenizer(*model.initial, val_loader(), torch.device("cpu"))
    assert stats["val_recon_mse"] < 0.9 * before["val_recon_mse"], (before, stats)
    assert stats["val_perplexity"] > 1 and stats["step"] == steps

    # The logged training loss falls too (per-batch values are noisy: compare means of 20 steps;
    # measured ratio about 0.8)
    log = read_log(tmp_path)
    assert [r["step"] for r in log[:-1]] == list(range(1, steps + 1))
    first, last = (sum(r["recon"] for r in part) / len(part) for part in (log[:20], log[-21:-1]))
    assert last < 0.95 * first, (first, last)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["recon"], r["kl"]])).all() for r in log[:-1])
    assert log[-2]["perplexity"] > 1  # the last training batch uses more than one code
    assert log[-2]["temperature"] == pytest.approx(1 / 16, rel=0.2)  # annealed by the end

    pngs = sorted(p.name for p in tmp_path.glob("recon-*.png"))
    assert pngs == [f"recon-{steps:06d}.png"]
    assert Image.open(tmp_path / pngs[0]).height == 2 * (96 + 2) + 2  # 16 px images shown at 96 px
    with Image.open(tmp_path / pngs[0]) as im:
        assert im.size[0] > im.size[1] > 16  # 16 images wide, originals above reconstructions

    ckpt = torch.load(tmp_path / "checkpoint-latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == ckpt["total_steps"] == steps
    assert ckpt["encoder_config"] == dvae.dvae_config(model.encoder)
    assert ckpt["decoder_config"] == dvae.dvae_config(model.decoder)
    assert ckpt["encoder_config"]["vocab_size"] == 64 and ckpt["encoder_config"]["n_hid"] == 8
    for name, module in (("encoder", model.encoder), ("decoder", model.decoder)):
        sd = module.state_dict()
        assert ckpt[name].keys() == sd.keys()
        assert all(torch.equal(ckpt[name][k], sd[k]) for k in sd)

    enc, dec = dvae.load_tokenizer(str(tmp_path / "checkpoint-latest.pth"))
    assert not enc.training and not dec.training
    assert not any(p.requires_grad for p in [*enc.parameters(), *dec.parameters()])
    x = next(iter(val_loader()))[0]
    tokens = dvae.tokenize(enc, x)
    assert tokens.shape == (16, 4, 4)
    assert torch.equal(tokens, dvae.tokenize(model.encoder.eval(), x))
    assert torch.equal(dvae.decode(dec, tokens), dvae.decode(model.decoder.eval(), tokens))


# ----------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------

def test_kmeans_preset_fits_saves_reuses_and_refuses_dvae_flags(tmp_path, capsys):
    photos = image_folder(tmp_path / "photos", n_train=(12, 12))  # 24 images of 16 patches for 16 codes
    args = ["--preset", "kmeans", "--vocab-size", "16", "--img-size", "16", "--batch-size", "16",
            "--device", "cpu", "--output-dir", str(tmp_path), "--data", str(photos)]
    stats = dvae.main(dvae.get_args_parser().parse_args(args))
    assert stats["val_recon_mse"] < 0.05 and stats["val_perplexity"] > 4 and stats["step"] == 25
    enc, dec = dvae.load_tokenizer(str(tmp_path / "checkpoint-latest.pth"))
    assert (type(enc), type(dec), enc.vocab_size, enc.downsample) == (dvae.PatchEncoder, dvae.PatchDecoder, 16, 4)
    assert os.path.isfile(tmp_path / "recon-000025.png") and read_log(tmp_path)[-1]["step"] == 25
    saved = os.path.getmtime(tmp_path / "checkpoint-latest.pth")
    assert dvae.main(dvae.get_args_parser().parse_args(args))["val_recon_mse"] == stats["val_recon_mse"]
    assert os.path.getmtime(tmp_path / "checkpoint-latest.pth") == saved  # reused, not refitted
    with pytest.raises(ValueError, match=r"other flags \(--kmeans-iters None -> 30\)"):
        dvae.main(dvae.get_args_parser().parse_args(args + ["--kmeans-iters", "30"]))
    refit = dvae.main(dvae.get_args_parser().parse_args(args + ["--kmeans-iters", "30", "--allow-flag-changes"]))
    assert refit["step"] == 30 and training.load_checkpoint(str(tmp_path / "checkpoint-latest.pth"))["step"] == 30
    with pytest.raises(ValueError, match="--preset kmeans takes no --n-hid, --lr"):
        dvae.main(dvae.get_args_parser().parse_args(args + ["--n-hid", "8", "--lr", "1e-3"]))
    with pytest.raises(ValueError, match="--preset small takes no --patch-size"):
        dvae.main(dvae.get_args_parser().parse_args(TINY_DVAE + ["--patch-size", "4"]))


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """Data order and augmentation are functions of (seed, epoch, index) and the checkpoint holds
    the optimiser and every RNG stream (Gumbel noise), so stopping at step k and resuming is
    bit-identical to never stopping. Both legs use the same --max-steps: it sets the temperature,
    KL and lr schedules, so a run launched with --max-steps k is a different run (see the next test)."""
    k = 4
    flags = ["--max-steps", str(2 * k), "--save-every", "1", "--log-every", "1", "--lr", "1e-2",
             "--warmup-steps", "2"]
    dvae.main(dvae_args(tmp_path / "a", *flags))

    with monkeypatch.context() as m:
        crash_after_checkpoint(m, training, k)
        with pytest.raises(Crash):
            dvae.main(dvae_args(tmp_path / "b", *flags))
    mid = torch.load(tmp_path / "b" / "checkpoint-latest.pth", weights_only=True)
    assert mid["step"] == k
    capsys.readouterr()
    dvae.main(dvae_args(tmp_path / "b", *flags))  # the same command again: auto-resume
    assert f"at step {k}" in capsys.readouterr().out

    a, b = (torch.load(tmp_path / d / "checkpoint-latest.pth", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 2 * k
    for part in ("encoder", "decoder"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name}"
        # the check has teeth: training moved the weights after step k
        assert any(not torch.equal(a[part][n], mid[part][n]) for n in a[part])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    # the log continues where the crash left it: every step exactly once
    assert [r["step"] for r in read_log(tmp_path / "b") if "loss" in r] == list(range(1, 2 * k + 1))


def test_a_longer_max_steps_extends_a_finished_run(tmp_path, capsys):
    """`--max-steps 2k --allow-flag-changes` after a finished k-step run resumes at step k (the schedules are then
    stretched to 2k steps, so the result differs from a run launched with 2k: no equality here)."""
    k = 3
    dvae.main(dvae_args(tmp_path, "--max-steps", str(k), "--log-every", "1", "--warmup-steps", "1"))
    first = torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)
    assert (first["step"], first["total_steps"]) == (k, k)
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"--max-steps 3 -> 6.*--allow-flag-changes"):
        dvae.main(dvae_args(tmp_path, "--max-steps", str(2 * k), "--log-every", "1", "--warmup-steps", "1"))
    stats = dvae.main(dvae_args(tmp_path, "--max-steps", str(2 * k), "--log-every", "1",
                                "--warmup-steps", "1", "--allow-flag-changes"))
    assert f"resumed from {tmp_path / 'checkpoint-latest.pth'} at step {k}" in capsys.readouterr().out
    second = torch.load(tmp_path / "checkpoint-latest.pth", weights_only=True)
    assert (second["step"], second["total_steps"], stats["step"]) == (2 * k, 2 * k, 2 * k)
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == list(range(1, 2 * k + 1))


# ----------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------

def test_missing_or_empty_data_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        dvae.main(dvae_args(tmp_path / "out1", "--data", str(missing), "--max-steps", "1"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + ".*holds no images"):
        dvae.main(dvae_args(tmp_path / "out2", "--data", str(empty), "--max-steps", "1"))


def test_batch_larger_than_the_image_folder_is_named(tmp_path):
    for i in range(3):
        (tmp_path / "imgs" / "train" / "cls").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * i, 80, 120)).save(tmp_path / "imgs" / "train" / "cls" / f"{i}.png")
    (tmp_path / "imgs" / "val").symlink_to(tmp_path / "imgs" / "train")
    with pytest.raises(ValueError, match=r"--batch-size 16 .* larger than the training set \(3 images\)"):
        dvae.main(dvae_args(tmp_path / "out", "--data", str(tmp_path / "imgs"), "--max-steps", "1"))


def test_seed_reaches_image_folder_augmentation(tmp_path):
    """--seed must reach an ImageFolder's per-sample augmentation stream (it used to stay 0)."""
    (tmp_path / "train" / "cls").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "train" / "cls" / "a.png")
    a, b = (data.build_dataset(str(tmp_path), "train", None, seed=s) for s in (0, 7))
    assert b.seed == 7 and a.sample_rng(0).random() != b.sample_rng(0).random()


def test_load_tokenizer_rejects_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        dvae.load_tokenizer(str(missing))
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ValueError, match=re.escape(str(foreign)) + ".*--dalle-encoder"):
        dvae.load_tokenizer(str(foreign))


def test_unknown_amp_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit):
        dvae.get_args_parser().parse_args(["--amp", "bogus"])
    assert "--amp" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--amp"):
        training.autocast(torch.device("cpu"), "bogus")


# ----------------------------------------------------------------------------------------------------
# Helpers: schedule, crash-safe checkpoints
# ----------------------------------------------------------------------------------------------------

def test_cosine_lr_warmup_peak_and_final_value():
    total, warm, base, final = 100, 10, 1e-3, 1e-5
    lrs = [training.cosine_lr(s, total, warm, base, final) for s in range(total + 1)]
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(base / 2)
    assert lrs[warm] == pytest.approx(base)
    assert lrs[total] == pytest.approx(final)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))           # linear warm-up
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))           # then monotone down
    assert lrs[(total + warm) // 2] == pytest.approx((base + final) / 2)     # half-way down the cosine
    assert training.cosine_lr(total + 50, total, warm, base, final) == pytest.approx(final)  # flat after
    assert training.cosine_lr(0, total, 0, base, final) == base                   # no warm-up


SAVE_LOOP = """
import sys, torch
from training import save_checkpoint
path, n = sys.argv[1], int(sys.argv[2])
save_checkpoint({"version": 0, "w": torch.zeros(n)}, path)
print("saved", flush=True)
v = 1
while True:  # rewrite the same path until killed
    save_checkpoint({"version": v, "w": torch.full((n,), float(v))}, path)
    v += 1
"""


def test_save_checkpoint_survives_sigkill_mid_write(tmp_path):
    """A job killed while rewriting its checkpoint still leaves a complete, loadable one: the
    child rewrites the same path in a loop and is SIGKILLed once the `.tmp` it is writing is seen
    partly written (the stale `.tmp` may remain; resume never reads it)."""
    path = str(tmp_path / "checkpoint-latest.pth")
    n = 4_000_000  # 16 MB per save, written in chunks: a partial .tmp is easy to catch
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, path, str(n)], stdout=subprocess.PIPE,
                            text=True, env=subprocess_env())
    partial = False
    try:
        assert proc.stdout.readline().strip() == "saved"
        full = os.path.getsize(path)
        deadline = time.time() + 30
        while not partial and time.time() < deadline and proc.poll() is None:
            try:
                partial = 0 < os.path.getsize(path + ".tmp") < full
            except OSError:  # between os.replace and the next save's open
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert partial, "never saw a partly written .tmp (the kill was not mid-write)"
    assert proc.returncode == -signal.SIGKILL  # killed while still looping
    ckpt = training.load_checkpoint(path)  # weights_only=True
    v = ckpt["version"]
    assert isinstance(v, int) and v >= 0
    assert ckpt["w"].shape == (n,) and torch.equal(ckpt["w"], torch.full((n,), float(v)))


def test_load_checkpoint_names_a_corrupt_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert torch.equal(training.load_checkpoint(str(good))["w"], torch.arange(1000.0))
    for name, payload in (("garbage.pth", b"not a checkpoint"),
                          ("truncated.pth", good.read_bytes()[: good.stat().st_size // 2])):
        bad = tmp_path / name
        bad.write_bytes(payload)
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            training.load_checkpoint(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        training.load_checkpoint(str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------------------------------
# Distributed and mixed precision
# ----------------------------------------------------------------------------------------------------

def test_two_process_gloo_tokenizer_run_and_bf16(tmp_path):
    """`torchrun --nproc_per_node 2 dvae.py` trains one tokenizer: every rank's RNG state lands in the
    checkpoint (they differ: each rank draws its own Gumbel noise) and the log counts both ranks'
    images. With --amp bf16 the loss stays finite and tokens are still computed in fp32."""
    out = tmp_path / "ddp"
    proc = torchrun(["dvae.py", *TINY_DVAE, "--output-dir", out, "--max-steps", "3", "--log-every", "1",
                     "--dist-backend", "gloo", "--amp", "bf16"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    steps = [r for r in read_log(out) if "recon" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in steps)  # finite under bf16


def test_non_finite_loss_is_skipped_and_counted_then_stops_past_max_skips(tmp_path, monkeypatch):
    real_forward = dvae.DVAE.forward

    def nan_at_second_step(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        nan_at_second_step.calls += 1
        if nan_at_second_step.calls == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    nan_at_second_step.calls = 0
    monkeypatch.setattr(dvae.DVAE, "forward", nan_at_second_step)
    # skipped and counted, as in every stage (tests/test_step.py); past --max-skips the run stops
    with pytest.raises(FloatingPointError, match="1 non-finite steps, the last at step 2"):  # 1-based
        dvae.main(dvae_args(tmp_path / "strict", "--max-steps", "3", "--max-skips", "0"))
    nan_at_second_step.calls = 0
    dvae.main(dvae_args(tmp_path / "lenient", "--max-steps", "3"))
    ckpt = torch.load(tmp_path / "lenient" / "checkpoint-latest.pth", weights_only=True)
    assert (ckpt["step"], ckpt["skipped"], ckpt["overflows"]) == (3, 1, 0)


@pytest.mark.parametrize("extra, pattern", [
    (["--save-every", "0"], r"--save-every: must be a number > 0, got 0"),
    (["--epochs", "0"], r"--epochs: must be a number > 0"),
    (["--max-steps", "-3"], r"--max-steps: must be a number > 0"),
    (["--lr", "0"], r"--lr: must be a number > 0"),
    (["--temp-end", "0"], r"--temp-end: must be a number > 0"),
    (["--kl-weight", "nan"], r"--kl-weight: must be a number >= 0, got nan"),
    (["--kl-warmup", "1"], r"--kl-warmup: must be a number in \[0, 1\)"),
    (["--vocab-size", "0"], r"--vocab-size: must be a number > 0"),
    (["--max-skips", "-1"], r"--max-skips: must be a number >= 0"),
])
def test_numeric_flags_are_checked_before_any_work(tmp_path, extra, pattern, capsys):
    err = refused(dvae.get_args_parser(), TINY_DVAE + ["--output-dir", tmp_path / "out", *extra], capsys)
    assert re.search(r"^dvae\.py: error: argument " + pattern, err), err
    assert not (tmp_path / "out").exists()


def test_resume_with_other_flags_is_refused(tmp_path):
    dvae.main(dvae_args(tmp_path, "--max-steps", "2", "--warmup-steps", "1"))
    with pytest.raises(ValueError, match=r"--kl-weight None -> 0.01; --seed 0 -> 3\)"):
        dvae.main(dvae_args(tmp_path, "--max-steps", "2", "--warmup-steps", "1", "--seed", "3",
                            "--kl-weight", "0.01"))
    # where and how often things are written may change
    dvae.main(dvae_args(tmp_path, "--max-steps", "2", "--warmup-steps", "1", "--log-every", "7"))


def test_gumbel_schedule_follows_the_preset_and_flags():
    """The dalle preset has its own KL weight, at full strength from the first step (with 8192
    nearly flat logits a ramp from 0 let the argmax fall onto one code within 30 steps on photos)."""
    def schedule(*extra, step=0, total=100):
        args = dvae.get_args_parser().parse_args(list(extra))
        return dvae.gumbel_schedule(step, total, args, dvae.resolve_config(args))

    assert schedule("--preset", "dalle") == (1.0, 1e-2)
    assert schedule("--preset", "small") == (1.0, 0.0)                        # KL ramps from 0 ...
    assert schedule("--preset", "small", step=10)[1] == pytest.approx(5e-4)   # ... over 20% of the run
    assert schedule("--preset", "small", step=20)[1] == pytest.approx(1e-3)
    assert schedule("--preset", "small", step=70)[0] == pytest.approx(1 / 16)  # annealed by 70%
    assert schedule("--preset", "small", "--kl-weight", "0.05", "--kl-warmup", "0", step=1) == \
        (pytest.approx((1 / 16) ** (1 / 70)), 0.05)


def test_a_collapsed_codebook_is_reported_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dvae, "COLLAPSE_PERPLEXITY", 1e9)  # every codebook counts as collapsed
    stats = dvae.main(dvae_args(tmp_path / "a", "--max-steps", "2", "--warmup-steps", "1"))
    out = capsys.readouterr().out
    assert f"codebook has collapsed: validation perplexity {stats['val_perplexity']:.1f} of 64 codes" in out
    monkeypatch.setattr(dvae, "COLLAPSE_PERPLEXITY", 0.0)
    dvae.main(dvae_args(tmp_path / "b", "--max-steps", "2", "--warmup-steps", "1"))
    assert "codebook has collapsed" not in capsys.readouterr().out


def test_stage_args_holds_keyword_values_to_each_flags_own_check():
    """dvae.fit_tokenizer's arguments (pretrain.py's tokenizer fit): the parser's defaults, and each value
    given checked as the command line checks it, by the flag's name."""
    args = dvae.stage_args(output_dir="o", preset="kmeans", seed=3, img_size=32)
    assert (args.output_dir, args.preset, args.seed, args.img_size) == ("o", "kmeans", 3, 32)
    assert args.lr == dvae.get_args_parser().parse_args([]).lr  # the rest: the parser's defaults
    with pytest.raises(ValueError, match=r"argument --seed: must be a number in \[0, 2\*\*32\), got -1"):
        dvae.stage_args(seed=-1)
    with pytest.raises(ValueError, match="--preset"):
        dvae.stage_args(preset="huge")
    with pytest.raises(TypeError, match="dvae.py has no flag --no-such-flag"):
        dvae.stage_args(no_such_flag=1)
