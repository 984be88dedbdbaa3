"""YAML + override loading into typed config trees: every key and type checked, errors name the field."""

from dataclasses import dataclass, field
from typing import Optional

import pytest

from alp_megatron.config_loading import build, load_yaml, merge, parse_overrides, to_dict
from alp_megatron.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 1
    name: Optional[str] = None
    ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("inner.steps", f"must be >= 1, got {self.steps}", "use 1 or more")


@dataclass(frozen=True)
class Outer:
    enabled: bool = True
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_dataclasses_with_conversions():
    config = build(Outer, {"enabled": False, "inner": {"lr": 1, "name": "x", "ids": [1, 2]}})
    assert config == Outer(enabled=False, inner=Inner(lr=1.0, name="x", ids=(1, 2)))
    assert isinstance(config.inner.lr, float)
    assert to_dict(config) == {"enabled": False, "inner": {"lr": 1.0, "steps": 1, "name": "x", "ids": [1, 2]}}


@pytest.mark.parametrize("data,field_name,message", [
    ({"inner": {"lr_": 1}}, "inner.lr_", "use one of: ids, lr, name, steps"),
    ({"inner": {"steps": "3"}}, "inner.steps", "expected an integer"),
    ({"inner": {"steps": 2.5}}, "inner.steps", "expected an integer"),
    ({"enabled": "yes"}, "enabled", "expected true or false"),
    ({"inner": 3}, "inner", "expected a mapping"),
    ({"inner": {"ids": [1, "a"]}}, "inner.ids[1]", "expected an integer"),
    ({"inner": {"steps": 0}}, "inner.steps", "must be >= 1"),
])
def test_errors_name_the_field(data, field_name, message):
    with pytest.raises(ConfigError) as caught:
        build(Outer, data)
    assert caught.value.field == field_name
    assert message in str(caught.value)


def test_overrides_parse_as_yaml_and_merge_over_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("enabled: true\ninner:\n  lr: 0.5\n  steps: 4\n")
    overrides = parse_overrides(["inner.lr=2e-5", "inner.ids=[3, 4]", "enabled=false"])
    assert overrides["inner"]["ids"] == [3, 4] and overrides["enabled"] is False
    config = build(Outer, merge(load_yaml(str(path)), overrides))
    assert config == Outer(enabled=False, inner=Inner(lr=2e-5, steps=4, ids=(3, 4)))


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(bad))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["inner.lr"])
    twice = tmp_path / "twice.yaml"
    twice.write_text("inner:\n  lr: 1\nname: a\ninner:\n  steps: 2\n")  # PyYAML alone keeps the last
    with pytest.raises(ConfigError, match=r"the key 'inner' is given twice\n  in .*twice.yaml\", line 4"):
        load_yaml(str(twice))


def test_a_base_file_is_laid_under_the_file(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text("enabled: false\ninner:\n  lr: 0.5\n  steps: 3\n")
    (tmp_path / "run.yaml").write_text("base: common/base.yaml\ninner:\n  steps: 7\n")
    assert load_yaml(str(tmp_path / "run.yaml")) == {"enabled": False, "inner": {"lr": 0.5, "steps": 7}}
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(str(tmp_path / "loop.yaml"))
    (tmp_path / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="base"):
        load_yaml(str(tmp_path / "bad.yaml"))
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_yaml(str(tmp_path / "missing.yaml"))
