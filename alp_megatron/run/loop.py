"""The RL loop: rollout -> reward -> advantages -> train -> weight update -> metrics -> checkpoint.

Every rank runs :func:`run`. Global rank 0 also holds the rollout side (:class:`RolloutEngines`), the data,
the rewards and the metrics sinks; each data-parallel rank receives its share of the training batch
(:func:`~alp_megatron.trainer.distribute.distribute`).
"""

from __future__ import annotations

import logging
import os
import time

import torch.distributed as dist

from alp_megatron.trainer.checkpoint import RunProgress, save_checkpoint
from alp_megatron.trainer.distribute import distribute
from alp_megatron.run.metrics import write_rollouts
from alp_megatron.run.scoring import score_rollout, training_batch
from alp_megatron.run.build import RunState, build_run

logger = logging.getLogger(__name__)


def run(config, resume: bool = False) -> RunState:
    """Train ``config.run.steps`` RL steps (continuing from the latest checkpoint when ``resume``)."""
    state = build_run(config, resume)
    policy, rank0 = state.policy, dist.get_rank() == 0
    if rank0:  # while rank 0 waits for rollouts, a restarted engine gets the current weights (every rank exports)
        state.engines.on_stale = lambda urls: _push_current_weights(state, urls)
    try:
        for step in range(state.start_step, config.run.steps):
            started = time.perf_counter()
            batch = None
            if rank0:
                busy_before = state.engines.busy_seconds()
                batch, metrics = _next_batch(state, step)
            has_batch, metrics = _on_rank0(state, lambda: [batch is not None, metrics])
            started_distribute = time.perf_counter()
            local = distribute(batch, config.actor, pad_to_multiple=state.pad_to_multiple) if has_batch else None
            metrics["time_distribute"] = time.perf_counter() - started_distribute
            train_start = time.perf_counter()
            if rank0:
                state.schedule.before_train()
            report = policy.actor.train_local(local) if local is not None else None
            if rank0:
                state.schedule.after_train()
            metrics["time_train"] = time.perf_counter() - train_start
            _on_rank0(state, lambda: _before_sync(state))
            state.weight_version += 1
            metrics.update(state.weight_sync.update(policy, f"v{state.weight_version}", **_sync_targets(state)))
            if rank0:
                state.engines.after_sync()  # restarted engines this update reached serve again
            if config.weight_sync.verify_every and (step + 1) % config.weight_sync.verify_every == 0:
                metrics.update(state.verify_engines())
            metrics.update(_training_metrics(report, policy.sigma_by_layer(), policy.noise_ratio_by_layer()),
                           weight_version=state.weight_version, run_start_step=state.start_step,
                           time_step=time.perf_counter() - started)
            if rank0:
                metrics.update(state.engines.fleet_metrics(), **_idle_shares(state, metrics, busy_before))
                record = state.metrics_logger.write(step, metrics)
                logger.info(_summary(step, config.run.steps, record))
            if config.checkpoint.save_every and (step + 1) % config.checkpoint.save_every == 0:
                _save(state, step)
        if state.last_saved_step != config.run.steps - 1 and state.start_step < config.run.steps:
            _save(state, config.run.steps - 1)
        if config.run.export_hf_at_end:
            policy.save_hf(os.path.join(config.run.output_dir, "hf_final"))
    finally:
        state.close()
    return state


def _next_batch(state: RunState, step: int) -> list:
    """Global rank 0: the step's rollout, scored and packed into ``[TrainingBatch or None, metrics]``."""
    config = state.config
    rollout = state.schedule.next_rollout()
    scored = score_rollout(rollout.batch, state.reward_fn, state.tokenizer, policy_version=state.weight_version,
                           max_staleness=config.rollout.max_staleness)
    batch = training_batch(scored, config.reward.advantage == "grpo", state.divisible_by,
                                state.tokenizer.pad_token_id or 0, state.pad_to_multiple,
                                state.policy.arch.max_position_embeddings, first_sample_id=step * 10**6)
    if config.metrics.save_rollouts and batch is not None:
        write_rollouts(config.run.output_dir, step, scored.samples)
    return [batch, {**scored.metrics, **rollout.metrics, "time_rollout": rollout.seconds}]


def _on_rank0(state: RunState, work):
    """Every rank: global rank 0 runs ``work()`` and its result reaches every rank. Meanwhile the others stand
    by for rank 0's requests to push the current weights into restarted engines (:func:`_push_current_weights`,
    a collective) and do their part of each."""
    if dist.get_rank() == 0:
        return _broadcast(("done", work()))[1]
    while True:
        kind, payload = _broadcast(None)
        if kind != "push":
            return payload
        state.weight_sync.update(state.policy, f"v{state.weight_version}")


def _push_current_weights(state: RunState, urls: list) -> None:
    """Global rank 0, inside :func:`_on_rank0`: the current weights into the restarted engines ``urls``, which
    then serve again."""
    _broadcast(("push", urls))
    state.weight_sync.update(state.policy, f"v{state.weight_version}", targets=lambda: urls)
    state.engines.return_to_service(urls)


def _before_sync(state: RunState) -> None:
    """Rank 0 before a weight update: the rollout running on the old weights ends, and some engine is up."""
    state.schedule.before_sync()
    state.engines.wait_for_a_server()


def _sync_targets(state: RunState) -> dict:
    """Rank 0's choice of engines for the step's update (all but those dead or restarting), and the restart
    of an engine that died mid-update before the update is retried."""
    if state.engines is None:
        return {}
    return {"targets": state.engines.sync_targets, "before_retry": state.engines.recover_now}


def _idle_shares(state: RunState, metrics: dict, busy_before: float) -> dict:
    """The step's shares of time the trainer waited for a rollout and the engines had no rollout to run."""
    step = metrics["time_step"]
    busy = state.engines.busy_seconds() - busy_before
    return {"time_trainer_idle_share": metrics["time_rollout"] / step,
            "time_rollout_idle_share": max(0.0, 1 - busy / step)}


def _save(state: RunState, step: int) -> None:
    progress = RunProgress.after_step(step, state.weight_version, state.policy.actor,
                                      state.schedule.resume_state() if state.schedule else {})
    trainer_state = _broadcast(progress.to_state())  # rank 0 holds the data position; rank 0 writes it
    save_checkpoint(state.checkpoint_dir, step + 1, state.policy.ddp_chunks, state.policy.optimizer,
                    state.policy.scheduler, trainer_state, state.config.checkpoint)
    state.last_saved_step = step


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _training_metrics(report, sigmas: dict, noise_ratios: dict) -> dict:
    values = list(sigmas.values()) or [float("nan")]
    metrics = {"sigma_mean": sum(values) / len(values), "sigma_min": min(values), "sigma_max": max(values)}
    metrics.update({f"sigma_layer{layer}": sigma for layer, sigma in sigmas.items()})
    if noise_ratios:  # the realised relative size of the noise, ||h' - h|| / ||h||, per layer
        metrics["noise_ratio_mean"] = sum(noise_ratios.values()) / len(noise_ratios)
        metrics.update({f"noise_ratio_layer{layer}": ratio for layer, ratio in noise_ratios.items()})
    if report is None:
        return {**metrics, "skipped_steps": 0.0, "grad_norm": float("nan")}
    applied_norms = [g for g, ok in zip(report.grad_norms, report.applied) if ok]
    metrics.update({k: v for k, v in report.metrics.items() if isinstance(v, (int, float))})
    metrics.update(grad_norm=sum(applied_norms) / len(applied_norms) if applied_norms else float("nan"),
                   grad_norm_max=max(report.grad_norms), skipped_steps=float(report.skipped_steps),
                   loss=sum(report.losses) / len(report.losses), optimizer_steps=float(len(report.losses)))
    return metrics


def _summary(step: int, steps: int, record: dict) -> str:
    return (f"step {step + 1}/{steps}  reward {record.get('reward_mean', float('nan')):.3f}  "
            f"ratio_seq_max {record.get('ratio_seq_max', float('nan')):.3f}  "
            f"sigma {record.get('sigma_mean', float('nan')):.4f}  grad_norm {record.get('grad_norm', float('nan')):.3f}  "
            f"v{record['weight_version']}  {record['time_step']:.1f}s (rollout {record.get('time_rollout', 0):.1f} "
            f"train {record['time_train']:.1f} sync {record['time_sync']:.1f})")
