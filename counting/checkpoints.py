"""Training checkpoints kept in the run's own Metaflow datastore (local folder, S3, Azure or GCS alike), keyed by
the task, so that a retried task resumes from its last epoch on whichever machine the retry lands."""

from __future__ import annotations

import io
from typing import Any

CHECKPOINTS_FOLDER = "counting-checkpoints"


class TaskCheckpoint:
    """The latest checkpoint of one task: `load()` it at the start of an attempt, `save()` it after each epoch."""

    def __init__(self, storage: Any, key: str) -> None:
        """storage: a Metaflow `DataStoreStorage` (what the run's datastore writes through); key: a path in it."""
        self._storage = storage
        self.key = key

    @property
    def uri(self) -> str:
        """Where the checkpoint lives, for logs (for example s3://bucket/metaflow/Flow/counting-checkpoints/...)."""
        return self._storage.full_uri(self.key)

    def load(self) -> bytes | None:
        """The saved checkpoint, or None when this task has not saved one yet."""
        with self._storage.load_bytes([self.key]) as loaded:
            for _, local_path, _ in loaded:
                if local_path is None:
                    return None
                with open(local_path, "rb") as handle:
                    return handle.read()
        return None

    def save(self, state: bytes) -> None:
        """Replace the saved checkpoint with `state`."""
        self._storage.save_bytes([(self.key, io.BytesIO(state))], overwrite=True, len_hint=1)


def checkpoint_key(flow_name: str, run_id: str, step_name: str, task_id: str) -> str:
    """The datastore path of a task's checkpoint, beside the flow's own data and outside any task's folder."""
    return "/".join([flow_name, CHECKPOINTS_FOLDER, str(run_id), step_name, f"{task_id}.pt"])


def task_checkpoint(flow: Any) -> TaskCheckpoint:
    """The checkpoint of the task that is running `flow`'s current step, stored in the run's datastore."""
    from metaflow import current

    task_datastore = getattr(flow, "_datastore", None)
    if not current.is_running_flow or task_datastore is None:
        raise RuntimeError("task_checkpoint() needs a running Metaflow task: call it inside a step")
    storage = task_datastore.parent_datastore._storage_impl
    return TaskCheckpoint(storage, checkpoint_key(current.flow_name, current.run_id, current.step_name,
                                                  current.task_id))
