"""The trained policy: the Megatron model with the ALP layer spec, its HF weights, optimizer and actor.

Every rank builds it (``Policy.build``) and calls every method; only the loop decides what rank 0 does
with the results.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from alp_megatron.alp.perturbation import realised_ratio_by_layer, sigma_by_layer
from alp_megatron.bridge.export import export_hf_buckets
from alp_megatron.bridge.hf_folder import arch_from_hf_folder, save_hf_folder
from alp_megatron.bridge.hf_import import load_hf_weights
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.provider import build_model
from alp_megatron.progress import ByteProgress
from alp_megatron.trainer.actor import Actor
from alp_megatron.trainer.step import build_optimizer, wrap_ddp

logger = logging.getLogger(__name__)


@dataclass
class Policy:
    arch: ModelArch
    hf_dir: str  # the checkpoint it started from (config and tokenizer files come from here)
    chunks: list  # this rank's GPTModel chunks
    ddp_chunks: list
    optimizer: object
    scheduler: object
    actor: Actor

    @classmethod
    def build(cls, config, hf_dir: str) -> "Policy":
        """Model chunks with ``hf_dir``'s weights, DDP, optimizer (with the sigma group), actor, and the frozen
        reference model when ``loss.kl_coef > 0``. Megatron's parallel state must be initialised
        (``initialize_parallel``)."""
        torch.manual_seed(config.run.seed)
        arch = arch_from_hf_folder(hf_dir)
        chunks = build_model(arch, config.parallel, config.model.megatron, config.alp)
        loading = ByteProgress(f"loading this rank's shards of {hf_dir}", logger.info)
        load_hf_weights(chunks, hf_dir, arch, progress=loading)
        loading.done()
        reference = None
        if config.loss.kl_coef > 0:
            from alp_megatron.trainer.reference import ReferenceModel

            reference = ReferenceModel.build(arch, config, hf_dir)
        ddp_chunks = wrap_ddp(chunks, config.optimizer)
        optimizer, scheduler = build_optimizer(ddp_chunks, config.optimizer, config.alp)
        actor = Actor(ddp_chunks, optimizer, scheduler, config.loss, config.actor, reference)
        return cls(arch, hf_dir, chunks, ddp_chunks, optimizer, scheduler, actor)

    def hf_buckets(self, bucket_bytes: int, dtype=None) -> Iterator[list]:
        """The model as HF-named full tensors in buckets (collective: every rank iterates to the end)."""
        return export_hf_buckets(self.chunks, self.arch, bucket_bytes, dtype=dtype)

    def save_hf(self, out_dir: str, overwrite: bool = True) -> None:
        """An HF folder of the current weights (config and tokenizer from the starting checkpoint)."""
        writing = ByteProgress(f"writing {out_dir}", logger.info)
        save_hf_folder(self.chunks, self.hf_dir, out_dir, tokenizer_dir=self.hf_dir, overwrite=overwrite,
                       progress=writing)
        writing.done()

    def sigma_by_layer(self) -> dict[int, float]:
        """``{global layer: sigma}`` of every layer of the model, gathered over pipeline stages."""
        return self._by_layer(sigma_by_layer)

    def noise_ratio_by_layer(self) -> dict[int, float]:
        """``{global layer: ||h' - h|| / ||h||}`` of the last perturbed forward (this rank's rows)."""
        return self._by_layer(realised_ratio_by_layer)

    def _by_layer(self, read) -> dict[int, float]:
        from megatron.core import parallel_state

        local: dict[int, float] = {}
        for chunk in self.chunks:
            local.update(read(chunk))
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return local
        gathered = [None] * parallel_state.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, local, group=parallel_state.get_pipeline_model_parallel_group())
        merged: dict[int, float] = {}
        for part in gathered:
            merged.update(part)
        return dict(sorted(merged.items()))

    @torch.no_grad()
    def unperturbed_logprobs(self, sequences: list) -> Optional[list]:
        """For each token sequence, the logprob of every token after the first under the current weights,
        without ALP's noise (what the inference engine should reproduce). Collective: every rank passes the
        same ``sequences``; the result is returned on global rank 0 (None elsewhere)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from alp_megatron.alp.perturbation import alp_disabled
        from alp_megatron.model.logprobs import token_logprobs
        from alp_megatron.sample import Sample
        from alp_megatron.trainer.batch import build_training_batch

        batch = build_training_batch([Sample.given(s[:1], s[1:], [0.0] * (len(s) - 1), 0.0, i)
                                      for i, s in enumerate(sequences)])
        micro = batch.as_micro_batch()

        def forward_step(data_iterator, model):
            item = next(data_iterator)
            output = model(item["tokens"], item["position_ids"], None)
            collect = lambda logits: (logits.new_zeros(()), torch.ones((), dtype=torch.int),  # noqa: E731
                                      {"logprobs": token_logprobs(logits, item["targets"])})
            return output, collect

        vp = len(self.ddp_chunks)
        with alp_disabled(*self.chunks):
            for chunk in self.ddp_chunks:
                chunk.eval()
            try:
                reports = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=[iter([micro]) for _ in range(vp)] if vp > 1 else iter([micro]),
                    model=self.ddp_chunks if vp > 1 else self.ddp_chunks[0], num_microbatches=1,
                    seq_length=batch.seq_length, micro_batch_size=batch.size, forward_only=True)
            finally:
                for chunk in self.ddp_chunks:
                    chunk.train()
        rows = None
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            logprobs = reports[0]["logprobs"]
            rows = [logprobs[i, : len(s) - 1].clone() for i, s in enumerate(sequences)]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [rows]
            dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
            rows = box[0]
        return rows if dist.get_rank() == 0 else None
