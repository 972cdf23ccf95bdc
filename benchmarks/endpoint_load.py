"""Load test of the local endpoint against calling the handlers in-process, side by side in one run.

Modes, each driven by N concurrent clients that send one JPEG per request and wait for the answer:
- in-process: threads calling input_fn -> predict_fn -> output_fn directly (no HTTP);
- server: HTTP clients against the uvicorn server (in its own process) with micro-batching off;
- server+batching: the same with micro-batching on.
Each mode gets `--duration` seconds per client count, cut into `--rounds` slices that alternate between the
modes, so load from other programs on a shared machine falls on every mode alike. Reports requests/s, p50/p99
latency and errors per mode, the server's overhead at p50 with one client (server p50 minus in-process p50) and
what micro-batching changes under concurrency.

    python benchmarks/endpoint_load.py [--clients 1 8] [--duration 10] [--rounds 5] [--json results.json]
                                       [--backbone tf_efficientnet_lite0] [--image-size 96] [--photos DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

from counting.models import build_model
from counting.packaging import Handlers, build_model_package, load_package
from counting.preprocess import encode_jpeg_bytes

PHOTOS = Path(__file__).resolve().parents[1] / "../shared/abid/photos"
OVERHEAD_TARGET_MS = 10.0
MODES = ("in-process", "server", "server+batching")


@dataclass
class Tally:
    """Latencies (ms), errors and seconds of one mode, summed over its slices."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def add(self, latencies: list[float], errors: int, seconds: float) -> None:
        self.latencies += latencies
        self.errors += errors
        self.seconds += seconds


@dataclass
class Result:
    mode: str
    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float


def load_images(photos: Path, count: int, seed: int) -> list[bytes]:
    """Real bin photos when the folder exists, else seeded random 224x224 JPEGs."""
    files = sorted(photos.rglob("*.jpg"))[:count] if photos.is_dir() else []
    if files:
        return [path.read_bytes() for path in files]
    generator = torch.Generator().manual_seed(seed)
    return [encode_jpeg_bytes(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=generator))
            for _ in range(count)]


def summarise(mode: str, clients: int, tally: Tally) -> Result:
    ordered = sorted(tally.latencies) or [float("nan")]
    return Result(mode=mode, clients=clients, requests=len(tally.latencies), errors=tally.errors,
                  seconds=round(tally.seconds, 2), requests_per_s=round(len(tally.latencies) / tally.seconds, 1),
                  p50_ms=round(statistics.median(ordered), 2),
                  p99_ms=round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2))


def in_process_slice(handlers: Handlers, images: list[bytes], clients: int,
                     duration: float) -> tuple[list[float], int, float]:
    """`clients` threads calling the handlers directly for `duration` seconds."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        sent = index
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                request = handlers.input_fn(images[sent % len(images)], "image/jpeg")
                handlers.output_fn(handlers.predict_fn(request, handlers.model), "application/json")
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)
            except Exception:  # noqa: BLE001 - counted, the load goes on
                with lock:
                    errors[0] += 1
            sent += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.perf_counter() - started


async def _drive(url: str, images: list[bytes], clients: int, duration: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        deadline = time.perf_counter() + duration

        async def one_client(index: int) -> None:
            nonlocal errors
            sent = index
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post("/invocations", content=images[sent % len(images)],
                                                 headers={"content-type": "image/jpeg"})
                    if response.status_code == 200:
                        latencies.append((time.perf_counter() - started) * 1000)
                    else:
                        errors += 1
                except httpx.HTTPError:
                    errors += 1
                sent += clients

        started = time.perf_counter()
        await asyncio.gather(*(one_client(index) for index in range(clients)))
        return latencies, errors, time.perf_counter() - started


def server_slice(url: str, images: list[bytes], clients: int, duration: float) -> tuple[list[float], int, float]:
    """HTTP clients against a running server for `duration` seconds."""
    return asyncio.run(_drive(url, images, clients, duration))


def _serve(package_path: str, max_batch_images: int, max_wait_ms: float, ready: multiprocessing.Queue,
           stop: multiprocessing.Event) -> None:
    from counting.serving import LocalServer, create_app

    with tempfile.TemporaryDirectory() as workdir:
        handlers = load_package(Path(package_path).read_bytes(), workdir)
        app = create_app(handlers, max_batch_images=max_batch_images, max_wait_ms=max_wait_ms)
        with LocalServer(app, port=0) as server:
            ready.put(server.url)
            stop.wait()


@contextmanager
def server_process(package_path: Path, max_batch_images: int, max_wait_ms: float,
                   timeout_s: float = 300) -> Iterator[str]:
    """A server in its own process (so clients and server do not share an interpreter); yields its URL."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Queue(), context.Event()
    process = context.Process(target=_serve, args=(str(package_path), max_batch_images, max_wait_ms, ready, stop))
    process.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if not process.is_alive():
                raise RuntimeError(f"server process exited with code {process.exitcode} before serving")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout_s} s")
            try:
                url = ready.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        yield url
    finally:
        stop.set()
        process.join(timeout=30)


def benchmark(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = build_model(args.backbone, args.classes, weights="none")
    package = build_model_package(model, counts=list(range(1, args.classes + 1)), image_size=args.image_size)
    images = load_images(args.photos, args.images, seed=0)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as workdir:
        package_path = Path(workdir) / "model.tar.gz"
        package_path.write_bytes(package)
        handlers = load_package(package, Path(workdir) / "in-process")
        with server_process(package_path, 1, 0.0) as plain_url, \
                server_process(package_path, args.max_batch_images, args.max_wait_ms) as batched_url:
            drivers: dict[str, Callable[[int, float], tuple[list[float], int, float]]] = {
                "in-process": lambda c, d: in_process_slice(handlers, images, c, d),
                "server": lambda c, d: server_slice(plain_url, images, c, d),
                "server+batching": lambda c, d: server_slice(batched_url, images, c, d),
            }
            for mode in MODES:  # warm-up: first requests, connections, allocator
                drivers[mode](1, 1.0)
            for clients in args.clients:
                tallies = {mode: Tally() for mode in MODES}
                for _ in range(args.rounds):
                    for mode in MODES:
                        tallies[mode].add(*drivers[mode](clients, args.duration / args.rounds))
                for mode in MODES:
                    result = summarise(mode, clients, tallies[mode])
                    results.append(result)
                    print(f"  {mode:16s} clients={clients:<3d} {result.requests_per_s:8.1f} req/s  "
                          f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  errors {result.errors}",
                          file=sys.stderr)
    return {"settings": {"backbone": args.backbone, "image_size": args.image_size, "duration_s": args.duration,
                         "rounds": args.rounds, "max_batch_images": args.max_batch_images,
                         "max_wait_ms": args.max_wait_ms, "images": len(images),
                         "real_photos": args.photos.is_dir(), "torch_threads": torch.get_num_threads(),
                         "device": str(handlers.model.device)},
            "results": [asdict(result) for result in results], "summary": summary(results)}


def summary(results: list[Result]) -> dict:
    """Server overhead at p50 with the fewest clients, and the micro-batching gain at each client count."""
    by_key = {(r.mode, r.clients): r for r in results}
    fewest = min(r.clients for r in results)
    overhead = by_key[("server", fewest)].p50_ms - by_key[("in-process", fewest)].p50_ms
    gains = {}
    for clients in sorted({r.clients for r in results}):
        plain, batched = by_key[("server", clients)], by_key[("server+batching", clients)]
        gains[str(clients)] = {"throughput_ratio": round(batched.requests_per_s / plain.requests_per_s, 2),
                               "p50_ms_plain": plain.p50_ms, "p50_ms_batched": batched.p50_ms}
    return {"overhead_p50_ms": round(overhead, 2), "overhead_clients": fewest,
            "overhead_within_target": overhead < OVERHEAD_TARGET_MS,
            "errors": sum(r.errors for r in results), "batching": gains}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per mode and client count "
                                                                     "(default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating slices per measurement (default 5)")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--images", type=int, default=64, help="distinct request images (default 64)")
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="folder of real photos (default shared ABID)")
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    report = benchmark(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
