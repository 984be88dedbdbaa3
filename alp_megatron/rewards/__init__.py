"""Reward functions: the interface, the math verifier, the toy-task rewards and loading one by name or path."""

from alp_megatron.rewards.base import (
    BUILTIN_REWARDS,
    AnyRewardFunction,
    AsyncRewardFunction,
    RewardError,
    RewardFunction,
    check_reward_value,
    compute_reward,
    compute_reward_async,
    load_reward_function,
)
from alp_megatron.rewards.math_verifier import MathVerifier, MathVerifierConfig
from alp_megatron.rewards.toy_tasks import (
    exact_match_reward,
    positional_match,
    positional_match_reward,
    prediction_text,
)

__all__ = [
    "BUILTIN_REWARDS",
    "AnyRewardFunction",
    "AsyncRewardFunction",
    "MathVerifier",
    "MathVerifierConfig",
    "RewardError",
    "RewardFunction",
    "check_reward_value",
    "compute_reward",
    "compute_reward_async",
    "exact_match_reward",
    "load_reward_function",
    "positional_match",
    "positional_match_reward",
    "prediction_text",
]
