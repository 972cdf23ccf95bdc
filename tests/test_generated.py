import json
from collections import Counter
from pathlib import Path

import pytest

from counting.preprocess import decode_rgb
from counting.sources.generated import (ABID_HEIGHT, ABID_WIDTH, SCALE, bin_count, generate_abid_layout,
                                        make_bin)

REAL_METADATA = Path(__file__).resolve().parents[2] / "shared" / "abid" / "abid-layout" / "metadata"
ITEM_KEYS = {"asin", "height", "length", "name", "normalizedName", "quantity", "weight", "width"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return generate_abid_layout(tmp_path_factory.mktemp("bins"), 12, seed=3, min_count=0, max_count=5,
                                progress=False)


def _metadata(root: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((root / "metadata").glob("*.json"))}


def test_layout_pairs_every_image_with_its_metadata(generated):
    images = sorted(path.stem for path in (generated / "bin-images").glob("*.jpg"))
    metadata = sorted(path.stem for path in (generated / "metadata").glob("*.json"))
    assert images == metadata == [f"{i:05d}" for i in range(1, 13)]


def test_metadata_has_abid_shape(generated):
    for image_id, metadata in _metadata(generated).items():
        assert set(metadata) == {"BIN_FCSKU_DATA", "EXPECTED_QUANTITY"}, image_id
        items = metadata["BIN_FCSKU_DATA"]
        assert sum(item["quantity"] for item in items.values()) == metadata["EXPECTED_QUANTITY"]
        for asin, item in items.items():
            assert set(item) == ITEM_KEYS
            assert item["asin"] == asin and item["quantity"] >= 1 and item["name"] and item["normalizedName"]
            for dimension in ("height", "length", "width"):
                assert item[dimension]["unit"] == "IN" and item[dimension]["value"] > 0
            assert item["weight"]["unit"] == "pounds" and item["weight"]["value"] > 0


def test_products_repeat_with_one_entry_per_distinct_item(tmp_path):
    root = generate_abid_layout(tmp_path, 20, min_count=5, max_count=5, progress=False)
    entries = [len(metadata["BIN_FCSKU_DATA"]) for metadata in _metadata(root).values()]
    assert all(1 <= n <= 5 for n in entries)
    assert min(entries) < 5  # some product appears more than once


@pytest.mark.skipif(not REAL_METADATA.is_dir(), reason="real ABID material not available")
def test_metadata_matches_real_abid_keys_and_formatting(generated):
    real_paths = sorted(REAL_METADATA.glob("*.json"))[:40]
    real = [json.loads(path.read_text()) for path in real_paths]
    real_item_keys = {key for metadata in real for item in metadata["BIN_FCSKU_DATA"].values() for key in item}
    assert real_item_keys == ITEM_KEYS
    assert {key for metadata in real for key in metadata} == {"BIN_FCSKU_DATA", "EXPECTED_QUANTITY"}
    for path in real_paths[:5] + sorted((generated / "metadata").glob("*.json")):  # same text layout
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4, sort_keys=True), path


def _files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_arguments_give_byte_identical_output(tmp_path, generated):
    again = generate_abid_layout(tmp_path / "again", 12, seed=3, min_count=0, max_count=5, progress=False)
    assert _files(again) == _files(generated)


def test_other_seed_gives_other_images(tmp_path, generated):
    other = _files(generate_abid_layout(tmp_path, 12, seed=4, min_count=0, max_count=5, progress=False))
    original = _files(generated)
    assert other.keys() == original.keys()
    assert all(other[name] != original[name] for name in original if name.endswith(".jpg"))


def test_any_image_can_be_regenerated_alone(generated):
    index = 7
    count = bin_count(3, index, 0, 5)
    jpeg, metadata = make_bin(3, index, count)
    assert jpeg == (generated / "bin-images" / f"{index + 1:05d}.jpg").read_bytes()
    assert metadata == _metadata(generated)[f"{index + 1:05d}"]


def test_classes_are_balanced(generated):
    counts = Counter(metadata["EXPECTED_QUANTITY"] for metadata in _metadata(generated).values())
    assert counts == {count: 2 for count in range(6)}
    empty = [m for m in _metadata(generated).values() if m["EXPECTED_QUANTITY"] == 0]
    assert all(m["BIN_FCSKU_DATA"] == {} for m in empty)


@pytest.mark.parametrize("n_images", [50, 53, 1500])
def test_class_sizes_differ_by_at_most_one(n_images):
    sizes = Counter(bin_count(0, index, 1, 5) for index in range(n_images))
    assert set(sizes) == {1, 2, 3, 4, 5}
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_class_order_is_shuffled():
    assert [bin_count(0, index, 1, 5) for index in range(20)] != [1 + index % 5 for index in range(20)]


def test_images_decode_with_varied_abid_like_sizes(generated):
    shapes = set()
    for path in sorted((generated / "bin-images").glob("*.jpg")):
        image = decode_rgb(path.read_bytes(), name=path.name)
        channels, height, width = image.shape
        assert channels == 3
        assert ABID_WIDTH[0] * SCALE - 1 <= width <= ABID_WIDTH[1] * SCALE + 1
        assert ABID_HEIGHT[0] * SCALE - 1 <= height <= ABID_HEIGHT[1] * SCALE + 1
        shapes.add((height, width))
    assert len(shapes) == 12
    aspects = [height / width for height, width in shapes]
    assert max(aspects) - min(aspects) > 0.3


def test_images_are_not_colour_coded_by_count(tmp_path):
    """The mean colour of an image must not give its count away: counts 1 and 5 overlap in brightness."""
    root = generate_abid_layout(tmp_path, 20, min_count=1, max_count=5, seed=1, progress=False)
    brightness: dict[int, list[float]] = {1: [], 5: []}
    for image_id, metadata in _metadata(root).items():
        if metadata["EXPECTED_QUANTITY"] in brightness:
            image = decode_rgb((root / "bin-images" / f"{image_id}.jpg").read_bytes()).float()
            brightness[metadata["EXPECTED_QUANTITY"]].append(image.mean().item())
    assert min(brightness[1]) < max(brightness[5]) and min(brightness[5]) < max(brightness[1])


def test_progress_bar_goes_to_stderr_and_can_be_turned_off(tmp_path, capsys):
    generate_abid_layout(tmp_path / "quiet", 1, progress=False)
    assert capsys.readouterr().err == ""
    generate_abid_layout(tmp_path / "loud", 1, progress=True)
    assert "generating bins" in capsys.readouterr().err


@pytest.mark.parametrize(("arguments", "culprit"), [
    ({"n_images": 0}, "n_images"),
    ({"n_images": 2.5}, "n_images"),
    ({"n_images": True}, "n_images"),
    ({"seed": -1}, "seed"),
    ({"min_count": -1}, "min_count"),
    ({"min_count": 3, "max_count": 2}, "max_count"),
])
def test_bad_arguments_raise_naming_the_argument_and_value(tmp_path, arguments, culprit):
    call = {"n_images": 1, **arguments}
    with pytest.raises(ValueError, match=culprit) as error:
        generate_abid_layout(tmp_path, progress=False, **call)
    assert str(call[culprit]) in str(error.value)
    assert not (tmp_path / "bin-images").exists()


def test_root_that_is_a_file_is_rejected(tmp_path):
    path = tmp_path / "bins"
    path.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        generate_abid_layout(path, 1, progress=False)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: make_bin(0, 0, -1), "count must be >= 0, got -1"),
    (lambda: make_bin(0, -1, 2), "index must be >= 0, got -1"),
    (lambda: make_bin(-2, 0, 2), "seed must be >= 0, got -2"),
    (lambda: bin_count(0, 0, 4, 1), r"max_count must be >= min_count \(4\), got 1"),
    (lambda: bin_count(0, -3, 1, 5), "index must be >= 0, got -3"),
])
def test_single_bin_functions_reject_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
