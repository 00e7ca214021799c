"""RayEngine: same results as LocalEngine, placement on a real two-node cluster, faults, auth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

ray = pytest.importorskip("ray")

from cloudedge.bench.ray_cluster import cluster_env, local_cluster  # noqa: E402
from cloudedge.engine import LocalEngine, Task, WorkerSpec  # noqa: E402
from cloudedge.engine.ray import RayEngine, host_of  # noqa: E402


class Trainer:
    """A tiny deterministic worker: least squares on its own seeded data."""

    def __init__(self, seed: int, n: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.arange(1.0, 5.0) + 0.1 * torch.randn(n, generator=g)

    def train(self, weights: torch.Tensor, steps: int) -> dict:
        w = weights.clone().requires_grad_(True)
        opt = torch.optim.SGD([w], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((self.x @ w - self.y) ** 2).mean()
            loss.backward()
            opt.step()
        return {"weights": w.detach(), "loss": float(loss)}

    def bad_input(self) -> None:
        from cloudedge.errors import InputError

        raise InputError("data/names.txt:3: no class folder 'bird'")

    def crash(self) -> None:
        import os

        os._exit(1)  # the whole actor process dies


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    engine = RayEngine(init_kwargs={"num_cpus": 1, "_node_ip_address": "127.0.0.1"})
    yield engine
    engine.close()


def _fedavg(engine, rounds: int = 3) -> torch.Tensor:
    ids = ["edge0/dev0", "edge0/dev1", "edge1/dev0"]
    for i, wid in enumerate(ids):
        engine.register(wid, WorkerSpec(Trainer, {"seed": i}))
    w = torch.zeros(4)
    for _ in range(rounds):
        out = engine.run([Task(wid, "train", {"weights": w, "steps": 3}) for wid in ids])
        w = torch.stack([o["weights"] for o in out]).mean(0)
    return w


def test_host_of():
    assert host_of("edge3/dev7") == "edge3" and host_of("cloud") == "cloud"


def test_same_results_as_local(local_ray):
    assert torch.allclose(_fedavg(local_ray), _fedavg(LocalEngine()), atol=1e-6)


def test_input_error_in_an_actor_reaches_the_coordinator_as_itself(local_ray):
    from cloudedge.engine import WorkerError
    from cloudedge.errors import InputError

    local_ray.register("edge6/dev0", WorkerSpec(Trainer, {"seed": 1}))
    local_ray.register("edge7/dev0", WorkerSpec(Trainer, {"seed": 2}))
    tasks = [Task("edge7/dev0", "train", {"weights": torch.zeros(4), "steps": 1}), Task("edge6/dev0", "bad_input")]
    for run in (local_ray.run, local_ray.run_tolerant):
        with pytest.raises(InputError, match="names.txt:3: no class folder 'bird'") as caught:
            run(tasks)
        assert not isinstance(caught.value, WorkerError)
    assert local_ray.restarts["edge6"] == 0  # not a dead actor: the same host serves the next task
    assert local_ray.call("edge6/dev0", "train", weights=torch.zeros(4), steps=1)["loss"] > 0


def test_dead_actor_is_rebuilt_and_round_completes(local_ray):
    local_ray.register("edge5/dev0", WorkerSpec(Trainer, {"seed": 5}))
    local_ray.register("edge5/dev1", WorkerSpec(Trainer, {"seed": 6}))
    results = local_ray.run_tolerant([Task("edge5/dev0", "crash"), Task("edge5/dev1", "train",
                                                                       {"weights": torch.zeros(4), "steps": 1})])
    assert "actor died" in str(results[0])
    assert local_ray.restarts["edge5"] == 1
    after = local_ray.run([Task("edge5/dev1", "train", {"weights": torch.zeros(4), "steps": 1})])[0]
    assert after["loss"] > 0  # the host was rebuilt from its specs


DRIVER = textwrap.dedent(
    """
    import sys, json, torch
    sys.path.insert(0, {root!r})
    from tests.test_engine_ray import Trainer, _fedavg
    from cloudedge.engine.ray import RayEngine
    import ray
    ray.init(address={address!r}, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules["tests.test_engine_ray"])
    eng = RayEngine(address={address!r})
    w = _fedavg(eng)
    nodes = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
    print(json.dumps({{"w": w.tolist(), "edge": nodes[eng.host_node("edge0")].get("edge", 0),
                      "cloud": nodes[eng.host_node("cloud")].get("cloud", 0),
                      "edge_node_has_cloud": nodes[eng.host_node("edge0")].get("cloud", 0)}}))
    """
)


@pytest.mark.slow
def test_two_node_cluster_placement_and_auth(tmp_path):
    import json
    from pathlib import Path

    root = str(Path(__file__).parents[1])
    with local_cluster(nodes=2) as (address, env):
        script = tmp_path / "driver.py"
        script.write_text(DRIVER.format(root=root, address=address))
        # The cloud host is placed only where `cloud` is: register one there too.
        script.write_text(script.read_text().replace(
            "w = _fedavg(eng)", "eng.register('cloud', __import__('cloudedge.engine', fromlist=['WorkerSpec'])"
            ".WorkerSpec(Trainer, {'seed': 9}))\nw = _fedavg(eng)"))
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["edge"] > 0 and got["cloud"] > 0 and got["edge_node_has_cloud"] == 0
        assert torch.allclose(torch.tensor(got["w"]), _fedavg(LocalEngine()), atol=1e-6)
        # Without the cluster's token, a client is refused.
        bad = cluster_env("not-the-token")
        probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r})"],
                               env=bad, capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0
