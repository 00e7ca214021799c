"""A run's report: `report.md` and a self-contained `report.html` (plots embedded as data URIs).

Both are rendered from the same list of blocks, built from the run directory alone
(config.yaml, metrics.jsonl, summary.json), so `cloudedge report RUN_DIR` can regenerate them.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudedge.checkpoint import atomic_write_text
from cloudedge.errors import InputError
from cloudedge.track.plots import availability_plot, curve_plots, k2_plot, shift_bars
from cloudedge.track.run import read_metrics, read_run_config, read_summary
from cloudedge.track.units import BEST_MARK, format_value, method_table


@dataclass
class Block:
    kind: str  # heading | text | table | image | code
    text: str = ""
    level: int = 2
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None


def _fleet_rows(config: dict[str, Any], base_dir: Path) -> list[list[str]]:
    """The fleet table as rows (node groups), from the run's resolved config."""
    from cloudedge.config import config_from_dict
    from cloudedge.fleet import Fleet, format_bytes, format_flops, format_rate

    cfg = config_from_dict(config, source=str(base_dir / "config.yaml"), base_dir=base_dir)
    fleet = Fleet.from_config(cfg.fleet, seed=cfg.seed)
    rows = [["node", "tier", "profile", "compute", "memory", "up / down"]]

    def add(node_id: str, node) -> None:
        p = node.profile
        rows.append([node_id, node.tier, p.name, format_flops(p.flops), format_bytes(p.memory_bytes),
                     f"{format_rate(p.uplink_Bps)} / {format_rate(p.downlink_Bps)}"])

    add(fleet.cloud.id, fleet.cloud)
    for edge in fleet.edges:
        add(edge.id, edge)
        by_profile: dict[str, list] = {}
        for d in fleet.devices_of(edge.id):
            by_profile.setdefault(d.profile.name, []).append(d)
        for devs in by_profile.values():
            add(f"{edge.id}: {len(devs)} x device", devs[0])
    return rows


def build_blocks(run_dir: Path) -> list[Block]:
    rows = read_metrics(run_dir)
    summary = read_summary(run_dir)
    config = read_run_config(run_dir)

    blocks = [Block("heading", f"cloudedge run: {run_dir.name}", level=1)]
    if not summary.get("complete"):
        blocks.append(Block("text", "**This run is not complete** (interrupted or still running): "
                                    "numbers below are partial."))
    if config is not None:
        blocks.append(Block("heading", "Fleet"))
        try:
            blocks.append(Block("table", rows=_fleet_rows(config, run_dir)))
        except InputError as err:
            blocks.append(Block("text", f"(fleet not shown: {err})"))

    headline = summary.get("headline")
    if isinstance(headline, dict) and headline:
        blocks.append(Block("heading", "Headline"))
        table = [["measure", "value", "how it was measured"]]
        for key, item in headline.items():
            if isinstance(item, dict):
                table.append([key, format_value(key, item.get("value")), str(item.get("how", ""))])
            else:
                table.append([key, format_value(key, item), ""])
        blocks.append(Block("table", rows=table))

    for stage in ("pretrain", "invariant", "finetune", "adapt"):
        section = summary.get(stage)
        if not isinstance(section, dict):
            continue
        blocks.append(Block("heading", f"Stage: {stage}"))
        methods = section.get("methods")
        if isinstance(methods, dict) and methods:
            blocks.append(Block("table", rows=method_table(methods)))
            blocks.append(Block("text", f"Best first;{BEST_MARK} marks the best value of each column."))
        if isinstance(section.get("cost_model"), dict):  # which model the clock charged (clock.charge_as)
            from cloudedge.models.charge import cost_model_sentence

            blocks.append(Block("text", cost_model_sentence(section["cost_model"])))
        notes = {k: v for k, v in section.items() if k not in ("methods", "cost_model")}
        if notes:
            blocks.append(Block("table", rows=[["key", "value"], *([k, format_value(k, v)] for k, v in notes.items())]))

    plots = curve_plots(rows, run_dir / "plots")
    for extra in (shift_bars(rows, run_dir / "plots"), k2_plot(rows, run_dir / "plots"),
                  availability_plot(rows, run_dir / "plots")):
        if extra is not None:
            plots.append(extra)
    if plots:
        blocks.append(Block("heading", "Plots"))
        for p in plots:
            blocks.append(Block("image", text=p.stem.replace("_", " "), path=p))

    if config is not None:
        blocks.append(Block("heading", "Resolved configuration"))
        blocks.append(Block("code", yaml.safe_dump(config, sort_keys=False)))
    return blocks


def to_markdown(blocks: list[Block], run_dir: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append(f"{'#' * b.level} {b.text}\n")
        elif b.kind == "text":
            out.append(b.text + "\n")
        elif b.kind == "table":
            head, *body = b.rows
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            out.extend("| " + " | ".join(r) + " |" for r in body)
            out.append("")
        elif b.kind == "image" and b.path is not None:
            out.append(f"![{b.text}]({b.path.relative_to(run_dir).as_posix()})\n")
        elif b.kind == "code":
            out.append("```yaml\n" + b.text + "```\n")
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """Escape, then the one inline form the blocks use: **bold**."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif b.kind == "text":
            body.append(f"<p>{_inline_md(b.text)}</p>")
        elif b.kind == "table":
            head, *rows = b.rows
            body.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</tbody></table>")
        elif b.kind == "image" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "code":
            body.append(f"<pre>{html.escape(b.text)}</pre>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}figure{display:inline-block;margin:0.5em;"
             "max-width:48%}figcaption{font-size:0.8em;color:#666}pre{background:#f7f7f7;padding:1em;overflow:auto;"
             "font-size:0.8em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def render_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/report.md and RUN_DIR/report.html; return their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a directory")
    blocks = build_blocks(run_dir)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, to_markdown(blocks, run_dir))
    atomic_write_text(html_path, to_html(blocks, f"cloudedge run {run_dir.name}"))
    return md_path, html_path
