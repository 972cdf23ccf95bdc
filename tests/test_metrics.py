"""Tests for counting.metrics."""

import math

import numpy as np
import pytest

from counting.metrics import count_metrics


def test_count_metrics_on_a_small_case():
    counts = [1, 2, 3]
    true = [1, 1, 2, 3, 3]
    pred = [1, 2, 2, 1, 3]  # errors 0, +1, 0, -2, 0
    metrics = count_metrics(true, pred, counts)
    assert metrics["n"] == 5
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["mae"] == pytest.approx((0 + 1 + 0 + 2 + 0) / 5)
    assert metrics["rmse"] == pytest.approx(math.sqrt((0 + 1 + 0 + 4 + 0) / 5))
    assert metrics["off_by_one"] == pytest.approx(4 / 5)
    assert metrics["per_class_accuracy"] == {1: pytest.approx(1 / 2), 2: 1.0, 3: pytest.approx(1 / 2)}
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_absent_class_has_no_accuracy_and_numpy_input_works():
    metrics = count_metrics(np.array([0, 0]), np.array([0, 2]), counts=[0, 1, 2])
    assert metrics["per_class_accuracy"] == {0: 0.5, 1: None, 2: None}
    assert metrics["confusion_matrix"] == [[1, 0, 1], [0, 0, 0], [0, 0, 0]]
    assert metrics["off_by_one"] == 0.5


@pytest.mark.parametrize("true,pred,match", [
    ([1, 2], [1], "equally long"),
    ([], [], "non-empty"),
    ([1, 7], [1, 1], "true_counts holds counts outside"),
    ([1, 2], [1, 1.5], "pred_counts must hold whole counts"),
])
def test_invalid_inputs_name_the_culprit(true, pred, match):
    with pytest.raises(ValueError, match=match):
        count_metrics(true, pred, [1, 2, 3])
