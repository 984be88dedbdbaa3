"""The actor: K optimizer steps of ALP (or a baseline) on one rollout batch.

For a rollout batch of ``N`` samples the actor

1. runs one unperturbed, no-grad forward over the batch for ``old_logprobs`` (pi_old of the methods that read
   it, the train-inference mismatch metrics and the entropy), unless the method needs none and it is switched
   off; and, with ``loss.kl_coef > 0``, the same pass over the frozen reference model for ``ref_logprobs``;
2. splits the batch into ``num_mini_batches`` mini-batches (K > 1 is the staleness ALP is made for); each
   data-parallel rank takes its contiguous share of a mini-batch, in micro-batches of ``micro_batch_size``;
3. per mini-batch (``epochs`` passes over them): the perturbed forward, :func:`policy_loss` normalised over the whole mini-batch (token
   mean or sequence mean, across micro-batches and data-parallel ranks), backward, gradient clipping and one
   optimizer step, skipped and reported when the loss or gradient norm is not finite;
4. reports the loss metrics over the whole batch (ratio quantiles, clip fractions, mismatch), computed once, on
   the last pipeline stage, from every sample's training logprobs of that pass (each micro-batch's loss is
   computed without metrics: no device sync per micro-batch), and shared with the first stage.

All ranks call :meth:`Actor.train` with the same :class:`TrainingBatch`, or :meth:`Actor.train_local` with
their own shares of it (:func:`alp_megatron.trainer.distribute.distribute`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist

from alp_megatron.alp.loss import LossConfig, get_loss_method, policy_loss
from alp_megatron.alp.perturbation import alp_disabled
from alp_megatron.alp.stats import train_inference_ratio
from alp_megatron.errors import ConfigError
from alp_megatron.sample import ROUTES
from alp_megatron.model import packing, routing
from alp_megatron.model.logprobs import token_entropy, token_logprobs
from alp_megatron.model.provider import rank_device
from alp_megatron.trainer.batch import (TrainingBatch, micro_batch_counts, mini_batch_lengths, packed_micro_batch,
                                       plan_micro_batches, share_indices)
from alp_megatron.trainer.distribute import LocalBatch
from alp_megatron.trainer.step import train_step

logger = logging.getLogger(__name__)

CONTEXT_PARALLEL_NOT_BUILT = (
    "is {}, but the trainer does not split sequences over context-parallel ranks yet (Megatron's local "
    "attention refuses context parallelism and the Transformer Engine path is not built), so it would train "
    "on wrong attention")


@dataclass(frozen=True)
class ActorConfig:
    """``num_mini_batches`` x ``epochs``: optimizer steps per rollout batch (every epoch visits the same
    mini-batches in the same order). ``micro_batch_size``: sequences per forward.
    ``temperature``: the rollout's sampling temperature (logprobs are scored at the same one).
    ``compute_old_logprobs``: the unperturbed pass of step 1 (forced on for methods that need pi_old).
    ``reference_offload``: on a GPU, keep the KL reference model in host memory between its passes.
    ``max_tokens_per_microbatch``: pack each rank's samples into micro-batches of at most this many tokens
    (no padding between samples; see :mod:`alp_megatron.model.packing`), data-parallel shares balanced by
    tokens; "auto" (the default): ``micro_batch_size`` times the mini-batch's longest sample (at most the
    tokens of a padded micro-batch); None: ``micro_batch_size`` padded sequences per micro-batch, in
    contiguous data-parallel shares."""

    num_mini_batches: int = 1
    epochs: int = 1
    micro_batch_size: int = 1
    temperature: float = 1.0
    compute_old_logprobs: bool = True
    reference_offload: bool = False
    max_tokens_per_microbatch: Union[int, str, None] = "auto"

    def __post_init__(self):
        budget = self.max_tokens_per_microbatch
        if not (budget is None or budget == "auto" or (isinstance(budget, int) and budget >= 1)):
            raise ConfigError("actor.max_tokens_per_microbatch", f"must be a number >= 1, auto or null, got {budget!r}",
                              "use e.g. the longest prompt plus rollout.max_new_tokens, auto (micro_batch_size "
                              "times the longest sample), or null for padded micro-batches of "
                              "actor.micro_batch_size sequences")
        if self.epochs < 1:
            raise ConfigError("actor.epochs", f"must be >= 1, got {self.epochs}",
                              "use 1, or more passes over the mini-batches of a rollout batch")
        if self.num_mini_batches < 1:
            raise ConfigError("actor.num_mini_batches", f"must be >= 1, got {self.num_mini_batches}",
                              "use 1 for on-policy updates, more for K stale mini-batch steps")
        if self.micro_batch_size < 1:
            raise ConfigError("actor.micro_batch_size", f"must be >= 1, got {self.micro_batch_size}", "use e.g. 1")
        if not self.temperature > 0:
            raise ConfigError("actor.temperature", f"must be > 0, got {self.temperature}",
                              "use the rollout's sampling temperature (1.0 by default)")


@dataclass
class ActorReport:
    """What one :meth:`Actor.train` did. ``metrics`` holds the whole-batch loss metrics (on every rank)."""

    losses: list
    grad_norms: list
    applied: list
    skip_reasons: list
    metrics: dict

    @property
    def skipped_steps(self) -> int:
        return sum(1 for applied in self.applied if not applied)


class Actor:
    """Trains the DDP-wrapped model chunks with ``optimizer``/``scheduler`` (see :mod:`alp_megatron.trainer.step`)."""

    def __init__(self, ddp_chunks: list, optimizer, scheduler, loss: LossConfig, config: ActorConfig,
                 reference=None):
        """``reference``: the frozen :class:`ReferenceModel` of the KL term (required when loss.kl_coef > 0)."""
        from megatron.core import parallel_state

        if loss.kl_coef > 0 and reference is None:
            raise ValueError("Actor: loss.kl_coef > 0 needs the reference model (ReferenceModel.build)")
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ConfigError("parallel.context_parallel",
                              CONTEXT_PARALLEL_NOT_BUILT.format(parallel_state.get_context_parallel_world_size()),
                              "use 1, and tensor parallelism with sequence parallelism for long sequences")
        self.chunks = ddp_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss = loss
        self.config = config
        self.reference = reference
        self.optimizer_steps = 0  # keys the ALP noise: a fresh draw for every optimizer step

    # -- data split --------------------------------------------------------------------------------------

    def _rank_share(self, batch: TrainingBatch) -> list[TrainingBatch]:
        """This data-parallel rank's part of each mini-batch (see :func:`share_indices`)."""
        from megatron.core import parallel_state

        indices = share_indices(batch.lengths.tolist(), self.config, parallel_state.get_data_parallel_world_size(),
                                parallel_state.get_data_parallel_rank())
        return [batch.select(torch.tensor(rows)) for rows in indices]

    @property
    def packed(self) -> bool:
        return self.config.max_tokens_per_microbatch is not None

    def _budget(self, mini_batch_lengths: list[int]) -> int:
        budget = self.config.max_tokens_per_microbatch
        return self.config.micro_batch_size * max(mini_batch_lengths) if budget == "auto" else budget

    def _plan(self, share: TrainingBatch, mini_batch_lengths: list[int]) -> list[list[int]]:
        """Which of ``share``'s samples each packed micro-batch holds.

        Every data-parallel rank plans the same number of micro-batches (the most any rank's share needs, from
        ``mini_batch_lengths``, the lengths of the whole mini-batch, known on every rank), as expert
        parallelism's all-to-alls need, and a multiple of PP under interleaved pipelining.
        """
        from megatron.core import parallel_state

        budget = self._budget(mini_batch_lengths)
        count = max(micro_batch_counts(mini_batch_lengths, budget, parallel_state.get_data_parallel_world_size()))
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        if len(self.chunks) > 1 and count % pp:  # the interleaved schedule runs micro-batches in groups of PP
            count += pp - count % pp
            if count > share.size:
                raise ConfigError("actor.max_tokens_per_microbatch",
                                  f"interleaved pipelining needs a multiple of {pp} micro-batches, but this rank has "
                                  f"{share.size} samples in a mini-batch",
                                  f"give each rank at least {count} samples per mini-batch (fewer mini-batches or more "
                                  "prompts), or drop parallel.virtual_pipeline_parallel")
        return plan_micro_batches(share.lengths.tolist(), budget, count, share.sample_ids.tolist())

    def _row_multiple(self) -> int:
        """Packed rows are padded to a multiple of this: TP under sequence parallelism (it splits the rows)."""
        from megatron.core import parallel_state

        sequence_parallel = self.chunks[0].config.sequence_parallel
        return parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1

    def _longest_row(self, share: TrainingBatch, plan: list[list[int]]) -> int:
        multiple = self._row_multiple()
        return max(-(-int(share.lengths[indices].sum()) // multiple) * multiple for indices in plan)

    def _micro_batches(self, share: TrainingBatch, mini_batch_lengths: list[int], pad_to: int = 0,
                       plan=None) -> tuple[list[dict], int]:
        """This rank's micro-batches of ``share`` and the sequence length the pipeline schedule is told.

        Packed (by ``plan``, or :meth:`_plan`): under pipeline parallelism all rows are padded to one length
        (the schedule sends fixed-shape activations), at least ``pad_to`` when one schedule runs several
        shares; under sequence parallelism to a multiple of TP.
        """
        from megatron.core import parallel_state

        if not self.packed:
            mbs = self.config.micro_batch_size
            micro = [share.select(slice(i, i + mbs)).as_micro_batch() for i in range(0, share.size, mbs)]
            for i, m in enumerate(micro):
                m["rows"] = torch.arange(i * mbs, i * mbs + m["tokens"].shape[0])
            return [_on_device(m) for m in micro], share.seq_length
        plan = plan if plan is not None else self._plan(share, mini_batch_lengths)
        total = None
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            total = max(self._longest_row(share, plan), pad_to)
        micro = [_on_device(packed_micro_batch(share, indices, self._row_multiple(), total)) for indices in plan]
        return micro, max(m["tokens"].shape[1] for m in micro)

    # -- passes ------------------------------------------------------------------------------------------

    def score(self, chunks: list, batch: TrainingBatch) -> tuple:
        """Unperturbed ``(logprobs, entropy)``, each ``[n_local, S]``, of this rank's samples of ``batch``
        under ``chunks`` (the actor's for pi_old, the reference model's), in the micro-batches training uses,
        through the pipeline schedule, on the last pipeline stage; ``(None, None)`` on the others."""
        return self._score(chunks, self._rank_share(batch), self._mini_batch_lengths(batch))

    def _mini_batch_lengths(self, batch: TrainingBatch) -> list[list[int]]:
        return mini_batch_lengths(batch.lengths.tolist(), self.config.num_mini_batches)

    @torch.no_grad()
    def _score(self, chunks: list, shares: list[TrainingBatch], lengths: list[list[int]]) -> tuple:
        """:meth:`score` of this rank's ``shares``; ``lengths``: each whole mini-batch's sample lengths."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        temperature = self.config.temperature
        plans = [self._plan(share, mini) if self.packed else None for share, mini in zip(shares, lengths)]
        pad_to = 0
        if self.packed and parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # one schedule runs every share: one activation shape for every stage
            pad_to = max(self._longest_row(share, plan) for share, plan in zip(shares, plans))
        planned = [self._micro_batches(share, mini, pad_to, plan) for share, mini, plan in zip(shares, lengths, plans)]
        longest = max(seq for _, seq in planned)
        micro_batches = [mb for micro, _ in planned for mb in micro]

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            output = packing.forward(model, micro)

            def collect(logits):
                logprobs = _per_sample(token_logprobs(logits, _targets(micro), temperature), micro)
                entropy = _per_sample(token_entropy(logits, temperature), micro)
                zero = logits.new_zeros(())
                return zero, torch.ones((), dtype=torch.int), {"logprobs": logprobs, "entropy": entropy}

            return output, collect

        models = _bare(chunks)
        vp = len(chunks)
        with alp_disabled(*models):
            for chunk in chunks:
                chunk.eval()
            try:
                reports = get_forward_backward_func()(
                    forward_step_func=forward_step,
                    data_iterator=[iter(micro_batches) for _ in range(vp)] if vp > 1 else iter(micro_batches),
                    model=chunks if vp > 1 else chunks[0],
                    num_microbatches=len(micro_batches),
                    seq_length=longest,
                    micro_batch_size=micro_batches[0]["tokens"].shape[0],
                    forward_only=True,
                )
            finally:
                routing.clear(models)
                if chunks is self.chunks:  # the reference model stays in eval mode
                    for chunk in chunks:
                        chunk.train()
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None, None
        out, start = [], 0
        for share, (micro, _) in zip(shares, planned):
            done = reports[start : start + len(micro)]
            start += len(micro)
            out.append((_rows(done, micro, "logprobs", share), _rows(done, micro, "entropy", share)))
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def _check_routes(self, shares: list[TrainingBatch]) -> None:
        """A model that replays MoE routes trains only on samples that carry them (else it would silently not)."""
        replays = any(getattr(chunk, "routing_replay", False) for chunk in _bare(self.chunks))
        if replays and any(ROUTES not in share.extras for share in shares):
            raise ConfigError("model.megatron.routing_replay",
                              "is rollout, but the training batch carries no routes (Sample.extras['routed_experts'])",
                              "roll out with routes (a client with routed_experts set, servers started with "
                              "--enable-return-routed-experts), or set model.megatron.routing_replay=none")

    def train(self, batch: TrainingBatch) -> ActorReport:
        """K optimizer steps on ``batch`` (identical on every rank). Returns what happened, on every rank."""
        return self.train_local(LocalBatch(self._rank_share(batch), self._mini_batch_lengths(batch)))

    def train_local(self, local_batch: "LocalBatch") -> ActorReport:
        """K optimizer steps on this rank's shares (from :func:`alp_megatron.trainer.distribute.distribute`, or
        :meth:`train`). Every rank calls it for the same rollout batch. Returns what happened, on every rank."""
        shares, lengths = local_batch.shares, local_batch.mini_batch_lengths
        self._check_routes(shares)
        local = TrainingBatch(**{name: torch.cat([getattr(s, name) for s in shares])
                                 for name in ("tokens", "targets", "position_ids", "loss_mask",
                                              "rollout_logprobs", "advantages", "sample_ids", "lengths")})
        needs_old = get_loss_method(self.loss.method).needs_old_logprobs
        old, entropy, ref = None, None, None
        agreement = {}
        if needs_old or self.config.compute_old_logprobs:
            models = _bare(self.chunks)
            with routing.measuring(models):  # the trainer's own MoE top-k against the engine's, unperturbed
                old, entropy = self._score(self.chunks, shares, lengths)
            agreement = routing.agreement(models)
            _attach(local, shares, "old_logprobs", old)  # on the last stage, where the loss reads it
        if self.loss.kl_coef > 0:
            with self.reference.resident() as reference:
                ref, _ = self._score(reference, shares, lengths)
            _attach(local, shares, "ref_logprobs", ref)

        loss_cfg, temperature = self.loss, self.config.temperature
        count_tokens = loss_cfg.agg == "token_mean"

        def loss_function(output, micro):
            logprobs = _per_sample(token_logprobs(output, _targets(micro), temperature), micro)
            loss_sum, _ = policy_loss(logprobs, micro["rollout_logprobs"], micro["advantages"], micro["loss_mask"],
                                      loss_cfg, old_logprobs=micro.get("old_logprobs"),
                                      ref_logprobs=micro.get("ref_logprobs"), global_denominator=1.0,
                                      with_metrics=False)
            mask = micro["loss_mask"].bool()
            units = (mask.sum() if count_tokens else mask.any(dim=-1).sum()).to(torch.int)
            return loss_sum, units, {"loss_sum": loss_sum.detach(), "num_units": units, "logprobs": logprobs.detach()}

        losses, grad_norms, applied, reasons, trained_logprobs = [], [], [], [], []
        tokens = torch.zeros(3, dtype=torch.float64)  # rows run, real tokens among them, micro-batches
        for epoch in range(self.config.epochs):
            for m, share in enumerate(shares):
                micro_batches, seq_length = self._micro_batches(share, lengths[m])
                if epoch == 0:
                    tokens += torch.tensor([sum(mb["tokens"].numel() for mb in micro_batches),
                                            sum(int(mb["lengths"].sum()) for mb in micro_batches),
                                            len(micro_batches)], dtype=torch.float64)
                result = train_step(self.chunks, self.optimizer, self.scheduler, micro_batches,
                                    loss_function, self.optimizer_steps, seq_length)
                self.optimizer_steps += 1
                losses.append(result.loss)
                grad_norms.append(result.grad_norm)
                applied.append(result.applied)
                reasons.append(result.skip_reason)
                if not result.applied:
                    logger.warning("optimizer step %d (epoch %d, mini-batch %d) skipped: %s",
                                   self.optimizer_steps - 1, epoch, m, result.skip_reason)
                if result.reports and epoch == 0:  # the metrics describe each sample's first visit
                    trained_logprobs.append(_rows(result.reports, micro_batches, "logprobs", share))

        metrics = self._batch_metrics(local, trained_logprobs, old, entropy, ref)
        metrics.update(_padding_metrics(tokens, len(shares)))
        metrics.update(agreement)
        return ActorReport(losses=losses, grad_norms=grad_norms, applied=applied, skip_reasons=reasons,
                           metrics=metrics)

    # -- metrics -----------------------------------------------------------------------------------------

    def _batch_metrics(self, local: TrainingBatch, trained_logprobs: list, old, entropy, ref) -> dict:
        """Loss metrics over the whole rollout batch, computed on the last stage and shared along the pipeline."""
        from megatron.core import parallel_state

        metrics: dict = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            dp_group = parallel_state.get_data_parallel_group()
            logprobs = torch.cat(trained_logprobs)
            fields = {"logprobs": logprobs, "rollout": local.rollout_logprobs, "advantages": local.advantages,
                      "mask": local.loss_mask, "old": old, "entropy": entropy, "ref": ref}
            gathered = {name: _gather_rows(t.to(logprobs.device), dp_group)  # NCCL gathers device tensors
                        for name, t in fields.items() if t is not None}
            logprobs, rollout, mask = gathered["logprobs"], gathered["rollout"], gathered["mask"]
            _, metrics = policy_loss(logprobs, rollout, gathered["advantages"], mask, self.loss,
                                     old_logprobs=gathered.get("old"), ref_logprobs=gathered.get("ref"))
            metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
            metrics.update(train_inference_ratio(logprobs, rollout, mask, self.loss.log_ratio_clamp))
            if old is not None:
                valid = mask.bool()
                metrics["entropy"] = float(gathered["entropy"][valid].mean()) if valid.any() else 0.0
            metrics["response_tokens"] = float(mask.sum())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            box = [metrics]
            dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                                       group=parallel_state.get_pipeline_model_parallel_group())
            metrics = box[0]
        return metrics


def _padding_metrics(tokens: torch.Tensor, mini_batches: int) -> dict:
    """``padded_share``: the share of the rows the training pass ran that were padding, over the data-parallel
    ranks; ``micro_batches``: per rank and optimizer step."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    tokens = tokens.to(rank_device())  # NCCL reduces device tensors
    dist.all_reduce(tokens, group=group)
    run, real, count = tokens.tolist()
    return {"padded_share": 1.0 - real / run if run else 0.0,
            "micro_batches": count / (dist.get_world_size(group) * mini_batches)}


def _targets(micro: dict) -> torch.Tensor:
    return micro["packed_targets"] if packing.is_packed(micro) else micro["targets"]


def _per_sample(values: torch.Tensor, micro: dict) -> torch.Tensor:
    """Per-token ``values`` of the model's output (``[b, s]``) as ``[n, L]`` rows, one per sample."""
    return values[0][micro["unpack_index"]] if packing.is_packed(micro) else values


def _rows(reports: list, micro_batches: list, name: str, share: TrainingBatch) -> torch.Tensor:
    """``[n, S]``: the micro-batches' per-sample ``name`` put back in ``share``'s order and width."""
    first = reports[0][name]
    out = torch.zeros(share.size, share.seq_length, dtype=first.dtype, device=first.device)
    for report, micro in zip(reports, micro_batches):
        values = report[name]
        out[micro["rows"], : values.shape[1]] = values
    return out


def _bare(chunks: list) -> list:
    """The ``GPTModel`` chunks inside ``chunks`` (DDP-wrapped or bare)."""
    return [c.module if hasattr(c, "module") else c for c in chunks]


def _on_device(micro: dict) -> dict:
    """The micro-batch on this rank's GPU (where the model and NCCL are), as is on a CPU-only run."""
    if not torch.cuda.is_available():
        return micro
    device = rank_device()
    return {name: value.to(device, non_blocking=True) for name, value in micro.items()}


def _attach(local: TrainingBatch, shares: list[TrainingBatch], name: str, values) -> None:
    """Set ``name`` (``[n_local, S]``, or None off the last stage) on the rank's batch and each mini-batch share."""
    if values is None:
        return
    setattr(local, name, values)
    start = 0
    for share in shares:
        setattr(share, name, values[start : start + share.size])
        start += share.size


def _gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate ``tensor`` (``[n]`` or ``[n, S]``, the same ``n`` on every rank, ``S`` the rank's own: each
    share is padded to its longest sample) along dim 0 across ``group``, in rank order, zero-padded to the
    widest ``S``."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor
    if tensor.dim() == 2:
        width = torch.tensor([tensor.shape[1]], device=tensor.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=group)
        tensor = torch.nn.functional.pad(tensor, (0, int(width) - tensor.shape[1]))
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)
