"""`cloudedge demo`: one model family through its whole life on a simulated fleet, with baselines.

The chain (each stage starts from the previous stage's model):

1. **Pre-train** the small CLIP on digit image-caption pairs across the cloud and the edge
   servers: the adaptive batch controllers beside the uniform baseline. The model with the lowest
   final validation loss goes on. A second, shortcut experiment trains a classifier on IRM's
   Colored MNIST built from glyph digits (colour is a spurious shortcut that flips at test time):
   ``pin`` beside ``irm`` and ``erm``.
2. **Fine-tune** LoRA adapters on that CLIP's image tower for digit classification, device ->
   edge -> cloud: ``autonomous`` synchronization beside ``hierfavg`` and two-tier ``fedavg2``.
3. **Adapt** a CLIP's prompt at test time on each edge's shifted, unlabeled stream:
   ``swapprompt`` beside ``tpt`` and ``zeroshot``. The CLIP here is the glyph CLIP
   (``cloudedge.adapt.glyph_clip``: pre-trained by the same pre-training stage on captioned colour
   glyphs, 36 characters, some captioned as drawn upside down, mirrored or sideways; built once and
   cached), the shifts label-preserving glyph shifts (a font family it never saw, upside-down
   glyphs, noise): the digits CLIP above knows too few pictures for a shift to leave room to adapt.

Everything lands in one run directory (metrics of every method, a summary with the headline
ratios, plots, report.md and a self-contained report.html).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cloudedge.adapt.glyph_clip import GLYPH_VIEWS
from cloudedge.config import RunConfig, config_from_dict, load_config
from cloudedge.errors import InputError


def default_demo_config() -> Path:
    """configs/demo.yaml in the working directory, else the one in the source tree."""
    for candidate in (Path("configs/demo.yaml"), Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    raise InputError("configs/demo.yaml: demo config not found; pass --config")


@dataclass(frozen=True)
class DemoPlan:
    """How much work each stage does. The full plan stays under 10 minutes on 2 cores, quick under 3."""

    pretrain_rounds: int  # sync-uniform's rounds: its virtual end time is every method's budget
    pretrain_methods: tuple[tuple[str, dict[str, Any]], ...]
    ood_train_per_client: int
    ood_steps: int
    finetune_budget_s: float
    finetune_policies: tuple[str, ...]
    finetune_grid_points: int  # evaluation instants over the budget, the same for every policy
    finetune_central_steps: int  # steps of the centralized reference (target = 0.9 x its accuracy)
    adapt_methods: tuple[str, ...]
    adapt_samples: int
    pretrain_charge_as: str = "clip-vit-b16"  # the clock charges pre-training as this model (clock.charge_as)

    @classmethod
    def make(cls, quick: bool) -> DemoPlan:
        # The pretrain-hetero rules at demo size (docs/pretraining.md): sync-uniform first (it sets
        # the budget and the target); batches follow speed with data-share weights (`reweighted`),
        # micro-batches accumulate above a node's memory cap.
        reweighted = {"name": "reweighted", "memory_cap": False}
        methods: list[tuple[str, dict[str, Any]]] = [
            ("sync-uniform", {"algorithm": "sync", "controller": "uniform"}),
            ("sync-reweighted", {"algorithm": "sync", "controller": reweighted}),
            # DiLoCo: 4 local AdamW steps per round, Nesterov outer step; reweighted batches.
            ("local-H4", {"algorithm": "local", "controller": reweighted, "local_steps": 4}),
        ]
        if not quick:
            methods.append(("goodput", {"algorithm": "sync",
                                        "controller": {"name": "goodput", "memory_cap": False, "lr_power": 0.5}}))
        return cls(
            pretrain_rounds=40 if quick else 120,
            pretrain_methods=tuple(methods),
            ood_train_per_client=1000 if quick else 2500,
            ood_steps=151 if quick else 301,
            finetune_budget_s=10.0 if quick else 24.0,
            finetune_policies=("fedavg2", "hierfavg", "autonomous"),
            finetune_grid_points=10 if quick else 16,
            finetune_central_steps=300 if quick else 600,
            adapt_methods=("zeroshot", "tpt", "swapprompt"),
            adapt_samples=96 if quick else 256,
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_demo(config: Path | None, out_dir: Path, quick: bool = False, overwrite: bool = True,
             console: Console | None = None) -> dict[str, Any]:
    """Run the lifecycle into ``out_dir``; return summary.json's content."""
    from cloudedge.engine import make_engine
    from cloudedge.fleetview import fleet_table
    from cloudedge.track import RunDir
    from cloudedge.track.report import render_report

    console = console or Console()
    cfg = load_config(config or default_demo_config())
    for stage in ("pretrain", "finetune", "adapt"):
        if getattr(cfg, stage) is None:
            raise InputError(f"{config or default_demo_config()}: {stage}: the demo needs a '{stage}' section")
    plan = DemoPlan.make(quick)
    run = RunDir.create(out_dir, cfg, overwrite=overwrite)
    console.print(fleet_table(cfg))
    from cloudedge.engine import configure_threads

    threads = torch.get_num_threads()
    configure_threads(cfg.engine.threads)
    engine = make_engine(cfg.engine.kind, cfg.engine.address, cfg.engine.threads)
    t0 = time.perf_counter()
    try:
        pre = _stage_pretrain(cfg, run, engine, plan, console)
        ood = _stage_invariant(cfg, run, engine, plan, console)
        ft = _stage_finetune(cfg, run, engine, plan, Path(pre["model_dir"]), console)
        ad = _stage_adapt(cfg, run, engine, plan, console)
    finally:
        engine.close()
        torch.set_num_threads(threads)
    headline = _headline(pre, ood, ft, ad)
    summary = run.write_summary({"pretrain": pre, "invariant": ood, "finetune": ft, "adapt": ad,
                                 "headline": headline, "quick": quick,
                                 "wall_s": round(time.perf_counter() - t0, 1)}, complete=True)
    md, html = render_report(run.path)
    run.finish_tracking()
    console.print(f"[green]demo finished[/green] in {summary['wall_s']:.0f} s: {md} and {html}")
    from cloudedge.track.units import format_value

    for key, item in headline.items():
        console.print(f"  {key}: {format_value(key, item['value'])}  ({item['how']})")
    return summary


# --- stage 1: pre-training ----------------------------------------------------------------------

def _stage_pretrain(cfg: RunConfig, run, engine, plan: DemoPlan, console: Console) -> dict[str, Any]:
    """pretrain-hetero's rules at demo size: costs charged as ``plan.pretrain_charge_as``;
    sync-uniform runs ``pretrain_rounds`` and its virtual end time is every other method's budget;
    all are scored on one common grid of instants; the target is sync-uniform's loss at the budget."""
    from cloudedge.bench.pretrain_hetero import GRID_POINTS, first_crossing, grid_losses
    from cloudedge.models import save_local
    from cloudedge.pretrain import pretrain

    cfg = cfg.model_copy(update={"clock": cfg.clock.model_copy(update={"charge_as": plan.pretrain_charge_as})})
    methods: dict[str, dict[str, Any]] = {}
    models = {}
    grids: dict[str, list[float | None]] = {}
    budget: float | None = None
    cost_model: dict[str, Any] | None = None
    for name, overrides in plan.pretrain_methods:
        console.print(f"[bold]pre-train[/bold] {name} ...")
        limit = ({"rounds": plan.pretrain_rounds} if budget is None
                 else {"rounds": 50 * plan.pretrain_rounds, "time_budget_s": budget})
        res = pretrain(cfg, run, engine, method=name, eval_every=1, checkpoint_every=plan.pretrain_rounds,
                       **limit, **overrides)
        budget = budget or res.summary["virtual_time_s"]
        cost_model = cost_model or res.summary.get("cost_model")
        grids[name] = grid_losses(res.rows, budget)
        methods[name] = {k: res.summary.get(k) for k in ("virtual_time_s", "bytes_total", "energy_j", "utilization",
                                                          "mean_batch_per_step", "rounds")}
        methods[name]["final_val_loss"] = grids[name][-1]  # at the budget
        models[name] = res.model
    target = grids["sync-uniform"][-1]
    base_t = first_crossing(grids["sync-uniform"], budget, target) if target is not None else None
    for name, m in methods.items():
        m["time_to_target_s"] = first_crossing(grids[name], budget, target) if target is not None else None
        m["speedup"] = _ratio(base_t, m["time_to_target_s"])
    # The model that goes on to fine-tuning and adaptation: the lowest validation loss at the budget.
    best = min(methods, key=lambda k: methods[k]["final_val_loss"] if methods[k]["final_val_loss"] is not None
               else float("inf"))
    model_dir = (run.path / "models" / "clip").resolve()  # later stages resolve paths against the config
    save_local(models[best], model_dir)
    return {"methods": methods, "target_val_loss": target, "budget_s": budget, "grid_points": GRID_POINTS,
            "charged_as": plan.pretrain_charge_as, "cost_model": cost_model, "carried_forward": best, "model_dir": str(model_dir),
            "task": "clip contrastive pre-training on digit image-caption pairs, cloud + edge servers"}


# --- stage 1b: shortcut-averse invariant learning -----------------------------------------------

def _stage_invariant(cfg: RunConfig, run, engine, plan: DemoPlan, console: Console) -> dict[str, Any]:
    """erm, irm and pin on the pretrain-ood protocol (IRM's Colored MNIST on glyph digits, with a
    personal cue per client), one seed, the sync table, fewer images and steps."""
    from cloudedge.bench.pretrain_ood import QUICK
    from cloudedge.bench.pretrain_ood import run as run_ood

    console.print("[bold]invariant learning[/bold] erm, irm and pin on colored glyph digits ...")
    setup = dataclasses.replace(QUICK, train_per_client=plan.ood_train_per_client, test_images=2000,
                                steps=plan.ood_steps, tables=("sync",), seeds=(cfg.seed,))
    result = run_ood(quick=True, out_dir=run.path, methods="erm,irm,pin", setup=setup)
    methods = {m: {k: v.get(k) for k in ("id_acc", "ood_acc", "ood_acc_worst", "virtual_time_s")}
               for m, v in result["methods"].items()}
    return {"methods": methods, "steps": plan.ood_steps, "train_images_per_client": plan.ood_train_per_client,
            "task": "binary glyph-digit classifier (IRM's Colored MNIST, docs/invariant-learning.md); colour "
                    "agrees with the label 75-90% per client in training and 10% at test"}


# --- stage 2: fine-tuning -----------------------------------------------------------------------

def _stage_finetune(cfg: RunConfig, run, engine, plan: DemoPlan, model_dir: Path, console: Console) -> dict[str, Any]:
    """The finetune-hier regime at demo size (docs/finetuning.md): 3 edges of 4 Jetsons on Wi-Fi
    behind WAN links of tens of Mbit/s, per-edge label skew, costs charged as CLIP ViT-B/16 with
    rank-8 LoRA; every policy scored on one grid; target 0.9 x centralized fine-tuning's accuracy."""
    from cloudedge.bench.finetune_hier import TARGET_FRACTION, central_reference, regime_sections
    from cloudedge.finetune import finetune
    from cloudedge.finetune.stage import prepare_task
    from cloudedge.fleet import Fleet

    regime = regime_sections(plan.finetune_budget_s, plan.finetune_grid_points, devices_per_edge=4,
                             charge_as="clip-vit-b16")
    raw = cfg.model_dump(mode="json", exclude={"base_dir"})
    raw["model"] = {**raw["model"], "kind": "hf", "path": str(model_dir.resolve())}
    raw["fleet"], raw["clock"] = regime["fleet"], {**(raw.get("clock") or {}), **regime["clock"]}
    data_owner = raw["finetune"] if raw["finetune"].get("data") else raw
    data_owner["data"] = {**data_owner["data"], "partition": regime["partition"]}
    raw["finetune"] = {**raw["finetune"], **regime["finetune"], "target_accuracy": None}
    ft_cfg = config_from_dict(raw, source="demo finetune", base_dir=cfg.base_dir)
    f = ft_cfg.finetune
    assert f is not None
    task = prepare_task(ft_cfg, Fleet.from_config(ft_cfg.fleet, ft_cfg.seed))
    reference = central_reference(task, f.lora.mode.name, f.batch_size, f.lr, plan.finetune_central_steps, ft_cfg.seed,
                                  f.eval_max, f.device, f.precision)
    f.target_accuracy = round(TARGET_FRACTION * reference, 4)
    methods = {}
    for policy in plan.finetune_policies:
        console.print(f"[bold]fine-tune[/bold] {policy} ...")
        res = finetune(ft_cfg, run, engine, policy=policy)
        s = res.summary
        methods[policy] = {k: s.get(k) for k in ("final_acc", "best_acc", "time_to_target_s", "bytes_device_edge",
                                                 "bytes_edge_cloud", "device_energy_j", "payload_fraction")}
    return {"methods": methods, "target_accuracy": f.target_accuracy, "central_reference_acc": reference,
            "central_steps": plan.finetune_central_steps, "lora_mode": f.lora.mode.name, "base": str(model_dir),
            "regime": "finetune-hier at demo size (docs/finetuning.md)", "charged_as": regime["clock"]["charge_as"]}


# --- stage 3: test-time prompt adaptation -------------------------------------------------------

def _stage_adapt(cfg: RunConfig, run, engine, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from cloudedge.adapt import adapt
    from cloudedge.adapt.glyph_clip import glyph_clip

    console.print("[bold]adapt[/bold] the glyph CLIP (built by the pre-training stage once, then cached) ...")
    clip_dir, card = glyph_clip(quick=True, threads=cfg.engine.threads)  # None: every core, up to 4
    views = {"augment": GLYPH_VIEWS}  # views that keep a 28 px character readable (docs/prompt-tuning.md)
    methods = {}
    for method in plan.adapt_methods:
        console.print(f"[bold]adapt[/bold] {method} ...")
        # The config's knobs for the method it names, the glyph views for both augmenting methods.
        own = cfg.adapt.method.kwargs() if cfg.adapt.method.name == method else {}
        spec = {"name": method, **own, **(views if method in ("tpt", "swapprompt") else {})}
        res = adapt(cfg, run, engine, checkpoint=clip_dir, method=spec, stream_samples=plan.adapt_samples)
        s = res.summary
        methods[method] = {k: s.get(k) for k in ("acc_mean", "acc_per_shift", "ms_per_image", "peak_mem_mb",
                                                 "prompt_bytes_up")}
    return {"methods": methods, "streams": [s.model_dump() for s in cfg.adapt.streams],
            "clip": {"path": str(clip_dir), "cached": card["cached"], "zero_shot": card["zero_shot"],
                     "training": card["training"]}}


# --- headline -----------------------------------------------------------------------------------

def _headline(pre: dict[str, Any], ood: dict[str, Any], ft: dict[str, Any], ad: dict[str, Any]) -> dict[str, Any]:
    pm = pre["methods"]
    adaptive = {k: v for k, v in pm.items() if k != "sync-uniform"}
    best_adaptive = min(adaptive, key=lambda k: adaptive[k]["time_to_target_s"]
                        if adaptive[k]["time_to_target_s"] is not None else float("inf"))
    fm, am, om = ft["methods"], ad["methods"], ood["methods"]

    def acc_gain(a: str, b: str) -> float | None:
        x, y = am.get(a, {}).get("acc_mean"), am.get(b, {}).get("acc_mean")
        return None if x is None or y is None else round(100 * (x - y), 2)

    def ood_gain() -> float | None:
        x, y = om.get("pin", {}).get("ood_acc"), om.get("erm", {}).get("ood_acc")
        return None if x is None or y is None else round(100 * (x - y), 2)

    return {
        "pretrain_speedup": {
            "value": _ratio(pm["sync-uniform"]["time_to_target_s"], pm[best_adaptive]["time_to_target_s"]),
            "how": f"virtual time to val loss {pre['target_val_loss']:.3f} (sync-uniform's final): "
                   f"sync-uniform / {best_adaptive}"
                   if pre["target_val_loss"] is not None else "no target (baseline logged no validation loss)"},
        "ood_gain_points": {"value": ood_gain(), "how": "OOD accuracy (mean over clients), pin minus erm, points"},
        "finetune_speedup_vs_hierfavg": {
            "value": _ratio(fm["hierfavg"]["time_to_target_s"], fm["autonomous"]["time_to_target_s"]),
            "how": f"virtual time to {ft['target_accuracy']} accuracy: hierfavg / autonomous (None: one never reached it)"},
        "finetune_speedup_vs_fedavg2": {
            "value": _ratio(fm["fedavg2"]["time_to_target_s"], fm["autonomous"]["time_to_target_s"]),
            "how": "virtual time to the target accuracy: fedavg2 / autonomous"},
        "tta_gain_vs_tpt_points": {"value": acc_gain("swapprompt", "tpt"),
                                   "how": "mean top-1 over the edges' shifts, swapprompt minus tpt, points"},
        "tta_gain_vs_zeroshot_points": {"value": acc_gain("swapprompt", "zeroshot"),
                                        "how": "mean top-1 over the edges' shifts, swapprompt minus zeroshot, points"},
    }
