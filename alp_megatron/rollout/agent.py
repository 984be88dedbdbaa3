"""Multi-turn rollouts with tools, token in and token out.

A trajectory starts from the prompt's token ids (rendered once, by the data pipeline) and alternates model
turns and tool calls. Every step sends the whole context's token ids to ``/generate`` (stateless; every step of
a trajectory goes to the server of its first step while that server is up, so its prefix cache holds the
context) and appends the engine's output ids and logprobs exactly as they came, with loss mask 1 (the stop or
EOS token included). The tool's result is rendered by the turn format as a string, tokenized alone
(``add_special_tokens=False``), cut to ``observation_tokens`` and appended with loss mask 0 and logprob 0. Model
text is decoded only to read it (find the call, the answer); it is never re-encoded, so the trainer scores
exactly the tokens the engine sampled.

A turn is one or more generation steps: a step that stopped inside a call (at a code block's opening fence)
goes on in the next step. A trajectory ends when a turn gives the answer (``complete``), is void (neither a
call nor an answer: ``void``), ends with EOS (unless ``sampling.ignore_eos``: the engine does not stop at EOS
then, and may return a stop string followed by EOS), or when ``max_turns`` turns have run or the tokens run out
(``truncated``); it never ends on tool tokens (an observation that does not fit, with one more model token
after it, ends the trajectory before it). Void trajectories are masked from the policy loss (``mask_void``; they
still count in their group's advantage), truncated ones optionally (``mask_truncated``).

Weight updates: a step aborted by a pause is continued after it, and each step's tokens keep the weight
versions that produced them (:class:`~alp_megatron.sample.WeightSpan`, relative to the response; tool tokens
are in no span). MoE routes: each step asks for routes from the first token the trajectory has none for
(the last model token of the previous step; tool tokens get theirs with the next step), so nothing is resent.
A server that dies mid-trajectory: the client resends the step, with the whole context, to another server; the
trajectory goes on from its token ids (nothing is regenerated).

Cost: per trajectory, ``steps`` requests each carrying the whole context (ids as JSON, about 6 bytes a token:
a 32k-token trajectory of 10 steps sends about 2 MB); the prefix cache spares the server recomputing it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional


from alp_megatron.errors import ConfigError
from alp_megatron.rollout.client import RolloutClient
from alp_megatron.rollout.sampler import RolloutError, append_completion, with_filler_rows
from alp_megatron.rollout.sandbox import SandboxConfig
from alp_megatron.rollout.tools import Tool, TurnFormat, call_tool, load_format, load_tool
from alp_megatron.rollout.types import Sample, SamplingConfig
from alp_megatron.sample import ROUTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Multi-turn settings (``rollout.agent``): the ``tool`` and turn ``format`` (built-in names or
    "package.module:attribute"), ``max_turns`` model turns at most, ``max_turn_tokens`` per turn (None: what is
    left of ``sampling.max_new_tokens``, the budget of the whole response, tool tokens included),
    ``max_context_tokens`` for prompt and trajectory together (None: the served model's context,
    ``max_position_embeddings``; no step asks for more than is left of it), ``observation_tokens`` per tool
    result, ``mask_void`` / ``mask_truncated`` (take those trajectories out of the policy loss),
    ``max_steps_per_turn`` (generation steps in one turn), the ``sandbox`` of the python tool. Defaults:
    SimpleTIR's training settings (5 turns, 256-token observations, void turns masked)."""

    tool: str = "python"
    format: str = "simpletir"
    max_turns: int = 5
    max_turn_tokens: Optional[int] = None
    max_context_tokens: Optional[int] = None
    observation_tokens: int = 256
    mask_void: bool = True
    mask_truncated: bool = False
    max_steps_per_turn: int = 8
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        if isinstance(self.sandbox, dict):
            object.__setattr__(self, "sandbox", SandboxConfig(**self.sandbox))
        for name in ("max_turns", "observation_tokens", "max_steps_per_turn"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"rollout.agent.{name}", f"{value!r} is not a positive integer",
                                  {"max_turns": "use e.g. 5 (SimpleTIR trains with 5, evaluates with 10)",
                                   "observation_tokens": "use e.g. 256 (SimpleTIR)",
                                   "max_steps_per_turn": "use e.g. 8"}[name])
        if self.max_turn_tokens is not None and (not isinstance(self.max_turn_tokens, int)
                                                 or self.max_turn_tokens < 1):
            raise ConfigError("rollout.agent.max_turn_tokens", f"{self.max_turn_tokens!r} is not a positive integer",
                              "give the most tokens one turn may generate, or null for the whole budget")
        if self.max_context_tokens is not None and (not isinstance(self.max_context_tokens, int)
                                                    or self.max_context_tokens < 2):
            raise ConfigError("rollout.agent.max_context_tokens", f"{self.max_context_tokens!r} is not an integer "
                              ">= 2", "give the served model's context length, or null to read it from the model")


class Agent:
    """Runs trajectories (see the module docstring) with one tool and one turn format; ``tokenizer``: the
    served model's (decodes model turns, encodes observations)."""

    def __init__(self, config: AgentConfig, tokenizer: Any, tool: Optional[Tool] = None,
                 turn_format: Optional[TurnFormat] = None, context_tokens: Optional[int] = None):
        self.config = config
        self.context = config.max_context_tokens or context_tokens  # None: no limit known
        self.tokenizer = tokenizer
        self.tool = tool if tool is not None else load_tool(config.tool, config.sandbox, "rollout.agent.tool")
        self.format = turn_format if turn_format is not None else load_format(config.format, "rollout.agent.format")
        self.eos = {tokenizer.eos_token_id} - {None}

    async def trajectory(self, client: RolloutClient, prompt_ids: list[int], sampling: SamplingConfig,
                         group_id: int, index: int, stopped: Callable[[], bool] = lambda: False) -> Sample:
        """One trajectory from ``prompt_ids``; ``stopped()`` true: end it now, as an aborted sample."""
        config, budget = self.config, sampling.max_new_tokens
        if self.context is not None and len(prompt_ids) >= self.context:
            raise RolloutError(f"group {group_id}: a prompt of {len(prompt_ids)} tokens leaves no room in the context "
                               f"of {self.context} tokens (rollout.agent.max_context_tokens, or the model's "
                               "max_position_embeddings); lower data.max_prompt_tokens below it")
        seed = sampling.sample_seed(group_id, index)
        base = {**sampling.sglang_params(), "stop": list(self.format.stop)}
        if seed is not None:
            base["sampling_seed"] = seed
        sample = Sample(prompt_ids=list(prompt_ids), response_ids=[], rollout_logprobs=[], finish_reason="stop",
                        weight_version="", weight_versions=[], group_id=group_id, sample_index=index)
        stats = {"turns": 0, "tool_calls": 0, "tool_errors": 0, "tool_timeouts": 0, "tool_seconds": 0.0,
                 "tool_tokens": 0, "steps": 0, "servers": []}
        server: Optional[str] = None
        routed = 0  # tokens of prompt + response whose routes the engine has returned
        ending = "truncated"
        while stats["turns"] < config.max_turns:
            turn_start = len(sample.response_ids)
            stats["turns"] += 1
            for _ in range(config.max_steps_per_turn):
                left = budget - len(sample.response_ids)
                if config.max_turn_tokens is not None:
                    left = min(left, config.max_turn_tokens - (len(sample.response_ids) - turn_start))
                if self.context is not None:  # the server refuses a request past its context
                    left = min(left, self.context - sample.length)
                if left < 1 or stopped():
                    break
                rid = client.new_rid(f"g{group_id}-s{index}-t{stats['turns']}-{len(sample.response_ids)}")
                more = await client.generate(sample.prompt_ids + sample.response_ids,
                                             {**base, "max_new_tokens": left}, rid=rid, routes_start=routed,
                                             prefer=server)
                server = more.url
                stats["steps"] += 1
                if server not in stats["servers"]:  # more than one: a server died mid-trajectory
                    stats["servers"].append(server)
                sample = append_completion(sample, more)
                routed = sample.length - 1
                if more.aborted:  # paused for a weight update: the same step goes on after it (or ends)
                    continue
                stopped_at_string = more.finish_reason == "stop" and isinstance(more.matched_stop, str)
                text = self.tokenizer.decode(sample.response_ids[turn_start:])
                if not (stopped_at_string and self.format.inside_call(text)):
                    break
            if sample.aborted or stopped():
                return _finish(replace(sample, aborted=True, finish_reason="abort"), "aborted", stats, config)
            text = self.tokenizer.decode(sample.response_ids[turn_start:])
            action = self.format.action(text)
            ended_by_eos = (not sampling.ignore_eos and sample.response_ids[-1:]
                            and sample.response_ids[-1] in self.eos)
            if action.kind == "answer":
                ending = "complete"
                break
            if action.kind == "void" or ended_by_eos:
                ending = "void" if action.kind == "void" else "complete"
                break
            if sample.finish_reason == "length" or len(sample.response_ids) >= budget:
                break  # the call was cut off: truncated
            if stats["turns"] >= config.max_turns:
                break  # no turn left to read the result: truncated, without the tool tokens
            stats["tool_calls"] += 1
            result = await call_tool(self.tool, action.payload)
            stats["tool_seconds"] += result.seconds
            stats["tool_errors"] += not result.ok
            stats["tool_timeouts"] += result.status == "timeout"
            shown = self.tokenizer.encode(self.format.observation(result), add_special_tokens=False)
            shown = list(shown)[: config.observation_tokens]
            if (len(sample.response_ids) + len(shown) + 1 > budget
                    or (self.context is not None and sample.length + len(shown) + 1 > self.context)):
                break  # no room for a model token after it: truncated before the tool tokens
            sample = _append_tool(sample, shown)
            stats["tool_tokens"] += len(shown)
        return _finish(sample, ending, stats, config)

    async def group(self, client: RolloutClient, prompt_ids: list[int], sampling: SamplingConfig, group_id: int,
                    stopped: Callable[[], bool] = lambda: False) -> list[Sample]:
        """The ``sampling.n`` trajectories of one group, concurrently."""
        return list(await asyncio.gather(*(self.trajectory(client, prompt_ids, sampling, group_id, index, stopped)
                                           for index in range(sampling.n))))


def _append_tool(sample: Sample, ids: list[int]) -> Sample:
    """``sample`` followed by tool tokens: loss mask 0, logprob 0, in no weight span; routes get filler rows
    (the next step's routes replace them)."""
    extras = dict(sample.extras)
    if ROUTES in extras:
        extras[ROUTES] = with_filler_rows(extras[ROUTES], len(ids))
    return replace(sample, response_ids=sample.response_ids + list(ids),
                   rollout_logprobs=sample.rollout_logprobs + [0.0] * len(ids),
                   loss_mask=sample.loss_mask + [0] * len(ids), extras=extras)


def _finish(sample: Sample, ending: str, stats: dict, config: AgentConfig) -> Sample:
    """Record how the trajectory ended and what it did (``metadata['agent']``), masked as configured."""
    model_tokens = sum(sample.loss_mask)
    masked = (ending == "void" and config.mask_void) or (ending == "truncated" and config.mask_truncated)
    metadata = {**sample.metadata, "agent": {**stats, "ending": ending, "model_tokens": model_tokens,
                                             "masked": masked}}
    finish = {"complete": "stop", "void": "stop", "truncated": "length", "aborted": "abort"}[ending]
    loss_mask = [0] * len(sample.loss_mask) if masked else sample.loss_mask
    return replace(sample, metadata=metadata, finish_reason=finish, loss_mask=loss_mask)




def trajectory_metrics(samples: list[Sample]) -> dict:
    """Per-step metrics of multi-turn samples (empty for single-turn ones): turns and tool calls per trajectory,
    the shares of tool calls that failed or timed out, the shares of void, truncated and loss-masked
    trajectories, tool seconds per trajectory, and model and tool tokens per trajectory."""
    stats = [sample.metadata["agent"] for sample in samples if "agent" in sample.metadata]
    if not stats:
        return {}
    count, calls = len(stats), sum(s["tool_calls"] for s in stats)

    def mean(key: str) -> float:
        return sum(s[key] for s in stats) / count

    return {
        "agent_turns_mean": mean("turns"),
        "agent_tool_calls_mean": mean("tool_calls"),
        "agent_tool_error_share": sum(s["tool_errors"] for s in stats) / max(calls, 1),
        "agent_tool_timeout_share": sum(s["tool_timeouts"] for s in stats) / max(calls, 1),
        "agent_void_share": sum(s["ending"] == "void" for s in stats) / count,
        "agent_truncated_share": sum(s["ending"] == "truncated" for s in stats) / count,
        "agent_masked_share": sum(s["masked"] for s in stats) / count,
        "agent_tool_seconds_mean": mean("tool_seconds"),
        "agent_model_tokens_mean": mean("model_tokens"),
        "agent_tool_tokens_mean": mean("tool_tokens"),
    }
