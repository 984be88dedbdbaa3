"""The frozen reference model of the KL term (``loss.kl_coef > 0``): the starting policy, never perturbed.

It is built like the actor (same spec, same TP / SP / PP / VPP / EP layout, ALP off) and loaded from the run's
starting HF checkpoint. A resumed run loads it from that checkpoint again, so it keeps the same reference
without storing a second model in every checkpoint. The actor scores it with the same forward-only pass that
gives the old logprobs (:meth:`Actor.score`).

Memory: a second copy of the weights on every rank, sharded as the actor's (dense weights / (TP x PP), expert
weights / (EP x expert TP x PP)), with no gradients and no optimizer state: 2 bytes per parameter in bf16
against the actor's 16-18 (bf16 weights, fp32 gradients, fp32 master weights and two Adam moments, less with
the distributed optimizer sharding the last three). Qwen3-235B-A22B at TP=4, PP=4, EP=8 (expert TP 1) holds
about 7.6B parameters per GPU (7.1B of experts, 0.5B dense): about 15 GB in bf16. On a GPU,
``actor.reference_offload`` keeps it in pinned host memory between its passes (one host-to-device copy of those
bytes per step, overlapping nothing). The offload moves parameters only (buffers stay, and Transformer Engine's
FP8 weight caches are not moved); it is written for CUDA and its GPU test has not run yet.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

logger = logging.getLogger(__name__)


class ReferenceModel:
    """This rank's chunks of the frozen reference model (plain ``GPTModel``s, in eval mode, no grads)."""

    def __init__(self, chunks: list, offload: bool = False):
        self.chunks = chunks
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        self.offload = offload and torch.cuda.is_available()
        if offload and not self.offload:
            logger.info("actor.reference_offload: no GPU, so the reference model stays where it is")
        self._device = None
        self._host: dict[int, torch.Tensor] = {}  # parameter index -> its pinned host copy (never changes)
        if self.offload:
            self._to_host()

    @classmethod
    def build(cls, arch, config, hf_dir: str) -> "ReferenceModel":
        """Build and load the reference from ``hf_dir`` (every rank; Megatron's parallel state initialised).
        The RNG states are left as they were, so building it changes no later random draw."""
        import dataclasses

        from alp_megatron.bridge.hf_import import load_hf_weights
        from alp_megatron.model.provider import build_model

        with _rng_preserved():
            chunks = build_model(arch, config.parallel, config.model.megatron,
                                 dataclasses.replace(config.alp, enabled=False))
        load_hf_weights(chunks, hf_dir, arch)
        return cls(chunks, offload=config.actor.reference_offload)

    @contextlib.contextmanager
    def resident(self) -> Iterator[list]:
        """The chunks, on the GPU for the duration (moved back to pinned host memory after, when offloaded)."""
        if not self.offload:
            yield self.chunks
            return
        self._to_device()
        try:
            yield self.chunks
        finally:
            self._to_host()

    def _parameters(self):
        return (p for chunk in self.chunks for p in chunk.parameters())

    def _to_host(self) -> None:
        for index, parameter in enumerate(self._parameters()):
            if parameter.device.type == "cuda":
                self._device = parameter.device
                if index not in self._host:  # the weights are frozen: copied out once
                    self._host[index] = torch.empty_like(parameter.data, device="cpu", pin_memory=True)
                    self._host[index].copy_(parameter.data)
                parameter.data = self._host[index]  # the GPU copy is freed with its last reference

    def _to_device(self) -> None:
        for parameter in self._parameters():
            if parameter.device.type == "cpu" and self._device is not None:
                parameter.data = parameter.data.to(self._device, non_blocking=True)  # from pinned memory
        torch.cuda.current_stream().synchronize()


@contextlib.contextmanager
def _rng_preserved():
    from alp_megatron.trainer.checkpoint import restore_rng_state, rng_state

    state = rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
