"""The `counting` command against a real Metaflow run (a throwaway flow storing a tiny model package)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import boto3
import httpx
import pytest
from metaflow import Runner
from serving_fixtures import BUCKET, COUNTS, ROLE, jpeg, png, tiny_package

from counting.cli import main
from counting.packaging import load_package

ROOT = Path(__file__).resolve().parents[1]

FLOW = textwrap.dedent('''
    from pathlib import Path

    from metaflow import FlowSpec, step


    class BinCountingFlow(FlowSpec):
        @step
        def start(self):
            import hashlib

            data = Path({package!r}).read_bytes()
            self.model_package = {{"bytes": data, "sha256": hashlib.sha256(data).hexdigest()}}
            self.best_params = {{"lr": 0.01, "backbone": "mobilenet_v3_small"}}
            self.test_metrics = {{"accuracy": 0.625, "rmse": 0.75}}
            self.next(self.end)

        @step
        def end(self):
            pass


    if __name__ == "__main__":
        BinCountingFlow()
''')


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Runs the throwaway flow once; returns the environment under which its run is visible."""
    root = tmp_path_factory.mktemp("metaflow")
    package_file = root / "model.tar.gz"
    package_file.write_bytes(tiny_package())
    flow_file = root / "bin_counting_flow.py"
    flow_file.write_text(FLOW.format(package=str(package_file)))
    env = {"METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root), "USERNAME": "test"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("USERNAME", "test")  # the Runner resolves a namespace in this process too
        with Runner(str(flow_file), show_output=False, env=env, cwd=str(root)) as runner:
            result = runner.run()
            assert result.status == "successful", result.stderr
            env["RUN_ID"] = result.run.id
    return env


def _counting(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "counting.cli", *args], env=environment, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_every_command_has_help(capsys):
    for command in ([], ["serve"], ["predict"], ["runs"], ["endpoint"], ["endpoint", "delete"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, "--help"])
        assert exited.value.code == 0
        assert "usage: counting" in capsys.readouterr().out


def test_runs_lists_the_run_with_its_metrics(flow_env):
    listing = _counting(flow_env, "runs")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split()[:5] == ["RUN", "STATUS", "FINISHED", "ACCURACY", "RMSE"]
    assert row.split()[:2] == [f"BinCountingFlow/{flow_env['RUN_ID']}", "successful"]
    assert "0.6250" in row and "0.7500" in row and '"lr": 0.01' in row


def test_predict_writes_one_row_per_image(flow_env, tmp_path):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(jpeg(1))
    (photos / "nested" / "b.PNG").write_bytes(png(2))
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "notes.txt").write_text("ignored")
    single = tmp_path / "single.jpeg"
    single.write_bytes(jpeg(3))
    output = tmp_path / "out" / "predictions.csv"
    result = _counting(flow_env, "predict", "--run", f"BinCountingFlow/{flow_env['RUN_ID']}", str(photos),
                       str(single), "--output", str(output), "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert "broken.jpg: not a readable image" in result.stderr and "1 images skipped" in result.stderr
    rows = list(csv.DictReader(output.open()))
    assert [Path(row["path"]).name for row in rows] == ["a.jpg", "b.PNG", "single.jpeg"]
    handlers = load_package(tiny_package(), tmp_path / "package")
    for row, data in zip(rows, (jpeg(1), png(2), jpeg(3))):
        expected = handlers.predict_images([("x", data)], handlers.model)[0]
        assert int(row["count"]) == expected["count"]
        assert [float(row[f"p_{count}"]) for count in COUNTS] == pytest.approx(
            [expected["probabilities"][str(count)] for count in COUNTS], abs=1e-6)


def test_serve_latest_answers_requests(flow_env):
    environment = {**os.environ, **flow_env, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "counting.cli", "serve", "--run", "latest", "--port", "0"],
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()
        assert line.startswith(f"Serving BinCountingFlow/{flow_env['RUN_ID']} at http://127.0.0.1:"), (
            line + process.stderr.read() if process.poll() is not None else line)
        url = line.split(" at ")[1].split()[0]
        assert httpx.get(f"{url}/ping").status_code == 200
        answer = httpx.post(f"{url}/invocations", content=jpeg(4), headers={"content-type": "image/jpeg"}).json()
        assert answer["model_version"] == "v1" and answer["count"] in COUNTS
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_unknown_run_is_a_clear_error(capsys):
    assert main(["predict", "--run", "BinCountingFlow/999999", str(ROOT / "setup.py")]) == 2
    assert "run 'BinCountingFlow/999999' not found" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(capsys, tmp_path):
    assert main(["predict", "--run", "latest", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such file or folder" in capsys.readouterr().err


@pytest.mark.usefixtures("moto_sagemaker")
def test_endpoint_delete_removes_endpoint_config_and_model(capsys):
    from counting.deploy import get_target

    get_target("sagemaker", role_arn=ROLE, bucket=BUCKET, region="us-east-1").deploy(tiny_package(), "old-endpoint")
    assert main(["endpoint", "delete", "old-endpoint", "--region", "us-east-1"]) == 0
    sagemaker = boto3.client("sagemaker")
    assert "old-endpoint" not in [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    leftovers = [m["ModelName"] for m in sagemaker.list_models()["Models"]] + [
        c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]]
    assert not [name for name in leftovers if name.startswith("old-endpoint-")]
    assert main(["endpoint", "delete", "old-endpoint", "--region", "us-east-1"]) == 2
    assert "no SageMaker endpoint named 'old-endpoint'" in capsys.readouterr().err
