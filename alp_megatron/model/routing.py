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

:func:`measuring` also counts, in an unperturbed pass (the old-logprob pass), how often the trainer's own
top-k equals the engine's (as sets: the order of the chosen experts changes nothing downstream) for every
real token and MoE layer, with replay on or off; :func:`agreement` reduces the counts over the ranks (the
share overall and per layer). The trainer's own choice is recomputed from the router's input (one
``tokens x hidden x experts`` matmul per layer, small next to the experts').

Cost: the routes of a micro-batch are ``tokens x L x K`` small integers (uint8 up to 256 experts); each
router holds its layer's ``tokens x K`` int64 indices until its backward (Megatron's replay works on int64).
"""

from __future__ import annotations

import contextlib

import torch

from alp_megatron.sample import EXTRA_PREFIX, ROUTES

ROUTES_KEY = EXTRA_PREFIX + ROUTES


def routers(chunk, replaying_only: bool = True) -> list:
    """The ``TopKRouter`` modules of ``chunk`` (bare or wrapped), in layer order: those that replay routes, or
    (``replaying_only=False``) all."""
    from megatron.core.transformer.moe.router import TopKRouter

    every = chunk.__dict__.get("_alp_routers")
    if every is None:  # found once per chunk: every forward asks
        every = [m for m in chunk.modules() if isinstance(m, TopKRouter)]
        chunk.__dict__["_alp_routers"] = every
    return [m for m in every if not replaying_only or getattr(m, "router_replay", None) is not None]


def _real_tokens(micro: dict, shape: tuple[int, int], but_last: bool = False) -> torch.Tensor:
    """``[b, S]`` bool: True where the micro-batch holds a sample's token (False for padding); ``but_last``:
    not its last token either (the engine never routed it: it was never an input)."""
    lengths = micro["lengths"].to("cpu")
    cut = int(but_last)
    if "unpack_index" in micro:  # packed: one row, the samples back to back (positions restart), then padding
        own_length = torch.repeat_interleave(lengths, lengths)
        own_length = torch.cat([own_length, torch.zeros(shape[1] - own_length.numel(), dtype=own_length.dtype)])
        return (micro["position_ids"].to("cpu")[0] < own_length - cut)[None, :].expand(shape)
    return torch.arange(shape[1])[None, :] < (lengths - cut)[:, None]


def _measure(router, args) -> None:
    """Forward pre-hook of a router: count the tokens whose own top-k equals the engine's."""
    engine = getattr(router, "_alp_engine", None)
    if not router._alp_measuring or engine is None:
        return
    indices, real = engine
    with torch.no_grad():
        own = router.gating(args[0]).reshape(-1, router.config.num_moe_experts).topk(indices.shape[-1]).indices
    same = (own.sort(-1).values == indices.to(own.device).sort(-1).values).all(-1)
    real = real.to(own.device)
    counts = torch.stack([(same & real).sum(), real.sum()]).to(torch.float64)  # stays on the device: no sync
    router._alp_counts = router._alp_counts.to(own.device) + counts


@contextlib.contextmanager
def measuring(chunks):
    """Count the routing agreement of the forwards run inside (see the module docstring)."""
    measured = [router for chunk in chunks for router in routers(chunk, replaying_only=False)]
    for router in measured:
        if not hasattr(router, "_alp_counts"):
            router._alp_counts = torch.zeros(2, dtype=torch.float64)
            router.register_forward_pre_hook(_measure)
        router._alp_measuring = True
    try:
        yield
    finally:
        for router in measured:
            router._alp_measuring = False


def agreement(chunks) -> dict:
    """``routing_agreement`` (the share of real (token, MoE layer) pairs whose trainer top-k equals the
    engine's) and ``routing_agreement_layer{l}``, over every rank's counts since the last call (then reset);
    empty when nothing was counted. ``chunks``: bare ``GPTModel`` chunks. Collective over all ranks."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from alp_megatron.model.provider import rank_device

    num_layers = chunks[0].config.num_layers
    counts = torch.zeros(num_layers, 2, dtype=torch.float64)
    sequence_parallel = chunks[0].config.sequence_parallel
    for chunk in chunks:
        for router in routers(chunk, replaying_only=False):
            if hasattr(router, "_alp_counts"):
                counts[router.layer_number - 1] += router._alp_counts.cpu()
                router._alp_counts = torch.zeros(2, dtype=torch.float64)
    counts = counts.to(rank_device())  # NCCL reduces device tensors
    groups = [parallel_state.get_data_parallel_group(with_context_parallel=True),
              parallel_state.get_pipeline_model_parallel_group()]
    if sequence_parallel:  # each tensor-parallel rank routed its own slice of the tokens
        groups.append(parallel_state.get_tensor_model_parallel_group())
    for group in groups:
        if dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
    counts = counts.cpu()
    if counts[:, 1].sum() == 0:
        return {}
    out = {"routing_agreement": float(counts[:, 0].sum() / counts[:, 1].sum())}
    out.update({f"routing_agreement_layer{layer}": float(counts[layer, 0] / counts[layer, 1])
                for layer in range(num_layers) if counts[layer, 1] > 0})
    return out


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
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    chunk_routers = routers(inner) if getattr(inner, "routing_replay", False) else []
    replay = (ROUTES_KEY in micro and chunk_routers
              and not (perturbed and not getattr(inner, "replay_routes_when_perturbed", True)))
    every_router = routers(inner, replaying_only=False)
    measure = any(getattr(router, "_alp_measuring", False) for router in every_router)
    engine = _engine_indices(inner, micro, every_router) if ROUTES_KEY in micro and (replay or measure) else {}
    for router in every_router:
        router._alp_engine = engine.get(router)
    if not replay:
        for router in chunk_routers:  # route normally (a stale backward mode would pop routes that are not there)
            router.router_replay.clear_router_replay_action()
        yield
        return
    for router in chunk_routers:
        router.router_replay.set_target_indices(engine[router][0])
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in chunk_routers:
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)


def _engine_indices(inner, micro: dict, every_router: list) -> dict:
    """Each router of ``inner`` -> (the engine's ``[rows, K]`` experts of its layer for the rows it sees,
    ``[rows]`` bool: which rows are tokens the engine routed)."""
    from megatron.core import parallel_state

    routes = micro[ROUTES_KEY]
    real = _real_tokens(micro, routes.shape[:2])
    rows = _real_tokens(micro, routes.shape[:2], but_last=True).transpose(0, 1).reshape(-1)  # seq-major, as
    # the router sees its input: the tokens whose agreement counts
    shard = slice(None)
    if inner.config.sequence_parallel:  # the router sees this tensor-parallel rank's slice of the sequence
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        count = rows.numel() // size
        shard = slice(rank * count, (rank + 1) * count)
    return {router: (_layer_indices(routes, real, router.layer_number - 1)[shard].to(routes.device), rows[shard])
            for router in every_router}


def clear(chunks) -> None:
    """After a pass (a training step, a scoring pass): drop every router's routes and mode."""
    for chunk in chunks:
        for router in routers(chunk):
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
