"""Training on a tiny learnable data set: images whose count is the number of bright squares."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch

from counting import training
from counting.diagnostics import debug_rules
from counting.preprocess import decode_jpeg_batch, encode_jpeg_bytes, normalize
from counting.training import (BatchLoader, LabelledImages, TrainParams, fit, lr_factor, pick_device,
                               predict_logits, threads_per_task)

COUNTS = [1, 2, 3, 4]
THREADS = 1  # one thread per run keeps the tests fast on a shared two-core machine
SCRATCH = dict(backbone="resnet18", weights="none", optimizer="adamw", lr=1e-3, batch_size=8, epochs=3,
               image_size=32, augment="flip")


def bright_squares(n: int, seed: int, size: int = 32) -> LabelledImages:
    """Dark noisy JPEGs with 1-4 bright squares on a 4x4 grid; the label is the class of the square count."""
    generator = torch.Generator().manual_seed(seed)
    cell = size // 4
    images, labels = [], []
    for index in range(n):
        count = COUNTS[index % len(COUNTS)]
        image = 30 + torch.randint(0, 20, (3, size, size), generator=generator, dtype=torch.uint8)
        for position in torch.randperm(16, generator=generator)[:count].tolist():
            row, column = divmod(position, 4)
            image[:, row * cell + 1:(row + 1) * cell - 1, column * cell + 1:(column + 1) * cell - 1] = 230
        images.append(encode_jpeg_bytes(image))
        labels.append(count - COUNTS[0])
    return LabelledImages(images, labels)


@pytest.fixture(scope="module")
def squares() -> tuple[LabelledImages, LabelledImages]:
    return bright_squares(128, seed=0), bright_squares(64, seed=1)


def run(params: dict, data: tuple[LabelledImages, LabelledImages], **options) -> training.FitResult:
    return fit(TrainParams(**params), *data, counts=COUNTS, device="cpu", threads=THREADS, progress=False,
               **options)


@pytest.fixture(scope="module")
def scratch_run(squares) -> training.FitResult:
    return run(SCRATCH, squares)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


def test_model_from_scratch_learns_well_above_chance(scratch_run):
    history = scratch_run.history
    assert [row["epoch"] for row in history] == [1, 2, 3]
    best = max(row["val_accuracy"] for row in history)
    assert best >= 0.6  # chance is 0.25
    assert scratch_run.val_metrics["accuracy"] == best
    assert history[scratch_run.best_epoch - 1]["val_accuracy"] == best
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert len(scratch_run.step_losses) == len(scratch_run.grad_norms) == 3 * (128 // 8)
    assert all(math.isfinite(norm) and norm > 0 for norm in scratch_run.grad_norms)
    assert set(scratch_run.phase_seconds) == {"data", "forward", "backward", "optimizer"}
    assert all(seconds > 0 for seconds in scratch_run.phase_seconds.values())
    assert not scratch_run.model.training and next(scratch_run.model.parameters()).device.type == "cpu"


def test_returned_model_is_the_best_epoch_and_predicts_like_validation(scratch_run, squares):
    val = squares[1]
    logits = predict_logits(scratch_run.model, val.images, batch_size=20, device="cpu")
    assert logits.shape == (len(val), len(COUNTS)) and logits.dtype == torch.float32
    accuracy = (logits.argmax(dim=1) == torch.tensor(val.labels)).float().mean().item()
    assert accuracy == pytest.approx(scratch_run.val_metrics["accuracy"], abs=1.5 / len(val))


def test_optimizer_lr_follows_warmup_then_cosine_per_step():
    params = TrainParams(**{**SCRATCH, "epochs": 4, "warmup_epochs": 1.0, "backbone_lr_mult": 0.1})
    trainer = training.Trainer(params, num_classes=len(COUNTS), steps_per_epoch=5)
    seen = []
    for _ in range(20):
        seen.append({group["name"]: group["lr"] for group in trainer.optimizer.param_groups})
        trainer.optimizer.step()
        trainer.scheduler.step()
    factors = [lr_factor(step, warmup_steps=5, total_steps=20) for step in range(20)]
    assert [lrs["head"] for lrs in seen] == pytest.approx([params.lr * factor for factor in factors])
    assert [lrs["backbone"] for lrs in seen] == pytest.approx([params.lr * 0.1 * factor for factor in factors])


def test_history_records_the_lr_of_each_epochs_last_step(scratch_run):
    steps = 128 // 8
    assert [row["lr"] for row in scratch_run.history] == pytest.approx(
        [SCRATCH["lr"] * lr_factor(epoch * steps - 1, warmup_steps=0, total_steps=3 * steps) for epoch in (1, 2, 3)])


def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    factors = [lr_factor(step, warmup_steps=4, total_steps=20) for step in range(21)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == 1.0 and factors[20] == pytest.approx(0.0)
    assert all(later < earlier for earlier, later in zip(factors[4:], factors[5:]))
    assert factors[12] == pytest.approx(0.5)  # cosine midpoint


def test_killed_run_resumes_from_its_checkpoint(scratch_run, squares, tmp_path, caplog):
    checkpoint = tmp_path / "run" / "checkpoint.pt"

    def killed_after_second_epoch(row: dict) -> None:
        if row["epoch"] == 2:
            raise KeyboardInterrupt("killed after epoch 2")

    with pytest.raises(KeyboardInterrupt):
        run(SCRATCH, squares, checkpoint_path=checkpoint, on_epoch_end=killed_after_second_epoch)
    assert checkpoint.is_file() and list(checkpoint.parent.iterdir()) == [checkpoint]

    with caplog.at_level(logging.INFO, logger="counting.training"):
        resumed = run(SCRATCH, squares, checkpoint_path=checkpoint)
    assert resumed.resumed_from_epoch == 2
    assert "resumed from checkpoint" in caplog.text
    assert without_seconds(resumed.history) == without_seconds(scratch_run.history)
    assert resumed.step_losses == scratch_run.step_losses
    assert resumed.best_epoch == scratch_run.best_epoch


def test_seeded_run_is_reproducible_and_resume_state_continues_it(scratch_run, squares):
    first = run(SCRATCH, squares, stop_after_epoch=2)
    # same params and data give the same numbers; the schedule stays the one for all epochs
    assert without_seconds(first.history) == without_seconds(scratch_run.history[:2])
    assert first.step_losses == scratch_run.step_losses[:len(first.step_losses)]
    continued = run(SCRATCH, squares, resume_state=first.state)
    assert continued.resumed_from_epoch == 2
    assert without_seconds(continued.history) == without_seconds(scratch_run.history)
    assert continued.step_losses == scratch_run.step_losses
    assert continued.val_metrics == scratch_run.val_metrics


def test_resume_state_with_other_params_is_refused(scratch_run, squares):
    with pytest.raises(ValueError, match=r"lr=0\.001 there, 0\.002 here"):
        run({**SCRATCH, "lr": 2e-3}, squares, resume_state=scratch_run.state)


def test_pretrained_lite0_beats_the_same_model_from_scratch():
    data = bright_squares(128, seed=0, size=64), bright_squares(64, seed=1, size=64)
    params = dict(backbone="tf_efficientnet_lite0", optimizer="adamw", lr=3e-3, batch_size=8, epochs=2,
                  image_size=64)
    pretrained = run({**params, "weights": "imagenet"}, data)
    scratch = run({**params, "weights": "none"}, data)
    assert pretrained.val_metrics["accuracy"] >= scratch.val_metrics["accuracy"] + 0.15
    assert pretrained.history[-1]["val_loss"] < scratch.history[-1]["val_loss"]


def test_ordinal_head_learns(squares):
    result = run({**SCRATCH, "head": "ordinal"}, squares)
    # chance: accuracy 0.25; the best constant prediction has rmse 1.22
    assert result.val_metrics["accuracy"] >= 0.4
    assert result.val_metrics["rmse"] < 1.05
    logits = predict_logits(result.model, squares[1].images[:5], device="cpu")
    assert logits.shape == (5, len(COUNTS) - 1)


def test_early_stopping_ends_training_after_patience_epochs_without_improvement(squares):
    train, val = squares
    frozen = LabelledImages(train.images[:32], train.labels[:32])
    params = {**SCRATCH, "unfreeze": "head", "lr": 1e-9, "batch_size": 16, "epochs": 4, "early_stopping_patience": 1}
    result = run(params, (frozen, val))
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert result.best_epoch == 1
    # a finished run's state resumes to the same result without training further
    again = run(params, (frozen, val), resume_state=result.state)
    assert again.history == result.history and again.best_epoch == 1
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(again.model.state_dict().values(),
                                                                   result.model.state_dict().values()))


def test_debug_rules_pass_a_healthy_run(scratch_run):
    verdicts = {rule["rule"]: rule["verdict"] for rule in debug_rules(scratch_run)}
    assert verdicts == {"loss_not_finite": "pass", "exploding_gradients": "pass", "vanishing_gradients": "pass",
                        "loss_not_decreasing": "pass", "overfitting": "pass"}


def test_diverging_run_stops_and_is_flagged(squares):
    result = run({**SCRATCH, "optimizer": "sgd", "lr": 1e6, "batch_size": 32, "epochs": 3}, squares)
    assert len(result.history) == 1  # training ends after an epoch whose loss is not finite
    rules = {rule["rule"]: rule for rule in debug_rules(result)}
    assert rules["loss_not_finite"]["verdict"] == "issue"
    assert "nan" in rules["loss_not_finite"]["detail"] or "inf" in rules["loss_not_finite"]["detail"]
    assert rules["exploding_gradients"]["verdict"] == "issue"


def test_predict_logits_tta_flip_averages_the_mirror(scratch_run, squares):
    images = squares[1].images[:6]
    model = scratch_run.model
    batch = normalize(decode_jpeg_batch(images), model.mean, model.std)
    with torch.no_grad():
        expected = (model(batch) + model(batch.flip(-1))) / 2
    assert torch.allclose(predict_logits(model, images, device="cpu", tta_flip=True), expected, atol=1e-4)


def test_loader_resizes_normalises_and_shuffles_by_epoch(squares):
    train = squares[0]
    loader = BatchLoader(train.images[:20], train.labels[:20], batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3,
                         image_size=40, shuffle=True, drop_last=True, seed=3, channels_last=True)
    batches = list(loader.batches(epoch=1))
    assert len(loader) == len(batches) == 2
    images, labels = batches[0]
    assert images.shape == (8, 3, 40, 40) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert -1.0 <= images.min() and images.max() <= 1.0
    order = lambda epoch: torch.cat([labels for _, labels in loader.batches(epoch)]).tolist()  # noqa: E731
    assert order(1) == torch.cat([labels for _, labels in batches]).tolist()
    assert order(1) != order(2)
    plain = BatchLoader(train.images[:20], batch_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert [images.shape[0] for images, labels in plain.batches()] == [8, 8, 4]
    assert next(iter(plain.batches()))[1] is None


def test_loader_raises_decode_errors_from_its_background_thread(squares):
    images = list(squares[0].images[:4]) + [b"not a jpeg"]
    loader = BatchLoader(images, batch_size=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(RuntimeError):
        list(loader.batches())


def test_fit_rejects_labels_outside_the_counts(squares):
    bad = LabelledImages(squares[0].images[:4], [0, 1, 2, 7])
    with pytest.raises(ValueError, match="train: label 7"):
        fit(TrainParams(**SCRATCH), bad, squares[1], counts=COUNTS, device="cpu", progress=False)


def test_params_round_trip_through_a_dict():
    params = TrainParams(backbone="resnet18", lr=0.01, head="ordinal", early_stopping_patience=2, unfreeze=3)
    assert TrainParams.from_dict(params.to_dict()) == params
    assert TrainParams.from_dict({"lr": 1}).lr == 1.0


def test_params_reject_unknown_keys():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainParams.from_dict({"lr": 0.1, "learning_rate": 0.1})


@pytest.mark.parametrize("field, value", [
    ("lr", 0), ("lr", -0.1), ("lr", float("nan")), ("batch_size", 0), ("batch_size", 8.0), ("epochs", 0),
    ("optimizer", "rmsprop"), ("head", "regression"), ("augment", "mixup"), ("backbone", "vgg16"),
    ("decoding", "mode"), ("momentum", 1.0), ("label_smoothing", -0.1), ("warmup_epochs", 9), ("early_stopping_patience", 0),
    ("amp", "yes"), ("image_size", 8), ("unfreeze", -1),
])
def test_params_reject_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as raised:
        TrainParams.from_dict({field: value})
    assert f"TrainParams.{field}={value!r}" in str(raised.value)


def test_threads_per_task_divides_the_usable_cpus():
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_task(1) == cpus
    assert threads_per_task(cpus * 4) == 1
    with pytest.raises(ValueError, match="parallel_tasks"):
        threads_per_task(0)


def test_fit_restores_the_thread_count(squares, monkeypatch):
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    seen = []
    monkeypatch.setattr(training, "_fit", lambda *args: seen.append(torch.get_num_threads()))
    fit(TrainParams(**SCRATCH), *squares, counts=COUNTS, device="cpu", threads=wanted, progress=False)
    assert seen == [wanted] and torch.get_num_threads() == before


def test_pick_device_prefers_cuda_then_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == "cpu"
