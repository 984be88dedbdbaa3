"""The run config of ``alp-train``: one YAML file, every field overridable as ``section.key=value``.

Each section is the component's own frozen dataclass (``alp`` = :class:`PerturbationConfig`, ``loss`` =
:class:`LossConfig`, ...); the few run-level sections are defined here. ``load_run_config`` checks every key,
type and value at start, naming the field and the fix.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from alp_megatron.alp.loss import LossConfig
from alp_megatron.alp.perturbation import PerturbationConfig
from alp_megatron.bridge.transports.disk import DiskTransportConfig
from alp_megatron.bridge.transports.distributed import DistributedTransportConfig
from alp_megatron.bridge.transports.tensor import TensorTransportConfig
from alp_megatron.config_loading import build, load_yaml, merge, parse_overrides
from alp_megatron.errors import ConfigError
from alp_megatron.model.provider import ModelConfig, ParallelConfig
from alp_megatron.rewards.math_verifier import MathVerifierConfig
from alp_megatron.rollout.agent import AgentConfig
from alp_megatron.rollout.types import SamplingConfig
from alp_megatron.trainer.actor import CONTEXT_PARALLEL_NOT_BUILT, ActorConfig
from alp_megatron.trainer.checkpoint import CheckpointConfig
from alp_megatron.trainer.step import OptimizerSettings
from alp_megatron.rollout.dynamic_sampling import DynamicSamplingConfig
from alp_megatron.run.metrics import MetricsConfig


ROLLOUT_MODES = ("colocated", "disaggregated")
PARTIAL_ROLLOUTS = ("continue", "restart")
LABEL_REWARDS = ("math", "exact_match", "positional_match")  # built-in rewards that compare with the label

# The ServerConfig fields of each launched server, and the run config fields they come from.
_SERVER_SETTINGS = {"tp_size": "rollout.server_tp_size", "dtype": "rollout.server_dtype",
                    "mem_fraction": "rollout.server_mem_fraction", "extra_args": "rollout.server_extra_args",
                    "host": "rollout.host", "api_key": "rollout.api_key",
                    "startup_timeout_s": "rollout.startup_timeout_s"}
_SET_BY_THE_TRAINER = {**_SERVER_SETTINGS, "base_gpu_id": "rollout.server_first_gpu", "model_path": "model.hf_path"}

TINY_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class RunSection:
    """``steps``: RL steps (rollout + train + sync). ``output_dir``: checkpoints, metrics.jsonl, logs, HF export."""

    steps: int = 20
    output_dir: str = "runs/alp"
    seed: int = 1234
    export_hf_at_end: bool = True

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("run.steps", f"must be >= 1, got {self.steps}", "use the number of RL steps to run")
        if not self.output_dir:
            raise ConfigError("run.output_dir", "is empty", "give a directory for checkpoints and metrics")


@dataclass(frozen=True)
class ModelSection:
    """``hf_path``: the HF checkpoint to start from; ``null`` builds the embedded tiny char-level Llama (and
    warm-starts it for ``tiny_warm_start_steps`` supervised steps on the toy task; ``tiny_num_layers`` decoder
    layers of ``tiny_architecture``: the demo's Llama, or ``Qwen3MoeForCausalLM``). ``megatron``: how the
    trainer runs it (backend, dtype, recompute, MoE dispatcher, FP8)."""

    hf_path: Optional[str] = None
    tiny_warm_start_steps: int = 40
    tiny_num_layers: int = 2
    tiny_architecture: str = "LlamaForCausalLM"
    megatron: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self):
        if self.tiny_architecture not in TINY_ARCHITECTURES:
            raise ConfigError("model.tiny_architecture", f"{self.tiny_architecture!r} is not a tiny model",
                              f"use one of {TINY_ARCHITECTURES} (the dense demo's, or a tiny MoE)")
        if self.tiny_warm_start_steps < 0:
            raise ConfigError("model.tiny_warm_start_steps", "must be >= 0", "use 0 to skip the warm start")
        if self.tiny_num_layers < 1:
            raise ConfigError("model.tiny_num_layers", f"must be >= 1, got {self.tiny_num_layers}",
                              "use 2 (the demo's model) or more")


@dataclass(frozen=True)
class DataSection:
    """Prompts: ``toy_task`` (add1, sub1, rev4: generated, for the embedded default) or ``paths`` (JSONL /
    Parquet files) with their fields. ``prompts_per_step`` prompts per rollout, each sampled
    ``rollout.sampling.n`` times."""

    toy_task: Optional[str] = "rev4"
    paths: tuple[str, ...] = ()
    prompt_field: str = "prompt"
    label_field: Optional[str] = "label"
    apply_chat_template: bool = True
    max_prompt_tokens: int = 2048
    shuffle: bool = True
    seed: int = 0
    prompts_per_step: int = 32

    def __post_init__(self):
        if bool(self.toy_task) == bool(self.paths):
            raise ConfigError("data.paths", "exactly one of data.toy_task and data.paths must be set",
                              "set data.toy_task (e.g. rev4) or data.paths (JSONL/Parquet files) and null the other")
        if self.prompts_per_step < 1:
            raise ConfigError("data.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}", "use e.g. 32")
        if self.seed < 0:
            raise ConfigError("data.seed", f"must be >= 0, got {self.seed}", "use any non-negative integer")
        if self.max_prompt_tokens < 1:
            raise ConfigError("data.max_prompt_tokens", f"must be >= 1, got {self.max_prompt_tokens}",
                              "use the longest prompt, in tokens, to keep (longer ones are skipped)")


@dataclass(frozen=True)
class RewardSection:
    """``function``: a built-in reward (``math``, ``exact_match``, ``positional_match``) or ``pkg.mod:fn``;
    ``null`` takes the toy task's own. ``advantage``: ``grpo`` (group std-normalised) or ``dr_grpo``."""

    function: Optional[str] = None
    advantage: str = "grpo"
    math: MathVerifierConfig = field(default_factory=MathVerifierConfig)

    def __post_init__(self):
        if self.advantage not in ("grpo", "dr_grpo"):
            raise ConfigError("reward.advantage", f"{self.advantage!r} is not supported", "use grpo or dr_grpo")


@dataclass(frozen=True)
class RolloutSection:
    """``mode``: ``colocated`` (SGLang on the trainer's GPUs; it releases memory while Megatron trains) or
    ``disaggregated`` (SGLang elsewhere: ``server_urls`` when started outside, else launched here).
    ``one_step_off``: overlap the rollout of step k+1 with training of step k (disaggregated only).
    ``servers``: SGLang servers to launch (each ``server_tp_size`` GPUs, side by side from
    ``server_first_gpu``: None means GPU 0 when colocated, the first GPU after this node's trainer ranks when
    disaggregated); ``router``: put sglang-router in
    front (``router_url``: a router started outside, in front of ``server_urls``). ``server_dtype``: the engine's dtype (lower than the trainer's = controlled mismatch)."""

    mode: str = "colocated"
    one_step_off: bool = False
    # Asynchronous training (alp_megatron.run.schedule.Asynchronous): rollouts run up to this many batches ahead
    # of training and no trained token is older than this many weight versions; null: not asynchronous.
    max_staleness: Optional[int] = None
    # What a request in flight when the weights change does: continue (its later tokens come from the new
    # weights, each token records its version) or restart (generated again from the prompt on the new weights;
    # needs weight_sync.pause_mode=abort).
    partial_rollouts: str = "continue"
    servers: int = 1
    server_tp_size: int = 1
    server_first_gpu: Optional[int] = None
    server_dtype: str = "auto"
    server_mem_fraction: Optional[float] = None
    server_extra_args: tuple[str, ...] = ()
    server_urls: tuple[str, ...] = ()
    router_url: Optional[str] = None
    router: bool = False
    api_key: Optional[str] = None
    host: str = "127.0.0.1"
    startup_timeout_s: float = 300.0
    groups_in_flight: int = 64
    # A launched server that dies is restarted, gets the current weights and serves again (alp_megatron.rollout.
    # fleet); the run stops when a server's restart fails max_restart_attempts times in a row and none is left.
    restart_dead_servers: bool = True
    max_restart_attempts: int = 3
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Off-policy studies only: the engine samples at this temperature while the trainer scores the policy
    # at sampling.temperature. The engine returns the logprobs of the distribution it sampled from (the
    # loss denominator), so this is a controlled behaviour-policy mismatch. null: no mismatch.
    engine_temperature: Optional[float] = None
    # Multi-turn rollouts with a tool (alp_megatron.rollout.agent): null keeps single-turn sampling.
    agent: Optional[AgentConfig] = None
    # DAPO's dynamic sampling (alp_megatron.rollout.dynamic_sampling): null trains on every group.
    dynamic_sampling: Optional[DynamicSamplingConfig] = None

    def __post_init__(self):
        if self.mode not in ROLLOUT_MODES:
            raise ConfigError("rollout.mode", f"{self.mode!r} is not a rollout mode", f"use one of {ROLLOUT_MODES}")
        if self.one_step_off and self.mode == "colocated":
            raise ConfigError("rollout.one_step_off", "needs rollout.mode=disaggregated",
                              "colocated SGLang and Megatron share GPUs and take turns; set mode=disaggregated")
        if self.max_staleness is not None:
            if isinstance(self.max_staleness, bool) or self.max_staleness < 1:
                raise ConfigError("rollout.max_staleness", f"{self.max_staleness!r} is not a positive number of "
                                  "weight versions", "use 1 or more (1: one step ahead, partial rollouts), or null "
                                  "for rollouts that never overlap a weight update")
            if self.one_step_off:
                raise ConfigError("rollout.one_step_off", "is set together with rollout.max_staleness",
                                  "choose one: one_step_off finishes each rollout before the weights change, "
                                  "max_staleness lets updates land mid-rollout")
            if self.mode == "colocated":
                raise ConfigError("rollout.max_staleness", "needs rollout.mode=disaggregated",
                                  "colocated SGLang and Megatron share GPUs and take turns; set mode=disaggregated")
            if self.dynamic_sampling is not None:  # its abort of the leftovers ends every request on the engines
                raise ConfigError("rollout.dynamic_sampling", "is not built for asynchronous training: once a batch "
                                  "is full it aborts what still generates, which would end the batches running "
                                  "ahead too", "use rollout.one_step_off with dynamic sampling, or "
                                  "rollout.max_staleness without it")
        if self.partial_rollouts not in PARTIAL_ROLLOUTS:
            raise ConfigError("rollout.partial_rollouts", f"{self.partial_rollouts!r} is not a choice",
                              f"use one of {PARTIAL_ROLLOUTS}")
        if self.partial_rollouts == "restart" and self.agent is not None:
            raise ConfigError("rollout.partial_rollouts", "restart is not built for multi-turn trajectories",
                              "use continue with rollout.agent")
        if self.router_url and not self.server_urls:
            raise ConfigError("rollout.router_url", "is set without rollout.server_urls",
                              "list the router's workers in rollout.server_urls (weight updates go to each of them)")
        if self.engine_temperature is not None and not self.engine_temperature > 0:
            raise ConfigError("rollout.engine_temperature", f"must be > 0, got {self.engine_temperature}",
                              "use e.g. 1.1 for a controlled mismatch, or null for none")
        if self.server_first_gpu is not None and self.server_first_gpu < 0:
            raise ConfigError("rollout.server_first_gpu", f"{self.server_first_gpu} is not a GPU index",
                              "use 0, 1, ... or null for the default placement")
        if self.servers < 1 and not self.server_urls:
            raise ConfigError("rollout.servers", "must be >= 1", "launch at least one SGLang server")
        for name, url in [(f"rollout.server_urls[{i}]", u) for i, u in enumerate(self.server_urls)] + [
                ("rollout.router_url", self.router_url)]:
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(name, f"{url!r} is not an http(s) URL",
                                  "give the base URL, e.g. http://10.0.0.5:30000")
        if self.max_restart_attempts < 1:
            raise ConfigError("rollout.max_restart_attempts", f"must be >= 1, got {self.max_restart_attempts}",
                              "use e.g. 3 (failed restarts in a row before a server is given up), or "
                              "rollout.restart_dead_servers=false to stop the run when a server dies")
        if self.groups_in_flight < 1:
            raise ConfigError("rollout.groups_in_flight", f"must be >= 1, got {self.groups_in_flight}",
                              "use e.g. 64 (concurrent /generate calls)")
        if not self.server_urls:
            _check_launch_settings(self)


def _check_launch_settings(rollout: "RolloutSection") -> None:
    """The settings each launched server gets, checked now (not after the model has loaded), by their names here."""
    from alp_megatron.rollout.server import ServerConfig

    settings = {name: getattr(rollout, key.split(".")[1]) for name, key in _SERVER_SETTINGS.items()}
    try:
        ServerConfig(model_path="the-model-of-model.hf_path", **settings)
    except ConfigError as error:
        fix = re.sub(r"set ServerConfig\.(\w+) instead",
                     lambda m: (f"set {_SET_BY_THE_TRAINER[m.group(1)]} instead" if m.group(1) in _SET_BY_THE_TRAINER
                                else "leave it out: the trainer sets it"), error.fix)
        raise ConfigError(_SERVER_SETTINGS.get(error.field, f"rollout.{error.field}"), error.problem, fix) from None


@dataclass(frozen=True)
class WeightSyncSection:
    """``transport``: ``tensor`` (CUDA IPC / shared CPU memory), ``distributed`` (NCCL / gloo group) or
    ``disk``. ``bucket_bytes``: the most bytes exported and sent at once. ``fp8``: ``auto`` quantises to
    128x128 block FP8 when the served checkpoint is FP8, ``on``/``off`` force it; ``fp8_scale_format``:
    ``fp32`` (FP8 checkpoints) or ``ue8m0`` (power-of-two scales, DeepGEMM on Blackwell);
    ``fp8_ignored_layers``: module paths the engines keep unquantised beyond the checkpoint's own list.
    ``tensor``, ``distributed``, ``disk``: the chosen transport's own settings (e.g. ``disk.root``, a folder
    the engines can read, for engines on other hosts; ``distributed.master_address``).
    ``rollout_precision``: what the engines compute with while the trainer keeps its own precision: ``native``
    (``rollout.server_dtype``); ``fp8`` (GPU only: launched servers serve a 128x128 block-FP8 copy of the
    starting checkpoint, ``<output_dir>/base_model_fp8``, and every update is sent as e4m3 blocks; servers
    given by URL must serve such a checkpoint); ``fp8_rounded`` (any device: the engines keep their dtype and
    get every linear SGLang would quantise rounded through e4m3 blocks and dequantised, i.e. FP8 weight
    rounding without FP8 activations or FP8 matmuls; the CPU stand-in for ``fp8``)."""

    transport: str = "tensor"
    bucket_bytes: int = 256 * 2**20
    pause_mode: str = "retract"
    fp8: str = "auto"
    fp8_scale_format: str = "fp32"
    fp8_ignored_layers: tuple[str, ...] = ()
    retries: int = 1
    verify_every: int = 0  # steps between full weight-equality checks of the engines (0: never)
    rollout_precision: str = "native"
    check_names: bool = True  # check each bucket against the served checkpoint's names and shapes, when readable
    tensor: TensorTransportConfig = field(default_factory=TensorTransportConfig)
    distributed: DistributedTransportConfig = field(default_factory=DistributedTransportConfig)
    disk: DiskTransportConfig = field(default_factory=DiskTransportConfig)

    def transport_options(self) -> dict:
        """The chosen transport's settings, as :class:`WeightSyncConfig` takes them."""
        return asdict(getattr(self, self.transport))

    def __post_init__(self):
        from alp_megatron.bridge.weight_sync import check_sync_options

        check_sync_options(self.transport, self.pause_mode, self.fp8, self.fp8_scale_format, self.retries,
                           self.rollout_precision)
        if self.bucket_bytes < 2**16:
            raise ConfigError("weight_sync.bucket_bytes", f"{self.bucket_bytes} is too small", "use >= 64 KiB")
        if self.verify_every < 0:
            raise ConfigError("weight_sync.verify_every", f"must be >= 0, got {self.verify_every}",
                              "use 0 (never) or the number of steps between full weight-equality checks")


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    alp: PerturbationConfig = field(default_factory=PerturbationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    actor: ActorConfig = field(default_factory=ActorConfig)
    data: DataSection = field(default_factory=DataSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    weight_sync: WeightSyncSection = field(default_factory=WeightSyncSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self):
        from alp_megatron.alp.loss import get_loss_method

        if self.alp.enabled and get_loss_method(self.loss.method).unperturbed:
            raise ConfigError("alp.enabled",
                              f"loss.method={self.loss.method} is a baseline trained on the unperturbed policy, "
                              "but the ALP perturbation is on",
                              "set alp.enabled=false for the baselines, or use loss.method=alp_seq / alp_token")
        reward = self.reward.function or "math"  # a dataset's default reward
        if reward in LABEL_REWARDS and self.data.paths and self.data.label_field is None:
            raise ConfigError("data.label_field", f"is null, but reward.function={reward} compares "
                              "each response with its row's label",
                              "name the dataset field that holds the answer (e.g. label), or use a reward "
                              "function that needs no label")
        budget, longest = self.actor.max_tokens_per_microbatch, (self.data.max_prompt_tokens
                                                                  + self.rollout.sampling.max_new_tokens)
        if isinstance(budget, int) and budget < longest:
            raise ConfigError("actor.max_tokens_per_microbatch",
                              f"{budget} tokens cannot hold the longest sample, data.max_prompt_tokens "
                              f"({self.data.max_prompt_tokens}) + rollout.sampling.max_new_tokens "
                              f"({self.rollout.sampling.max_new_tokens}) = {longest}",
                              f"set it to at least {longest} (a packed micro-batch never truncates a sample)")
        if self.parallel.context_parallel > 1:
            raise ConfigError("parallel.context_parallel", CONTEXT_PARALLEL_NOT_BUILT.format(
                self.parallel.context_parallel), "use 1; for long sequences use tensor parallelism with "
                "parallel.sequence_parallel=true, and packed micro-batches")
        if self.rollout.partial_rollouts == "restart" and self.weight_sync.pause_mode != "abort":
            raise ConfigError("weight_sync.pause_mode", f"is {self.weight_sync.pause_mode}, but "
                              "rollout.partial_rollouts=restart needs the requests in flight returned at an update",
                              "set weight_sync.pause_mode=abort")
        if self.actor.temperature != self.rollout.sampling.temperature:
            raise ConfigError("actor.temperature",
                              f"{self.actor.temperature} differs from rollout.sampling.temperature "
                              f"{self.rollout.sampling.temperature}",
                              "score logprobs at the temperature the engine sampled with: set both equal")


def load_run_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> RunConfig:
    """The run config from YAML ``path`` (None: the defaults) with ``section.key=value`` overrides applied."""
    data = load_yaml(path) if path else {}
    return build(RunConfig, merge(data, parse_overrides(overrides)))
