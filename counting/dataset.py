"""A packed, content-addressed snapshot of a data set: every image decoded once, resized and re-encoded.

`pack_dataset` turns fetched records into a `PackedDataset` of same-size JPEGs with a manifest (id, count,
sha256 of the source bytes, key) and a fingerprint over that content. Pickling a PackedDataset is
deterministic: the same images give the same bytes, so content-addressed stores keep one copy.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from counting.preprocess import ImageDecodeError, decode_rgb, encode_jpeg_bytes, resize_square
from counting.sources import Item, Record, Skip, load_items
from counting.sources.base import duplicate_skip, summarize_skips

JPEG_QUALITY = 90
PACK_FORMAT = 1  # bump when packing changes the stored images for the same sources


def _json_bytes(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def fingerprint_of(manifest: Iterable[Mapping], image_size: int) -> str:
    """sha256 over (id, count, source sha256) of every image, sorted by id, and the packing settings.

    Where an image came from (its key) is left out: the same images read from another place give the same
    fingerprint, and any changed image or label changes it.
    """
    content = sorted((entry["id"], entry["count"], entry["sha256"]) for entry in manifest)
    settings = {"format": PACK_FORMAT, "image_size": image_size, "jpeg_quality": JPEG_QUALITY}
    return hashlib.sha256(_json_bytes({"settings": settings, "images": content})).hexdigest()


def _sorted_skips(skipped: Iterable[Skip | Mapping]) -> list[dict]:
    entries = {(s.key, s.reason) if isinstance(s, Skip) else (s["key"], s["reason"]) for s in skipped}
    return [{"key": key, "reason": reason} for key, reason in sorted(entries)]


@dataclass
class PackedDataset:
    """Same-size JPEGs with their counts, the manifest of their sources, what was skipped and a fingerprint."""

    ids: list[str]
    counts: list[int]
    images: list[bytes]
    image_size: int
    manifest: list[dict]
    skipped: list[dict]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.ids)

    def class_counts(self) -> dict[int, int]:
        """Number of images per count, in count order."""
        return dict(sorted(Counter(self.counts).items()))

    def select(self, ids: Sequence[str]) -> PackedDataset:
        """The images with these ids, in this order (e.g. one part of a split), with their own fingerprint."""
        position = {id_: index for index, id_ in enumerate(self.ids)}
        unknown = [id_ for id_ in ids if id_ not in position]
        if unknown:
            raise KeyError(f"ids not in the data set: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        if len(set(ids)) != len(ids):
            repeated = sorted(id_ for id_, n in Counter(ids).items() if n > 1)
            raise ValueError(f"ids selected more than once: {repeated[:5]}")
        rows = [position[id_] for id_ in ids]
        manifest = [self.manifest[row] for row in rows]
        return PackedDataset(ids=list(ids), counts=[self.counts[row] for row in rows],
                             images=[self.images[row] for row in rows], image_size=self.image_size,
                             manifest=manifest, skipped=list(self.skipped),
                             fingerprint=fingerprint_of(manifest, self.image_size))

    def __getstate__(self) -> tuple[bytes, bytes]:
        """A canonical form (sorted-key JSON header + one bytes blob of all images) for deterministic pickles."""
        header = {"ids": self.ids, "counts": self.counts, "image_size": self.image_size, "manifest": self.manifest,
                  "skipped": self.skipped, "fingerprint": self.fingerprint,
                  "sizes": [len(image) for image in self.images]}
        return _json_bytes(header), b"".join(self.images)

    def __setstate__(self, state: tuple[bytes, bytes]) -> None:
        header_bytes, blob = state
        header = json.loads(header_bytes)
        images, start = [], 0
        for size in header.pop("sizes"):
            images.append(blob[start:start + size])
            start += size
        self.__dict__.update(header, images=images)


def _build(rows: Iterable[tuple[dict, bytes]], image_size: int, skipped: Iterable[Skip | Mapping],
           allow_empty: bool) -> PackedDataset:
    """Assemble a PackedDataset from (manifest entry, packed JPEG) rows, sorted by id."""
    rows = sorted(rows, key=lambda row: row[0]["id"])
    skips = _sorted_skips(skipped)
    if not rows and not allow_empty:
        raise ValueError(f"no usable images to pack ({len(skips)} skipped: "
                         f"{summarize_skips(Skip(s['key'], s['reason']) for s in skips)})")
    manifest = [entry for entry, _ in rows]
    return PackedDataset(ids=[entry["id"] for entry in manifest], counts=[entry["count"] for entry in manifest],
                         images=[image for _, image in rows], image_size=image_size, manifest=manifest,
                         skipped=skips, fingerprint=fingerprint_of(manifest, image_size))


def _unique(rows: Iterable[tuple[dict, bytes]], skipped: list[Skip]) -> list[tuple[dict, bytes]]:
    """Keep the first row of each id; later ones become Skips naming the one kept."""
    kept: dict[str, dict] = {}
    unique = []
    for entry, image in rows:
        first = kept.get(entry["id"])
        if first is None:
            kept[entry["id"]] = entry
            unique.append((entry, image))
        else:
            skipped.append(duplicate_skip(entry["id"], entry["key"], entry["count"], first["key"], first["count"]))
    return unique


def _pack_one(record: Record, image_size: int) -> tuple[dict, bytes] | Skip:
    try:
        image = decode_rgb(record.data, name=record.key)
    except ImageDecodeError as error:
        return Skip(record.key, f"unreadable image: {error}")
    packed = encode_jpeg_bytes(resize_square(image, image_size), quality=JPEG_QUALITY)
    entry = {"id": record.id, "count": record.count, "sha256": hashlib.sha256(record.data).hexdigest(),
             "key": record.key}
    return entry, packed


def pack_dataset(records: Sequence[Record], image_size: int, skipped: Iterable[Skip | Mapping] = (),
                 workers: int = 2, progress: bool = True, allow_empty: bool = False) -> PackedDataset:
    """Decode each record once, resize it to image_size x image_size and re-encode it as JPEG (quality 90).

    Runs on `workers` threads. Unreadable images and repeated ids are skipped and reported in `skipped`
    together with the given `skipped`. An empty result raises a ValueError saying why, unless `allow_empty`
    (for one shard of a larger set; `merge_datasets` then checks the whole).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    skips: list[Skip] = [s if isinstance(s, Skip) else Skip(s["key"], s["reason"]) for s in skipped]
    rows = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(records), desc="pack", unit="img", disable=not progress) as bar:
        for result in pool.map(lambda record: _pack_one(record, image_size), records):
            if isinstance(result, Skip):
                skips.append(result)
            else:
                rows.append(result)
            bar.update()
    rows = _unique(rows, skips)
    return _build(rows, image_size, skips, allow_empty)


def merge_datasets(parts: Sequence[PackedDataset]) -> PackedDataset:
    """Join packed shards into one data set (sorted by id); an id in several shards is kept once and reported."""
    if not parts:
        raise ValueError("merge_datasets needs at least one part")
    sizes = sorted({part.image_size for part in parts})
    if len(sizes) > 1:
        raise ValueError(f"cannot merge parts packed at different image sizes: {sizes}")
    skipped = [Skip(s["key"], s["reason"]) for part in parts for s in part.skipped]
    rows = _unique(((entry, image) for part in parts for entry, image in zip(part.manifest, part.images)), skipped)
    return _build(rows, sizes[0], skipped, allow_empty=False)


def rebuild_from_manifest(manifest: Sequence[Mapping], image_size: int, *, anonymous: bool | None = None,
                          workers: int = 16, progress: bool = True) -> PackedDataset:
    """Rebuild the exact data set a manifest describes, e.g. the training set of a past run.

    Every image is fetched again from its recorded key and checked against its recorded sha256, then packed
    at `image_size` (the run's image size); the result has the original fingerprint. An image that is gone or
    has changed raises a ValueError naming it, since the exact set can no longer be rebuilt.
    """
    items = []
    for index, entry in enumerate(manifest):
        missing = [field for field in ("id", "count", "sha256", "key") if field not in entry]
        if missing:
            raise ValueError(f"manifest entry {index} lacks {missing}")
        items.append(Item(str(entry["id"]), int(entry["count"]), str(entry["key"])))
    loaded = load_items(items, anonymous=anonymous, workers=workers, progress=progress)
    if loaded.skipped:
        raise ValueError(f"cannot rebuild: {len(loaded.skipped)} images unavailable, "
                         f"e.g. {loaded.skipped[0].reason}")
    expected = {str(entry["id"]): entry["sha256"] for entry in manifest}
    changed = [record.key for record in loaded.records
               if hashlib.sha256(record.data).hexdigest() != expected[record.id]]
    if changed:
        raise ValueError(f"cannot rebuild: {len(changed)} images changed since the manifest was written, "
                         f"e.g. {changed[0]}")
    packed = pack_dataset(loaded.records, image_size, workers=workers, progress=progress)
    if packed.skipped:
        raise ValueError(f"cannot rebuild: {packed.skipped[0]['reason']}")
    return packed
