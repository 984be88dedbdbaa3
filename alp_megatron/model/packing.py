"""One forward of a micro-batch, padded or packed, through a Megatron ``GPTModel`` chunk.

A padded micro-batch (``tokens`` ``[b, S]``) runs as it always has: a causal mask made by Megatron. A packed
micro-batch (``tokens`` ``[1, T]``, several samples concatenated, ``lengths`` given; see
:func:`alp_megatron.trainer.batch.packed_micro_batch`) must keep attention inside each sample and restart the
rotary positions at each sample's start:

- Transformer Engine spec: Megatron's THD format, a ``PackedSeqParams`` with ``cu_seqlens`` (TE's attention
  and Megatron's rotary embedding both read them). Written to Megatron's documented API; not run here (no GPU).
- local spec (Megatron's ``DotProductAttention`` refuses ``packed_seq_params``): an equivalent block-diagonal
  causal mask ``[1, 1, T, T]``, and the rotary table indexed by ``position_ids``. The dense mask is
  ``T^2`` bytes (1 GiB at 32k tokens), which is why the local spec is the CPU and test path, and TE the
  cluster's.

Rows past the last sample (padding that sequence parallelism needs) attend only to themselves.
"""

from __future__ import annotations

import torch


def block_causal_mask(lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``[1, 1, T, T]`` bool, True where attention is masked (Megatron's convention): causal within each
    sample of ``lengths``, nothing across samples; each padding row sees itself."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pad = total - int(lengths.sum())
    segment = torch.cat([segment, torch.arange(len(lengths), len(lengths) + pad)])
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return ~(same & causal)[None, None]


def packed_seq_params(lengths: torch.Tensor, total: int, device):
    """Megatron's THD description of a packed row: one sequence per sample, the padding as a last one."""
    from megatron.core.packed_seq_params import PackedSeqParams

    sizes = lengths.tolist() + ([total - int(lengths.sum())] if total > int(lengths.sum()) else [])
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(sizes, dtype=torch.int32), 0)
    cu = cu.to(device)
    longest = max(sizes)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def restart_rotary_positions(chunk) -> None:
    """Let a local-spec chunk's rotary table follow the micro-batch's ``position_ids`` (see :func:`forward`):
    Megatron's local path computes it for positions ``0 .. T-1`` of the whole row."""
    rotary = getattr(chunk, "rotary_pos_emb", None)
    if rotary is None:
        return
    chunk._alp_position_ids = None

    def follow(module, args, output):
        positions = chunk._alp_position_ids
        return output if positions is None else output[positions.to(output.device)]

    rotary.register_forward_hook(follow)


def is_packed(micro: dict) -> bool:
    return "unpack_index" in micro


def forward(model, micro: dict):
    """``model(tokens, position_ids, ...)`` for ``micro``, padded or packed, with the engine's MoE routes
    replayed when the chunk replays routes and ``micro`` carries them (:mod:`alp_megatron.model.routing`);
    returns the model's output. ``model``: a ``GPTModel`` chunk, bare or wrapped (DDP, Float16Module)."""
    from alp_megatron.alp.perturbation import noise_sources
    from alp_megatron.model import routing

    inner = model
    while not hasattr(inner, "alp_backend") and hasattr(inner, "module"):
        inner = inner.module
    # whether this forward carries ALP's noise matters only to a chunk that replays routes (a module walk)
    perturbed = (getattr(inner, "routing_replay", False) and inner.training
                 and any(source.enabled for source in noise_sources(inner)))
    with routing.replaying(inner, micro, perturbed):
        return _forward(model, inner, micro)


def _forward(model, inner, micro: dict):
    tokens, positions = micro["tokens"], micro["position_ids"]
    if not is_packed(micro):
        return model(tokens, positions, None)
    total = tokens.shape[1]
    if getattr(inner, "alp_backend", "local") == "transformer_engine":
        return model(tokens, positions, None, packed_seq_params=packed_seq_params(micro["lengths"], total,
                                                                                  tokens.device))
    mask = block_causal_mask(micro["lengths"], total).to(tokens.device)
    inner._alp_position_ids = positions[0]
    try:
        return model(tokens, positions, mask)
    finally:
        inner._alp_position_ids = None
