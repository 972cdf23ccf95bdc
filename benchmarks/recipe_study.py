"""Measure what moves accuracy on real bin photos: train recipe variants side by side on one seeded split.

Prepare a packed copy of a photo folder once (needs the full package), then run the study anywhere torch,
torchvision, timm and scikit-learn are installed (a GPU machine needs neither Metaflow nor boto3):

    python benchmarks/recipe_study.py prepare ../shared/abid/photos photos.pt --image-size 160
    python benchmarks/recipe_study.py study photos.pt --budget-seconds 400 --results results.jsonl

Every variant trains on the same train split, picks its epoch on the validation split, and is scored on the
held-out test split (accuracy, RMSE, off-by-one, with and without test-time flip). Variants run in the order
listed until the time budget is spent; each result is printed and appended to the results file at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.metrics import count_metrics  # noqa: E402
from counting.models import DECODINGS, decode_indices  # noqa: E402
from counting.split import stratified_split  # noqa: E402
from counting.training import LabelledImages, TrainParams, fit, predict_logits  # noqa: E402

BASE = dict(backbone="tf_efficientnet_lite0", weights="imagenet", head="classification", optimizer="adamw",
            lr=1e-3, weight_decay=0.05, label_smoothing=0.1, warmup_epochs=1.0, epochs=12, batch_size=64,
            augment="flip", image_size=160, backbone_lr_mult=1.0, dropout=0.3, seed=0)

VARIANTS: list[tuple[str, dict]] = [
    ("baseline: lite0 ImageNet, CE, AdamW, flip, 160 px, 12 epochs", {}),
    ("ordinal head (CORAL)", {"head": "ordinal"}),
    ("bin augmentation", {"augment": "bin"}),
    ("ordinal + bin augmentation", {"head": "ordinal", "augment": "bin"}),
    ("128 px", {"image_size": 128}),
    ("6 epochs", {"epochs": 6}),
    ("24 epochs, bin augmentation", {"epochs": 24, "augment": "bin"}),
    ("backbone lr x0.1 (discriminative)", {"backbone_lr_mult": 0.1, "lr": 3e-3}),
    ("last 3 stages unfrozen", {"unfreeze": 3}),
    ("linear probe (head only)", {"unfreeze": "head", "lr": 3e-3}),
    ("lr 3e-4", {"lr": 3e-4}),
    ("lr 3e-3", {"lr": 3e-3}),
    ("resnet18 from scratch", {"backbone": "resnet18", "weights": "none", "lr": 3e-3}),
    ("SGD lr 0.03 (seed recipe)", {"optimizer": "sgd", "lr": 0.03, "weight_decay": 1e-4, "label_smoothing": 0.0}),
    ("pretrained on 3,000 generated bins first (4 epochs), then fine-tuned", {"pretrain_generated": 3000}),
]
PRETRAIN_EPOCHS = 4


def prepare(source: str, output: Path, image_size: int, quality: int, min_count: int, max_count: int) -> None:
    """Pack a photo folder (any source the package reads) into one torch file of resized JPEG bytes."""
    from counting.dataset import pack_dataset
    from counting.preprocess import decode_rgb, encode_jpeg_bytes
    from counting.sources import read_source

    result = read_source(source, min_count=min_count, max_count=max_count)
    dataset = pack_dataset(result.records, image_size, skipped=result.skipped)
    images = [encode_jpeg_bytes(decode_rgb(image), quality=quality) for image in dataset.images]
    torch.save({"ids": dataset.ids, "counts": dataset.counts, "images": images, "image_size": image_size}, output)
    print(f"{len(dataset.ids)} images, {output.stat().st_size / 1e6:.1f} MB -> {output}")


def _score(model, images, labels, counts, tta_flip: bool, device: str, image_size: int) -> dict:
    """Test metrics of each way to read a count from the probabilities (argmax, rounded expected count)."""
    probabilities = model.probabilities(predict_logits(model, images, device=device, tta_flip=tta_flip,
                                                                 image_size=image_size))
    truth = [counts[i] for i in labels]
    scores = {}
    for decoding in DECODINGS:
        indices = decode_indices(probabilities, decoding).tolist()
        metrics = count_metrics(truth, [counts[i] for i in indices], counts)
        scores[decoding] = {k: round(float(metrics[k]), 4) for k in ("accuracy", "rmse", "mae", "off_by_one")}
    return scores


def pretrain_on_generated(values: dict, n_images: int, counts: list[int], device: str, scratch: Path) -> str:
    """Train the variant's recipe on generated look-alike bins; return the path of the model's state dict, which
    the real-photo fine-tune then starts from (needs the full package: it generates the bins)."""
    from counting.dataset import pack_dataset
    from counting.pipeline import labelled
    from counting.sources import read_source

    result = read_source("generated", generated_images=n_images, min_count=counts[0], max_count=counts[-1],
                         progress=False)
    generated = pack_dataset(result.records, values["image_size"], progress=False)
    split = stratified_split(generated.ids, generated.counts, val_fraction=0.1, test_fraction=0.0, seed=0)
    params = TrainParams.from_dict({**values, "epochs": PRETRAIN_EPOCHS})
    result = fit(params, labelled(generated, split.train_ids, counts), labelled(generated, split.val_ids, counts),
                 counts=counts, device=device, progress=False)
    print(f"pretrained on {n_images} generated bins: validation accuracy {result.val_metrics['accuracy']:.3f}",
          flush=True)
    path = scratch / "generated-pretrained.pt"
    torch.save(result.model.state_dict(), path)
    return str(path)


def study(data: Path, budget_seconds: float, results: Path, only: list[int] | None, epochs_scale: float,
          image_size: int | None) -> None:
    """Train the variants in order until the budget is spent; print and append one JSON line each."""
    packed = torch.load(data, weights_only=False)
    counts = sorted(set(packed["counts"]))
    split = stratified_split(packed["ids"], packed["counts"], val_fraction=0.15, test_fraction=0.15, seed=0)
    index = {image_id: i for i, image_id in enumerate(packed["ids"])}

    def part(ids):
        rows = [index[i] for i in ids]
        return LabelledImages([packed["images"][r] for r in rows], [packed["counts"][r] - counts[0] for r in rows])

    train, val, test = part(split.train_ids), part(split.val_ids), part(split.test_ids)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{len(train)} train / {len(val)} val / {len(test)} test images, counts {counts}, device {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'})", flush=True)
    started = time.perf_counter()
    chosen = [VARIANTS[i] for i in only] if only else VARIANTS
    for name, overrides in chosen:
        if time.perf_counter() - started > budget_seconds:
            print(f"budget spent; skipped: {name}", flush=True)
            continue
        values = {**BASE, **({"image_size": image_size} if image_size else {}), **overrides}
        pretrain_images = values.pop("pretrain_generated", None)
        if pretrain_images:
            values["weights"] = pretrain_on_generated(values, pretrain_images, counts, device, results.parent)
        values["epochs"] = max(1, round(values["epochs"] * epochs_scale))
        params = TrainParams.from_dict(values)
        t0 = time.perf_counter()
        result = fit(params, train, val, counts=counts, device=device, progress=False)
        seconds = time.perf_counter() - t0
        row = {"variant": name, "params": overrides, "image_size": params.image_size, "epochs": params.epochs, "best_epoch": result.best_epoch,
               "val_accuracy": round(result.val_metrics["accuracy"], 4),
               "test": _score(result.model, test.images, test.labels, counts, False, device, params.image_size),
               "test_flip_tta": _score(result.model, test.images, test.labels, counts, True, device, params.image_size),
               "train_seconds": round(seconds, 1),
               "train_images_per_second": round(len(train) * len(result.history) / seconds, 1)}
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="pack a photo folder into one file")
    prep.add_argument("source")
    prep.add_argument("output", type=Path)
    prep.add_argument("--image-size", type=int, default=160)
    prep.add_argument("--quality", type=int, default=75)
    prep.add_argument("--min-count", type=int, default=1)
    prep.add_argument("--max-count", type=int, default=5)
    run = commands.add_parser("study", help="train the recipe variants on a packed file")
    run.add_argument("data", type=Path)
    run.add_argument("--budget-seconds", type=float, default=1800)
    run.add_argument("--results", type=Path, default=Path("recipe_results.jsonl"))
    run.add_argument("--only", type=int, nargs="*", help="indices of the variants to run")
    run.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every variant's epochs")
    run.add_argument("--image-size", type=int, help="the baseline's image size (variants that set one keep it)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.source, args.output, args.image_size, args.quality, args.min_count, args.max_count)
    else:
        study(args.data, args.budget_seconds, args.results, args.only, args.epochs_scale, args.image_size)


if __name__ == "__main__":
    main()
