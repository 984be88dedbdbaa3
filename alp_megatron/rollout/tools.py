"""What a multi-turn rollout calls, and how it finds the calls in a model's turn.

A :class:`Tool` runs one call's payload and says what came of it (:class:`ToolResult`); a :class:`TurnFormat`
is the conversation convention: the stop strings that end a generation step, whether a step stopped inside a
call (then the same turn goes on), what the turn asks for (:class:`Action`: a tool call, a final answer, or
neither: a void turn), and the text the tool's result is shown to the model as (appended as tokens of its
own, never merged with the model's). Both are named in the config by a built-in name or a Python path
"package.module:attribute" (a class or a factory called with no arguments, or an instance), like custom
rewards: :func:`load_tool`, :func:`load_format`.

Built in: the ``python`` tool (the payload runs in :class:`~alp_megatron.rollout.sandbox.Sandbox`) and the
``simpletir`` format of SimpleTIR and the ALP authors' multi-turn scripts (``recipe/simpletir/agent_utils.py``):
code in a Markdown fence (```` ```python ````, ```` ```py ```` or bare), the first block of a turn runs,
its result comes back as ``"\\nCode execution result: <output>\\n"``, a ``\\boxed{`` in the turn is the final
answer. Where we differ: a turn stops at the fence that closes its first code block (SimpleTIR generates on to
the end of the turn and cuts the text after the block, re-tokenizing it); a turn with both an answer and
code ends with the answer, without running the code (the trajectory never ends on tool tokens).
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from alp_megatron.errors import ConfigError
from alp_megatron.plugins import import_object
from alp_megatron.rollout.sandbox import Sandbox, SandboxConfig

TOOL_STATUSES = ("ok", "error", "timeout", "output_limit", "sandbox_error", "tool_error")


@dataclass(frozen=True)
class ToolResult:
    """``output``: what the call printed or returned; ``error``: the error text shown to the model ('' when
    none); ``status``: ``ok``, or why not (:data:`TOOL_STATUSES`; ``tool_error``: the tool itself raised);
    ``seconds``: wall time of the call."""

    output: str
    error: str = ""
    status: str = "ok"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@runtime_checkable
class Tool(Protocol):
    """One tool: ``await tool(payload)`` runs a call (never blocking the event loop) and returns what came of
    it; it may raise (the agent reports a ``tool_error`` and goes on)."""

    name: str

    async def __call__(self, payload: str) -> ToolResult: ...


@dataclass(frozen=True)
class Action:
    """What a model's turn asks for: ``tool`` (``payload``: the call, e.g. the code), ``answer`` (the turn
    gives its final answer) or ``void`` (neither)."""

    kind: Literal["tool", "answer", "void"]
    payload: str = ""


@runtime_checkable
class TurnFormat(Protocol):
    """The conversation convention of a multi-turn rollout (see the module docstring)."""

    name: str
    stop: tuple[str, ...]  # strings that end a generation step (kept in the output, as SGLang keeps them)

    def inside_call(self, turn_text: str) -> bool:
        """True if a step that stopped here stopped inside a call (the turn goes on)."""

    def action(self, turn_text: str) -> Action:
        """What the finished turn asks for."""

    def observation(self, result: ToolResult) -> str:
        """The text appended after the turn, showing the model ``result``."""


class PythonTool:
    """Runs the payload as a Python program in a :class:`Sandbox`; the output is its stdout, the error the
    last line of its stderr (the exception), as SimpleTIR shows them."""

    name = "python"

    def __init__(self, config: SandboxConfig = SandboxConfig(), prelude: str = ""):
        self.sandbox = Sandbox(config)
        self.prelude = prelude  # code run before every payload (e.g. helper functions the prompt promises)

    async def __call__(self, payload: str) -> ToolResult:
        result = await self.sandbox.run(self.prelude + payload)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        error = "" if result.ok else (lines[-1] if lines else {"timeout": "interpreter timeout",
                                                                "output_limit": "output limit exceeded"}.get(
                                                                    result.status, result.status))
        return ToolResult(result.stdout, error, result.status, result.wall_s)


_FENCE = "```"
_CODE = re.compile(r"```(?:py|python)?\n(.*?)\n```", re.DOTALL)
_TRUNCATED = "\n..._This content has been truncated to stay below {} characters_...\n"


class SimpleTIRFormat:
    """SimpleTIR's convention (see the module docstring); ``max_chars``: an output longer than this keeps its
    first and last halves around a marker (SimpleTIR: 512)."""

    name = "simpletir"
    stop = (_FENCE,)

    def __init__(self, max_chars: int = 512):
        self.max_chars = max_chars

    def inside_call(self, turn_text: str) -> bool:
        return turn_text.count(_FENCE) % 2 == 1 and "\\boxed{" not in turn_text

    def action(self, turn_text: str) -> Action:
        if "\\boxed{" in turn_text:
            return Action("answer")
        block = _CODE.search(turn_text)
        return Action("tool", block.group(1)) if block else Action("void")

    def observation(self, result: ToolResult) -> str:
        if result.error:
            shown = result.error
        elif result.output:
            shown = result.output
        else:
            shown = "" if result.ok else "interpreter timeout"
        if len(shown) > self.max_chars:
            half = self.max_chars // 2
            shown = shown[:half] + _TRUNCATED.format(self.max_chars) + shown[-half:]
        return f"\nCode execution result: {shown}\n"


BUILTIN_TOOLS = {"python": PythonTool}
BUILTIN_FORMATS = {"simpletir": SimpleTIRFormat}


def load_tool(spec: str, sandbox: SandboxConfig = SandboxConfig(), field: str = "rollout.agent.tool") -> Tool:
    """The tool ``spec`` names: ``python`` (run in a sandbox with ``sandbox``'s limits) or a Python path."""
    if spec == "python":
        return PythonTool(sandbox)
    return _load(spec, field, "tool", BUILTIN_TOOLS, Tool, ("name", "__call__"))


def load_format(spec: str, field: str = "rollout.agent.format") -> TurnFormat:
    """The turn format ``spec`` names: ``simpletir`` or a Python path."""
    if spec in BUILTIN_FORMATS:
        return BUILTIN_FORMATS[spec]()
    return _load(spec, field, "turn format", BUILTIN_FORMATS, TurnFormat,
                 ("name", "stop", "inside_call", "action", "observation"))


def _load(spec: Any, field: str, kind: str, builtins: dict, protocol: type, members: tuple) -> Any:
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(field, f"must be a non-empty string, got {spec!r}",
                          f"use one of {sorted(builtins)} or 'package.module:attribute'")
    target = import_object(spec.strip(), field, kind, builtins)
    if inspect.isclass(target) or (inspect.isfunction(target) and not inspect.iscoroutinefunction(target)):
        try:
            target = target()
        except Exception as error:
            raise ConfigError(field, f"{spec!r} raised {type(error).__name__}: {error} when called with no "
                              "arguments", f"make it a class or factory that builds the {kind} alone") from error
    missing = [member for member in members if not hasattr(target, member)]
    if missing:
        raise ConfigError(field, f"{spec!r} gave a {type(target).__name__}, which lacks {missing} of a {kind}",
                          f"implement the {protocol.__name__} protocol of alp_megatron.rollout.tools")
    if kind == "tool" and not inspect.iscoroutinefunction(type(target).__call__):
        raise ConfigError(field, f"{spec!r}: its __call__ is not async (a tool must never block the rollout's "
                          "event loop)", "define it as `async def __call__(self, payload) -> ToolResult`")
    return target


async def call_tool(tool: Tool, payload: str) -> ToolResult:
    """``tool(payload)``, with a tool that raises or returns something else reported as a ``tool_error``."""
    start = time.perf_counter()
    try:
        result = await tool(payload)
    except Exception as error:  # a user's tool: its failure is the trajectory's observation, not the run's end
        return ToolResult("", f"{type(error).__name__}: {error}", "tool_error", time.perf_counter() - start)
    if not isinstance(result, ToolResult):
        return ToolResult("", f"the tool returned {type(result).__name__}, not a ToolResult", "tool_error",
                          time.perf_counter() - start)
    return result
