"""Labelled bin photos from one URI.

- `"generated"`: look-alike bins generated once into a cache folder (`$COUNTING_CACHE`, else
  `~/.cache/counting`), keyed by the generation arguments, then read like real data;
- a local folder in ABID layout (`bin-images/<id>.jpg` + `metadata/<id>.json`);
- a local folder in class-folder layout (`<root>/<count>/<image>.jpg`);
- `s3://bucket/prefix` in ABID layout (`s3://aft-vbi-pds` is read anonymously).

`read_source` lists and fetches in one call. For fetching on several tasks, call `list_items`, split the
items with `shard_items`, and `load_items` each shard.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from counting.sources.abid import IMAGES, LocalStore, list_layout, list_listed
from counting.sources.base import (FetchError, Item, Listing, Record, Skip, SourceResult, fetch_many, read_local,
                                   require_records)
from counting.sources.class_folders import count_folders, list_class_folders
from counting.sources.s3 import S3Reader, S3Store, is_s3_uri
from counting.sources.subset import read_file_list, select_items, validate_selection

__all__ = ["FetchError", "Item", "Listing", "Record", "Skip", "SourceResult", "cache_dir", "generated_root",
           "list_items", "load_items", "read_source", "shard_items"]

GENERATED = "generated"


def cache_dir() -> Path:
    """Where generated data is kept: `$COUNTING_CACHE`, else `~/.cache/counting`."""
    return Path(os.environ.get("COUNTING_CACHE") or Path.home() / ".cache" / "counting").expanduser()


def generated_root(n_images: int, seed: int, min_count: int, max_count: int, progress: bool = True) -> Path:
    """The generated ABID layout for these arguments, generating it on first use.

    The folder name holds the arguments and a hash of the generator's code, so a changed generator makes
    a fresh folder. Generation writes to a temporary folder renamed into place, so parallel callers are safe.
    """
    from counting.sources import generated

    code = hashlib.sha256(Path(generated.__file__).read_bytes()).hexdigest()[:12]
    root = cache_dir() / f"generated-n{n_images}-seed{seed}-counts{min_count}-{max_count}-{code}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    scratch = root.parent / f".{root.name}.{uuid.uuid4().hex}"
    try:
        generated.generate_abid_layout(scratch, n_images, seed=seed, min_count=min_count, max_count=max_count,
                                       progress=progress)
        scratch.rename(root)
    except OSError:
        if not root.is_dir():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def list_items(uri: str | os.PathLike, *, subset: str | None = None, min_count: int = 1, max_count: int = 5,
               max_per_class: int | None = None, generated_images: int = 1500, seed: int = 0,
               anonymous: bool | None = None, workers: int = 16, progress: bool = True) -> Listing:
    """Select the images of a source without fetching them.

    Labels come from `subset` (a file_list.json path, or "reference-10k" for the shipped listing) when given,
    else from the class folders or `metadata/<id>.json`. Counts outside [min_count, max_count] and bad
    entries become Skips; `max_per_class` keeps a seeded random sample per count. Items are sorted by id.
    """
    validate_selection(min_count, max_count, max_per_class)
    _check_positive("workers", workers)
    uri = os.fspath(uri)
    if not uri:
        raise ValueError("data source URI is empty")
    pairs = read_file_list(subset) if subset is not None else None
    if uri == GENERATED:
        _check_positive("generated_images", generated_images)
        uri = str(generated_root(generated_images, seed, min_count, max_count, progress))
    if is_s3_uri(uri):
        store = S3Store(uri, anonymous, workers)
        listing = list_listed(store, pairs) if pairs is not None else list_layout(store, workers=workers,
                                                                                  progress=progress)
    else:
        listing = _list_local(Path(uri), pairs, workers, progress)
    items = select_items(listing.items, listing.skipped, min_count=min_count, max_count=max_count,
                         max_per_class=max_per_class, seed=seed)
    return Listing(items, listing.skipped)


def _list_local(root: Path, pairs: list[tuple[str, int]] | None, workers: int, progress: bool) -> Listing:
    store = LocalStore(root)
    store.check()
    if (Path(store.root) / IMAGES).is_dir():
        return list_listed(store, pairs) if pairs is not None else list_layout(store, workers=workers,
                                                                               progress=progress)
    if count_folders(Path(store.root)):
        return list_class_folders(Path(store.root), pairs)
    raise ValueError(f"data source {store.root}: neither ABID layout ({IMAGES}/ + metadata/) nor class folders "
                     "(<count>/<image>.jpg)")


def shard_items(items: Sequence[Item], shard_size: int) -> list[list[Item]]:
    """Split items into consecutive shards of at most `shard_size`, e.g. one per Metaflow foreach task."""
    _check_positive("shard_size", shard_size)
    return [list(items[start:start + shard_size]) for start in range(0, len(items), shard_size)]


def load_items(items: Sequence[Item], *, anonymous: bool | None = None, workers: int = 16,
               progress: bool = True) -> SourceResult:
    """Fetch the bytes of `items` concurrently (local paths and s3:// URIs); failed or empty reads become Skips.

    An empty result is returned as is (a shard may be all bad); `read_source` raises instead.
    """
    _check_positive("workers", workers)
    s3_reader = S3Reader(anonymous, workers)

    def read(key: str) -> bytes:
        return s3_reader(key) if is_s3_uri(key) else read_local(key)

    bodies = fetch_many([item.key for item in items], read, workers=workers, progress=progress, desc="images")
    records, skipped = [], []
    for item, body in zip(items, bodies):
        if not isinstance(body, bytes):
            skipped.append(Skip(item.key, str(body)))
        elif not body:
            skipped.append(Skip(item.key, f"empty image file: {item.key}"))
        else:
            records.append(Record(item.id, item.count, body, item.key))
    return SourceResult(records, skipped)


def read_source(uri: str | os.PathLike, *, subset: str | None = None, min_count: int = 1, max_count: int = 5,
                max_per_class: int | None = None, generated_images: int = 1500, seed: int = 0,
                anonymous: bool | None = None, workers: int = 16, progress: bool = True) -> SourceResult:
    """List and fetch a source (see `list_items`); raises a ValueError saying why when nothing usable is left.

    Images are not decoded here: `counting.dataset.pack_dataset` decodes each once and skips corrupt ones.
    """
    listing = list_items(uri, subset=subset, min_count=min_count, max_count=max_count, max_per_class=max_per_class,
                         generated_images=generated_images, seed=seed, anonymous=anonymous, workers=workers,
                         progress=progress)
    loaded = load_items(listing.items, anonymous=anonymous, workers=workers, progress=progress)
    skipped = listing.skipped + loaded.skipped
    require_records(loaded.records, skipped, os.fspath(uri))
    return SourceResult(loaded.records, skipped)
