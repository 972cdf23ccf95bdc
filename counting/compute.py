"""Send chosen steps of a flow to AWS Batch or Kubernetes, as its Config says.

A flow decorated with `@remote_compute` reads `compute.remote` from its config:

    {"backend": "batch" | "kubernetes",
     "image": "<registry>/counting:<tag>",            # options here apply to every listed step
     "queue": "...", "iam_role": "...",               # batch options, or service_account, node_selector, ...
     "steps": {"trial": {"gpu": 1, "cpu": 8, "memory": 60000}, "fetch": {"cpu": 8, "memory": 16000}}}

and adds `@batch(...)` or `@kubernetes(...)` to each listed step; every other step runs where the run started.
Without a `remote` section (or with `"remote": null`) the flow is left as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Real
from typing import Any

from metaflow import FlowMutator
from metaflow.exception import MetaflowException
from metaflow.user_decorators.mutable_flow import MutableFlow
from metaflow.user_decorators.mutable_step import MutableStep

BACKENDS = ("batch", "kubernetes")
SIZE_KEYS = ("cpu", "gpu", "memory")


class ComputeConfigError(MetaflowException, ValueError):
    """A `compute.remote` section Metaflow cannot act on; the message names the key and value."""

    headline = "Invalid compute.remote configuration"


def decorator_options(backend: str) -> set[str]:
    """The attribute names Metaflow's `@batch` or `@kubernetes` accepts."""
    from metaflow.plugins import STEP_DECORATORS

    if backend not in BACKENDS:
        raise ComputeConfigError(f"compute.remote.backend: unknown backend {backend!r}; known: {list(BACKENDS)}")
    return set(next(d for d in STEP_DECORATORS if d.name == backend).defaults)


def remote_step_decorators(remote: Mapping[str, Any] | None, step_names: set[str]) -> dict[str, tuple[str, dict]]:
    """Validate a `compute.remote` section; return {step: (backend, decorator attributes)}.

    Empty when `remote` is None. Unknown backends, steps and options raise a ComputeConfigError naming them.
    """
    if remote is None:
        return {}
    if not isinstance(remote, Mapping):
        raise ComputeConfigError(f"compute.remote: expected an object or null, got {remote!r}")
    if "backend" not in remote:
        raise ComputeConfigError(f"compute.remote: 'backend' is missing; choose one of {list(BACKENDS)}")
    backend = remote["backend"]
    known = decorator_options(backend)
    shared = {k: v for k, v in remote.items() if k not in ("backend", "steps")}
    _check_options(shared, known, "compute.remote", backend)
    steps = remote.get("steps")
    if not isinstance(steps, Mapping) or not steps:
        raise ComputeConfigError(f"compute.remote.steps: name the steps to run on {backend}, e.g. "
                                 f'{{"trial": {{"gpu": 1}}}}; got {steps!r}')
    unknown_steps = sorted(set(steps) - step_names)
    if unknown_steps:
        raise ComputeConfigError(f"compute.remote.steps: unknown step(s) {unknown_steps}; "
                                 f"the flow has {sorted(step_names)}")
    decorators = {}
    for name, sizes in steps.items():
        if not isinstance(sizes, Mapping):
            raise ComputeConfigError(f"compute.remote.steps.{name}: expected an object such as "
                                     f'{{"gpu": 1}}, got {sizes!r}')
        _check_options(sizes, known, f"compute.remote.steps.{name}", backend)
        decorators[name] = (backend, {**shared, **sizes})
    return decorators


def _check_options(options: Mapping[str, Any], known: set[str], where: str, backend: str) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ComputeConfigError(f"{where}: unknown {backend} option(s) {unknown}; known: {sorted(known)}")
    for key in SIZE_KEYS:
        value = options.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or value < 0 or (key != "gpu" and value == 0):
            kind = "non-negative" if key == "gpu" else "positive"
            raise ComputeConfigError(f"{where}.{key}: expected a {kind} number, got {value!r}")


class remote_compute(FlowMutator):
    """Flow decorator: put the steps named in `<config>.compute.remote.steps` on `@batch` or `@kubernetes`.

    Use it bare (`@remote_compute`, reading the Config named "config") or name the Config:
    `@remote_compute(config="settings")`. A step's own `@resources` still counts: Metaflow takes the larger
    of the two for each size.
    """

    def init(self, config: str = "config") -> None:
        self.config_name = config

    def mutate(self, mutable_flow: MutableFlow) -> None:
        configs = dict(mutable_flow.configs)
        if self.config_name not in configs:
            raise ComputeConfigError(f"remote_compute: the flow has no Config named {self.config_name!r}; "
                                     f"it has {sorted(configs)}")
        compute = (configs[self.config_name] or {}).get("compute") or {}
        remote = compute.get("remote")
        steps: dict[str, MutableStep] = dict(mutable_flow.steps)
        plain = remote.to_dict() if hasattr(remote, "to_dict") else remote
        for name, (backend, attributes) in remote_step_decorators(plain, set(steps)).items():
            steps[name].add_decorator(backend, deco_kwargs=attributes, duplicates=MutableStep.OVERRIDE)
