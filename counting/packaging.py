"""Build, check, unpack and load the model package: a reproducible `model.tar.gz` in SageMaker's PyTorch layout.

Layout: `model.pt` (state dict, loadable with `torch.load(weights_only=True)`), `code/inference.py` (the four
SageMaker handlers), `code/models.py` and `code/preprocess.py` (copies of this package's modules, so the package
runs with nothing of ours installed), `code/requirements.txt` and `code/model_config.json`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import math
import sys
import tarfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as installed_version
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from counting import models, preprocess
from counting.models import CountingModel

WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "code/model_config.json"
HANDLER_FILE = "code/inference.py"
REQUIRED_FILES = (WEIGHTS_FILE, HANDLER_FILE, "code/models.py", "code/preprocess.py", CONFIG_FILE)
PINNED_REQUIREMENTS = ("timm",)
_TEMPLATE = Path(__file__).with_name("templates") / "inference.py"


@dataclass(frozen=True)
class Handlers:
    """The package's SageMaker handlers, imported in isolation, with the model `model_fn` loaded."""

    model_fn: Callable[[str], Any]
    input_fn: Callable[[bytes, str | None], Any]
    predict_fn: Callable[[Any, Any], dict]
    output_fn: Callable[[dict, str | None], tuple[str, str]]
    predict_images: Callable[[list[tuple[str, bytes]], Any], list[dict]]
    build_answer: Callable[[Any, list[dict], Any], dict]
    request_error: type[Exception]
    model: Any
    config: dict
    module: ModuleType

    @property
    def max_body_bytes(self) -> int:
        """The largest request body input_fn accepts."""
        return self.module.MAX_BODY_BYTES

    def predict_each(self, images: list[tuple[str, bytes]]) -> list[dict | Exception]:
        """Per-image predictions from one forward pass, or in place of a refused image its RequestError.

        When an image is refused the images are predicted one by one, so the others still get answers.
        """
        try:
            return self.predict_images(images, self.model)
        except self.request_error as error:
            if len(images) == 1:
                return [error]
        results: list[dict | Exception] = []
        for image in images:
            try:
                results.extend(self.predict_images([image], self.model))
            except self.request_error as error:
                results.append(error)
        return results


def build_model_package(model: CountingModel, *, counts: Sequence[int], image_size: int, temperature: float = 1.0,
                        run_id: str = "", version: str = "") -> bytes:
    """The model.tar.gz of `model`: the same model and arguments give the same bytes."""
    counts = _checked_counts(counts, model.spec["num_classes"])
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    config = {"spec": dict(model.spec), "counts": counts, "image_size": image_size, "mean": list(model.mean),
              "std": list(model.std), "temperature": float(temperature), "run_id": str(run_id),
              "version": str(version)}
    requirements = "".join(f"{name}=={installed_version(name)}\n" for name in PINNED_REQUIREMENTS)
    files = {
        WEIGHTS_FILE: _state_dict_bytes(model),
        HANDLER_FILE: _TEMPLATE.read_bytes(),
        "code/models.py": Path(models.__file__).read_bytes(),
        "code/preprocess.py": Path(preprocess.__file__).read_bytes(),
        "code/requirements.txt": requirements.encode(),
        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    return _reproducible_tar_gz(files)


def package_sha256(package: bytes) -> str:
    """Hex sha256 of the package bytes: its content address."""
    return hashlib.sha256(package).hexdigest()


def package_artifact(package: bytes) -> dict[str, Any]:
    """The run artifact form of a package: {"bytes", "sha256", "size"}."""
    return {"bytes": package, "sha256": package_sha256(package), "size": len(package)}


def package_from_artifact(artifact: Mapping[str, Any] | bytes) -> bytes:
    """Package bytes from a run artifact ({"bytes", "sha256"} or raw bytes), checking the sha256 when present."""
    if isinstance(artifact, (bytes, bytearray)):
        return bytes(artifact)
    if not isinstance(artifact, Mapping) or not isinstance(artifact.get("bytes"), (bytes, bytearray)):
        found = f"a dict with keys {sorted(artifact)}" if isinstance(artifact, Mapping) else type(artifact).__name__
        raise ValueError(f"model_package artifact: expected bytes or a dict with 'bytes', got {found}")
    package = bytes(artifact["bytes"])
    expected = artifact.get("sha256")
    if expected is not None and expected != package_sha256(package):
        raise ValueError(f"model_package artifact: sha256 {package_sha256(package)} does not match the recorded "
                         f"{expected}")
    return package


def extract_package(package: bytes, dest: Path | str) -> Path:
    """Unpack a package into `dest` (created if needed) after checking it holds every required file."""
    dest = Path(dest)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(package), mode="r:gz")
        names = set(archive.getnames())
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"not a model package (gzipped tar expected): {error}") from None
    with archive:
        missing = sorted(set(REQUIRED_FILES) - names)
        if missing:
            raise ValueError(f"model package lacks {', '.join(missing)}")
        dest.mkdir(parents=True, exist_ok=True)
        archive.extractall(dest, filter="data")
    return dest


def load_handlers(model_dir: Path | str, *, max_body_bytes: int | None = None) -> Handlers:
    """Import `code/inference.py` of an extracted package in isolation and load its model with `model_fn`.

    The module gets a unique name and its code directory is on sys.path only while it is imported, so several
    packages load side by side without sharing modules. `max_body_bytes` overrides the request size limit.
    """
    model_dir = Path(model_dir)
    module = _import_isolated(model_dir / HANDLER_FILE)
    if max_body_bytes is not None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        module.MAX_BODY_BYTES = max_body_bytes
    model = module.model_fn(str(model_dir))
    return Handlers(model_fn=module.model_fn, input_fn=module.input_fn, predict_fn=module.predict_fn,
                    output_fn=module.output_fn, predict_images=module.predict_images,
                    build_answer=module.build_answer, request_error=module.RequestError,
                    model=model, config=model.config, module=module)


def load_package(package: bytes, dest: Path | str, *, max_body_bytes: int | None = None) -> Handlers:
    """Extract a package into `dest` and load its handlers."""
    return load_handlers(extract_package(package, dest), max_body_bytes=max_body_bytes)


def _checked_counts(counts: Sequence[int], num_classes: int) -> list[int]:
    values = list(counts)
    if not values or any(not isinstance(c, int) or isinstance(c, bool) for c in values):
        raise ValueError(f"counts must be a non-empty list of ints, got {counts!r}")
    if values != list(range(values[0], values[0] + len(values))):
        raise ValueError(f"counts must be consecutive and increasing, got {values}")
    if len(values) != num_classes:
        raise ValueError(f"counts has {len(values)} values but the model predicts {num_classes} classes")
    return values


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _reproducible_tar_gz(files: Mapping[str, bytes]) -> bytes:
    """A gzipped ustar archive with sorted entries, zero mtimes, root ownership and fixed modes."""
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            archive.addfile(info, io.BytesIO(files[name]))
    gz_buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz_buffer, mtime=0, compresslevel=6) as stream:
        stream.write(tar_buffer.getvalue())
    return gz_buffer.getvalue()


def _import_isolated(path: Path) -> ModuleType:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no handler module; is this an extracted model package?")
    name = f"counting_package_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    code_dir = str(path.parent)
    sys.modules[name] = module
    sys.path.insert(0, code_dir)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(code_dir)
    return module
