"""Local sources: ABID layout, class folders, file-list subsets, selection options, the generated default."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from counting.sources import Item, cache_dir, list_items, load_items, read_source, shard_items
from counting.sources.subset import listing_path, read_file_list


def reasons(skipped) -> dict[str, str]:
    """Skip reason kind (text before the first colon) by culprit key."""
    return {skip.key: skip.reason.split(":", 1)[0] for skip in skipped}


def write_listing(path: Path, labels: dict[int, list[str]]) -> Path:
    path.write_text(json.dumps({str(count): [f"data/metadata/{id_}.json" for id_ in ids]
                                for count, ids in labels.items()}))
    return path


def write_class_folders(root: Path, labels: dict[int, list[str]], tiny_jpeg) -> Path:
    for count, ids in labels.items():
        (root / str(count)).mkdir(parents=True, exist_ok=True)
        for seed, id_ in enumerate(ids):
            (root / str(count) / f"{id_}.jpg").write_bytes(tiny_jpeg(count * 100 + seed))
    return root


def test_abid_layout_reads_counts_and_bytes(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {"00003": 3, "00001": 1, "00002": 5})
    result = read_source(root, progress=False)
    assert [(r.id, r.count) for r in result.records] == [("00001", 1), ("00002", 5), ("00003", 3)]
    for record in result.records:
        assert record.data == Path(record.key).read_bytes()
        assert Path(record.key) == root.resolve() / "bin-images" / f"{record.id}.jpg"
    assert result.skipped == []


def test_abid_layout_reports_every_bad_input_and_keeps_the_rest(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {"good1": 1, "good2": 2, "nometa": 2, "badjson": 3,
                                                 "nocount": 3, "strcount": 4, "toomany": 9, "dup": 2, "empty": 1})
    images, metadata = root / "bin-images", root / "metadata"
    (metadata / "nometa.json").unlink()
    (metadata / "badjson.json").write_text('{"EXPECTED_QUANTITY": 3')
    (metadata / "nocount.json").write_text('{"BIN_FCSKU_DATA": {}}')
    (metadata / "strcount.json").write_text('{"EXPECTED_QUANTITY": "4"}')
    (metadata / "orphan.json").write_text('{"EXPECTED_QUANTITY": 1}')
    (images / "dup.png").write_bytes((images / "dup.jpg").read_bytes())
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.txt").write_text("not an image")

    result = read_source(root, min_count=0, max_count=5, progress=False)

    assert sorted(r.id for r in result.records) == ["dup", "good1", "good2"]
    found = reasons(result.skipped)
    assert found == {
        str(images / "nometa.jpg"): "image without metadata",
        str(metadata / "badjson.json"): "malformed metadata JSON",
        str(metadata / "nocount.json"): "metadata without EXPECTED_QUANTITY",
        str(metadata / "strcount.json"): "invalid EXPECTED_QUANTITY",
        str(metadata / "orphan.json"): "metadata without image",
        str(images / "toomany.jpg"): "count out of range",
        str(images / "dup.png"): "duplicate id",
        str(images / "empty.jpg"): "empty image file",
        str(images / "notes.txt"): "not an image file",
    }
    for skip in result.skipped:
        assert Path(skip.key).stem in skip.reason


def test_missing_local_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_source(missing, progress=False)


def test_folder_in_no_known_layout_is_rejected(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(ValueError, match="neither ABID layout"):
        read_source(tmp_path, progress=False)


def test_empty_result_says_why(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {"a": 7, "b": 8})
    with pytest.raises(ValueError, match=r"no usable images \(2 skipped: 2 x count out of range"):
        read_source(root, max_count=5, progress=False)


def test_class_folders_label_by_folder(tmp_path, tiny_jpeg):
    root = write_class_folders(tmp_path / "photos", {0: ["a", "b"], 2: ["c"], 4: ["d", "a"]}, tiny_jpeg)
    (root / "misc").mkdir()
    (root / "misc" / "x.jpg").write_bytes(tiny_jpeg(1))
    (root / "2" / ".DS_Store").write_bytes(b"")
    result = read_source(root, min_count=0, max_count=5, progress=False)
    assert [(r.id, r.count) for r in result.records] == [("a", 0), ("b", 0), ("c", 2), ("d", 4)]
    assert reasons(result.skipped) == {str((root / "4" / "a.jpg").resolve()): "duplicate id"}


def test_file_list_selects_and_labels_abid_images(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {"01": 1, "02": 2, "03": 3, "04": 4})
    listing = write_listing(tmp_path / "file_list.json", {2: ["01", "03"], 4: ["04", "05"], 5: ["01"]})
    result = read_source(root, subset=str(listing), progress=False)
    # labels come from the listing, not from metadata; "02" is not listed
    assert [(r.id, r.count) for r in result.records] == [("01", 2), ("03", 2), ("04", 4)]
    found = reasons(result.skipped)
    assert found[str(root.resolve() / "bin-images" / "05.jpg")] == "file not found"
    assert sorted(found.values()) == ["duplicate id", "file not found"]


def test_file_list_over_class_folders_reports_mismatches_and_absent_images(tmp_path, tiny_jpeg):
    root = write_class_folders(tmp_path / "photos", {1: ["a", "b"], 3: ["c"], 0: ["z"]}, tiny_jpeg)
    listing = write_listing(tmp_path / "list.json", {1: ["a"], 2: ["c"], 5: ["gone"]})
    result = read_source(root, subset=str(listing), progress=False)
    assert [(r.id, r.count) for r in result.records] == [("a", 1)]
    kinds = sorted(skip.reason.split(":", 1)[0] for skip in result.skipped)
    assert kinds == ["count mismatch", "image not found"]


@pytest.mark.parametrize("content, culprit", [('["a"]', "expected an object"), ('{"two": []}', "'two'"),
                                               ('{"2": "a.json"}', "'2'"), ("{", "not valid JSON")])
def test_malformed_listing_is_named(tmp_path, write_abid_layout, content, culprit):
    root = write_abid_layout(tmp_path / "abid", {"a": 1})
    listing = tmp_path / "bad.json"
    listing.write_text(content)
    with pytest.raises(ValueError, match=culprit):
        read_source(root, subset=str(listing), progress=False)


def test_unknown_subset_is_named(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {"a": 1})
    with pytest.raises(FileNotFoundError, match="reference-20k"):
        read_source(root, subset="reference-20k", progress=False)


def test_shipped_reference_listing_matches_the_published_one(shared_abid):
    shipped = listing_path("reference-10k")
    assert shipped.read_bytes() == (shared_abid / "file_list.json").read_bytes()
    published = json.loads(shipped.read_text())
    pairs = read_file_list("reference-10k")
    assert Counter(count for _, count in pairs) == {int(k): len(v) for k, v in published.items()}
    assert pairs[0] == (Path(published["1"][0]).stem, 1)


def test_max_per_class_is_capped_and_seeded(tmp_path, write_abid_layout):
    labels = {f"{i:03d}": 1 + i % 3 for i in range(30)}
    root = write_abid_layout(tmp_path / "abid", labels, size=8)

    def pick(seed: int) -> list[str]:
        return [r.id for r in read_source(root, max_per_class=4, seed=seed, progress=False).records]

    assert pick(0) == pick(0)
    assert pick(0) != pick(1)
    assert Counter(labels[id_] for id_ in pick(0)) == {1: 4, 2: 4, 3: 4}


@pytest.mark.parametrize("options, culprit", [({"min_count": -1}, "min_count"), ({"max_count": 0}, "max_count"),
                                              ({"max_per_class": 0}, "max_per_class"), ({"workers": 0}, "workers")])
def test_bad_options_are_named(tmp_path, write_abid_layout, options, culprit):
    root = write_abid_layout(tmp_path / "abid", {"a": 1})
    with pytest.raises(ValueError, match=culprit):
        read_source(root, **{"min_count": 1, **options}, progress=False)


def test_listing_shards_and_loading_match_read_source(tmp_path, write_abid_layout):
    root = write_abid_layout(tmp_path / "abid", {f"{i:02d}": 1 + i % 5 for i in range(11)}, size=8)
    listing = list_items(root, progress=False)
    shards = shard_items(listing.items, 4)
    assert [len(shard) for shard in shards] == [4, 4, 3]
    loaded = [record for shard in shards for record in load_items(shard, progress=False).records]
    assert loaded == read_source(root, progress=False).records
    with pytest.raises(ValueError, match="shard_size"):
        shard_items(listing.items, 0)


def test_load_items_reports_unreadable_files(tmp_path):
    present = tmp_path / "a.jpg"
    present.write_bytes(b"\xff\xd8data")
    result = load_items([Item("a", 1, str(present)), Item("b", 2, str(tmp_path / "b.jpg"))], progress=False)
    assert [r.id for r in result.records] == ["a"]
    assert reasons(result.skipped) == {str(tmp_path / "b.jpg"): "file not found"}


def test_generated_source_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    from counting.sources import generated

    monkeypatch.setenv("COUNTING_CACHE", str(tmp_path / "cache"))
    first = read_source("generated", generated_images=6, seed=3, progress=False)
    assert len(first.records) == 6 and first.skipped == []
    assert all(Path(r.key).is_relative_to(cache_dir()) for r in first.records)
    assert all(1 <= r.count <= 5 for r in first.records)

    def must_not_run(*args, **kwargs):
        raise AssertionError("generated again although cached")

    monkeypatch.setattr(generated, "generate_abid_layout", must_not_run)
    assert read_source("generated", generated_images=6, seed=3, progress=False).records == first.records
    with pytest.raises(AssertionError, match="generated again"):
        read_source("generated", generated_images=6, seed=4, progress=False)
    assert [p.name for p in cache_dir().iterdir() if p.name.startswith(".")] == []


def test_real_abid_layout_reads_with_count_range(shared_abid):
    result = read_source(shared_abid / "abid-layout", min_count=0, max_count=5, progress=False)
    assert Counter(r.count for r in result.records) == {count: 40 for count in range(6)}
    assert len(result.skipped) == 60
    assert {skip.reason.split(":", 1)[0] for skip in result.skipped} == {"count out of range"}
    for record in result.records[:20]:
        metadata = json.loads((shared_abid / "abid-layout" / "metadata" / f"{record.id}.json").read_text())
        assert metadata["EXPECTED_QUANTITY"] == record.count


def test_real_class_folders_read_in_place(shared_abid):
    photos = shared_abid / "photos"
    result = read_source(photos, min_count=0, max_count=5, max_per_class=3, progress=False)
    assert Counter(r.count for r in result.records) == {count: 3 for count in range(6)}
    for record in result.records:
        assert Path(record.key).parent.name == str(record.count)
        assert record.data == Path(record.key).read_bytes()


def test_reference_listing_over_real_photos(shared_abid):
    photos = shared_abid / "photos"
    on_disk = {path.stem: int(path.parent.name) for path in photos.glob("*/*.jpg")}
    listed = dict(read_file_list("reference-10k"))
    listing = list_items(photos, subset="reference-10k", max_per_class=2, progress=False)
    for item in listing.items:
        assert listed[item.id] == on_disk[item.id] == item.count
    absent = [s for s in listing.skipped if s.reason.startswith("image not found")]
    assert len(absent) == len(set(listed) - set(on_disk))
    mismatched = [s for s in listing.skipped if s.reason.startswith("count mismatch")]
    assert len(mismatched) == sum(listed[id_] != count for id_, count in on_disk.items() if id_ in listed)
