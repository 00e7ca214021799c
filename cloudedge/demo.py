"""`cloudedge demo`: the whole lifecycle on bundled data across a simulated fleet."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cloudedge.errors import InputError


def default_demo_config() -> Path:
    """configs/demo.yaml in the working directory, else the one in the source tree."""
    for candidate in (Path("configs/demo.yaml"), Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"):
        if candidate.is_file():
            return candidate
    raise InputError("configs/demo.yaml: demo config not found; pass --config")


def run_demo(config: Path | None, out_dir: Path, quick: bool = False, overwrite: bool = True,
             console: Console | None = None) -> dict:
    from cloudedge.config import load_config
    from cloudedge.fleetview import fleet_table

    console = console or Console()
    cfg = load_config(config or default_demo_config())
    console.print(fleet_table(cfg))
    return {}
