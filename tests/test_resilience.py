"""Preemption signals and the divergence guard, in-process."""

import math
import os
import signal

import pytest
import torch

from gptrain.train import resilience
from gptrain.train.resilience import DivergenceError, DivergenceGuard, Preemption


def test_nonfinite_updates_are_skipped_and_counted():
    g = DivergenceGuard(max_skips=3)
    assert g.check(0, 2.0, 1.0) is None
    assert "non-finite loss" in g.check(1, math.nan, 1.0)
    assert "non-finite grad norm" in g.check(2, 2.0, math.inf)
    assert g.check(3, 2.0, 1.0) is None  # an accepted step resets the run of skips
    assert (g.consecutive, g.skipped) == (0, 2)


def test_consecutive_skips_stop_with_step_and_checkpoint():
    g = DivergenceGuard(max_skips=2)
    g.check(7, math.nan, 1.0, last_checkpoint="run/checkpoints/step_00000006")
    with pytest.raises(DivergenceError) as e:  # a checkpoint saved during the run of skips is not a good one
        g.check(8, math.nan, math.nan, last_checkpoint="run/checkpoints/step_00000008")
    msg = str(e.value)
    assert "\n" not in msg and "step 8" in msg and "--resume run/checkpoints/step_00000006" in msg


def test_zscore_outliers_after_window_fills():
    g = DivergenceGuard(zscore=3.0, window=4)
    for i, loss in enumerate([3.0, 3.1, 2.9, 3.0]):
        assert g.check(i, loss, 1.0 + 0.01 * i) is None
    assert "loss 9 is an outlier" in g.check(4, 9.0, 1.0)
    assert "grad norm" in g.check(5, 3.0, 50.0)
    assert g.check(6, 2.8, 1.0) is None  # a lower loss is never an outlier
    assert DivergenceGuard(zscore=0.0, window=2).check(0, 1e9, 1e9) is None  # off by default


def test_guard_state_round_trips():
    g = DivergenceGuard(zscore=2.0, window=3)
    for i, x in enumerate([1.0, 1.1, math.nan, 1.2]):
        g.check(i, x, 1.0)
    h = DivergenceGuard(zscore=2.0, window=3)
    h.load_state_dict(g.state_dict())
    assert h.state_dict() == g.state_dict()
    assert h.check(9, 50.0, 1.0) == g.check(9, 50.0, 1.0)


def test_signal_requests_a_stop_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert p.received is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.received == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded copy of the same signal: ignored
        assert p.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(resilience.os, "_exit", exits.append)
    with Preemption():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [128 + signal.SIGINT]


def test_a_hangup_never_exits_without_saving(monkeypatch):
    """The kernel and the shell each send SIGHUP when a terminal closes, seconds apart or not: never 'twice'."""
    exits = []
    monkeypatch.setattr(resilience.os, "_exit", exits.append)
    monkeypatch.setattr(Preemption, "DUPLICATE_WINDOW_S", 0.0)
    with Preemption() as p:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        assert p.received == signal.SIGHUP
        os.kill(os.getpid(), signal.SIGTERM)  # a deliberate second request still exits at once
    assert exits == [128 + signal.SIGTERM]


def test_nan_injection_hook(monkeypatch):
    monkeypatch.setattr(resilience, "_NAN_STEPS", resilience._parse_steps("3,5-6"))
    assert resilience._NAN_STEPS == {3, 5, 6}
    assert torch.isnan(resilience.inject_test_nan(5, torch.tensor(1.0)))
    assert resilience.inject_test_nan(4, torch.tensor(1.0)).item() == 1.0


def test_the_rerun_hint_never_repeats_a_fresh_start_or_a_pinned_checkpoint():
    from gptrain.train.checkpoint import rerun_hint
    assert rerun_hint(None) == rerun_hint("auto") == "run the same command again"
    assert rerun_hint("fresh") == "run the same command without --resume fresh"
    assert rerun_hint("runs/a/checkpoints/step_00000010") == \
        "run the same command without --resume runs/a/checkpoints/step_00000010"
