"""The `counting` command: serve or use a past run's model package, list runs, remove endpoints.

    counting runs                                   # past runs of BinCountingFlow, newest first
    counting serve --run latest --port 8080         # HTTP server for a run's model package
    counting predict --run BinCountingFlow/42 photos/ --output predictions.csv
    counting endpoint delete bin-counter --region eu-west-1
"""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from counting.sources.base import IMAGE_SUFFIXES, is_image_name

DEFAULT_FLOW = "BinCountingFlow"
PACKAGE_ARTIFACT = "model_package"


class CommandError(Exception):
    """A problem the user can fix; printed without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.command(args)
    except (CommandError, ValueError, OSError) as error:
        print(f"counting: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command."""
    from counting.serving import DEFAULT_HOST, DEFAULT_MAX_BATCH_IMAGES, DEFAULT_PORT

    parser = argparse.ArgumentParser(prog="counting", description="Count objects in bin photos with a trained "
                                     "model: serve it, predict files, list training runs, manage endpoints.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run_help = ("which run's model package: 'latest' (newest successful run with a package), a run id, "
                "Flow/run-id or Flow/latest")
    flow_help = f"flow name used with 'latest' or a bare run id (default {DEFAULT_FLOW})"

    serve = commands.add_parser("serve", help="serve a run's model package over HTTP",
                                description="Serve a run's model package: GET /ping, POST /invocations and "
                                "POST /endpoints/<name>/invocations. Ctrl-C stops it.")
    serve.add_argument("--run", required=True, help=run_help)
    serve.add_argument("--flow", default=DEFAULT_FLOW, help=flow_help)
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0 picks a free port)")
    serve.add_argument("--max-batch-images", type=int, default=DEFAULT_MAX_BATCH_IMAGES,
                       help=f"images of concurrent requests run in one forward pass (default "
                            f"{DEFAULT_MAX_BATCH_IMAGES}; 1 turns batching off)")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest accepted request body (default 10 MiB)")
    serve.set_defaults(command=serve_command)

    predict = commands.add_parser("predict", help="predict image files and folders into a CSV",
                                  description="Predict image files and folders (searched recursively for "
                                  f"{', '.join(IMAGE_SUFFIXES)}) offline with a run's model package; writes "
                                  "one CSV row per image: path, count, probability of each count.")
    predict.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("--run", required=True, help=run_help)
    predict.add_argument("--flow", default=DEFAULT_FLOW, help=flow_help)
    predict.add_argument("--output", default="predictions.csv", help="CSV file to write (default predictions.csv)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    predict.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    predict.set_defaults(command=predict_command)

    runs = commands.add_parser("runs", help="list past training runs",
                               description="List past runs, newest first: id, status, finish time, best "
                                           "parameters and test accuracy/RMSE when the run recorded them.")
    runs.add_argument("--flow", default=DEFAULT_FLOW, help=f"flow name (default {DEFAULT_FLOW})")
    runs.add_argument("--limit", type=int, default=20, help="most runs to show (default 20)")
    runs.set_defaults(command=runs_command)

    endpoint = commands.add_parser("endpoint", help="manage SageMaker endpoints",
                                   description="Manage SageMaker endpoints (needs counting[sagemaker]).")
    endpoint_commands = endpoint.add_subparsers(required=True, metavar="ACTION")
    delete = endpoint_commands.add_parser("delete", help="delete an endpoint, its configuration and model",
                                          description="Delete a SageMaker endpoint with its endpoint "
                                                      "configuration and model.")
    delete.add_argument("name", help="endpoint name")
    delete.add_argument("--region", default=None, help="AWS region (default: AWS_DEFAULT_REGION / AWS config)")
    delete.set_defaults(command=endpoint_delete_command)
    return parser


def serve_command(args: argparse.Namespace) -> int:
    """`counting serve`: load the run's package and serve it until interrupted."""
    from counting.packaging import load_package
    from counting.serving import LocalServer, create_app

    run = find_run(args.run, args.flow)
    package = run_package(run)
    with tempfile.TemporaryDirectory(prefix="counting-serve-") as workdir:
        handlers = load_package(package, workdir, max_body_bytes=args.max_body_bytes)
        server = LocalServer(create_app(handlers, max_batch_images=args.max_batch_images), args.host, args.port)
        server.start()
        signal.signal(signal.SIGTERM, lambda *_: server.stop())
        print(f"Serving {run.pathspec} at {server.url} (Ctrl-C stops)", flush=True)
        server.wait()
    return 0


def predict_command(args: argparse.Namespace) -> int:
    """`counting predict`: predict every image, write the CSV, report refused files on stderr."""
    from tqdm import tqdm

    from counting.packaging import load_package

    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    files = list(image_files(args.paths))
    if not files:
        raise CommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {' '.join(args.paths)}")
    package = run_package(find_run(args.run, args.flow))
    refused = []
    with tempfile.TemporaryDirectory(prefix="counting-predict-") as workdir:
        handlers = load_package(package, workdir)
        counts = handlers.config["counts"]
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output.open("w", newline="") as stream, tqdm(total=len(files), desc="predict", unit="img",
                                                          disable=not args.progress, file=sys.stderr) as bar:
            writer = csv.writer(stream)
            writer.writerow(["path", "count", *[f"p_{count}" for count in counts]])
            for start in range(0, len(files), args.batch_size):
                batch = files[start:start + args.batch_size]
                results = handlers.predict_each([(str(path), path.read_bytes()) for path in batch])
                for path, result in zip(batch, results):
                    if isinstance(result, Exception):
                        refused.append(str(result))
                        continue
                    writer.writerow([str(path), result["count"],
                                     *[f"{result['probabilities'][str(count)]:.6f}" for count in counts]])
                bar.update(len(batch))
    for reason in refused:
        print(f"counting: skipped {reason}", file=sys.stderr)
    print(f"Wrote {len(files) - len(refused)} predictions to {output}"
          f"{f' ({len(refused)} images skipped)' if refused else ''}", file=sys.stderr)
    return 0


def runs_command(args: argparse.Namespace) -> int:
    """`counting runs`: one line per run, newest first."""
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        flow = Flow(args.flow)
    except MetaflowNotFound:
        raise CommandError(f"no runs of flow {args.flow!r} found") from None
    rows = [["RUN", "STATUS", "FINISHED", "ACCURACY", "RMSE", "BEST_PARAMS"]]
    for index, run in enumerate(flow):
        if index >= args.limit:
            break
        rows.append(_run_row(run))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip())
    return 0


def endpoint_delete_command(args: argparse.Namespace) -> int:
    """`counting endpoint delete NAME`: remove a SageMaker endpoint, its configuration and model."""
    from botocore.exceptions import BotoCoreError, ClientError

    from counting.deploy import EndpointInfo, get_target

    try:
        target = get_target("sagemaker", region=args.region)
        target.delete(EndpointInfo(target="sagemaker", name=args.name, region=target.region))
    except (BotoCoreError, ClientError) as error:
        raise CommandError(f"could not delete endpoint {args.name!r}: {error}") from None
    print(f"Deleted endpoint {args.name} with its configuration and model", file=sys.stderr)
    return 0


def find_run(spec: str, flow_name: str = DEFAULT_FLOW) -> Any:
    """The Metaflow run named by `spec`: 'latest', a run id of `flow_name`, Flow/run-id or Flow/latest.

    Runs of every user and namespace are considered; 'latest' is the newest successful run with a model package.
    """
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowInvalidPathspec, MetaflowNotFound

    namespace(None)
    if spec.endswith("/latest"):
        flow_name, spec = spec.split("/", 1)[0], "latest"
    try:
        if spec == "latest":
            for run in Flow(flow_name):
                if run.successful and _find_artifact(run, PACKAGE_ARTIFACT) is not None:
                    return run
            raise CommandError(f"no successful run of {flow_name} has a {PACKAGE_ARTIFACT} artifact")
        return Run(spec if "/" in spec else f"{flow_name}/{spec}")
    except (MetaflowNotFound, MetaflowInvalidPathspec) as error:
        raise CommandError(f"run {spec!r} not found ({error})") from None


def run_package(run: Any) -> bytes:
    """The model package bytes of a run, checked against the recorded sha256."""
    from counting.packaging import package_from_artifact

    artifact = _find_artifact(run, PACKAGE_ARTIFACT)
    if artifact is None:
        raise CommandError(f"run {run.pathspec} has no {PACKAGE_ARTIFACT} artifact (did it finish packaging?)")
    return package_from_artifact(artifact)


def image_files(paths: Sequence[str]) -> Iterator[Path]:
    """Files given directly, and images found recursively in folders, in sorted order per folder."""
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
        elif path.is_file():
            yield path
        else:
            raise CommandError(f"{name}: no such file or folder")


def _find_artifact(run: Any, name: str) -> Any | None:
    """An artifact of the run's end step, else of any step that produced it."""
    tasks = [run.end_task] if run.finished else []
    tasks += [step.task for step in run]
    for task in tasks:
        if task is not None and name in task:
            return task[name].data
    return None


def _run_row(run: Any) -> list[str]:
    status = "successful" if run.successful else "failed" if run.finished else "running"
    finished = run.finished_at.strftime("%Y-%m-%d %H:%M:%S") if run.finished_at else "-"
    metrics = _artifact_or_none(run, "test_metrics") or {}
    params = _artifact_or_none(run, "best_params")
    return [run.pathspec, status, finished, _number(metrics.get("accuracy")), _number(metrics.get("rmse")),
            json.dumps(params, sort_keys=True, default=str) if params else "-"]


def _artifact_or_none(run: Any, name: str) -> Any:
    end = run.end_task if run.finished else None
    if end is not None and name in end:
        return end[name].data
    return None


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


if __name__ == "__main__":
    sys.exit(main())
