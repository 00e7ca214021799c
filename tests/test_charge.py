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
from cloudedge.pretrain.stage import pretrain
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
    assert [[r[k] for k in keys] for r in a.rows] == [[r[k] for k in keys] for r in b.rows]
    assert a.summary["cost_model"]["charged_as"] is None
    assert b.summary["cost_model"]["charged"]["update_bytes"] == a.summary["cost_model"]["trained"]["update_bytes"]


def test_gpt2_124m_excludes_a_phone_that_cannot_hold_it_and_makes_another_accumulate() -> None:
    plain, charged = _lm_cfg(), _lm_cfg(charge_as="gpt2-124m")
    a = pretrain(plain, shards=_lm_shards(plain))
    assert a.summary["excluded"] == {} and all(r["accumulating"] == 0 for r in a.rows)
    b = pretrain(charged, shards=_lm_shards(charged))
    # phone-low: 3 GiB x 0.5 usable < 16 bytes x 124M (weights, gradients, AdamW moments).
    assert set(b.summary["excluded"]) == {"edge0/dev1"} and "do not fit" in b.summary["excluded"]["edge0/dev1"]
    # phone-mid holds the model and a few dozen 16-token sequences: 200 samples take micro-batches.
    assert all(r["participants"] == 2 and r["accumulating"] == 1 for r in b.rows)
    cost = b.summary["cost_model"]
    assert cost["charged_as"] == "gpt2-124m" and cost["charged"]["params"] == 124_439_808
    assert cost["trained"]["params"] == a.summary["cost_model"]["trained"]["params"]
    # one update of the charged model: 124.4M float32 numbers and a safetensors header
    assert 4 * 124_439_808 < cost["charged"]["update_bytes"] < 4 * 124_439_808 + 100_000
    assert b.summary["virtual_time_s"] > 100 * a.summary["virtual_time_s"]


def test_a_stage_clock_section_overrides_the_top_level_one_for_that_stage_only() -> None:
    top = _lm_cfg(charge_as="llama-3.2-1b")
    raw = top.model_dump(mode="json", exclude_none=True)
    raw["pretrain"]["clock"] = {"charge_as": "gpt2-124m"}  # pre-training charges GPT-2, the rest Llama
    raw["finetune"] = {}
    cfg = config_from_dict({k: v for k, v in raw.items() if k != "base_dir"})
    assert cfg.stage_clock("pretrain").charge_as == "gpt2-124m"
    assert cfg.stage_clock("finetune").charge_as == cfg.stage_clock("adapt").charge_as == "llama-3.2-1b"
    res = pretrain(cfg, shards=_lm_shards(cfg))
    assert res.summary["cost_model"]["charged_as"] == "gpt2-124m"
    assert set(res.summary["excluded"]) == {"edge0/dev1"}  # as under a top-level gpt2-124m, not Llama's two
    # A stage section that sets only seq_len keeps the top-level model (fields merge, one by one).
    raw["finetune"] = {"clock": {"seq_len": 8}}
    merged = config_from_dict({k: v for k, v in raw.items() if k != "base_dir"}).stage_clock("finetune")
    assert (merged.charge_as, merged.seq_len) == ("llama-3.2-1b", 8)
    # A bad choice in a stage's own clock names that section.
    raw["pretrain"]["clock"] = {"charge_as": {"kind": "hf", "path": "somewhere"}}
    bad = config_from_dict({k: v for k, v in raw.items() if k != "base_dir"})
    with pytest.raises(InputError, match=r"^pretrain.clock.charge_as.kind: 'hf' checkpoints cannot be charged"):
        pretrain(bad, shards=_lm_shards(bad))


def test_llama_1b_fits_no_phone() -> None:
    cfg = _lm_cfg(charge_as="llama-3.2-1b")
    res = pretrain(cfg, shards=_lm_shards(cfg))
    assert set(res.summary["excluded"]) == {"edge0/dev0", "edge0/dev1"}
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


# ---------------------------------------------------------------------------------- fine-tuning

VIT = {"kind": "vit", "hidden": 16, "layers": 1, "heads": 2, "image_size": 8, "patch_size": 4, "channels": 1}


def _ft_cfg(charge_as=None, mode: str = "fedavg", devices: str = "phone-mid", model=VIT, data=None) -> object:
    raw = {
        "seed": 3,
        "fleet": {"edges": [{"count": 1, "devices": [{"count": 2, "profile": devices}]}]},
        "data": data or {"source": "digits", "partition": {"kind": "iid"}},
        "model": model,
        "finetune": {"lora": {"rank": 2, "alpha": 4.0, "mode": mode}, "sync": {"name": "hierfavg", "k1": 2, "k2": 1},
                     "batch_size": 8, "time_budget_s": 1e9, "max_cloud_rounds": 1, "eval_max": 32},
    }
    if charge_as is not None:
        raw["clock"] = {"charge_as": charge_as}
    return config_from_dict(raw)


def _ft_loop(cfg):
    from cloudedge.engine import LocalEngine
    from cloudedge.finetune.loop import HierFinetune
    from cloudedge.finetune.stage import prepare_task, settings_from_config
    from cloudedge.fleet import Fleet

    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    return HierFinetune(fleet, prepare_task(cfg, fleet), settings_from_config(cfg), LocalEngine())


@pytest.mark.parametrize("mode", ["fedavg", "ffa"])
def test_fine_tuning_charged_as_its_own_model_charges_what_it_trains(mode) -> None:
    plain, charged = _ft_loop(_ft_cfg(mode=mode)), _ft_loop(_ft_cfg(VIT, mode=mode))
    for key in ("train_step_flops", "params", "trainable_params", "model_bytes", "trainable_bytes",
                "activation_bytes"):
        assert charged.charged[key] == plain.info[key], key
    assert charged.safeguards.memory_need == plain.safeguards.memory_need
    assert charged.messages.update_bytes() == plain.messages.update_bytes()
    a, b = plain.run(), charged.run()
    for key in ("virtual_time_s", "bytes_device_edge", "bytes_edge_cloud", "device_energy_j", "final_acc"):
        assert a[key] == b[key], key


def _peft_adapter_layout(model_type: str, config: dict, targets: list[str], rank: int) -> dict[str, torch.Tensor]:
    """A real peft LoRA on the architecture, built on the meta device (no weights): its adapter tensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    hf = AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        base = AutoModel.from_config(hf)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=4.0, target_modules=targets,
                                                 fan_in_fan_out=model_type == "gpt2"))
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("preset", "model_type", "targets"), [
    ("gpt2-124m", "gpt2", ["c_attn"]), ("llama-3.2-1b", "llama", ["q_proj", "v_proj"])])
def test_charged_lora_update_bytes_equal_a_real_peft_lora_on_that_architecture(preset, model_type, targets) -> None:
    from cloudedge import comm

    data = {"source": "pydocs", "n_classes": 4, "max_docs": 60}
    model = {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16}
    loop = _ft_loop(_ft_cfg(preset, model=model, data=data, devices="jetson-orin"))
    lora = _peft_adapter_layout(model_type, PRESETS[preset].config, targets, rank=2)
    layers = {n.split("lora_")[0] for n in lora}
    assert len(layers) == len(targets) * PRESETS[preset].config.get("n_layer",
                                                                    PRESETS[preset].config.get("num_hidden_layers"))
    # The same adapter tensors (shapes, float32) and the head; the payload's names are the classifier's.
    ours = {k: v for k, v in loop.charged_layout.items() if "lora_" in k}
    assert sorted((tuple(v.shape), v.dtype) for v in ours.values()) == sorted(
        (tuple(v.shape), v.dtype) for v in lora.values())
    head = {k: v for k, v in loop.charged_layout.items() if k.startswith("head.")}
    named = {"backbone." + k.removeprefix("base_model.model."): v for k, v in lora.items()}
    for mode in ("none", "fp16", "int8"):
        loop.s.compression = mode
        assert loop.messages.update_bytes() == comm.wire_nbytes({**named, **head}, mode)
    loop.s.compression = "none"
    adapter_bytes = sum(v.numel() * 4 for v in lora.values())
    assert adapter_bytes < loop.messages.update_bytes() < adapter_bytes + 4 * 4 * 768 * 4 + 100_000


def test_fine_tuning_charged_as_gpt2_is_refused_by_a_phone_too_small_for_it() -> None:
    data = {"source": "pydocs", "n_classes": 4, "max_docs": 60}
    model = {"kind": "gpt", "hidden": 16, "layers": 1, "heads": 2, "context": 16}
    _ft_loop(_ft_cfg("gpt2-124m", model=model, data=data, devices="phone-mid"))  # 0.5 x 8 GiB holds it
    with pytest.raises(InputError, match="llama-3.2-1b|fine-tuning needs"):
        _ft_loop(_ft_cfg("llama-3.2-1b", model=model, data=data, devices="phone-low"))
    with pytest.raises(InputError, match="clock.charge_as: gpt2-124m is a gpt model; this fine-tuning run learns "
                                         "from images"):
        _ft_loop(_ft_cfg("gpt2-124m"))


# ---------------------------------------------------------------------------- prompt adaptation

CLIP = {"kind": "clip", "hidden": 32, "layers": 1, "heads": 4, "context": 32, "image_size": 8, "patch_size": 4,
        "channels": 1, "projection_dim": 16}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from cloudedge.models import build_model, save_local

    return save_local(build_model(ModelConfig(**CLIP), seed=0), tmp_path_factory.mktemp("clip") / "model")


def _adapt_summary(clip_dir, charge_as=None) -> dict:
    from cloudedge.adapt.stage import adapt

    raw = {"seed": 0, "fleet": {"edges": [{"count": 2}]}, "data": {"source": "digits", "test_fraction": 0.5},
           "model": CLIP,
           "adapt": {"checkpoint": str(clip_dir), "stream_samples": 8, "batch_size": 4, "share_every": 1,
                     "method": {"name": "swapprompt", "lr": 0.05},
                     "streams": [{"corruption": "gaussian_noise", "severity": 3}]}}
    if charge_as is not None:
        raw["clock"] = {"charge_as": charge_as}
    return adapt(config_from_dict(raw)).summary


def test_prompts_are_charged_at_the_charged_clips_text_width(clip_dir) -> None:
    from cloudedge import comm

    plain, same, big = (_adapt_summary(clip_dir), _adapt_summary(clip_dir, CLIP),
                        _adapt_summary(clip_dir, "clip-vit-b16"))
    for key in ("prompt_bytes_up", "prompt_bytes_down", "virtual_time_s"):
        assert same[key] == plain[key]
    # swapprompt shares its online and target contexts: [n_ctx, 512] float32 each for CLIP ViT-B/16.
    n_ctx = 12  # "a photo of a", one byte-level token each
    one = comm.wire_nbytes({k: torch.empty(n_ctx, 512, device="meta") for k in ("online", "target")})
    assert big["prompt_shares"] == 2 and big["prompt_bytes_up"] == 2 * 2 * one  # two edges, two shares
    assert big["cost_model"]["charged"]["update_bytes"] == one
    assert big["cost_model"]["charged"]["params"] == 149_620_737  # CLIP ViT-B/16 with its logit scale
    assert big["cost_model"]["trained"]["params"] == plain["cost_model"]["trained"]["params"]


def test_fleet_table_shows_seconds_per_sample_and_whether_the_charged_model_fits() -> None:
    from rich.console import Console

    from cloudedge.fleetview import fleet_table

    cfg = config_from_dict({
        "clock": {"charge_as": "gpt2-124m"},
        "fleet": {"cloud": {"profile": "a100"},
                  "edges": [{"count": 1, "devices": [{"count": 1, "profile": "phone-mid"},
                                                     {"count": 1, "profile": "phone-low"}]}]},
        "data": {"source": "digits"}, "model": GPT, "pretrain": {"task": "lm", "seq_len": 16}})
    console = Console(width=400, record=True)
    console.print(fleet_table(cfg))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 5}
    assert "charged as gpt2-124m" in text
    from cloudedge.fleet.profiles import PROFILES

    flops = charged_costs("lm", resolve_charge(cfg.clock), seq_len=16, n_classes=0, encoder=None,
                          seed=0).train_flops_per_sample
    assert f"{flops / PROFILES['phone-mid'].flops:.3g} s" in lines["edge0/dev0"]
    assert "yes (<=" in lines["edge0/dev0"] and "│ no " in lines["edge0/dev1"]


def test_the_run_report_says_which_model_was_charged(tmp_path) -> None:
    from cloudedge.track.report import render_report

    cfg = _lm_cfg(charge_as="gpt2-124m")
    pretrain(cfg, tmp_path / "run", shards=_lm_shards(cfg))
    md, _ = render_report(tmp_path / "run")
    text = md.read_text()
    assert "charged as **gpt2-124m** (gpt2-124m: 124,439,808 parameters" in text
    assert "gpt 16x1 (trained)" in text


def test_an_architecture_given_as_a_transformers_config_is_charged_from_its_numbers() -> None:
    from transformers import LlamaConfig

    from cloudedge.models.flops import llama_forward_flops

    arch = {"family": "llama", "name": "tiny-llama", "config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 64, "tie_word_embeddings": False}}
    cfg = config_from_dict({"clock": {"charge_as": arch, "seq_len": 20}})
    charge = resolve_charge(cfg.clock)
    cost = charged_costs("lm", charge, seq_len=16, n_classes=0, encoder=None, seed=0)
    want = LlamaConfig(**arch["config"])
    assert cost.name == "tiny-llama"
    assert cost.train_flops_per_sample == 3 * llama_forward_flops(want, 20)  # clock.seq_len, not the stage's 16
    # untied: embeddings and LM head both counted; per layer q, o 32x32, k, v 32x16, MLP 3 x 32x64, 2 norms
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    assert cost.params == 2 * 300 * 32 + 2 * layer + 32
    with pytest.raises(InputError, match="clock.seq_len: 80 tokens exceed tiny-llama's 64 positions"):
        charged_costs("lm", resolve_charge(config_from_dict({"clock": {"charge_as": arch, "seq_len": 80}}).clock),
                      seq_len=16, n_classes=0, encoder=None, seed=0)
    with pytest.raises(InputError, match="clock.charge_as"):
        config_from_dict({"clock": {"charge_as": {"family": "mamba", "config": {}}}})


def test_host_mfu_counts_the_trained_models_flops_not_the_charged_ones() -> None:
    """The clock charges gpt2-124m; this host computed the tiny model, and its MFU says so."""
    plain, charged = _lm_cfg(devices=("jetson-orin",)), _lm_cfg(charge_as="gpt2-124m", devices=("jetson-orin",))
    a = pretrain(plain, shards=_lm_shards(plain))
    b = pretrain(charged, shards=_lm_shards(charged))
    assert b.summary["cost_model"]["charged"]["params"] > 10_000 * b.summary["cost_model"]["trained"]["params"]
    assert [r["effective_batch"] for r in a.rows] == [r["effective_batch"] for r in b.rows]
    assert all("achieved_flops" in r for r in a.rows + b.rows)
    for ra, rb in zip(a.rows, b.rows, strict=True):
        # FLOPs done = achieved FLOP/s x the seconds they took: the same real work in both runs
        # (charged, it would be gpt2-124m's, thousands of times more).
        done_a, done_b = ra["achieved_flops"] * ra["work_wall_s"], rb["achieved_flops"] * rb["work_wall_s"]
        assert done_b == pytest.approx(done_a, rel=1e-9)


def test_fine_tuning_host_flops_are_the_trained_models_under_charge_as(monkeypatch) -> None:
    import cloudedge.finetune.metrics as metrics

    big = {**VIT, "hidden": 64, "layers": 4}
    loop = _ft_loop(_ft_cfg(big))
    assert loop.charged["train_step_flops"] > 10 * loop.info["train_step_flops"]
    measured: list[float] = []  # the FLOPs each row's MFU is computed from
    real = metrics.utilization_fields
    monkeypatch.setattr(metrics, "utilization_fields", lambda flops, *a, **k: measured.append(flops) or real(flops, *a, **k))
    loop.run()
    # Every device step ran here on the trained model: FLOPs = steps x its step FLOPs (not the charged model's).
    assert measured and loop.tally.device_steps_total > 0
    assert sum(measured) + loop.tally.host_flops == pytest.approx(
        loop.tally.device_steps_total * loop.info["train_step_flops"], rel=1e-9)
