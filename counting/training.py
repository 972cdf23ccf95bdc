"""Train a counting model on in-memory JPEGs: data, model, optimiser, schedule, one epoch loop, one evaluation.

`fit` is the one training loop. Mixed precision, channels_last, torch.compile, checkpoints, resuming and
profiling are options of that loop; `Trainer` and `BatchLoader` are its parts, public so that profiling and
benchmarks time exactly what training runs.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from counting.images import POLICIES as AUGMENT_POLICIES
from counting.images import augment_batch
from counting.losses import make_loss
from counting.metrics import count_metrics
from counting.models import BACKBONES, DECODINGS, HEADS, CountingModel, build_model
from counting.preprocess import decode_jpeg_batch, normalize, resize_square

LOG = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
PHASES = ("data", "forward", "backward", "optimizer")
# Options that change how a run executes but not what it computes: a checkpoint may be resumed with other values.
_EXECUTION_OPTIONS = frozenset({"amp", "channels_last", "compile"})
_STATE_FORMAT = 1

T = TypeVar("T")


@dataclass
class TrainParams:
    """Every tunable of a training run; construction validates each value."""

    backbone: str = "tf_efficientnet_lite0"
    weights: str = "imagenet"
    head: str = "classification"
    lr: float = 0.03
    batch_size: int = 64
    epochs: int = 5
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    unfreeze: str | int = "all"
    backbone_lr_mult: float = 1.0
    dropout: float = 0.2
    image_size: int = 96
    augment: str = "flip"
    early_stopping_patience: int | None = None
    tta_flip: bool = False
    decoding: str = "argmax"
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        _validate_params(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainParams:
        """Build from a mapping of field names; unknown keys and bad values raise ValueError naming them."""
        if not isinstance(values, Mapping):
            raise TypeError(f"TrainParams.from_dict needs a mapping, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(key) for key in values if key not in known)
        if unknown:
            raise ValueError(f"unknown TrainParams key(s) {unknown}; known keys: {known}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field; `from_dict(to_dict())` gives an equal object."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, name: str, value: Any, requirement: str) -> None:
    if not ok:
        raise ValueError(f"TrainParams.{name}={value!r} is invalid: {requirement}")


def _validate_params(p: TrainParams) -> None:
    _require(isinstance(p.backbone, str) and p.backbone in BACKBONES, "backbone", p.backbone,
             f"use one of {sorted(BACKBONES)}")
    _require(isinstance(p.weights, str) and bool(p.weights), "weights", p.weights,
             "use 'imagenet', 'none' or the path of a state dict file")
    _require(p.head in HEADS, "head", p.head, f"use one of {list(HEADS)}")
    _require(p.decoding in DECODINGS, "decoding", p.decoding, f"use one of {list(DECODINGS)}")
    _require(p.optimizer in OPTIMIZERS, "optimizer", p.optimizer, f"use one of {list(OPTIMIZERS)}")
    _require(p.augment in AUGMENT_POLICIES, "augment", p.augment, f"use one of {list(AUGMENT_POLICIES)}")
    _require(_is_number(p.lr) and p.lr > 0, "lr", p.lr, "must be a number > 0")
    _require(_is_int(p.batch_size) and p.batch_size >= 1, "batch_size", p.batch_size, "must be an integer >= 1")
    _require(_is_int(p.epochs) and p.epochs >= 1, "epochs", p.epochs, "must be an integer >= 1")
    _require(_is_int(p.image_size) and p.image_size >= 16, "image_size", p.image_size,
             "must be an integer >= 16")
    _require(_is_number(p.momentum) and 0 <= p.momentum < 1, "momentum", p.momentum, "must be in [0, 1)")
    _require(_is_number(p.weight_decay) and p.weight_decay >= 0, "weight_decay", p.weight_decay,
             "must be a number >= 0")
    _require(_is_number(p.label_smoothing) and 0 <= p.label_smoothing < 1, "label_smoothing",
             p.label_smoothing, "must be in [0, 1)")
    _require(_is_number(p.warmup_epochs) and 0 <= p.warmup_epochs <= (p.epochs if _is_int(p.epochs) else 0),
             "warmup_epochs", p.warmup_epochs, "must be in [0, epochs]")
    _require((isinstance(p.unfreeze, str) and bool(p.unfreeze)) or (_is_int(p.unfreeze) and p.unfreeze >= 0),
             "unfreeze", p.unfreeze, "must be 'all', another name the backbone knows, or an integer >= 0")
    _require(_is_number(p.backbone_lr_mult) and p.backbone_lr_mult >= 0, "backbone_lr_mult",
             p.backbone_lr_mult, "must be a number >= 0")
    _require(_is_number(p.dropout) and 0 <= p.dropout < 1, "dropout", p.dropout, "must be in [0, 1)")
    _require(p.early_stopping_patience is None or (_is_int(p.early_stopping_patience)
                                                   and p.early_stopping_patience >= 1),
             "early_stopping_patience", p.early_stopping_patience, "must be None or an integer >= 1")
    _require(_is_int(p.seed) and p.seed >= 0, "seed", p.seed, "must be an integer >= 0")
    for name in ("tta_flip", "amp", "channels_last", "compile"):
        _require(isinstance(getattr(p, name), bool), name, getattr(p, name), "must be true or false")
    for name in ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "backbone_lr_mult",
                 "dropout"):
        setattr(p, name, float(getattr(p, name)))


@dataclass
class LabelledImages:
    """Same-size JPEG images with their class indices (count - min_count)."""

    images: list[bytes]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"LabelledImages: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class FitResult:
    """What `fit` returns; `model` holds the best epoch's weights, on the CPU, in eval mode."""

    model: CountingModel
    history: list[dict]  # per epoch: epoch, train_loss, train_accuracy, val_loss, val_accuracy, val_rmse, val_mae,
    #                      lr, grad_norm_mean, grad_norm_max, seconds
    best_epoch: int
    val_metrics: dict  # count_metrics of the best epoch
    phase_seconds: dict  # data, forward, backward, optimizer: seconds spent in this call
    step_losses: list[float]  # training loss of every step since the first epoch
    state: bytes  # everything needed to continue training exactly: pass it back as `resume_state`
    grad_norms: list[float] = field(default_factory=list)  # total L2 gradient norm of every step
    resumed_from_epoch: int = 0  # epochs already done when this call started (0: a fresh run)


def pick_device() -> str:
    """The fastest available device: "cuda", then "mps", then "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def threads_per_task(parallel_tasks: int) -> int:
    """CPU threads each of `parallel_tasks` concurrent tasks should use, counting only the CPUs this process may use."""
    if not _is_int(parallel_tasks) or parallel_tasks < 1:
        raise ValueError(f"parallel_tasks must be an integer >= 1, got {parallel_tasks!r}")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS and Windows
        cpus = os.cpu_count() or 1
    return max(1, cpus // parallel_tasks)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at `step`: linear warm-up to 1, then cosine decay towards 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _num_batches(n_images: int, batch_size: int, drop_last: bool) -> int:
    if drop_last and n_images >= batch_size:
        return n_images // batch_size
    return math.ceil(n_images / batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield from `items`, computed in a background thread that keeps up to `depth` results ready."""
    if depth < 1:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((finished, None))
        except BaseException as error:  # handed to the consumer, which raises it
            put((None, error))

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is finished:
                return
            yield item
    finally:
        stop.set()
        worker.join()


class BatchLoader:
    """Batches of in-memory same-size JPEGs: decoded (on the GPU when training there), resized, augmented and
    normalised with whole-batch tensor operations, prepared in a background thread one or two batches ahead."""

    def __init__(self, images: Sequence[bytes], labels: Sequence[int] | None = None, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], image_size: int | None = None,
                 device: str | torch.device = "cpu", augment: str = "none", shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, channels_last: bool = False, prefetch: int = 2) -> None:
        if not images:
            raise ValueError("BatchLoader: no images")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"BatchLoader: {len(images)} images but {len(labels)} labels")
        if augment not in AUGMENT_POLICIES:
            raise ValueError(f"BatchLoader: unknown augment policy {augment!r}; use one of {list(AUGMENT_POLICIES)}")
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"BatchLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        self.images = list(images)
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = image_size
        self.device = torch.device(device)
        self.decode_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.augment = augment
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.prefetch = prefetch

    def __len__(self) -> int:
        return _num_batches(len(self.images), self.batch_size, self.drop_last)

    def batches(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield (images float NCHW, labels or None) on the device; order and augmentation are seeded by epoch."""
        if self.shuffle:
            order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(
                _epoch_seed(self.seed, epoch)))
        else:
            order = torch.arange(len(self.images))
        chunks = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        generator = None
        if self.augment != "none":
            generator = torch.Generator(device=self.device).manual_seed(_epoch_seed(self.seed, epoch))
        return _prefetch((self._batch(chunk, generator) for chunk in chunks), self.prefetch)

    def stream(self, first_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches of one epoch after another, without end; close the iterator to stop its background thread."""
        for epoch in itertools.count(first_epoch):
            yield from self.batches(epoch)

    def _batch(self, indices: torch.Tensor, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        on_cuda = self.device.type == "cuda"
        images = decode_jpeg_batch([self.images[i] for i in indices.tolist()], device=self.decode_device)
        images = images.to(self.device, non_blocking=on_cuda)
        if self.image_size is not None:
            images = resize_square(images, self.image_size)
        if generator is not None:
            images = augment_batch(images, self.augment, generator)
        images = normalize(images, self.mean, self.std).contiguous(memory_format=self.memory_format)
        labels = None
        if self.labels is not None:
            labels = self.labels[indices]
            labels = labels.pin_memory().to(self.device, non_blocking=True) if on_cuda else labels.to(self.device)
        return images, labels


class PhaseTimer:
    """Wall seconds per training phase; synchronises CUDA at each reading only when `exact` (slower, accurate)."""

    def __init__(self, device: torch.device, exact: bool = False) -> None:
        self.sync = exact and device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._last = time.perf_counter()

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


@dataclass
class EpochResult:
    """Training statistics of one pass over a batch stream."""

    loss: float
    accuracy: float
    step_losses: list[float]
    grad_norms: list[float]
    images: int


def mixed_precision(amp: bool, device: torch.device
                    ) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype and gradient scaler: bf16 on CUDA where supported, else fp16 with a scaler; none off CUDA."""
    if not amp or device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def build_optimizer(model: CountingModel, params: TrainParams) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW over the model's parameter groups."""
    groups = model.param_groups(params.lr, params.backbone_lr_mult, params.weight_decay)
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr, momentum=params.momentum, nesterov=params.momentum > 0,
                               weight_decay=params.weight_decay)
    return torch.optim.AdamW(groups, lr=params.lr, weight_decay=params.weight_decay)


class Trainer:
    """The parts of one training run on one device: model, loss, optimiser, per-step schedule and precision."""

    def __init__(self, params: TrainParams, *, num_classes: int, steps_per_epoch: int,
                 device: str | torch.device = "cpu", exact_timing: bool = False) -> None:
        self.params = params
        self.device = torch.device(device)
        torch.manual_seed(params.seed)
        model = build_model(params.backbone, num_classes, head=params.head, weights=params.weights,
                            unfreeze=params.unfreeze, dropout=params.dropout,
                            decoding=params.decoding).to(self.device)
        if params.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if params.compile else model
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.loss_fn = make_loss(params.head, params.label_smoothing)
        self.optimizer = build_optimizer(model, params)
        self.schedule = functools.partial(lr_factor, warmup_steps=round(params.warmup_epochs * steps_per_epoch),
                                          total_steps=params.epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.autocast_dtype, self.scaler = mixed_precision(params.amp, self.device)
        self.timer = PhaseTimer(self.device, exact=exact_timing)
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def train_one_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                        progress_bar: tqdm | None = None, profiler: Any = None) -> EpochResult:
        """One optimiser step per batch; `profiler.step()` is called after each step when given."""
        self.model.train()
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        timer = self.timer
        timer.start()
        for images, targets in batches:
            timer.lap("data")
            with autocast(self.device, self.autocast_dtype):
                logits = self.forward(images)
                loss = self.loss_fn(logits, targets)
            predictions = self.model.decode(self.model.probabilities(logits.detach().float()))
            correct += (predictions == targets).sum()
            seen += targets.numel()
            timer.lap("forward")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            grads = [p.grad for p in self._trainable if p.grad is not None]
            norms.append(torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device))
            losses.append(loss.detach().float())
            timer.lap("backward")
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            timer.lap("optimizer")
            if profiler is not None:
                profiler.step()
            if progress_bar is not None:
                progress_bar.update(1)
            timer.start()
        if not losses:
            raise ValueError("train_one_epoch: the batch stream was empty")
        step_losses = torch.stack(losses).cpu().tolist()
        return EpochResult(loss=sum(step_losses) / len(step_losses), accuracy=correct.item() / seen,
                           step_losses=step_losses, grad_norms=torch.stack(norms).float().cpu().tolist(),
                           images=seen)

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float logits and labels of every batch, on the CPU, in eval mode (flip-averaged when params.tta_flip)."""
        labels: list[torch.Tensor] = []

        def images_only() -> Iterator[torch.Tensor]:
            for images, targets in batches:
                labels.append(targets)
                yield images

        logits = _infer_logits(self.model, self.forward, images_only(), self.device, self.autocast_dtype,
                               self.params.tta_flip)
        return logits, torch.cat(labels).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def _infer_logits(model: CountingModel, forward: Callable[[torch.Tensor], torch.Tensor],
                  batches: Iterable[torch.Tensor], device: torch.device, autocast_dtype: torch.dtype | None,
                  tta_flip: bool) -> torch.Tensor:
    model.eval()
    outputs: list[torch.Tensor] = []
    with torch.inference_mode(), autocast(device, autocast_dtype):
        for images in batches:
            logits = forward(images).float()
            if tta_flip:
                logits = (logits + forward(images.flip(-1)).float()) / 2
            outputs.append(logits)
    return torch.cat(outputs).cpu()


def predict_logits(model: CountingModel, images: Sequence[bytes], *, batch_size: int = 128,
                   device: str | None = None, tta_flip: bool = False, image_size: int | None = None) -> torch.Tensor:
    """Float32 logits (N, ...) of same-size JPEGs in eval mode, resized to `image_size` when given.

    The model is moved to `device` (default: `pick_device()`) and left there in eval mode.
    """
    target = torch.device(device or pick_device())
    model.to(target)
    loader = BatchLoader(images, batch_size=batch_size, mean=model.mean, std=model.std, image_size=image_size,
                         device=target)
    return _infer_logits(model, model, (batch for batch, _ in loader.batches()), target, None, tta_flip)


@dataclass
class _Progress:
    """Training progress that a checkpoint carries besides the trainer's own state."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    best: dict | None = None  # epoch, val_accuracy, val_rmse, val_metrics, model
    finished: bool = False  # early stopping or a non-finite loss ended training


def _plain(value: Any) -> Any:
    """Convert numpy scalars inside nested dicts/lists to Python numbers (safe for weights-only loading)."""
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def _serialize(trainer: Trainer, progress: _Progress, params: TrainParams, counts: list[int]) -> bytes:
    rng = {"torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if trainer.device.type == "cuda" else []}
    best = progress.best
    if best is not None and best["epoch"] == progress.epoch:  # the current weights: stored once
        best = {**best, "model": None}
    state = {"format": _STATE_FORMAT, "params": params.to_dict(), "counts": counts, **trainer.state_dict(),
             "epoch": progress.epoch, "best": best, "history": progress.history,
             "step_losses": progress.step_losses, "grad_norms": progress.grad_norms,
             "finished": progress.finished, "rng": rng}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _restore(data: bytes, source: str, trainer: Trainer, params: TrainParams, counts: list[int]) -> _Progress:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{source}: not a readable training state ({error})") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{source}: not a training state written by counting.training.fit")
    if state["counts"] != counts:
        raise ValueError(f"{source}: written for counts {state['counts']}, not {counts}")
    saved, wanted = state["params"], params.to_dict()
    differing = [f"{name}={saved.get(name)!r} there, {value!r} here" for name, value in wanted.items()
                 if name not in _EXECUTION_OPTIONS and saved.get(name) != value]
    if differing:
        raise ValueError(f"{source}: written with other TrainParams: {'; '.join(differing)}")
    trainer.load_state_dict(state)
    torch.set_rng_state(state["rng"]["torch"])
    if trainer.device.type == "cuda" and state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    best = state["best"]
    if best["model"] is None:
        best["model"] = _cpu_copy(trainer.model.state_dict())
    return _Progress(epoch=state["epoch"], history=state["history"], step_losses=state["step_losses"],
                     grad_norms=state["grad_norms"], best=best, finished=state["finished"])


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_data(name: str, data: LabelledImages, num_classes: int) -> None:
    if not isinstance(data, LabelledImages):
        raise TypeError(f"{name} must be LabelledImages, got {type(data).__name__}")
    if len(data) < 2:
        raise ValueError(f"{name}: needs at least 2 images, got {len(data)}")
    bad = [label for label in data.labels if not _is_int(label) or not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"{name}: label {bad[0]!r} is not a class index in [0, {num_classes})")


def _is_better(metrics: Mapping[str, float], best: Mapping[str, Any] | None) -> bool:
    if best is None:
        return True
    if metrics["accuracy"] != best["val_accuracy"]:
        return metrics["accuracy"] > best["val_accuracy"]
    return metrics["rmse"] < best["val_rmse"]


def fit(params: TrainParams, train: LabelledImages, val: LabelledImages, *, counts: Sequence[int],
        device: str | None = None, threads: int | None = None, checkpoint_path: Path | None = None,
        resume_state: bytes | None = None, stop_after_epoch: int | None = None, progress: bool = True,
        profiler: Any = None, exact_timing: bool = False, on_checkpoint: Callable[[bytes], None] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None) -> FitResult:
    """Train per `params`, validate after every epoch and return the best epoch's model (by val accuracy, then rmse).

    checkpoint_path: the training state is written there atomically after every epoch; when the file exists at
        the start, training resumes from it (it wins over `resume_state`).
    resume_state: `FitResult.state` of an earlier call with the same params, to continue that run.
    stop_after_epoch: return after this epoch; the schedule stays the one for `params.epochs`.
    threads: torch CPU threads during the call (see `threads_per_task`).
    profiler: an object whose `step()` is called after every training step (e.g. `torch.profiler.profile`).
    exact_timing: synchronise CUDA around each phase so `phase_seconds` is exact (slows training slightly).
    on_checkpoint: called after every epoch with the serialized training state (what `checkpoint_path` holds),
        to keep it elsewhere; pass it back as `resume_state` to continue.
    on_epoch_end: called with each epoch's history row once its checkpoint is written.
    Training also ends early after `params.early_stopping_patience` epochs without a better epoch, or after an
    epoch whose training loss is not finite.
    """
    counts = list(counts)
    if not counts:
        raise ValueError("counts is empty: give the list of counts the model predicts")
    _check_data("train", train, len(counts))
    _check_data("val", val, len(counts))
    if stop_after_epoch is not None and (not _is_int(stop_after_epoch) or stop_after_epoch < 1):
        raise ValueError(f"stop_after_epoch must be None or an integer >= 1, got {stop_after_epoch!r}")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads must be None or an integer >= 1, got {threads!r}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(params, train, val, counts, torch.device(device or pick_device()),
                    Path(checkpoint_path) if checkpoint_path is not None else None, resume_state,
                    stop_after_epoch or params.epochs, progress, profiler, exact_timing, on_checkpoint, on_epoch_end)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(params: TrainParams, train: LabelledImages, val: LabelledImages, counts: list[int], device: torch.device,
         checkpoint_path: Path | None, resume_state: bytes | None, last_epoch: int, show_progress: bool,
         profiler: Any, exact_timing: bool, on_checkpoint: Callable[[bytes], None] | None,
         on_epoch_end: Callable[[dict], None] | None) -> FitResult:
    steps = _num_batches(len(train), params.batch_size, drop_last=True)
    trainer = Trainer(params, num_classes=len(counts), steps_per_epoch=steps, device=device,
                      exact_timing=exact_timing)
    model = trainer.model
    loader_options = dict(batch_size=params.batch_size, mean=model.mean, std=model.std,
                          image_size=params.image_size, device=device, channels_last=params.channels_last)
    train_loader = BatchLoader(train.images, train.labels, augment=params.augment, shuffle=True, drop_last=True,
                               seed=params.seed, **loader_options)
    val_loader = BatchLoader(val.images, val.labels, **loader_options)

    state = _Progress()
    if checkpoint_path is not None and checkpoint_path.exists():
        state = _restore(checkpoint_path.read_bytes(), str(checkpoint_path), trainer, params, counts)
        LOG.info("resumed from checkpoint %s after epoch %d of %d", checkpoint_path, state.epoch, params.epochs)
    elif resume_state is not None:
        state = _restore(resume_state, "resume_state", trainer, params, counts)
        LOG.info("resumed from resume_state after epoch %d of %d", state.epoch, params.epochs)
    resumed_from = state.epoch

    epoch = state.epoch + 1
    while not state.finished and epoch <= min(params.epochs, last_epoch):
        started = time.perf_counter()
        with tqdm(total=len(train_loader), desc=f"epoch {epoch}/{params.epochs}", unit="batch", file=sys.stderr,
                  disable=not show_progress, leave=False) as bar:
            trained = trainer.train_one_epoch(train_loader.batches(epoch), progress_bar=bar, profiler=profiler)
            logits, labels = trainer.evaluate(val_loader.batches())
            bar.set_postfix(loss=f"{trained.loss:.4f}")
        val_loss = float(trainer.loss_fn(logits, labels))
        predictions = model.decode(model.probabilities(logits))
        metrics = _plain(count_metrics([counts[i] for i in labels.tolist()],
                                       [counts[i] for i in predictions.tolist()], counts))
        row = {"epoch": epoch, "train_loss": trained.loss, "train_accuracy": trained.accuracy, "val_loss": val_loss,
               "val_accuracy": metrics["accuracy"], "val_rmse": metrics["rmse"], "val_mae": metrics["mae"],
               "lr": params.lr * trainer.schedule(epoch * steps - 1),
               "grad_norm_mean": sum(trained.grad_norms) / len(trained.grad_norms),
               "grad_norm_max": float(torch.tensor(trained.grad_norms).max()), "seconds": time.perf_counter() - started}
        state.epoch = epoch
        state.history.append(row)
        state.step_losses.extend(trained.step_losses)
        state.grad_norms.extend(trained.grad_norms)
        if _is_better(metrics, state.best):
            state.best = {"epoch": epoch, "val_accuracy": metrics["accuracy"], "val_rmse": metrics["rmse"],
                          "val_metrics": metrics, "model": _cpu_copy(model.state_dict())}
        patience = params.early_stopping_patience
        if patience is not None and epoch - state.best["epoch"] >= patience:
            LOG.info("early stopping after epoch %d: no better epoch since epoch %d", epoch, state.best["epoch"])
            state.finished = True
        if not math.isfinite(trained.loss):
            LOG.warning("training stopped after epoch %d: the training loss is %s", epoch, trained.loss)
            state.finished = True
        if checkpoint_path is not None or on_checkpoint is not None:
            serialized = _serialize(trainer, state, params, counts)
            if checkpoint_path is not None:
                _write_atomic(checkpoint_path, serialized)
            if on_checkpoint is not None:
                on_checkpoint(serialized)
        LOG.info("epoch %d/%d train_loss=%.4f val_loss=%.4f val_accuracy=%.3f val_rmse=%.3f lr=%.3g %.1fs", epoch,
                 params.epochs, row["train_loss"], row["val_loss"], row["val_accuracy"], row["val_rmse"],
                 row["lr"], row["seconds"])
        if on_epoch_end is not None:
            on_epoch_end(dict(row))
        epoch += 1

    final_state = _serialize(trainer, state, params, counts)
    model.load_state_dict(state.best["model"])
    model.to("cpu").eval()
    return FitResult(model=model, history=state.history, best_epoch=state.best["epoch"],
                     val_metrics=state.best["val_metrics"], phase_seconds=dict(trainer.timer.seconds),
                     step_losses=state.step_losses, state=final_state, grad_norms=state.grad_norms,
                     resumed_from_epoch=resumed_from)
