"""Local deploy target: serves model packages on this machine (127.0.0.1 by default) while the process runs."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from counting.deploy import DeployTarget, EndpointInfo, InvocationError, check_endpoint_name
from counting.packaging import load_package, package_sha256
from counting.serving import DEFAULT_HOST, DEFAULT_MAX_BATCH_IMAGES, LocalServer, create_app


@dataclass
class _Running:
    server: LocalServer
    workdir: Path


class LocalTarget(DeployTarget):
    """Each deployed package runs in its own background uvicorn server; redeploying a name replaces it."""

    name = "local"

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
                 max_body_bytes: int | None = None, timeout_s: float = 60.0):
        self.host, self.port = host, port
        self._max_batch_images = max_batch_images
        self._max_body_bytes = max_body_bytes
        self._running: dict[str, _Running] = {}
        self._client = httpx.Client(timeout=timeout_s)

    def deploy(self, package: bytes, name: str) -> EndpointInfo:
        """Load the package and serve it; a running endpoint of the same name is replaced once the new one loads."""
        check_endpoint_name(name)
        workdir = Path(tempfile.mkdtemp(prefix=f"counting-{name}-"))
        try:
            handlers = load_package(package, workdir, max_body_bytes=self._max_body_bytes)
            previous = self._running.pop(name, None)
            if previous is not None:
                _shut_down(previous)
            server = LocalServer(create_app(handlers, max_batch_images=self._max_batch_images), self.host,
                                 self.port).start()
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self._running[name] = _Running(server, workdir)
        return EndpointInfo(target=self.name, name=name, url=server.url, package_sha256=package_sha256(package))

    def invoke(self, info: EndpointInfo, body: bytes, content_type: str) -> dict[str, Any]:
        """POST the body to the endpoint's /invocations."""
        if not info.url:
            raise ValueError(f"endpoint {info.name!r} has no URL; was it deployed with the local target?")
        response = self._client.post(f"{info.url}/invocations", content=body, headers={"content-type": content_type})
        if response.status_code != 200:
            raise InvocationError(info.name, response.status_code, _error_message(response))
        return response.json()

    def delete(self, info: EndpointInfo) -> None:
        """Stop the endpoint's server and remove its unpacked package."""
        running = self._running.pop(info.name, None)
        if running is None:
            raise ValueError(f"no local endpoint named {info.name!r} (running: {sorted(self._running) or 'none'})")
        _shut_down(running)


def _shut_down(running: _Running) -> None:
    running.server.stop()
    shutil.rmtree(running.workdir, ignore_errors=True)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text
