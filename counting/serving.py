"""HTTP server around a model package's SageMaker handlers (FastAPI + uvicorn).

Routes: GET /ping (200 once the model is loaded), POST /invocations (SageMaker container contract) and
POST /endpoints/{name}/invocations (a local stand-in for the SageMaker runtime, so boto3's `invoke_endpoint`
with AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME pointing here reaches the same handlers). Bad requests get a 4xx JSON
{"error": "..."}; the runtime route wraps it like SageMaker does (424 ModelError with OriginalStatusCode).
Concurrent requests can be grouped into one forward pass by a micro-batcher.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from counting.packaging import Handlers

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_BATCH_IMAGES = 16
DEFAULT_MAX_WAIT_MS = 0.0
logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    request: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Runs forward passes on one thread, the images of concurrent requests together.

    Requests queue while a forward pass runs; the next pass takes every waiting request up to `max_images`
    images (waiting up to `max_wait_ms` for more when fewer are queued). A bad image fails only its own request.
    """

    def __init__(self, handlers: Handlers, max_images: int = DEFAULT_MAX_BATCH_IMAGES,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        if max_images < 1 or max_wait_ms < 0:
            raise ValueError(f"micro-batching needs max_images >= 1 and max_wait_ms >= 0, got {max_images}, "
                             f"{max_wait_ms}")
        self._handlers = handlers
        self._max_images = max_images
        self._max_wait_s = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="counting-forward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop and fail requests still waiting."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        self._executor.shutdown(wait=False)

    async def predict(self, request: Any) -> dict[str, Any]:
        """The answer for one request (what predict_fn would return)."""
        pending = _Pending(request, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            try:
                await loop.run_in_executor(self._executor, self._answer, batch)
            except Exception as error:  # noqa: BLE001 - one failed batch must not stop the loop
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        images = len(batch[0].request.images)
        deadline = time.monotonic() + self._max_wait_s
        while images < self._max_images:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            batch.append(item)
            images += len(item.request.images)
        return batch

    def _answer(self, batch: list[_Pending]) -> None:
        """Runs in the forward thread: one forward pass for the batch, results handed back to the loop."""
        handlers = self._handlers
        try:
            results = handlers.predict_each([image for pending in batch for image in pending.request.images])
        except Exception as error:  # noqa: BLE001 - the forward pass failed for everyone in the batch
            for pending in batch:
                self._settle(pending, error=error)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.request.images)
            refused = [result for result in results[start:end] if isinstance(result, Exception)]
            if refused:
                self._settle(pending, error=refused[0])
            else:
                self._settle(pending, result=handlers.build_answer(pending.request, results[start:end],
                                                                   handlers.model))
            start = end

    @staticmethod
    def _settle(pending: _Pending, result: Any = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if pending.future.done():
                return
            if error is not None:
                pending.future.set_exception(error)
            else:
                pending.future.set_result(result)

        pending.future.get_loop().call_soon_threadsafe(settle)


def create_app(handlers: Handlers, *, max_batch_images: int = DEFAULT_MAX_BATCH_IMAGES,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS) -> FastAPI:
    """The FastAPI app serving `handlers`; `max_batch_images=1` turns micro-batching off.

    Forward passes always run on one dedicated thread: torch then keeps one set of worker threads instead of
    one per request thread.
    """
    batcher = MicroBatcher(handlers, max_batch_images, max_wait_ms)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="counting model", lifespan=lifespan)

    async def answer(request: Request, on_error: Callable[[int, str], Response]) -> Response:
        try:
            body = await _read_body(request, handlers)
            images = handlers.input_fn(body, request.headers.get("content-type"))
            prediction = await batcher.predict(images)
            content, content_type = handlers.output_fn(prediction, request.headers.get("accept"))
        except handlers.request_error as error:
            return on_error(error.status, str(error))
        except Exception as error:  # noqa: BLE001 - the server answers every request, whatever happens
            logger.exception("inference failed")
            return on_error(500, f"internal error: {type(error).__name__}: {error}")
        return Response(content=content, media_type=content_type)

    @app.get("/ping")
    async def ping() -> JSONResponse:
        if handlers.model is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": handlers.config["version"],
                             "run_id": handlers.config["run_id"]})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await answer(request, _error_response)

    @app.post("/endpoints/{name}/invocations")
    async def endpoint_invocations(name: str, request: Request) -> Response:
        return await answer(request, _model_error_response)

    return app


async def _read_body(request: Request, handlers: Handlers) -> bytes:
    """The request body, refused with 413 as soon as it passes the size limit."""
    limit = handlers.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise handlers.request_error(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise handlers.request_error(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _model_error_response(status: int, message: str) -> JSONResponse:
    """SageMaker runtime's answer when the model container answered with an error."""
    kind = "client" if status < 500 else "server"
    original = json.dumps({"error": message})
    return JSONResponse(
        {"error": message, "OriginalStatusCode": status, "OriginalMessage": original,
         "Message": f"Received {kind} error ({status}) from primary with message \"{original}\"."},
        status_code=424, headers={"x-amzn-ErrorType": "ModelError"})


class LocalServer:
    """Runs an app with uvicorn in a background thread: `with LocalServer(app, port=0) as server: server.url`."""

    def __init__(self, app: FastAPI, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 log_level: str = "warning", start_timeout_s: float = 30.0):
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {port}")
        self._config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                      lifespan="on")
        self._server = uvicorn.Server(self._config)
        self._thread = threading.Thread(target=self._serve, name="counting-server", daemon=True)
        self._start_timeout_s = start_timeout_s
        self.host = host
        self.port = port

    def _serve(self) -> None:
        try:
            self._server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            pass

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> LocalServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise OSError(f"server could not start on {self.host}:{self._config.port} "
                              "(port in use or not allowed?)")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving and wait for the server thread to finish."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
