"""The plug-in registry: names with pydantic parameters, parsed from bare names or mappings."""

from __future__ import annotations

import pytest
from pydantic import Field

from cloudedge.config import config_from_dict
from cloudedge.config.base import StrictModel
from cloudedge.errors import InputError
from cloudedge.registry import Choice, Params, Registry, plugin_choice

SHAPES: Registry = Registry("shape")


class SquareParams(Params):
    side: float = Field(default=1.0, gt=0)


@SHAPES.register("square", SquareParams)
class Square:
    def __init__(self, scale: float, *, side: float) -> None:
        self.area = scale * side * side


SHAPES.add("dot", lambda scale: ("dot", scale))


class Holder(StrictModel):
    shape: plugin_choice("tests.test_registry:SHAPES") = "square"  # type: ignore[valid-type]


def test_bare_name_and_mapping_parse_to_the_same_choice() -> None:
    assert Holder(shape="square").shape == Holder(shape={"name": "square"}).shape
    c = Holder(shape={"name": "square", "side": 3}).shape
    assert isinstance(c, Choice) and c.kwargs() == {"side": 3.0}
    assert SHAPES.build(c, 2.0).area == 18.0
    assert SHAPES.build("dot", 5) == ("dot", 5)


def test_errors_name_the_key_and_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown shape 'circle' \(known: square, dot\)"):
        Holder(shape="circle")
    with pytest.raises(ValueError, match=r"sidee: not a parameter of shape 'square' \(known: side\)"):
        Holder(shape={"name": "square", "sidee": 2})
    with pytest.raises(ValueError, match=r"side: Input should be greater than 0"):
        Holder(shape={"name": "square", "side": -1})
    with pytest.raises(ValueError, match="mapping with 'name'"):
        Holder(shape={"side": 2})
    with pytest.raises(InputError, match="unknown shape 'hexagon'"):
        SHAPES.build("hexagon", 1.0)


def test_dump_round_trips_and_is_bare_at_defaults() -> None:
    assert Holder().model_dump()["shape"] == "square"
    h = Holder(shape={"name": "square", "side": 2})
    assert h.model_dump() == {"shape": {"name": "square", "side": 2.0}}
    assert Holder.model_validate(h.model_dump()) == h


def test_double_registration_of_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        SHAPES.add("square", object)


def test_config_plugins_import_a_file_relative_to_the_config(tmp_path) -> None:
    (tmp_path / "myplug.py").write_text("import tests.test_registry as t\nt.SHAPES.add('tri', lambda scale: scale)\n")
    config_from_dict({"plugins": ["myplug.py"]}, base_dir=tmp_path)
    assert "tri" in SHAPES
    with pytest.raises(InputError, match=r"plugins: nope.py: file not found"):
        config_from_dict({"plugins": ["nope.py"]}, base_dir=tmp_path)
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(InputError, match=r"plugins: broken.py: could not import \(RuntimeError: boom\)"):
        config_from_dict({"plugins": ["broken.py"]}, base_dir=tmp_path)


def test_a_registered_class_carries_the_name_it_is_registered_under():
    class Base:
        name = "base"

    class Child(Base):
        pass

    reg: Registry = Registry("thing")
    reg.add("base", Base)
    reg.add("child", Child)
    assert Child.name == "child" and Base.name == "base"


def test_the_dumped_config_of_a_run_with_a_plugin_file_loads_from_elsewhere(tmp_path):
    from cloudedge.config import dump_config, load_config

    plug = tmp_path / "cfg" / "plug2.py"
    plug.parent.mkdir()
    plug.write_text("import tests.test_registry as t\nt.SHAPES.add('pentagon', lambda scale: scale)\n")
    cfg = config_from_dict({"plugins": ["plug2.py"]}, base_dir=plug.parent)
    assert cfg.plugins == [str(plug)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    assert load_config(run_dir / "config.yaml").plugins == [str(plug)]


def test_a_config_error_names_the_bad_value_once() -> None:
    """Through a config: pydantic's messages get the value appended, ours already say it (the
    wrapper used to append it a second time: "unknown ... 'nope' (known: ...) (got 'nope')")."""
    cases = [
        ("adapt.method: lr: Input should be greater than 0 (got -1)", "-1",
         {"adapt": {"method": {"name": "tpt", "lr": -1}}}),
        ("unknown test-time method 'nope' (known: ", "'nope'", {"adapt": {"method": "nope"}}),
        ("mapping with 'name', got int 3", "3", {"pretrain": {"controller": 3}}),
        ("finetune.sync: k1: Input should be greater than or equal to 1 (got 0)", "0",
         {"finetune": {"sync": {"name": "hierfavg", "k1": 0}}}),
        ("hidden: Input should be greater than or equal to 8 (got 4)", "4", {"model": {"hidden": 4}}),
    ]
    for expected, value, raw in cases:
        with pytest.raises(InputError) as info:
            config_from_dict(raw)
        message = str(info.value)
        assert expected in message and message.count(value) == 1, message
