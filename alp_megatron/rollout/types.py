"""What rollout produces and what the RL loop needs from a rollout engine.

A rollout's answer from the engine is a :class:`Completion`; the sampler turns it into the
:class:`~alp_megatron.sample.Sample` record that every later stage reads (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from alp_megatron.sample import Sample, WeightSpan

FINISH_REASONS = ("stop", "length", "abort")
__all__ = ["Completion", "FINISH_REASONS", "RolloutBatch", "RolloutEngine", "Sample", "SamplingConfig", "WeightSpan"]


@dataclass(frozen=True)
class Completion:
    """One validated answer of ``/generate``: ``len(output_ids) == len(output_logprobs)`` always holds.

    ``output_logprobs`` is empty when logprobs were not requested. ``finish_reason`` is ``stop``,
    ``length`` or ``abort``; ``weight_spans`` cover every output token, in order. ``routed_experts``, when
    asked for: row ``i`` holds, for every decoder layer, the experts the engine routed token
    ``routes_start + i`` of prompt + output to (the last output token was never an input: it has no row).
    """

    rid: str
    url: str
    output_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    finish_reason: str
    weight_version: str
    weight_spans: tuple[WeightSpan, ...]
    prompt_tokens: int
    matched_stop: Optional[object] = None
    routed_experts: Optional[Any] = None  # int32 ndarray [prompt + output - 1 - routes_start, layers, top_k]
    routes_start: int = 0

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of a rollout: ``n`` responses per prompt, at most ``max_new_tokens`` each.

    ``seed``: when set, response ``i`` of group ``g`` is sampled with its own seed derived from
    (seed, g, i), so a rollout is reproducible whatever the batching (SGLang honours request seeds under
    deterministic inference on GPU, and on CPU through the seeded-sampling stand-in in ``patches/``).
    """

    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None

    def sample_seed(self, group_id: int, index: int) -> Optional[int]:
        """The sampling seed of response ``index`` of group ``group_id`` (None without ``seed``)."""
        if self.seed is None:
            return None
        return (self.seed * 1_000_003 + group_id * 4099 + index) % 2**62

    def __post_init__(self):
        from alp_megatron.errors import ConfigError

        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError("sampling.n", f"{self.n!r} is not a positive integer", "use the group size, e.g. 8")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError("sampling.max_new_tokens", f"{self.max_new_tokens!r} is not a positive integer",
                              "use the longest response length, e.g. 1024")
        if self.temperature < 0:
            raise ConfigError("sampling.temperature", f"{self.temperature!r} is negative",
                              "use 1.0 for RL rollouts, 0 for greedy")
        if not 0 < self.top_p <= 1:
            raise ConfigError("sampling.top_p", f"{self.top_p!r} is not in (0, 1]", "use 1.0 for RL rollouts")
        if self.top_k == 0 or self.top_k < -1:
            raise ConfigError("sampling.top_k", f"{self.top_k!r} is invalid", "use -1 (off) or a positive integer")

    def sglang_params(self) -> dict:
        """These settings as SGLang ``sampling_params`` for one response."""
        params = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
        }
        if self.stop_token_ids:
            params["stop_token_ids"] = list(self.stop_token_ids)
        return params


@dataclass
class RolloutBatch:
    """The samples of one rollout, by group. ``samples`` holds every sample produced, aborted ones included;
    only :meth:`complete_groups` may go to training."""

    samples: list[Sample]
    group_size: int
    group_ids: list[int]

    def groups(self) -> dict[int, list[Sample]]:
        """Every group id of the rollout -> its samples ordered by ``sample_index`` (may be short)."""
        by_group: dict[int, list[Sample]] = {group_id: [] for group_id in self.group_ids}
        for sample in self.samples:
            by_group.setdefault(sample.group_id, []).append(sample)
        return {gid: sorted(group, key=lambda s: s.sample_index) for gid, group in by_group.items()}

    def complete_groups(self) -> list[list[Sample]]:
        """The groups with all ``group_size`` samples complete (none aborted), in group-id order of the rollout."""
        groups = self.groups()
        return [groups[gid] for gid in self.group_ids
                if len(groups[gid]) == self.group_size and all(s.is_complete for s in groups[gid])]

    def aborted(self) -> list[Sample]:
        """Partial samples whose generation was aborted."""
        return [s for s in self.samples if s.aborted]

    def num_tokens(self) -> int:
        return sum(len(s.response_ids) for s in self.samples)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the RL loop needs from rollout: groups of samples, and generation stopped around weight updates.

    Weight updates themselves go to each worker (``worker_urls``) through ``EngineControl`` / the bridge.
    """

    worker_urls: tuple[str, ...]

    async def rollout(self, prompts: Sequence, group_ids: Optional[Sequence[int]] = None
                      ) -> RolloutBatch:
        """``n`` samples for each prompt (a group per prompt). A prompt is its token ids, or a data record
        with ``prompt_ids`` (a :class:`~alp_megatron.data.prompts.Prompt`), which its samples then carry."""
        ...

    async def pause(self, mode: str = "abort") -> None:
        """Stop generation on every worker (``abort``, ``retract`` or ``in_place``)."""
        ...

    async def resume(self) -> None:
        """Continue generation on every worker after :meth:`pause`."""
        ...

    async def abort(self) -> None:
        """End the running rollout: its requests return as aborted partial samples."""
        ...

    async def flush_cache(self) -> None:
        """Drop every worker's prefix cache."""
        ...
