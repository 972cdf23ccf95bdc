"""SageMaker deploy target: upload the package to S3 and serve it with AWS's PyTorch inference container.

Needs the optional extra `counting[sagemaker]` (sagemaker-core), imported only when used. Each deploy creates a
Model and an EndpointConfig named `<endpoint>-<package sha256[:8]>-<UTC time>`; an existing endpoint is updated
in place to the new configuration and the configuration and model it used before are removed. `delete` removes
the endpoint, its configuration and its model. Requests go through boto3's sagemaker-runtime `invoke_endpoint`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import boto3
from botocore.exceptions import ClientError

from counting.deploy import DeployTarget, EndpointInfo, InvocationError, check_endpoint_name
from counting.packaging import package_sha256

EXTRA_HINT = "pip install 'counting[sagemaker]'"
VARIANT = "AllTraffic"
CODE_DIR = "/opt/ml/model/code"


def sagemaker_core() -> SimpleNamespace:
    """sagemaker-core's image_uris, resources and shapes, or an ImportError naming the extra to install."""
    try:
        from sagemaker.core import image_uris, resources, shapes
    except ImportError as error:
        raise ImportError(f"the SageMaker deploy target needs sagemaker-core: {EXTRA_HINT} ({error})") from None
    return SimpleNamespace(image_uris=image_uris, resources=resources, shapes=shapes)


class SageMakerTarget(DeployTarget):
    """Deploys to SageMaker real-time endpoints in one region.

    role_arn and bucket are needed to deploy (not to invoke or delete). The container is AWS's PyTorch inference
    image for `framework_version`/`py_version` on `instance_type`; packages are stored at
    s3://<bucket>/<prefix>/<endpoint>/<sha256>/model.tar.gz.
    """

    name = "sagemaker"

    def __init__(self, role_arn: str | None = None, bucket: str | None = None, region: str | None = None,
                 instance_type: str = "ml.m5.large", instance_count: int = 1, framework_version: str = "2.6.0",
                 py_version: str = "py312", prefix: str = "counting",
                 environment: Mapping[str, str] | None = None, wait_timeout_s: int = 1800, poll_s: int = 15,
                 session: boto3.Session | None = None):
        self._session = session or boto3.Session(region_name=region)
        self.region = region or self._session.region_name
        if not self.region:
            raise ValueError("region: pass region=... or set AWS_DEFAULT_REGION")
        if instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, got {instance_count}")
        self.role_arn, self.bucket, self.prefix = role_arn, bucket, prefix.strip("/")
        self.instance_type, self.instance_count = instance_type, instance_count
        self.framework_version, self.py_version = framework_version, py_version
        self._environment = dict(environment or {})
        self._wait_timeout_s, self._poll_s = wait_timeout_s, poll_s

    def image_uri(self) -> str:
        """The AWS PyTorch inference image for this target's framework, Python, region and instance type."""
        return sagemaker_core().image_uris.retrieve(
            framework="pytorch", region=self.region, version=self.framework_version, py_version=self.py_version,
            instance_type=self.instance_type, image_scope="inference")

    def deploy(self, package: bytes, name: str) -> EndpointInfo:
        """Upload, create Model + EndpointConfig, then create the endpoint or update it in place; waits InService."""
        check_endpoint_name(name)
        missing = [option for option, value in (("role_arn", self.role_arn), ("bucket", self.bucket)) if not value]
        if missing:
            raise ValueError(f"SageMaker deploy needs {' and '.join(missing)}")
        core = sagemaker_core()
        sha = package_sha256(package)
        model_data = self._upload(package, name, sha)
        image_uri = self.image_uri()
        resource = _versioned_name(name, sha)
        self._create_model_and_config(core, resource, image_uri, model_data)
        existing = self._find_endpoint(name)
        try:
            if existing is None:
                endpoint = core.resources.Endpoint.create(endpoint_name=name, endpoint_config_name=resource,
                                                          **self._where())
            else:
                previous_config = existing.endpoint_config_name
                existing.endpoint_config_name = resource
                endpoint = existing.update()
        except Exception:
            self._delete_config_and_models(resource)
            raise
        endpoint.wait_for_status("InService", poll=self._poll_s, timeout=self._wait_timeout_s)
        if existing is not None and previous_config != resource:
            self._delete_config_and_models(previous_config)
        return EndpointInfo(target=self.name, name=name, arn=endpoint.endpoint_arn, image_uri=image_uri,
                            model_data=model_data, region=self.region, package_sha256=sha)

    def invoke(self, info: EndpointInfo, body: bytes, content_type: str) -> dict[str, Any]:
        """invoke_endpoint; a model error becomes InvocationError with the model's own status and message."""
        runtime = self._session.client("sagemaker-runtime", region_name=self.region)
        try:
            response = runtime.invoke_endpoint(EndpointName=info.name, ContentType=content_type,
                                               Accept="application/json", Body=body)
        except runtime.exceptions.ModelError as error:
            answer = error.response
            raise InvocationError(info.name, int(answer.get("OriginalStatusCode", 424)),
                                  _model_message(answer)) from None
        return json.loads(response["Body"].read())

    def delete(self, info: EndpointInfo) -> None:
        """Delete the endpoint, then its endpoint configuration and model."""
        endpoint = self._find_endpoint(info.name)
        if endpoint is None:
            raise ValueError(f"no SageMaker endpoint named {info.name!r} in {self.region}")
        config_name = endpoint.endpoint_config_name
        endpoint.delete()
        self._delete_config_and_models(config_name)

    def _where(self) -> dict[str, Any]:
        return {"session": self._session, "region": self.region}

    def _upload(self, package: bytes, name: str, sha: str) -> str:
        key = f"{self.prefix}/{name}/{sha}/model.tar.gz".lstrip("/")
        self._session.client("s3", region_name=self.region).put_object(Bucket=self.bucket, Key=key, Body=package)
        return f"s3://{self.bucket}/{key}"

    def _create_model_and_config(self, core: SimpleNamespace, resource: str, image_uri: str,
                                 model_data: str) -> None:
        environment = {"SAGEMAKER_PROGRAM": "inference.py", "SAGEMAKER_SUBMIT_DIRECTORY": CODE_DIR,
                       "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "SAGEMAKER_REGION": self.region, **self._environment}
        container = core.shapes.ContainerDefinition(image=image_uri, model_data_url=model_data,
                                                    environment=environment)
        core.resources.Model.create(model_name=resource, primary_container=container,
                                    execution_role_arn=self.role_arn, **self._where())
        variant = core.shapes.ProductionVariant(variant_name=VARIANT, model_name=resource,
                                                initial_instance_count=self.instance_count,
                                                instance_type=self.instance_type, initial_variant_weight=1.0)
        try:
            core.resources.EndpointConfig.create(endpoint_config_name=resource, production_variants=[variant],
                                                 **self._where())
        except Exception:
            core.resources.Model.get(model_name=resource, **self._where()).delete()
            raise

    def _find_endpoint(self, name: str) -> Any | None:
        try:
            return sagemaker_core().resources.Endpoint.get(endpoint_name=name, **self._where())
        except ClientError as error:
            if _is_not_found(error):
                return None
            raise

    def _delete_config_and_models(self, config_name: str) -> None:
        resources = sagemaker_core().resources
        try:
            config = resources.EndpointConfig.get(endpoint_config_name=config_name, **self._where())
        except ClientError as error:
            if _is_not_found(error):
                return
            raise
        model_names = [variant.model_name for variant in config.production_variants]
        config.delete()
        for model_name in model_names:
            try:
                resources.Model.get(model_name=model_name, **self._where()).delete()
            except ClientError as error:
                if not _is_not_found(error):
                    raise


def _versioned_name(name: str, sha: str) -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}"
    suffix = f"-{sha[:8]}-{stamp}"
    return name[:63 - len(suffix)].rstrip("-") + suffix


def _is_not_found(error: ClientError) -> bool:
    details = error.response.get("Error", {})
    return details.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "could not find" in details.get("Message", "").lower())


def _model_message(answer: Mapping[str, Any]) -> str:
    original = answer.get("OriginalMessage", "")
    try:
        return str(json.loads(original)["error"])
    except (ValueError, KeyError, TypeError):
        return original or str(answer.get("Error", {}).get("Message", ""))
