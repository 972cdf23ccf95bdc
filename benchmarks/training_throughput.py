"""Training throughput of counting.training against a bare PyTorch loop, side by side in one run.

Three loops train the same architecture (same seed, batch size, device, AMP and channels_last settings) on the
same in-memory JPEGs, and report training images per second:
  trainer             counting.training: BatchLoader (background decode, augmentation, normalisation) + Trainer
  bare, same decode   a plain loop that decodes, normalises and trains each batch in turn
  bare, pre-decoded   a plain loop over batches decoded and normalised before timing (no data cost at all)
The ratios trainer / bare loop say what the trainer's conveniences cost (target: >= 0.95 against the loop
with the same decode). Needs only torch, torchvision and timm.

    python benchmarks/training_throughput.py --backbone resnet18 --image-size 96 --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import closing

import torch
import torch.nn.functional as F

from counting.images import augment_batch
from counting.models import BACKBONES, build_model
from counting.preprocess import decode_jpeg_batch, encode_jpeg_bytes, normalize
from counting.training import (AUGMENT_POLICIES, BatchLoader, Trainer, TrainParams, autocast,
                               mixed_precision, pick_device)

NUM_CLASSES = 5


def synthetic_jpegs(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Smooth random colour images with fine noise, JPEG-encoded (decoding cost close to photos')."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=generator) * 255
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noisy = smooth + torch.randn(n, 3, size, size, generator=generator) * 12
    images = noisy.round().clamp(0, 255).to(torch.uint8)
    return [encode_jpeg_bytes(image) for image in images]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds for `steps` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - started


def run_trainer(params: TrainParams, jpegs: list[bytes], labels: list[int], device: torch.device,
                warmup: int, steps: int) -> float:
    """Images/s of Trainer.train_one_epoch fed by BatchLoader, as `fit` runs them."""
    trainer = Trainer(params, num_classes=NUM_CLASSES, steps_per_epoch=len(jpegs) // params.batch_size,
                      device=device)
    loader = BatchLoader(jpegs, labels, batch_size=params.batch_size, mean=trainer.model.mean,
                         std=trainer.model.std, image_size=params.image_size, device=device,
                         augment=params.augment, shuffle=True, drop_last=True, seed=params.seed,
                         channels_last=params.channels_last)
    with closing(loader.stream()) as batches:
        trainer.train_one_epoch(itertools.islice(batches, warmup))
        _sync(device)
        started = time.perf_counter()
        trainer.train_one_epoch(itertools.islice(batches, steps))
        _sync(device)
    return steps * params.batch_size / (time.perf_counter() - started)


def bare_step(params: TrainParams, device: torch.device) -> tuple[torch.nn.Module, Callable]:
    """A plain PyTorch training step over (float images, labels) with the trainer's model and settings."""
    torch.manual_seed(params.seed)
    model = build_model(params.backbone, NUM_CLASSES, weights=params.weights, dropout=params.dropout).to(device)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    forward = torch.compile(model) if params.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum, nesterov=True,
                                weight_decay=params.weight_decay)
    dtype, scaler = mixed_precision(params.amp, device)
    model.train()

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device, dtype):
            loss = F.cross_entropy(forward(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    return model, step


def run_bare(params: TrainParams, jpegs: list[bytes], labels: list[int], device: torch.device, warmup: int,
             steps: int, predecoded: bool) -> float:
    """Images/s of a bare loop that decodes every batch in turn, or trains on batches decoded beforehand."""
    model, step = bare_step(params, device)
    memory_format = torch.channels_last if params.channels_last else torch.contiguous_format
    decode_device = device if device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(params.seed)
    size = params.batch_size
    chunks = [(jpegs[i:i + size], torch.tensor(labels[i:i + size]))
              for i in range(0, len(jpegs) - size + 1, size)]

    def prepare(chunk: list[bytes], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = decode_jpeg_batch(chunk, device=decode_device).to(device)
        if params.augment != "none":
            images = augment_batch(images, params.augment, generator)
        images = normalize(images, model.mean, model.std).contiguous(memory_format=memory_format)
        return images, targets.to(device)

    if predecoded:
        ready = [prepare(chunk, targets) for chunk, targets in chunks]
        batches: Iterator = itertools.cycle(ready)
        seconds = _timed(lambda: step(*next(batches)), warmup, steps, device)
    else:
        raw = itertools.cycle(chunks)
        seconds = _timed(lambda: step(*prepare(*next(raw))), warmup, steps, device)
    return steps * params.batch_size / seconds


def _autocast_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "off"


def measure_throughput(*, backbone: str = "resnet50", image_size: int = 224, batch_size: int = 64,
                       steps: int = 20, warmup: int = 3, device: str = "auto", amp: bool = True,
                       channels_last: bool = True, compile: bool = False, augment: str = "none",
                       repeats: int = 1, threads: int | None = None, weights: str = "none") -> dict:
    """Images/s of each loop (best of `repeats` interleaved rounds) and the trainer's ratios to the bare loops."""
    target = torch.device(pick_device() if device == "auto" else device)
    if threads is not None:
        torch.set_num_threads(threads)
    params = TrainParams(backbone=backbone, weights=weights, batch_size=batch_size, image_size=image_size,
                         augment=augment, amp=amp, channels_last=channels_last, compile=compile, lr=0.01)
    n_batches = min(steps + warmup, 16)
    jpegs = synthetic_jpegs(n_batches * batch_size, image_size)
    labels = [index % NUM_CLASSES for index in range(len(jpegs))]
    loops = {
        "trainer": lambda: run_trainer(params, jpegs, labels, target, warmup, steps),
        "bare_same_decode": lambda: run_bare(params, jpegs, labels, target, warmup, steps, predecoded=False),
        "bare_predecoded": lambda: run_bare(params, jpegs, labels, target, warmup, steps, predecoded=True),
    }
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, loop in loops.items():
            rates[name].append(loop())
            if target.type == "cuda":
                torch.cuda.empty_cache()
    best = {name: max(values) for name, values in rates.items()}
    return {"device": str(target), "device_name": torch.cuda.get_device_name(target) if target.type == "cuda"
            else "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "settings": params.to_dict() | {"steps": steps, "warmup": warmup, "repeats": repeats},
            "autocast": _autocast_name(mixed_precision(amp, target)[0]), "images_per_second": best,
            "all_rounds": rates,
            "ratio_to_bare_same_decode": best["trainer"] / best["bare_same_decode"],
            "ratio_to_bare_predecoded": best["trainer"] / best["bare_predecoded"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=sorted(BACKBONES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (fp16 with a gradient scaler where bf16 is unsupported)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--augment", default="none", choices=AUGMENT_POLICIES)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the best of each loop counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this file")
    args = parser.parse_args()
    result = measure_throughput(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size,
                                steps=args.steps, warmup=args.warmup, device=args.device, amp=args.amp,
                                channels_last=args.channels_last, compile=args.compile, augment=args.augment,
                                repeats=args.repeats, threads=args.threads)
    rates = result["images_per_second"]
    print(f"{result['device_name']} ({result['device']}, {result['threads']} threads, torch {result['torch']}): "
          f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, {args.steps} steps, "
          f"autocast {result['autocast']}, channels_last {args.channels_last}, "
          f"compile {args.compile}, augment {args.augment}")
    print(f"  trainer (BatchLoader + Trainer)  {rates['trainer']:9.1f} images/s")
    print(f"  bare loop, same decode           {rates['bare_same_decode']:9.1f} images/s   "
          f"trainer ratio {result['ratio_to_bare_same_decode']:.3f}")
    print(f"  bare loop, pre-decoded tensors   {rates['bare_predecoded']:9.1f} images/s   "
          f"trainer ratio {result['ratio_to_bare_predecoded']:.3f}")
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
