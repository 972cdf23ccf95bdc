"""Hyperparameter search: space validation, Optuna ask-and-tell sampling, successive halving, ranking.

A space maps a training parameter to one of:
  {"type": "log_uniform" | "uniform", "low": a, "high": b}   a float range
  {"type": "int", "low": a, "high": b}                       an integer range, both ends included
  {"type": "choice", "values": [...]}                         a categorical choice
  any plain value                                             fixed for every trial
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna

SEED_SPACE: dict[str, Any] = {
    "lr": {"type": "log_uniform", "low": 0.01, "high": 0.1},
    "batch_size": {"type": "choice", "values": [32, 64, 128]},
    "epochs": {"type": "int", "low": 1, "high": 10},
}

_RANGE_TYPES = ("log_uniform", "uniform", "int")


def validate_space(space: Mapping[str, Any], known_params: Iterable[str]) -> dict[str, Any]:
    """Check a search space and return it as a plain dict; raise ValueError naming the bad entry."""
    known = set(known_params)
    if not space:
        raise ValueError("search space is empty: give at least one hyperparameter")
    checked: dict[str, Any] = {}
    for name, spec in space.items():
        if name not in known:
            raise ValueError(f"search space: unknown hyperparameter {name!r}; known: {sorted(known)}")
        checked[name] = _validate_entry(name, spec)
    return checked


def _validate_entry(name: str, spec: Any) -> Any:
    if not isinstance(spec, Mapping):
        return spec
    spec = dict(spec)
    kind = spec.get("type")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"search space {name!r}: 'choice' needs a non-empty list 'values', got {values!r}")
        return {"type": "choice", "values": list(values)}
    if kind not in _RANGE_TYPES:
        raise ValueError(f"search space {name!r}: unknown type {kind!r}; use one of "
                         f"{['choice', *_RANGE_TYPES]}")
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"search space {name!r}: {kind} range needs 'low' and 'high', got {spec!r}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ValueError(f"search space {name!r}: 'low' and 'high' must be numbers, got {low!r}, {high!r}")
    if low > high:
        raise ValueError(f"search space {name!r}: low {low} is greater than high {high}")
    if kind == "int" and (int(low) != low or int(high) != high):
        raise ValueError(f"search space {name!r}: int range needs whole numbers, got {low}, {high}")
    if kind != "int" and low == high:
        raise ValueError(f"search space {name!r}: empty range [{low}, {high}]")
    if kind == "log_uniform" and low <= 0:
        raise ValueError(f"search space {name!r}: log_uniform needs low > 0, got {low}")
    return {"type": kind, "low": low, "high": high}


def _distribution(spec: Mapping[str, Any]) -> optuna.distributions.BaseDistribution:
    kind = spec["type"]
    if kind == "choice":
        return optuna.distributions.CategoricalDistribution(spec["values"])
    if kind == "int":
        return optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]))
    return optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                  log=kind == "log_uniform")


def _distributions(space: Mapping[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    return {name: _distribution(spec) for name, spec in space.items() if isinstance(spec, Mapping)}


def sample_trials(space: Mapping[str, Any], n_trials: int, seed: int,
                  history: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Ask Optuna for `n_trials` parameter sets; finished trials in `history` inform TPE.

    The study is rebuilt from `history` (dicts with "params", "status" and "val_accuracy") each time, so
    the search state lives in the run's artifacts rather than in a database.
    """
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = _distributions(space)
    fixed = {name: spec for name, spec in space.items() if not isinstance(spec, Mapping)}
    # Random sampling while nothing has finished yet; TPE once there is a history to learn from.
    sampler = optuna.samplers.TPESampler(seed=seed + len(history), n_startup_trials=1 if history else n_trials)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for past in history:
        if past.get("status") != "ok":
            continue
        params = {k: past["params"][k] for k in distributions if k in past["params"]}
        if len(params) == len(distributions):
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                      value=float(past["val_accuracy"])))
    asked = [study.ask(distributions) for _ in range(n_trials)]
    return [{**fixed, **trial.params} for trial in asked]


def rank_key(trial: Mapping[str, Any]) -> tuple[float, float]:
    """Sort key: higher validation accuracy first, then lower RMSE."""
    return (-float(trial["val_accuracy"]), float(trial["val_rmse"]))


def rank_trials(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Finished trials, best first."""
    return sorted((t for t in trials if t.get("status") == "ok"), key=rank_key)


def successive_halving(trials: Sequence[Mapping[str, Any]], keep_fraction: float) -> list[Mapping[str, Any]]:
    """The best `keep_fraction` of the finished trials (at least one), to continue for longer."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    ranked = rank_trials(trials)
    if not ranked:
        raise ValueError("successive halving: every trial failed; see the trials table for their errors")
    return ranked[: max(1, math.ceil(len(ranked) * keep_fraction))]


def first_round_epochs(epochs: int, fraction: float) -> int:
    """Epochs a trial trains in the first, short round."""
    if not 0 < fraction <= 1:
        raise ValueError(f"first_round_fraction must be in (0, 1], got {fraction}")
    return max(1, math.ceil(epochs * fraction))
