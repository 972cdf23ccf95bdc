"""Task checkpoints in the run's datastore: the same round trip on a local folder and on S3 (moto), and a retried
training that resumes from the datastore after its scratch folder is gone."""

from __future__ import annotations

import boto3
import pytest
import torch

from counting import pipeline
from counting.checkpoints import TaskCheckpoint, checkpoint_key, task_checkpoint
from counting.preprocess import encode_jpeg_bytes
from counting.training import LabelledImages, TrainParams

KEY = checkpoint_key("BinCountingFlow", "17", "trial", "4")


def test_checkpoint_key_sits_beside_the_flows_data_outside_task_folders():
    assert KEY == "BinCountingFlow/counting-checkpoints/17/trial/4.pt"


@pytest.fixture
def local_storage(tmp_path):
    from metaflow.plugins.datastores.local_storage import LocalStorage

    return LocalStorage(str(tmp_path / "datastore"))


@pytest.fixture
def s3_storage(aws_env):
    from metaflow.plugins.datastores.s3_storage import S3Storage

    boto3.client("s3").create_bucket(Bucket="checkpoints")
    return S3Storage("s3://checkpoints/metaflow")


@pytest.mark.parametrize("storage_fixture", ["local_storage", "s3_storage"])
def test_round_trip_and_overwrite(storage_fixture, request):
    checkpoint = TaskCheckpoint(request.getfixturevalue(storage_fixture), KEY)
    assert checkpoint.load() is None
    checkpoint.save(b"epoch 1")
    checkpoint.save(b"epoch 2")
    assert checkpoint.load() == b"epoch 2"
    assert checkpoint.uri.endswith("/datastore/" + KEY) or checkpoint.uri == f"s3://checkpoints/metaflow/{KEY}"


def test_checkpoint_on_s3_is_an_object_under_the_datastore_root(s3_storage):
    TaskCheckpoint(s3_storage, KEY).save(b"state")
    body = boto3.client("s3").get_object(Bucket="checkpoints", Key=f"metaflow/{KEY}")["Body"].read()
    assert body == b"state"


def test_task_checkpoint_outside_a_running_task_is_a_clear_error():
    with pytest.raises(RuntimeError, match="inside a step"):
        task_checkpoint(object())


def _noise(n: int, seed: int) -> LabelledImages:
    generator = torch.Generator().manual_seed(seed)
    images = [encode_jpeg_bytes(torch.randint(0, 255, (3, 32, 32), generator=generator, dtype=torch.uint8))
              for _ in range(n)]
    return LabelledImages(images, [i % 2 for i in range(n)])


def test_a_retried_fit_resumes_from_the_datastore_checkpoint(local_storage, monkeypatch, capsys):
    params = TrainParams(backbone="resnet18", weights="none", batch_size=8, epochs=3, image_size=32)
    data = dict(train=_noise(16, 0), val=_noise(8, 1), counts=[1, 2])
    checkpoint = TaskCheckpoint(local_storage, KEY)
    monkeypatch.setenv(pipeline.FAIL_ENV, "trial@2")

    with pytest.raises(RuntimeError, match="'trial@2'"):
        pipeline.fit_checkpointed(params, checkpoints=checkpoint, step_name="trial", threads=1, progress=False,
                                  **data)
    assert checkpoint.load() is not None

    retried = pipeline.fit_checkpointed(params, checkpoints=checkpoint, step_name="trial", threads=1,
                                        progress=False, **data)
    assert "Resuming from the checkpoint this task saved" in capsys.readouterr().out
    assert retried.resumed_from_epoch == 2
    assert [row["epoch"] for row in retried.history] == [1, 2, 3]

    monkeypatch.delenv(pipeline.FAIL_ENV)
    uninterrupted = pipeline.fit_checkpointed(params, checkpoints=None, step_name="trial", threads=1,
                                              progress=False, **data)
    assert [row["train_loss"] for row in retried.history] == [row["train_loss"] for row in uninterrupted.history]
