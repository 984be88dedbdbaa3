"""Tests of alp_megatron/rewards/base.py: loading reward functions by name or path, and checking their values."""

import asyncio
import math

import numpy as np
import pytest

from alp_megatron.errors import ConfigError
from alp_megatron.rewards.base import (
    BUILTIN_REWARDS,
    RewardError,
    RewardFunction,
    compute_reward,
    compute_reward_async,
    load_reward_function,
)
from alp_megatron.rewards.math_verifier import MathVerifier
from alp_megatron.rewards.toy_tasks import exact_match_reward, positional_match_reward

CUSTOM_MODULE = """
import types

CONSTANT = 3


def length_reward(prompt_text, response_text, label, metadata):
    return float(len(response_text)) * metadata.get("scale", 1.0)


def two_args(prompt_text, response_text):
    return 0.0


def returns_text(prompt_text, response_text, label, metadata):
    return "1.0"


async def remote_reward(prompt_text, response_text, label, metadata):
    return 0.25


class Scorer:
    def __call__(self, prompt_text, response_text, label, metadata):
        return 1.0 if response_text == label else 0.0


SCORER = Scorer()
holder = types.SimpleNamespace(fn=length_reward)
"""


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path holding rewards_custom_mod, rewards_broken_dep and rewards_raises_on_import."""
    (tmp_path / "rewards_custom_mod.py").write_text(CUSTOM_MODULE)
    (tmp_path / "rewards_broken_dep.py").write_text("import a_dependency_that_is_not_installed_xyz\n")
    (tmp_path / "rewards_raises_on_import.py").write_text("raise RuntimeError('bad module state')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("rewards_custom_mod", "rewards_broken_dep", "rewards_raises_on_import"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    return tmp_path


def load_error(spec):
    with pytest.raises(ConfigError) as info:
        load_reward_function(spec)
    assert info.value.field == "reward.function"
    return str(info.value)


def test_loads_a_function_by_path(module_dir):
    fn = load_reward_function("rewards_custom_mod:length_reward")
    assert isinstance(fn, RewardFunction)
    assert compute_reward(fn, "p", "abcd", None, {"scale": 0.5}) == 2.0


def test_loads_a_callable_instance_and_a_dotted_attribute(module_dir):
    scorer = load_reward_function("rewards_custom_mod:SCORER")
    assert compute_reward(scorer, "p", "yes", "yes", {}) == 1.0
    nested = load_reward_function(" rewards_custom_mod:holder.fn ")
    assert compute_reward(nested, "p", "abc", None, {}) == 3.0


def test_builtin_names():
    assert load_reward_function("exact_match") is exact_match_reward
    assert load_reward_function("positional_match") is positional_match_reward
    assert isinstance(load_reward_function("math"), MathVerifier)
    assert sorted(BUILTIN_REWARDS) == ["boxed_match", "exact_match", "math", "positional_match"]


def test_neither_a_builtin_nor_a_path():
    message = load_error("my_reward")
    assert "'my_reward'" in message and "package.module:function" in message
    assert "exact_match" in message and "math" in message  # the built-in choices are listed


@pytest.mark.parametrize("spec", ["mod:", ":fn", "a:b:c"])
def test_malformed_paths(spec):
    assert repr(spec) in load_error(spec)


@pytest.mark.parametrize("spec", ["", "   ", None, 3])
def test_empty_or_non_string_spec(spec):
    assert "non-empty string" in load_error(spec)


def test_module_not_found(module_dir):
    message = load_error("no_such_package_xyz.rewards:score")
    assert "'no_such_package_xyz.rewards:score'" in message and "was not found" in message
    assert "no module named 'no_such_package_xyz'" in message


def test_module_found_but_its_dependency_missing(module_dir):
    message = load_error("rewards_broken_dep:score")
    assert "rewards_broken_dep" in message and "importing it failed" in message
    assert "a_dependency_that_is_not_installed_xyz" in message


def test_module_raising_on_import(module_dir):
    message = load_error("rewards_raises_on_import:score")
    assert "RuntimeError: bad module state" in message


def test_attribute_missing_lists_what_is_there(module_dir):
    message = load_error("rewards_custom_mod:lenght_reward")
    assert "has no attribute 'lenght_reward'" in message and "'rewards_custom_mod:lenght_reward'" in message
    assert "length_reward" in message  # the near miss is among the listed callables


def test_nested_attribute_missing_names_the_part(module_dir):
    assert "'rewards_custom_mod:holder' has no attribute 'gn'" in load_error("rewards_custom_mod:holder.gn")


def test_not_callable(module_dir):
    message = load_error("rewards_custom_mod:CONSTANT")
    assert "'rewards_custom_mod:CONSTANT' is an object of type int, which is not callable" in message


def test_a_class_is_refused(module_dir):
    assert "is a class" in load_error("rewards_custom_mod:Scorer")


def test_wrong_signature(module_dir):
    message = load_error("rewards_custom_mod:two_args")
    assert "(prompt_text, response_text)" in message and "four arguments" in message


@pytest.mark.parametrize("value", [None, "1.0", True, math.nan, math.inf, [1.0]])
def test_bad_reward_values_name_the_function(value):
    def bad_reward(prompt_text, response_text, label, metadata):
        return value

    with pytest.raises(RewardError, match="bad_reward returned") as info:
        compute_reward(bad_reward, "p", "r", None, {})
    assert "finite number" in str(info.value)


def test_numpy_values_are_accepted():
    assert compute_reward(lambda *args: np.float32(0.5), "p", "r", None, {}) == 0.5
    assert compute_reward(lambda *args: 1, "p", "r", None, {}) == 1.0


def test_async_rewards(module_dir):
    fn = load_reward_function("rewards_custom_mod:remote_reward")
    with pytest.raises(RewardError, match="asynchronous.*compute_reward_async"):
        compute_reward(fn, "p", "r", None, {})
    assert asyncio.run(compute_reward_async(fn, "p", "r", None, {})) == 0.25
    assert asyncio.run(compute_reward_async(exact_match_reward, "p", "7<eos>", "7", {})) == 1.0
    bad = load_reward_function("rewards_custom_mod:returns_text")
    with pytest.raises(RewardError, match="returns_text returned '1.0'"):
        asyncio.run(compute_reward_async(bad, "p", "r", None, {}))
