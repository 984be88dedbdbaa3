"""Per-token logprobs and entropy from vocab-parallel logits, without gathering the vocabulary.

Called on the last pipeline stage by every tensor-parallel rank of it, with this rank's logits shard
``[batch, seq, vocab / tp]``; the collectives run over the tensor-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def token_logprobs(vocab_parallel_logits: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """``log pi(target)`` for each position, ``[batch, seq]`` fp32, differentiable.

    ``targets[b, t]`` is the token whose probability position ``t`` predicts (the next token).
    Uses Megatron's vocab-parallel cross entropy, so each rank only ever holds its vocabulary shard.
    """
    from megatron.core import tensor_parallel

    logits = vocab_parallel_logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    else:
        logits = logits.clone()  # Megatron's cross entropy works in place on fp32 input
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


@torch.no_grad()
def token_entropy(vocab_parallel_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the full next-token distribution at each position, ``[batch, seq]`` fp32 (no grad)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    logits = vocab_parallel_logits.float() / temperature
    logits_max = logits.max(dim=-1).values
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - logits_max.unsqueeze(-1)
    exp = shifted.exp()
    sums = torch.stack([exp.sum(dim=-1), (exp * shifted).sum(dim=-1)])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    sum_exp, sum_exp_shifted = sums
    # H = log Z - E_p[z], with z shifted by the max (it cancels)
    return sum_exp.log() - sum_exp_shifted / sum_exp


def shift_targets(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Next-token targets ``[batch, seq]``: position t predicts ``tokens[:, t + 1]``; the last gets ``pad_id``."""
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    return targets
