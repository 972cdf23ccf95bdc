"""remote_compute: a Config's compute.remote section puts chosen steps on @batch or @kubernetes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from counting.compute import ComputeConfigError, remote_step_decorators

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"start", "fetch", "trial", "join", "end"}

TINY_FLOW = '''
from metaflow import Config, FlowSpec, resources, step

from counting.compute import remote_compute


@remote_compute
class TinyFlow(FlowSpec):
    config = Config("config", default_value={"compute": {}})

    @step
    def start(self):
        self.items = [1, 2]
        self.next(self.work, foreach="items")

    @resources(gpu=1, cpu=2, memory=2000)
    @step
    def work(self):
        self.doubled = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(task.doubled for task in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    TinyFlow()
'''

KUBERNETES = {"backend": "kubernetes", "image": "registry.example/counting:1", "service_account": "counting",
              "steps": {"work": {"gpu": 1, "cpu": 4, "memory": 9000}}}


# -- the section itself ---------------------------------------------------------------------------------------

def test_no_remote_section_adds_nothing():
    assert remote_step_decorators(None, STEPS) == {}


def test_shared_options_reach_every_listed_step_and_step_values_win():
    remote = {"backend": "batch", "image": "img:1", "queue": "gpu", "memory": 8000,
              "steps": {"trial": {"gpu": 1, "memory": 60000}, "fetch": {"cpu": 8, "queue": "cpu"}}}
    decorators = remote_step_decorators(remote, STEPS)
    assert decorators == {
        "trial": ("batch", {"image": "img:1", "queue": "gpu", "memory": 60000, "gpu": 1}),
        "fetch": ("batch", {"image": "img:1", "queue": "cpu", "memory": 8000, "cpu": 8}),
    }


@pytest.mark.parametrize(("remote", "named"), [
    ({"backend": "slurm", "steps": {"trial": {}}}, "'slurm'"),
    ({"steps": {"trial": {}}}, "'backend' is missing"),
    ({"backend": "batch", "steps": {"trail": {"gpu": 1}}}, "['trail']"),
    ({"backend": "batch", "queu": "gpu", "steps": {"trial": {}}}, "['queu']"),
    ({"backend": "kubernetes", "steps": {"trial": {"queue": "gpu"}}}, "compute.remote.steps.trial: unknown kubernetes"),
    ({"backend": "batch", "steps": {}}, "name the steps"),
    ({"backend": "batch", "steps": {"trial": {"gpu": -1}}}, "compute.remote.steps.trial.gpu"),
    ({"backend": "batch", "steps": {"trial": {"memory": "lots"}}}, "'lots'"),
    ({"backend": "kubernetes", "cpu": 0, "steps": {"trial": {}}}, "compute.remote.cpu"),
    ({"backend": "batch", "steps": {"trial": 1}}, "compute.remote.steps.trial: expected an object"),
    (["batch"], "expected an object or null"),
])
def test_bad_sections_are_rejected_naming_the_culprit(remote, named):
    with pytest.raises(ComputeConfigError) as raised:
        remote_step_decorators(remote, STEPS)
    assert named in str(raised.value)


# -- a flow with the mutator applied ----------------------------------------------------------------------------

@pytest.fixture
def tiny_flow(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_flow.py"
    path.write_text(TINY_FLOW)
    return path


def _metaflow(flow: Path, remote: dict | None, *args: str, config_name: str = "config") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "USERNAME": "tester", "METAFLOW_HOME": str(flow.parent),
           "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(flow.parent / "datastore"), "METAFLOW_DEFAULT_DATASTORE": "local"}
    config = json.dumps({"compute": {"remote": remote}})
    return subprocess.run([sys.executable, str(flow), "--no-pylint", "--config-value", config_name, config, *args],
                          env=env, cwd=flow.parent, capture_output=True, text=True, timeout=120)


def _step_decorators(flow: Path, remote: dict | None, config_name: str = "config") -> dict[str, dict[str, dict]]:
    """{step: {decorator name: attributes}} as Metaflow sees the flow after mutation."""
    done = _metaflow(flow, remote, "--datastore", "s3", "--datastore-root", "s3://offline/metaflow",
                     "output-raw", "--json", config_name=config_name)
    assert done.returncode == 0, done.stderr
    graph = json.loads(done.stdout[done.stdout.index("{"):])["graph"]
    return {name: {d["name"]: d["attributes"] for d in node["decorators"]} for name, node in graph.items()}


def test_named_steps_get_the_backend_decorator_and_the_rest_stay_local(tiny_flow):
    decorators = _step_decorators(tiny_flow, KUBERNETES)
    work = decorators["work"]["kubernetes"]
    assert work["image"] == "registry.example/counting:1" and work["service_account"] == "counting"
    assert int(work["gpu"]) == 1 and float(work["cpu"]) == 4 and float(work["memory"]) == 9000
    for light in ("start", "join", "end"):
        assert not {"kubernetes", "batch"} & set(decorators[light]), light


def test_resources_still_count_where_larger(tiny_flow):
    remote = {"backend": "batch", "image": "img:1", "steps": {"work": {"cpu": 1, "memory": 500}}}
    work = _step_decorators(tiny_flow, remote)["work"]["batch"]
    assert float(work["cpu"]) == 2 and float(work["memory"]) == 2000 and float(work["gpu"]) == 1


def test_without_a_remote_section_the_flow_is_unchanged_and_runs_locally(tiny_flow):
    decorators = _step_decorators(tiny_flow, None)
    assert not any({"kubernetes", "batch"} & set(step) for step in decorators.values())
    done = _metaflow(tiny_flow, None, "run")
    assert done.returncode == 0, done.stderr
    assert "total 6" in done.stdout + done.stderr


def test_remote_steps_make_metaflow_ask_for_a_cloud_datastore(tiny_flow):
    done = _metaflow(tiny_flow, KUBERNETES, "run")
    assert done.returncode != 0
    assert "requires --datastore=s3" in done.stdout + done.stderr


def test_a_bad_section_stops_the_flow_before_it_starts(tiny_flow):
    done = _metaflow(tiny_flow, {**KUBERNETES, "steps": {"wrok": {"gpu": 1}}}, "run")
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "Invalid compute.remote configuration" in message and "['wrok']" in message
    assert "Traceback" not in message


def test_the_mutator_can_read_a_config_of_another_name(tmp_path):
    flow = tmp_path / "named_flow.py"
    flow.write_text(TINY_FLOW.replace("@remote_compute\n", '@remote_compute(config="settings")\n')
                    .replace('Config("config"', 'Config("settings"'))
    assert "kubernetes" in _step_decorators(flow, KUBERNETES, config_name="settings")["work"]


def test_a_mutator_pointed_at_a_missing_config_says_so(tmp_path):
    flow = tmp_path / "misnamed_flow.py"
    flow.write_text(TINY_FLOW.replace("@remote_compute\n", '@remote_compute(config="settings")\n'))
    done = _metaflow(flow, KUBERNETES, "output-raw", "--json")
    assert done.returncode != 0
    assert "no Config named 'settings'" in done.stdout + done.stderr
