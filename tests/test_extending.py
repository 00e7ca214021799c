"""The three plug-in examples of docs/extending.md, each run end to end from its YAML config.

The files under examples/plugins/ are the very ones the doc shows: a batch controller, a sync
policy and a test-time method, each one class in one file, registered by name with its parameter
model and loaded through the config's ``plugins:`` list.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from cloudedge.config import config_from_dict, load_config
from cloudedge.errors import InputError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plugins"


def _load(name: str, **section_overrides: dict) -> object:
    """The example config with some of its sections patched (``plugins:`` resolves beside it)."""
    raw = yaml.safe_load((EXAMPLES / name).read_text())
    for section, values in section_overrides.items():
        raw[section] = {**raw[section], **values}
    return config_from_dict(raw, source=name, base_dir=EXAMPLES)


def test_the_batch_controller_plugin_deals_the_batch_to_the_fastest_workers() -> None:
    from cloudedge.pretrain import pretrain

    cfg = load_config(EXAMPLES / "pretrain-fastest.yaml")
    assert cfg.pretrain.controller.name == "fastest" and cfg.pretrain.controller.kwargs() == {"min_batch": 1, "top_k": 2}
    res = pretrain(cfg)
    # Five always-available workers could train (cloud, edge, three phones); the plug-in lets two.
    assert [row["participants"] for row in res.rows] == [2, 2, 2]
    assert all(row["batch_per_step"] == 40 and row["method"] == "sync-fastest" for row in res.rows)
    uniform = pretrain(cfg, controller="uniform", rounds=1)
    assert uniform.rows[0]["participants"] == 5


def test_the_controller_plugin_knobs_are_checked_when_the_config_loads() -> None:
    with pytest.raises(InputError, match=r"pretrain.controller: top_k: Input should be greater than or equal to 1"):
        _load("pretrain-fastest.yaml", pretrain={"controller": {"name": "fastest", "top_k": 0}})
    with pytest.raises(InputError, match=r"pretrain.controller: topk: not a parameter of batch controller 'fastest' "
                                         r"\(known: min_batch, top_k\)"):
        _load("pretrain-fastest.yaml", pretrain={"controller": {"name": "fastest", "topk": 1}})


@pytest.mark.parametrize(("budget_s", "steps"), [(1e-6, 1), (1e6, 6)])
def test_the_sync_policy_plugin_sets_every_devices_local_steps(budget_s, steps) -> None:
    from cloudedge.engine import LocalEngine
    from cloudedge.finetune.stage import finetune

    sync = {"name": "timebox", "step_budget_s": budget_s, "k2": 2, "min_steps": 1, "max_steps": 6,
            "deadline_factor": None}
    cfg = _load("finetune-timebox.yaml", finetune={"sync": sync})
    res = finetune(cfg, None, LocalEngine())
    assert res.summary["policy"] == "timebox"
    # 2 cloud syncs x k2 = 2 edge rounds x 4 always-available devices: 16 device rounds, each of
    # min_steps (a budget nobody fits a step in) or max_steps (a budget with room for any number).
    assert res.rows[-1]["round"] == 2
    assert res.rows[-1]["device_steps_total"] == 16 * steps


def test_the_sync_policy_plugin_yaml_as_shipped_runs() -> None:
    from cloudedge.engine import LocalEngine
    from cloudedge.finetune.stage import finetune

    cfg = load_config(EXAMPLES / "finetune-timebox.yaml")
    assert cfg.finetune.sync.kwargs()["step_budget_s"] == 0.05
    res = finetune(cfg, None, LocalEngine())
    assert 16 <= res.rows[-1]["device_steps_total"] <= 16 * 6
    assert math.isfinite(res.summary["final_acc"])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from cloudedge.config.model import ModelConfig
    from cloudedge.models import build_model, save_local

    raw = yaml.safe_load((EXAMPLES / "adapt-balanced.yaml").read_text())
    return save_local(build_model(ModelConfig(**raw["model"]), seed=0), tmp_path_factory.mktemp("clip") / "model")


def test_the_test_time_method_plugin_divides_out_its_streams_prior(clip_dir) -> None:
    from cloudedge.adapt import adapt
    from cloudedge.engine import LocalEngine

    cfg = load_config(EXAMPLES / "adapt-balanced.yaml")
    assert cfg.adapt.method.name == "balanced-zeroshot"
    engine = LocalEngine()
    res = adapt(cfg, None, engine, checkpoint=clip_dir)
    assert {row["method"] for row in res.rows} == {"balanced-zeroshot"}
    # Each edge's method learned a prior from its own stream (state travels with checkpoints).
    for edge in ("edge0", "edge1"):
        prior = engine.call(edge, "get_state")["tensors"]["prior"]
        assert prior.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert not torch.allclose(prior, torch.full_like(prior, 1 / len(prior)))
    engine.close()
    # strength 0 subtracts nothing: exactly zero-shot CLIP's predictions.
    plain = adapt(cfg, None, checkpoint=clip_dir, method="zeroshot").summary
    off = adapt(cfg, None, checkpoint=clip_dir, method={"name": "balanced-zeroshot", "strength": 0.0}).summary
    assert off["acc_per_shift"] == plain["acc_per_shift"]
