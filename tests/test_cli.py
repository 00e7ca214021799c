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
