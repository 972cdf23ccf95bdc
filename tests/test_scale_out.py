"""Scale-out paths, offline: the whole flow on an S3 datastore (moto on 127.0.0.1) with resume, and the
production specs (`argo-workflows create --only-json`, `step-functions create --only-json`) rendered from the
shipped remote-compute configs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from metaflow import Runner, Task

from counting.sources.generated import generate_abid_layout

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "flows" / "counting_flow.py"
CONFIGS = ROOT / "flows" / "configs"
BUCKET = "counting-flows"
SYSROOT = f"s3://{BUCKET}/metaflow"
GPU_STEPS = ("trial", "extend", "retrain")
PARAMETERS = set(re.findall(r'Parameter\(\s*"([^"]+)"', FLOW.read_text()))

TINY_CONFIG = json.loads((FLOW.parent / "config.json").read_text())
TINY_CONFIG["data"].update(generated_images=100, image_size=32, shard_size=25)
TINY_CONFIG["train"].update(backbone="resnet18", weights="none", image_size=32)
TINY_CONFIG["search"].update(trials=2, tpe_trials=0, space={
    "lr": {"type": "log_uniform", "low": 0.01, "high": 0.1},
    "batch_size": {"type": "choice", "values": [32]},
    "epochs": {"type": "int", "low": 1, "high": 2},
})
TINY_CONFIG["deploy"].update(probe_images=4)


def _s3(endpoint: str, service: str = "s3"):
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture(scope="module")
def s3_env(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Metaflow and boto3 pointed at a bucket on the moto server, in this process and in the flow's."""
    _s3(moto_server).create_bucket(Bucket=BUCKET)
    home = tmp_path_factory.mktemp("scale-out")
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_server, "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "METAFLOW_HOME": str(home), "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": SYSROOT,
        "METAFLOW_S3_ENDPOINT_URL": moto_server, "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(home / "local"), "USERNAME": "tester",
        "COUNTING_CACHE": str(home / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield env


@pytest.fixture(scope="module")
def abid_on_s3(s3_env, tmp_path_factory) -> str:
    """60 generated bins in ABID layout on the moto server; one truncated image, one malformed metadata file."""
    root = generate_abid_layout(tmp_path_factory.mktemp("bins"), 60, seed=3, progress=False)
    damaged = {"00001.jpg": lambda body: body[:200], "00002.json": lambda body: b"{not json"}
    s3 = _s3(s3_env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="bins")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        body = damaged.get(path.name, lambda data: data)(path.read_bytes())
        s3.put_object(Bucket="bins", Key=f"abid/{path.relative_to(root).as_posix()}", Body=body)
    return "s3://bins/abid"


@pytest.fixture(scope="module")
def failed_and_resumed(s3_env, abid_on_s3):
    """A run on S3 whose trials fail once after their first epoch and whose retrain fails, then its resume:
    both runs, read with the client."""
    config = [("config", TINY_CONFIG)]
    with Runner(str(FLOW), env={**s3_env, "COUNTING_FAIL_STEP": "trial@1,retrain"}, config_value=config,
                show_output=False) as runner:
        failing = runner.run(max_workers=2, source=abid_on_s3)
        assert failing.status == "failed" and not failing.run["retrain"].task.successful, failing.stderr
        origin = failing.run
    with Runner(str(FLOW), env=s3_env, show_output=False) as runner:  # resume reuses the origin's config
        resumed = runner.resume(origin_run_id=origin.id)
        assert resumed.status == "successful", _failed_task_logs(resumed.run)
        return origin, resumed.run


@pytest.fixture(scope="module")
def resumed_run(failed_and_resumed):
    return failed_and_resumed[1]


def _failed_task_logs(run) -> str:
    return "\n".join(f"{task.pathspec}:\n{task.stderr[-3000:]}" for step in run for task in step
                     if not task.successful)


def test_run_on_s3_resumes_after_a_failed_retrain_and_reads_back(resumed_run):
    run = resumed_run
    end = run["end"].task
    assert end.metadata_dict["ds-type"] == "s3" and end.metadata_dict["ds-root"] == SYSROOT
    dataset = run["split"].task.data.dataset
    assert len(dataset.ids) == len(dataset.images) == 58
    assert {"id", "count", "sha256", "key"} <= set(dataset.manifest[0])
    data = run.data
    assert [t["round"] for t in data.trials].count(1) == 2 and all(t["status"] == "ok" for t in data.trials)
    assert {"accuracy", "rmse", "confusion_matrix"} <= set(data.test_metrics)
    assert len(data.endpoint["answers"]) == 4
    assert data.model_package["size"] == len(data.model_package["bytes"]) > 0
    trial_tasks = list(run["trial"])
    assert len(trial_tasks) == 2 and all(t.metadata_dict.get("origin-task-id") for t in trial_tasks)
    assert not run["retrain"].task.metadata_dict.get("origin-task-id")


def test_a_retried_trial_resumes_from_its_checkpoint_on_s3(failed_and_resumed, s3_env):
    origin, _ = failed_and_resumed
    s3 = _s3(s3_env["AWS_ENDPOINT_URL"])
    for task in origin["trial"]:
        assert task.successful and task.current_attempt == 1
        assert "'trial@1': failing step 'trial' as requested" in Task(task.pathspec, attempt=0).stderr
        key = f"metaflow/BinCountingFlow/counting-checkpoints/{origin.id}/trial/{task.id}.pt"
        assert f"Resuming from the checkpoint this task saved before its retry: s3://{BUCKET}/{key}" in task.stdout
        assert s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0
        assert [row["epoch"] for row in task.data.trial_result["history"]] == [1]


def test_fetch_is_sharded_and_damaged_objects_are_reported(resumed_run):
    assert len(list(resumed_run["fetch_shard"])) == 3
    skipped = {s["key"]: s["reason"] for s in resumed_run.data.skipped}
    assert set(skipped) == {"s3://bins/abid/bin-images/00001.jpg", "s3://bins/abid/metadata/00002.json"}
    assert len(resumed_run.data.manifest) == 58
    assert all(m["key"].startswith("s3://bins/abid/bin-images/") for m in resumed_run.data.manifest)


def test_the_dataset_is_stored_once_on_s3_and_referenced_by_every_step(resumed_run, s3_env):
    shas: dict[str, set[str]] = {}
    for step in resumed_run:
        for task in step:
            if "dataset" in task:
                shas.setdefault(step.id, set()).add(task["dataset"].sha)
    assert {"split", "trial", "extend", "retrain"} <= set(shas)
    (sha,) = set().union(*shas.values())
    key = f"metaflow/BinCountingFlow/data/{sha[:2]}/{sha}"
    assert _s3(s3_env["AWS_ENDPOINT_URL"]).head_object(Bucket=BUCKET, Key=key)["ContentLength"] > 0


# -- production specs ---------------------------------------------------------------------------------------

def _render(flow: Path, env: dict[str, str], config: dict, *command: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(flow), "--no-pylint", "--config-value", "config", json.dumps(config), *command,
         "--only-json"], env={**os.environ, **env}, cwd=flow.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _code_package_config(endpoint: str, url: str) -> dict:
    """The config that a deployed run's code package carries."""
    key = url.removeprefix(f"s3://{BUCKET}/")
    body = _s3(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as package:
        return json.loads(package.extractfile(".mf_meta/CONFIG").read())["user_configs"]["config"][0]


def _environment(variables: list[dict], key: str = "name", value: str = "value") -> dict[str, str]:
    return {v[key]: v.get(value) for v in variables}


@pytest.mark.parametrize("remote", [True, False], ids=["kubernetes.json", "with-kubernetes"])
def test_argo_workflows_spec_puts_training_on_gpus(s3_env, tmp_path, remote):
    pytest.importorskip("kubernetes")
    image = "registry.example/counting:test"
    config = json.loads((CONFIGS / "kubernetes.json").read_text())
    if not remote:
        config["compute"].pop("remote")
    spec = _render(FLOW, {**s3_env, "METAFLOW_KUBERNETES_NAMESPACE": "counting",
                                          "METAFLOW_KUBERNETES_CONTAINER_IMAGE": image},
                   config, "argo-workflows", "create", "--max-workers", "4")
    steps = {t["metadata"]["annotations"]["metaflow/step_name"]: t for t in spec["spec"]["templates"]
             if "metaflow/step_name" in (t.get("metadata") or {}).get("annotations", {})}
    remote_section = config["compute"].get("remote") or {"steps": {}}
    light = set(steps) - set(GPU_STEPS) - set(remote_section["steps"])
    assert {"start", "split", "select", "deploy", "end"} <= light

    def limits(name: str) -> dict:
        return steps[name]["container"]["resources"]["limits"]

    for name in GPU_STEPS:
        assert limits(name)["nvidia.com/gpu"] == "1", name
    for name in light:
        assert "nvidia.com/gpu" not in limits(name), name
        assert steps[name]["container"]["image"] == image
    for name, wanted in remote_section["steps"].items():
        template = steps[name]
        assert template["container"]["image"] == remote_section["image"]
        assert template["serviceAccountName"] == remote_section["service_account"]
        assert template["nodeSelector"] == wanted["node_selector"]
        assert float(template["container"]["resources"]["requests"]["memory"].rstrip("M")) == wanted["memory"]
        assert ("nvidia.com/gpu" in limits(name)) == bool(wanted.get("gpu")), name
    assert spec["spec"]["parallelism"] == 4
    dag = next(t for t in spec["spec"]["templates"] if t["name"] == "BinCountingFlow")["dag"]["tasks"]
    assert sum("withParam" in task for task in dag) >= 2
    parameters = {p["name"]: json.loads(p["value"]) for p in spec["spec"]["arguments"]["parameters"]}
    assert set(parameters) == PARAMETERS and parameters["source"] == "generated"
    code_url = _environment(steps["start"]["container"]["env"])["METAFLOW_CODE_URL"]
    assert _code_package_config(s3_env["AWS_ENDPOINT_URL"], code_url) == config


@pytest.fixture
def batch_queues(s3_env) -> dict[str, str]:
    """AWS Batch job queues on moto (Step Functions looks them up while rendering); returns the settings."""
    endpoint = s3_env["AWS_ENDPOINT_URL"]
    iam, ec2, batch = _s3(endpoint, "iam"), _s3(endpoint, "ec2"), _s3(endpoint, "batch")
    existing = {q["jobQueueName"] for q in batch.describe_job_queues()["jobQueues"]}
    queues = {"counting-cpu", "counting-gpu"}
    if not queues <= existing:
        role = iam.create_role(RoleName="counting-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        profile = iam.create_instance_profile(InstanceProfileName="counting-ecs")["InstanceProfile"]["Arn"]
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="counting", Description="batch", VpcId=vpc)["GroupId"]
        environment = batch.create_compute_environment(
            computeEnvironmentName="counting", type="MANAGED", state="ENABLED", serviceRole=role,
            computeResources={"type": "EC2", "minvCpus": 0, "maxvCpus": 16, "instanceTypes": ["g5.2xlarge"],
                              "subnets": [subnet], "securityGroupIds": [group], "instanceRole": profile})
        for name in queues:
            batch.create_job_queue(jobQueueName=name, state="ENABLED", priority=1, computeEnvironmentOrder=[
                {"order": 1, "computeEnvironment": environment["computeEnvironmentArn"]}])
    return {"METAFLOW_BATCH_JOB_QUEUE": "counting-cpu",
            "METAFLOW_ECS_S3_ACCESS_IAM_ROLE": "arn:aws:iam::123456789012:role/counting-task",
            "METAFLOW_SFN_IAM_ROLE": "arn:aws:iam::123456789012:role/counting-sfn",
            "METAFLOW_SFN_DYNAMO_DB_TABLE": "counting-sfn-state",
            "METAFLOW_BATCH_CONTAINER_IMAGE": "registry.example/counting:test"}


def _batch_states(states: dict) -> Iterator[tuple[str, dict]]:
    for name, state in states.items():
        if state["Type"] == "Map":
            yield from _batch_states(state["Iterator"]["States"])
        elif state.get("Resource", "").startswith("arn:aws:states:::batch"):
            yield name, state


def test_step_functions_spec_puts_training_on_gpus(s3_env, batch_queues, tmp_path):
    config = json.loads((CONFIGS / "aws-batch.json").read_text())
    remote = config["compute"]["remote"]
    spec = _render(FLOW, {**s3_env, **batch_queues}, config, "step-functions", "create",
                   "--max-workers", "4")
    jobs = dict(_batch_states(spec["States"]))
    light = set(jobs) - set(GPU_STEPS) - set(remote["steps"])
    assert {"start", "split", "select", "deploy", "end"} <= light

    def resources(name: str) -> dict[str, str]:
        overrides = jobs[name]["Parameters"]["ContainerOverrides"]["ResourceRequirements"]
        return {r["Type"]: r["Value"] for r in overrides}

    def image(name: str) -> str:
        arn = jobs[name]["Parameters"]["JobDefinition"]
        definition = _s3(s3_env["AWS_ENDPOINT_URL"], "batch").describe_job_definitions(jobDefinitions=[arn])
        return definition["jobDefinitions"][0]["containerProperties"]["image"]

    for name in GPU_STEPS:
        assert resources(name)["GPU"] == "1", name
    for name, wanted in remote["steps"].items():
        assert float(resources(name)["MEMORY"]) == wanted["memory"], name
        assert ("GPU" in resources(name)) == bool(wanted.get("gpu")), name
        assert jobs[name]["Parameters"]["JobQueue"] == wanted.get("queue", remote["queue"])
        assert image(name) == remote["image"]
    for name in light:
        assert "GPU" not in resources(name), name
        assert jobs[name]["Parameters"]["JobQueue"] == batch_queues["METAFLOW_BATCH_JOB_QUEUE"]
        assert image(name) == batch_queues["METAFLOW_BATCH_CONTAINER_IMAGE"]
    maps = [state for state in spec["States"].values() if state["Type"] == "Map"]
    assert len(maps) >= 2 and all(state["MaxConcurrency"] == 4 for state in maps)
    start_env = _environment(jobs["start"]["Parameters"]["ContainerOverrides"]["Environment"], "Name", "Value")
    defaults = json.loads(start_env["METAFLOW_DEFAULT_PARAMETERS"])  # the parameters that have a default
    assert set(defaults) <= PARAMETERS and defaults["source"] == "generated"
    assert _code_package_config(s3_env["AWS_ENDPOINT_URL"], start_env["METAFLOW_CODE_URL"]) == config
