"""Reader for the Amazon Bin Image Dataset layout: `bin-images/<id>.jpg` + `metadata/<id>.json`.

The same reader serves a local folder and an S3 prefix: both are a `LayoutStore`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from counting.sources.base import (Item, Listing, Skip, fetch_many, image_id, is_image_name, keep_first_per_id,
                                   read_local)

IMAGES = "bin-images"
METADATA = "metadata"
COUNT_KEY = "EXPECTED_QUANTITY"


class LayoutStore(Protocol):
    """Where an ABID layout lives: a local folder or an S3 prefix."""

    root: str

    def check(self) -> None:
        """Raise FileNotFoundError / PermissionError naming `root` when it cannot be read."""

    def names(self, folder: str) -> list[str]:
        """File names directly under `folder` (empty when the folder is absent)."""

    def key(self, folder: str, name: str) -> str:
        """The full key (path or s3:// URI) of `folder/name`."""

    def read(self, key: str) -> bytes:
        """The bytes at `key`; raises FetchError on failure."""


class LocalStore:
    """An ABID layout in a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = str(Path(root).expanduser().resolve())

    def check(self) -> None:
        path = Path(self.root)
        if not path.exists():
            raise FileNotFoundError(f"data source {self.root}: no such directory")
        if not path.is_dir():
            raise NotADirectoryError(f"data source {self.root}: not a directory")

    def names(self, folder: str) -> list[str]:
        path = Path(self.root) / folder
        if not path.is_dir():
            return []
        return sorted(entry.name for entry in path.iterdir() if entry.is_file() and not entry.name.startswith("."))

    def key(self, folder: str, name: str) -> str:
        return str(Path(self.root) / folder / name)

    def read(self, key: str) -> bytes:
        return read_local(key)


def parse_count(data: bytes, key: str) -> int:
    """The EXPECTED_QUANTITY of an ABID metadata file; a ValueError names the file and what is wrong."""
    try:
        metadata = json.loads(data)
    except ValueError as error:
        raise ValueError(f"malformed metadata JSON: {key}: {error}") from None
    if not isinstance(metadata, dict) or COUNT_KEY not in metadata:
        raise ValueError(f"metadata without {COUNT_KEY}: {key}")
    count = metadata[COUNT_KEY]
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"invalid {COUNT_KEY}: {key}: {count!r} is not a non-negative integer")
    return count


def list_listed(store: LayoutStore, pairs: list[tuple[str, int]]) -> Listing:
    """Items named by a file list: labels come from the list, images are `bin-images/<id>.jpg`."""
    store.check()
    skipped: list[Skip] = []
    items = [Item(id_, count, store.key(IMAGES, f"{id_}.jpg")) for id_, count in pairs]
    return Listing(keep_first_per_id(items, skipped), skipped)


def list_layout(store: LayoutStore, *, workers: int, progress: bool) -> Listing:
    """Every image with its count from `metadata/<id>.json`; images and metadata that do not pair up are Skips."""
    store.check()
    skipped: list[Skip] = []
    images: list[tuple[str, str]] = []
    for name in store.names(IMAGES):
        key = store.key(IMAGES, name)
        if is_image_name(name):
            images.append((image_id(name), key))
        else:
            skipped.append(Skip(key, f"not an image file: {key}"))
    image_ids = {id_ for id_, _ in images}
    metadata: dict[str, str] = {}
    for name in store.names(METADATA):
        key = store.key(METADATA, name)
        if not name.endswith(".json"):
            skipped.append(Skip(key, f"not a metadata file: {key}"))
        elif image_id(name) not in image_ids:
            skipped.append(Skip(key, f"metadata without image: no {IMAGES}/{image_id(name)}.jpg for {key}"))
        else:
            metadata[image_id(name)] = key
    paired = sorted(metadata)
    bodies = fetch_many([metadata[id_] for id_ in paired], store.read, workers=workers, progress=progress,
                        desc="metadata")
    counts: dict[str, int] = {}
    for id_, body in zip(paired, bodies):
        try:
            if not isinstance(body, bytes):
                raise ValueError(str(body))
            counts[id_] = parse_count(body, metadata[id_])
        except ValueError as error:
            skipped.append(Skip(metadata[id_], str(error)))
    items = []
    for id_, key in images:
        if id_ in counts:
            items.append(Item(id_, counts[id_], key))
        elif id_ not in metadata:
            skipped.append(Skip(key, f"image without metadata: {key} has no {METADATA}/{id_}.json"))
    return Listing(keep_first_per_id(items, skipped), skipped)
