"""Debug rules on recorded training runs, and profiling a few real training steps."""

from __future__ import annotations

import math

import pytest
import torch

from counting.diagnostics import debug_rules, profile_training
from counting.preprocess import encode_jpeg_bytes
from counting.training import FitResult, LabelledImages, TrainParams

RULES = ["loss_not_finite", "exploding_gradients", "vanishing_gradients", "loss_not_decreasing", "overfitting"]


def epoch(number: int, train_loss: float, val_loss: float, train_accuracy: float = 0.6,
          val_accuracy: float = 0.6) -> dict:
    return {"epoch": number, "train_loss": train_loss, "val_loss": val_loss, "train_accuracy": train_accuracy,
            "val_accuracy": val_accuracy}


def recorded(step_losses=None, grad_norms=None, history=None) -> FitResult:
    """A run as FitResult records it: by default a healthy one whose losses fall steadily."""
    steps = 20
    return FitResult(model=None, best_epoch=1, val_metrics={}, phase_seconds={}, state=b"",
                     step_losses=step_losses or [2.0 - 0.05 * step for step in range(steps)],
                     grad_norms=grad_norms or [5.0 - 0.1 * step for step in range(steps)],
                     history=history or [epoch(1, 1.6, 1.5), epoch(2, 1.2, 1.1), epoch(3, 1.0, 0.95)])


def verdicts(result: FitResult, **thresholds) -> dict[str, str]:
    return {rule["rule"]: rule["verdict"] for rule in debug_rules(result, **thresholds)}


def issues(result: FitResult, **thresholds) -> list[str]:
    return [rule for rule, verdict in verdicts(result, **thresholds).items() if verdict == "issue"]


def test_a_healthy_run_passes_every_rule_with_details():
    rules = debug_rules(recorded())
    assert [rule["rule"] for rule in rules] == RULES
    assert all(rule["verdict"] == "pass" and rule["detail"] for rule in rules)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_step_loss_is_flagged_with_its_step(bad):
    losses = [1.0, 0.9, bad, 0.8, 0.7]
    rule = debug_rules(recorded(step_losses=losses))[0]
    assert rule["verdict"] == "issue" and "step 3" in rule["detail"]


def test_a_non_finite_validation_loss_is_flagged():
    history = [epoch(1, 1.0, 0.9), epoch(2, 0.8, math.nan)]
    rule = debug_rules(recorded(history=history))[0]
    assert rule == {"rule": "loss_not_finite", "verdict": "issue", "detail": "val_loss is nan in epoch 2"}


def test_exploding_gradients_by_size_by_jump_and_by_nan():
    assert issues(recorded(grad_norms=[300.0, 600.0, 1200.0, 2500.0])) == ["exploding_gradients"]
    assert issues(recorded(grad_norms=[300.0, 600.0, 1200.0, 2500.0]), max_grad_norm=1e4) == []
    assert issues(recorded(grad_norms=[0.01, 0.02, 5.0, 4.0])) == ["exploding_gradients"]
    assert issues(recorded(grad_norms=[0.01, 0.02, 5.0, 4.0]), grad_jump_factor=1e3) == []
    assert "exploding_gradients" in issues(recorded(grad_norms=[3.0, math.nan]))


def test_vanishing_gradients_below_the_threshold():
    assert issues(recorded(grad_norms=[1e-3, 1e-9, 1e-9])) == ["vanishing_gradients"]
    assert issues(recorded(grad_norms=[1e-3, 1e-5, 1e-5])) == []
    assert issues(recorded(grad_norms=[1e-3, 1e-5, 1e-5]), min_grad_norm=1e-4) == ["vanishing_gradients"]


def test_loss_not_decreasing_compares_the_last_part_with_the_first():
    flat = [1.0, 1.2, 0.9, 1.1] * 5
    assert issues(recorded(step_losses=flat)) == ["loss_not_decreasing"]
    slow = [1.0] * 5 + [0.98] * 15
    assert issues(recorded(step_losses=slow)) == []
    assert issues(recorded(step_losses=slow), min_loss_decrease=0.05) == ["loss_not_decreasing"]
    too_short = debug_rules(recorded(step_losses=[1.0, 1.5, 2.0]))[3]
    assert too_short["verdict"] == "pass" and "too few" in too_short["detail"]


def test_overfitting_when_validation_loss_rises_while_training_loss_falls():
    rising = [epoch(1, 1.0, 0.8), epoch(2, 0.8, 0.85), epoch(3, 0.6, 0.9), epoch(4, 0.4, 1.0)]
    assert issues(recorded(history=rising)) == ["overfitting"]
    assert issues(recorded(history=rising), overfit_epochs=4) == []
    interrupted = [epoch(1, 1.0, 0.8), epoch(2, 0.8, 0.85), epoch(3, 0.6, 0.7), epoch(4, 0.4, 1.0)]
    assert issues(recorded(history=interrupted)) == []


def test_overfitting_when_training_accuracy_far_exceeds_validation():
    gap = [epoch(1, 1.0, 0.9), epoch(2, 0.5, 0.8, train_accuracy=0.95, val_accuracy=0.5)]
    assert issues(recorded(history=gap)) == ["overfitting"]
    assert issues(recorded(history=gap), max_accuracy_gap=0.5) == []


@pytest.mark.parametrize("thresholds", [{"loss_window": 0}, {"loss_window": 0.8}, {"overfit_epochs": 0}])
def test_bad_thresholds_are_rejected(thresholds):
    with pytest.raises(ValueError, match=next(iter(thresholds))):
        debug_rules(recorded(), **thresholds)


def noise_images(n: int, size: int = 32) -> LabelledImages:
    generator = torch.Generator().manual_seed(0)
    images = [encode_jpeg_bytes(torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8))
              for _ in range(n)]
    return LabelledImages(images, [index % 3 for index in range(n)])


def test_profile_training_reports_operators_phases_and_throughput():
    params = TrainParams(backbone="resnet18", weights="none", batch_size=8, image_size=32)
    report = profile_training(params, noise_images(24), counts=[1, 2, 3], device="cpu", steps=2, warmup_steps=1,
                              threads=1, row_limit=10)
    operators = report["top_operators"]
    assert 0 < len(operators) <= 10
    assert set(operators[0]) == {"name", "self_cpu_ms", "cpu_total_ms", "calls"}
    self_times = [row["self_cpu_ms"] for row in operators]
    assert self_times == sorted(self_times, reverse=True) and self_times[0] > 0
    assert any("conv" in row["name"] for row in operators)
    assert set(report["phase_seconds"]) == {"data", "forward", "backward", "optimizer"}
    assert all(seconds > 0 for seconds in report["phase_seconds"].values())
    assert report["images_per_second"] > 0


def test_profile_training_rejects_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        profile_training(TrainParams(backbone="resnet18", weights="none"), noise_images(4), counts=[1, 2, 3],
                         device="cpu", steps=0)
