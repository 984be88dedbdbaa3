"""The reward-function interface, and how a configured reward is found: a built-in name or "pkg.mod:fn".

A reward function scores one response::

    reward = fn(prompt_text, response_text, label, metadata)

- ``prompt_text``: the prompt as the model saw it (after the chat template, if one was applied).
- ``response_text``: the decoded response. Decode only the tokens up to and including the first end-of-sequence
  token; whether that token itself appears in the text depends on ``skip_special_tokens`` and each built-in
  reward says which form it accepts.
- ``label``: the row's answer field (``data.label_field``) as stored in the dataset: any JSON value.
- ``metadata``: the row's other fields (read only).

It returns a finite float. It is called in the process that gathers rollouts, once per response. A plain function
is the normal case; an ``async def`` function is accepted too and awaited by :func:`compute_reward_async` (use it
for rewards that call a remote service). Call rewards through :func:`compute_reward` / :func:`compute_reward_async`,
which check the returned value and name the function when it is wrong.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Awaitable, Callable, Dict, Mapping, Protocol, Union, runtime_checkable

from alp_megatron.errors import AlpError, ConfigError
from alp_megatron.plugins import import_object


class RewardError(AlpError, ValueError):
    """A reward could not be computed for a sample (bad label, bad return value, missing library)."""


@runtime_checkable
class RewardFunction(Protocol):
    """Scores one response; see the module docstring for the meaning of each argument."""

    def __call__(self, prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]) -> float: ...


@runtime_checkable
class AsyncRewardFunction(Protocol):
    """The same as :class:`RewardFunction`, for rewards that must wait on I/O."""

    def __call__(
        self, prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]
    ) -> Awaitable[float]: ...


AnyRewardFunction = Union[RewardFunction, AsyncRewardFunction]


def _make_math_verifier() -> RewardFunction:
    from alp_megatron.rewards.math_verifier import MathVerifier

    return MathVerifier()


def _import_toy(name: str) -> Callable[[], RewardFunction]:
    def make() -> RewardFunction:
        from alp_megatron.rewards import toy_tasks

        return getattr(toy_tasks, name)

    return make


# Built-in rewards by name: each entry makes the function, so a reward's optional library is needed only when chosen.
BUILTIN_REWARDS: Dict[str, Callable[[], AnyRewardFunction]] = {
    "math": _make_math_verifier,
    "exact_match": _import_toy("exact_match_reward"),
    "positional_match": _import_toy("positional_match_reward"),
    "boxed_match": _import_toy("boxed_match_reward"),
}


def reward_function_name(fn: Any) -> str:
    """A readable name of ``fn`` for error messages: ``module.qualname`` or the type of a callable object."""
    target = fn if (inspect.isfunction(fn) or inspect.ismethod(fn)) else type(fn)
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", repr(target))
    return f"{module}.{qualname}" if module else qualname


def _check_signature(fn: Any, spec: str, field: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no signature to inspect; the first call will tell
    try:
        signature.bind("prompt", "response", None, {})
    except TypeError as error:
        raise ConfigError(
            field,
            f"{spec!r} has the signature {signature}, which cannot be called with four arguments ({error})",
            "define it as fn(prompt_text, response_text, label, metadata) -> float",
        ) from None


def load_reward_function(spec: str, field: str = "reward.function") -> AnyRewardFunction:
    """The reward function named by ``spec``: a key of :data:`BUILTIN_REWARDS` or "package.module:attribute".

    ``attribute`` may be dotted ("pkg.mod:Scorer.score") and must be a function or a callable instance (not a
    class) that accepts ``(prompt_text, response_text, label, metadata)``. Every problem is a
    :class:`ConfigError` on ``field`` that names the path and what is wrong.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(
            field,
            f"must be a non-empty string, got {spec!r}",
            f"use one of {sorted(BUILTIN_REWARDS)} or 'package.module:function'",
        )
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]()
    target = import_object(spec, field, "reward", BUILTIN_REWARDS)
    if inspect.isclass(target):
        raise ConfigError(
            field,
            f"{spec!r} is a class, not a reward function",
            "point at a function, or at an instance of the class created at module level",
        )
    if not callable(target):
        raise ConfigError(
            field,
            f"{spec!r} is an object of type {type(target).__name__}, which is not callable",
            "point at a function fn(prompt_text, response_text, label, metadata) -> float",
        )
    _check_signature(target, spec, field)
    return target


def check_reward_value(value: Any, fn: Any) -> float:
    """``value`` as a float, or a :class:`RewardError` naming ``fn`` when it is not a finite number.

    Python, numpy and one-element torch numbers are accepted; booleans and strings are not.
    """
    as_float = None
    if not isinstance(value, (bool, str, bytes)):
        try:
            as_float = float(value)
        except Exception:
            as_float = None
    if as_float is None or not math.isfinite(as_float):
        raise RewardError(
            f"reward function {reward_function_name(fn)} returned {value!r} ({type(value).__name__}); "
            "a reward must be a finite number. Fix: return a float"
        )
    return as_float


def compute_reward(
    fn: RewardFunction, prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]
) -> float:
    """Calls a synchronous reward function and checks its value; an ``async def`` reward is an error here."""
    value = fn(prompt_text, response_text, label, metadata)
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: close it so Python does not warn about it later
        raise RewardError(
            f"reward function {reward_function_name(fn)} is asynchronous. Fix: call it through compute_reward_async"
        )
    return check_reward_value(value, fn)


async def compute_reward_async(
    fn: AnyRewardFunction, prompt_text: str, response_text: str, label: Any, metadata: Mapping[str, Any]
) -> float:
    """Calls a reward function, awaiting it when it is asynchronous, and checks its value.

    A synchronous reward runs in the calling thread (the event loop's): the math verifier's timeouts rely on that
    thread being the main one (see :mod:`alp_megatron.rewards.math_verifier`).
    """
    value = fn(prompt_text, response_text, label, metadata)
    if inspect.isawaitable(value):
        value = await value
    return check_reward_value(value, fn)
