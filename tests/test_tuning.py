"""Search space validation, seeded sampling, successive halving and ranking."""

import math

import pytest

from counting import tuning

KNOWN = ["lr", "batch_size", "epochs", "weight_decay", "backbone", "image_size"]


def _trial(i, acc, rmse, status="ok"):
    return {"trial_id": i, "status": status, "val_accuracy": acc, "val_rmse": rmse,
            "params": {"lr": 0.01 * (i + 1), "batch_size": 32, "epochs": 2}}


def test_seed_space_is_valid_and_samples_stay_in_range():
    space = tuning.validate_space(tuning.SEED_SPACE, KNOWN)
    samples = tuning.sample_trials(space, 20, seed=3)
    assert len(samples) == 20
    for s in samples:
        assert 0.01 <= s["lr"] <= 0.1
        assert s["batch_size"] in (32, 64, 128)
        assert 1 <= s["epochs"] <= 10 and isinstance(s["epochs"], int)
    assert len({s["lr"] for s in samples}) == 20


def test_sampling_is_seeded():
    space = tuning.validate_space(tuning.SEED_SPACE, KNOWN)
    assert tuning.sample_trials(space, 5, seed=1) == tuning.sample_trials(space, 5, seed=1)
    assert tuning.sample_trials(space, 5, seed=1) != tuning.sample_trials(space, 5, seed=2)


def test_fixed_values_pass_through():
    space = tuning.validate_space({"lr": {"type": "uniform", "low": 0.1, "high": 0.2}, "backbone": "resnet18"}, KNOWN)
    assert all(s["backbone"] == "resnet18" for s in tuning.sample_trials(space, 3, seed=0))


def test_history_steers_tpe_towards_good_region():
    space = tuning.validate_space({"lr": {"type": "uniform", "low": 0.0, "high": 1.0}}, KNOWN)
    history = [{"status": "ok", "params": {"lr": x / 20}, "val_accuracy": 1.0 - abs(x / 20 - 0.9)}
               for x in range(20)]
    asked = tuning.sample_trials(space, 10, seed=0, history=history)
    random = tuning.sample_trials(space, 10, seed=0)
    mean = lambda xs: sum(x["lr"] for x in xs) / len(xs)  # noqa: E731
    assert mean(asked) > mean(random)
    assert mean(asked) > 0.6


@pytest.mark.parametrize("space, fragment", [
    ({}, "empty"),
    ({"momentum_typo": {"type": "uniform", "low": 0, "high": 1}}, "unknown hyperparameter 'momentum_typo'"),
    ({"lr": {"type": "log_uniform", "low": 0.1, "high": 0.01}}, "low 0.1 is greater than high 0.01"),
    ({"lr": {"type": "uniform", "low": 0.1, "high": 0.1}}, "empty range"),
    ({"lr": {"type": "log_uniform", "low": 0, "high": 0.1}}, "low > 0"),
    ({"batch_size": {"type": "choice", "values": []}}, "non-empty list"),
    ({"epochs": {"type": "int", "low": 1.5, "high": 3}}, "whole numbers"),
    ({"lr": {"type": "gaussian", "low": 0, "high": 1}}, "unknown type 'gaussian'"),
    ({"lr": {"type": "uniform", "low": 0}}, "needs 'low' and 'high'"),
])
def test_malformed_space_names_the_culprit(space, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(">", ">")):
        tuning.validate_space(space, KNOWN)


def test_ranking_prefers_accuracy_then_lower_rmse_and_skips_failures():
    trials = [_trial(0, 0.5, 1.0), _trial(1, 0.7, 0.9), _trial(2, 0.7, 0.8), _trial(3, 0.9, 0.1, status="failed")]
    assert [t["trial_id"] for t in tuning.rank_trials(trials)] == [2, 1, 0]


def test_successive_halving_keeps_the_best_fraction():
    trials = [_trial(i, acc, 1.0) for i, acc in enumerate([0.3, 0.8, 0.5, 0.6, 0.2])]
    kept = tuning.successive_halving(trials, 0.5)
    assert [t["trial_id"] for t in kept] == [1, 3, 2]
    assert len(tuning.successive_halving(trials, 0.01)) == 1
    with pytest.raises(ValueError, match="every trial failed"):
        tuning.successive_halving([_trial(0, 0.5, 1.0, status="failed")], 0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        tuning.successive_halving(trials, 0)


def test_first_round_epochs():
    assert tuning.first_round_epochs(10, 0.3) == 3
    assert tuning.first_round_epochs(1, 0.3) == 1
    assert tuning.first_round_epochs(7, 1.0) == 7
    assert tuning.first_round_epochs(5, 0.5) == math.ceil(2.5)
    with pytest.raises(ValueError, match="first_round_fraction"):
        tuning.first_round_epochs(5, 1.5)
