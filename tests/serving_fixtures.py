"""Tiny model packages, test images and a SageMaker-capable moto server, shared by the serving-side tests.

moto answers describe calls with empty VpcConfig/DataCaptureConfig objects that sagemaker-core refuses, and has
no UpdateEndpoint: the `moto_sagemaker` fixture patches both into the in-process moto server.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable

import boto3
import pytest
import torch
from torchvision.io import encode_png

from counting.models import CountingModel, build_model
from counting.packaging import build_model_package
from counting.preprocess import decode_rgb, encode_jpeg_bytes, normalize, resize_square

COUNTS = [1, 2, 3]
IMAGE_SIZE = 32
ROLE = "arn:aws:iam::123456789012:role/counting-test"
BUCKET = "counting-models"


def tiny_model(seed: int = 0) -> CountingModel:
    """A randomly initialised mobilenet_v3_small over COUNTS, in eval mode."""
    torch.manual_seed(seed)
    return build_model("mobilenet_v3_small", len(COUNTS), weights="none").eval()


@functools.cache
def tiny_package(version: str = "v1", seed: int = 0, temperature: float = 1.0) -> bytes:
    """The model package of `tiny_model(seed)` (cached: every build of the same inputs gives the same bytes)."""
    return build_model_package(tiny_model(seed), counts=COUNTS, image_size=IMAGE_SIZE, temperature=temperature,
                               run_id=f"TestFlow/{version}", version=version)


def random_image(seed: int, height: int = 40, width: int = 48) -> torch.Tensor:
    """A seeded random uint8 (3, H, W) image."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def jpeg(seed: int, height: int = 40, width: int = 48) -> bytes:
    return encode_jpeg_bytes(random_image(seed, height, width))


def png(seed: int, height: int = 40, width: int = 48) -> bytes:
    return encode_png(random_image(seed, height, width)).numpy().tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_probabilities(model: CountingModel, data: bytes, temperature: float = 1.0) -> list[float]:
    """What training-time preprocessing and the model give for one encoded image."""
    batch = normalize(resize_square(decode_rgb(data), IMAGE_SIZE).unsqueeze(0), model.mean, model.std)
    with torch.inference_mode():
        return model.probabilities(model(batch), temperature=temperature)[0].tolist()


def assert_same_answer(actual: dict, expected: dict) -> None:
    """Answers agree: same keys, counts and metadata, probabilities within float noise of batching."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if key == "predictions":
            assert len(actual[key]) == len(value)
            for one, other in zip(actual[key], value):
                assert_same_answer(one, other)
        elif key == "probabilities":
            assert actual[key] == pytest.approx(value, abs=1e-5)
        else:
            assert actual[key] == value, key


def _drop_empty_objects(original: Callable) -> Callable:
    from moto.core.responses import ActionResult

    def describe(self):
        result = original(self).result
        return ActionResult({key: value for key, value in result.items() if value != {}})

    return describe


def _update_endpoint(self):
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow

    backend = self.sagemaker_backend
    endpoint_name = self._get_param("EndpointName")
    config = backend.describe_endpoint_config(self._get_param("EndpointConfigName"))
    backend.describe_endpoint(endpoint_name)  # raises moto's not-found error for unknown endpoints
    endpoint = backend.endpoints[endpoint_name]
    endpoint.endpoint_config_name = config["EndpointConfigName"]
    endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    endpoint.last_modified_time = utcnow()
    return ActionResult({"EndpointArn": endpoint.arn})


@pytest.fixture
def moto_sagemaker(aws_env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The conftest moto server, able to serve sagemaker-core, with the bucket BUCKET; returns its URL."""
    from moto.sagemaker.responses import SageMakerResponse

    for name in ("describe_model", "describe_endpoint_config", "describe_endpoint"):
        monkeypatch.setattr(SageMakerResponse, name, _drop_empty_objects(getattr(SageMakerResponse, name)))
    monkeypatch.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return aws_env
