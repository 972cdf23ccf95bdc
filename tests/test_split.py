"""Stratified train / validation / test split."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from counting.split import stratified_split


def labelled(sizes: dict[int, int]) -> tuple[list[str], list[int]]:
    pairs = [(f"{count}-{i:03d}", count) for count, n in sizes.items() for i in range(n)]
    random.Random(7).shuffle(pairs)
    return [id_ for id_, _ in pairs], [count for _, count in pairs]


def test_parts_partition_the_ids_and_keep_class_shares():
    ids, counts = labelled({1: 40, 2: 80, 3: 60})
    split = stratified_split(ids, counts, val_fraction=0.2, test_fraction=0.1, seed=0)
    parts = [split.train_ids, split.val_ids, split.test_ids]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert all(part == sorted(part) for part in parts)
    label = dict(zip(ids, counts))
    for name, part, fraction in (("train", split.train_ids, 0.7), ("val", split.val_ids, 0.2),
                                 ("test", split.test_ids, 0.1)):
        assert split.class_counts[name] == dict(sorted(Counter(label[id_] for id_ in part).items()))
        for count, total in Counter(counts).items():
            assert abs(split.class_counts[name][count] - fraction * total) <= 1


def test_split_depends_on_seed_not_on_input_order():
    ids, counts = labelled({0: 20, 1: 30})
    first = stratified_split(ids, counts, seed=3)
    assert stratified_split(ids[::-1], counts[::-1], seed=3) == first
    assert stratified_split(ids, counts, seed=4) != first


def test_no_validation_part():
    ids, counts = labelled({1: 10, 2: 10})
    split = stratified_split(ids, counts, val_fraction=0.0, test_fraction=0.2)
    assert split.val_ids == [] and split.class_counts["val"] == {}
    assert len(split.test_ids) == 4


def test_class_too_small_is_named():
    ids, counts = labelled({1: 20, 4: 2})
    with pytest.raises(ValueError, match="count 4 has only 2 image"):
        stratified_split(ids, counts)


@pytest.mark.parametrize("options, culprit", [({"val_fraction": 1.0}, "val_fraction"),
                                              ({"test_fraction": -0.1}, "test_fraction"),
                                              ({"val_fraction": 0.5, "test_fraction": 0.5}, "0.5 \\+ 0.5")])
def test_bad_fractions_are_named(options, culprit):
    ids, counts = labelled({1: 20, 2: 20})
    with pytest.raises(ValueError, match=culprit):
        stratified_split(ids, counts, **options)


def test_mismatched_or_repeated_ids_are_rejected():
    with pytest.raises(ValueError, match="differ in length: 2 vs 1"):
        stratified_split(["a", "b"], [1])
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        stratified_split(["a", "a", "b"], [1, 1, 2])
