"""The HTTP server and the local deploy target, exercised over real sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import pytest
from serving_fixtures import assert_same_answer, b64, jpeg, png, tiny_package

from counting.deploy import EndpointInfo, InvocationError, get_target
from counting.packaging import load_package
from counting.serving import LocalServer, create_app

BODY_LIMIT = 50_000


@pytest.fixture(scope="module")
def handlers(tmp_path_factory: pytest.TempPathFactory):
    return load_package(tiny_package(), tmp_path_factory.mktemp("package"), max_body_bytes=BODY_LIMIT)


@pytest.fixture(scope="module")
def server(handlers):
    with LocalServer(create_app(handlers), port=0) as running:
        yield running


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _direct(handlers, body: bytes, content_type: str) -> dict:
    return handlers.predict_fn(handlers.input_fn(body, content_type), handlers.model)


def test_ping_reports_the_loaded_model(client):
    response = client.get("/ping")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "model_version": "v1", "run_id": "TestFlow/v1"}


def test_server_binds_localhost_on_a_free_port(server):
    assert server.url.startswith("http://127.0.0.1:") and server.port > 0


@pytest.mark.parametrize(("make", "content_type"), [(jpeg, "image/jpeg"), (png, "image/png"),
                                                    (jpeg, "application/x-image")])
def test_single_image_bodies(client, handlers, make, content_type):
    response = client.post("/invocations", content=make(7), headers={"content-type": content_type})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert_same_answer(answer, _direct(handlers, make(7), content_type))
    assert set(answer) == {"count", "probabilities", "model_version", "run_id"}
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0)


def test_json_single_and_list(client, handlers):
    single = client.post("/invocations", json={"image": b64(png(3))}).json()
    assert_same_answer(single, _direct(handlers, png(3), "image/png"))
    listed = client.post("/invocations", json={"images": [b64(jpeg(1)), b64(png(3))]}).json()
    expected = [_direct(handlers, data, content_type) for data, content_type in ((jpeg(1), "image/jpeg"),
                                                                                  (png(3), "image/png"))]
    assert_same_answer(listed, {"predictions": [{"count": e["count"], "probabilities": e["probabilities"]}
                                                for e in expected], "model_version": "v1", "run_id": "TestFlow/v1"})


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (b"", {"content-type": "image/jpeg"}, 400, "empty request body"),
    (b"definitely not an image", {"content-type": "image/png"}, 400, "not a readable image"),
    (b"\x89PNG\r\n\x1a\n", {"content-type": "image/png"}, 400, "not a readable image"),
    (b"...", {"content-type": "text/plain"}, 415, "unsupported content type"),
    (b"...", {}, 415, "unsupported content type"),
    (b'{"image": ', {"content-type": "application/json"}, 400, "malformed JSON"),
    (b'{"picture": "abc"}', {"content-type": "application/json"}, 400, '"image"'),
    (b'{"image": "%%%"}', {"content-type": "application/json"}, 400, "invalid base64"),
    (b"x" * (BODY_LIMIT + 1), {"content-type": "image/jpeg"}, 413, f"limit of {BODY_LIMIT} bytes"),
    (None, {"content-type": "image/jpeg", "accept": "text/csv"}, 406, "application/json"),
])
def test_malformed_requests_get_json_errors_and_the_server_lives_on(client, body, headers, status, words):
    response = client.post("/invocations", content=jpeg(1) if body is None else body, headers=headers)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert client.get("/ping").status_code == 200


def test_chunked_body_over_the_limit_is_refused(client):
    def chunks():
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b"y" * 1000

    response = client.post("/invocations", content=chunks(), headers={"content-type": "image/jpeg"})
    assert response.status_code == 413 and "exceeds the limit" in response.json()["error"]


def test_default_limit_is_ten_megabytes(tmp_path: Path):
    default = load_package(tiny_package(), tmp_path)
    with LocalServer(create_app(default), port=0) as running:
        response = httpx.post(f"{running.url}/invocations", content=b"z" * (10 * 1024 * 1024 + 1),
                              headers={"content-type": "image/jpeg"}, timeout=30)
    assert response.status_code == 413 and "10485760" in response.json()["error"]


def test_concurrent_requests_are_answered_each_on_its_own(server, handlers):
    bodies = [(jpeg(i), "image/jpeg") if i % 4 else (b"broken %d" % i, "image/jpeg") for i in range(24)]

    def send(item):
        body, content_type = item
        return httpx.post(f"{server.url}/invocations", content=body, headers={"content-type": content_type},
                          timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, bodies))
    for (body, content_type), response in zip(bodies, responses):
        if body.startswith(b"broken"):
            assert response.status_code == 400 and "not a readable image" in response.json()["error"]
        else:
            assert_same_answer(response.json(), _direct(handlers, body, content_type))


def test_unbatched_app_gives_the_same_answers(handlers, client):
    with LocalServer(create_app(handlers, max_batch_images=1), port=0) as plain:
        response = httpx.post(f"{plain.url}/invocations", json={"images": [b64(jpeg(2)), b64(png(4))]})
        bad = httpx.post(f"{plain.url}/invocations", content=b"junk", headers={"content-type": "image/jpeg"})
    assert_same_answer(response.json(), client.post("/invocations",
                                                    json={"images": [b64(jpeg(2)), b64(png(4))]}).json())
    assert bad.status_code == 400


@pytest.mark.parametrize("max_batch_images", [1, 16])
def test_a_failing_forward_pass_gives_500_and_the_server_goes_on(handlers, max_batch_images):
    calls = []

    def flaky(images, model):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return handlers.predict_images(images, model)

    broken = dataclasses.replace(handlers, predict_images=flaky)
    with LocalServer(create_app(broken, max_batch_images=max_batch_images), port=0) as running:
        first = httpx.post(f"{running.url}/invocations", content=jpeg(1), headers={"content-type": "image/jpeg"})
        second = httpx.post(f"{running.url}/invocations", content=jpeg(1), headers={"content-type": "image/jpeg"})
    assert first.status_code == 500 and first.json()["error"] == "internal error: RuntimeError: device lost"
    assert_same_answer(second.json(), _direct(handlers, jpeg(1), "image/jpeg"))


def test_sagemaker_runtime_stand_in(server, handlers, monkeypatch, tmp_path):
    for name, value in {"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": server.url, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_MAX_ATTEMPTS": "1", "AWS_CONFIG_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(name, value)
    runtime = boto3.client("sagemaker-runtime")
    answer = runtime.invoke_endpoint(EndpointName="bin-counter", ContentType="image/png", Body=png(9))
    assert answer["ContentType"] == "application/json"
    assert_same_answer(json.loads(answer["Body"].read()), _direct(handlers, png(9), "image/png"))
    with pytest.raises(runtime.exceptions.ModelError) as caught:
        runtime.invoke_endpoint(EndpointName="bin-counter", ContentType="image/png", Body=b"no image")
    assert caught.value.response["OriginalStatusCode"] == 400
    assert "not a readable image" in json.loads(caught.value.response["OriginalMessage"])["error"]


def test_busy_port_is_reported(server, handlers):
    with pytest.raises(OSError, match=f"could not start on 127.0.0.1:{server.port}"):
        LocalServer(create_app(handlers), port=server.port).start()


def test_port_must_be_valid(handlers):
    with pytest.raises(ValueError, match="port"):
        LocalServer(create_app(handlers), port=70000)


def test_local_target_deploys_updates_invokes_and_deletes():
    target = get_target("local", port=0)
    info = target.deploy(tiny_package(), "bin-counter")
    assert (info.target, info.name) == ("local", "bin-counter") and info.url.startswith("http://127.0.0.1:")
    assert target.invoke(info, jpeg(1), "image/jpeg")["model_version"] == "v1"
    with pytest.raises(InvocationError) as caught:
        target.invoke(info, b"nope", "image/jpeg")
    assert caught.value.status == 400 and "not a readable image" in caught.value.message
    updated = target.deploy(tiny_package("v2", seed=1), "bin-counter")
    assert target.invoke(updated, jpeg(1), "image/jpeg")["model_version"] == "v2"
    target.delete(updated)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{updated.url}/ping")
    with pytest.raises(ValueError, match="no local endpoint named 'bin-counter'"):
        target.delete(updated)


def test_targets_validate_names():
    with pytest.raises(ValueError, match="unknown deploy target 'azure'"):
        get_target("azure")
    with pytest.raises(ValueError, match="endpoint name 'bad_name'"):
        get_target("local").deploy(tiny_package(), "bad_name")
    with pytest.raises(ValueError, match="has no URL"):
        get_target("local").invoke(EndpointInfo(target="sagemaker", name="x"), b"", "image/jpeg")

