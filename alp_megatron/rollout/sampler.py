"""Batch rollout: ``n`` samples per prompt (a group), a bounded number of groups in flight, weight versions.

Each group is one batched ``/generate`` call of ``n`` copies of its prompt (``n`` single calls when
``sampling.seed`` gives every response its own seed); the client retries a call on another server
when a server dies, so every group ends with exactly ``n`` samples. A sample that comes
back aborted because generation was paused (``pause(mode="abort")`` around a weight update) is
continued from where it stopped once generation resumes: the continuation's prompt is the prompt plus
the partial response, and the weight-version spans of both parts are joined, so the sample records
which weights produced which tokens (and, for an MoE model, the continuation asks for routes only from the
last token it did not have, so no prefix is resent). After :meth:`Sampler.abort` nothing is continued: partial samples
come back marked ``aborted`` and :meth:`RolloutBatch.complete_groups` leaves their groups out.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from alp_megatron.errors import AlpError, ConfigError
from alp_megatron.rollout.client import RolloutClient
from alp_megatron.rollout.errors import EngineError
from alp_megatron.rollout.types import Completion, RolloutBatch, Sample, SamplingConfig, WeightSpan
from alp_megatron.sample import ROUTES

if TYPE_CHECKING:
    from alp_megatron.rollout.agent import Agent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerConfig:
    """``groups_in_flight`` bounds the concurrent ``/generate`` calls (each carries ``sampling.n`` samples);
    ``continue_aborted`` continues samples aborted by a pause (not by :meth:`Sampler.abort`);
    ``restart_aborted`` generates them again from the prompt instead (``rollout.partial_rollouts: restart``)."""

    sampling: SamplingConfig = SamplingConfig()
    groups_in_flight: int = 64
    continue_aborted: bool = True
    restart_aborted: bool = False
    max_continuations: int = 8
    show_progress: bool = True

    def __post_init__(self):
        if not isinstance(self.groups_in_flight, int) or self.groups_in_flight < 1:
            raise ConfigError("sampler.groups_in_flight", f"{self.groups_in_flight!r} is not a positive integer",
                              "use e.g. 64 (a group is one /generate call of n samples)")
        if self.max_continuations < 0:
            raise ConfigError("sampler.max_continuations", f"{self.max_continuations!r} is negative", "use e.g. 8")


class RolloutError(AlpError):
    """A group could not be generated (a bad prompt, or no server answered); names the group."""


class Sampler:
    """Runs rollouts through a :class:`RolloutClient` (implements ``RolloutEngine``)."""

    def __init__(self, client: RolloutClient, config: SamplerConfig = SamplerConfig(), agent: Optional["Agent"] = None):
        self.client = client
        self.config = config
        self.agent = agent  # multi-turn: each sample is a trajectory of model turns and tool calls
        self._aborted = False

    @property
    def worker_urls(self) -> tuple[str, ...]:
        return tuple(self.client.config.control_urls)

    async def rollout(self, prompts: Sequence, group_ids: Optional[Sequence[int]] = None,
                      on_group: Optional[Callable[[list[Sample]], None]] = None) -> RolloutBatch:
        """``sampling.n`` samples for each prompt; group ``group_ids[i]`` (default ``i``) holds prompt i's.
        A prompt is its token ids, or a data record with ``prompt_ids`` that its samples carry as ``prompt``.
        ``on_group(samples)`` is called with each group as it completes (not for groups :meth:`abort` stopped).

        Raises :class:`RolloutError` naming the group if one cannot be generated (other groups are cancelled).
        """
        group_ids = list(range(len(prompts))) if group_ids is None else list(group_ids)
        if len(group_ids) != len(prompts) or len(set(group_ids)) != len(group_ids):
            raise ValueError(f"group_ids must be {len(prompts)} distinct ids, got {group_ids}")
        self._aborted = False
        n = self.config.sampling.n
        gate = asyncio.Semaphore(self.config.groups_in_flight)
        progress = tqdm(total=len(prompts) * n, desc="rollout", unit="sample", disable=not self.config.show_progress)
        results: list[list[Sample]] = []

        async def run_group(prompt, group_id: int) -> None:
            async with gate:
                if self._aborted:
                    return
                record = prompt if hasattr(prompt, "prompt_ids") else None
                try:
                    samples = await self._group(list(map(int, prompt if record is None else record.prompt_ids)),
                                                group_id)
                except RolloutError as error:  # say which dataset row: a bad prompt is fixed there
                    if record is None or getattr(record, "source", None) is None:
                        raise
                    raise RolloutError(f"{record.source}, row {record.row}: {error}") from error
                for sample in samples:
                    sample.prompt = record
            results.append(samples)
            progress.update(len(samples))
            if on_group is not None and not self._aborted:
                on_group(samples)

        tasks = [asyncio.ensure_future(run_group(prompt, gid)) for prompt, gid in zip(prompts, group_ids)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            progress.close()
        order = {gid: position for position, gid in enumerate(group_ids)}
        samples = sorted((sample for group in results for sample in group),
                         key=lambda s: (order[s.group_id], s.sample_index))
        return RolloutBatch(samples=samples, group_size=n, group_ids=group_ids)

    async def _group(self, prompt: list[int], group_id: int) -> list[Sample]:
        n = self.config.sampling.n
        params = self.config.sampling.sglang_params()
        try:
            if self.agent is not None:
                return await self.agent.group(self.client, prompt, self.config.sampling, group_id,
                                              lambda: self._aborted)
            if self.config.sampling.seed is None:
                completions = await self.client.generate_batch([prompt] * n, params, label=f"group {group_id}")
            else:
                # Each response has its own seed, and sglang-router refuses a batch with one sampling_params
                # per item (HTTP 422), so a seeded group is n single requests.
                completions = await asyncio.gather(*(
                    self.client.generate(prompt, self._seeded(params, group_id, index),
                                         rid=self.client.new_rid(f"g{group_id}-s{index}"))
                    for index in range(n)))
        except EngineError as error:
            raise RolloutError(f"group {group_id} (prompt of {len(prompt)} tokens) failed: {error}") from error
        samples = [self._sample(prompt, completion, group_id, index) for index, completion in enumerate(completions)]
        if self.config.continue_aborted:
            samples = list(await asyncio.gather(*(self._continue(sample) for sample in samples)))
        return samples

    def _seeded(self, params: dict, group_id: int, index: int) -> dict:
        seed = self.config.sampling.sample_seed(group_id, index)
        return params if seed is None else {**params, "sampling_seed": seed}

    async def _continue(self, sample: Sample) -> Sample:
        """Generate the rest of a sample aborted by a pause; return it unchanged after :meth:`abort`."""
        budget = self.config.sampling.max_new_tokens
        for _ in range(self.config.max_continuations):
            if not sample.aborted or self._aborted or len(sample.response_ids) >= budget:
                return sample
            if self.config.restart_aborted:  # drop what the old weights generated; start over on the new ones
                rid = self.client.new_rid(f"g{sample.group_id}-s{sample.sample_index}-restart")
                params = self._seeded(self.config.sampling.sglang_params(), sample.group_id, sample.sample_index)
                try:
                    again = await self.client.generate(sample.prompt_ids, params, rid=rid)
                except EngineError as error:
                    raise RolloutError(f"restarting sample {sample.sample_index} of group {sample.group_id} "
                                       f"failed: {error}") from error
                restarts = sample.metadata.get("restarts", 0) + 1
                sample = replace(self._sample(sample.prompt_ids, again, sample.group_id, sample.sample_index),
                                 prompt=sample.prompt, metadata={**sample.metadata, "restarts": restarts})
                continue
            params = self._seeded({**self.config.sampling.sglang_params(),
                                   "max_new_tokens": budget - len(sample.response_ids)},
                                  sample.group_id, sample.sample_index)  # same seed: the draws depend on position
            rid = self.client.new_rid(f"g{sample.group_id}-s{sample.sample_index}-c{len(sample.response_ids)}")
            try:
                # routes only from the last token so far: the one the partial answer never fed back in
                more = await self.client.generate(sample.prompt_ids + sample.response_ids, params, rid=rid,
                                                  routes_start=sample.length - 1)
            except EngineError as error:
                raise RolloutError(f"continuing sample {sample.sample_index} of group {sample.group_id} "
                                   f"after {len(sample.response_ids)} tokens failed: {error}") from error
            sample = append_completion(sample, more)
        return sample

    @staticmethod
    def _sample(prompt: list[int], completion: Completion, group_id: int, index: int) -> Sample:
        sample = Sample(
            prompt_ids=list(prompt),
            response_ids=list(completion.output_ids),
            rollout_logprobs=list(completion.output_logprobs),
            finish_reason=completion.finish_reason,
            weight_version=completion.weight_version,
            weight_versions=list(completion.weight_spans),
            group_id=group_id,
            sample_index=index,
            aborted=completion.aborted,
        )
        if completion.routed_experts is not None:
            sample.extras[ROUTES] = _with_last_row(torch.from_numpy(completion.routed_experts))
        return sample

    # ---------------------------------------------------------------------------------------------
    # control (RolloutEngine)

    async def pause(self, mode: str = "abort") -> None:
        """Pause every worker; with ``abort`` the running samples are continued after :meth:`resume`."""
        await self.client.pause(mode)

    async def resume(self) -> None:
        await self.client.resume()

    async def abort(self) -> None:
        """End the running rollout: no new group starts, running requests on every worker return as aborted
        partial samples (this aborts every request on those workers)."""
        self._aborted = True
        await self.client.abort_all()

    async def flush_cache(self) -> None:
        await self.client.flush_cache()

    def run(self, prompts: Sequence, group_ids: Optional[Sequence[int]] = None) -> RolloutBatch:
        """:meth:`rollout` from synchronous code (runs its own event loop; closes the client's session)."""
        async def run_and_close() -> RolloutBatch:
            try:
                return await self.rollout(prompts, group_ids)
            finally:
                await self.client.close()

        return asyncio.run(run_and_close())


def with_filler_rows(routes: torch.Tensor, count: int = 1) -> torch.Tensor:
    """``routes`` followed by ``count`` rows of experts ``0..top_k-1`` (valid, distinct ids) for tokens the engine
    has not routed: the last token (never an input; no logprob depends on its routing), or tool tokens until the
    next step returns their rows."""
    filler = torch.arange(routes.shape[-1], dtype=routes.dtype).expand(count, *routes.shape[1:])
    return torch.cat([routes, filler])


def _with_last_row(routes: torch.Tensor) -> torch.Tensor:
    """The engine's routes (one row per input token: every token but the last) with a row for the last token."""
    return with_filler_rows(routes)


def append_completion(sample: Sample, more: Completion) -> Sample:
    """``sample`` followed by the continuation ``more`` (spans shifted by the tokens already generated)."""
    offset = len(sample.response_ids)
    spans = list(sample.weight_versions)
    for span in more.weight_spans:
        shifted = WeightSpan(span.version, span.start + offset, span.end + offset)
        if spans and spans[-1].version == shifted.version and spans[-1].end == shifted.start:
            spans[-1] = WeightSpan(shifted.version, spans[-1].start, shifted.end)
        else:
            spans.append(shifted)
    extras = dict(sample.extras)
    if more.routed_experts is not None:  # the rows before the request's first (fillers after them), the new ones
        known = (sample.extras[ROUTES][: more.routes_start] if ROUTES in sample.extras  # none yet: a first step
                 else torch.from_numpy(more.routed_experts[:0]))
        extras[ROUTES] = _with_last_row(torch.cat([known, torch.from_numpy(more.routed_experts)]))
    return replace(
        sample,
        extras=extras,
        response_ids=sample.response_ids + list(more.output_ids),
        rollout_logprobs=sample.rollout_logprobs + list(more.output_logprobs),
        loss_mask=sample.loss_mask + [1] * len(more.output_ids),
        finish_reason=more.finish_reason,
        weight_version=more.weight_version,
        weight_versions=spans,
        aborted=more.aborted,
        metadata={**sample.metadata, "continuations": sample.metadata.get("continuations", 0) + 1},
    )
