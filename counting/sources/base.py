"""Records, skips and items shared by every source, plus the concurrent reader they all use."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Record:
    """One labelled image: its id, object count, source bytes and where it came from (path or s3:// URI)."""

    id: str
    count: int
    data: bytes
    key: str


@dataclass(frozen=True)
class Skip:
    """Something left out of a data set, and why."""

    key: str
    reason: str


@dataclass(frozen=True)
class Item:
    """A labelled image not fetched yet: `key` is a local path or an s3:// URI."""

    id: str
    count: int
    key: str


@dataclass
class Listing:
    """The images selected from a source (not fetched yet) and what the selection left out."""

    items: list[Item]
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class SourceResult:
    """Fetched records and everything left out on the way."""

    records: list[Record]
    skipped: list[Skip] = field(default_factory=list)


class FetchError(Exception):
    """One object could not be read; the message says why (the rest of a data set is unaffected)."""


def summarize_skips(skipped: Iterable[Skip], limit: int = 5) -> str:
    """Group skip reasons (ignoring the culprit's name) into a short 'n x reason' summary."""
    kinds = Counter(skip.reason.split(":", 1)[0] for skip in skipped)
    if not kinds:
        return "nothing was skipped"
    parts = [f"{n} x {reason}" for reason, n in kinds.most_common(limit)]
    if len(kinds) > limit:
        parts.append(f"{len(kinds) - limit} other kinds")
    return "; ".join(parts)


def require_records(records: Sequence[Record], skipped: Sequence[Skip], source: str) -> None:
    """Raise a ValueError explaining why `source` gave no usable records."""
    if not records:
        raise ValueError(f"{source}: no usable images ({len(skipped)} skipped: {summarize_skips(skipped)})")


def image_id(name: str) -> str:
    """The image id of a file name or path: its base name without extension."""
    return Path(name).stem


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def read_local(path: str) -> bytes:
    """Read a local file, turning the usual failures into a FetchError that names it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FetchError(f"file not found: {path}") from None
    except OSError as error:
        raise FetchError(f"cannot read {path}: {error.strerror or error}") from None


def fetch_many(keys: Sequence[str], read: Callable[[str], bytes], *, workers: int, progress: bool,
               desc: str) -> list[bytes | FetchError]:
    """Read every key with `workers` threads, in order; a failed read yields its FetchError instead of bytes."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def attempt(key: str) -> bytes | FetchError:
        try:
            return read(key)
        except FetchError as error:
            return error

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(keys), desc=desc, unit="file", disable=not progress) as bar:
        results = []
        for result in pool.map(attempt, keys):
            results.append(result)
            bar.update()
    return results


def duplicate_skip(id_: str, key: str, count: int, first_key: str, first_count: int) -> Skip:
    """The Skip for `key`, whose id was already taken by `first_key`."""
    return Skip(key, f"duplicate id: {key} repeats id {id_} (count {count}), already taken from {first_key} "
                     f"(count {first_count})")


def keep_first_per_id(items: Iterable[Item], skipped: list[Skip]) -> list[Item]:
    """Drop later items that repeat an id, recording each as a Skip that names the one kept."""
    kept: dict[str, Item] = {}
    for item in items:
        first = kept.get(item.id)
        if first is None:
            kept[item.id] = item
        else:
            skipped.append(duplicate_skip(item.id, item.key, item.count, first.key, first.count))
    return list(kept.values())
