"""The SageMaker deploy target end to end against moto (S3 + control plane) and our server as the runtime.

The runtime stand-in serves the package that was uploaded to S3 for the endpoint's current model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from serving_fixtures import BUCKET, ROLE, jpeg, tiny_package

from counting.deploy import EndpointInfo, InvocationError, get_target
from counting.deploy.sagemaker import SageMakerTarget
from counting.packaging import load_package, package_sha256
from counting.serving import LocalServer, create_app

@pytest.fixture
def runtime(moto_sagemaker: str, monkeypatch: pytest.MonkeyPatch,
            tmp_path: Path) -> Iterator[Callable[[EndpointInfo], None]]:
    """`serve(info)`: serve the package stored at info.model_data as the SageMaker runtime."""
    servers: list[LocalServer] = []

    def serve(info: EndpointInfo) -> None:
        while servers:
            servers.pop().stop()
        bucket, key = info.model_data.removeprefix("s3://").split("/", 1)
        package = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        handlers = load_package(package, tmp_path / package_sha256(package))
        servers.append(LocalServer(create_app(handlers), port=0).start())
        monkeypatch.setenv("AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME", servers[-1].url)

    yield serve
    for server in servers:
        server.stop()


def _names(kind: str) -> list[str]:
    client = boto3.client("sagemaker")
    if kind == "models":
        return [m["ModelName"] for m in client.list_models()["Models"]]
    return [c["EndpointConfigName"] for c in client.list_endpoint_configs()["EndpointConfigs"]]


def test_deploy_invoke_update_in_place_and_delete(runtime):
    target = get_target("sagemaker", role_arn=ROLE, bucket=BUCKET, region="us-east-1", poll_s=1,
                        wait_timeout_s=30)
    sagemaker = boto3.client("sagemaker")

    first = target.deploy(tiny_package("v1"), "bin-counter")
    assert first.arn == "arn:aws:sagemaker:us-east-1:123456789012:endpoint/bin-counter"
    assert first.image_uri.endswith("/pytorch-inference:2.6.0-cpu-py312")
    assert first.model_data == f"s3://{BUCKET}/counting/bin-counter/{package_sha256(tiny_package('v1'))}/model.tar.gz"
    described = sagemaker.describe_endpoint(EndpointName="bin-counter")
    assert described["EndpointStatus"] == "InService"
    first_config = described["EndpointConfigName"]
    assert first_config.startswith(f"bin-counter-{first.package_sha256[:8]}-")
    model = sagemaker.describe_model(ModelName=first_config)
    assert model["PrimaryContainer"]["ModelDataUrl"] == first.model_data
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert model["ExecutionRoleArn"] == ROLE
    runtime(first)
    assert target.invoke(first, jpeg(1), "image/jpeg")["model_version"] == "v1"

    second = target.deploy(tiny_package("v2", seed=1), "bin-counter")
    assert second.arn == first.arn
    second_config = sagemaker.describe_endpoint(EndpointName="bin-counter")["EndpointConfigName"]
    assert second_config != first_config and second_config in _names("configs")
    assert first_config not in _names("configs") and first_config not in _names("models")
    runtime(second)
    assert target.invoke(second, jpeg(1), "image/jpeg")["model_version"] == "v2"
    with pytest.raises(InvocationError) as caught:
        target.invoke(second, b"not a photo", "image/jpeg")
    assert caught.value.status == 400 and "not a readable image" in caught.value.message

    target.delete(second)
    assert "bin-counter" not in [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    assert second_config not in _names("configs") and second_config not in _names("models")
    with pytest.raises(ValueError, match="no SageMaker endpoint named 'bin-counter'"):
        target.delete(second)


def test_gpu_instances_get_the_gpu_image(moto_sagemaker):
    target = SageMakerTarget(region="eu-west-1", instance_type="ml.g4dn.xlarge")
    assert "eu-west-1" in target.image_uri() and target.image_uri().endswith("2.6.0-gpu-py312")


def test_deploy_needs_role_and_bucket(moto_sagemaker):
    with pytest.raises(ValueError, match="needs role_arn and bucket"):
        SageMakerTarget(region="us-east-1").deploy(tiny_package(), "bin-counter")
    with pytest.raises(ValueError, match="endpoint name 'under_score'"):
        SageMakerTarget(role_arn=ROLE, bucket=BUCKET, region="us-east-1").deploy(tiny_package(), "under_score")


def test_region_is_required(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="region"):
        SageMakerTarget()


def test_missing_extra_names_it(moto_sagemaker, monkeypatch):
    monkeypatch.setitem(sys.modules, "sagemaker.core", None)
    with pytest.raises(ImportError, match=r"counting\[sagemaker\]"):
        SageMakerTarget(region="us-east-1").image_uri()
