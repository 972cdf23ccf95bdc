"""The model package: reproducible bytes, SageMaker layout, isolated handler loading, handler behaviour."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from serving_fixtures import (COUNTS, IMAGE_SIZE, b64, expected_probabilities, jpeg, png, tiny_model,
                              tiny_package)

import counting.models
import counting.preprocess
from counting.models import build_model
from counting.packaging import (REQUIRED_FILES, build_model_package, extract_package, load_handlers, load_package,
                                package_artifact, package_from_artifact, package_sha256)


@pytest.fixture(scope="module")
def handlers(tmp_path_factory: pytest.TempPathFactory):
    return load_package(tiny_package(), tmp_path_factory.mktemp("package"))


def _members(package: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
        return {member.name: member for member in archive.getmembers()}


def test_same_inputs_give_the_same_bytes():
    first = build_model_package(tiny_model(), counts=COUNTS, image_size=IMAGE_SIZE, run_id="F/1", version="v1")
    second = build_model_package(tiny_model(), counts=COUNTS, image_size=IMAGE_SIZE, run_id="F/1", version="v1")
    assert first == second
    assert package_sha256(first) == package_sha256(second)
    other = build_model_package(tiny_model(), counts=COUNTS, image_size=IMAGE_SIZE, run_id="F/1", version="v2")
    assert package_sha256(other) != package_sha256(first)


def test_archive_metadata_is_fixed():
    package = tiny_package()
    assert package[4:8] == b"\0\0\0\0"  # gzip header mtime
    members = _members(package)
    assert list(members) == sorted(members)
    for member in members.values():
        assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644), member.name


def test_layout_follows_sagemaker_pytorch(tmp_path: Path):
    root = extract_package(tiny_package(), tmp_path)
    assert sorted(_members(tiny_package())) == sorted([*REQUIRED_FILES, "code/requirements.txt"])
    assert (root / "code/models.py").read_bytes() == Path(counting.models.__file__).read_bytes()
    assert (root / "code/preprocess.py").read_bytes() == Path(counting.preprocess.__file__).read_bytes()
    assert (root / "code/requirements.txt").read_text() == f"timm=={version('timm')}\n"
    config = json.loads((root / "code/model_config.json").read_text())
    model = tiny_model()
    assert config == {"spec": model.spec, "counts": COUNTS, "image_size": IMAGE_SIZE, "mean": list(model.mean),
                      "std": list(model.std), "temperature": 1.0, "run_id": "TestFlow/v1", "version": "v1"}
    state = torch.load(root / "model.pt", weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_handlers_load_in_isolation(tmp_path: Path):
    first = load_package(tiny_package(), tmp_path / "a")
    second = load_package(tiny_package("v2", seed=1), tmp_path / "b")
    assert first.module is not second.module
    assert first.module.models is not second.module.models
    assert first.module.models is not counting.models
    assert not any(str(tmp_path) in entry for entry in sys.path)
    assert "models" not in sys.modules or sys.modules["models"] is not first.module.models
    answer = first.predict_fn(first.input_fn(jpeg(0), "image/jpeg"), first.model)
    assert answer["model_version"] == "v1"
    assert second.predict_fn(second.input_fn(jpeg(0), "image/jpeg"), second.model)["model_version"] == "v2"


def test_prediction_matches_training_preprocessing(handlers):
    image = jpeg(3, height=50, width=30)
    answer = handlers.predict_fn(handlers.input_fn(image, "image/jpeg"), handlers.model)
    expected = expected_probabilities(tiny_model(), image)
    assert list(answer["probabilities"]) == ["1", "2", "3"]
    assert list(answer["probabilities"].values()) == pytest.approx(expected, abs=1e-6)
    assert answer["count"] == COUNTS[max(range(3), key=expected.__getitem__)]
    assert answer["run_id"] == "TestFlow/v1"


def test_temperature_is_applied(tmp_path: Path):
    hot = load_package(tiny_package(temperature=4.0), tmp_path)
    image = png(5)
    answer = hot.predict_fn(hot.input_fn(image, "image/png"), hot.model)
    expected = expected_probabilities(tiny_model(), image, temperature=4.0)
    assert list(answer["probabilities"].values()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("decoding, count", [("argmax", 1), ("expectation", 2)])
def test_the_packaged_decoding_reads_the_count(tmp_path: Path, decoding, count):
    model = build_model("mobilenet_v3_small", len(COUNTS), weights="none", decoding=decoding).eval()
    with torch.no_grad():  # every image gets probabilities (0.45, 0.10, 0.45): mode 1 (first of two), mean 2
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.45, 0.10, 0.45]).log())
    package = build_model_package(model, counts=COUNTS, image_size=IMAGE_SIZE)
    loaded = load_package(package, tmp_path)
    answer = loaded.predict_fn(loaded.input_fn(png(2), "image/png"), loaded.model)
    assert list(answer["probabilities"].values()) == pytest.approx([0.45, 0.10, 0.45], abs=1e-5)
    assert answer["count"] == count


@pytest.mark.parametrize("content_type", ["image/jpeg", "image/png", "application/x-image", "IMAGE/JPEG; q=1"])
def test_input_fn_accepts_image_bodies(handlers, content_type):
    request = handlers.input_fn(png(1), content_type)
    assert request.single and request.images == [("request body", png(1))]


def test_input_fn_accepts_json_single_and_list(handlers):
    single = handlers.input_fn(json.dumps({"image": b64(jpeg(1))}), "application/json")
    assert single.single and single.images == [("image", jpeg(1))]
    listed = handlers.input_fn(json.dumps({"images": [b64(jpeg(1)), b64(png(2))]}).encode(), "application/json")
    assert not listed.single and listed.images == [("images[0]", jpeg(1)), ("images[1]", png(2))]
    answer = handlers.predict_fn(listed, handlers.model)
    assert len(answer["predictions"]) == 2 and "count" not in answer


def _huge_png_header() -> bytes:
    return png(1)[:16] + (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big") + png(1)[24:]


def _huge_jpeg_header() -> bytes:
    data = bytearray(jpeg(1))
    start = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[start + 5:start + 9] = (60_000).to_bytes(2, "big") * 2
    return bytes(data)


@pytest.mark.parametrize(("body", "content_type", "status", "words"), [
    (b"", "image/jpeg", 400, "empty"),
    (b"not an image", "image/jpeg", 400, "request body: not a readable image"),
    (b"\xff\xd8\xff\xe0 truncated", "image/jpeg", 400, "request body"),
    (jpeg(1), "text/plain", 415, "unsupported content type 'text/plain'"),
    (jpeg(1), None, 415, "unsupported content type None"),
    (b"{not json", "application/json", 400, "malformed JSON"),
    (b"[1, 2]", "application/json", 400, '"image"'),
    (b'{"image": "x", "images": []}', "application/json", 400, '"images"'),
    (b'{"images": []}', "application/json", 400, "non-empty list"),
    (b'{"images": "abc"}', "application/json", 400, "non-empty list"),
    (b'{"image": 5}', "application/json", 400, "image: expected a base64 string, got int"),
    (b'{"image": "@@@"}', "application/json", 400, "image: invalid base64"),
    (b'{"image": ""}', "application/json", 400, "image: empty image"),
    (json.dumps({"images": [b64(jpeg(1)), "bad*"]}).encode(), "application/json", 400, "images[1]: invalid base64"),
    (json.dumps({"images": [b64(jpeg(1)), b64(b"junk")]}).encode(), "application/json", 400,
     "images[1]: not a readable image"),
    (_huge_png_header(), "image/png", 413, "100000x100000 pixels"),
    (_huge_jpeg_header(), "image/jpeg", 413, "60000x60000 pixels"),
])
def test_bad_requests_raise_request_error_with_status(handlers, body, content_type, status, words):
    with pytest.raises(handlers.request_error) as caught:
        handlers.predict_fn(handlers.input_fn(body, content_type), handlers.model)
    assert caught.value.status == status
    assert words in str(caught.value)


def test_body_limit_is_configurable(tmp_path: Path):
    small = load_package(tiny_package(), tmp_path, max_body_bytes=100)
    with pytest.raises(small.request_error) as caught:
        small.input_fn(jpeg(1), "image/jpeg")
    assert caught.value.status == 413 and "limit of 100 bytes" in str(caught.value)
    assert small.module.DEFAULT_MAX_BODY_BYTES == 10 * 1024 * 1024


def test_output_fn_answers_json_only(handlers):
    body, content_type = handlers.output_fn({"count": 1}, "application/json")
    assert (json.loads(body), content_type) == ({"count": 1}, "application/json")
    assert handlers.output_fn({"count": 1}, "text/html, */*;q=0.1")[1] == "application/json"
    with pytest.raises(handlers.request_error) as caught:
        handlers.output_fn({"count": 1}, "text/csv")
    assert caught.value.status == 406


def test_predict_each_isolates_bad_images(handlers):
    results = handlers.predict_each([("a", jpeg(1)), ("b", b"junk"), ("c", png(2))])
    assert isinstance(results[1], handlers.request_error) and "b: not a readable image" in str(results[1])
    assert [r["count"] for r in (results[0], results[2])] == [
        handlers.predict_images([image], handlers.model)[0]["count"] for image in (("a", jpeg(1)), ("c", png(2)))]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"counts": [1, 2]}, "model predicts 3 classes"),
    ({"counts": [1, 3, 4]}, "consecutive"),
    ({"counts": []}, "non-empty"),
    ({"counts": COUNTS, "image_size": 0}, "image_size"),
    ({"counts": COUNTS, "temperature": 0.0}, "temperature"),
    ({"counts": COUNTS, "temperature": float("nan")}, "temperature"),
])
def test_build_rejects_bad_arguments(kwargs, words):
    arguments = {"image_size": IMAGE_SIZE, **kwargs}
    with pytest.raises(ValueError, match=words):
        build_model_package(tiny_model(), **arguments)


def test_extract_rejects_what_is_not_a_package(tmp_path: Path):
    with pytest.raises(ValueError, match="not a model package"):
        extract_package(b"plain bytes", tmp_path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("model.pt")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="lacks code/inference.py"):
        extract_package(buffer.getvalue(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no handler module"):
        load_handlers(tmp_path)


def test_artifact_round_trip_checks_sha256():
    package = tiny_package()
    artifact = package_artifact(package)
    assert artifact["size"] == len(package)
    assert package_from_artifact(artifact) == package
    assert package_from_artifact(package) == package
    with pytest.raises(ValueError, match="does not match"):
        package_from_artifact({**artifact, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="a dict with keys \\['sha256'\\]"):
        package_from_artifact({"sha256": "0" * 64})


def test_gzip_stream_decompresses_to_a_plain_tar():
    raw = gzip.decompress(tiny_package())
    assert raw[257:262] == b"ustar"
