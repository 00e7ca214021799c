"""The `cloudedge` command: demo, pretrain, finetune, adapt, fleet, bench, report, generate.

Every command turns bad input into one line on stderr and exit code 2 (see cloudedge.errors).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cloudedge.errors import EXIT_INPUT_ERROR, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cloud-edge collaborative large models: pre-train, fine-tune and adapt across a fleet.")
# Wide when printing to a file or pipe, so tables stay readable in logs.
console = Console(width=None if sys.stdout.isatty() else 200)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="run directory (default runs/NAME)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last checkpoint")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="move an existing --out aside and start afresh")]
EngineOpt = Annotated[str | None, typer.Option("--engine", help="local | ray (overrides engine.kind)")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="ray: auto or HOST:PORT")]


def _load(config: Path, engine: str | None, address: str | None):
    from cloudedge.config import load_config

    cfg = load_config(config)
    if engine is not None:
        if engine not in ("local", "ray"):
            raise InputError(f"--engine: unknown engine {engine!r} (known: local, ray)")
        cfg.engine.kind = engine
    if address is not None:
        cfg.engine.address = address
    from cloudedge.engine import configure_threads

    configure_threads(cfg.engine.threads)
    return cfg


def _out(out: Path | None, cfg, stage: str) -> Path:
    return out if out is not None else Path("runs") / f"{cfg.name}-{stage}"


def _need(cfg, stage: str, config: Path) -> None:
    if getattr(cfg, stage) is None:
        raise InputError(f"{config}: {stage}: this command needs a '{stage}' section")


def summary_table(summary: dict[str, Any]) -> Any:
    """A stage's summary as a two-column table in human units (MB, ms, J, %)."""
    from rich.table import Table

    from cloudedge.track.units import format_value

    table = Table(show_header=False, box=None, pad_edge=False)
    for key, value in summary.items():
        if value not in ({}, []):
            table.add_row(key, format_value(key, value))
    return table


def _stage(stage: str, config: Path, out: Path | None, resume: bool, overwrite: bool,
           engine: str | None, address: str | None) -> None:
    cfg = _load(config, engine, address)
    _need(cfg, stage, config)
    module = importlib.import_module(f"cloudedge.{stage}.stage")  # every stage's entry module
    runner = getattr(module, f"run_{stage}")
    out_dir = _out(out, cfg, stage)
    if overwrite and not resume:
        from cloudedge.track.run import move_aside

        aside = move_aside(out_dir)
        if aside is not None:
            console.print(f"moved the previous run to {aside}")
    summary = runner(cfg, out_dir, resume=resume, engine_kind=cfg.engine.kind)
    report = out_dir / "report.html"
    console.print(f"[green]{stage} finished[/green]: {out_dir}" + (f" (report: {report})" if report.is_file() else "")
                  + f"  (raw numbers: {out_dir / 'summary.json'})")
    console.print(summary_table(summary))


@app.command()
def pretrain(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             engine: EngineOpt = None, address: AddressOpt = None) -> None:
    """Pre-train one model across cloud, edges and devices (adaptive batches, invariant objectives)."""
    _stage("pretrain", config, out, resume, overwrite, engine, address)


@app.command()
def finetune(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
             engine: EngineOpt = None, address: AddressOpt = None) -> None:
    """Hierarchical device -> edge -> cloud fine-tuning of adapters with autonomous synchronization."""
    _stage("finetune", config, out, resume, overwrite, engine, address)


@app.command()
def adapt(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
          engine: EngineOpt = None, address: AddressOpt = None) -> None:
    """Test-time prompt adaptation of a CLIP-style model on every edge's unlabeled stream."""
    _stage("adapt", config, out, resume, overwrite, engine, address)


@app.command()
def fleet(config: ConfigArg, limit: Annotated[int, typer.Option(help="rows shown before devices are grouped")] = 60) -> None:
    """Print the fleet a config describes: nodes, hardware, links, and the data each device holds."""
    from cloudedge.fleetview import fleet_table

    cfg = _load(config, None, None)
    console.print(fleet_table(cfg, limit=limit))


@app.command("fedscale-trace")
def fedscale_trace(
    kind: Annotated[str, typer.Argument(help="behave (availability) | capacity (speed)")],
    source: Annotated[Path, typer.Argument(help="FedScale trace converted to JSON (never a pickle)")],
    dest: Annotated[Path, typer.Argument(help="CSV to write: a fleet.availability / fleet.speed file")],
    config: Annotated[Path, typer.Option("--config", help="the run config whose fleet the clients map onto")],
    horizon_s: Annotated[float, typer.Option("--horizon-s", help="behave: unroll the periodic trace this far")] = 604800.0,
) -> None:
    """Convert a FedScale device trace (JSON) to cloudedge's CSV (docs/profiles.md, "FedScale traces")."""
    from cloudedge.fleet import Fleet
    from cloudedge.fleet.fedscale import behave_to_rows, capacity_to_rows, write_csv

    cfg = _load(config, None, None)
    fleet_obj = Fleet.from_config(cfg.fleet, cfg.seed)
    ids = [d.id for d in fleet_obj.devices]
    if kind == "behave":
        text = write_csv(behave_to_rows(source, ids, horizon_s), ("device", "start_s", "end_s"))
    elif kind == "capacity":
        text = write_csv(capacity_to_rows(source, ids), ("device", "compute_scale", "uplink_scale", "downlink_scale"))
    else:
        raise InputError(f"fedscale-trace: unknown kind {kind!r} (known: behave, capacity)")
    _write_output(dest, text)
    console.print(f"wrote {dest} ({text.count(chr(10)) - 1} rows)")


def _write_output(dest: Path, text: str) -> None:
    """Write a command's output file, creating missing folders as ``--out`` does for runs; written
    atomically, so a failed write leaves an existing file whole. An unwritable place is an InputError."""
    from cloudedge.checkpoint import atomic_write_text

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{dest}: cannot write the output file: a file stands where its folder "
                         f"{dest.parent} would be") from None
    except OSError as err:
        raise InputError(f"{dest}: cannot create the output file's folder ({err.strerror or err})") from None
    try:
        atomic_write_text(dest, text)
    except OSError as err:
        raise InputError(f"{dest}: cannot write the output file ({err.strerror or err})") from None


@app.command()
def demo(out: OutOpt = None, quick: Annotated[bool, typer.Option("--quick", help="the short version (< 3 min)")] = False,
         config: Annotated[Path | None, typer.Option("--config", help="demo config (default: bundled demo.yaml)")] = None,
         overwrite: Annotated[bool, typer.Option("--overwrite/--no-overwrite",
                                                 help="move an existing --out aside (default) or refuse")] = True) -> None:
    """The whole lifecycle on bundled data: pre-train, fine-tune, adapt; writes a report."""
    from cloudedge.demo import run_demo

    run_demo(config=config, out_dir=out or Path("runs/demo"), quick=quick, overwrite=overwrite, console=console)


@app.command()
def bench(name: Annotated[str, typer.Argument(help="benchmark name (see --list)")] = "",
          out: Annotated[Path | None, typer.Option("--out", help="directory for results.json")] = None,
          quick: Annotated[bool, typer.Option("--quick", help="the short version (< 3 min)")] = False,
          engine: EngineOpt = None,
          devices: Annotated[str | None, typer.Option("--devices", help="scale: comma-separated fleet sizes")] = None,
          set_: Annotated[list[str] | None, typer.Option(
              "--set", help="a benchmark option KEY=VALUE (VALUE read as YAML), repeatable; "
                            "e.g. --set device=cuda --set size=gpt-100m (docs/performance.md)")] = None,
          list_: Annotated[bool, typer.Option("--list", help="list benchmarks")] = False) -> None:
    """Run a benchmark and write DIR/results.json."""
    from cloudedge.bench import BENCHMARKS, run_benchmark

    if list_ or not name:
        for key in BENCHMARKS:
            console.print(f"[bold]{key}[/bold]  {BENCHMARKS.get(key).description}")
        return
    out_dir = out or Path("runs") / f"bench-{name}"
    extra = {}
    if engine is not None:
        extra["engine"] = engine
    if devices is not None:
        try:
            extra["devices"] = [int(x) for x in devices.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--devices: expected comma-separated integers, got {devices!r}") from None
    extra.update(_bench_options(set_ or []))
    path = run_benchmark(name, out_dir=out_dir, quick=quick, **extra)
    console.print(f"[green]results[/green]: {path}")


def _bench_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of ``--set``, each VALUE parsed as a YAML scalar or list."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise InputError(f"--set: expected KEY=VALUE with KEY a Python name, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise InputError(f"--set {key}: cannot read {value!r} as a value") from None
    return out


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory")]) -> None:
    """Render RUN_DIR/report.md (and report.html) from the run's metrics."""
    from cloudedge.track.report import render_report

    md, html = render_report(run_dir)
    console.print(f"[green]report[/green]: {md}\n[green]html[/green]: {html}")


@app.command()
def generate(run_dir: Annotated[Path, typer.Argument(help="a language-model run directory (or its model/ folder)")],
             prompt: Annotated[str, typer.Option("--prompt", help="text to continue")] = "",
             max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="at most this many tokens")] = 64,
             temperature: Annotated[float, typer.Option("--temperature", help="0: greedy")] = 1.0,
             top_k: Annotated[int, typer.Option("--top-k", help="sample among the k likeliest; 0: all")] = 0,
             seed: Annotated[int, typer.Option("--seed", help="sampling seed (same seed, same text)")] = 0) -> None:
    """Sample text from a run's exported language model (AutoTokenizer + AutoModelForCausalLM)."""
    from cloudedge.generate import Sampling, generate_text

    text = generate_text(run_dir, prompt, Sampling(max_new_tokens, temperature, top_k, seed))
    print(text)


def _is_usage_error(err: BaseException) -> bool:
    """A command-line usage error, from click or from typer's vendored click."""
    kinds: list[type] = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            kinds.append(importlib.import_module(module).ClickException)
        except (ModuleNotFoundError, AttributeError):
            pass
    return isinstance(err, tuple(kinds))


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the typer app, mapping InputError to one line and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from cloudedge.track.progress import check_progress_settings

        check_progress_settings()
        app(args=argv, standalone_mode=False)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except Exception as err:  # click usage errors: bad flags, missing arguments
        if _is_usage_error(err):
            print(f"error: {' '.join(err.format_message().split())}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
