"""LocalEngine: workers in this process, one after another (the deterministic default)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cloudedge.engine.base import Engine, Task, WorkerError, WorkerSpec, check_plain, copy_plain, to_host
from cloudedge.errors import InputError


class LocalEngine(Engine):
    """Builds each worker on its first task and keeps it until released.

    A task that fails raises :class:`WorkerError` naming the worker, except an :class:`InputError`
    (bad user input found by the worker, in a task or while it is built), which propagates as is.

    Arguments and results are checked to be plain data and copied (``copy=True``), so a worker
    can never share a mutable tensor with the coordinator: the same contract a Ray actor enforces
    by serialization. ``copy=False`` skips the copies (Ray's actors, which serialize anyway, and
    benchmarks that measure the overhead); tensors still cross in host memory either way.
    """

    name = "local"

    def __init__(self, copy: bool = True, check: bool = True):
        self.copy, self.check = copy, check
        self._specs: dict[str, WorkerSpec] = {}
        self._live: dict[str, Any] = {}

    def register(self, worker_id: str, spec: WorkerSpec) -> None:
        if self.check:
            check_plain(spec.kwargs, f"{worker_id} spec")
        self._specs[worker_id] = spec
        self._live.pop(worker_id, None)

    def _worker(self, worker_id: str) -> Any:
        live = self._live.get(worker_id)
        if live is None:
            try:
                spec = self._specs[worker_id]
            except KeyError:
                raise KeyError(f"no worker registered as {worker_id!r}") from None
            kwargs = copy_plain(spec.kwargs) if self.copy else to_host(spec.kwargs)
            live = self._live[worker_id] = spec.cls(**kwargs)
        return live

    def run(self, tasks: Iterable[Task]) -> list[Any]:
        results = []
        for task in tasks:
            if self.check:  # before the worker is built: a refused task leaves nothing live
                check_plain(task.kwargs, f"{task.worker_id}.{task.method} arguments")
            worker = self._worker(task.worker_id)
            kwargs = copy_plain(task.kwargs) if self.copy else to_host(task.kwargs)
            try:
                result = getattr(worker, task.method)(**kwargs)
            except InputError:
                # Bad input the worker found (data, a class name, a checkpoint): the user's to fix,
                # not a failure to retry on a replacement worker; it ends the run as one line.
                raise
            except Exception as err:  # a worker's failure is reported, with its identity
                raise WorkerError(task.worker_id, task.method, err) from err
            finally:
                if task.release:
                    self.release(task.worker_id)
            if self.check:
                check_plain(result, f"{task.worker_id}.{task.method} result")
            results.append(copy_plain(result) if self.copy else to_host(result))
        return results

    def release(self, worker_id: str) -> None:
        self._live.pop(worker_id, None)

    @property
    def live_workers(self) -> int:
        return len(self._live)

    def close(self) -> None:
        self._live.clear()
