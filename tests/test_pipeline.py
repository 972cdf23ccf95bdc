"""Step logic of the flow, outside Metaflow: settings, planning, trial collection, failure injection."""

import pytest

from counting import pipeline
from counting.sources import Item, Listing, Skip


def test_settings_merge_overrides_and_nested_sections():
    settings = pipeline.resolve_settings(
        {"data": {"image_size": 48}, "deploy": {"sagemaker": {"bucket": "models"}}},
        {("data", "max_count"): 4, ("search", "trials"): None, ("deploy", "sagemaker", "role_arn"): "arn:role"})
    assert settings["data"]["image_size"] == 48 and settings["data"]["max_count"] == 4
    assert settings["search"]["trials"] == pipeline.DEFAULT_SETTINGS["search"]["trials"]
    assert settings["deploy"]["sagemaker"] == {**pipeline.DEFAULT_SETTINGS["deploy"]["sagemaker"],
                                               "bucket": "models", "role_arn": "arn:role"}
    assert pipeline.count_classes(settings) == [1, 2, 3, 4]


@pytest.mark.parametrize("config, overrides, fragment", [
    ({"dataa": {}}, {}, "unknown section"),
    ({"data": {"imag_size": 3}}, {}, "unknown key"),
    ({"train": {"lr": -1}}, {}, "TrainParams.lr=-1"),
    ({"train": {"backbon": "x"}}, {}, "unknown TrainParams key"),
    ({}, {("data", "min_count"): 4, ("data", "max_count"): 2}, "min_count <= max_count"),
    ({}, {("search", "trials"): 0}, "search.trials"),
])
def test_bad_settings_name_the_culprit(config, overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        pipeline.resolve_settings(config, overrides)


def test_search_space_validation_uses_training_fields():
    settings = pipeline.resolve_settings({"search": {"space": {"weight_decay": {"type": "uniform", "low": 0,
                                                                               "high": 0.1}}}})
    assert set(pipeline.search_space(settings)) == {"weight_decay"}
    settings["search"]["space"] = {"learning_rate": 0.1}
    with pytest.raises(ValueError, match="unknown hyperparameter 'learning_rate'"):
        pipeline.search_space(settings)


def test_first_round_trains_a_fraction_and_second_round_continues_the_best():
    settings = pipeline.resolve_settings({"search": {"trials": 4, "first_round_fraction": 0.3, "keep_fraction": 0.5,
                                                     "tpe_trials": 2}})
    space = pipeline.search_space(settings)
    first = pipeline.plan_first_round(space, settings)
    assert [c["trial_id"] for c in first] == [0, 1, 2, 3]
    assert all(c["stop_after_epoch"] == max(1, -(-c["params"]["epochs"] * 3 // 10)) for c in first)
    results = [{"trial_id": c["trial_id"], "params": c["params"], "status": "ok", "val_accuracy": acc,
                "val_rmse": 1.0, "task": f"F/1/trial/{c['trial_id']}"} for c, acc in zip(first, [0.2, 0.9, 0.5, 0.7])]
    results[3]["status"] = "failed"
    second = pipeline.plan_second_round(results, space, settings)
    continued = [c for c in second if c["origin"]]
    assert [c["trial_id"] for c in continued] == [1, 2]
    assert [c["origin"] for c in continued] == ["F/1/trial/1", "F/1/trial/2"]
    assert all(c["stop_after_epoch"] is None for c in second)
    fresh = [c for c in second if not c["origin"]]
    assert [c["trial_id"] for c in fresh] == [4, 5]


class _Task:
    def __init__(self, **artifacts):
        self.__dict__.update(artifacts)


def test_collect_trials_records_failures_with_their_error():
    ok = {"trial_id": 1, "round": 1, "status": "ok", "val_accuracy": 0.5, "val_rmse": 1.0, "params": {}}
    failed = _Task(input={"trial_id": 0, "round": 1, "params": {"lr": 5.0}}, trial_error=RuntimeError("loss NaN"))
    trials = pipeline.collect_trials([_Task(trial_result=ok, input={}), failed])
    assert [t["trial_id"] for t in trials] == [0, 1]
    assert trials[0]["status"] == "failed" and "loss NaN" in trials[0]["error"]
    assert pipeline.best_trial(trials)["trial_id"] == 1
    with pytest.raises(RuntimeError, match="every trial failed: trial 0: loss NaN"):
        pipeline.best_trial(trials[:1])


def test_empty_listing_stops_with_the_reasons():
    settings = pipeline.resolve_settings({})
    listing = Listing(items=[], skipped=[Skip("metadata/1.json", "count out of range: 9")])
    with pytest.raises(ValueError, match="no usable images: 1 x count out of range"):
        pipeline.shard_listing(listing, settings)
    items = [Item(str(i), 1, f"/x/{i}.jpg") for i in range(5)]
    settings["data"]["shard_size"] = 2
    assert [len(s) for s in pipeline.shard_listing(Listing(items=items, skipped=[]), settings)] == [2, 2, 1]


def test_fail_if_requested(monkeypatch):
    pipeline.fail_if_requested("retrain")
    monkeypatch.setenv(pipeline.FAIL_ENV, "retrain")
    with pytest.raises(RuntimeError, match="failing step 'retrain' as requested"):
        pipeline.fail_if_requested("retrain")
    pipeline.fail_if_requested("deploy")


def test_fail_after_an_epoch_only_at_that_epoch(monkeypatch):
    monkeypatch.setenv(pipeline.FAIL_ENV, "deploy, trial@2")
    pipeline.fail_if_requested("trial")
    pipeline.fail_if_requested("trial", epoch=1)
    with pytest.raises(RuntimeError, match="'trial@2'"):
        pipeline.fail_if_requested("trial", epoch=2)
    with pytest.raises(RuntimeError, match="'deploy'"):
        pipeline.fail_if_requested("deploy")
