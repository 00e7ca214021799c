"""The three stages on RayEngine: the same results as LocalEngine, faults in a round, resume.

One module-scoped local Ray (one CPU, actors on 127.0.0.1) serves every test here; the last test
checks the fine-tuning stage run from a driver process on a real two-node cluster (started in the
background when the module starts, so that its start overlaps the other tests). Torch runs one
intra-op thread in the LocalEngine runs too, as inside the actors, so both engines do the same
float operations in the same order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from cloudedge.config import config_from_dict  # noqa: E402
from cloudedge.config.model import ModelConfig  # noqa: E402
from cloudedge.engine import LocalEngine, WorkerSpec  # noqa: E402
from cloudedge.engine.ray import RayEngine  # noqa: E402
from cloudedge.errors import InputError  # noqa: E402
from cloudedge.finetune import finetune  # noqa: E402
from cloudedge.finetune.loop import HierFinetune  # noqa: E402
from cloudedge.finetune.stage import prepare_task, settings_from_config  # noqa: E402
from cloudedge.finetune.workers import FinetuneWorker  # noqa: E402
from cloudedge.fleet import Fleet  # noqa: E402
from cloudedge.track.run import RunDir  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
FT_ROUNDS = 3
FT_KEYS = ("round", "virtual_time_s", "acc", "loss", "bytes_device_edge", "bytes_edge_cloud", "device_energy_j")


def finetune_cfg(rounds: int = FT_ROUNDS):
    """Two edges with two always-available devices each; tiny LoRA ViT; one edge round per sync."""
    dev = {"count": 2, "profile": "phone-mid", "overrides": {"availability": 1.0, "latency_s": 0.0005, "flops": 1e8}}
    return config_from_dict({
        "seed": 3,
        "fleet": {"edges": [{"count": 2, "overrides": {"latency_s": 0.0005}, "devices": [dev]}]},
        "data": {"source": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0}, "batch_size": 8, "lr": 1e-2, "time_budget_s": 1e9,
                     "sync": {"name": "hierfavg", "k1": 3, "k2": 1, "deadline_factor": 2.0},
                     "max_cloud_rounds": rounds, "eval_max": 64},
    })


def rows_of(history: list[dict]) -> list[list]:
    return [[r[k] for k in FT_KEYS] for r in history]


def assert_rows_close(got: list[dict], want: list[dict], keys=FT_KEYS) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (k, g.get("round"))


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_engine(one_thread):
    engine = RayEngine(init_kwargs={"num_cpus": 1, "_node_ip_address": "127.0.0.1"})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local_finetune(one_thread):
    """The reference: the fine-tuning run on LocalEngine."""
    return finetune(finetune_cfg(), None, LocalEngine())


# ------------------------------------------------------------------------------ same results


def test_finetune_same_on_ray(ray_engine, local_finetune):
    got = finetune(finetune_cfg(), None, ray_engine)
    assert len(got.rows) == FT_ROUNDS + 1
    assert_rows_close(got.rows, local_finetune.rows)
    for k, v in local_finetune.artefacts["adapters"].items():
        torch.testing.assert_close(got.artefacts["adapters"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert all(r.get("failed", 0) == 0 for r in got.rows)


def test_pretrain_same_on_ray(ray_engine, one_thread):
    from cloudedge.pretrain.stage import pretrain

    cfg = config_from_dict({
        "seed": 3,
        "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 2, "devices": [{"count": 1, "profile": "jetson-orin"}]}]},
        "data": {"source": "digits", "partition": {"kind": "iid"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
        "pretrain": {"task": "classify", "encoder": "mlp", "rounds": 2, "global_batch": 24, "algorithm": "local",
                     "local_steps": 2, "eval_every": 1, "eval_samples": 64, "lr": 0.01},
    })
    local = pretrain(cfg, None, LocalEngine())
    on_ray = pretrain(cfg, None, ray_engine)
    assert len(local.rows) == 2 and local.rows[-1]["val_loss"] is not None
    keys = ("round", "virtual_time_s", "train_loss", "val_loss", "bytes_total")
    assert_rows_close(on_ray.rows, local.rows, keys)
    for (name, p), q in zip(local.model.named_parameters(), on_ray.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


CLIP = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 8,
        "patch_size": 4, "channels": 1, "projection_dim": 16}


def test_adapt_same_on_ray(ray_engine, one_thread, tmp_path):
    from cloudedge.adapt.stage import adapt
    from cloudedge.models import build_model, save_local

    clip_dir = save_local(build_model(ModelConfig(**CLIP), seed=0), tmp_path / "clip")
    cfg = config_from_dict({
        "seed": 0, "fleet": {"edges": [{"count": 2}]}, "data": {"source": "digits", "test_fraction": 0.5},
        "model": CLIP,
        "adapt": {"checkpoint": str(clip_dir), "stream_samples": 8, "batch_size": 4, "method": {"name": "swapprompt", "lr": 0.05},
                  "share_every": 1,
                  "streams": [{"corruption": "gaussian_noise", "severity": 3}, {"corruption": "contrast", "severity": 5}]},
    })
    local = adapt(cfg, None, LocalEngine())
    on_ray = adapt(cfg, None, ray_engine)
    assert len(on_ray.rows) == len(local.rows) == 4  # two edges, two batches each
    assert_rows_close(on_ray.rows, local.rows, ("round", "batch_acc", "acc", "seen"))
    assert [r["edge"] for r in on_ray.rows] == [r["edge"] for r in local.rows]
    for key in ("acc_per_edge", "prompt_bytes_up", "prompt_shares"):
        assert on_ray.summary[key] == local.summary[key], key


def test_a_config_plugin_runs_in_the_ray_actors(ray_engine, one_thread, tmp_path):
    """The test-time method of examples/plugins runs inside the edges' actors, which never read
    the config: the engine ships the plug-in file's source to them (use_plugins)."""
    from cloudedge.adapt.stage import adapt
    from cloudedge.config import load_config
    from cloudedge.models import build_model, save_local

    cfg = load_config(ROOT / "examples" / "plugins" / "adapt-balanced.yaml")
    clip_dir = save_local(build_model(cfg.model, seed=0), tmp_path / "clip")
    local = adapt(cfg, None, LocalEngine(), checkpoint=clip_dir)
    on_ray = adapt(cfg, None, ray_engine, checkpoint=clip_dir)
    assert {r["method"] for r in on_ray.rows} == {"balanced-zeroshot"}
    assert_rows_close(on_ray.rows, local.rows, ("round", "batch_acc", "acc", "seen"))
    assert on_ray.summary["acc_per_shift"] == local.summary["acc_per_shift"]


def test_a_plugin_a_ray_host_cannot_import_is_an_input_error_naming_it(one_thread):
    engine = RayEngine()  # attaches to the module's Ray; its own hosts
    try:
        engine.register("edge7", WorkerSpec(torch.nn.Identity, {}))
        engine.use_plugins(["cloudedge_no_such_plugin_module"])  # never imported here: only the hosts try
        with pytest.raises(InputError, match="plugins: cloudedge_no_such_plugin_module: could not import"):
            engine.call("edge7", "forward", input=torch.zeros(1))
    finally:
        engine.close()


# ------------------------------------------------------------------------------ faults


def test_killed_edge_host_is_skipped_logged_and_the_run_completes(ray_engine, local_finetune):
    def kill_after_round_1(cloud_round: int, row: dict) -> None:
        if cloud_round == 1:
            ray_engine.kill_host("edge1")  # the edge server's process dies between cloud rounds

    restarts = ray_engine.restarts["edge1"]
    got = finetune(finetune_cfg(), None, ray_engine, on_round=kill_after_round_1)
    rows = got.rows
    assert [r["round"] for r in rows] == list(range(FT_ROUNDS + 1))  # every round completed
    assert_rows_close(rows[:2], local_finetune.rows[:2])  # identical until the fault
    # Round 2: both devices of edge1 were tasked on the dead actor: skipped, counted, explained.
    assert rows[2]["failed"] == 2
    assert {f["from"] for f in rows[2]["failures"]} == {"edge1/dev0", "edge1/dev1"}
    assert all("actor died" in f["reason"] and f["at"] == "edge1" for f in rows[2]["failures"])
    assert ray_engine.restarts["edge1"] == restarts + 1
    # The host was rebuilt from its specs: round 3 has no failure, and the model still learns.
    assert rows[3]["failed"] == 0 and "failures" not in rows[3]
    assert rows[3]["loss"] < rows[2]["loss"] < rows[0]["loss"]  # three short rounds: the loss shows it


class _CrashingWorker(FinetuneWorker):
    """A device whose training always crashes (LocalEngine only: it lives in the test module)."""

    def train(self, **kwargs):
        raise RuntimeError("injected fault: device process crashed")


def test_failing_worker_on_local_engine_is_skipped_and_workers_are_released(one_thread):
    cfg = finetune_cfg()
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet)
    settings = settings_from_config(cfg)
    engine = LocalEngine()
    loop = HierFinetune(fleet, task, settings, engine)
    engine.register("edge0/dev1", WorkerSpec(_CrashingWorker, dict(
        spec=loop.spec, data=task.device_data["edge0/dev1"], batch_size=settings.batch_size,
        optimizer=settings.optimizer, lr=settings.lr)))
    loop.run()
    rows = loop.history
    assert [r["round"] for r in rows] == list(range(FT_ROUNDS + 1))
    for r in rows[1:]:
        assert r["failed"] == 1
        assert r["failures"] == [{"at": "edge0", "from": "edge0/dev1",
                                  "reason": "injected fault: device process crashed"}]
    assert loop.tally.device_steps_total == FT_ROUNDS * 3 * 3  # three healthy devices x k1 steps per round
    assert engine.live_workers == 1  # the cloud's evaluator; every device's model was released


def test_resume_on_ray_after_the_coordinator_dies(ray_engine, local_finetune, tmp_path):
    class CoordinatorDied(Exception):
        pass

    def die_after_round_2(cloud_round: int, row: dict) -> None:
        if cloud_round == 2:
            raise CoordinatorDied

    with pytest.raises(CoordinatorDied):
        finetune(finetune_cfg(), RunDir.create(tmp_path), ray_engine, on_round=die_after_round_2)
    resumed = finetune(finetune_cfg(), RunDir.create(tmp_path, resume=True), ray_engine, resume=True)
    assert_rows_close(resumed.rows, local_finetune.rows)
    for k, v in local_finetune.artefacts["adapters"].items():
        torch.testing.assert_close(resumed.artefacts["adapters"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    logged = [r["round"] for r in RunDir(tmp_path).read_metrics() if r.get("stage") == "finetune"]
    assert logged == list(range(FT_ROUNDS + 1))  # round 2's row from the dead run was replaced


# ------------------------------------------------------------------------------ a real cluster

DRIVER = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from cloudedge.engine.ray import RayEngine
    from cloudedge.finetune import finetune
    from tests.test_ray_stages import finetune_cfg
    import ray
    ray.init(address={address!r}, _node_ip_address="127.0.0.1", log_to_driver=False)
    eng = RayEngine(address={address!r})
    res = finetune(finetune_cfg(rounds=1), None, eng)
    nodes = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
    print(json.dumps({{"history": res.rows, "edge_nodes": [nodes[eng.host_node(e)].get("edge", 0) for e in
                                                             ("edge0", "edge1")],
                      "cloud_node": nodes[eng.host_node("cloud")].get("cloud", 0)}}))
    eng.close()
    """
)


class _TwoNodeRun:
    """The two-node run in a background thread: the cluster's start (tens of seconds, mostly
    waiting) overlaps the tests above. ``result()`` waits for it; the cluster is always stopped."""

    def __init__(self, tmp: Path):
        import threading

        self.proc: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(tmp,), daemon=True)
        self.thread.start()

    def _run(self, tmp: Path) -> None:
        from cloudedge.bench.ray_cluster import local_cluster

        try:
            with local_cluster(nodes=2) as (address, env):
                script = tmp / "driver.py"
                script.write_text(DRIVER.format(root=str(ROOT), address=address))
                self.proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                           timeout=300)
        except BaseException as err:  # noqa: BLE001 - handed to the test that reads the result
            self.error = err

    def result(self) -> subprocess.CompletedProcess:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.proc is not None
        return self.proc


@pytest.fixture(scope="module", autouse=True)
def two_node_run(tmp_path_factory):
    run = _TwoNodeRun(tmp_path_factory.mktemp("two-node"))
    yield run
    run.thread.join()  # the cluster is stopped before the module ends, whatever happened


def test_finetune_on_a_two_node_cluster(two_node_run, local_finetune):
    proc = two_node_run.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(e > 0 for e in got["edge_nodes"]) and got["cloud_node"] > 0  # edges on the edge node
    assert_rows_close(got["history"], local_finetune.rows[:2])  # one round: the reference's first
