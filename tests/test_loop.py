"""train.py's schedules and training loop: which steps count, when it stops, what each step is given.

The schedules are checked at chosen points against values worked out by hand, with a warm-up and a
non-zero final fraction patched in. The loop is train.main() run in-process on the tiny corpus (depth 2,
sequence 64, a 5-second budget) with a fake clock that advances 0.125 s per forward pass (two micro-steps,
so every step takes exactly 0.25 s): the number of steps, training_seconds, the progress lines and the
learning rate, momentum and weight decay handed to the optimizer at every step are then exact. The fast
fail is checked on a loss that is finite but above 100, and not on one just below it.

    uv run pytest tests/test_loop.py
"""

import math
import re

import pytest
import torch

import train
from helpers import BUDGET, STEP_SECONDS, in_memory_fit, run_main, start_tiny_main, summary_values


# --- schedules ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("progress,expected", [
    (0.0, 0.0), (0.05, 0.5), (0.1, 1.0),   # warm-up over the first 10 %
    (0.3, 1.0), (0.6, 1.0),                # flat until the warmdown starts at 1 - 0.4
    (0.8, 0.55),                           # half-way down: 0.5 + 0.5 * 0.1
    (0.9, 0.325),                          # a quarter left: 0.25 + 0.75 * 0.1
    (1.0, 0.1),                            # the final fraction
])
def test_lr_multiplier_with_warmup_warmdown_and_final_fraction(monkeypatch, progress, expected):
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "WARMDOWN_RATIO", 0.4)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.1)
    assert train.get_lr_multiplier(progress) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("progress,expected", [(0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)])
def test_lr_multiplier_at_the_defaults(progress, expected):
    assert train.get_lr_multiplier(progress) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step,expected", [(0, 0.85), (75, 0.875), (150, 0.90), (300, 0.95), (600, 0.95)])
def test_muon_momentum_warms_up_over_300_steps(step, expected):
    assert train.get_muon_momentum(step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("progress,expected", [(0.0, 0.2), (0.25, 0.15), (0.5, 0.1), (1.0, 0.0)])
def test_weight_decay_decays_linearly_to_zero(progress, expected):
    assert train.get_weight_decay(progress) == pytest.approx(expected, abs=1e-12)


# --- the loop, in-process on a fake clock ------------------------------------------------------------------

def hand_lr_multiplier(progress, warmup=0.2, warmdown=0.5, final=0.1):
    if progress < warmup:
        return progress / warmup
    if progress < 1 - warmdown:
        return 1.0
    return final + (1 - final) * (1 - progress) / warmdown


@pytest.fixture(scope="module")
def fake_clock_run(tiny_cache):
    """One whole run: (stdout, the scheduled values of every optimizer step)."""
    with pytest.MonkeyPatch.context() as mp:
        clock = start_tiny_main(mp, tiny_cache)
        _, out = run_main()
    return out, clock.optimizer_calls


@pytest.fixture
def tiny_main(tiny_cache, monkeypatch):
    return start_tiny_main(monkeypatch, tiny_cache)


def progress_lines(out):
    return [dict(step=int(m[0]), pct=float(m[1]), lrm=float(m[2]), dt=int(m[3]), remaining=int(m[4]))
            for m in re.findall(r"step (\d{5}) \(([\d.]+)%\) \| loss: [\d.]+ \| lrm: ([\d.]+) \| dt: (\d+)ms \| "
                                r"tok/sec: [\d,]+ \| mfu: n/a \| epoch: \d+ \| remaining: (\d+)s", out)]


def test_first_eleven_steps_are_not_counted_and_the_loop_stops_at_the_budget(fake_clock_run):
    out, optimizer_calls = fake_clock_run
    steps = 11 + BUDGET / STEP_SECONDS  # 11 uncounted, then steps of 0.25 s fill the budget exactly
    summary = summary_values(out)
    assert summary["num_steps"] == f"{steps:.0f}"
    assert summary["training_seconds"] == f"{BUDGET:.1f}"
    lines = progress_lines(out)
    assert [line["step"] for line in lines] == list(range(int(steps)))  # one progress line per step
    assert all(line["dt"] == 250 for line in lines)
    for line in lines:
        counted_before = max(0, line["step"] - 11) * STEP_SECONDS
        assert line["pct"] == pytest.approx(100 * counted_before / BUDGET, abs=0.05)
        assert line["remaining"] == round(BUDGET - counted_before - (STEP_SECONDS if line["step"] > 10 else 0))
    assert len(optimizer_calls) == steps


def test_each_step_gets_the_scheduled_lr_momentum_and_weight_decay(fake_clock_run):
    out, optimizer_calls = fake_clock_run
    lines = progress_lines(out)
    for step, groups in enumerate(optimizer_calls):
        progress = max(0, step - 11) * STEP_SECONDS / BUDGET
        assert lines[step]["lrm"] == pytest.approx(hand_lr_multiplier(progress), abs=0.005)
        assert {kind for kind, *_ in groups} == {"adamw", "muon"}
        for kind, lr_ratio, momentum, weight_decay in groups:
            assert lr_ratio == pytest.approx(hand_lr_multiplier(progress), abs=1e-9), (step, kind)
            if kind == "muon":
                assert momentum == pytest.approx(0.85 + 0.1 * step / 300, abs=1e-9), step
                assert weight_decay == pytest.approx(0.2 * (1 - progress), abs=1e-9), step
            else:
                assert weight_decay == 0.0


def test_a_finite_loss_above_100_fails_fast(tiny_main, capsys):
    tiny_main.losses = 100.5
    status, out = run_main(capsys)
    assert status == 1 and out.rstrip().endswith("FAIL")
    assert progress_lines(out) == [] and len(tiny_main.optimizer_calls) == 1  # at the first step


def test_a_loss_just_below_100_trains_on(tiny_main, capsys, monkeypatch):
    monkeypatch.setattr(train, "TIME_BUDGET", 0.5)
    tiny_main.losses = 99.5
    status, out = run_main(capsys)
    assert status == 0 and "FAIL" not in out and summary_values(out)["num_steps"] == "13"


# --- float16 with loss scaling: the path of GPUs without bf16, forced on the CPU ------------------------------

def last_losses(out, n=5):
    """The smoothed loss of the last n progress lines."""
    return [float(m) for m in re.findall(r"\| loss: ([\d.]+) \|", out)[-n:]]


@pytest.fixture(scope="module")
def float16_and_bf16_runs(tiny_cache):
    """The same tiny run in float16 with a loss scaler (AUTORESEARCH_FLOAT16=1) and in bf16: their stdout."""
    outs = {}
    for force in ("1", ""):
        with pytest.MonkeyPatch.context() as mp:
            start_tiny_main(mp, tiny_cache)
            mp.setenv("AUTORESEARCH_FLOAT16", force)
            outs["float16" if force else "bf16"] = run_main()[1]
    return outs


def test_float16_trains_with_a_loss_scaler_close_to_bf16(float16_and_bf16_runs):
    """Every step taken (no overflow left unhandled), the loss within 0.05 of bf16's (measured: about 0.01 apart
    over the last five steps; float16 holds 3 more bits than bf16, whose rounding the two runs do not share)."""
    fp16, bf16 = float16_and_bf16_runs["float16"], float16_and_bf16_runs["bf16"]
    assert "Precision: float16 with loss scaling, because AUTORESEARCH_FLOAT16=1" in fp16
    assert "Precision: bf16" in bf16 and "Loss scaling" not in bf16
    steps = summary_values(fp16)["num_steps"]
    assert f"Loss scaling: 0 of {steps} optimizer steps skipped (float16 gradients overflowed)\n---\n" in fp16
    assert steps == summary_values(bf16)["num_steps"] and math.isfinite(float(summary_values(fp16)["val_bpb"]))
    for a, b in zip(last_losses(fp16), last_losses(bf16)):
        assert abs(a - b) < 0.05, (last_losses(fp16), last_losses(bf16))
    assert last_losses(fp16) != last_losses(bf16)  # not the same arithmetic


def test_an_overflowed_step_is_skipped_and_training_goes_on(tiny_cache, capsys, monkeypatch):
    """Gradients made infinite at the fourth step: the scaler skips it (no optimizer step, the scale lowered), says so
    under the run, and the next steps train; the loss itself stays finite, so the fast fail does not fire."""
    clock = start_tiny_main(monkeypatch, tiny_cache)
    monkeypatch.setenv("AUTORESEARCH_FLOAT16", "1")
    backward = torch.Tensor.backward
    passes = []

    def overflowing_backward(self, *args, **kwargs):
        if not in_memory_fit():
            passes.append(1)
            if len(passes) in (7, 8):  # both micro-steps of the fourth step
                self = self * float("inf")
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", overflowing_backward)
    status, out = run_main(capsys)
    steps = int(summary_values(out)["num_steps"])
    assert status == 0 and "FAIL" not in out
    assert f"Loss scaling: 1 of {steps} optimizer steps skipped (float16 gradients overflowed)" in out
    assert len(clock.optimizer_calls) == steps - 1  # the optimizer never ran for the skipped step
