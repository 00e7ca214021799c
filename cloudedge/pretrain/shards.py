"""Pre-training data: each worker's shard (dealt from the config's data section, or given by the
caller) and the cloud's held-out set. Images are brought to the model's channels here, once, at the
coordinator (:mod:`cloudedge.models.inputs`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cloudedge.config.pretrain import PretrainConfig
from cloudedge.config.run import RunConfig
from cloudedge.errors import InputError
from cloudedge.fleet import Node
from cloudedge.models.inputs import ImageSpec, check_images, convert_channels

STAGE = "pretrain"
Tensors = dict[str, torch.Tensor]


@dataclass
class Shards:
    """Each worker's training data (plain tensors), the cloud's held-out data, and task facts."""

    train: dict[str, Tensors]
    val: Tensors | None
    n_classes: int
    excluded: dict[str, str]


def _tensor_subset(data: Tensors, idx: np.ndarray) -> Tensors:
    index = torch.as_tensor(idx, dtype=torch.long)
    return {k: v[index] for k, v in data.items()}


def build_shards(cfg: RunConfig, pcfg: PretrainConfig, workers: list[Node], seq_len: int) -> Shards:
    """Load the stage's data, hold out the test split for the cloud, deal the rest to workers.

    Text is dealt by document (``partition.kind: domain`` keeps whole modules on one worker) and
    then cut into LM blocks per worker; images are dealt by sample. A worker whose shard is too
    small to train on is left out (listed in ``excluded``).
    """
    from cloudedge.data import build_dataset, lm_blocks, partition
    from cloudedge.data.tokenizer import ByteTokenizer

    # The model each task trains (classify: any backbone; a local HF checkpoint is checked on load).
    kind, needs = cfg.stage_model(STAGE).kind, {"lm": "gpt", "clip": "clip"}.get(pcfg.task)
    if needs is not None and kind not in (needs, "hf"):
        raise InputError(f"{STAGE}.task: '{pcfg.task}' trains a '{needs}' model, but model.kind is '{kind}'")

    data_cfg = cfg.stage_data(STAGE)
    train, test = build_dataset(data_cfg, cfg.base_dir, cfg.seed)
    part = data_cfg.partition
    weights = [n.data_share if n.data_share > 0 else 1.0 for n in workers]
    excluded: dict[str, str] = {}
    shards: dict[str, Tensors] = {}
    if pcfg.task == "lm":
        if not hasattr(train, "texts"):
            raise InputError(f"pretrain.task: 'lm' needs text data, data.source is '{data_cfg.source}'")
        tok = ByteTokenizer()
        labels = np.zeros(len(train), dtype=np.int64)
        parts = partition(labels, len(workers), part.kind, cfg.seed, alpha=part.alpha, domains=train.domains,
                          min_samples=part.min_samples, weights=weights)
        for node, idx in zip(workers, parts, strict=True):
            texts = [train.texts[int(i)] for i in idx]
            try:
                shards[node.id] = {"input_ids": lm_blocks(texts, tok, seq_len)}
            except InputError:
                excluded[node.id] = "its text is shorter than one sequence"
        val = {"input_ids": lm_blocks(test.texts, tok, seq_len)[: pcfg.eval_samples]}
        return Shards(shards, val, 0, excluded)

    if not hasattr(train, "x"):
        raise InputError(f"pretrain.task: '{pcfg.task}' needs image data, data.source is '{data_cfg.source}'")
    model_cfg = cfg.stage_model(STAGE)
    spec = ImageSpec(size=model_cfg.image_size, channels=model_cfg.channels)
    # Up front, before any worker: channels convert (grey <-> RGB), sizes must match for classify
    # (the clip task resizes each batch to its vision tower, cloudedge.models.inputs.fit_pixels).
    check_images(train.x.shape, spec, f"{STAGE}.data ({data_cfg.source}) for {STAGE}.model",
                 resize=pcfg.task == "clip")
    if pcfg.task == "classify":
        train.x, test.x = convert_channels(train.x, spec.channels), convert_channels(test.x, spec.channels)
    whole: Tensors = {"x": train.x, "y": train.y}
    val: Tensors = {"x": test.x[: pcfg.eval_samples], "y": test.y[: pcfg.eval_samples]}
    if pcfg.task == "clip":
        from cloudedge.pretrain.clip_task import clip_batch

        plain = data_cfg.glyphs.plain_captions if data_cfg.source == "glyphs" else 0.0
        whole = clip_batch(train.x, train.y, train.classes, cfg.seed, model_cfg.context, train.meta, plain)
        val = clip_batch(test.x, test.y, test.classes, cfg.seed + 1, model_cfg.context, test.meta, plain)
        val = {k: v[: pcfg.eval_samples] for k, v in val.items()}
    domains = train.domains.numpy() if train.domains is not None else None
    parts = partition(train.y.numpy(), len(workers), part.kind, cfg.seed, alpha=part.alpha, domains=domains,
                      min_samples=part.min_samples, weights=weights)
    for node, idx in zip(workers, parts, strict=True):
        if len(idx) == 0:
            excluded[node.id] = "no samples were dealt to it"
        else:
            shards[node.id] = _tensor_subset(whole, idx)
    return Shards(shards, val, len(train.classes), excluded)


def client_shards(cfg: RunConfig, pcfg: PretrainConfig, workers: list[Node], shards: dict[str, Tensors],
                  client_eval: dict[str, dict[str, Tensors]], val: Tensors | None) -> Shards:
    """Shards the caller dealt itself (``pretrain(shards=...)``), checked against the fleet and task.

    A training-tier node without a shard sits out (listed in ``excluded``). ``classify``: every shard
    and test set needs ``x`` [N, C, H, W] matching the model config and ``y`` [N]; the number of
    classes is the largest label seen, plus one. ``lm``: ``input_ids`` [N, seq_len].
    """
    needed = ("x", "y") if pcfg.task == "classify" else ("input_ids",) if pcfg.task == "lm" else ()
    worker_ids = {n.id for n in workers}
    for wid in [*shards, *client_eval]:
        if wid not in worker_ids:
            raise InputError(f"shards: '{wid}' is not a node of the training tiers {pcfg.workers}")
    labelled: list[tuple[str, Tensors]] = [(f"shards.{w}", d) for w, d in shards.items()]
    labelled += [(f"client_eval.{w}.{name}", d) for w, sets in client_eval.items() for name, d in sets.items()]
    if val is not None:
        labelled.append(("val", val))
    model_cfg = cfg.stage_model(STAGE)
    for where, data in labelled:
        missing = [k for k in needed if k not in data]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)} (task '{pcfg.task}' needs {', '.join(needed)})")
        sizes = {int(v.shape[0]) for v in data.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise InputError(f"{where}: tensors must be non-empty and have one length (got {sorted(sizes)})")
        if pcfg.task == "classify" and (data["x"].dim() != 4 or data["x"].shape[1] != model_cfg.channels
                                        or data["x"].shape[-1] != model_cfg.image_size):
            raise InputError(f"{where}.x: expected [N, {model_cfg.channels}, {model_cfg.image_size}, "
                             f"{model_cfg.image_size}] images, got {list(data['x'].shape)}")
    n_classes = 0
    if pcfg.task == "classify":
        n_classes = max(int(d["y"].max()) for _, d in labelled) + 1
    excluded = {n.id: "no shard was given for it" for n in workers if n.id not in shards}
    return Shards(dict(shards), val, n_classes, excluded)
