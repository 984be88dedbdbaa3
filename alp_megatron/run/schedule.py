"""When rollouts run relative to training: one object, chosen at start (global rank 0 only).

- :class:`Synchronous`: rollout k, then training on it, then the weight update (colocated or disaggregated).
  Colocated, SGLang releases its GPU memory while Megatron trains and takes it back before the next rollout.
- :class:`OneStepOff`: the rollout of step k+1 runs on the engines while the trainer trains on step k's
  samples; it is awaited before the weight update, so no update lands mid-rollout and every sample is at
  most one policy version stale.
- :class:`Asynchronous` (``rollout.max_staleness: k``): rollouts run ahead of training, up to ``k`` batches,
  and weight updates land while they generate: a request in flight goes on under the new weights (each token
  records the version that produced it) or starts over (``rollout.partial_rollouts``). A batch is started
  only when it will be trained at most ``k`` versions after the weights it starts on, so no trained token is
  older than ``k`` versions.

Either draws each step's rollout as one batch of prompts, or, with ``rollout.dynamic_sampling``, as a
:class:`~alp_megatron.rollout.dynamic_sampling.FilteredRollout` that keeps only groups with a reward spread.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

from alp_megatron.rollout.types import RolloutBatch, Sample
from alp_megatron.rollout.dynamic_sampling import DynamicSamplingConfig, FilteredRollout


@dataclass
class Rollout:
    batch: RolloutBatch  # each sample carries its data Prompt
    seconds: float  # wall time the trainer waited for it (all of it when synchronous)
    metrics: dict = field(default_factory=dict)  # what the rollout itself reports (dynamic sampling)


class _Started:
    """A rollout of one batch of prompts, running: ``result()`` is its batch and no metrics of its own (waited
    for while the engines are tended: a restarted one gets the current weights meanwhile)."""

    def __init__(self, engines, future: Future):
        self.engines, self.future = engines, future

    def result(self) -> tuple[RolloutBatch, dict]:
        return self.engines.wait(self.future), {}

    def cancel(self) -> None:
        self.future.cancel()


class Schedule(Protocol):
    """What the loop asks of a schedule, at each point of a step (global rank 0)."""

    def next_rollout(self) -> Rollout: ...

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_sync(self) -> None: ...

    def resume_state(self) -> dict: ...

    def close(self) -> None: ...


class Synchronous:
    """``dynamic_sampling`` with ``score(group)`` (sets each sample's reward): filter groups without a reward
    spread and refill the batch (None: train on every group)."""

    def __init__(self, engines, prompt_batches, first_group_id: int, colocated: bool,
                 dynamic_sampling: Optional[DynamicSamplingConfig] = None,
                 score: Optional[Callable[[list[Sample]], None]] = None):
        self.engines = engines
        self.prompt_batches = prompt_batches
        self.next_group_id = first_group_id
        self.colocated = colocated
        self.dynamic_sampling = dynamic_sampling
        self.score = score

    def _draw(self) -> tuple[list, list[int]]:
        prompts = self.prompt_batches.next_batch()
        ids = list(range(self.next_group_id, self.next_group_id + len(prompts)))
        self.next_group_id += len(prompts)
        return prompts, ids

    def _submit(self):
        if self.dynamic_sampling is None:
            return _Started(self.engines, self.engines.submit(*self._draw()))
        return FilteredRollout(self.engines, self._draw, self.score, wanted=self.prompt_batches.batch_size,
                               config=self.dynamic_sampling)

    def next_rollout(self) -> Rollout:
        start = time.perf_counter()
        batch, metrics = self._submit().result()
        return Rollout(batch, time.perf_counter() - start, metrics)

    def resume_state(self) -> dict:
        """What a checkpoint taken after this step must hold to continue with the same prompts."""
        return {"data_position": self.prompt_batches.position.to_dict(), "next_group_id": self.next_group_id}

    def before_train(self) -> None:
        if self.colocated:
            self.engines.release_memory()

    def after_train(self) -> None:
        if self.colocated:
            self.engines.resume_memory()

    def before_sync(self) -> None:
        pass

    def close(self) -> None:
        pass


class OneStepOff(Synchronous):
    def __init__(self, engines, prompt_batches, first_group_id: int,
                 dynamic_sampling: Optional[DynamicSamplingConfig] = None,
                 score: Optional[Callable[[list[Sample]], None]] = None):
        super().__init__(engines, prompt_batches, first_group_id, colocated=False,
                         dynamic_sampling=dynamic_sampling, score=score)
        self._pending = None
        self._state_before_pending: Optional[dict] = None
        self._finished: Optional[tuple[RolloutBatch, dict]] = None

    def next_rollout(self) -> Rollout:
        start = time.perf_counter()
        if self._finished is None:
            self._finished = (self._pending or self._submit()).result()
        batch, metrics = self._finished
        self._pending = self._finished = None
        self._state_before_pending = super().resume_state()
        self._pending = self._submit()  # step k+1's rollout overlaps step k's training
        return Rollout(batch, time.perf_counter() - start, metrics)

    def before_sync(self) -> None:
        # finish it on the old weights before they change (filtering and refills, under dynamic sampling, too)
        self._finished = self._pending.result()

    def resume_state(self) -> dict:
        # the prefetched rollout is not in the checkpoint: a resumed run draws its prompts again
        return dict(self._state_before_pending)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()


class Asynchronous(Synchronous):
    """Rollouts ``max_staleness`` batches ahead of training (see the module docstring). At the rollout of the
    step that trains version ``v`` (the engines serve ``v``), the batches to be trained at ``v .. v + k`` are
    started if they are not running yet; each started at version ``v`` or later, none is trained more than ``k``
    versions later. The next batch (``v + k + 1``) waits for the engines to serve ``v + 1``."""

    def __init__(self, engines, prompt_batches, first_group_id: int, max_staleness: int,
                 dynamic_sampling: Optional[DynamicSamplingConfig] = None,
                 score: Optional[Callable[[list[Sample]], None]] = None):
        super().__init__(engines, prompt_batches, first_group_id, colocated=False,
                         dynamic_sampling=dynamic_sampling, score=score)
        self.max_staleness = max_staleness
        self._ahead: deque = deque()  # (running rollout, the resume state from before its prompts), oldest first

    def next_rollout(self) -> Rollout:
        start = time.perf_counter()
        while len(self._ahead) < self.max_staleness + 1:
            before = Synchronous.resume_state(self)
            self._ahead.append((self._submit(), before))
        running, _ = self._ahead.popleft()
        batch, metrics = running.result()
        return Rollout(batch, time.perf_counter() - start, {**metrics, "rollouts_ahead": float(len(self._ahead))})

    def resume_state(self) -> dict:
        # the batches still running are not in the checkpoint: a resumed run draws their prompts again
        return dict(self._ahead[0][1]) if self._ahead else Synchronous.resume_state(self)

    def close(self) -> None:
        for running, _ in self._ahead:
            running.cancel()
