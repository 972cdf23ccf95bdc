"""Where a model package is deployed: one seam, `get_target(name, **options)`, with local and SageMaker targets.

    target = get_target("local", port=0)           # or get_target("sagemaker", role_arn=..., bucket=..., region=...)
    info = target.deploy(package_bytes, "bin-counter")
    answer = target.invoke(info, jpeg_bytes, "image/jpeg")
    target.delete(info)
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

TARGETS = ("local", "sagemaker")
_ENDPOINT_NAME = re.compile(r"^[A-Za-z0-9](-*[A-Za-z0-9]){0,62}$")


@dataclass(frozen=True)
class EndpointInfo:
    """A deployed endpoint: `url` for local servers, `arn`/`image_uri`/`model_data` for SageMaker."""

    target: str
    name: str
    url: str | None = None
    arn: str | None = None
    image_uri: str | None = None
    model_data: str | None = None
    region: str | None = None
    package_sha256: str | None = None


class InvocationError(RuntimeError):
    """The endpoint refused a request; `status` is the model's HTTP status and `message` its explanation."""

    def __init__(self, endpoint: str, status: int, message: str):
        super().__init__(f"endpoint {endpoint!r} answered {status}: {message}")
        self.endpoint, self.status, self.message = endpoint, status, message


class DeployTarget(ABC):
    """Deploys model packages as endpoints, invokes them and removes them."""

    name: str

    @abstractmethod
    def deploy(self, package: bytes, name: str) -> EndpointInfo:
        """Serve `package` as endpoint `name`; an existing endpoint of that name is updated in place."""

    @abstractmethod
    def invoke(self, info: EndpointInfo, body: bytes, content_type: str) -> dict[str, Any]:
        """Send one request; returns the decoded JSON answer or raises InvocationError."""

    @abstractmethod
    def delete(self, info: EndpointInfo) -> None:
        """Remove the endpoint and everything created for it."""


def check_endpoint_name(name: str) -> str:
    """Endpoint names follow SageMaker's rule: 1-63 letters, digits and hyphens, starting and ending alphanumeric."""
    if not isinstance(name, str) or not _ENDPOINT_NAME.match(name):
        raise ValueError(f"endpoint name {name!r}: use 1-63 letters, digits or hyphens, starting and ending with a "
                         "letter or digit")
    return name


def get_target(name: str, **options: Any) -> DeployTarget:
    """The deploy target `name` ("local" or "sagemaker") built with `options`."""
    if name == "local":
        from counting.deploy.local import LocalTarget

        return LocalTarget(**options)
    if name == "sagemaker":
        from counting.deploy.sagemaker import SageMakerTarget

        return SageMakerTarget(**options)
    raise ValueError(f"unknown deploy target {name!r}; choose one of: {', '.join(TARGETS)}")
