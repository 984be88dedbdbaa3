"""What an off-policy study runs: its config (YAML, validated at load) and the list of runs it expands to.

A *configuration* is a loss method (``bypass``, ``grpo``, ``tis``, ``mis``, ``gspo``, ``alp_token``,
``alp_seq``) or an ALP ablation (``alp_seq`` perturbing the early, middle or late third of the layers, or
only the final logits). Every configuration runs once per seed under the same controlled off-policyness
(:class:`OffPolicyKnobs`); a run is ``alp-train`` with overrides, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from alp_megatron.config_loading import build, load_yaml, merge, parse_overrides
from alp_megatron.errors import ConfigError

METHODS = ("bypass", "grpo", "tis", "mis", "gspo", "alp_token", "alp_seq")
# alp_seq itself is the all-layers configuration; these are the others the paper compares it with.
ABLATIONS = ("early_third", "middle_third", "late_third", "logits_only")
ALP_METHODS = ("alp_token", "alp_seq")
ENGINE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class OffPolicyKnobs:
    """How far the rollout policy is pushed from the trained one (recorded with the results).

    ``engine_dtype``: the rollout engine's precision (the trainer stays fp32). ``engine_temperature``: the
    engine samples at this temperature while the trainer scores at 1.0 (null: same). ``num_mini_batches``:
    optimizer steps per rollout batch (K > 1: the later steps train on stale samples).
    """

    engine_dtype: str = "bfloat16"
    engine_temperature: Optional[float] = None
    num_mini_batches: int = 4

    def __post_init__(self):
        if self.engine_dtype not in ENGINE_DTYPES:
            raise ConfigError("off_policy.engine_dtype", f"{self.engine_dtype!r} is not supported",
                              f"use one of {ENGINE_DTYPES}")
        if self.engine_temperature is not None and not self.engine_temperature > 0:
            raise ConfigError("off_policy.engine_temperature", f"must be > 0, got {self.engine_temperature}",
                              "use e.g. 1.1, or null for no sampling mismatch")
        if self.num_mini_batches < 1:
            raise ConfigError("off_policy.num_mini_batches", f"must be >= 1, got {self.num_mini_batches}",
                              "use 1 (on-policy) or more (stale mini-batch steps)")

    def overrides(self) -> list[str]:
        knobs = [f"actor.num_mini_batches={self.num_mini_batches}"]
        if self.engine_temperature is not None:
            knobs.append(f"rollout.engine_temperature={self.engine_temperature}")
        return knobs


@dataclass(frozen=True)
class ThresholdSettings:
    """``mismatch_k3``: a step counts as a mismatch spike above it. ``grad_spike_factor``: a step counts as a
    gradient-norm spike when its largest optimizer-step norm exceeds this many times the run's median."""

    mismatch_k3: float = 1e-3
    grad_spike_factor: float = 3.0


@dataclass(frozen=True)
class QuickSettings:
    """What ``--quick`` runs instead: a few methods, one seed, few steps."""

    methods: tuple[str, ...] = ("bypass", "grpo", "alp_seq")
    seeds: tuple[int, ...] = (0,)
    steps: int = 6

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("quick.steps", f"must be >= 1, got {self.steps}", "use a few steps, e.g. 5")
        if not self.seeds:
            raise ConfigError("quick.seeds", "is empty", "list one seed, e.g. [0]")


@dataclass(frozen=True)
class StudyConfig:
    """``run_config``: the alp-train YAML every run starts from; ``overrides``: applied to every run (the
    study's size). ``steps`` RL steps per run, ``seeds``, ``methods`` and ``ablations`` to run."""

    run_config: str = "examples/cpu_tiny.yaml"
    overrides: tuple[str, ...] = ()
    steps: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    ablations: tuple[str, ...] = ABLATIONS
    off_policy: OffPolicyKnobs = field(default_factory=OffPolicyKnobs)
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    quick: QuickSettings = field(default_factory=QuickSettings)

    def __post_init__(self):
        for name, values, allowed in (("methods", self.methods, METHODS), ("ablations", self.ablations, ABLATIONS),
                                      ("quick.methods", self.quick.methods, METHODS)):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigError(name, f"unknown {unknown}", f"use any of {allowed}")
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}", "use the RL steps per run, e.g. 30")
        if not self.seeds:
            raise ConfigError("seeds", "is empty", "list at least one seed (the study wants 3 or more)")
        if self.ablations and "alp_seq" not in self.methods:
            raise ConfigError("ablations", "compare against alp_seq (all layers), which is not in methods",
                              "add alp_seq to methods, or clear ablations")

    def quick_version(self) -> "StudyConfig":
        return replace(self, methods=self.quick.methods, seeds=self.quick.seeds, steps=self.quick.steps,
                       ablations=())


@dataclass(frozen=True)
class RunSpec:
    """One ``alp-train`` run of the study: ``configuration`` x ``seed``."""

    configuration: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.configuration}/seed{self.seed}"


def load_study_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> StudyConfig:
    data = load_yaml(path) if path else {}
    return build(StudyConfig, merge(data, parse_overrides(overrides)))


def configuration_overrides(configuration: str, num_layers: int) -> list[str]:
    """The ``alp-train`` overrides that make ``configuration`` (a method or an ablation)."""
    if configuration in METHODS:
        alp_on = configuration in ALP_METHODS
        return [f"loss.method={configuration}", f"alp.enabled={str(alp_on).lower()}"]
    if configuration == "logits_only":
        return ["loss.method=alp_seq", "alp.enabled=true", "alp.target=logits"]
    third = {"early_third": 0, "middle_third": 1, "late_third": 2}[configuration]
    start, end = layer_third(third, num_layers)
    return ["loss.method=alp_seq", "alp.enabled=true", f"alp.perturb_start={start}", f"alp.perturb_end={end}"]


def layer_third(index: int, num_layers: int) -> tuple[int, int]:
    """``[start, end)`` of third ``index`` (0, 1, 2) of ``num_layers`` layers."""
    if num_layers < 3:
        raise ConfigError("model.tiny_num_layers", f"{num_layers} layers have no thirds to ablate",
                          "use a model with at least 3 layers (e.g. model.tiny_num_layers=6) or clear ablations")
    bounds = [round(num_layers * i / 3) for i in range(4)]
    return bounds[index], bounds[index + 1]


def plan_runs(study: StudyConfig, num_layers: int) -> list[RunSpec]:
    """Every run of the study, seed-major (each seed's configurations together), with its overrides."""
    configurations = list(study.methods) + list(study.ablations)
    runs = []
    for seed in study.seeds:
        for configuration in configurations:
            overrides = (*study.overrides, *study.off_policy.overrides(),
                         *configuration_overrides(configuration, num_layers),
                         f"run.steps={study.steps}", f"run.seed={seed}", f"data.seed={seed}", f"alp.seed={seed}",
                         f"rollout.sampling.seed={seed}")
            runs.append(RunSpec(configuration, seed, overrides))
    return runs
