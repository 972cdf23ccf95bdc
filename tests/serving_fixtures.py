"""Tiny model packages and test images shared by the serving-side tests."""

from __future__ import annotations

import base64
import functools

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
