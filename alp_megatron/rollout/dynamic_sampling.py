"""Dynamic sampling (DAPO): train only on groups whose rewards differ, over-sampling to fill the batch.

A group whose ``n`` rewards are all equal has zero advantage everywhere: it costs a training pass and teaches
nothing. With ``rollout.dynamic_sampling`` set, a rollout step is a :class:`FilteredRollout`:

1. the first generation batch (``data.prompts_per_step`` prompts) is started at once;
2. each group, as it completes, is scored (on the thread that asks for the result: the math verifier's time
   limits need the main thread) and kept only if its rewards have a spread;
3. whenever the kept groups plus the groups still generating could no longer fill the batch, the next
   generation batch of ``prompts_per_step`` prompts is drawn, at most ``max_gen_batches`` in all;
4. once ``prompts_per_step`` groups are kept, everything still generating is aborted on the engines and
   waited for; what was aborted, or finished after the batch was full, never reaches the trainer;
5. if the cap is reached first, the step trains on the groups it kept (``dynamic_sampling_capped`` is 1).

Under one-step-off the first batch generates while the trainer trains; the filtering and any further batches
happen when the loop asks for the rollout.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

from alp_megatron.errors import ConfigError
from alp_megatron.rollout.types import RolloutBatch, Sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicSamplingConfig:
    """``rollout.dynamic_sampling`` (null: every group is trained on). ``max_gen_batches``: the most generation
    batches of ``data.prompts_per_step`` prompts one step may draw (DAPO's ``max_num_gen_batches``; 1 filters
    without refilling)."""

    max_gen_batches: int = 4

    def __post_init__(self):
        if isinstance(self.max_gen_batches, bool) or not isinstance(self.max_gen_batches, int) \
                or self.max_gen_batches < 1:
            raise ConfigError("rollout.dynamic_sampling.max_gen_batches",
                              f"{self.max_gen_batches!r} is not a positive integer",
                              "use the most batches of data.prompts_per_step prompts a step may generate, e.g. 4 "
                              "(1 filters without refilling); set rollout.dynamic_sampling to null to turn it off")


def has_reward_spread(group: Sequence[Sample]) -> bool:
    """Whether the group's rewards are not all equal (its advantages are not all zero)."""
    rewards = [sample.reward for sample in group]
    return max(rewards) > min(rewards)


class FilteredRollout:
    """One step's rollout under dynamic sampling (see the module docstring); started on creation.

    ``engines``: the run's :class:`~alp_megatron.rollout.fleet.RolloutEngines`; ``draw()``: the next generation
    batch as ``(prompts, group_ids)``; ``score(group)``: sets each sample's reward (called on the thread of
    :meth:`result`); ``wanted``: the groups a full batch holds.
    """

    def __init__(self, engines, draw: Callable[[], tuple[list, list[int]]], score: Callable[[list[Sample]], None],
                 wanted: int, config: DynamicSamplingConfig):
        self.engines, self.draw, self.score, self.wanted, self.config = engines, draw, score, wanted, config
        self._groups: "queue.Queue[list[Sample]]" = queue.Queue()
        self._futures: list[Future] = []
        self._outstanding = 0
        self._start_batch()

    def _start_batch(self) -> None:
        prompts, group_ids = self.draw()
        self._outstanding += len(prompts)
        self._futures.append(self.engines.submit(prompts, group_ids, on_group=self._groups.put))

    def result(self) -> tuple[RolloutBatch, dict]:
        """The kept groups as a rollout batch, and the ``dynamic_sampling_*`` metrics."""
        kept: list[list[Sample]] = []
        filtered = 0
        while len(kept) < self.wanted:
            if len(kept) + self._outstanding < self.wanted and len(self._futures) < self.config.max_gen_batches:
                self._start_batch()
            try:
                group = self._groups.get(timeout=0.2)
            except queue.Empty:
                self._raise_failure()
                self.engines.tend()  # a restarted engine gets the current weights meanwhile
                if self._outstanding == 0:
                    break  # the cap is reached and every group has come back
                continue
            self._outstanding -= 1
            self.score(group)
            if has_reward_spread(group):
                kept.append(group)
            else:
                filtered += 1
        unused = self._outstanding
        if unused:  # the batch is full: whatever still generates is aborted and never trained on
            self.engines.abort()
        self._wait()
        capped = len(kept) < self.wanted
        if capped:
            logger.warning("dynamic sampling: %d of %d groups with a reward spread after %d generation batches "
                           "(rollout.dynamic_sampling.max_gen_batches); training on those", len(kept), self.wanted,
                           len(self._futures))
        samples = [sample for group in kept for sample in group]
        batch = RolloutBatch(samples=samples, group_size=self.engines.group_size,
                             group_ids=[group[0].group_id for group in kept])
        return batch, {"dynamic_sampling_gen_batches": float(len(self._futures)),
                       "dynamic_sampling_kept_groups": float(len(kept)),
                       "dynamic_sampling_filtered_groups": float(filtered),
                       "dynamic_sampling_unused_groups": float(unused),
                       "dynamic_sampling_capped": float(capped)}

    def _raise_failure(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                self.cancel()
                raise future.exception()

    def _wait(self) -> None:
        for future in self._futures:  # each generation batch ends (its aborted requests come back) first
            try:
                self.engines.wait(future)
            except Exception:  # noqa: BLE001 - a failed batch was raised by _raise_failure, or is not needed
                pass

    def cancel(self) -> None:
        """Abort every request of this rollout (a run stopped mid-rollout) and wait for them to come back."""
        if any(not future.done() for future in self._futures):
            self.engines.abort()
        self._wait()
