"""What an off-policy study runs: its config (YAML, validated at load) and the list of runs it expands to.

A *regime* is one way the rollout policy drifts from the trained one (ALP.md §1): a bf16 engine against the
fp32 trainer with stale mini-batches, FP8-rounded engine weights, bounded-staleness asynchronous rollouts,
MoE routes that the trainer does or does not replay, multi-turn tool trajectories. A regime is a named block of
alp-train overrides (and optionally its own run config) plus its engine's dtype and temperature; everything it
sets is recorded with its results.

A *configuration* is a loss method (every method of ``alp.loss``) or an ALP ablation (``alp_seq`` perturbing
the early, middle or late third of the layers, or only the final logits), or a regime's own extra
configuration (e.g. ALP computing its own MoE routes in the perturbed pass). Every configuration runs once per
seed in every regime that lists it.

*Gate and escalation*: a regime tests the paper's claims only if the uncorrected baseline's (``gate.probe``,
bypass) measured mismatch reaches ``gate.mismatch_k3`` or the P98 of its sequence mismatch ratio ``pi_old / mu``
reaches ``gate.seq_ratio_p98``.
A regime lists ``escalation`` levels (override sets that push harder: a hotter engine, more stale steps); the
runner runs the probe at level 0, and at the next level while the gate is not reached, and runs the regime's
other configurations at the first level that reached it (or the last one, reported as not reaching it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Optional

from alp_megatron.config_loading import build, load_yaml, merge, parse_overrides
from alp_megatron.errors import ConfigError

METHODS = ("bypass", "grpo", "tis", "seq_tis", "mis", "token_mis", "icepop", "gspo", "alp_token", "alp_seq")
# alp_seq itself is the all-layers configuration; these are the others the paper compares it with.
ABLATIONS = ("early_third", "middle_third", "late_third", "logits_only")
ALP_METHODS = ("alp_token", "alp_seq")
ENGINE_DTYPES = ("float32", "bfloat16", "float16")


def _is_plain_name(name: str) -> bool:
    """Letters, digits and _ only: the name is a folder of the study's output."""
    return name.replace("_", "").isalnum()


@dataclass(frozen=True)
class RegimeConfig:
    """One regime (``regimes.<name>``). ``run_config``: its alp-train YAML (None: the study's);
    ``overrides``: the alp-train overrides that make it, after the study's. ``engine_dtype``: the rollout
    engine's precision (the trainer stays in its own). ``engine_temperature``: the engine samples at this
    temperature while the trainer scores at 1.0 (null: same). ``num_mini_batches``: optimizer steps per rollout
    batch (K > 1: the later steps train on stale samples). ``steps``: RL steps per run (null: the study's; a
    regime whose steps cost more, multi-turn above all, may run fewer). ``methods`` / ``ablations``: this
    regime's (null: the study's). ``configurations``: extra configurations, ``{name: [overrides]}`` on top of the regime's (each a
    method's ``loss.method`` and ``alp.*``). ``escalation``: override sets, one per level, tried in order while
    the gate is not reached."""

    description: str = ""
    run_config: Optional[str] = None
    overrides: tuple[str, ...] = ()
    engine_dtype: str = "bfloat16"
    engine_temperature: Optional[float] = None
    num_mini_batches: int = 4
    steps: Optional[int] = None
    methods: Optional[tuple[str, ...]] = None
    ablations: Optional[tuple[str, ...]] = None
    configurations: dict = field(default_factory=dict)
    escalation: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        if self.engine_dtype not in ENGINE_DTYPES:
            raise ConfigError("engine_dtype", f"{self.engine_dtype!r} is not supported",
                              f"use one of {ENGINE_DTYPES}")
        if self.engine_temperature is not None and not self.engine_temperature > 0:
            raise ConfigError("engine_temperature", f"must be > 0, got {self.engine_temperature}",
                              "use e.g. 1.1, or null for no sampling mismatch")
        if self.num_mini_batches < 1:
            raise ConfigError("num_mini_batches", f"must be >= 1, got {self.num_mini_batches}",
                              "use 1 (on-policy) or more (stale mini-batch steps)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}",
                              "use the RL steps per run, or null for the study's")
        for name, values, allowed in (("methods", self.methods, METHODS), ("ablations", self.ablations, ABLATIONS)):
            unknown = [v for v in values or () if v not in allowed]
            if unknown:
                raise ConfigError(name, f"unknown {unknown}", f"use any of {allowed}")
        for name, overrides in self.configurations.items():
            if name in METHODS + ABLATIONS or not _is_plain_name(name) or not isinstance(overrides, (list, tuple)) \
                    or not all(isinstance(o, str) and "=" in o for o in overrides):
                raise ConfigError(f"regime.configurations.{name}", "must be a new plain name (letters, digits, _) "
                                  "with a list of key=value overrides",
                                  "e.g. alp_own_routes: [loss.method=alp_seq, alp.enabled=true, "
                                  "alp.replay_routes_when_perturbed=false]")
        object.__setattr__(self, "configurations", {k: tuple(v) for k, v in self.configurations.items()})

    def knob_overrides(self, level: int = 0) -> list[str]:
        """The alp-train overrides of this regime at escalation ``level`` (0: as configured)."""
        if level > len(self.escalation):
            raise ValueError(f"level {level} of {len(self.escalation)} escalation levels")
        knobs = [f"actor.num_mini_batches={self.num_mini_batches}", f"rollout.server_dtype={self.engine_dtype}"]
        if self.engine_temperature is not None:
            knobs.append(f"rollout.engine_temperature={self.engine_temperature}")
        return knobs + list(self.overrides) + (list(self.escalation[level - 1]) if level else [])


DEFAULT_REGIMES = {"bf16": RegimeConfig(description="a bf16 engine against the fp32 trainer, 4 stale mini-batch steps")}


@dataclass(frozen=True)
class GateSettings:
    """When a regime's off-policyness is enough to test the claims: the ``probe`` configuration's (the
    uncorrected baseline) mean ``mismatch_k3`` over steps reaches ``mismatch_k3``, or the P98 of its sequence
    mismatch ratio ``pi_old / mu`` (``mismatch_ratio_seq_p98``, the largest over steps) reaches
    ``seq_ratio_p98``."""

    probe: str = "bypass"
    mismatch_k3: float = 1e-3
    seq_ratio_p98: float = 1.5

    def __post_init__(self):
        if self.probe not in METHODS:
            raise ConfigError("gate.probe", f"unknown method {self.probe!r}", "use bypass (no correction at all)")

    def reached(self, k3_mean: float, seq_ratio_p98: float) -> bool:
        return k3_mean >= self.mismatch_k3 or seq_ratio_p98 >= self.seq_ratio_p98


@dataclass(frozen=True)
class ThresholdSettings:
    """``mismatch_k3``: a step counts as a mismatch (KL) spike above it. ``seq_ratio_spike``: a step counts as
    a ratio spike when its sequence ratio's p99.9 exceeds it (or its p2 falls below its inverse).
    ``grad_spike_factor``: a step counts as a gradient-norm spike when its largest optimizer-step norm exceeds
    this many times the run's median."""

    mismatch_k3: float = 1e-3
    seq_ratio_spike: float = 2.0
    grad_spike_factor: float = 3.0


@dataclass(frozen=True)
class QuickSettings:
    """What ``--quick`` runs instead: a few ``regimes`` (empty: the first), their knobs without escalation, a few
    methods, one seed, few steps."""

    regimes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("bypass", "alp_seq")
    seeds: tuple[int, ...] = (0,)
    steps: int = 5

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError("quick.steps", f"must be >= 1, got {self.steps}", "use a few steps, e.g. 5")
        if not self.seeds:
            raise ConfigError("quick.seeds", "is empty", "list one seed, e.g. [0]")


@dataclass(frozen=True)
class StudyConfig:
    """``run_config``: the alp-train YAML every run starts from (a regime may name its own); ``overrides``:
    applied to every run (the study's size). ``steps`` RL steps per run, ``seeds``, and the ``methods`` and
    ``ablations`` every regime runs unless it lists its own. ``regimes``: ``{name: RegimeConfig}``, in order."""

    run_config: str = "examples/cpu_tiny.yaml"
    overrides: tuple[str, ...] = ()
    steps: int = 30
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = METHODS
    ablations: tuple[str, ...] = ABLATIONS
    regimes: dict = field(default_factory=lambda: dict(DEFAULT_REGIMES))
    gate: GateSettings = field(default_factory=GateSettings)
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    quick: QuickSettings = field(default_factory=QuickSettings)

    def __post_init__(self):
        regimes = {}
        for name, regime in self.regimes.items():
            if isinstance(regime, Mapping):
                regime = build(RegimeConfig, regime, prefix=f"regimes.{name}")
            elif not isinstance(regime, RegimeConfig):
                raise ConfigError(f"regimes.{name}", f"expected a mapping (section), got {regime!r}",
                                  "write the regime as `key: value` lines (overrides, engine_dtype, ...)")
            if not _is_plain_name(name):
                raise ConfigError(f"regimes.{name}", "is not a plain name", "use letters, digits and _ (a folder name)")
            regimes[name] = regime
        if not regimes:
            raise ConfigError("regimes", "is empty", "name at least one regime, e.g. bf16: {engine_dtype: bfloat16}")
        object.__setattr__(self, "regimes", regimes)
        for name, values, allowed in (("methods", self.methods, METHODS), ("ablations", self.ablations, ABLATIONS),
                                      ("quick.methods", self.quick.methods, METHODS),
                                      ("quick.regimes", self.quick.regimes, tuple(regimes))):
            unknown = [v for v in values if v not in allowed]
            if unknown:
                raise ConfigError(name, f"unknown {unknown}", f"use any of {allowed}")
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}", "use the RL steps per run, e.g. 30")
        if not self.seeds:
            raise ConfigError("seeds", "is empty", "list at least one seed (the study wants 3 or more)")
        for name in regimes:
            methods, ablations = self.regime_methods(name), self.regime_ablations(name)
            if ablations and "alp_seq" not in methods:
                own = "methods" if regimes[name].methods is not None else "ablations" if regimes[name].ablations else None
                raise ConfigError(f"regimes.{name}.{own}" if own else "ablations",
                                  "compare against alp_seq (all layers), which is not in the regime's methods",
                                  "add alp_seq to methods, or clear ablations")
            if self.gate.probe not in methods:
                raise ConfigError(f"regimes.{name}.methods" if regimes[name].methods is not None else "methods",
                                  f"lacks the gate's probe {self.gate.probe!r}",
                                  "add it: the gate measures the regime's mismatch on it")
        if self.gate.probe not in self.quick.methods:
            raise ConfigError("quick.methods", f"lacks the gate's probe {self.gate.probe!r}",
                              "add it: the gate measures each regime's mismatch on it")

    def regime_steps(self, name: str) -> int:
        return self.regimes[name].steps or self.steps

    def regime_methods(self, name: str) -> tuple[str, ...]:
        regime = self.regimes[name]
        return self.methods if regime.methods is None else regime.methods

    def regime_ablations(self, name: str) -> tuple[str, ...]:
        regime = self.regimes[name]
        return self.ablations if regime.ablations is None else regime.ablations

    def quick_version(self) -> "StudyConfig":
        names = self.quick.regimes or tuple(self.regimes)[:1]
        regimes = {name: replace(self.regimes[name], methods=None, ablations=None, configurations={}, escalation=(),
                                 steps=None) for name in names}
        return replace(self, methods=self.quick.methods, seeds=self.quick.seeds, steps=self.quick.steps,
                       ablations=(), regimes=regimes)


@dataclass(frozen=True)
class RunSpec:
    """One ``alp-train`` run of the study: ``configuration`` x ``seed`` in ``regime`` at escalation ``level``."""

    regime: str
    configuration: str
    seed: int
    overrides: tuple[str, ...]
    level: int = 0

    @property
    def name(self) -> str:
        return f"{self.regime}/level{self.level}/{self.configuration}/seed{self.seed}"


def load_study_config(path: Optional[str], overrides: tuple[str, ...] = ()) -> StudyConfig:
    data = load_yaml(path) if path else {}
    return build(StudyConfig, merge(data, parse_overrides(overrides)))


def configuration_overrides(configuration: str, num_layers: int, regime: Optional[RegimeConfig] = None) -> list[str]:
    """The ``alp-train`` overrides that make ``configuration`` (a method, an ablation, or one of ``regime``'s
    own configurations)."""
    if regime is not None and configuration in regime.configurations:
        return list(regime.configurations[configuration])
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


def regime_configurations(study: StudyConfig, regime: str) -> list[str]:
    """The configurations ``regime`` runs, the gate's probe first."""
    names = [study.gate.probe] + [m for m in study.regime_methods(regime) if m != study.gate.probe]
    return names + list(study.regime_ablations(regime)) + list(study.regimes[regime].configurations)


def run_spec(study: StudyConfig, regime: str, configuration: str, seed: int, num_layers: int,
             level: int = 0) -> RunSpec:
    settings = study.regimes[regime]
    overrides = (*study.overrides, *settings.knob_overrides(level),
                 *configuration_overrides(configuration, num_layers, settings),
                 f"run.steps={study.regime_steps(regime)}", f"run.seed={seed}", f"data.seed={seed}", f"alp.seed={seed}",
                 f"rollout.sampling.seed={seed}")
    return RunSpec(regime, configuration, seed, overrides, level)


def plan_runs(study: StudyConfig, regime: str, num_layers: int, level: int = 0) -> list[RunSpec]:
    """Every run of ``regime`` at ``level``, seed-major (each seed's configurations together), the gate's probe
    at the first seed first."""
    return [run_spec(study, regime, configuration, seed, num_layers, level)
            for seed in study.seeds for configuration in regime_configurations(study, regime)]
