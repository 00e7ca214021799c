from pathlib import Path

import pytest

from cloudedge.config import config_from_dict, dump_config, load_config
from cloudedge.errors import InputError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    assert cfg.name == "demo" and len(cfg.fleet.edges) == 3
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again.fleet == cfg.fleet and again.data == cfg.data


def test_wrong_type_names_file_and_field(tmp_path):
    p = write(tmp_path, "seed: zero\n")
    with pytest.raises(InputError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "seed" in msg and "\n" not in msg


def test_unknown_key_is_an_error(tmp_path):
    with pytest.raises(InputError, match=r"fleet\.cloud\.gpu"):
        load_config(write(tmp_path, "fleet:\n  cloud: {profile: a100, gpu: 8}\n"))


def test_nested_field_path(tmp_path):
    text = "fleet:\n  edges:\n    - devices:\n        - {count: 0, profile: phone-mid}\n"
    with pytest.raises(InputError, match=r"fleet\.edges\.0\.devices\.0\.count"):
        load_config(write(tmp_path, text))


def test_profile_or_mix_required():
    with pytest.raises(InputError, match="exactly one of 'profile' or 'mix'"):
        config_from_dict({"fleet": {"edges": [{"devices": [{"count": 2}]}]}})


def test_unknown_profile_names_field():
    with pytest.raises(InputError, match=r"fleet\.edges\.0\.devices\.0\.profile.*nokia-3310"):
        config_from_dict({"fleet": {"edges": [{"devices": [{"count": 2, "profile": "nokia-3310"}]}]}})


def test_bad_yaml_and_missing_and_empty(tmp_path):
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(InputError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_data_source_needs_path():
    with pytest.raises(InputError, match=r"data.*needs 'path'"):
        config_from_dict({"data": {"source": "jsonl"}})


def test_stage_inherits_top_level_data():
    cfg = config_from_dict({"data": {"source": "rotated", "degrees": 30}, "pretrain": {}})
    assert cfg.stage_data("pretrain").source == "rotated"
    assert cfg.stage_model("finetune") == cfg.model


def test_empty_adapt_streams_is_refused(tmp_path):
    # Edge i streams streams[i % len(streams)]: an empty list used to divide by zero mid-run.
    with pytest.raises(InputError, match=r"c\.yaml: adapt\.streams: needs at least one stream"):
        load_config(write(tmp_path, "adapt:\n  streams: []\n"))
    assert len(load_config(write(tmp_path, "adapt:\n  streams: [{}]\n")).adapt.streams) == 1


def test_duplicate_key_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "name: x\npretrain:\n  rounds: 6\n  lr: 0.01\n  rounds: 9\n")
    with pytest.raises(InputError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: line 5: duplicate key 'rounds' (first given on line 3); give each key once"
    with pytest.raises(InputError, match=r"line 2: duplicate key 'seed' \(first given on line 1\)"):
        load_config(write(tmp_path, "seed: 0\nseed: 1\n"))
    with pytest.raises(InputError, match=r"line 1: duplicate key 'rounds'"):  # flow mappings too
        load_config(write(tmp_path, "pretrain: {rounds: 6, rounds: 9}\n"))


def test_merge_keys_may_still_be_overridden(tmp_path):
    # A key a merge (`<<`) brings in is not a duplicate of the mapping's own: overriding is its use.
    cfg = load_config(write(tmp_path, "pretrain:\n  <<: {rounds: 6, lr: 0.01}\n  rounds: 9\n"))
    assert cfg.pretrain.rounds == 9 and cfg.pretrain.lr == 0.01


@pytest.mark.parametrize(("text", "field", "flag"), [
    ("pretrain: {global_batch: true}\n", "pretrain.global_batch", "true"),
    ("seed: false\n", "seed", "false"),
    ("pretrain: {lr: yes}\n", "pretrain.lr", "true"),
    ("data: {partition: {kind: dirichlet, edge_alpha: [0.5, true]}}\n", "data.partition.edge_alpha.1", "true"),
    ("fleet: {edges: [{devices: [{count: 2, mix: {phone-mid: true}}]}]}\n",
     "fleet.edges.0.devices.0.mix.phone-mid", "true"),
    ("data: {source: glyphs, glyphs: {channels: true}}\n", "data.glyphs.channels", "true"),  # Literal[1, 3]
    ("finetune: {sync: {name: hierfavg, k1: true}}\n", "finetune.sync: k1", "true"),  # a plug-in's knob
    ("adapt: {method: {name: swapprompt, lr: false}}\n", "adapt.method: lr", "false"),
])
def test_boolean_for_a_number_is_refused(tmp_path, text, field, flag):
    p = write(tmp_path, text)
    with pytest.raises(InputError) as ei:
        load_config(p)
    assert str(ei.value) == f"{p}: {field}: expected a number, got a boolean ({flag})"


def test_boolean_fields_still_take_booleans():
    cfg = config_from_dict({"data": {"source": "glyphs", "glyphs": {"cache": False}}})
    assert cfg.data.glyphs.cache is False
    cfg = config_from_dict({"adapt": {"method": {"name": "swapprompt", "swap": False}}})  # a plug-in's bool knob
    assert cfg.adapt.method.kwargs()["swap"] is False
