"""The whole flow through metaflow.Runner in an isolated local datastore: run, read back, resume."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from metaflow import Flow, Runner, namespace

from counting.packaging import extract_package, load_handlers
from conftest import SHARED_ABID
from counting.sources.generated import generate_abid_layout


FLOW = str(Path(__file__).parents[1] / "flows" / "counting_flow.py")
SMALL_CONFIG = json.loads((Path(FLOW).parent / "config.json").read_text())
SMALL_CONFIG["data"].update(generated_images=150, image_size=32)
SMALL_CONFIG["train"].update(backbone="resnet18", weights="none", image_size=32)
SMALL_CONFIG["search"].update(trials=3, tpe_trials=1, keep_fraction=0.5, first_round_fraction=0.3, space={
    "lr": {"type": "log_uniform", "low": 0.01, "high": 0.1},
    "batch_size": {"type": "choice", "values": [32, 64]},
    "epochs": {"type": "int", "low": 2, "high": 3},
})
SMALL_CONFIG["deploy"].update(probe_images=4)


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("metaflow")
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": "tester",
           "COUNTING_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@dataclass
class Outcome:
    status: str
    stderr: str
    run: Any


def _finish(executing) -> Outcome:
    """Read what the runner recorded before its context removes the logs."""
    return Outcome(executing.status, executing.stderr, executing.run)


def _run(env, config, **kwargs) -> Outcome:
    with Runner(FLOW, env=env, config_value=[("config", config)], show_output=False) as runner:
        return _finish(runner.run(max_workers=2, **kwargs))


@pytest.fixture(scope="module")
def damaged_source(tmp_path_factory):
    """ABID layout: the real photos and metadata of ../shared/abid/abid-layout linked in place (generated bins where
    that folder is absent), with one image truncated and one in-range metadata file stripped of its count.

    Returns the folder, the damaged ids and the number of images that should survive."""
    root = tmp_path_factory.mktemp("abid")
    real = SHARED_ABID / "abid-layout"
    if real.is_dir():
        for part in ("bin-images", "metadata"):
            (root / part).mkdir()
            for path in sorted((real / part).iterdir()):
                (root / part / path.name).symlink_to(path.resolve())
    else:
        generate_abid_layout(root, 152, seed=5, progress=False)
    in_range = [m for m in sorted((root / "metadata").iterdir())
                if 1 <= json.loads(m.read_text())["EXPECTED_QUANTITY"] <= 5]
    truncated, uncounted = in_range[0].stem, in_range[1]
    image = root / "bin-images" / f"{truncated}.jpg"
    data = image.read_bytes()
    image.unlink()
    image.write_bytes(data[:300])
    broken = json.loads(uncounted.read_text())
    del broken["EXPECTED_QUANTITY"]
    uncounted.unlink()
    uncounted.write_text(json.dumps(broken))
    return root, truncated, uncounted.stem, len(in_range) - 2


@pytest.fixture(scope="module")
def failed_and_resumed(flow_env, damaged_source):
    """A run made to fail in retrain, then resumed: (the failed run's id, the resumed run)."""
    failing = _run({**flow_env, "COUNTING_FAIL_STEP": "retrain"}, SMALL_CONFIG, source=str(damaged_source[0]))
    assert failing.status == "failed"
    with Runner(FLOW, env=flow_env, show_output=False) as runner:  # resume reuses the original run's config
        resumed = _finish(runner.resume(origin_run_id=failing.run.id))
    assert resumed.status == "successful", resumed.stderr
    namespace(None)
    return failing.run.id, Flow("BinCountingFlow")[resumed.run.id]


@pytest.fixture(scope="module")
def finished_run(failed_and_resumed):
    return failed_and_resumed[1]


def test_run_succeeds_and_artifacts_read_back(finished_run, tmp_path):
    data = finished_run.data
    assert set(data.best_params) == {"lr", "batch_size", "epochs"}
    assert 0.01 <= data.best_params["lr"] <= 0.1
    rounds = [t["round"] for t in data.trials]
    assert rounds.count(1) == 3 and rounds.count(2) >= 2
    assert all(t["status"] == "ok" for t in data.trials)
    assert {"accuracy", "rmse", "mae", "off_by_one", "per_class_accuracy", "confusion_matrix"} <= set(data.test_metrics)
    assert {"id", "count", "sha256", "key"} <= set(data.manifest[0])
    assert sum(data.class_counts.values()) == len(data.manifest) == len(data.dataset.images)
    assert {r["rule"] for r in data.debug_report} >= {"loss_not_finite", "exploding_gradients", "overfitting"}
    assert data.profile["top_operators"]
    assert len(data.endpoint["answers"]) == 4 and all(a["count"] in range(1, 6) for a in data.endpoint["answers"])

    handlers = load_handlers(extract_package(data.model_package["bytes"], tmp_path / "model"))
    image = data.dataset.images[0]
    answer = json.loads(handlers.output_fn(handlers.predict_fn(handlers.input_fn(image, "image/jpeg"),
                                                                handlers.model), "application/json")[0])
    assert answer["count"] in range(1, 6)


def test_bad_images_and_metadata_are_skipped_and_reported(finished_run, damaged_source):
    _, truncated, uncounted, survivors = damaged_source
    assert len(finished_run.data.manifest) == survivors
    skipped = {s["key"]: s["reason"] for s in finished_run.data.skipped}
    assert any(truncated in key and "unreadable" in reason for key, reason in skipped.items())
    assert any(uncounted in key and "EXPECTED_QUANTITY" in reason for key, reason in skipped.items())
    others = [reason for key, reason in skipped.items() if truncated not in key and uncounted not in key]
    assert all(reason.startswith("count out of range") for reason in others)
    assert {truncated, uncounted}.isdisjoint(m["id"] for m in finished_run.data.manifest)


def test_second_round_continues_the_best_first_round_trials(finished_run):
    trials = finished_run.data.trials
    first = sorted((t for t in trials if t["round"] == 1), key=lambda t: (-t["val_accuracy"], t["val_rmse"]))
    continued = {t["trial_id"] for t in trials if t["round"] == 2 and t["trial_id"] < 3}
    assert continued == {t["trial_id"] for t in first[:2]}
    for t in trials:
        if t["round"] == 2 and t["trial_id"] in continued:
            assert t["epochs_trained"] == t["params"]["epochs"]


def test_resume_after_a_failed_retrain_clones_finished_steps(failed_and_resumed):
    failed_id, run = failed_and_resumed
    failed = Flow("BinCountingFlow")[failed_id]
    assert not failed["retrain"].task.successful
    assert "failing step 'retrain' as requested" in failed["retrain"].task.stderr
    for step in ("fetch", "pack", "split", "trial", "extend", "select"):
        assert all(t.metadata_dict.get("origin-task-id") for t in run[step]), step
    assert not run["retrain"].task.metadata_dict.get("origin-task-id")
    assert run.data.test_metrics["accuracy"] >= 0


def test_malformed_search_space_stops_at_start_with_a_clear_error(flow_env):
    config = copy.deepcopy(SMALL_CONFIG)
    config["search"]["space"] = {"lr": {"type": "log_uniform", "low": 0.1, "high": 0.01}}
    result = _run(flow_env, config)
    assert result.status == "failed"
    assert "low 0.1 is greater than high 0.01" in result.run["start"].task.stderr
