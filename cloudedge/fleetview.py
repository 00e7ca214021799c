"""`cloudedge fleet`: the fleet a config describes, with the data each device would hold."""

from __future__ import annotations

from collections import Counter

import numpy as np
from rich.table import Table

from cloudedge.config import RunConfig
from cloudedge.errors import InputError
from cloudedge.pretrain.costs import PretrainCosts


def _labels_of(dataset) -> np.ndarray:
    y = getattr(dataset, "y", None)
    if y is not None:
        return np.asarray(y)
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    # Unlabelled text (language modelling): the domain is what the partition keys on.
    domains = getattr(dataset, "domains", None) or []
    names = sorted(set(domains))
    return np.asarray([names.index(d) for d in domains])


def _class_names(dataset, n: int) -> list[str]:
    classes = list(getattr(dataset, "classes", []) or [])
    if len(classes) >= n:
        return classes
    domains = getattr(dataset, "domains", None)
    if isinstance(domains, list) and domains:
        return sorted(set(domains))
    return [str(i) for i in range(n)]


def label_mix(labels: np.ndarray, names: list[str], top: int = 3) -> str:
    """The most common labels on a device, e.g. 'seven 41%, one 30%, two 12%'."""
    if len(labels) == 0:
        return "-"
    counts = Counter(labels.tolist()).most_common(top)
    return ", ".join(f"{names[k] if k < len(names) else k} {100 * c / len(labels):.0f}%" for k, c in counts)


def pretrain_cost(cfg: RunConfig, n_classes: int) -> tuple[PretrainCosts, float] | None:
    """The pre-training costs the clock charges for this config (``clock.charge_as``, else the trained
    model, built on the meta device) and the usable memory fraction; None for a checkpoint model."""
    from cloudedge.config.pretrain import PretrainConfig
    from cloudedge.models.charge import ChargedModel, stage_charge
    from cloudedge.pretrain.costs import charged_costs

    model_cfg = cfg.stage_model("pretrain")
    if model_cfg.kind == "hf":
        return None
    pcfg = cfg.pretrain or PretrainConfig(task={"gpt": "lm", "vit": "classify", "clip": "clip"}[model_cfg.kind])
    charge = stage_charge(cfg, "pretrain") or ChargedModel(
        f"{model_cfg.kind} {model_cfg.hidden}x{model_cfg.layers} (trained)", model_cfg.kind, model_cfg=model_cfg)
    seq_len = pcfg.seq_len or model_cfg.context
    cost = charged_costs(pcfg.task, charge, seq_len=seq_len, n_classes=max(n_classes, 2), encoder=pcfg.encoder,
                         seed=cfg.seed, base_dir=cfg.base_dir, precision=pcfg.precision)
    return cost, pcfg.memory_fraction


def fits(cost: PretrainCosts, memory_bytes: float, memory_fraction: float) -> str:
    """'yes (<= N at once)' when a node holds the model and at least one sample, else 'no'."""
    cap = cost.micro_batch_cap(memory_bytes, memory_fraction)
    return f"yes (<= {cap:,} at once)" if cap >= 1 else "no"


def fleet_table(cfg: RunConfig, limit: int = 60) -> Table:
    """A rich table: node, tier, profile, compute, memory, links, samples, label mix, and the
    charged model's pre-training seconds per sample and whether it fits (docs/profiles.md).

    Devices beyond ``limit`` rows are summarized per edge so a 10,000-device fleet stays readable.
    """
    from cloudedge.data import build_dataset
    from cloudedge.fleet import Fleet, format_bytes, format_flops, format_rate
    from cloudedge.placement import place_data

    fleet = Fleet.from_config(cfg.fleet, seed=cfg.seed)
    train, _ = build_dataset(cfg.data, cfg.base_dir, cfg.seed)
    labels = _labels_of(train)
    domains = getattr(train, "domains", None)
    if domains is not None and not isinstance(domains, list):
        domains = domains.tolist()  # image datasets keep domains as a tensor
    placed = place_data(fleet, labels, cfg.data.partition, cfg.seed,
                        domains=np.asarray(domains) if domains else None)
    names = _class_names(train, int(labels.max()) + 1 if len(labels) else 0)
    try:
        charged = pretrain_cost(cfg, len(names))
    except InputError as err:  # e.g. a charged family the pre-training task cannot use: say so, show the rest
        charged, note = None, f"; no pre-training costs ({err})"
    else:
        note = ""
    costs = note if charged is None else (
        f"; pre-training costs charged as {charged[0].name}: {charged[0].params / 1e6:,.1f}M parameters, "
        f"{charged[0].train_flops_per_sample:.3g} FLOPs per sample, "
        f"{format_bytes(charged[0].message_bytes('none'))} per update")

    table = Table(title=f"fleet of {cfg.name}: 1 cloud, {len(fleet.edges)} edges, {len(fleet.devices)} devices; "
                        f"data {cfg.data.source} ({len(labels)} train samples, partition {cfg.data.partition.kind})"
                        f"{costs}")
    for col, justify in [("node", "left"), ("tier", "left"), ("profile", "left"), ("compute", "right"),
                         ("memory", "right"), ("up / down", "right"), ("latency", "right"),
                         ("avail", "right"), ("s / sample", "right"), ("fits", "left"), ("samples", "right"),
                         ("label mix", "left")]:
        table.add_column(col, justify=justify)

    def row(node, samples: str = "-", mix: str = "-") -> None:
        p = node.profile
        per_sample, fit = "-", "-"
        if charged is not None:
            per_sample = f"{charged[0].train_flops_per_sample / p.flops:.3g} s"
            fit = fits(charged[0], p.memory_bytes, charged[1])
        links, latency = f"{format_rate(p.uplink_Bps)} / {format_rate(p.downlink_Bps)}", f"{p.latency_s * 1e3:.0f} ms"
        if node.tier == "edge":  # its WAN link to the cloud, where it has its own (docs/profiles.md, "Links")
            from cloudedge.fleet.profiles import link_figures

            up, down, lat, wan = link_figures(p, "cloud")
            if wan:
                links += f"; WAN {format_rate(up)} / {format_rate(down)}"
                latency += f"; WAN {lat * 1e3:.0f} ms"
        table.add_row(node.id, node.tier, p.name, format_flops(p.flops), format_bytes(p.memory_bytes),
                      links, latency, f"{p.availability:.2f}", per_sample, fit, samples, mix)

    row(fleet.cloud)
    shown = 1
    for edge in fleet.edges:
        devs = fleet.devices_of(edge.id)
        edge_idx = np.concatenate([placed[d.id] for d in devs]) if devs else placed.get(edge.id, np.array([], int))
        row(edge, str(len(edge_idx)), label_mix(labels[edge_idx], names))
        shown += 1
        for i, dev in enumerate(devs):
            if shown >= limit:
                rest = devs[i:]
                idx = np.concatenate([placed[d.id] for d in rest])
                profiles = Counter(d.profile.name for d in rest)
                table.add_row(f"{edge.id}/... ({len(rest)} more)", "device",
                              ", ".join(f"{k} x{v}" for k, v in profiles.items()), "", "", "", "", "", "", "",
                              str(len(idx)), label_mix(labels[idx], names))
                break
            idx = placed[dev.id]
            row(dev, str(len(idx)), label_mix(labels[idx], names))
            shown += 1
    return table
