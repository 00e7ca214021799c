"""The hierarchical loop end to end on a tiny fleet: deadlines, dropouts, bytes, resume."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config import config_from_dict
from cloudedge.engine import LocalEngine
from cloudedge.finetune import finetune
from cloudedge.finetune.loop import HierFinetune
from cloudedge.finetune.stage import prepare_task, settings_from_config
from cloudedge.fleet import Fleet
from cloudedge.track.run import RunDir


def _cfg(policy="hierfavg", mode="fedavg", rounds=3, slow_flops=None, availability=None, **ft):
    # Low latencies and slow-ish devices, so compute (not link latency) decides who is late.
    fast = {"availability": 1.0, "latency_s": 0.0005, "flops": 1e8}
    slow = {"count": 1, "profile": "phone-mid", "overrides": {"latency_s": 0.0005, "flops": 1e8}}
    if slow_flops:
        slow["overrides"]["flops"] = slow_flops
    if availability is not None:
        slow["overrides"]["availability"] = availability
    raw = {
        "seed": 3,
        "fleet": {"edges": [{"count": 2, "overrides": {"latency_s": 0.0005}, "devices": [
            {"count": 2, "profile": "phone-mid", "overrides": fast}, slow]}]},
        "data": {"source": "digits", "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "model": {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                  "channels": 1},
        "finetune": {"lora": {"rank": 2, "alpha": 4.0, "mode": mode},
                     "sync": {"name": policy, "k1": 6, "k2": 2, "deadline_factor": 1.5, "max_steps": 12},
                     "batch_size": 8, "lr": 1e-2, "time_budget_s": 1e9, "max_cloud_rounds": rounds,
                     "eval_max": 64, **ft},
    }
    return config_from_dict(raw)


def _loop(cfg):
    torch.set_num_threads(1)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    loop = HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), LocalEngine())
    return loop, fleet


def test_straggler_is_dropped_but_charged_and_autonomous_avoids_it():
    # A step is ~0.5 MFLOP: 5 ms on the fast devices, 20 ms on the slow one (4x slower).
    cfg = _cfg("hierfavg", slow_flops=2.5e7, availability=1.0, rounds=2)
    loop, fleet = _loop(cfg)
    loop.run()
    slow = [d.id for d in fleet.devices if d.profile.flops == 2.5e7]
    assert len(slow) == 2
    for d in slow:
        assert d not in loop.train_count  # past the deadline every round: never aggregated
        assert loop.clock.energy_j[d] > 0  # but its work until the deadline is charged
    assert all(loop.train_count.get(d.id, 0) > 0 for d in fleet.devices if d.id not in slow)

    auto, fleet = _loop(_cfg("autonomous", slow_flops=2.5e7, availability=1.0, rounds=2))
    auto.run()
    assert all(auto.train_count.get(d, 0) > 0 for d in slow)  # it plans fewer steps and makes it
    assert auto.tally.dropped_total == 0 and loop.tally.dropped_total > 0


def test_unavailable_device_never_trains():
    loop, fleet = _loop(_cfg("hierfavg", availability=0.0, rounds=2))
    loop.run()
    never = [d.id for d in fleet.devices if d.profile.availability == 0.0]
    assert never and all(d not in loop.train_count for d in never)
    assert loop.clock.energy_j[never[0]] == 0.0


@pytest.mark.parametrize("mode", ["fedavg", "ffa"])
def test_payload_fraction_and_bytes_per_tier(mode):
    loop, _ = _loop(_cfg("hierfavg", mode=mode, rounds=1))
    s = loop.run()
    lora = sum(v.numel() for k, v in loop.global_state.items() if "lora_" in k)
    head = sum(v.numel() for k, v in loop.global_state.items() if k.startswith("head."))
    sent = head + (lora // 2 if mode == "ffa" else lora)  # ffa: A [r, in] and B [out, r] same size here
    assert s["update_bytes"] >= 4 * sent and s["update_bytes"] < 4 * sent + 2048  # + safetensors header
    assert s["payload_fraction"] == pytest.approx(s["update_bytes"] / s["model_bytes"])
    assert s["bytes_device_edge"] > 0 and s["bytes_edge_cloud"] > 0 and s["bytes_device_cloud"] == 0


def test_fedavg2_sends_over_both_tiers_and_product_merge_runs():
    s, _ = _loop(_cfg("fedavg2", rounds=1))
    out = s.run()
    # Relayed: each device message crosses its access link and the edge's WAN link.
    assert out["bytes_edge_cloud"] == out["bytes_device_edge"] > 0
    p, _ = _loop(_cfg("hierfavg", mode="product", rounds=1))
    assert p.run()["lora_mode"] == "product/svd"


@pytest.mark.parametrize("policy", ["hierfavg", "autonomous"])
def test_resume_gives_the_same_result(tmp_path, policy):
    torch.set_num_threads(1)
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full = finetune(_cfg(policy, rounds=4), RunDir.create(full_dir), LocalEngine())
    finetune(_cfg(policy, rounds=2), RunDir.create(part_dir), LocalEngine())  # "interrupted" after 2
    resumed = finetune(_cfg(policy, rounds=4), RunDir.create(part_dir, resume=True), LocalEngine(), resume=True)
    assert [r["acc"] for r in resumed.rows] == [r["acc"] for r in full.rows]
    assert [r["virtual_time_s"] for r in resumed.rows] == [r["virtual_time_s"] for r in full.rows]
    for k, v in full.artefacts["adapters"].items():
        assert torch.equal(v, resumed.artefacts["adapters"][k]), k
    rows = [r for r in RunDir(part_dir).read_metrics() if r.get("stage") == "finetune"]
    assert [r["round"] for r in rows] == [r["round"] for r in full.rows]


def test_a_checkpoint_from_before_the_shared_stage_format_is_refused_by_name(tmp_path):
    from cloudedge.checkpoint import load_latest, save_checkpoint
    from cloudedge.errors import InputError

    finetune(_cfg("hierfavg", rounds=1), RunDir.create(tmp_path), LocalEngine())
    ckpt = tmp_path / "checkpoints" / "finetune"
    tensors, state = load_latest(ckpt)
    assert state["format"] == "nested-1" and state["state"]["round"] == 1 and state["state"]["rows"] == 2
    assert "global." + next(iter(state["state"]["global"])) in tensors  # readable nested keys
    # What fine-tuning wrote before it shared the stage skeleton: flat keys, its own plain state.
    save_checkpoint(ckpt, 1, {"global/" + k[len("global."):]: v for k, v in tensors.items() if k.startswith("global.")},
                    {"cloud_round": 1, "rngs": {}, "history": []})
    with pytest.raises(InputError, match="not a stage state of format nested-1"):
        finetune(_cfg("hierfavg", rounds=2), RunDir.create(tmp_path, resume=True), LocalEngine(), resume=True)


def test_resume_keeps_the_rows_logged_before_the_checkpoint_and_no_later_grid_row(tmp_path):
    """Grid rows logged after checkpoint N carry round N: the resume rule counts rows, so they go
    (and are logged again once), and every row matches the uninterrupted run's."""
    torch.set_num_threads(1)

    def cfg(rounds):
        c = _cfg("hierfavg", rounds=rounds)
        c.finetune.eval_every_s, c.finetune.time_budget_s = 0.02, 1.0
        return c

    wall = {"wall_s", "mfu_measured", "mfu_profile", "achieved_flops"}  # wall-clock measures

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in wall} for r in rows]

    def logged(path):
        return strip(RunDir(path).read_metrics())

    class Killed(Exception):
        pass

    def die_at_update_3(cloud_round, row):
        if cloud_round == 3:  # after the grid rows logged before update 3 (round 2); last checkpoint: 2
            raise Killed

    full = finetune(cfg(4), tmp_path / "full", LocalEngine())
    with pytest.raises(Killed):
        finetune(cfg(4), tmp_path / "part", LocalEngine(), on_round=die_at_update_3)
    cut = logged(tmp_path / "part")
    assert any(r["round"] == 2 and r.get("eval") == "grid" for r in cut[cut.index(next(
        r for r in cut if r["round"] == 2 and "syncs" in r)) + 1:])  # grid rows logged after checkpoint 2
    resumed = finetune(cfg(4), RunDir.create(tmp_path / "part", resume=True), LocalEngine(), resume=True)
    assert logged(tmp_path / "part") == logged(tmp_path / "full")
    assert [r["stage"] for r in resumed.rows] == ["finetune"] * len(full.rows)
    assert strip(resumed.rows) == strip(full.rows) and resumed.summary == full.summary


def test_autonomous_sync_budget_binds_in_the_loop(tmp_path):
    """A tight edge -> cloud byte budget makes every edge sync less often (the loop feeds real bytes)."""
    def k2s(budget):
        cfg = _cfg("autonomous", rounds=4)
        cfg.finetune.sync = {"name": "autonomous", **cfg.finetune.sync.kwargs(), "sync_budget_bytes": budget}
        res = finetune(cfg, None, LocalEngine())
        return [r.get("k2") for r in res.rows if r.get("k2") is not None]

    free, tight = k2s(None), k2s(1.0)
    assert free and tight and min(tight) > max(free)


class _CallLog(LocalEngine):
    """A LocalEngine that records which workers each engine call reached."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = []

    def run_tolerant(self, tasks):
        tasks = list(tasks)
        self.calls.append([t.worker_id for t in tasks])
        return super().run_tolerant(tasks)


def _loop_with(cfg, engine):
    torch.set_num_threads(1)
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    return HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), engine), fleet


LOCKSTEP_CASES = {
    "fedavg": {},
    "product-merge": {"lora": {"rank": 2, "alpha": 4.0, "mode": {"name": "product", "refactor": "merge"}}},
    "churn": {"churn": {"dropout": 0.4, "stale_prob": 0.6}},
    "dp": {"privacy": {"clip_norm": 0.5, "noise_multiplier": 0.5}},
}


@pytest.mark.parametrize("case", list(LOCKSTEP_CASES))
def test_edges_train_together_in_one_engine_call_and_as_they_would_alone(case):
    cfg = _cfg("hierfavg", availability=0.6, participation=0.7, rounds=2, **LOCKSTEP_CASES[case])
    engine = _CallLog()
    loop, fleet = _loop_with(cfg, engine)
    loop.run()
    # Every round of the barrier sends both edges' devices to the engine at once (a Ray cluster
    # then trains them on both edge hosts at the same time).
    # One call per lockstep round (2 cloud rounds x k2 = 2 edge rounds), not one per edge round.
    device_calls = [c for c in engine.calls if all("/" in w for w in c) and c]
    assert 0 < len(device_calls) <= 2 * 2
    assert any({w.split("/")[0] for w in c} == {"edge0", "edge1"} for c in device_calls)

    # The edges share no random stream, device or link: one edge's period is the same whether the
    # other runs beside it or not.
    together, _ = _loop_with(cfg, LocalEngine())
    pulled = dict(together.global_state)
    both = together.rounds.edge_periods({"edge0": (pulled, 0.0), "edge1": (pulled, 0.0)})
    if case == "churn":  # the compared periods really drew from the churn streams
        assert together.tally.totals["dropped"] > 0 and together.tally.totals["stale"] > 0
    for edge_id in ("edge0", "edge1"):
        alone_loop, _ = _loop_with(cfg, LocalEngine())
        (state, t, obs), = alone_loop.rounds.edge_periods({edge_id: (dict(alone_loop.global_state), 0.0)}).values()
        assert t == both[edge_id][1] and obs.rounds_done == both[edge_id][2].rounds_done
        assert obs.round_energy_j == both[edge_id][2].round_energy_j
        for k, v in state.items():
            torch.testing.assert_close(v, both[edge_id][0][k], rtol=0, atol=0)


def test_staleness_exponent_from_config_reaches_the_autonomous_merge():
    loop, _ = _loop(_cfg("autonomous", sync={"name": "autonomous", "staleness_exponent": 0.0}))
    assert loop.policy.staleness_exponent == 0.0
    assert loop.policy.merge_weight(0.25, 7, 2) == pytest.approx(0.25)  # no discount at all
    default, _ = _loop(_cfg("autonomous"))
    assert default.policy.merge_weight(0.25, 7, 2) < 0.25


@pytest.mark.parametrize("change", [{"rank": 4, "alpha": 8.0}, {"targets": ["query", "q_proj"]}])
def test_a_checkpoint_of_other_adapters_is_refused_by_name_and_left_as_it_was(tmp_path, change):
    from cloudedge.config import with_overrides
    from cloudedge.errors import InputError

    finetune(_cfg("hierfavg", rounds=1), RunDir.create(tmp_path), LocalEngine())
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "checkpoints" / "finetune").iterdir())
    cfg = _cfg("hierfavg", rounds=2)
    lora = with_overrides(cfg.finetune.lora, change, "finetune.lora")
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"lora": lora})})
    with pytest.raises(InputError, match=r"checkpoints.*(shape|not this config's).*finetune\.lora"):
        finetune(cfg, RunDir.create(tmp_path, resume=True), LocalEngine(), resume=True)
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "checkpoints" / "finetune").iterdir()) == before


@pytest.mark.parametrize(("kind", "data"), [("gpt", {"source": "digits"}),
                                            ("vit", {"source": "pydocs", "n_classes": 4})])
def test_a_model_that_cannot_read_the_data_is_a_config_error(kind, data) -> None:
    """A GPT on images or a ViT on text: one line naming the model and the data, before any worker
    starts (it was a traceback from the cloud's worker)."""
    from cloudedge.errors import InputError

    raw = {"fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": "phone-mid"}]}]}, "data": data,
           "model": {"kind": kind, "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4,
                     "channels": 1},
           "finetune": {"lora": {"rank": 2}, "max_cloud_rounds": 1}}
    reads, other = ("text", "images") if kind == "gpt" else ("images", "text")
    with pytest.raises(InputError, match=rf"finetune.model: model.kind '{kind}' reads {reads}, .* is {other}"):
        finetune(config_from_dict(raw), None, LocalEngine())
