"""The step every stage shares (training.optimizer_step) and its skip accounting (training.SkipCount).

The rule: a non-finite loss, or non-finite gradients in fp32 / bf16, skip the update on every rank
and count as a skipped step (past --max-skips the run stops); an fp16 GradScaler overflow skips the
update too but is routine calibration, counted apart as an overflow. The four training loops
(dvae.py, pretrain.py, finetune.py, segment.py) must account alike: each is run for three steps with
an infinite gradient injected at step 2, in fp32 and in fp16, and its checkpoint must hold the same
counts and two applied optimiser steps.
"""
import json

import pytest
import torch
import torch.nn as nn

import dvae
import finetune
import pretrain
import segment
import training
from conftest import TINY_DVAE
from test_finetune import image_folder
from test_pretrain import TINY
from test_segment import ade_folder, seg_flags

CPU = torch.device("cpu")


def toy(amp="none"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == "fp16")
    return model, optimizer, scaler


def backward(model, scaler, grad_value=None):
    loss = model(torch.ones(4, 3)).sum()
    scaler.scale(loss).backward()
    if grad_value is not None:
        model.weight.grad[0, 0] = grad_value
    return loss


def test_a_finite_step_updates_and_reports_its_norm():
    model, optimizer, scaler = toy()
    before = model.weight.detach().clone()
    loss = backward(model, scaler)
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    norm, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(loss), 0.5, CPU)
    assert status == "ok" and torch.allclose(norm, expected)  # the norm before clipping
    assert not torch.equal(model.weight, before)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_loss_or_gradient_skips_the_update_in_fp32(bad):
    model, optimizer, scaler = toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = backward(model, scaler, float("inf") if bad == "grad" else None)
    finite = torch.isfinite(loss * float("nan")) if bad == "loss" else torch.isfinite(loss)
    _, status = training.optimizer_step(model, optimizer, scaler, finite, None, CPU)
    assert status == "skipped"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state


def test_an_fp16_overflow_is_the_scalers_skip_not_a_skipped_step():
    model, optimizer, scaler = toy("fp16")
    before = model.weight.detach().clone()
    loss = backward(model, scaler, float("inf"))
    _, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(loss), None, CPU)
    assert status == "overflow" and scaler.get_scale() == 2.0 ** 15  # halved from 2 ** 16
    assert torch.equal(model.weight, before)


def test_skip_count_stops_past_max_skips_naming_the_step(capsys):
    skips = training.SkipCount("stage.py", 1, "out/x")
    assert skips("ok", 1) and not skips("overflow", 2) and not skips("skipped", 3)
    assert "stage.py: non-finite loss or gradients at step 3, update skipped (1 so far)" in capsys.readouterr().out
    with pytest.raises(FloatingPointError, match=r"stage.py: 2 non-finite steps, the last at step 4, more "
                                                 r"than --max-skips 1; .*out/x/checkpoint-latest.pth"):
        skips("skipped", 4)
    resumed = training.SkipCount("stage.py", 5, "out/x", {"skipped": 2, "overflows": 7, "step": 9})
    assert resumed.state() == {"skipped": 2, "overflows": 7}


# ----------------------------------------------------------------------------------------------------
# The four loops account alike
# ----------------------------------------------------------------------------------------------------

def run_stage(stage, root, amp, tiny_dvae_ckpt):
    """Three optimiser steps of a stage in `root`; returns its checkpoint."""
    out = root / "out"
    common = ["--amp", amp, "--device", "cpu", "--output-dir", str(out)]
    if stage == "dvae":
        dvae.main(dvae.get_args_parser().parse_args(TINY_DVAE + ["--max-steps", "3", "--warmup-steps", "0",
                                                                 *common]))
    elif stage == "pretrain":
        pretrain.main(pretrain.get_args_parser().parse_args(TINY + ["--dvae", tiny_dvae_ckpt, "--max-steps", "3",
                                                                    *common]))
    elif stage == "finetune":
        data_root = image_folder(root / "photos")
        finetune.main(finetune.get_args_parser().parse_args(
            ["--data", str(data_root), "--init", "scratch", "--arch", "vit_mini", "--img-size", "16",
             "--patch-size", "4", "--batch-size", "4", "--num-workers", "0", "--eval-batch-size", "9",
             "--warmup-epochs", "0", "--lr", "1e-3", "--max-steps", "3", *common]))
    else:
        flags = seg_flags(ade_folder(root / "ade"), out, "--iters", "3", "--eval-every", "3")
        segment.main(segment.get_args_parser().parse_args([str(f) for f in flags] + common))
    return torch.load(out / "checkpoint-latest.pth", map_location="cpu", weights_only=True), out


@pytest.mark.parametrize("amp", ["none", "fp16"])
@pytest.mark.parametrize("stage", ["dvae", "pretrain", "finetune", "segment"])
def test_every_stage_accounts_a_bad_gradient_alike(tmp_path, tiny_dvae_ckpt, monkeypatch, stage, amp):
    """fp32: the injected step is the one skipped step. fp16: it is an overflow, never a skipped step
    (a tiny model in fp16 may overflow once more by itself while the scaler calibrates)."""
    real = training.optimizer_step
    calls = []

    def step_with_an_infinite_gradient_at_step_2(model, optimizer, scaler, finite, clip_grad, device):
        calls.append(1)
        if len(calls) == 2:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return real(model, optimizer, scaler, finite, clip_grad, device)

    monkeypatch.setattr(training, "optimizer_step", step_with_an_infinite_gradient_at_step_2)
    ckpt, out = run_stage(stage, tmp_path, amp, tiny_dvae_ckpt)
    assert len(calls) == 3 and ckpt["step"] == 3
    if amp == "none":
        assert (ckpt["skipped"], ckpt["overflows"]) == (1, 0)
    else:
        assert ckpt["skipped"] == 0 and ckpt["overflows"] >= 1
    steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {3 - ckpt["skipped"] - ckpt["overflows"]}  # AdamW stepped only on the applied updates
    floats = [v for v in ckpt["encoder" if stage == "dvae" else "model"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in floats)
    logged = [json.loads(line) for line in open(out / "log.jsonl")]
    last = [r for r in logged if r.get("step") == 3 and "skipped" in r]
    assert last and (last[-1]["skipped"], last[-1]["overflows"]) == (ckpt["skipped"], ckpt["overflows"])


def test_cosine_schedule_warms_up_from_warmup_lr():
    assert training.cosine_lr(0, 100, 10, 1.0, 0.0) == 0.0  # BEiT, MAE: from 0
    assert training.cosine_lr(0, 100, 10, 1.0, 0.0, warmup_lr=1e-4) == 1e-4  # timm's RSB commands
    assert training.cosine_lr(5, 100, 10, 1.0, 0.0, warmup_lr=1e-4) == pytest.approx(1e-4 + 0.5 * (1 - 1e-4))
    assert training.cosine_lr(10, 100, 10, 1.0, 0.0, warmup_lr=1e-4) == 1.0


def test_resume_point_replays_the_epoch_from_the_first_unseen_sample():
    """The loop arithmetic every stage shares: a run at step 7 of 3-step epochs (4 samples a step)
    is in epoch 2, has 2 steps of it left and starts at sample 4; the schedule's end cuts the epoch."""
    assert training.resume_point(0, 3, 10, 4) == (0, 3, 0)
    assert training.resume_point(7, 3, 10, 4) == (2, 2, 4)
    assert training.resume_point(9, 3, 10, 4) == (3, 1, 0)   # the last epoch: 1 step to the end
    assert training.resume_point(6, 3, 10, 4) == (2, 3, 0)   # a boundary: a whole epoch
    steps = []  # walking the loop from any resume step visits every step once, in order
    for start in range(10):
        step = start
        while step < 10:
            epoch, left, first = training.resume_point(step, 3, 10, 4)
            assert first == (step % 3) * 4 and epoch == step // 3
            step += left
            steps.append(step)
    assert all(s <= 10 for s in steps) and steps.count(10) == 10


def test_due_is_every_n_steps_and_the_last():
    assert [s for s in range(1, 11) if training.due(s, 4, 10)] == [4, 8, 10]
