"""Rollouts on SGLang servers: launch and supervise servers (and the router), control them, sample groups.

``server`` / ``router`` start processes, ``engine_control`` is the synchronous per-server control API,
``client`` the async ``/generate`` client, ``sampler`` turns prompts into groups of :class:`Sample`.
"""

from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.errors import EngineError, EngineUnreachableError, MalformedResponseError, ServerStartError
from alp_megatron.rollout.router import RouterConfig, SGLangRouter
from alp_megatron.rollout.sampler import RolloutError, Sampler, SamplerConfig
from alp_megatron.rollout.server import ServerConfig, ServerSupervisor, SGLangServer, start_servers, stop_servers
from alp_megatron.rollout.types import (Completion, RolloutBatch, RolloutEngine, Sample, SamplingConfig,
                                        WeightSpan)

__all__ = [
    "ClientConfig", "Completion", "EngineControl", "EngineError", "EngineUnreachableError",
    "MalformedResponseError", "RolloutBatch", "RolloutClient", "RolloutEngine", "RolloutError", "RouterConfig",
    "Sample", "Sampler", "SamplerConfig", "SamplingConfig", "ServerConfig", "ServerStartError",
    "ServerSupervisor", "SGLangRouter", "SGLangServer", "WeightSpan", "model_vocab_size", "start_servers",
    "stop_servers",
]
