"""Packing records into a deterministic, content-addressed PackedDataset; merging shards; rebuilding a run's set."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

from counting.dataset import PackedDataset, merge_datasets, pack_dataset, rebuild_from_manifest
from counting.preprocess import decode_jpeg_batch
from counting.sources import Record, Skip, read_source


@pytest.fixture
def records(tiny_jpeg) -> list[Record]:
    return [Record(f"{i:03d}", 1 + i % 3, tiny_jpeg(i, 24 + i), f"/data/{i:03d}.jpg") for i in range(9)]


def test_pack_resizes_every_image_once_and_records_its_source(records):
    packed = pack_dataset(records[::-1], 16, workers=2, progress=False)
    assert packed.ids == sorted(r.id for r in records)
    assert decode_jpeg_batch(packed.images).shape == (len(records), 3, 16, 16)
    by_id = {r.id: r for r in records}
    for id_, count, entry in zip(packed.ids, packed.counts, packed.manifest):
        assert entry == {"id": id_, "count": by_id[id_].count, "key": by_id[id_].key,
                         "sha256": hashlib.sha256(by_id[id_].data).hexdigest()}
        assert count == by_id[id_].count
    assert packed.class_counts() == {1: 3, 2: 3, 3: 3}
    assert packed.skipped == []


def test_corrupt_images_are_skipped_and_reported(records):
    broken = [Record("trunc", 1, records[0].data[:200], "/data/trunc.jpg"),
              Record("text", 2, b"not an image", "/data/text.jpg"),
              Record(records[1].id, 3, records[2].data, "/data/again.jpg")]
    earlier = [Skip("/data/meta.json", "malformed metadata JSON: /data/meta.json: Expecting value")]
    packed = pack_dataset(records + broken, 16, earlier, progress=False)
    assert packed.ids == sorted(r.id for r in records)
    reasons = {entry["key"]: entry["reason"].split(":", 1)[0] for entry in packed.skipped}
    assert reasons == {"/data/trunc.jpg": "unreadable image", "/data/text.jpg": "unreadable image",
                       "/data/again.jpg": "duplicate id", "/data/meta.json": "malformed metadata JSON"}
    assert all(entry["key"] in entry["reason"] for entry in packed.skipped)


def test_nothing_to_pack_says_why(records):
    bad = [Record("x", 1, b"", "/data/x.jpg")]
    with pytest.raises(ValueError, match=r"no usable images to pack \(1 skipped: 1 x unreadable image"):
        pack_dataset(bad, 16, progress=False)
    assert len(pack_dataset(bad, 16, progress=False, allow_empty=True)) == 0


@pytest.mark.parametrize("options, culprit", [({"image_size": 0}, "image_size"), ({"workers": 0}, "workers")])
def test_bad_pack_options_are_named(records, options, culprit):
    with pytest.raises(ValueError, match=culprit):
        pack_dataset(records, **{"image_size": 16, **options}, progress=False)


def test_pickle_is_deterministic_and_round_trips(records):
    first = pickle.dumps(pack_dataset(records, 16, workers=1, progress=False))
    second = pickle.dumps(pack_dataset(records[::-1], 16, workers=3, progress=False))
    assert first == second
    restored = pickle.loads(first)
    assert isinstance(restored, PackedDataset)
    assert restored == pack_dataset(records, 16, progress=False)
    assert pickle.dumps(restored) == first


def test_fingerprint_addresses_content_not_location(records, tiny_jpeg):
    base = pack_dataset(records, 16, progress=False).fingerprint
    moved = [Record(r.id, r.count, r.data, "s3://bucket/" + r.id) for r in records]
    assert pack_dataset(moved, 16, progress=False).fingerprint == base
    changed_image = records[:-1] + [Record(records[-1].id, records[-1].count, tiny_jpeg(999, 24), records[-1].key)]
    relabelled = records[:-1] + [Record(records[-1].id, 5, records[-1].data, records[-1].key)]
    others = {pack_dataset(changed_image, 16, progress=False).fingerprint,
              pack_dataset(relabelled, 16, progress=False).fingerprint,
              pack_dataset(records, 20, progress=False).fingerprint,
              pack_dataset(records[:-1], 16, progress=False).fingerprint}
    assert base not in others and len(others) == 4


def test_select_keeps_order_and_matches_packing_the_subset(records):
    packed = pack_dataset(records, 16, progress=False)
    chosen = ["005", "001", "007"]
    part = packed.select(chosen)
    assert part.ids == chosen
    assert part.images == [packed.images[packed.ids.index(id_)] for id_ in chosen]
    direct = pack_dataset([r for r in records if r.id in chosen], 16, progress=False)
    assert part.fingerprint == direct.fingerprint
    with pytest.raises(KeyError, match="nope"):
        packed.select(["001", "nope"])


def test_merged_shards_equal_one_pack(records):
    whole = pack_dataset(records, 16, [Skip("/a", "x: /a")], progress=False)
    shards = [pack_dataset(records[4:], 16, [Skip("/a", "x: /a")], progress=False),
              pack_dataset(records[:4], 16, progress=False)]
    assert pickle.dumps(merge_datasets(shards)) == pickle.dumps(whole)


def test_merge_reports_repeated_ids_and_rejects_mixed_sizes(records):
    merged = merge_datasets([pack_dataset(records[:5], 16, progress=False),
                             pack_dataset(records[4:], 16, progress=False)])
    assert merged.ids == sorted(r.id for r in records)
    assert [entry["reason"].split(":")[0] for entry in merged.skipped] == ["duplicate id"]
    with pytest.raises(ValueError, match=r"different image sizes: \[16, 20\]"):
        merge_datasets([pack_dataset(records[:3], 16, progress=False), pack_dataset(records[3:], 20, progress=False)])
    with pytest.raises(ValueError, match="at least one part"):
        merge_datasets([])


def test_rebuild_from_manifest_restores_the_exact_set(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {f"{i:02d}": 1 + i % 5 for i in range(8)}, size=20)
    source = read_source(root, progress=False)
    packed = pack_dataset(source.records, 16, progress=False)
    train = packed.select(packed.ids[:5])
    rebuilt = rebuild_from_manifest(train.manifest, 16, progress=False)
    assert rebuilt.fingerprint == train.fingerprint
    assert rebuilt.images == [train.images[train.ids.index(id_)] for id_ in rebuilt.ids]

    changed = Path(train.manifest[0]["key"])
    changed.write_bytes(Path(train.manifest[1]["key"]).read_bytes())
    with pytest.raises(ValueError, match=f"1 images changed since the manifest was written, e.g. {changed}"):
        rebuild_from_manifest(train.manifest, 16, progress=False)
    changed.unlink()
    with pytest.raises(ValueError, match=f"images unavailable, e.g. file not found: {changed}"):
        rebuild_from_manifest(train.manifest, 16, progress=False)


def test_real_photos_pack_without_loss(shared_abid):
    source = read_source(shared_abid / "abid-layout", min_count=0, max_count=5, max_per_class=2, progress=False)
    packed = pack_dataset(source.records, 32, source.skipped, progress=False)
    assert len(packed) == len(source.records)
    assert decode_jpeg_batch(packed.images).shape == (len(source.records), 3, 32, 32)
    assert len(packed.skipped) == len(source.skipped)
