"""What each step of the counting flow does, as plain functions the flow calls and tests exercise."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from counting import calibration, diagnostics, tuning
from counting.dataset import PackedDataset, merge_datasets, pack_dataset
from counting.metrics import count_metrics
from counting.packaging import build_model_package, package_artifact
from counting.sources import Item, Listing, list_items, load_items, shard_items
from counting.sources.base import summarize_skips
from counting.split import stratified_split
from counting.checkpoints import TaskCheckpoint
from counting.training import (FitResult, LabelledImages, TrainParams, fit, predict_logits,
                               threads_per_task)

FAIL_ENV = "COUNTING_FAIL_STEP"

DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "data": {"generated_images": 1200, "generated_seed": 0, "image_size": 64, "min_count": 1, "max_count": 5,
             "max_per_class": None, "shard_size": 5000},
    "split": {"val_fraction": 0.15, "test_fraction": 0.15, "seed": 0},
    "train": {},
    "search": {"trials": 4, "seed": 0, "first_round_fraction": 0.3, "keep_fraction": 0.5, "tpe_trials": 0,
               "space": tuning.SEED_SPACE},
    "compute": {"parallel_trials": 2, "trial_timeout_minutes": 60, "retrain_timeout_minutes": 120, "remote": None},
    "deploy": {"target": "local", "port": 0, "probe_images": 16, "endpoint_name": None,
               "sagemaker": {"role_arn": None, "bucket": None, "region": None, "instance_type": "ml.m5.large"}},
}

# Sub-sections merged key by key with their defaults; other values (the search space too) replace the default.
_MERGED_SUBSECTIONS = {("deploy", "sagemaker")}


def resolve_settings(config: Mapping[str, Any],
                     overrides: Mapping[tuple[str, ...], Any] | None = None) -> dict[str, Any]:
    """Merge a flow config, then parameter overrides (None: not given), over the defaults.

    Unknown sections and keys are rejected by name, as are a bad count range and bad training settings.
    """
    plain = _plain(config)
    unknown = set(plain) - set(DEFAULT_SETTINGS)
    if unknown:
        raise ValueError(f"config: unknown section(s) {sorted(unknown)}; known: {sorted(DEFAULT_SETTINGS)}")
    settings = copy.deepcopy(DEFAULT_SETTINGS)
    for section, values in plain.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"config section {section!r} must be an object, got {values!r}")
        if section != "train":
            extra = set(values) - set(DEFAULT_SETTINGS[section])
            if extra:
                raise ValueError(f"config section {section!r}: unknown key(s) {sorted(extra)}")
        for key, value in values.items():
            if (section, key) in _MERGED_SUBSECTIONS and isinstance(value, Mapping):
                settings[section][key] = {**settings[section][key], **value}
            else:
                settings[section][key] = value
    for path, value in (overrides or {}).items():
        if value is not None:
            *parents, key = path
            node = settings
            for part in parents:
                node = node[part]
            node[key] = value
    TrainParams.from_dict(settings["train"])
    data = settings["data"]
    if not 0 <= data["min_count"] <= data["max_count"]:
        raise ValueError(f"count range: need 0 <= min_count <= max_count, got {data['min_count']}..{data['max_count']}")
    if settings["search"]["trials"] < 1:
        raise ValueError(f"search.trials must be at least 1, got {settings['search']['trials']}")
    return settings


def count_classes(settings: Mapping[str, Any]) -> list[int]:
    """The counts the model predicts, smallest first."""
    return list(range(settings["data"]["min_count"], settings["data"]["max_count"] + 1))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def search_space(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The validated search space of the settings."""
    return tuning.validate_space(settings["search"]["space"], [f.name for f in fields(TrainParams)])


def list_source(source: str, subset: str | None, settings: Mapping[str, Any]) -> Listing:
    """The images a source offers in the configured count range, without fetching them."""
    data = settings["data"]
    return list_items(source, subset=subset, min_count=data["min_count"], max_count=data["max_count"],
                      max_per_class=data["max_per_class"], generated_images=data["generated_images"],
                      seed=data["generated_seed"])


def shard_listing(listing: Listing, settings: Mapping[str, Any]) -> list[list[Item]]:
    """Shards of the listing for a foreach; an empty listing stops here with the reasons."""
    if not listing.items:
        raise ValueError(f"no usable images: {summarize_skips(listing.skipped)}")
    return shard_items(listing.items, settings["data"]["shard_size"])


def fetch_shard(items: Sequence[Item], settings: Mapping[str, Any]) -> PackedDataset:
    """Fetch one shard and pack it at the training size; unreadable images are reported, not fatal."""
    result = load_items(items)
    return pack_dataset(result.records, settings["data"]["image_size"], skipped=result.skipped, allow_empty=True,
                        workers=os.cpu_count() or 2)


def merge_shards(parts: Sequence[PackedDataset], listing: Listing) -> PackedDataset:
    """One dataset from the packed shards, carrying the listing's skips too."""
    listed_skips = pack_dataset([], parts[0].image_size, skipped=listing.skipped, allow_empty=True)
    return merge_datasets([*parts, listed_skips])


def split_dataset(dataset: PackedDataset, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Stratified split as a plain dict of id lists and per-part class counts."""
    split = settings["split"]
    parts = stratified_split(dataset.ids, dataset.counts, val_fraction=split["val_fraction"],
                             test_fraction=split["test_fraction"], seed=split["seed"])
    return {"train": list(parts.train_ids), "val": list(parts.val_ids), "test": list(parts.test_ids),
            "class_counts": parts.class_counts}


def _candidate(trial_id: int, round_: int, params: Mapping[str, Any], stop_after: int | None,
               origin: str | None = None) -> dict[str, Any]:
    return {"trial_id": trial_id, "round": round_, "params": dict(params), "stop_after_epoch": stop_after,
            "origin": origin}


def plan_first_round(space: Mapping[str, Any], settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Sample the first round's candidates; each trains a fraction of its epochs."""
    search = settings["search"]
    plan = []
    for i, params in enumerate(tuning.sample_trials(space, search["trials"], search["seed"])):
        epochs = int(params.get("epochs", settings["train"].get("epochs", TrainParams().epochs)))
        plan.append(_candidate(i, 1, params, tuning.first_round_epochs(epochs, search["first_round_fraction"])))
    return plan


def plan_second_round(first_round: Sequence[Mapping[str, Any]], space: Mapping[str, Any],
                      settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Survivors of successive halving continue from their checkpoints; TPE adds fresh candidates."""
    search = settings["search"]
    plan = [_candidate(t["trial_id"], 2, t["params"], None, origin=t["task"])
            for t in tuning.successive_halving(first_round, search["keep_fraction"])]
    if search["tpe_trials"]:
        start = len(first_round)
        fresh = tuning.sample_trials(space, search["tpe_trials"], search["seed"], history=first_round)
        plan += [_candidate(start + i, 2, params, None) for i, params in enumerate(fresh)]
    return plan


def labelled(dataset: PackedDataset, ids: Sequence[str], counts: Sequence[int]) -> LabelledImages:
    """The images and class indices of `ids`."""
    part = dataset.select(ids)
    return LabelledImages(images=part.images, labels=[c - counts[0] for c in part.counts])


def fit_checkpointed(params: TrainParams, train: LabelledImages, val: LabelledImages, counts: Sequence[int],
                     checkpoints: TaskCheckpoint | None, step_name: str, resume_state: bytes | None = None,
                     **options: Any) -> FitResult:
    """`fit`, saving the training state to `checkpoints` after every epoch and resuming from it when it exists
    (a retried task, wherever it runs); `resume_state` (a first-round trial's state) is used otherwise."""
    saved = checkpoints.load() if checkpoints is not None else None
    if saved is not None:
        print(f"Resuming from the checkpoint this task saved before its retry: {checkpoints.uri}")
        resume_state = saved
    return fit(params, train, val, counts=counts, resume_state=resume_state,
               on_checkpoint=checkpoints.save if checkpoints is not None else None,
               on_epoch_end=lambda row: fail_if_requested(step_name, epoch=row["epoch"]), **options)


def run_trial(candidate: Mapping[str, Any], dataset: PackedDataset, split_ids: Mapping[str, Any],
              counts: Sequence[int], settings: Mapping[str, Any], parallel_tasks: int,
              checkpoints: TaskCheckpoint | None = None) -> tuple[dict[str, Any], bytes]:
    """Train one candidate in the running Metaflow task (continuing its own checkpoint after a retry, else its
    first-round trial's state); return the trial record and the final training state."""
    from metaflow import Task, current

    params = TrainParams.from_dict({**settings["train"], **candidate["params"]})
    resume_state = None
    if candidate.get("origin"):
        resume_state = Task(candidate["origin"], _namespace_check=False).data.checkpoint
    threads = threads_per_task(min(parallel_tasks, settings["compute"]["parallel_trials"]))
    print(f"Trial {candidate['trial_id']} round {candidate['round']}: {dict(candidate['params'])}, {threads} threads")
    started = time.perf_counter()
    result = fit_checkpointed(params, labelled(dataset, split_ids["train"], counts),
                              labelled(dataset, split_ids["val"], counts), counts, checkpoints, current.step_name,
                              resume_state=resume_state, threads=threads,
                              stop_after_epoch=candidate.get("stop_after_epoch"))
    record = {
        "trial_id": candidate["trial_id"], "round": candidate["round"], "params": dict(candidate["params"]),
        "status": "ok", "error": None, "task": current.pathspec,
        "val_accuracy": result.val_metrics["accuracy"], "val_rmse": result.val_metrics["rmse"],
        "val_mae": result.val_metrics["mae"], "best_epoch": result.best_epoch,
        "epochs_trained": len(result.history), "history": result.history,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return record, result.state


def collect_trials(inputs: Iterable[Any]) -> list[dict[str, Any]]:
    """Trial records from a join's inputs; a failed task becomes a record carrying its error."""
    records = []
    for task in inputs:
        error = getattr(task, "trial_error", None)
        result = getattr(task, "trial_result", None)
        if error is not None or result is None:
            candidate = task.input
            records.append({"trial_id": candidate["trial_id"], "round": candidate["round"],
                            "params": dict(candidate["params"]), "status": "failed",
                            "error": str(error) if error is not None else "no result recorded",
                            "history": []})
        else:
            records.append(result)
    return sorted(records, key=lambda r: r["trial_id"])


def best_trial(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The best finished trial by validation accuracy, ties broken by lower RMSE."""
    ranked = tuning.rank_trials(trials)
    if not ranked:
        errors = "; ".join(f"trial {t['trial_id']}: {t.get('error')}" for t in trials)
        raise RuntimeError(f"every trial failed: {errors}")
    return ranked[0]


def fail_if_requested(step_name: str, epoch: int | None = None) -> None:
    """Fail on purpose where COUNTING_FAIL_STEP asks, to rehearse `resume` and retries.

    The variable holds comma-separated entries: `STEP` fails that step as it starts; `STEP@N` fails it right
    after it saves the checkpoint of epoch N (a retry resumes after epoch N, so it does not fail again).
    """
    wanted = step_name if epoch is None else f"{step_name}@{epoch}"
    if wanted in [entry.strip() for entry in os.environ.get(FAIL_ENV, "").split(",")]:
        raise RuntimeError(f"{FAIL_ENV} has {wanted!r}: failing step {step_name!r} as requested")


@dataclass
class RetrainOutcome:
    """Everything the retrain step produces."""

    model: Any
    model_state: dict
    model_spec: dict
    image_size: int
    history: list
    profile: dict
    debug_report: list
    temperature: float
    calibration: dict
    test_metrics: dict
    tta_flip: bool


def retrain_best(best_params: Mapping[str, Any], dataset: PackedDataset, split_ids: Mapping[str, Any],
                 counts: Sequence[int], settings: Mapping[str, Any],
                 checkpoints: TaskCheckpoint | None = None) -> RetrainOutcome:
    """Train the best configuration from scratch (or from this task's checkpoint after a retry), profile it,
    check debugging rules, calibrate, test."""
    params = TrainParams.from_dict({**settings["train"], **best_params})
    train = labelled(dataset, split_ids["train"], counts)
    val = labelled(dataset, split_ids["val"], counts)
    profile = diagnostics.profile_training(params, train, counts=counts)
    result = fit_checkpointed(params, train, val, counts, checkpoints, "retrain")
    report = diagnostics.debug_rules(result)
    for rule in report:
        print(f"Rule {rule['rule']}: {rule['verdict']} ({rule['detail']})")
    val_logits = predict_logits(result.model, val.images, tta_flip=params.tta_flip, image_size=params.image_size)
    val_labels = np.asarray(val.labels)
    temperature = calibration.fit_temperature(val_logits, val_labels, result.model)
    probs_before = result.model.probabilities(val_logits).numpy()
    probs_after = result.model.probabilities(val_logits, temperature).numpy()
    calibration_report = {
        "temperature": temperature,
        "nll_before": calibration.negative_log_likelihood(probs_before, val_labels),
        "nll_after": calibration.negative_log_likelihood(probs_after, val_labels),
        "ece_before": calibration.expected_calibration_error(probs_before, val_labels),
        "ece_after": calibration.expected_calibration_error(probs_after, val_labels),
        "bins_before": calibration.reliability_bins(probs_before, val_labels),
        "bins_after": calibration.reliability_bins(probs_after, val_labels),
    }
    test = labelled(dataset, split_ids["test"], counts)
    test_logits = predict_logits(result.model, test.images, tta_flip=params.tta_flip, image_size=params.image_size)
    test_probs = result.model.probabilities(test_logits, temperature)
    result.model.to("cpu")  # predict_logits leaves it on its device; the artifacts must load anywhere
    predicted = [counts[i] for i in result.model.decode(test_probs).tolist()]
    truth = [counts[i] for i in test.labels]
    return RetrainOutcome(
        model=result.model, model_state=result.model.state_dict(), model_spec=dict(result.model.spec),
        image_size=params.image_size, history=result.history, profile=profile, debug_report=report,
        temperature=temperature, calibration=calibration_report,
        test_metrics=count_metrics(truth, predicted, counts), tta_flip=params.tta_flip)


def package_model(outcome: RetrainOutcome, counts: Sequence[int], settings: Mapping[str, Any],
                  run_pathspec: str) -> dict[str, Any]:
    """The SageMaker-style model.tar.gz of the retrained model, with its sha256."""
    return package_artifact(build_model_package(outcome.model, counts=list(counts), image_size=outcome.image_size,
                                                temperature=outcome.temperature, run_id=run_pathspec,
                                                version=run_pathspec))


def deploy_and_probe(model_package: Mapping[str, Any], dataset: PackedDataset, split_ids: Mapping[str, Any],
                     settings: Mapping[str, Any], flow_name: str, run_id: str) -> dict[str, Any]:
    """Deploy the package, send held-out test images one by one, record answers and latencies, tear down."""
    from counting.deploy import get_target

    deploy = settings["deploy"]
    target_name = deploy["target"]
    if target_name == "sagemaker":
        options = {k: v for k, v in deploy["sagemaker"].items() if v is not None}
    else:
        options = {"port": deploy["port"]}
    target = get_target(target_name, **options)
    probe = dataset.select(split_ids["test"][: deploy["probe_images"]])
    name = deploy["endpoint_name"] or f"{flow_name.lower()}-{run_id}"
    info = target.deploy(model_package["bytes"], name)
    answers, latencies = [], []
    try:
        for image_id, count, image in zip(probe.ids, probe.counts, probe.images):
            started = time.perf_counter()
            answer = target.invoke(info, image, "image/jpeg")
            latencies.append((time.perf_counter() - started) * 1000)
            answers.append({"id": image_id, "true_count": count, **answer})
    finally:
        if target_name == "local":
            target.delete(info)
    correct = [a["count"] == a["true_count"] for a in answers]
    return {"target": target_name, "name": name, "info": dataclasses.asdict(info),
            "answers": answers, "latencies_ms": latencies,
            "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
            "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies else float("nan"),
            "accuracy": float(np.mean(correct)) if correct else float("nan")}


def summarize(dataset: PackedDataset, trials: Sequence[Mapping[str, Any]], best_params: Mapping[str, Any],
              test_metrics: Mapping[str, Any], endpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The run in a few numbers."""
    return {
        "images": len(dataset.ids), "skipped": len(dataset.skipped), "dataset": dataset.fingerprint[:12],
        "trials": len(trials), "failed_trials": sum(t["status"] != "ok" for t in trials),
        **{f"best_{k}": v for k, v in best_params.items()},
        "test_accuracy": test_metrics["accuracy"], "test_rmse": test_metrics["rmse"],
        "test_mae": test_metrics["mae"], "test_off_by_one": test_metrics["off_by_one"],
        "endpoint_accuracy": endpoint["accuracy"], "endpoint_p50_ms": endpoint["latency_ms_p50"],
    }
