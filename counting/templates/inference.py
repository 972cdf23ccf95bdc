"""SageMaker PyTorch inference handlers for the bin-counting model: model_fn, input_fn, predict_fn, output_fn.

The model package ships this file as `code/inference.py` next to `models.py`, `preprocess.py` and
`model_config.json`. It imports nothing from the counting package, so AWS's PyTorch inference container loads it
as it is. Requests are preprocessed exactly as in training: decode_rgb -> resize_square -> normalize.

Request bodies: image/jpeg, image/png or application/x-image with the image itself, or application/json with
{"image": "<base64>"} or {"images": ["<base64>", ...]}. A single image is answered with
{"count", "probabilities": {"<count>": p, ...}, "model_version", "run_id"}; a list with
{"predictions": [{"count", "probabilities"}, ...], "model_version", "run_id"}.
"""

from __future__ import annotations

import base64
import binascii
import http
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

try:  # inside AWS's inference container the toolkit turns this base class into the HTTP status
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ErrorBase
except ImportError:
    _ErrorBase = Exception

CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "model.pt"
JSON_TYPE = "application/json"
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
MAX_BODY_BYTES = int(os.environ.get("COUNTING_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
MAX_PIXELS = int(os.environ.get("COUNTING_MAX_PIXELS", DEFAULT_MAX_PIXELS))
_CODE_DIR = Path(__file__).resolve().parent
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _load_sibling(name: str) -> ModuleType:
    """Import `<name>.py` from this directory under a name private to this module (no clash with other copies)."""
    unique = f"{__name__}__{name}"
    if unique not in sys.modules:
        spec = importlib.util.spec_from_file_location(unique, _CODE_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    return sys.modules[unique]


preprocess = _load_sibling("preprocess")
models = _load_sibling("models")


class RequestError(_ErrorBase):
    """A request the model cannot answer; `status` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str):
        Exception.__init__(self, message)
        self.status = self.status_code = status
        self.message = message
        self.phrase = http.HTTPStatus(status).phrase

    def __str__(self) -> str:
        return self.message


@dataclass
class LoadedModel:
    """The network in eval mode on its device, with the package's configuration."""

    network: torch.nn.Module
    config: dict
    device: torch.device


@dataclass
class ImageRequest:
    """Images of one request as (name, bytes); `single` when the request held one image rather than a list."""

    images: list[tuple[str, bytes]]
    single: bool


def model_fn(model_dir: str) -> LoadedModel:
    """Rebuild the network from `code/model_config.json` and load `model.pt` (weights only)."""
    root = Path(model_dir)
    config = json.loads((root / "code" / CONFIG_NAME).read_text())
    network = models.build_model(**config["spec"], weights="none")
    state = torch.load(root / WEIGHTS_NAME, map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return LoadedModel(network=network.eval().to(device), config=config, device=device)


def input_fn(body: bytes | bytearray | str, content_type: str | None) -> ImageRequest:
    """Validate a request body and return its images; raises RequestError (400, 413 or 415) naming the problem."""
    kind = _media_type(content_type)
    if kind not in IMAGE_TYPES and kind != JSON_TYPE:
        raise RequestError(415, f"unsupported content type {content_type!r}; send one of "
                                f"{', '.join((*IMAGE_TYPES, JSON_TYPE))}")
    data = body.encode() if isinstance(body, str) else bytes(body)
    if len(data) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {len(data)} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")
    if not data:
        raise RequestError(400, "empty request body")
    if kind in IMAGE_TYPES:
        return ImageRequest(images=[_checked_image("request body", data)], single=True)
    return _images_from_json(data)


def predict_images(images: list[tuple[str, bytes]], model: LoadedModel) -> list[dict[str, Any]]:
    """Per image {"count", "probabilities"}: decode, resize, normalise as in training, run the network once."""
    if not images:
        raise RequestError(400, "no images to predict")
    config = model.config
    resized = []
    for name, data in images:
        try:
            image = preprocess.decode_rgb(data, name=name)
        except preprocess.ImageDecodeError as error:
            raise RequestError(400, str(error)) from None
        resized.append(preprocess.resize_square(image, config["image_size"]))
    batch = preprocess.normalize(torch.stack(resized).to(model.device), config["mean"], config["std"])
    with torch.inference_mode():
        logits = model.network(batch)
        probabilities = model.network.probabilities(logits, temperature=config["temperature"])
    counts = config["counts"]
    probabilities = probabilities.float().cpu()
    return [{"count": counts[index], "probabilities": {str(count): p for count, p in zip(counts, row)}}
            for index, row in zip(model.network.decode(probabilities).tolist(), probabilities.tolist())]


def build_answer(request: ImageRequest, predictions: list[dict[str, Any]], model: LoadedModel) -> dict[str, Any]:
    """The response document for one request from its per-image predictions."""
    meta = {"model_version": model.config["version"], "run_id": model.config["run_id"]}
    if request.single:
        return {**predictions[0], **meta}
    return {"predictions": predictions, **meta}


def predict_fn(request: ImageRequest, model: LoadedModel) -> dict[str, Any]:
    """Predict every image of a request; a bad image raises RequestError(400) naming it."""
    return build_answer(request, predict_images(request.images, model), model)


def output_fn(prediction: dict[str, Any], accept: str | None) -> tuple[str, str]:
    """Serialise a prediction as JSON; any other Accept gets RequestError(406)."""
    wanted = {_media_type(part) for part in (accept or "").split(",")}
    if not wanted & {"", "*/*", "application/*", JSON_TYPE}:
        raise RequestError(406, f"cannot answer in {accept!r}; the model answers in {JSON_TYPE}")
    return json.dumps(prediction), JSON_TYPE


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _images_from_json(data: bytes) -> ImageRequest:
    try:
        document = json.loads(data)
    except ValueError as error:
        raise RequestError(400, f"malformed JSON: {error}") from None
    if not isinstance(document, dict) or ("image" in document) == ("images" in document):
        raise RequestError(400, 'JSON body must be an object with either "image": "<base64>" or '
                                '"images": ["<base64>", ...]')
    if "image" in document:
        return ImageRequest(images=[_checked_image("image", _base64("image", document["image"]))], single=True)
    values = document["images"]
    if not isinstance(values, list) or not values:
        raise RequestError(400, f'"images" must be a non-empty list of base64 strings, got {type(values).__name__}'
                                f"{'' if values else ' (empty)'}")
    names = [f"images[{index}]" for index in range(len(values))]
    return ImageRequest(images=[_checked_image(name, _base64(name, value)) for name, value in zip(names, values)],
                        single=False)


def _base64(name: str, value: Any) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, f"{name}: expected a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(400, f"{name}: invalid base64 ({error})") from None
    if not data:
        raise RequestError(400, f"{name}: empty image")
    return data


def _checked_image(name: str, data: bytes) -> tuple[str, bytes]:
    """Refuse PNG/JPEG images whose header declares more than MAX_PIXELS before anything decodes them."""
    size = _declared_size(data)
    if size is not None and size[0] * size[1] > MAX_PIXELS:
        raise RequestError(413, f"{name}: image of {size[0]}x{size[1]} pixels exceeds the limit of "
                                f"{MAX_PIXELS} pixels")
    return name, data


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or JPEG frame header; None for other or unreadable headers."""
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if not data.startswith(b"\xff\xd8"):
        return None
    position = 2
    while position + 9 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:
            position += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
            position += 2
        elif marker in _JPEG_FRAME_MARKERS:
            return (int.from_bytes(data[position + 7:position + 9], "big"),
                    int.from_bytes(data[position + 5:position + 7], "big"))
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None
