"""The pre-training loop: weighting math, accumulation, FedNova, memory caps, resume."""

from __future__ import annotations

import math

import pytest
import torch

from cloudedge.config import ModelConfig, config_from_dict
from cloudedge.errors import InputError
from cloudedge.pretrain.algorithms import fednova_delta, union_batch_gradient
from cloudedge.pretrain.memory import activation_bytes_per_sample, max_micro_batch, static_bytes
from cloudedge.pretrain.stage import pretrain
from cloudedge.pretrain.tasks import batch_loss, build_task_model
from cloudedge.pretrain.workers import PretrainWorker

GPT = ModelConfig(kind="gpt", hidden=16, layers=1, heads=2, context=12)


def _worker(wid: str, data: torch.Tensor) -> PretrainWorker:
    return PretrainWorker(wid, "lm", GPT.model_dump(mode="json"), {"input_ids": data}, seed=0, grad_clip=None)


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    model = build_task_model("lm", GPT, n_classes=0, encoder="mlp", seed=seed)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_token_weighted_aggregate_is_the_union_batch_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (3, 12), generator=gen), torch.randint(0, 256, (5, 12), generator=gen)
    params = _params()
    ra = _worker("a", a).gradient(params, batch=3, micro_batch=3, round_idx=0)
    rb = _worker("b", b).gradient(params, batch=5, micro_batch=5, round_idx=0)
    agg = union_batch_gradient([ra["update"], rb["update"]], [ra["units"], rb["units"]])

    model = build_task_model("lm", GPT, n_classes=0, encoder="mlp", seed=0)
    loss, _ = batch_loss("lm", model, {"input_ids": torch.cat([a, b])})
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(agg[name], p.grad, rtol=1e-5, atol=1e-7)
    # Equal weights (the DDP default) would not give it.
    naive = {k: (ra["update"][k] + rb["update"][k]) / 2 for k in agg}
    assert not all(torch.allclose(naive[n], p.grad, atol=1e-6) for n, p in model.named_parameters())


def test_memory_cap_accumulates_micro_batches_with_the_identical_gradient() -> None:
    data = torch.randint(0, 256, (7, 12), generator=torch.Generator().manual_seed(1))
    params = _params()
    whole = _worker("w", data).gradient(params, batch=7, micro_batch=7, round_idx=3)
    pieces = _worker("w", data).gradient(params, batch=7, micro_batch=2, round_idx=3)
    assert whole["loss"] == pytest.approx(pieces["loss"], rel=1e-6)
    for k in whole["update"]:
        torch.testing.assert_close(pieces["update"][k], whole["update"][k], rtol=1e-5, atol=1e-7)


def test_memory_estimate_gives_the_micro_batch_that_fits() -> None:
    per = activation_bytes_per_sample("lm", GPT, seq_len=12, vocab_size=259, encoder="mlp")
    # 2 L s h (34 + 5 a s / h) + 2 * 4 * s * V, by hand for L=1, s=12, h=16, a=2:
    assert per == pytest.approx(2 * 12 * 16 * (34 + 5 * 2 * 12 / 16) + 8 * 12 * 259)
    n_params = 10_000
    memory = (static_bytes(n_params) + 3.5 * per) / 0.5
    assert max_micro_batch(memory, 0.5, n_params, per) == 3
    assert max_micro_batch(static_bytes(n_params), 1.0, n_params, per) == 0


def test_bf16_autocast_keeps_16_bit_activations_and_a_bf16_weight_copy() -> None:
    per = activation_bytes_per_sample("lm", GPT, seq_len=12, vocab_size=259, encoder="mlp", precision="bf16")
    # Korthikanti's 16-bit count as it is; the float32 loss keeps its scores and gradient as before.
    assert per == pytest.approx(12 * 16 * (34 + 5 * 2 * 12 / 16) + 8 * 12 * 259)
    assert static_bytes(10_000, "bf16") == 18 * 10_000 == static_bytes(10_000) + 2 * 10_000
    vit = ModelConfig(kind="vit", hidden=16, layers=1, heads=2, image_size=8, patch_size=4, channels=1)
    fp32, bf16 = (activation_bytes_per_sample("classify", vit, seq_len=0, vocab_size=0, encoder="vit", precision=p)
                  for p in ("fp32", "bf16"))
    assert bf16 == fp32 / 2
    # Activations dominate here: bf16 holds nearly twice the batch in the same memory.
    memory = static_bytes(1000, "bf16") + 10 * fp32
    assert max_micro_batch(memory, 1.0, 1000, fp32) == 10  # its static part is 2,000 bytes smaller
    assert max_micro_batch(memory, 1.0, 1000, bf16, "bf16") == 20


def test_fednova_normalizes_unequal_local_steps() -> None:
    d1, d2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 8.0])}
    # Equal steps: the unit-weighted mean.
    torch.testing.assert_close(fednova_delta([d1, d2], [1, 3], [2, 2])["w"], torch.tensor([0.25, 6.0]))
    # Steps 1 and 4, weights 1/2 each: tau_eff = 2.5; per-step progress [1, 0] and [0, 2].
    torch.testing.assert_close(fednova_delta([d1, d2], [5, 5], [1, 4])["w"], torch.tensor([1.25, 2.5]))


def _cfg(tmp_algorithm: str, controller: str, rounds: int = 4) -> object:
    return config_from_dict({
        "seed": 3,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "devices": [{"count": 3, "profile": "phone-mid",
                                                      "overrides": {"memory_bytes": 4.4e4}}]}]},
        "data": {"source": "digits", "partition": {"kind": "iid"}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
        "pretrain": {"task": "classify", "encoder": "mlp", "rounds": rounds, "global_batch": 40,
                     "algorithm": tmp_algorithm, "controller": controller, "local_steps": 2,
                     "eval_every": 1, "checkpoint_every": 1, "eval_samples": 64, "lr": 0.01},
    })


def test_small_memory_devices_train_by_accumulation(tmp_path) -> None:
    res = pretrain(_cfg("sync", "uniform", rounds=2))
    assert res.summary["excluded"] == {}
    assert all(row["accumulating"] >= 1 for row in res.rows)  # phones capped at a few samples
    assert res.rows[-1]["val_loss"] < res.rows[0]["train_loss"] + 0.5


@pytest.mark.parametrize(("algorithm", "controller"), [("sync", "learned"), ("local", "goodput")])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch, algorithm,
                                                                    controller) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the learned policy's cache, not the user's
    cfg = _cfg(algorithm, controller)
    full = pretrain(cfg, tmp_path / "full")

    def crash(round_idx: int, row: dict) -> None:
        if round_idx == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "cut", on_round=crash)
    resumed = pretrain(cfg, tmp_path / "cut", resume=True)

    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    keys = ("round", "virtual_time_s", "train_loss", "val_loss", "batch_per_step", "bytes_total", "lr")
    assert [[r[k] for k in keys] for r in resumed.rows] == [[r[k] for k in keys] for r in full.rows]
    assert resumed.summary["utilization"] == pytest.approx(full.summary["utilization"], rel=1e-12)


# ------------------------------------------------------------------ per-client shards and evaluation
DEVICES = ("edge0/dev0", "edge0/dev1")


def _client_cfg(objective: str, rounds: int = 3) -> object:
    return config_from_dict({
        "seed": 5,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "devices": [{"count": 3, "profile": "jetson-orin",
                                                      "overrides": {"availability": 1.0}}]}]},
        "model": {"kind": "gpt", "hidden": 8, "layers": 1, "heads": 1, "channels": 1, "image_size": 4},
        "pretrain": {"task": "classify", "encoder": "mlp", "workers": ["device"], "algorithm": "local",
                     "outer_optimizer": "fedavg", "local_steps": 2, "rounds": rounds, "global_batch": 16,
                     "lr": 0.01, "weight_decay": 0.0, "objective": objective, "eval_every": 2},
    })


def _client_data(seed: int, n: int, label_shift: int) -> dict[str, torch.Tensor]:
    """A client whose label is a (client-specific) function of one pixel: learnable, and non-IID."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=gen)
    y = ((x[:, 0, 0, 0] > 0.5).long() + label_shift) % 3
    return {"x": x, "y": y}


def _shards_and_tests() -> tuple[dict, dict]:
    shards = {wid: _client_data(10 + k, 24, k) for k, wid in enumerate(DEVICES)}
    tests = {wid: {"id": _client_data(20 + k, 15, k), "ood": _client_data(30 + k, 9, k + 1)}
             for k, wid in enumerate(DEVICES)}
    return shards, tests


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def test_per_client_shards_train_only_their_nodes_and_each_client_is_scored_on_its_own_tests() -> None:
    shards, tests = _shards_and_tests()
    res = pretrain(_client_cfg("erm"), shards=shards, client_eval=tests)
    assert res.summary["excluded"] == {"edge0/dev2": "no shard was given for it"}
    assert all(row["participants"] == 2 for row in res.rows)
    assert res.model.head.out_features == 3  # classes from the labels given
    # Evaluated at round 1 (eval_every 2) and at the last round only; plain ERM predicts with the global model.
    assert [("clients" in r) for r in res.rows] == [False, True, True]
    assert res.rows[-1]["val_loss"] is None
    for wid in DEVICES:
        for split in ("id", "ood"):
            want = _accuracy(res.model(tests[wid][split]["x"]), tests[wid][split]["y"])
            assert res.summary["clients"][wid][f"{split}_acc"] == pytest.approx(want, abs=1e-6)
    accs = [res.summary["clients"][w]["ood_acc"] for w in DEVICES]
    assert res.summary["ood_acc"] == pytest.approx(sum(accs) / 2)
    assert res.summary["ood_acc_worst"] == pytest.approx(min(accs))
    assert res.summary["acc"] == res.summary["id_acc"]


def test_personalized_objective_is_scored_with_each_clients_private_model_and_charged() -> None:
    from cloudedge.pretrain.objectives import get_objective

    shards, tests = _shards_and_tests()
    pin = pretrain(_client_cfg("pin"), shards=shards, client_eval=tests)
    erm = pretrain(_client_cfg("erm"), shards=shards, client_eval=tests)
    objective = get_objective("pin")
    for wid in DEVICES:
        state = objective.init_client(pin.model, wid, 5)
        objective.load_client_state_dict(state, pin.artefacts["client_states"][wid])
        metrics = pin.summary["clients"][wid]
        x, y = tests[wid]["ood"]["x"], tests[wid]["ood"]["y"]
        with torch.no_grad():
            assert metrics["ood_acc"] == pytest.approx(_accuracy(state["personal"](x), y), abs=1e-6)
            assert metrics["ood_global_acc"] == pytest.approx(_accuracy(pin.model(x), y), abs=1e-6)
            assert metrics["ood_local_acc"] == pytest.approx(_accuracy(state["local"](x), y), abs=1e-6)
        # The personalized model is the client's own, not the aggregated one.
        assert not torch.equal(state["personal"].head.weight, pin.model.head.weight)
    # pin's two private models are charged to the virtual clock: 11/3 of ERM's compute per sample.
    assert pin.summary["compute_s"] == pytest.approx(11 / 3 * erm.summary["compute_s"], rel=1e-4)


def test_bad_shards_are_input_errors() -> None:
    from cloudedge.errors import InputError

    shards, tests = _shards_and_tests()
    with pytest.raises(InputError, match="shards: 'edge9/dev0' is not a node"):
        pretrain(_client_cfg("erm"), shards={"edge9/dev0": shards[DEVICES[0]]})
    with pytest.raises(InputError, match=r"shards.edge0/dev0: missing y"):
        pretrain(_client_cfg("erm"), shards={DEVICES[0]: {"x": shards[DEVICES[0]]["x"]}})
    with pytest.raises(InputError, match=r"client_eval.edge0/dev1.id.x: expected \[N, 1, 4, 4\]"):
        bad = {DEVICES[1]: {"id": {"x": torch.zeros(3, 3, 4, 4), "y": torch.zeros(3, dtype=torch.long)}}}
        pretrain(_client_cfg("erm"), shards=shards, client_eval=bad)


class _BrokenWorker:
    """Stands in for a worker whose process keeps crashing: every task raises."""

    def __init__(self, **_: object) -> None:
        pass

    def gradient(self, **_: object) -> dict:
        raise RuntimeError("device rebooted")


def test_a_failing_worker_is_skipped_and_logged(tmp_path) -> None:
    from cloudedge.engine import LocalEngine, WorkerSpec

    engine = LocalEngine()
    broken = "edge0/dev1"

    def break_it(round_idx: int, row: dict) -> None:
        if round_idx == 0:  # from round 1 on, this device's worker fails every task
            engine.register(broken, WorkerSpec(_BrokenWorker, {}))

    res = pretrain(_cfg("sync", "uniform", rounds=3), tmp_path / "run", engine, on_round=break_it)
    assert [row["failed"] for row in res.rows] == [0, 1, 1]
    assert "device rebooted" in res.rows[1]["failures"][broken]
    assert len(res.rows) == 3 and res.rows[-1]["val_loss"] is not None


def test_a_nan_update_is_rejected_before_aggregation(tmp_path) -> None:
    from cloudedge.engine import LocalEngine, WorkerSpec
    from cloudedge.pretrain.workers import PretrainWorker

    class _NaNWorker(PretrainWorker):
        def gradient(self, **kwargs):
            out = super().gradient(**kwargs)
            out["update"] = {k: torch.full_like(v, float("nan")) for k, v in out["update"].items()}
            return out

    engine = LocalEngine()
    target = "edge0/dev0"

    def poison(round_idx: int, row: dict) -> None:
        if round_idx == 0:
            engine.register(target, WorkerSpec(_NaNWorker, engine._specs[target].kwargs))

    res = pretrain(_cfg("sync", "uniform", rounds=3), tmp_path / "run", engine, on_round=poison)
    assert [row["rejected"] for row in res.rows][0] == 0
    poisoned = [row for row in res.rows[1:] if row["rejected"]]
    assert poisoned and "non-finite" in next(iter(poisoned[0]["rejections"].values())).lower()
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_devices_hold_no_model_between_rounds() -> None:
    from cloudedge.engine import LocalEngine

    engine = LocalEngine()
    res = pretrain(_cfg("local", "uniform", rounds=2), engine=engine)
    assert res.rows[-1]["participants"] == 5  # the cloud, the edge and its three phones trained
    assert engine.live_workers == 2  # only the cloud's and the edge's workers are still built


def test_time_budget_stops_the_run_and_reweighted_logs_its_variance() -> None:
    cfg = _cfg("sync", "reweighted")
    full = pretrain(cfg, rounds=3)
    budget = full.rows[1]["virtual_time_s"]  # the end of round 1
    cut = pretrain(cfg, rounds=50, time_budget_s=budget)
    # Round 2 would start at the budget: it does not run, and what ran is the same as before.
    assert [r["virtual_time_s"] for r in cut.rows] == [r["virtual_time_s"] for r in full.rows[:2]]
    assert [r["val_loss"] for r in cut.rows] == [r["val_loss"] for r in full.rows[:2]]
    assert all(r["ctl_variance_inflation"] >= 1 - 1e-9 and r["ctl_effective_batch"] > 0 for r in cut.rows)


def test_sync_vrex_step_is_the_centralized_vrex_step_at_this_steps_risks() -> None:
    """Full batches, SGD, one round: the loop's V-REx update equals the centralized V-REx gradient
    step (L2 included, divided by the penalty weight as IRM's code does), with the mean risk of
    this very step (not a stale broadcast)."""
    from cloudedge.config import with_overrides
    from cloudedge.pretrain.tasks import build_classifier

    cfg = _client_cfg("vrex", rounds=1)
    cfg.pretrain = with_overrides(cfg.pretrain, {
        "algorithm": "sync", "optimizer": "sgd", "grad_clip": None, "global_batch": 48, "lr": 0.1,
        "objective": {"name": "vrex", "penalty_weight": 10.0, "anneal_steps": 0.0, "l2": 0.01}}, "pretrain")
    shards, tests = _shards_and_tests()
    res = pretrain(cfg, shards=shards, client_eval=tests)

    start = build_classifier(cfg.model, 3, cfg.seed, kind="mlp")
    start.zero_grad()
    risks = torch.stack([torch.nn.functional.cross_entropy(start(shards[w]["x"]), shards[w]["y"]) for w in DEVICES])
    r_bar = risks.mean()  # equal shards: equal weights
    norm = sum(p.pow(2).sum() for p in start.parameters())
    (risks.mean() + 10.0 * ((risks - r_bar) ** 2).mean() + 0.01 * norm).div(10.0).backward()
    for name, p in start.named_parameters():
        want = p.detach() - 0.1 * p.grad
        assert torch.allclose(dict(res.model.named_parameters())[name].detach(), want, atol=1e-6), name


def test_cosine_schedule_warms_up_then_decays_to_its_floor_at_the_last_round() -> None:
    raw = {"seed": 3, "fleet": {"cloud": {"profile": "a100"}, "edges": [{"count": 1, "profile": "edge-server"}]},
           "data": {"source": "digits"}, "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
           "pretrain": {"task": "classify", "encoder": "mlp", "workers": ["cloud"], "rounds": 6, "global_batch": 16,
                        "eval_every": 6, "lr": 0.01, "warmup_rounds": 2}}
    constant = [row["lr"] for row in pretrain(config_from_dict(raw)).rows]
    assert constant == pytest.approx([0.005, 0.01, 0.01, 0.01, 0.01, 0.01])
    raw["pretrain"].update(lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [row["lr"] for row in pretrain(config_from_dict(raw)).rows]
    assert lrs[:3] == pytest.approx([0.005, 0.01, 0.01])  # warm-up, then the peak at the first decayed round
    assert lrs[-1] == pytest.approx(0.001)  # the floor, at the last round
    assert lrs[3] == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    raw["pretrain"].update(rounds=3)  # one round after the warm-up: it is the last, at the floor
    assert [row["lr"] for row in pretrain(config_from_dict(raw)).rows] == pytest.approx([0.005, 0.01, 0.001])
    raw["pretrain"]["min_lr_ratio"] = 1.5
    with pytest.raises(InputError, match="pretrain.min_lr_ratio"):
        config_from_dict(raw)


def _trace_run(tmp_path, trace: str, workers=("edge", "device"), cloud: dict | None = None) -> list[dict]:
    (tmp_path / "online.csv").write_text("device,start_s,end_s\n" + trace)
    raw = {"seed": 3,
           "fleet": {"cloud": cloud or {"profile": "a100"}, "availability": {"kind": "trace", "path": "online.csv"},
                     "edges": [{"count": 1, "profile": "edge-server",
                                "devices": [{"count": 3, "profile": "phone-mid"}]}]},
           "data": {"source": "digits", "partition": {"kind": "iid"}},
           "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
           "pretrain": {"task": "classify", "encoder": "mlp", "rounds": 2, "global_batch": 40, "eval_every": 2,
                        "lr": 0.01, "workers": list(workers)}}
    return pretrain(config_from_dict(raw, base_dir=tmp_path)).rows


def test_the_clouds_own_compute_runs_while_the_uploads_come_in() -> None:
    """The cloud trains too and is the slowest worker: the devices' uploads arrive while it computes,
    so how fast its downlink takes them does not change when the round ends."""
    def round_s(cloud_downlink: float) -> float:
        raw = {"seed": 3,
               "fleet": {"cloud": {"profile": "a100", "overrides": {"flops": 1e4, "downlink_Bps": cloud_downlink}},
                         "edges": [{"count": 1, "profile": "edge-server",
                                    "devices": [{"count": 2, "profile": "phone-mid", "overrides": {"availability": 1.0}}]}]},
               "data": {"source": "digits", "partition": {"kind": "iid"}},
               "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
               "pretrain": {"task": "classify", "encoder": "mlp", "rounds": 1, "global_batch": 30, "eval_every": 1,
                            "lr": 0.01, "workers": ["cloud", "device"]}}
        row = pretrain(config_from_dict(raw)).rows[0]
        assert row["participants"] == 3
        return row["round_s"]

    slow, fast = round_s(1e4), round_s(1e9)  # 5 kB updates: about 0.5 s each into the slow downlink
    assert slow > 5.0  # the cloud's compute (about 8 s at 10 kFLOP/s) is what the round waits for
    assert slow == pytest.approx(fast, rel=1e-9)


def test_an_upload_never_waits_behind_one_sent_later(tmp_path) -> None:
    """A slow device (first in the round's order) and a fast one share a slow cloud downlink. The
    fast one's update is sent and in long before the slow one sends: online until half the round,
    it takes part, where queueing uploads in worker order would have put it behind the slow one."""
    def run(trace: str) -> list[dict]:
        (tmp_path / "online.csv").write_text("device,start_s,end_s\n" + trace)
        raw = {"seed": 3,
               "fleet": {"cloud": {"profile": "a100", "overrides": {"downlink_Bps": 20_000.0}},
                         "availability": {"kind": "trace", "path": "online.csv"},
                         "edges": [{"count": 1, "profile": "edge-server",
                                    "devices": [{"count": 1, "profile": "phone-mid", "overrides": {"flops": 2e5}},
                                                {"count": 1, "profile": "phone-mid"}]}]},
               "data": {"source": "digits", "partition": {"kind": "iid"}},
               "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
               "pretrain": {"task": "classify", "encoder": "mlp", "rounds": 1, "global_batch": 40, "eval_every": 1,
                            "lr": 0.01, "workers": ["device"]}}
        return pretrain(config_from_dict(raw, base_dir=tmp_path)).rows

    stays = run("edge0/dev0,0,1e9\nedge0/dev1,0,1e9\n")
    assert "failures" not in stays[0] and stays[0]["participants"] == 2
    half = 0.5 * stays[0]["round_s"]  # the slow device sends after this
    rows = run(f"edge0/dev0,0,1e9\nedge0/dev1,0,{half!r}\n")
    assert "failures" not in rows[0] and rows[0]["participants"] == 2
    assert rows[0]["round_s"] == stays[0]["round_s"]


def test_devices_follow_the_fleets_availability_trace(tmp_path) -> None:
    """dev0 is online throughout, dev1 never (no rows), dev2 leaves 1 ms into the first round:
    dev1 never trains; dev2 drops out of round 0 (logged), sends nothing and is not waited for."""
    stays = _trace_run(tmp_path, "edge0/dev0,0,1e9\nedge0/dev2,0,1e9\n")
    leaves = _trace_run(tmp_path, "edge0/dev0,0,1e9\nedge0/dev2,0,0.001\n")
    assert "failures" not in stays[0] and stays[0]["participants"] == 3
    assert set(leaves[0]["failures"]) == {"edge0/dev2"}
    assert leaves[0]["failures"]["edge0/dev2"].startswith("went offline at 0.001 s (virtual), before its update")
    assert [row["participants"] for row in leaves] == [2, 2]  # edge0 and dev0; dev2 is offline in round 1
    assert all("edge0/dev1" not in row.get("failures", {}) for row in leaves)
    # Its upload never happens and the round does not wait for it.
    assert leaves[0]["bytes_total"] < stays[0]["bytes_total"]
    assert leaves[0]["energy_j"] < stays[0]["energy_j"]
    assert leaves[0]["round_s"] <= stays[0]["round_s"]



def test_a_device_leaving_while_its_upload_waits_behind_another_drops_out(tmp_path) -> None:
    """Two devices finish together and upload over one slow cloud downlink: dev2's update queues
    behind dev0's and would arrive at about twice the upload time. Online until 3/4 of that, it
    leaves before its update is in, though its upload alone would have made it. Its upload held the
    cloud's downlink from its turn until it left: the round waits until then, not longer, and what
    got through is charged."""
    slow = {"profile": "a100", "overrides": {"downlink_Bps": 20_000.0}}
    stays = _trace_run(tmp_path, "edge0/dev0,0,1e9\nedge0/dev2,0,1e9\n", workers=("device",), cloud=slow)
    assert "failures" not in stays[0] and stays[0]["participants"] == 2
    queued_arrival = stays[0]["round_s"]  # the round ends when the second upload is in
    t_off = 0.75 * queued_arrival
    leaves = _trace_run(tmp_path, f"edge0/dev0,0,1e9\nedge0/dev2,0,{t_off!r}\n", workers=("device",), cloud=slow)
    reason = leaves[0]["failures"]["edge0/dev2"]
    assert reason.startswith(f"went offline at {t_off:.6g} s (virtual)")
    assert float(reason.rsplit(" at ", 1)[1].split(" s")[0]) == pytest.approx(queued_arrival, rel=1e-4)
    assert leaves[0]["participants"] == 1 and leaves[0]["round_s"] == pytest.approx(t_off) and t_off < queued_arrival
    update = stays[0]["bytes_total"] / 4  # both broadcasts and both updates are the same size
    assert 3 * update < leaves[0]["bytes_total"] < 4 * update  # two broadcasts, dev0's update, part of dev2's


def test_a_round_whose_every_device_leaves_is_lost_work_not_an_error(tmp_path) -> None:
    rows = _trace_run(tmp_path, "edge0/dev0,0,0.001\nedge0/dev1,0,0.001\nedge0/dev2,0,0.001\n", ("device",))
    assert rows[0]["participants"] == 0 and rows[0]["train_loss"] is None and len(rows[0]["failures"]) == 3
    assert rows[0]["round_s"] > 0 and rows[1]["virtual_time_s"] > rows[0]["virtual_time_s"]


def test_a_round_with_nobody_reachable_trains_no_one_and_waits_a_beat(tmp_path) -> None:
    """Only devices train and none is online (the trace starts them at 1,000 s): each round is lost
    work (no participant, no failure: nobody was there to fail), the model stays as it was, and the
    clock moves on by the fastest worker's nominal round. A device never online never trains."""
    rows = _trace_run(tmp_path, "edge0/dev0,1000,2000\n", workers=("device",))
    assert [row["participants"] for row in rows] == [0, 0]
    assert all(row["train_loss"] is None and "failures" not in row for row in rows)
    assert rows[0]["round_s"] > 0 and rows[1]["virtual_time_s"] == pytest.approx(2 * rows[0]["round_s"])
    assert rows[0]["bytes_total"] == 0 and rows[1]["energy_j"] == 0


def test_the_round_that_spends_the_time_budget_is_evaluated_and_checkpointed(tmp_path) -> None:
    """A run stopped by ``time_budget_s`` ends like one stopped by ``rounds``: its last round is
    evaluated (the summary's final loss is the final model's) and checkpointed."""
    raw = {"seed": 3, "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid",
                                                                     "overrides": {"availability": 1.0}}]}]},
           "data": {"source": "digits", "partition": {"kind": "iid"}},
           "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
           "pretrain": {"task": "classify", "encoder": "mlp", "rounds": 50, "global_batch": 40, "eval_every": 4,
                        "checkpoint_every": 7, "lr": 0.01, "workers": ["device"]}}
    first = pretrain(config_from_dict(raw)).rows[0]
    raw["pretrain"]["time_budget_s"] = 2.5 * first["round_s"]  # the third round spends it
    res = pretrain(config_from_dict(raw), tmp_path / "run")
    assert [row["round"] for row in res.rows] == [0, 1, 2]
    assert res.rows[-1]["val_loss"] is not None and res.summary["final_val_loss"] == res.rows[-1]["val_loss"]
    assert (tmp_path / "run" / "checkpoints" / "pretrain" / "step-000002.json").exists()


@pytest.mark.parametrize(("task", "kind", "data"), [("clip", "vit", "digits"), ("lm", "vit", "pydocs"),
                                                    ("lm", "clip", "pydocs")])
def test_a_model_the_task_cannot_train_is_a_config_error(task, kind, data) -> None:
    """A ViT cannot be pre-trained as a language model or a CLIP: one line naming both fields,
    before any worker starts (it was a traceback from inside the workers)."""
    raw = {"fleet": {"edges": [{"count": 1, "devices": [{"count": 1, "profile": "phone-mid"}]}]}, "data": {"source": data},
           "model": {"kind": kind, "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                     "channels": 1},
           "pretrain": {"task": task, "rounds": 1, "global_batch": 8}}
    needs = "gpt" if task == "lm" else "clip"
    with pytest.raises(InputError, match=rf"pretrain.task: '{task}' trains a '{needs}' model, but model.kind is '{kind}'"):
        pretrain(config_from_dict(raw))


def test_the_beat_a_lost_round_waits_is_a_devices_round_not_the_clouds(tmp_path) -> None:
    """The cloud trains too but is unreachable, and no device is online: the wait is the fastest
    device's nominal round (the cloud, with no link to cross, would make it nanoseconds)."""
    devices_only = _trace_run(tmp_path, "edge0/dev0,1000,2000\n", workers=("device",))
    with_cloud = _trace_run(tmp_path, "edge0/dev0,1000,2000\n", workers=("cloud", "device"),
                            cloud={"profile": "a100", "overrides": {"availability": 0.0}})
    assert [row["participants"] for row in with_cloud] == [0, 0]
    assert with_cloud[0]["round_s"] == pytest.approx(devices_only[0]["round_s"]) and with_cloud[0]["round_s"] > 1e-3
