"""When rollouts run relative to training: one object, chosen at start (global rank 0 only).

- :class:`Synchronous`: rollout k, then training on it, then the weight update (colocated or disaggregated).
  Colocated, SGLang releases its GPU memory while Megatron trains and takes it back before the next rollout.
- :class:`OneStepOff`: the rollout of step k+1 runs on the engines while the trainer trains on step k's
  samples; it is awaited before the weight update, so no update lands mid-rollout and every sample is at
  most one policy version stale.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Protocol

from alp_megatron.rollout.types import RolloutBatch


@dataclass
class Rollout:
    batch: RolloutBatch  # each sample carries its data Prompt
    seconds: float  # wall time the trainer waited for it (all of it when synchronous)


class Schedule(Protocol):
    """What the loop asks of a schedule, at each point of a step (global rank 0)."""

    def next_rollout(self) -> Rollout: ...

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_sync(self) -> None: ...

    def resume_state(self) -> dict: ...

    def close(self) -> None: ...


class Synchronous:
    def __init__(self, engines, prompt_batches, first_group_id: int, colocated: bool):
        self.engines = engines
        self.prompt_batches = prompt_batches
        self.next_group_id = first_group_id
        self.colocated = colocated

    def _submit(self) -> Future:
        prompts = self.prompt_batches.next_batch()
        ids = list(range(self.next_group_id, self.next_group_id + len(prompts)))
        self.next_group_id += len(prompts)
        return self.engines.submit(prompts, ids)

    def next_rollout(self) -> Rollout:
        start = time.perf_counter()
        batch = self._submit().result()
        return Rollout(batch, time.perf_counter() - start)

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
    def __init__(self, engines, prompt_batches, first_group_id: int):
        super().__init__(engines, prompt_batches, first_group_id, colocated=False)
        self._pending: Optional[Future] = None
        self._state_before_pending: Optional[dict] = None

    def next_rollout(self) -> Rollout:
        start = time.perf_counter()
        future = self._pending if self._pending is not None else self._submit()
        batch = future.result()
        self._pending = None
        self._state_before_pending = super().resume_state()
        self._pending = self._submit()  # step k+1's rollout overlaps step k's training
        return Rollout(batch, time.perf_counter() - start)

    def before_sync(self) -> None:
        self._pending.result()  # finish it on the old weights before they change

    def resume_state(self) -> dict:
        # the prefetched rollout is not in the checkpoint: a resumed run draws its prompts again
        return dict(self._state_before_pending)

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
