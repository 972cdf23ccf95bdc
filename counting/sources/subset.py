"""Choosing which images to use: file_list.json listings, the count range and a per-class cap."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from counting.sources.base import Item, Skip, image_id

SHIPPED_LISTINGS = {"reference-10k": "reference-10k.json"}


def listing_path(subset: str) -> Path:
    """Resolve `subset`: the name of a listing shipped with the package, or the path of a json file."""
    if subset in SHIPPED_LISTINGS:
        return Path(str(resources.files("counting") / "data" / SHIPPED_LISTINGS[subset]))
    path = Path(subset).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(SHIPPED_LISTINGS))
        raise FileNotFoundError(f"subset {subset!r} is neither a shipped listing ({names}) nor an existing json file")
    return path


def read_file_list(subset: str) -> list[tuple[str, int]]:
    """Read a listing `{"<count>": ["data/metadata/<id>.json", ...], ...}` into (id, count) pairs, in file order.

    The base name of each entry, without extension, is the image id.
    """
    path = listing_path(subset)
    try:
        listing = json.loads(path.read_bytes())
    except ValueError as error:
        raise ValueError(f"listing {path}: not valid JSON ({error})") from None
    if not isinstance(listing, dict):
        raise ValueError(f"listing {path}: expected an object mapping counts to lists of metadata paths")
    pairs = []
    for key, entries in listing.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise ValueError(f"listing {path}: key {key!r} is not a count (a non-negative integer)")
        if not isinstance(entries, list) or not all(isinstance(entry, str) and entry for entry in entries):
            raise ValueError(f"listing {path}: value of key {key!r} must be a list of metadata paths")
        pairs.extend((image_id(entry), int(key)) for entry in entries)
    return pairs


def validate_selection(min_count: int, max_count: int, max_per_class: int | None) -> None:
    """Check the selection options, naming the bad one."""
    for name, value in (("min_count", min_count), ("max_count", max_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if max_count < min_count:
        raise ValueError(f"max_count ({max_count}) must be >= min_count ({min_count})")
    if max_per_class is not None and (isinstance(max_per_class, bool) or not isinstance(max_per_class, int)
                                      or max_per_class < 1):
        raise ValueError(f"max_per_class must be a positive integer or None, got {max_per_class!r}")


def select_items(items: Sequence[Item], skipped: list[Skip], *, min_count: int, max_count: int,
                 max_per_class: int | None, seed: int) -> list[Item]:
    """Keep items with counts in [min_count, max_count] (the rest become Skips), at most `max_per_class` per count.

    The per-class choice is a seeded random sample, so the same seed picks the same images; the result is
    sorted by id.
    """
    by_count: dict[int, list[Item]] = defaultdict(list)
    for item in items:
        if min_count <= item.count <= max_count:
            by_count[item.count].append(item)
        else:
            skipped.append(Skip(item.key, f"count out of range: {item.id} has {item.count}, "
                                          f"not in [{min_count}, {max_count}]"))
    rng = random.Random(seed)
    chosen = []
    for count in sorted(by_count):
        members = sorted(by_count[count], key=lambda item: item.id)
        if max_per_class is not None and len(members) > max_per_class:
            members = rng.sample(members, max_per_class)
        chosen.extend(members)
    return sorted(chosen, key=lambda item: item.id)
