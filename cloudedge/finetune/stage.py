"""The fine-tuning stage from a config: data per device, the base model, the run directory.

``run_finetune(cfg, out_dir, resume, engine_kind)`` is the CLI's entry; ``finetune(cfg, run_dir,
engine)`` is the API the demo uses (a :class:`cloudedge.stage.StageResult` with the fine-tuned model).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloudedge.config import RunConfig
from cloudedge.config.data import DataConfig
from cloudedge.config.finetune import AttackSection
from cloudedge.config.model import ModelConfig
from cloudedge.device import resolve_device
from cloudedge.errors import InputError
from cloudedge.finetune.loop import STAGE, FinetuneSettings, HierFinetune, TaskData
from cloudedge.finetune.model import build_lora_classifier, load_base_tensors
from cloudedge.finetune.sync import POLICIES
from cloudedge.fleet import Fleet
from cloudedge.models.inputs import ImageSpec, check_images, config_image_spec, convert_channels
from cloudedge.registry import Choice
from cloudedge.stage import StageResult, StageRun, run_stage_into
from cloudedge.track.run import RunDir


def _image_tensors(ds: Any, spec: ImageSpec | None, source: str) -> dict[str, torch.Tensor]:
    """Labelled images in the model's channels (``cloudedge.models.inputs``; checked up front)."""
    x = ds.x if spec is None else convert_channels(ds.x, spec.channels, source)
    return {"pixel_values": x.contiguous(), "labels": ds.y.long()}


def _text_tensors(ds: Any, max_len: int) -> dict[str, torch.Tensor]:
    from cloudedge.data import ByteTokenizer

    ids, mask = ByteTokenizer().batch_encode(ds.texts, max_len=max_len)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(ds.labels, dtype=torch.long)}


def prepare_task(cfg: RunConfig, fleet: Fleet, base_tensors: dict[str, torch.Tensor] | None = None) -> TaskData:
    """Data per device (the config's partition over the fleet's devices) and the model spec."""
    from cloudedge.data import build_dataset, partition
    from cloudedge.data.partition import partition_view
    from cloudedge.finetune.devicedata import LazyDeviceData

    data_cfg: DataConfig = cfg.stage_data(STAGE)
    model_cfg: ModelConfig = cfg.stage_model(STAGE)
    fcfg = cfg.finetune
    assert fcfg is not None
    source = f"{STAGE}.data"
    if data_cfg.source == "pydocs" and data_cfg.n_classes is None:
        raise InputError(f"{source}.n_classes: fine-tuning on pydocs needs a number of module classes")
    train, test = build_dataset(data_cfg, cfg.base_dir, seed=cfg.seed)
    is_text = hasattr(train, "texts")
    # A GPT reads text, a ViT or CLIP images (a local HF checkpoint is checked when it loads).
    if model_cfg.kind != "hf" and (model_cfg.kind == "gpt") != is_text:
        raise InputError(f"{STAGE}.model: model.kind '{model_cfg.kind}' reads {'text' if model_cfg.kind == 'gpt' else 'images'}, "
                         f"but {source} ({data_cfg.source}) is {'text' if is_text else 'images'}")
    if is_text:
        if train.labels is None:
            raise InputError(f"{source}: text fine-tuning needs labels (label_field, or pydocs with n_classes)")
        to_tensors = lambda ds: _text_tensors(ds, model_cfg.context)  # noqa: E731
        labels = np.asarray(train.labels)
    else:
        image_spec = config_image_spec(model_cfg, cfg.base_dir)
        if image_spec is not None:
            # A model built from the config takes data.image_size as it is; a HF checkpoint's model
            # resizes and normalizes each batch as its processor says (finetune/model.py).
            check_images(train.x.shape, image_spec, f"{source} ({data_cfg.source}) for {STAGE}.model",
                         resize=model_cfg.kind == "hf")
        to_tensors = lambda ds: _image_tensors(ds, image_spec, source)  # noqa: E731
        labels = train.y.numpy()
    devices = fleet.devices
    part = data_cfg.partition
    train_t = to_tensors(train)
    device_data: Any
    if part.kind in ("iid", "quantity"):
        # One permutation and cut points; a device's tensors are cut when it is sampled, and
        # dropped after its round (docs/performance.md, "Scale").
        view = partition_view(labels, len(devices), part.kind, cfg.seed, alpha=part.alpha,
                              min_samples=max(1, part.min_samples), weights=fleet.data_shares())
        device_data = LazyDeviceData(fleet, lambda i: {k: v[torch.as_tensor(view.indices(i), dtype=torch.long)]
                                                       for k, v in train_t.items()}, view.sizes)
    else:
        if part.edge_alpha is not None:  # label skew that differs by edge (docs/data.md)
            from cloudedge.data import partition_by_edge

            # Devices are numbered edge by edge, so the shards come out in `devices` order.
            per_edge = [len(fleet.devices_of(e.id)) for e in fleet.edges]  # lengths only: no nodes built
            shards = partition_by_edge(labels, per_edge, part.edge_alpha, cfg.seed,
                                       min_samples=max(1, part.min_samples), weights=fleet.data_shares())
        else:
            shards = partition(labels, len(devices), part.kind, cfg.seed, alpha=part.alpha,
                               domains=getattr(train, "domains", None), min_samples=max(1, part.min_samples),
                               weights=fleet.data_shares())
        device_data = {d.id: {k: v[torch.as_tensor(idx, dtype=torch.long)] for k, v in train_t.items()}
                       for d, idx in zip(devices, shards, strict=True)}
    if base_tensors is None and fcfg.init:
        from cloudedge.models import resolve_path

        base_tensors = load_base_tensors(resolve_path(fcfg.init, cfg.base_dir), fcfg.init_prefix)
    spec = {
        "pooling": feature_pooling(fcfg.pooling, model_cfg, base_tensors),
        "model": model_cfg.model_dump(), "base_dir": cfg.base_dir, "seed": cfg.seed,
        "n_classes": len(train.classes), "rank": fcfg.lora.rank, "alpha": fcfg.lora.alpha,
        "targets": fcfg.lora.targets, "mode": fcfg.lora.mode.name, "base_tensors": base_tensors,
        "base_source": fcfg.init or "base model",
    }
    from cloudedge.models.charge import stage_charge

    return TaskData(spec=spec, device_data=device_data, test_data=to_tensors(test), classes=list(train.classes),
                    charge=stage_charge(cfg, STAGE))


def feature_pooling(pooling: str, model_cfg: ModelConfig, base_tensors: dict[str, torch.Tensor] | None) -> str:
    """How a ViT backbone's tokens become the feature: what the base was pre-trained with.

    The pre-training stage's image ``Classifier`` averages all tokens (its tensors are named
    ``encoder.*``); HF ViT checkpoints read the CLS token. Reading the CLS token of a model
    pre-trained on the mean would start fine-tuning from a feature nobody trained.
    """
    if pooling != "auto":
        if model_cfg.kind in ("gpt", "clip"):
            raise InputError(f"{STAGE}.pooling: '{pooling}' applies to ViT backbones, the model is '{model_cfg.kind}'")
        return pooling
    if model_cfg.kind == "vit" and base_tensors and any(k.startswith("encoder.") for k in base_tensors):
        return "mean"
    return "cls"


def settings_from_config(cfg: RunConfig, policy: str | dict[str, Any] | Choice | None = None) -> FinetuneSettings:
    """The loop's settings from the ``finetune`` section.

    ``policy`` overrides ``sync``: a mapping or :class:`Choice` as is; a bare name keeps the
    config's values of the knobs that policy takes (so one schedule, ``k1``/``k2``/deadline,
    compares several policies), its other knobs at their defaults.
    """
    f = cfg.finetune
    assert f is not None
    sync = f.sync if policy is None else switch_policy(f.sync, policy)
    resolve_device(f.device, f"{STAGE}.device")  # fails here, at the coordinator; each worker's host resolves its own
    return FinetuneSettings(
        # The mode's knobs (product: refactor) are settings fields of the same names.
        policy=sync.name, policy_kwargs=sync.kwargs(), lora_mode=f.lora.mode.name, **f.lora.mode.kwargs(),
        batch_size=f.batch_size,
        optimizer=f.optimizer, lr=f.lr, server_optimizer=f.server_optimizer.as_config(), server_lr=f.server_lr,
        compression=f.compression, participation=f.participation, time_budget_s=f.time_budget_s,
        device=f.device, precision=f.precision,
        max_cloud_rounds=f.max_cloud_rounds, target_accuracy=f.target_accuracy, eval_max=f.eval_max,
        eval_every_s=f.eval_every_s,
        checkpoint_every=f.checkpoint_every, seed=cfg.seed,
        robust=f.robust.model_dump(), attack=None if f.attack is None else attack_settings(f.attack),
        churn=f.churn.model_dump(), privacy=None if f.privacy is None else f.privacy.model_dump(),
        memory_fraction=f.memory_fraction, goal=f.selection.goal, over_selection=f.selection.over_selection)


def attack_settings(attack: AttackSection) -> dict[str, Any]:
    """The loop's plain form of ``finetune.attack``: ``kind`` (the name), the knobs set away from their
    defaults (the attack applies its own defaults, so a NaN default never travels as data), who attacks."""
    return {"kind": attack.kind.name, **attack.kind.changed(), "fraction": attack.fraction, "seed": attack.seed}


def switch_policy(sync: Choice, policy: str | dict[str, Any] | Choice) -> Choice:
    """The sync choice ``policy`` names (see :func:`settings_from_config`); an InputError when bad."""
    try:
        if isinstance(policy, str):
            if policy not in POLICIES:
                return POLICIES.choice(policy)  # raises: the unknown name and the known ones
            fields = POLICIES.params_model(policy).model_fields
            return POLICIES.choice({"name": policy, **{k: v for k, v in sync.kwargs().items() if k in fields}})
        return POLICIES.choice(policy)
    except ValueError as err:
        raise InputError(f"{STAGE}.sync: {err}") from None


def finetune(cfg: RunConfig, run_dir: RunDir | str | Path | None, engine: Any, resume: bool = False,
             policy: str | dict[str, Any] | Choice | None = None,
             base_tensors: dict[str, torch.Tensor] | None = None,
             on_round: Callable[[int, dict[str, Any]], None] | None = None) -> StageResult:
    """Fine-tune as ``cfg.finetune`` says; logs to ``run_dir`` (a RunDir, a path, or None: in
    memory) and checkpoints there; ``resume`` continues from its last checkpoint.

    ``on_round(round, row)`` is called after each cloud update's row (an exception it raises
    interrupts the run like a crash would; the checkpoints before it stay).

    Returns a :class:`StageResult`: every row of the run (after a resume, those logged before the
    checkpoint too), the summary, and the artefacts ``model`` (the fine-tuned classifier: base +
    global adapters + head) and ``adapters`` (the global adapter state).
    """
    if cfg.finetune is None:
        raise InputError("finetune: the config has no 'finetune' section")
    fleet = Fleet.from_config(cfg.fleet, cfg.seed)
    task = prepare_task(cfg, fleet, base_tensors)
    settings = settings_from_config(cfg, policy)
    run = StageRun.open(STAGE, run_dir, cfg, settings.policy, resume=resume)
    engine.use_plugins(cfg.plugins)  # workers in other processes (Ray) register the config's plug-ins too
    loop = HierFinetune(fleet, task, settings, engine, stage_run=run, on_round=on_round)
    summary = loop.run(resume=resume)
    summary["clock"] = loop.clock.summary()
    model = build_lora_classifier(loop.spec)
    from cloudedge.finetune.model import AdapterSlot

    AdapterSlot(model).load(loop.global_state)
    model.eval()
    return StageResult(loop.history, summary, {"model": model, "adapters": loop.global_state}, run.run_dir)


def run_finetune(cfg: RunConfig, out_dir: str | Path, resume: bool = False, engine_kind: str = "local") -> dict[str, Any]:
    """The CLI's entry: run the stage into ``out_dir`` (the global adapters in ``adapters.safetensors``)."""

    def save_adapters(result: StageResult, path: Path) -> None:
        from safetensors.torch import save_file

        adapters = result.artefacts["adapters"]
        save_file({k: v.contiguous() for k, v in adapters.items()}, str(path / "adapters.safetensors"))

    return run_stage_into(STAGE, cfg, out_dir, resume, engine_kind, finetune, save_adapters)
