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
    """Call ``worker.method(**kwargs)`` on the worker registered as ``worker_id``."""

    worker_id: str
    method: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def copy_plain(value: Any) -> Any:
    """Deep copy of plain data; tensors are copied (detached) to host memory, so nothing mutable is
    shared and nothing crossing the engine is tied to an accelerator (a worker on a GPU returns CPU
    tensors; a coordinator on a GPU sends CPU tensors), as it would be over a network."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, list):
        return [copy_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(copy_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: copy_plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: copy_plain(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


class Engine(ABC):
    """Runs tasks on registered workers. Subclasses: LocalEngine, RayEngine."""

    name: str = "engine"

    @abstractmethod
    def register(self, worker_id: str, spec: WorkerSpec) -> None:
        """Declare a worker. Building it may be deferred until its first task."""

    @abstractmethod
    def run(self, tasks: Iterable[Task]) -> list[Any]:
        """Run tasks (concurrently where the engine can) and return their results in order.

        A failing task raises :class:`WorkerError` unless ``run_tolerant`` is used.
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

    def call(self, worker_id: str, method: str, **kwargs: Any) -> Any:
        """One task, one result."""
        return self.run([Task(worker_id, method, kwargs)])[0]

    @abstractmethod
    def release(self, worker_id: str) -> None:
        """Drop a worker's live object (it is rebuilt from its spec on next use)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free everything the engine holds."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
