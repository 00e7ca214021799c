"""The pre-training loop: weighting math, accumulation, FedNova, memory caps, resume."""

from __future__ import annotations

import pytest
import torch

from cloudedge.config import ModelConfig, config_from_dict
from cloudedge.pretrain.loop import fednova_delta, pretrain, union_batch_gradient
from cloudedge.pretrain.memory import activation_bytes_per_sample, max_micro_batch, static_bytes
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
    assert res.excluded == {}
    assert all(row["accumulating"] >= 1 for row in res.metrics)  # phones capped at a few samples
    assert res.metrics[-1]["val_loss"] < res.metrics[0]["train_loss"] + 0.5


@pytest.mark.parametrize(("algorithm", "controller"), [("sync", "learned"), ("local", "goodput")])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(tmp_path, algorithm, controller) -> None:
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
    assert [[r[k] for k in keys] for r in resumed.metrics] == [[r[k] for k in keys] for r in full.metrics]
    assert resumed.summary["utilization"] == pytest.approx(full.summary["utilization"], rel=1e-12)
