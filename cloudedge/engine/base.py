"""The Engine: the only way a stage's coordinator reaches its workers.

A worker is an object that lives with its node's data (a device, an edge server, the cloud). The
coordinator never holds a worker: it registers a :class:`WorkerSpec` (a class and plain keyword
arguments) and sends :class:`Task` s, each naming a worker, a method and plain-data arguments. What
crosses the boundary is plain data only (numbers, strings, lists/dicts of those, tensors, and
dataclasses of those), so `LocalEngine` (in-process) and `RayEngine` (actors) give the same results.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """How to build a worker: ``cls(**kwargs)``. kwargs are plain data."""

    cls: type
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
    """Call ``worker.method(**kwargs)`` on the worker registered as ``worker_id``.

    ``release``: drop the worker once this task is done (its next task rebuilds it from its
    spec). Devices hold no model between the rounds they are sampled in, and a batch of tasks
    for many devices holds one device's model at a time, not all of them.
    """

    worker_id: str
    method: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    release: bool = False


class WorkerError(RuntimeError):
    """A worker failed a task (a crash, a dead actor). Carries which worker and what happened."""

    def __init__(self, worker_id: str, method: str, cause: BaseException | str):
        self.worker_id, self.method, self.cause = worker_id, method, cause
        super().__init__(f"worker {worker_id}.{method} failed: {cause}")

    def __reduce__(self):  # picklable across processes (Ray), as plain strings
        return (WorkerError, (self.worker_id, self.method, str(self.cause)))


def check_plain(value: Any, where: str = "value") -> None:
    """Raise TypeError unless ``value`` is plain data that may cross an engine."""
    if value is None or isinstance(value, bool | int | float | str | bytes | torch.Tensor):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(k).__name__}")
            check_plain(v, f"{where}[{k!r}]")
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            check_plain(getattr(value, f.name), f"{where}.{f.name}")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not plain data and may not cross the engine")


def _map_tensors(value: Any, fn: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (lists, tuples, dicts, dataclasses)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def copy_plain(value: Any) -> Any:
    """Deep copy of plain data with every tensor in host memory: nothing mutable is shared, and
    nothing crossing the engine is tied to an accelerator (a worker on a GPU returns CPU tensors,
    a coordinator on a GPU sends CPU tensors), as it would be over a network."""
    return _map_tensors(value, lambda t: t.detach().to("cpu", copy=True))


def to_host(value: Any) -> Any:
    """Plain data with every tensor in host memory, without copying those already there: what
    an engine that skips copies (Ray serializes anyway) still owes the other side."""
    return _map_tensors(value, lambda t: t.detach().cpu())


class Engine(ABC):
    """Runs tasks on registered workers. Subclasses: LocalEngine, RayEngine."""

    name: str = "engine"

    @abstractmethod
    def register(self, worker_id: str, spec: WorkerSpec) -> None:
        """Declare a worker. Building it may be deferred until its first task."""

    @abstractmethod
    def run(self, tasks: Iterable[Task]) -> list[Any]:
        """Run tasks (concurrently where the engine can) and return their results in order.

        A failing task raises :class:`WorkerError` unless ``run_tolerant`` is used. An
        ``InputError`` a worker raises (bad user input) propagates as is from both: it is not a
        worker failure to tolerate or retry.
        """

    def run_tolerant(self, tasks: Iterable[Task]) -> list[Any | WorkerError]:
        """Like :meth:`run`, but a failed task yields its :class:`WorkerError` in its slot."""
        out: list[Any | WorkerError] = []
        for task in tasks:
            try:
                out.extend(self.run([task]))
            except WorkerError as err:
                out.append(err)
        return out

    def use_plugins(self, modules: list[str]) -> None:
        """Make a config's ``plugins:`` (dotted names, or absolute ``.py`` paths) importable wherever
        this engine's workers run, before their next task. In this process they were imported when
        the config loaded, so an engine whose workers live here has nothing to do."""
        return None

    def call(self, worker_id: str, method: str, **kwargs: Any) -> Any:
        """One task, one result."""
        return self.run([Task(worker_id, method, kwargs)])[0]

    @abstractmethod
    def release(self, worker_id: str) -> None:
        """Drop a worker's live object (it is rebuilt from its spec on next use)."""

    def has_worker(self, worker_id: str) -> bool:
        """Whether a worker is registered under ``worker_id``."""
        return worker_id in getattr(self, "_specs", {})

    def worker_ids(self) -> set[str]:
        """The ids registered now."""
        return set(getattr(self, "_specs", {}))

    def unregister(self, worker_id: str) -> None:
        """Forget a worker: its live object and its spec (data included). Stages that register
        devices only when they are sampled call it after their round, so the engine holds what
        one round's devices hold, not the fleet's (docs/performance.md, "Scale")."""
        self.release(worker_id)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free everything the engine holds."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
