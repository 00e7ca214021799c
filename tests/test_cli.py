import subprocess
import sys
from pathlib import Path

from cloudedge.cli import main

ROOT = Path(__file__).parents[1]


def test_fleet_table_prints(capsys):
    assert main(["fleet", str(ROOT / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "edge0/dev0" in out and "jetson-orin" in out and "samples" in out


def test_fleet_table_of_a_fleet_without_devices_deals_data_to_its_edges(capsys):
    # configs/adapt-digits.yaml: four edge servers, no devices (each edge streams its own data).
    assert main(["fleet", str(ROOT / "configs" / "adapt-digits.yaml")]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "edge-server" in line]
    assert len(rows) == 4 and all(" 22" in row for row in rows)  # 899 images: 225, 225, 225, 224


def test_bad_config_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet:\n  cloud: {profile: abacus}\n")
    assert main(["fleet", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fleet.cloud.profile" in err and "abacus" in err and str(bad) in err


def test_missing_data_file_exits_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {source: jsonl, path: nowhere.jsonl}\n")
    assert main(["fleet", str(cfg)]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err


def test_unknown_benchmark_and_bad_flag(capsys):
    assert main(["bench", "nope", "--out", "/tmp/x"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert main(["fleet"]) == 2  # missing argument is a usage error


def test_entry_point_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1]\n")
    proc = subprocess.run([sys.executable, "-m", "cloudedge", "fleet", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "seed" in proc.stderr


def test_benchmark_option_it_does_not_take_is_an_input_error(capsys, tmp_path):
    assert main(["bench", "pretrain-hetero", "--quick", "--devices", "100", "--out", str(tmp_path)]) == 2
    assert "takes no --devices option" in capsys.readouterr().err


def _fedscale_inputs(tmp_path: Path) -> tuple[Path, Path]:
    trace = tmp_path / "behave.json"
    trace.write_text('{"1": {"active": [0], "inactive": [10], "finish_time": 40}}')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fleet:\n  edges: [{count: 1, devices: [{count: 1, profile: phone-mid}]}]\n")
    return trace, cfg


def test_fedscale_trace_creates_missing_folders_like_out(tmp_path):
    trace, cfg = _fedscale_inputs(tmp_path)
    dest = tmp_path / "new" / "deeper" / "avail.csv"
    assert main(["fedscale-trace", "behave", str(trace), str(dest), "--config", str(cfg), "--horizon-s", "80"]) == 0
    assert dest.read_text().splitlines() == ["device,start_s,end_s", "edge0/dev0,0,10", "edge0/dev0,40,50"]


def test_fedscale_trace_unwritable_destination_exits_2_naming_it(tmp_path, capsys):
    trace, cfg = _fedscale_inputs(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    dest = blocker / "avail.csv"  # its folder would have to be a file that exists
    assert main(["fedscale-trace", "behave", str(trace), str(dest), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: {dest}:") and "Traceback" not in err
    assert blocker.read_text() == "kept"
    folder = tmp_path / "a-folder"
    (folder / "inside").mkdir(parents=True)
    assert main(["fedscale-trace", "behave", str(trace), str(folder), "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {folder}: cannot write the output file")
    assert (folder / "inside").is_dir() and not list(tmp_path.glob(".a-folder.*"))  # nothing lost, no leftovers
