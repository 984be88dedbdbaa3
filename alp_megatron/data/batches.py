"""Batches of prompts in a seeded order per epoch, and the resumable position in that order.

Epoch ``e`` visits every prompt once, in the order ``permutation(seed, e)`` (or in file order without shuffling).
A batch takes the next ``batch_size`` prompts and runs on into the next epoch's order when the current one ends,
so the stream is endless and depends only on (seed, number of prompts). :class:`DataPosition` (epoch, index in
that epoch's order, seed) is all a checkpoint needs: restored into a fresh :class:`PromptBatches` over the same
prompts, it yields exactly the batches the uninterrupted run would have yielded next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol

import numpy as np

from alp_megatron.data.prompts import Prompt
from alp_megatron.errors import ConfigError

logger = logging.getLogger(__name__)


class PromptSource(Protocol):
    """A fixed, indexable collection of prompts (a :class:`~alp_megatron.data.prompts.PromptDataset`, a toy task)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Prompt: ...


def _check_count(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(field, f"must be an integer >= {minimum}, got {value!r}",
                          "resume from a data position written by PromptBatches.state_dict()")
    return int(value)


@dataclass(frozen=True)
class DataPosition:
    """Where the prompt stream stands: the next prompt is number ``index`` of epoch ``epoch``'s order."""

    epoch: int = 0
    index: int = 0
    seed: int = 0

    def __post_init__(self):
        for name in ("epoch", "index", "seed"):
            _check_count(getattr(self, name), f"data.position.{name}", 0)

    def to_dict(self) -> Dict[str, int]:
        """A small dict of plain ints, for a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "DataPosition":
        """The position saved by :meth:`to_dict`; extra keys are ignored, a missing or bad one is a ConfigError."""
        if not isinstance(state, Mapping):
            raise ConfigError("data.position", f"must be a dict with epoch, index and seed, got {type(state).__name__}",
                              "resume from a data position written by PromptBatches.state_dict()")
        for name in ("epoch", "index", "seed"):
            if name not in state:
                raise ConfigError(f"data.position.{name}", "is missing from the saved data position",
                                  "resume from a data position written by PromptBatches.state_dict()")
        return cls(**{name: _check_count(state[name], f"data.position.{name}", 0)
                      for name in ("epoch", "index", "seed")})


def epoch_order(num_prompts: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The order in which epoch ``epoch`` visits prompts ``0..num_prompts-1``: a permutation drawn from (seed, epoch).

    Each epoch's permutation comes from its own generator seeded with ``[seed, epoch]``, so it can be rebuilt from
    the position alone without replaying earlier epochs.
    """
    if not shuffle:
        return np.arange(num_prompts)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_prompts)


class PromptBatches:
    """An endless iterator of ``batch_size``-long lists of prompts from ``source`` (see the module docstring).

    Every caller that draws prompts for rollout uses one of these, and saves :meth:`state_dict` with its checkpoint.
    """

    def __init__(self, source: PromptSource, batch_size: int, seed: int = 0, shuffle: bool = True,
                 position: Optional[DataPosition] = None):
        self.source = source
        self.num_prompts = len(source)
        if self.num_prompts == 0:
            raise ValueError("PromptBatches: the prompt source is empty")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"PromptBatches: batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._position = DataPosition(seed=seed)
        self._order_epoch: Optional[int] = None
        self._order = np.empty(0, dtype=np.int64)
        if position is not None:
            self.restore(position)

    @property
    def position(self) -> DataPosition:
        """The position of the next prompt."""
        return self._position

    def restore(self, position: DataPosition) -> None:
        """Continue from ``position`` (its seed replaces the one this iterator was built with)."""
        if position.index >= self.num_prompts:
            raise ConfigError(
                "data.position.index",
                f"is {position.index}, but the prompt source has only {self.num_prompts} prompts",
                "resume with the same data files and settings as the run that saved the position",
            )
        if position.seed != self._position.seed:
            logger.warning("resuming the prompt order with the saved seed %d instead of data.seed=%d",
                           position.seed, self._position.seed)
        self._position = position

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = epoch_order(self.num_prompts, self._position.seed, epoch, self.shuffle)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> List[Prompt]:
        """The next ``batch_size`` prompts; the position moves past them (into later epochs when needed)."""
        epoch, index, seed = self._position.epoch, self._position.index, self._position.seed
        batch: List[Prompt] = []
        while len(batch) < self.batch_size:
            order = self._order_of(epoch)
            take = min(self.batch_size - len(batch), self.num_prompts - index)
            batch.extend(self.source[int(i)] for i in order[index:index + take])
            index += take
            if index == self.num_prompts:
                epoch, index = epoch + 1, 0
        self._position = DataPosition(epoch=epoch, index=index, seed=seed)
        return batch

    def __iter__(self) -> Iterator[List[Prompt]]:
        return self

    def __next__(self) -> List[Prompt]:
        return self.next_batch()

    def state_dict(self) -> Dict[str, int]:
        """The position as a small dict of ints, plus the number of prompts (checked when restored)."""
        return {**self._position.to_dict(), "num_prompts": self.num_prompts}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; refuses one saved over a different number of prompts."""
        position = DataPosition.from_dict(state)
        saved = state.get("num_prompts")
        if saved is not None and saved != self.num_prompts:
            raise ConfigError(
                "data.position.num_prompts",
                f"the position was saved over {saved} prompts, but this prompt source has {self.num_prompts}",
                "resume with the same data files and settings as the run that saved it, or start the data afresh",
            )
        self.restore(position)
