"""clock.charge_as: the virtual clock charges a named model's FLOPs, bytes and memory."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config import ModelConfig, config_from_dict
from cloudedge.config.clock import ClockConfig
from cloudedge.errors import InputError
from cloudedge.models.charge import resolve_charge
from cloudedge.models.presets import PRESETS
from cloudedge.pretrain.costs import charged_costs, trained_costs
from cloudedge.pretrain.loop import pretrain
from cloudedge.pretrain.tasks import build_task_model

GPT = {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16}


def _lm_cfg(charge_as=None, devices=("phone-mid", "phone-low"), batch: int = 400) -> object:
    raw = {
        "seed": 1,
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "devices": [{"count": 1, "profile": p} for p in devices]}]},
        "model": GPT,
        "pretrain": {"task": "lm", "workers": ["cloud", "device"], "rounds": 2, "global_batch": batch,
                     "controller": "uniform", "eval_every": 2, "lr": 0.01, "seq_len": 16},
    }
    if charge_as is not None:
        raw["clock"] = {"charge_as": charge_as}
    return config_from_dict(raw)


def _lm_shards(cfg) -> dict[str, dict[str, torch.Tensor]]:
    from cloudedge.fleet import Fleet

    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    gen = torch.Generator().manual_seed(0)
    return {n.id: {"input_ids": torch.randint(0, 256, (24, 16), generator=gen)}
            for n in fleet.nodes.values() if n.tier in ("cloud", "device")}


def test_a_model_config_identical_to_the_trained_one_charges_exactly_what_no_charge_does() -> None:
    for task, model, kw in [("lm", GPT, {"seq_len": 16, "n_classes": 0}),
                            ("classify", {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "channels": 1},
                             {"seq_len": 16, "n_classes": 10}),
                            ("clip", {"kind": "clip", "hidden": 16, "layers": 1, "heads": 2, "context": 12,
                                      "projection_dim": 8}, {"seq_len": 12, "n_classes": 10})]:
        cfg = ModelConfig(**model)
        encoder = "vit" if cfg.kind == "vit" else "mlp"
        built = build_task_model(task, cfg, n_classes=kw["n_classes"], encoder=encoder, seed=0)
        mine = trained_costs(task, built, cfg, encoder=encoder, **kw)
        charge = resolve_charge(ClockConfig(charge_as=model))
        theirs = charged_costs(task, charge, encoder=None, seed=0, **kw)
        assert theirs.params == mine.params
        assert theirs.train_flops_per_sample == mine.train_flops_per_sample
        assert theirs.activation_bytes_per_sample == mine.activation_bytes_per_sample
        for mode in ("none", "fp16", "int8"):
            assert theirs.message_bytes(mode) == mine.message_bytes(mode)


def test_a_run_charged_as_its_own_model_is_identical_to_an_uncharged_run() -> None:
    plain, charged = _lm_cfg(), _lm_cfg(charge_as=GPT)
    a = pretrain(plain, shards=_lm_shards(plain))
    b = pretrain(charged, shards=_lm_shards(charged))
    keys = ("virtual_time_s", "bytes_total", "energy_j", "accumulating", "participants", "train_loss")
    assert [[r[k] for k in keys] for r in a.metrics] == [[r[k] for k in keys] for r in b.metrics]
    assert a.summary["cost_model"]["charged_as"] is None
    assert b.summary["cost_model"]["charged"]["update_bytes"] == a.summary["cost_model"]["trained"]["update_bytes"]


def test_gpt2_124m_excludes_a_phone_that_cannot_hold_it_and_makes_another_accumulate() -> None:
    plain, charged = _lm_cfg(), _lm_cfg(charge_as="gpt2-124m")
    a = pretrain(plain, shards=_lm_shards(plain))
    assert a.excluded == {} and all(r["accumulating"] == 0 for r in a.metrics)
    b = pretrain(charged, shards=_lm_shards(charged))
    # phone-low: 3 GiB x 0.5 usable < 16 bytes x 124M (weights, gradients, AdamW moments).
    assert set(b.excluded) == {"edge0/dev1"} and "do not fit" in b.excluded["edge0/dev1"]
    # phone-mid holds the model and a few dozen 16-token sequences: 200 samples take micro-batches.
    assert all(r["participants"] == 2 and r["accumulating"] == 1 for r in b.metrics)
    cost = b.summary["cost_model"]
    assert cost["charged_as"] == "gpt2-124m" and cost["charged"]["params"] == 124_439_808
    assert cost["trained"]["params"] == a.summary["cost_model"]["trained"]["params"]
    # one update of the charged model: 124.4M float32 numbers and a safetensors header
    assert 4 * 124_439_808 < cost["charged"]["update_bytes"] < 4 * 124_439_808 + 100_000
    assert b.summary["virtual_time_s"] > 100 * a.summary["virtual_time_s"]


def test_llama_1b_fits_no_phone() -> None:
    cfg = _lm_cfg(charge_as="llama-3.2-1b")
    res = pretrain(cfg, shards=_lm_shards(cfg))
    assert set(res.excluded) == {"edge0/dev0", "edge0/dev1"}
    assert res.summary["cost_model"]["charged"]["params"] == 1_235_814_400  # tied embeddings counted once


def test_an_unknown_preset_is_an_input_error_listing_the_presets() -> None:
    with pytest.raises(InputError) as err:
        config_from_dict({"clock": {"charge_as": "gpt5"}}, source="x.yaml")
    msg = str(err.value)
    assert msg.startswith("x.yaml: clock.charge_as") and "gpt5" in msg
    assert all(name in msg for name in PRESETS)


def test_a_charged_family_that_cannot_do_the_task_is_an_input_error() -> None:
    cfg = _lm_cfg(charge_as="vit-b16")
    with pytest.raises(InputError, match="clock.charge_as: vit-b16 is a vit model; pretrain.task 'lm'"):
        pretrain(cfg, shards=_lm_shards(cfg))
