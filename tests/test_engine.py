import dataclasses

import pytest
import torch

from cloudedge.engine import LocalEngine, Task, WorkerError, WorkerSpec, check_plain, make_engine
from cloudedge.errors import InputError


class Counter:
    built = 0

    def __init__(self, start: int, weight: torch.Tensor | None = None):
        Counter.built += 1
        self.value = start
        self.weight = weight if weight is not None else torch.zeros(2)

    def add(self, n: int) -> int:
        self.value += n
        return self.value

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        t.mul_(2)  # mutates its argument: must not reach the caller's tensor
        return t

    def keep(self) -> torch.Tensor:
        return self.weight

    def boom(self) -> None:
        raise RuntimeError("disk on fire")

    def leak(self) -> object:
        return object()

    def bad_input(self) -> None:
        raise InputError("data/names.txt:3: no class folder 'bird'")


@dataclasses.dataclass
class Msg:
    step: int
    grads: dict


def test_lazy_build_state_and_release():
    Counter.built = 0
    eng = LocalEngine()
    eng.register("d0", WorkerSpec(Counter, {"start": 10}))
    eng.register("d1", WorkerSpec(Counter, {"start": 0}))
    assert Counter.built == 0 and eng.live_workers == 0
    assert eng.run([Task("d0", "add", {"n": 1}), Task("d0", "add", {"n": 2})]) == [11, 13]
    assert Counter.built == 1
    eng.release("d0")
    assert eng.call("d0", "add", n=1) == 11  # rebuilt from its spec


def test_no_shared_mutable_tensors():
    eng = LocalEngine()
    eng.register("w", WorkerSpec(Counter, {"start": 0}))
    x = torch.ones(3)
    out = eng.call("w", "scale", t=x)
    assert torch.equal(x, torch.ones(3)) and torch.equal(out, 2 * torch.ones(3))
    kept = eng.call("w", "keep")
    kept.add_(5)
    assert torch.equal(eng.call("w", "keep"), torch.zeros(2))


def test_worker_failure_names_worker():
    eng = LocalEngine()
    eng.register("edge0/dev3", WorkerSpec(Counter, {"start": 0}))
    with pytest.raises(WorkerError, match=r"edge0/dev3\.boom.*disk on fire"):
        eng.call("edge0/dev3", "boom")
    res = eng.run_tolerant([Task("edge0/dev3", "add", {"n": 1}), Task("edge0/dev3", "boom")])
    assert res[0] == 1 and isinstance(res[1], WorkerError)


def test_input_error_in_a_worker_propagates_as_itself():
    """Bad input a worker finds is the user's to fix, not a failure to tolerate and retry."""
    eng = LocalEngine()
    eng.register("edge0", WorkerSpec(Counter, {"start": 0}))
    for run in (eng.run, eng.run_tolerant):
        with pytest.raises(InputError, match="names.txt:3: no class folder 'bird'") as caught:
            run([Task("edge0", "add", {"n": 1}), Task("edge0", "bad_input")])
        assert not isinstance(caught.value, WorkerError)
    eng.register("edge2", WorkerSpec(_BadInputOnBuild, {}))
    with pytest.raises(InputError, match="built from bad input"):
        eng.run_tolerant([Task("edge2", "add", {"n": 1})])


class _BadInputOnBuild:
    def __init__(self):
        raise InputError("built from bad input")


def test_only_plain_data_crosses():
    eng = LocalEngine()
    eng.register("w", WorkerSpec(Counter, {"start": 0}))
    with pytest.raises(TypeError, match="not plain data"):
        eng.call("w", "leak")
    with pytest.raises(TypeError):
        eng.register("x", WorkerSpec(Counter, {"start": object()}))
    check_plain(Msg(1, {"a": torch.zeros(1), "b": [1.0, "x"]}))
    with pytest.raises(KeyError):
        eng.call("nobody", "add", n=1)


def test_make_engine():
    assert isinstance(make_engine("local"), LocalEngine)
    with pytest.raises(InputError, match="unknown engine"):
        make_engine("mpi")


def test_a_task_can_release_its_worker_even_when_it_fails():
    eng = LocalEngine()
    eng.register("edge0/dev0", WorkerSpec(Counter, {"start": 0}))
    eng.register("edge0/dev1", WorkerSpec(Counter, {"start": 0}))
    assert eng.run([Task("edge0/dev0", "add", {"n": 1}, release=True), Task("edge0/dev1", "add", {"n": 1})]) == [1, 1]
    assert eng.live_workers == 1  # dev0 was dropped after its task, dev1 kept
    assert eng.run([Task("edge0/dev0", "add", {"n": 1})]) == [1]  # rebuilt from its spec
    with pytest.raises(WorkerError):
        eng.run([Task("edge0/dev1", "boom", release=True)])
    assert eng.run([Task("edge0/dev1", "add", {"n": 5})]) == [5]  # released although it failed


class OnGpu:
    def make(self, like: torch.Tensor) -> dict:
        assert like.device.type == "cpu"  # what a coordinator on a GPU sends arrives in host memory
        return {"w": like.to("cuda") * 2, "nested": [like.to("cuda")]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("copy", [True, False])
def test_gpu_tensors_cross_either_engine_mode_in_host_memory(copy):
    eng = LocalEngine(copy=copy)
    eng.register("gpu", WorkerSpec(OnGpu))
    (out,) = eng.run([Task("gpu", "make", {"like": torch.ones(3, device="cuda")})])
    assert out["w"].device.type == "cpu" and out["nested"][0].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensors_cross_a_ray_host_in_host_memory():
    from cloudedge.engine.ray import WorkerHost

    host = WorkerHost()  # the Ray actor's body (no copy of its own: Ray serializes)
    host.register("gpu", WorkerSpec(OnGpu))
    (out,) = host.run([Task("gpu", "make", {"like": torch.ones(3, device="cuda")})])
    assert out["w"].device.type == "cpu" and out["nested"][0].device.type == "cpu"


def test_a_refused_task_leaves_no_worker_behind():
    eng = LocalEngine()
    eng.register("edge0/dev0", WorkerSpec(Counter, {"start": 0}))
    with pytest.raises(TypeError):
        eng.run([Task("edge0/dev0", "add", {"n": object()}, release=True)])
    assert eng.live_workers == 0
