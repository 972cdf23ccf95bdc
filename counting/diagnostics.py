"""Training diagnostics: profile a few training steps, and check a finished run against built-in rules.

`debug_rules` follows the idea of SageMaker Debugger's built-in rules: each rule reads the recorded losses,
gradient norms and per-epoch history and says "pass" or "issue" with a one-line explanation.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from contextlib import closing
from statistics import fmean
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from counting.training import BatchLoader, FitResult, LabelledImages, Trainer, TrainParams, pick_device


def _milliseconds(event: Any, *names: str) -> float:
    """The first of `names` the profiler event has (attribute names vary across torch versions), in ms."""
    for name in names:
        if hasattr(event, name):
            return getattr(event, name) / 1000.0
    return 0.0


def profile_training(params: TrainParams, train: LabelledImages, *, counts: Sequence[int], device: str | None = None,
                     steps: int = 5, warmup_steps: int = 2, threads: int | None = None,
                     row_limit: int = 15) -> dict:
    """Run a few training steps exactly as `fit` does and report where the time goes.

    After `warmup_steps` untimed steps, `steps` steps are timed (CUDA synchronised per phase) for
    `phase_seconds` and `images_per_second`, then `steps` more run under torch.profiler (CPU activities, plus
    CUDA on a GPU) for `top_operators`: the `row_limit` operators with the most self time (device time on a
    GPU), each {name, self_cpu_ms, cpu_total_ms, calls[, self_cuda_ms, cuda_total_ms]}.
    """
    for name, value, minimum in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0), ("row_limit", row_limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    target = torch.device(device or pick_device())
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        steps_per_epoch = max(1, len(train) // params.batch_size)
        trainer = Trainer(params, num_classes=len(counts), steps_per_epoch=steps_per_epoch, device=target,
                          exact_timing=True)
        loader = BatchLoader(train.images, train.labels, batch_size=params.batch_size, mean=trainer.model.mean,
                             std=trainer.model.std, image_size=params.image_size, device=target,
                             augment=params.augment, shuffle=True, drop_last=True, seed=params.seed,
                             channels_last=params.channels_last)
        on_cuda = target.type == "cuda"
        with closing(loader.stream()) as batches:
            if warmup_steps:
                trainer.train_one_epoch(itertools.islice(batches, warmup_steps))
            trainer.timer.seconds = dict.fromkeys(trainer.timer.seconds, 0.0)
            started = time.perf_counter()
            timed = trainer.train_one_epoch(itertools.islice(batches, steps))
            if on_cuda:
                torch.cuda.synchronize(target)
            wall = time.perf_counter() - started
            phase_seconds = dict(trainer.timer.seconds)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
            with profile(activities=activities) as profiler:
                trainer.train_one_epoch(itertools.islice(batches, steps))
                if on_cuda:
                    torch.cuda.synchronize(target)
    finally:
        torch.set_num_threads(previous_threads)
    return {"top_operators": _top_operators(profiler, on_cuda, row_limit), "phase_seconds": phase_seconds,
            "images_per_second": timed.images / wall, "device": str(target), "steps": steps,
            "batch_size": params.batch_size}


def _top_operators(profiler: profile, on_cuda: bool, row_limit: int) -> list[dict]:
    rows = []
    for event in profiler.key_averages():
        row = {"name": event.key, "self_cpu_ms": _milliseconds(event, "self_cpu_time_total"),
               "cpu_total_ms": _milliseconds(event, "cpu_time_total"), "calls": int(event.count)}
        if on_cuda:
            row["self_cuda_ms"] = _milliseconds(event, "self_device_time_total", "self_cuda_time_total")
            row["cuda_total_ms"] = _milliseconds(event, "device_time_total", "cuda_time_total")
        rows.append(row)
    rows.sort(key=lambda row: row["self_cuda_ms" if on_cuda else "self_cpu_ms"], reverse=True)
    return rows[:row_limit]


def _rule(rule: str, issue: bool, detail: str) -> dict:
    return {"rule": rule, "verdict": "issue" if issue else "pass", "detail": detail}


def _first_non_finite(values: Sequence[float]) -> int | None:
    return next((index for index, value in enumerate(values) if not math.isfinite(value)), None)


def debug_rules(result: FitResult, *, max_grad_norm: float = 1e3, grad_jump_factor: float = 100.0,
                min_grad_norm: float = 1e-7, loss_window: float = 0.25, min_loss_decrease: float = 0.0,
                overfit_epochs: int = 3, max_accuracy_gap: float = 0.25) -> list[dict]:
    """Check a training run; one {rule, verdict: "pass" | "issue", detail} per rule, in this order.

    loss_not_finite: a step loss or an epoch's train/val loss is NaN or infinite.
    exploding_gradients: a step's total gradient L2 norm is not finite, exceeds `max_grad_norm` (default 1e3),
        or is more than `grad_jump_factor` (default 100) times the previous step's.
    vanishing_gradients: a step's total gradient norm is below `min_grad_norm` (default 1e-7).
    loss_not_decreasing: the mean training loss of the last `loss_window` (default 0.25) of the steps is not
        below the mean of the first `loss_window` by at least the fraction `min_loss_decrease` (default 0);
        runs of fewer than 4 steps pass as too short to judge.
    overfitting: for `overfit_epochs` (default 3) epochs in a row the validation loss rose while the training
        loss fell, or the last epoch's training accuracy exceeds its validation accuracy by more than
        `max_accuracy_gap` (default 0.25).
    """
    if not 0 < loss_window <= 0.5:
        raise ValueError(f"loss_window must be in (0, 0.5], got {loss_window!r}")
    if isinstance(overfit_epochs, bool) or not isinstance(overfit_epochs, int) or overfit_epochs < 1:
        raise ValueError(f"overfit_epochs must be an integer >= 1, got {overfit_epochs!r}")
    return [_loss_not_finite(result), _exploding_gradients(result.grad_norms, max_grad_norm, grad_jump_factor),
            _vanishing_gradients(result.grad_norms, min_grad_norm),
            _loss_not_decreasing(result.step_losses, loss_window, min_loss_decrease),
            _overfitting(result.history, overfit_epochs, max_accuracy_gap)]


def _loss_not_finite(result: FitResult) -> dict:
    step = _first_non_finite(result.step_losses)
    if step is not None:
        return _rule("loss_not_finite", True, f"training loss is {result.step_losses[step]} at step {step + 1}")
    for row in result.history:
        for key in ("train_loss", "val_loss"):
            if not math.isfinite(row[key]):
                return _rule("loss_not_finite", True, f"{key} is {row[key]} in epoch {row['epoch']}")
    return _rule("loss_not_finite", False, f"all {len(result.step_losses)} step losses are finite")


def _exploding_gradients(norms: Sequence[float], max_norm: float, jump_factor: float) -> dict:
    step = _first_non_finite(norms)
    if step is not None:
        return _rule("exploding_gradients", True, f"gradient norm is {norms[step]} at step {step + 1}")
    for step, norm in enumerate(norms):
        if norm > max_norm:
            return _rule("exploding_gradients", True,
                         f"gradient norm {norm:.4g} at step {step + 1} exceeds {max_norm:.4g}")
    for step in range(1, len(norms)):
        if norms[step - 1] > 0 and norms[step] > jump_factor * norms[step - 1]:
            return _rule("exploding_gradients", True,
                         f"gradient norm jumped {norms[step] / norms[step - 1]:.1f}x at step {step + 1} "
                         f"({norms[step - 1]:.4g} -> {norms[step]:.4g}; limit {jump_factor:g}x)")
    peak = max(norms, default=0.0)
    return _rule("exploding_gradients", False, f"largest gradient norm {peak:.4g} (limit {max_norm:.4g})")


def _vanishing_gradients(norms: Sequence[float], min_norm: float) -> dict:
    finite = [(step, norm) for step, norm in enumerate(norms) if math.isfinite(norm)]
    if not finite:
        return _rule("vanishing_gradients", False, "no finite gradient norm recorded")
    step, smallest = min(finite, key=lambda item: item[1])
    return _rule("vanishing_gradients", smallest < min_norm,
                 f"smallest gradient norm {smallest:.4g} at step {step + 1} (limit {min_norm:.4g})")


def _loss_not_decreasing(losses: Sequence[float], window: float, min_decrease: float) -> dict:
    if len(losses) < 4:
        return _rule("loss_not_decreasing", False, f"{len(losses)} steps are too few to judge")
    size = max(1, int(len(losses) * window))
    first, last = fmean(losses[:size]), fmean(losses[-size:])
    decreased = last < first * (1 - min_decrease)
    return _rule("loss_not_decreasing", not decreased,
                 f"mean training loss {first:.4g} over the first {size} steps, {last:.4g} over the last {size}")


def _overfitting(history: Sequence[dict], epochs: int, max_gap: float) -> dict:
    streak = 0
    for previous, row in zip(history, history[1:]):
        diverging = row["val_loss"] > previous["val_loss"] and row["train_loss"] < previous["train_loss"]
        streak = streak + 1 if diverging else 0
        if streak >= epochs:
            return _rule("overfitting", True, f"validation loss rose while training loss fell for {epochs} epochs "
                                              f"up to epoch {row['epoch']}")
    if not history:
        return _rule("overfitting", False, "no epoch recorded")
    last = history[-1]
    gap = last["train_accuracy"] - last["val_accuracy"]
    return _rule("overfitting", gap > max_gap,
                 f"epoch {last['epoch']}: training accuracy {last['train_accuracy']:.3f}, validation accuracy "
                 f"{last['val_accuracy']:.3f} (gap {gap:.3f}, limit {max_gap:.3f})")
