"""Stratified train / validation / test split by count."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sklearn.model_selection import train_test_split


@dataclass
class Split:
    """Ids of each part (sorted) and the number of images per count in each part."""

    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    class_counts: dict[str, dict[int, int]]


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _cut(ids: list[str], counts: list[int], fraction: float, seed: int) -> tuple[list, list, list, list]:
    """Stratified cut of `fraction` of the images; returns (kept ids, kept counts, cut ids, cut counts)."""
    if fraction == 0.0:
        return ids, counts, [], []
    try:
        kept_ids, cut_ids, kept_counts, cut_counts = train_test_split(
            ids, counts, test_size=fraction, stratify=counts, random_state=seed)
    except ValueError as error:
        raise ValueError(f"cannot split {len(ids)} images stratified by count with fraction {fraction}: "
                         f"{error}") from None
    return kept_ids, kept_counts, cut_ids, cut_counts


def stratified_split(ids: Sequence[str], counts: Sequence[int], val_fraction: float = 0.15,
                     test_fraction: float = 0.15, seed: int = 0) -> Split:
    """Split ids into train / val / test keeping each count's share (scikit-learn `train_test_split`).

    The result depends only on the (id, count) pairs and the seed, not on their order. A count with fewer
    images than there are non-empty parts cannot be stratified and raises a ValueError naming it.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    if len(ids) != len(counts):
        raise ValueError(f"ids and counts differ in length: {len(ids)} vs {len(counts)}")
    repeated = sorted(id_ for id_, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"ids occur more than once: {repeated[:5]}")
    parts = 1 + (val_fraction > 0) + (test_fraction > 0)
    for count, size in sorted(Counter(counts).items()):
        if size < parts:
            raise ValueError(f"count {count} has only {size} image(s); a stratified split into {parts} parts "
                             f"needs at least {parts} per count")
    pairs = sorted(zip(ids, counts))
    ids_sorted, counts_sorted = [id_ for id_, _ in pairs], [count for _, count in pairs]
    rest_ids, rest_counts, test_ids, test_counts = _cut(ids_sorted, counts_sorted, test_fraction, seed)
    train_ids, train_counts, val_ids, val_counts = _cut(rest_ids, rest_counts, val_fraction / (1.0 - test_fraction),
                                                        seed)
    class_counts = {name: dict(sorted(Counter(part).items()))
                    for name, part in (("train", train_counts), ("val", val_counts), ("test", test_counts))}
    return Split(sorted(train_ids), sorted(val_ids), sorted(test_ids), class_counts)
