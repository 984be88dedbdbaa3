"""MoE routing replay (R3): Megatron's routers take the experts the rollout engine chose, per micro-batch.

The engine's routes travel in a micro-batch as the per-token extra ``routed_experts`` (``[b, S, L, K]``
padded, ``[1, T, L, K]`` packed: row ``t`` holds the experts each of the ``L`` decoder layers sent token
``t`` to; see :data:`alp_megatron.sample.ROUTES`). Megatron-Core's own mechanism does the replay:
built with ``moe_enable_routing_replay``, every ``TopKRouter`` owns a ``RouterReplay``; in
``REPLAY_FORWARD`` it takes the given experts and gathers the live router scores at them (the softmax
weights and the router's gradient stay live: only the choice is forced), and in ``REPLAY_BACKWARD`` it pops
them first-in first-out when full recomputation re-runs a layer inside backward (every Megatron schedule
runs a chunk's backwards in the order of its forwards). Megatron switches none of this by itself:
:func:`replaying` gives each router of a model chunk its rows of the micro-batch's routes (its layer,
seq-major like the router's input, this rank's slice under sequence parallelism), switches to
``REPLAY_FORWARD`` for the forward and to ``REPLAY_BACKWARD`` after it; :func:`clear` drops what a pass left.
A micro-batch without routes, or a perturbed ALP forward when the chunk routes perturbed hidden states
itself (``alp.replay_routes_when_perturbed: false``), routes normally. Rows past a sample's end (padding)
take experts ``0..K-1``.

Cost: the routes of a micro-batch are ``tokens x L x K`` small integers (uint8 up to 256 experts); each
router holds its layer's ``tokens x K`` int64 indices until its backward (Megatron's replay works on int64).
"""

from __future__ import annotations

import contextlib

import torch

from alp_megatron.sample import EXTRA_PREFIX, ROUTES

ROUTES_KEY = EXTRA_PREFIX + ROUTES


def routers(chunk) -> list:
    """The ``TopKRouter`` modules of ``chunk`` (bare or wrapped) that replay routes, in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in chunk.modules() if isinstance(m, TopKRouter) and getattr(m, "router_replay", None)]


def _real_tokens(micro: dict, shape: tuple[int, int]) -> torch.Tensor:
    """``[b, S]`` bool: True where the micro-batch holds a sample's token (False for padding)."""
    lengths = micro["lengths"].to("cpu")
    columns = torch.arange(shape[1])
    if "unpack_index" in micro:  # packed: one row, the samples back to back, then padding
        return (columns < int(lengths.sum()))[None, :].expand(shape)
    return columns[None, :] < lengths[:, None]


def _layer_indices(routes: torch.Tensor, real: torch.Tensor, layer: int) -> torch.Tensor:
    """``[S * b, K]`` int64 experts of ``layer``, seq-major as the router sees ``[S, b, h]``."""
    chosen = routes[:, :, layer, :].long()
    filler = torch.arange(chosen.shape[-1]).expand_as(chosen)
    chosen = torch.where(real[..., None], chosen, filler)
    return chosen.transpose(0, 1).reshape(-1, chosen.shape[-1])


@contextlib.contextmanager
def replaying(inner, micro: dict, perturbed: bool):
    """Run the forward inside this with ``inner``'s routers replaying ``micro``'s routes (see the module
    docstring). ``inner``: the bare ``GPTModel`` chunk; ``perturbed``: this forward carries ALP's noise."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    chunk_routers = routers(inner) if getattr(inner, "routing_replay", False) else []
    replay = (ROUTES_KEY in micro and chunk_routers
              and not (perturbed and not getattr(inner, "replay_routes_when_perturbed", True)))
    if not replay:
        for router in chunk_routers:  # route normally (a stale backward mode would pop routes that are not there)
            router.router_replay.clear_router_replay_action()
        yield
        return
    routes = micro[ROUTES_KEY]
    real = _real_tokens(micro, routes.shape[:2])
    shard = None
    if inner.config.sequence_parallel:  # the router sees this tensor-parallel rank's slice of the sequence
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        rows = routes.shape[0] * routes.shape[1] // size
        shard = slice(rank * rows, (rank + 1) * rows)
    for router in chunk_routers:
        indices = _layer_indices(routes, real, router.layer_number - 1)
        if shard is not None:
            indices = indices[shard]
        router.router_replay.set_target_indices(indices.to(routes.device))
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in chunk_routers:
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


def clear(chunks) -> None:
    """After a pass (a training step, a scoring pass): drop every router's routes and mode."""
    for chunk in chunks:
        for router in routers(chunk):
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
