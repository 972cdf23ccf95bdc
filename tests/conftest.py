"""Shared fixtures: tiny JPEGs, ABID-layout folders, the real ABID sample, moto for S3 and SageMaker."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import boto3
import pytest
import torch

from counting.preprocess import encode_jpeg_bytes
from serving_fixtures import BUCKET

SHARED_ABID = Path(__file__).resolve().parents[1] / "../shared/abid"


def pytest_configure(config: pytest.Config) -> None:
    # counting.preprocess silences torchvision's notice that its image codecs will move to torchcodec;
    # pytest resets warning filters per test, so repeat it here.
    config.addinivalue_line("filterwarnings",
                            "ignore:.*image decoding and encoding capabilities of TorchVision:DeprecationWarning")


@pytest.fixture
def shared_abid() -> Path:
    """The real ABID sample folder (photos/, abid-layout/, file_list.json); skips the test when absent."""
    if not SHARED_ABID.is_dir():
        pytest.skip(f"real ABID sample not found at {SHARED_ABID}")
    return SHARED_ABID.resolve()


def _tiny_jpeg(seed: int, size: int = 32) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return encode_jpeg_bytes(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator))


@pytest.fixture(scope="session")
def tiny_jpeg() -> Callable[..., bytes]:
    """`tiny_jpeg(seed, size=32)`: the JPEG bytes of a seeded random size x size RGB image."""
    return _tiny_jpeg


@pytest.fixture
def write_abid_layout() -> Callable[..., Path]:
    """`write_abid_layout(root, {id: count}, size=32)`: a minimal ABID-layout folder of tiny images.

    Metadata holds only EXPECTED_QUANTITY and an empty BIN_FCSKU_DATA.
    """

    def write(root: Path, counts: Mapping[str, int], size: int = 32) -> Path:
        (root / "bin-images").mkdir(parents=True, exist_ok=True)
        (root / "metadata").mkdir(parents=True, exist_ok=True)
        for index, (id_, count) in enumerate(sorted(counts.items())):
            (root / "bin-images" / f"{id_}.jpg").write_bytes(_tiny_jpeg(index, size))
            metadata = {"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": count}
            (root / "metadata" / f"{id_}.json").write_text(json.dumps(metadata))
        return root

    return write


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Point boto3 at the moto server with test credentials (no user config); returns the endpoint URL."""
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": moto_server, "AWS_MAX_ATTEMPTS": "1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return moto_server


# moto answers describe calls with empty VpcConfig/DataCaptureConfig objects that sagemaker-core refuses, and has
# no UpdateEndpoint: the `moto_sagemaker` fixture patches both into the in-process moto server.


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
