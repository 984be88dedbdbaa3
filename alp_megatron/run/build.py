"""Everything a run holds, built once at start (and restored from the latest checkpoint on ``--resume``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.distributed as dist
import yaml

from alp_megatron.config_loading import to_dict
from alp_megatron.errors import AlpError, ConfigError
from alp_megatron.trainer.checkpoint import RunProgress, find_latest_checkpoint, load_checkpoint
from alp_megatron.trainer.policy import Policy
from alp_megatron.bridge.weight_update import (TrainerWeightSync, check_rollout_precision,
                                                check_transport_reaches_engines)

if TYPE_CHECKING:  # imported where built: the rollout side exists on global rank 0 only
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import ModelConfig
    from alp_megatron.rewards.base import AsyncRewardFunction, RewardFunction
    from alp_megatron.rollout.fleet import RolloutEngines
    from alp_megatron.run.metrics import MetricsLogger
    from alp_megatron.run.schedule import Schedule

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    config: Any  # the RunConfig (alp_megatron.config, which imports the components' configs from here)
    policy: Policy
    weight_sync: TrainerWeightSync
    checkpoint_dir: str
    start_step: int
    weight_version: int
    divisible_by: int
    pad_to_multiple: int
    # global rank 0 only:
    tokenizer: Any = None  # a transformers tokenizer
    engines: Optional["RolloutEngines"] = None
    schedule: Optional["Schedule"] = None
    reward_fn: Optional[Union["RewardFunction", "AsyncRewardFunction"]] = None
    metrics_logger: Optional["MetricsLogger"] = None
    last_saved_step: int = -1
    verify_prompts: list = field(default_factory=list)

    def verify_engines(self) -> dict:
        """The bridge's equality check on every engine: sampled weights and greedy-probe logprobs against the
        trainer's unperturbed model. Collective; raises WeightMismatchError naming what differs."""
        from alp_megatron.bridge.verify import comparable_names, generate_greedy, verify_update

        rank0 = dist.get_rank() == 0
        precision = self.config.weight_sync.rollout_precision
        names = set()
        tensors = {}
        for bucket in self.policy.hf_buckets(self.config.weight_sync.bucket_bytes):
            if rank0:
                names.update(name for name, _ in bucket)
                tensors.update({name: t.clone() for name, t in bucket
                                if name in comparable_names([name], fp8_served=precision == "fp8")})
        sequences = None
        if rank0:
            controls = self.engines.serving_controls()  # not one that is restarting or waiting for weights
            probe = generate_greedy(controls[0], self.verify_prompts, max_new_tokens=4,
                                    api_key=self.config.rollout.api_key)
            sequences = [list(sequence) for sequence, _ in probe]
        box = [sequences]
        dist.broadcast_object_list(box, src=0)
        reference = self.policy.unperturbed_logprobs(box[0])
        worst = {"verify_max_weight_diff": 0.0, "verify_max_logprob_diff": 0.0}
        if rank0:
            for control in controls:
                # Under FP8 the engine's logprobs differ from the trainer's by the rounding itself: the weights
                # are checked in their FP8 form and the logprob difference is reported, not asserted.
                report = verify_update(control, tensors, self.verify_prompts, reference=lambda seqs: reference,
                                       api_key=self.config.rollout.api_key, fp8_served=precision == "fp8",
                                       rounded_fp8=precision == "fp8_rounded",
                                       served_dtype=_SERVED_DTYPES.get(self.config.rollout.server_dtype),
                                       logprob_atol=1e-4 if precision == "native" else float("inf"))
                worst["verify_max_weight_diff"] = max(worst["verify_max_weight_diff"], report.max_weight_diff)
                worst["verify_max_logprob_diff"] = max(worst["verify_max_logprob_diff"], report.max_logprob_diff)
        return worst

    def close(self) -> None:
        if self.engines is not None:  # the other ranks no longer stand by to push weights into a restarted engine
            self.engines.on_stale = None
        if self.schedule is not None:
            self.schedule.close()
        self.weight_sync.close()
        if self.engines is not None:
            self.engines.close()
        if self.metrics_logger is not None:
            self.metrics_logger.close()



# rollout.server_dtype -> the dtype the engine's weights are held in (auto: the checkpoint's, as exported)
_SERVED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                  "float32": torch.float32, "float": torch.float32}


def engine_routes(megatron: "ModelConfig", arch: "ModelArch") -> Optional[tuple[int, int, int]]:
    """(layers, top_k, experts) of the MoE routes the engines return with every sample, when the trainer
    replays them or reports its agreement with them; None: no routes asked for (they cost
    ``tokens x layers x top_k`` bytes per sample, see :mod:`alp_megatron.model.routing`)."""
    if megatron.routing_replay == "rollout" or megatron.routing_agreement:
        return arch.num_layers, arch.moe_topk, arch.num_experts
    return None


def _base_model(config) -> str:
    """The HF checkpoint the run starts from; the embedded tiny model is built (once) by rank 0."""
    if config.model.hf_path:
        check_model_folder(config.model.hf_path)
        return config.model.hf_path
    path = os.path.join(config.run.output_dir, "base_model")
    if dist.get_rank() == 0:
        from alp_megatron.model.warm_start import ensure_warm_started_model

        ensure_warm_started_model(path, config.data.toy_task or "rev4", config.model.tiny_warm_start_steps,
                                  seed=config.run.seed, num_layers=config.model.tiny_num_layers,
                                  architecture=config.model.tiny_architecture)
    dist.barrier()
    return path


def _prompt_batches(config, tokenizer, position: Optional[dict]):
    from alp_megatron.data.batches import DataPosition, PromptBatches
    from alp_megatron.data.prompts import PromptDataConfig, PromptDataset
    from alp_megatron.data.toy import ToyTaskPrompts

    data = config.data
    if data.toy_task:
        source = ToyTaskPrompts(data.toy_task, tokenizer)
    else:
        source = PromptDataset(PromptDataConfig(paths=data.paths, prompt_field=data.prompt_field,
                                                label_field=data.label_field,
                                                apply_chat_template=data.apply_chat_template,
                                                max_prompt_tokens=data.max_prompt_tokens, shuffle=data.shuffle,
                                                seed=data.seed), tokenizer)
    return PromptBatches(source, data.prompts_per_step, seed=data.seed, shuffle=data.shuffle,
                         position=DataPosition.from_dict(position) if position else None)


def check_model_folder(hf_path: str) -> None:
    if not os.path.isfile(os.path.join(hf_path, "config.json")):
        raise ConfigError("model.hf_path", f"{hf_path!r} is not a folder with a config.json",
                          "point it at a Hugging Face checkpoint folder (config.json, safetensors, tokenizer); "
                          "download hub models first, e.g. with `hf download`")


def check_run_inputs(config) -> None:
    """What can be checked before anything starts, beyond the config's own checks: the model folder (and FP8
    rollouts of its architecture), the reward function and a multi-turn rollout's tool and turn format (the dataset rows are checked when rank 0
    reads them, before the model is built)."""
    if config.model.hf_path:
        from alp_megatron.bridge.hf_folder import arch_from_hf_folder

        check_model_folder(config.model.hf_path)
        # the architecture only: the machine checking a config (a login node) may have no GPU of the run's
        check_rollout_precision(config.weight_sync.rollout_precision, arch_from_hf_folder(config.model.hf_path),
                                config.rollout.server_tp_size, cuda_available=True)
    reward_function(config)
    if config.rollout.agent is not None:  # an unknown tool or turn format fails now, not at the first rollout
        from alp_megatron.rollout.tools import load_format, load_tool

        load_tool(config.rollout.agent.tool, config.rollout.agent.sandbox, field="rollout.agent.tool")
        load_format(config.rollout.agent.format, field="rollout.agent.format")


def reward_function(config):
    from alp_megatron.data.toy import toy_task
    from alp_megatron.rewards.base import load_reward_function
    from alp_megatron.rewards.math_verifier import MathVerifier

    name = config.reward.function or (toy_task(config.data.toy_task).reward if config.data.toy_task else "math")
    return MathVerifier(config.reward.math) if name == "math" else load_reward_function(name)


def build_run(config, resume: bool) -> RunState:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from transformers import AutoTokenizer

    from alp_megatron.bridge.fp8 import write_fp8_checkpoint
    from alp_megatron.bridge.hf_folder import arch_from_hf_folder
    from alp_megatron.model.provider import initialize_parallel
    from alp_megatron.rollout.fleet import RolloutEngines, server_log_dir
    from alp_megatron.rollout.server import check_servable
    from alp_megatron.run.metrics import MetricsLogger
    from alp_megatron.run.schedule import Asynchronous, OneStepOff, Synchronous
    from alp_megatron.run.scoring import reward_samples

    check_transport_reaches_engines(config.weight_sync.transport, config.rollout.mode, torch.cuda.is_available())
    out = config.run.output_dir
    checkpoint_dir = os.path.join(out, "checkpoints")
    latest = find_latest_checkpoint(checkpoint_dir)
    if latest and not resume:
        raise AlpError(f"{out} already holds checkpoint {latest}: pass --resume to continue that run, or choose "
                       "another --output-dir (nothing was overwritten)")
    data_parallel = initialize_parallel(config.parallel, seed=config.run.seed)
    rank0 = dist.get_rank() == 0
    hf_dir = _base_model(config)
    precision = config.weight_sync.rollout_precision
    check_rollout_precision(precision, arch_from_hf_folder(hf_dir), config.rollout.server_tp_size,
                            torch.cuda.is_available())
    tokenizer = engines = schedule = reward_fn = metrics_logger = batches = None
    if rank0:  # data and rewards first: a bad row or reward path fails before anything heavy starts
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        reward_fn = reward_function(config)
        batches = _prompt_batches(config, tokenizer, None)
    policy = Policy.build(config, hf_dir)
    progress, resumed = RunProgress(), bool(resume and latest)
    if resumed:
        try:
            trainer_state = load_checkpoint(latest, policy.ddp_chunks, policy.optimizer, policy.scheduler)
        except AlpError:
            raise
        except (Exception, CheckpointException) as error:  # lead Megatron's long mismatch message with ours
            failures = getattr(error, "failures", None)  # torch's CheckpointException wraps each rank's error
            cause = next(iter(failures.values()))[0] if failures else None  # (exception, traceback) pairs
            raise AlpError(f"checkpoint {latest} does not fit this model ({policy.arch.architecture}, "
                           f"{policy.arch.num_layers} layers, hidden {policy.arch.hidden_size}): "
                           f"{cause or error}. "
                           "Resume with the config that wrote it, or use another --output-dir") from error
        progress = RunProgress.from_state(trainer_state)
        progress.restore(policy.actor, batches)  # batches: rank 0's prompt stream, None elsewhere
        logger.info("resumed from %s (next step %d)", latest, progress.next_step)
    elif resume:
        logger.warning("--resume: no checkpoint in %s; starting a new run", checkpoint_dir)
    weight_version, start_step = progress.weight_version, progress.next_step

    urls, tp_sizes = (), ()
    if rank0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as handle:
            yaml.safe_dump(to_dict(config), handle, sort_keys=False)
        arch = policy.arch
        check_servable(arch.architecture, arch.tie_word_embeddings)
        routes = engine_routes(config.model.megatron, arch)
        served_dir = hf_dir
        if precision == "fp8" and not config.rollout.server_urls:  # the servers start from its FP8 copy
            served_dir = os.path.join(out, "base_model_fp8")
            if not os.path.isdir(served_dir):
                write_fp8_checkpoint(hf_dir, served_dir, config.weight_sync.fp8_scale_format)
        engines = RolloutEngines(config.rollout, served_dir, server_log_dir(out), f"v{weight_version}",
                                 arch.vocab_size, trainer_gpus_on_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                 routed_experts=routes)
        urls, tp_sizes = engines.worker_urls, engines.engine_tp_sizes
        first_group = progress.next_group_id
        dynamic = dict(dynamic_sampling=config.rollout.dynamic_sampling,
                       score=lambda group: reward_samples(group, reward_fn, tokenizer))
        if config.rollout.max_staleness is not None:
            schedule = Asynchronous(engines, batches, first_group, config.rollout.max_staleness, **dynamic)
        elif config.rollout.one_step_off:
            schedule = OneStepOff(engines, batches, first_group, **dynamic)
        else:
            schedule = Synchronous(engines, batches, first_group, colocated=config.rollout.mode == "colocated",
                                   **dynamic)
        metrics_logger = MetricsLogger(out, config.metrics, to_dict(config),
                                       resume_after_step=start_step - 1 if resumed else None)
    weight_sync = TrainerWeightSync(config.weight_sync, urls, tp_sizes, config.rollout.api_key)
    state = RunState(
        config=config, policy=policy, weight_sync=weight_sync, checkpoint_dir=checkpoint_dir,
        start_step=start_step, weight_version=weight_version,
        divisible_by=config.actor.num_mini_batches * data_parallel
        * (1 if config.actor.max_tokens_per_microbatch is not None else config.actor.micro_batch_size),
        pad_to_multiple=config.parallel.tensor_parallel if config.parallel.sequence_parallel else 1,
        tokenizer=tokenizer, engines=engines, schedule=schedule, reward_fn=reward_fn,
        metrics_logger=metrics_logger, last_saved_step=start_step - 1 if resumed else -1,
    )
    if rank0:
        state.verify_prompts = [list(batches.source[i].prompt_ids) for i in range(min(2, len(batches.source)))]
    # Engines launched here start from the base checkpoint; resumed weights must reach them, engines started
    # outside (rollout.server_urls) hold whatever they were started or last updated with, and fp8_rounded
    # engines must hold the rounded weights from the first rollout on.
    if weight_version > 0 or config.rollout.server_urls or precision == "fp8_rounded":
        weight_sync.update(policy, f"v{weight_version}")
    return state
