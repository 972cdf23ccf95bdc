"""Count metrics: accuracy, errors in items, per-class accuracy and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _count_array(values: Sequence[int] | np.ndarray, name: str, counts: Sequence[int]) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional; got shape {array.shape}")
    if array.size and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{name} must hold whole counts")
    unknown = sorted(set(array.astype(int).tolist()) - set(counts))
    if unknown:
        raise ValueError(f"{name} holds counts outside {list(counts)}: {unknown[:10]}")
    return array.astype(int)


def count_metrics(true_counts: Sequence[int] | np.ndarray, pred_counts: Sequence[int] | np.ndarray,
                  counts: Sequence[int]) -> dict:
    """Compare predicted with true counts (lists, numpy arrays or CPU tensors).

    Returns n, accuracy, rmse and mae (in items), off_by_one (share with |error| <= 1), per_class_accuracy
    {count: accuracy, or None for a count absent from true_counts} and confusion_matrix (rows: true count,
    columns: predicted count, both in `counts` order).
    """
    counts = [int(count) for count in counts]
    if not counts or len(set(counts)) != len(counts):
        raise ValueError(f"counts must be distinct and non-empty; got {counts}")
    true = _count_array(true_counts, "true_counts", counts)
    pred = _count_array(pred_counts, "pred_counts", counts)
    if len(true) != len(pred) or not len(true):
        raise ValueError(f"true_counts and pred_counts must be non-empty and equally long; got {len(true)} and "
                         f"{len(pred)}")
    index = {count: i for i, count in enumerate(counts)}
    matrix = np.zeros((len(counts), len(counts)), dtype=int)
    np.add.at(matrix, ([index[c] for c in true], [index[c] for c in pred]), 1)
    error = (pred - true).astype(float)
    row_totals = matrix.sum(axis=1)
    return {
        "n": int(len(true)),
        "accuracy": float(np.mean(error == 0)),
        "rmse": float(np.sqrt(np.mean(error ** 2))),
        "mae": float(np.mean(np.abs(error))),
        "off_by_one": float(np.mean(np.abs(error) <= 1)),
        "per_class_accuracy": {count: (float(matrix[i, i] / row_totals[i]) if row_totals[i] else None)
                               for i, count in enumerate(counts)},
        "confusion_matrix": matrix.tolist(),
    }
