"""Throughput of the data path: fetch + pack, then the training loader against a plain PIL/ImageFolder loader.

Both loaders read the same images and produce the same thing: normalised float (N, 3, S, S) batches.
- packed: `counting.preprocess.decode_jpeg_batch` on the packed same-size JPEG bytes, then `normalize`;
- baseline: torchvision `ImageFolder` (PIL decode, Resize, ToTensor, Normalize) + `DataLoader(num_workers=0)`
  over the same source images written as class folders.

    python benchmarks/fetch_throughput.py [--source ../shared/abid/photos | generated | s3://...] [--image-size 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from counting.dataset import PackedDataset, pack_dataset
from counting.preprocess import decode_jpeg_batch, normalize
from counting.sources import Record, read_source

PHOTOS = Path(__file__).resolve().parents[1] / "../shared/abid/photos"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timed(run: Callable[[], int]) -> tuple[int, float]:
    """(images processed, seconds) of one call."""
    start = time.perf_counter()
    images = run()
    return images, time.perf_counter() - start


def packed_epoch(packed: PackedDataset, batch_size: int) -> int:
    seen = 0
    for start in range(0, len(packed.images), batch_size):
        batch = normalize(decode_jpeg_batch(packed.images[start:start + batch_size]), MEAN, STD)
        seen += batch.shape[0]
    return seen


def decode_only_epoch(packed: PackedDataset, batch_size: int) -> int:
    """The decode share of `packed_epoch`: uint8 batches, left to be normalised on the training device."""
    return sum(decode_jpeg_batch(packed.images[start:start + batch_size]).shape[0]
               for start in range(0, len(packed.images), batch_size))


def write_class_folders(records: list[Record], root: Path) -> Path:
    for record in records:
        folder = root / str(record.count)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{record.id}.jpg").write_bytes(record.data)
    return root


def baseline_epoch(root: Path, image_size: int, batch_size: int) -> int:
    transform = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                    transforms.Normalize(MEAN, STD)])
    loader = DataLoader(datasets.ImageFolder(str(root), transform=transform), batch_size=batch_size,
                        shuffle=False, num_workers=0)
    return sum(images.shape[0] for images, _ in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(PHOTOS) if PHOTOS.is_dir() else "generated")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-per-class", type=int, default=500)
    parser.add_argument("--min-count", type=int, default=0)
    parser.add_argument("--max-count", type=int, default=5)
    parser.add_argument("--fetch-workers", type=int, default=16)
    parser.add_argument("--pack-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"source {args.source}, image size {args.image_size}, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    source = read_source(args.source, min_count=args.min_count, max_count=args.max_count,
                         max_per_class=args.max_per_class, workers=args.fetch_workers, progress=False)
    fetch_s = time.perf_counter() - start
    start = time.perf_counter()
    packed = pack_dataset(source.records, args.image_size, source.skipped, workers=args.pack_workers,
                          progress=False)
    pack_s = time.perf_counter() - start
    n = len(source.records)
    print(f"fetch          {n / fetch_s:9.0f} images/s  ({n} images, {fetch_s:.2f} s)")
    print(f"pack           {n / pack_s:9.0f} images/s  ({pack_s:.2f} s, {len(packed.skipped)} skipped)")
    print(f"fetch + pack   {n / (fetch_s + pack_s):9.0f} images/s")

    with tempfile.TemporaryDirectory() as scratch:
        kept = set(packed.ids)
        folders = write_class_folders([r for r in source.records if r.id in kept], Path(scratch))
        loaders = {"packed decode only": lambda: decode_only_epoch(packed, args.batch_size),
                   "packed": lambda: packed_epoch(packed, args.batch_size),
                   "PIL ImageFolder": lambda: baseline_epoch(folders, args.image_size, args.batch_size)}
        best = {name: float("inf") for name in loaders}
        for _ in range(args.repeats):  # interleaved, best of n: the machine's load varies
            for name, run in loaders.items():
                images, seconds = timed(run)
                assert images == len(packed), (name, images, len(packed))
                best[name] = min(best[name], seconds)
    rate = {name: len(packed) / seconds for name, seconds in best.items()}
    for name in loaders:
        print(f"loader {name:19s} {rate[name]:9.0f} images/s  (best of {args.repeats} epochs, "
              f"{best[name]:.2f} s each)")
    print(f"ratio packed / PIL  {rate['packed'] / rate['PIL ImageFolder']:9.1f} x (target >= 2x)")


if __name__ == "__main__":
    main()
