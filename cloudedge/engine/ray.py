"""RayEngine: the same workers as Ray actors, on one machine or a Ray cluster.

Placement follows the fleet: every worker id's first path part names its *host* ("cloud",
"edge0", ...); one actor per host runs that host's workers, so a device's work runs on its edge's
node. Edge hosts ask for a sliver of the custom resource ``edge`` and the cloud host for a sliver
of ``cloud``: Ray places them on the nodes started with ``--resources '{"edge": N}'`` (edge
servers) and ``--resources '{"cloud": 1}'`` (the cloud). Inside an actor, workers are kept by a
`LocalEngine`, so the two engines share one mechanism and give the same results.

Only plain data crosses (checked before sending), its tensors in host memory (a GPU on either side
stays on its side); Ray serializes it, so nothing is shared.
A host actor that dies is rebuilt from the specs held here and its tasks in flight come back as
`WorkerError`s: `run_tolerant` lets a round complete without them. An `InputError` a worker raises
(bad user input) comes back as data and is raised here, from `run` and `run_tolerant` alike.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from cloudedge.engine.base import Engine, Task, WorkerError, WorkerSpec, check_plain, to_host
from cloudedge.engine.local import LocalEngine
from cloudedge.errors import InputError
from cloudedge.registry import PluginSource, load_plugin_sources, plugin_key, plugin_sources

# A host asks for this much of its tier's custom resource: many hosts fit on one node.
RESOURCE_SLIVER = 0.01


def host_of(worker_id: str) -> str:
    """'edge0/dev3' -> 'edge0'; 'cloud' -> 'cloud'."""
    return worker_id.split("/", 1)[0]


class WorkerHost:
    """The actor body: a LocalEngine holding one host's workers (cloud, or an edge and its devices)."""

    def __init__(self, torch_threads: int = 1, plugins: list[PluginSource] | None = None):
        import torch

        torch.set_num_threads(torch_threads)
        # Serialization already copies what crosses; no second copy inside the actor.
        self.local = LocalEngine(copy=False, check=False)
        self.plugin_error: InputError | None = None
        self.load_plugins(plugins or [])

    def load_plugins(self, plugins: list[PluginSource]) -> InputError | None:
        """Import the driver's plug-ins here. A failure is kept and answers every later task, as
        data (an InputError, not a dead actor that would be rebuilt and fail again)."""
        try:
            load_plugin_sources(plugins)
        except InputError as err:
            self.plugin_error = InputError(f"{err} on the Ray host of pid {os.getpid()}")
        return self.plugin_error

    def register(self, worker_id: str, spec: WorkerSpec) -> None:
        self.local.register(worker_id, spec)

    def release(self, worker_id: str) -> None:
        self.local.release(worker_id)

    def unregister(self, worker_id: str) -> None:
        self.local.unregister(worker_id)

    def run(self, tasks: list[Task]) -> list[Any]:
        if self.plugin_error is not None:
            return [self.plugin_error for _ in tasks]
        out: list[Any] = []
        for task in tasks:
            try:
                out.extend(self.local.run([task]))
            except WorkerError as err:
                # The exception object travels back as data: worker id, method and message.
                out.append(WorkerError(err.worker_id, err.method, repr(err.cause)))
            except InputError as err:
                out.append(err)  # travels back as data too; the coordinator raises it (bad input, no retry)
        return out

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayEngine(Engine):
    """Workers as Ray actors, one actor per host (cloud / edge server)."""

    name = "ray"

    def __init__(self, address: str | None = None, torch_threads: int = 1, place_by_resource: bool = True,
                 init_kwargs: dict[str, Any] | None = None):
        try:
            import ray
        except ModuleNotFoundError:
            raise InputError("engine.kind: ray needs the extra: pip install 'cloudedge[ray]'") from None
        self._ray = ray
        self.torch_threads = torch_threads
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = dict(init_kwargs or {})
            kwargs.setdefault("include_dashboard", False)
            kwargs.setdefault("log_to_driver", False)
            if address:
                try:
                    ray.init(address=address, **kwargs)
                except ConnectionError as err:
                    raise InputError(f"engine.address: cannot reach a Ray cluster at {address!r} ({err})") from None
            else:
                # A private single-node cluster that carries both tiers' resources.
                kwargs.setdefault("resources", {"cloud": 1, "edge": 64})
                kwargs.setdefault("num_cpus", os.cpu_count() or 1)
                ray.init(**kwargs)
            self._owns_ray = True
        resources = ray.cluster_resources()
        self.place_by_resource = place_by_resource and resources.get("edge", 0) > 0
        self._cloud_resource = resources.get("cloud", 0) > 0
        self._specs: dict[str, WorkerSpec] = {}
        self._hosts: dict[str, Any] = {}
        self._actor_cls = ray.remote(WorkerHost)
        self._plugins: list[PluginSource] = []  # sent to every host, the ones started later too
        self.restarts: dict[str, int] = defaultdict(int)

    # --- hosts -----------------------------------------------------------------------------------
    def _new_host(self, host: str) -> Any:
        options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 1}
        if host == "cloud":
            if self._cloud_resource:
                options["resources"] = {"cloud": RESOURCE_SLIVER}
        elif self.place_by_resource:
            options["resources"] = {"edge": RESOURCE_SLIVER}
        actor = self._actor_cls.options(**options).remote(self.torch_threads, self._plugins)
        for wid, spec in self._specs.items():
            if host_of(wid) == host:
                actor.register.remote(wid, spec)
        return actor

    def _host(self, host: str) -> Any:
        if host not in self._hosts:
            self._hosts[host] = self._new_host(host)
        return self._hosts[host]

    def host_node(self, host: str) -> str:
        """The Ray node id a host's actor runs on (tests check placement with it)."""
        return self._ray.get(self._host(host).node_id.remote())

    def kill_host(self, host: str) -> None:
        """Kill a host's actor (fault injection for tests and the fault benchmark)."""
        if host in self._hosts:
            self._ray.kill(self._hosts[host], no_restart=True)

    # --- Engine ----------------------------------------------------------------------------------
    def use_plugins(self, modules: list[str]) -> None:
        """Ship the plug-ins to every host: a ``.py`` file as its source text (the node need not have
        it), a dotted name as the name (it must be installed on the node). A host that cannot
        import one answers its tasks with that InputError."""
        # Each plug-in once, as a process imports it once: a file edited or removed after it was
        # shipped changes nothing, on every host alike (a new host gets the text first shipped).
        shipped = {entry for entry, _ in self._plugins}
        new = plugin_sources([m for m in modules if plugin_key(m) not in shipped])
        if not new:
            return
        self._plugins.extend(new)
        errors = self._ray.get([actor.load_plugins.remote(new) for actor in self._hosts.values()])
        for err in errors:
            if err is not None:
                raise err

    def register(self, worker_id: str, spec: WorkerSpec) -> None:
        check_plain(spec.kwargs, f"{worker_id} spec")
        spec = dataclasses.replace(spec, kwargs=to_host(spec.kwargs))
        self._specs[worker_id] = spec
        host = host_of(worker_id)
        if host in self._hosts:
            self._hosts[host].register.remote(worker_id, spec)

    def release(self, worker_id: str) -> None:
        host = host_of(worker_id)
        if host in self._hosts:
            self._hosts[host].release.remote(worker_id)

    def unregister(self, worker_id: str) -> None:
        self._specs.pop(worker_id, None)
        host = host_of(worker_id)
        if host in self._hosts:
            self._hosts[host].unregister.remote(worker_id)

    def _dispatch(self, tasks: list[Task]) -> list[Any | WorkerError]:
        by_host: dict[str, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            if task.worker_id not in self._specs:
                raise KeyError(f"no worker registered as {task.worker_id!r}")
            check_plain(task.kwargs, f"{task.worker_id}.{task.method} arguments")
            by_host[host_of(task.worker_id)].append(i)
        sent = [dataclasses.replace(t, kwargs=to_host(t.kwargs)) for t in tasks]
        refs = {h: self._host(h).run.remote([sent[i] for i in idx]) for h, idx in by_host.items()}
        out: list[Any] = [None] * len(tasks)
        for host, idx in by_host.items():
            try:
                results = self._ray.get(refs[host])
            except self._ray.exceptions.RayActorError as err:
                # The host died mid-round: rebuild it from the specs; its tasks are reported failed.
                self.restarts[host] += 1
                self._hosts[host] = self._new_host(host)
                results = [WorkerError(tasks[i].worker_id, tasks[i].method, f"actor died: {type(err).__name__}")
                           for i in idx]
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        for r in out:
            if isinstance(r, InputError):
                raise r  # bad input found by a worker ends the run, as with LocalEngine (run_tolerant too)
        return out

    def run(self, tasks: Iterable[Task]) -> list[Any]:
        results = self._dispatch(list(tasks))
        for r in results:
            if isinstance(r, WorkerError):
                raise r
        return results

    def run_tolerant(self, tasks: Iterable[Task]) -> list[Any | WorkerError]:
        return self._dispatch(list(tasks))

    def close(self) -> None:
        for actor in self._hosts.values():
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone is fine at shutdown
                pass
        self._hosts.clear()
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False
