"""``overhead``: one worker's training throughput through cloudedge vs a plain PyTorch loop.

What is compared (docs/performance.md has the numbers):

- ``cloudedge``: the real pre-training stage, :func:`cloudedge.pretrain.stage.pretrain`, on a fleet
  whose only worker is the cloud (``pretrain.workers: [cloud]``), with the default algorithm
  (``sync``), controller, batch and LM size of ``PretrainConfig`` / ``ModelConfig``. So each round
  is everything the loop does: plan, a ``gradient`` Task through a ``LocalEngine`` to a
  ``PretrainWorker`` (parameters and gradients copied across, as the engine contract requires),
  virtual-clock accounting, payload sizing, aggregation, clipping and the AdamW step.
- ``plain_torch``: the same model (same config and seed), the same data blocks, batch size,
  optimizer (AdamW, betas 0.9/0.95, weight decay, clipping) in the textbook loop: sample a batch,
  forward, backward, clip, step.

How: one stage run of ``warmup + steps + 1`` rounds; after each round the stage's ``on_round``
callback runs one plain step, so the two methods alternate step by step (A B A B ...) and share
whatever load the machine has at that moment. Round ``r``'s time is from the end of the callback
after round ``r - 1`` to the start of the callback after round ``r``; the first ``warmup`` rounds
and the last one (which evaluates) are not counted. ``repetitions`` repeats the whole run.
Reported: medians of the per-step wall times (samples/s, tokens/s), the median of the per-pair
ratios (robust on a shared machine), the same from process CPU time, and MFU of both against
this host's measured fp32 matmul peak (measured before and after; their mean is used).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloudedge.config import config_from_dict
from cloudedge.config.model import ModelConfig
from cloudedge.config.pretrain import PretrainConfig
from cloudedge.errors import InputError
from cloudedge.fleet import Fleet
from cloudedge.perf import measure_matmul_peak

GOAL_RATIO = 0.95
GOAL_MFU = 0.40


def _stage_config(model: dict[str, Any], batch: int, rounds: int, max_docs: int, seed: int) -> Any:
    return config_from_dict({
        "name": "bench-overhead", "seed": seed,
        "data": {"source": "pydocs", "max_docs": max_docs},
        "model": model,
        "fleet": {"edges": [{"count": 1}]},
        "pretrain": {"workers": ["cloud"], "rounds": rounds, "global_batch": batch,
                     "eval_every": rounds + 1},  # evaluation only after the last (untimed) round
    }, source="bench overhead")


class PlainLoop:
    """The textbook PyTorch training loop over the stage's model, data and optimizer settings."""

    def __init__(self, cfg: Any, seed: int):
        from cloudedge.pretrain.shards import build_shards
        from cloudedge.pretrain.tasks import build_task_model

        pcfg: PretrainConfig = cfg.pretrain
        model_cfg = cfg.stage_model("pretrain")
        fleet = Fleet.from_config(cfg.fleet, cfg.seed)
        cloud = fleet.cloud
        self.blocks = build_shards(cfg, pcfg, [cloud], pcfg.seq_len or model_cfg.context).train[cloud.id]["input_ids"]
        self.model = build_task_model("lm", model_cfg, n_classes=0, encoder="mlp", seed=seed)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=pcfg.lr, betas=(0.9, 0.95),
                                           weight_decay=pcfg.weight_decay)
        self.grad_clip = pcfg.grad_clip
        self.batch = pcfg.global_batch
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        n = self.blocks.shape[0]
        idx = (torch.randperm(n, generator=self.generator)[: self.batch] if self.batch <= n
               else torch.randint(0, n, (self.batch,), generator=self.generator))
        ids = self.blocks[idx]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())


def _one_run(cfg: Any, warmup: int, steps: int, seed: int) -> dict[str, list[float]]:
    """One stage run with a plain step after each round; per-step wall and CPU seconds of both."""
    from cloudedge.pretrain.stage import pretrain

    plain = PlainLoop(cfg, seed)
    last_round = warmup + steps
    times: dict[str, list[float]] = {"ce_wall": [], "ce_cpu": [], "pt_wall": [], "pt_cpu": [], "ce_samples": []}
    mark: dict[str, float] = {}

    def on_round(r: int, row: dict[str, Any]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        if warmup <= r < last_round and mark:
            times["ce_wall"].append(wall - mark["wall"])
            times["ce_cpu"].append(cpu - mark["cpu"])
            times["ce_samples"].append(float(row["effective_batch"]))
        if r < last_round:
            w0, c0 = time.perf_counter(), time.process_time()
            plain.step()
            if r >= warmup:
                times["pt_wall"].append(time.perf_counter() - w0)
                times["pt_cpu"].append(time.process_time() - c0)
        mark["wall"], mark["cpu"] = time.perf_counter(), time.process_time()

    pretrain(cfg, None, on_round=on_round, method="overhead")
    return times


def run(quick: bool, out_dir: Path, *, steps: int | None = None, warmup: int = 1, repetitions: int | None = None,
        batch: int | None = None, model: dict[str, Any] | None = None, max_docs: int = 600, seed: int = 0,
        peak_size: int = 2048, threads: int | None = None, **options: Any) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the results dict.

    Options: ``steps`` timed steps per run (quick 4, full 10), ``warmup`` untimed first rounds,
    ``repetitions`` runs (quick 1, full 3), ``batch`` (default ``PretrainConfig.global_batch``),
    ``model`` (ModelConfig fields; default: the LM size of ``ModelConfig``), ``max_docs`` of the
    pydocs corpus, ``peak_size`` of the matmul that measures the peak, ``threads`` torch
    intra-op threads for the run (default: as set now; restored afterwards).
    """
    engine = options.pop("engine", None)
    if engine not in (None, "local"):
        raise InputError(f"--engine: the overhead benchmark measures the local engine, not {engine!r}")
    if options:
        raise InputError(f"benchmark: 'overhead' takes no --{sorted(options)[0]} option")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(quick, steps, warmup, repetitions, batch, model, max_docs, seed, peak_size)
    finally:
        torch.set_num_threads(before)


def _run(quick: bool, steps: int | None, warmup: int, repetitions: int | None, batch: int | None,
         model: dict[str, Any] | None, max_docs: int, seed: int, peak_size: int) -> dict[str, Any]:
    steps = steps or (4 if quick else 10)
    repetitions = repetitions or (1 if quick else 3)
    batch = batch or PretrainConfig().global_batch
    model_fields = ModelConfig.model_validate(model or {}).model_dump(mode="json")
    cfg = _stage_config(model_fields, batch, warmup + steps + 1, max_docs, seed)
    model_cfg = cfg.stage_model("pretrain")
    seq_len = cfg.pretrain.seq_len or model_cfg.context

    from cloudedge.pretrain.tasks import train_flops_per_sample

    flops_per_sample = train_flops_per_sample("lm", model_cfg, seq_len=seq_len, n_classes=0, encoder="mlp")
    peak_before = measure_matmul_peak(size=peak_size)
    runs = [_one_run(cfg, warmup, steps, seed + rep) for rep in range(repetitions)]
    # A second measurement at the end (uncached: another repeats count) shows how the load moved.
    peak_after = measure_matmul_peak(size=peak_size, repeats=4)
    peak = 0.5 * (peak_before + peak_after)
    # FLOP per CPU-second: what this process gets while it runs, whatever the other processes do.
    peak_cpu = measure_matmul_peak(size=peak_size, clock="cpu")

    ce_wall = [t for run_ in runs for t in run_["ce_wall"]]
    pt_wall = [t for run_ in runs for t in run_["pt_wall"]]
    ce_cpu = [t for run_ in runs for t in run_["ce_cpu"]]
    pt_cpu = [t for run_ in runs for t in run_["pt_cpu"]]
    samples = statistics.median([s for run_ in runs for s in run_["ce_samples"]])
    if samples != batch:  # the stage must have trained exactly the batch the plain loop trains
        raise RuntimeError(f"overhead: the stage trained {samples} samples per round, expected {batch}")
    tokens = batch * seq_len

    def method(wall: list[float], cpu: list[float]) -> dict[str, Any]:
        sec, cpu_sec = statistics.median(wall), statistics.median(cpu)
        return {"samples_per_s": batch / sec, "tokens_per_s": tokens / sec, "seconds_per_step": sec,
                "cpu_samples_per_s": batch / cpu_sec, "cpu_seconds_per_step": cpu_sec,
                "mfu_measured": batch * flops_per_sample / sec / peak,
                "mfu_cpu_time": batch * flops_per_sample / cpu_sec / peak_cpu, "step_seconds": wall}

    methods = {"cloudedge": method(ce_wall, ce_cpu), "plain_torch": method(pt_wall, pt_cpu)}
    ratio = methods["cloudedge"]["samples_per_s"] / methods["plain_torch"]["samples_per_s"]
    paired = statistics.median([p / c for p, c in zip(pt_wall, ce_wall, strict=True)])
    cpu_ratio = methods["cloudedge"]["cpu_samples_per_s"] / methods["plain_torch"]["cpu_samples_per_s"]
    return {
        "benchmark": "overhead",
        "config": {"model": model_fields, "batch": batch, "seq_len": seq_len, "steps": steps, "warmup": warmup,
                   "repetitions": repetitions, "algorithm": cfg.pretrain.algorithm.name, "optimizer": cfg.pretrain.optimizer,
                   "train_flops_per_sample": flops_per_sample, "torch_threads": torch.get_num_threads(),
                   "peak_size": peak_size},
        "methods": methods,
        "ratio": ratio,
        "ratio_paired_median": paired,
        "ratio_cpu_time": cpu_ratio,
        "peak_flops_measured": peak,
        "peak_flops_before_after": [peak_before, peak_after],
        "peak_flops_per_cpu_s": peak_cpu,
        "goals": {"ratio>=0.95": ratio >= GOAL_RATIO,
                  "mfu>=0.40": methods["cloudedge"]["mfu_measured"] >= GOAL_MFU},
    }
