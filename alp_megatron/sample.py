"""The ``Sample`` record: one response to one prompt, the one shape from the engine's answer to the loss.

Built by the rollout (:mod:`alp_megatron.rollout.sampler`), filled in by scoring (:mod:`alp_megatron.run.scoring`),
turned into tensors in one place (:func:`alp_megatron.trainer.batch.build_training_batch`); it lives outside
the rollout and trainer packages so that neither imports the other.

Cost at scale: a record holds its tokens, logprobs and loss mask as Python lists (about 80 bytes a token) and
exists only on global rank 0, between rollout and the batch (512 samples of 32k tokens: about 1.3 GB there,
once); the training ranks receive tensors of 13 bytes a token. Per-token ``extras`` are tensors, kept compact by
their producer (MoE routes as small integers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

ROUTES = "routed_experts"
"""The ``Sample.extras`` key of the engine's MoE routes, ``[tokens, decoder layers, top_k]``: row ``t`` holds
the experts each layer routed token ``t`` of prompt + response to (the last token, never an input, gets
experts ``0..top_k-1``)."""

EXTRA_PREFIX = "extra."
"""A per-token extra ``name`` travels in a micro-batch dict as ``EXTRA_PREFIX + name``."""

@dataclass(frozen=True)
class WeightSpan:
    """Output tokens ``[start, end)`` of a response were generated with weights labelled ``version``."""

    version: str
    start: int
    end: int


@dataclass
class Sample:
    """One response to one prompt: the record every stage reads, from the engine's answer to the loss.

    The rollout fills the tokens and what the engine said of them: ``rollout_logprobs[i]`` is the rollout
    policy's logprob of ``response_ids[i]`` (0.0 for a token the policy did not produce), ``loss_mask[i]``
    is 1 where the policy produced ``response_ids[i]`` and 0 where it did not (a tool's output; every token
    of a single-turn response is 1); ``weight_version`` is the version that produced the last token and
    ``weight_versions`` lists every span when an update landed mid-response; ``prompt`` is the data record
    the prompt came from (its text, label and dataset row, which the reward reads), when the rollout was
    given one. ``extras`` holds per-token data of the whole sequence (``extras[name][t]`` belongs to token
    ``t`` of ``prompt_ids + response_ids``; e.g. the experts each MoE layer routed it to). Scoring then
    fills ``reward``, ``advantage`` and ``sample_id`` (global and unique in the run: it keys the ALP noise).
    :func:`alp_megatron.trainer.batch.build_training_batch` is the one place records become tensors.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: str
    weight_version: str
    weight_versions: list[WeightSpan]
    group_id: int
    sample_index: int
    aborted: bool = False
    loss_mask: Optional[list[int]] = None  # None: every response token (filled in on construction)
    reward: Optional[float] = None
    advantage: Optional[float] = None
    sample_id: Optional[int] = None
    prompt: Optional[Any] = None
    extras: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = [1] * len(self.response_ids)

    @classmethod
    def given(cls, prompt_ids, response_ids, rollout_logprobs, advantage: float, sample_id: int,
              loss_mask=None, extras: Optional[dict] = None) -> "Sample":
        """A scored record of given tokens, made outside a rollout (scoring given sequences, benchmarks, tests):
        its own group, finished by ``stop``, no weight version."""
        return cls(prompt_ids=list(prompt_ids), response_ids=list(response_ids),
                   rollout_logprobs=list(rollout_logprobs), finish_reason="stop", weight_version="",
                   weight_versions=[], group_id=sample_id, sample_index=0,
                   loss_mask=None if loss_mask is None else list(loss_mask), advantage=advantage,
                   sample_id=sample_id, extras=dict(extras or {}))

    @property
    def is_complete(self) -> bool:
        """True for a finished (stop or length) response that training may use."""
        return not self.aborted and self.finish_reason in ("stop", "length")

    @property
    def status(self) -> str:
        """``complete`` (the model stopped), ``truncated`` (it hit the token budget or, multi-turn, the turn
        limit), ``void`` (multi-turn: a turn with neither a tool call nor an answer) or ``aborted`` (partial)."""
        if self.aborted or self.finish_reason == "abort":
            return "aborted"
        if self.metadata.get("agent", {}).get("ending") == "void":
            return "void"
        return "truncated" if self.finish_reason == "length" else "complete"

    @property
    def length(self) -> int:
        """Prompt plus response tokens."""
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def is_on_single_version(self) -> bool:
        return len({span.version for span in self.weight_versions}) <= 1
