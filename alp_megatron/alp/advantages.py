"""GRPO advantages: group normalisation over the n responses of a prompt (ALP.md §3).

    A_i = (R_i - mean_g) / (std_g + eps)      std_normalize=True  (GRPO)
    A_i =  R_i - mean_g                        std_normalize=False (Dr.GRPO)

``std_g`` is the *unbiased* sample standard deviation (divides by n - 1), as ``torch.std`` computes it and
as verl's GRPO estimator (which the ALP reference code uses) does. A group of a single response has no
baseline to compare against: its advantage is 0 (verl instead gives such a response its raw reward; a lone
sample carries no relative signal, so we do not train on it). A group whose rewards are all equal gets 0.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def _group_index(
    batch: int, group_ids: Optional[Union[torch.Tensor, Sequence[int]]], group_size: Optional[int], device
) -> torch.Tensor:
    """Dense group index ``[batch]`` (0..G-1) from either explicit ids or a contiguous group size."""
    if (group_ids is None) == (group_size is None):
        raise ValueError("grpo_advantages: pass exactly one of group_ids (one id per response) or group_size")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"grpo_advantages: group_size must be a positive int, got {group_size!r}")
        if batch % group_size != 0:
            raise ValueError(
                f"grpo_advantages: {batch} rewards do not split into groups of group_size={group_size}; "
                "pass group_ids for uneven groups"
            )
        return torch.arange(batch, device=device) // group_size
    ids = torch.as_tensor(group_ids, device=device)
    if ids.shape != (batch,):
        raise ValueError(
            f"grpo_advantages: group_ids has shape {tuple(ids.shape)} but rewards has shape ({batch},); "
            "give one group id per response"
        )
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"grpo_advantages: group_ids must be integers, got dtype {ids.dtype}")
    _, index = torch.unique(ids, return_inverse=True)
    return index


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
    group_size: Optional[int] = None,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-normalised advantages, one per response.

    Args:
        rewards: ``[batch]`` scalar reward of each response.
        group_ids: ``[batch]`` integer id of each response's prompt (groups may be uneven and interleaved);
            or else
        group_size: n, when the batch is consecutive groups of n responses (responses 0..n-1 share a prompt).
        std_normalize: divide by the group's (unbiased) std + eps; False gives Dr.GRPO's ``R - mean``.
        eps: added to the std.

    Returns ``[batch]`` advantages, in ``rewards``' floating dtype (float32 for integer rewards), computed
    in float64.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"grpo_advantages: rewards must be a 1-D tensor [batch], got {shape}")
    if eps < 0:
        raise ValueError(f"grpo_advantages: eps must be >= 0, got {eps}")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    batch = rewards.shape[0]
    index = _group_index(batch, group_ids, group_size, rewards.device)
    num_groups = int(index.max()) + 1 if batch > 0 else 0

    values = rewards.detach().to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=values.device).index_add_(
        0, index, torch.ones_like(values)
    )
    total = torch.zeros_like(count).index_add_(0, index, values)
    mean = total / count
    centred = values - mean[index]
    if std_normalize:
        square_sum = torch.zeros_like(count).index_add_(0, index, centred * centred)
        std = torch.sqrt(square_sum / (count - 1).clamp(min=1))
        denominator = std[index] + eps
        # std = 0 means every centred reward of the group is 0 (one response, or equal rewards): keep 0, not
        # the 0 / 0 that eps = 0 would give.
        advantages = torch.where(denominator > 0, centred / denominator, torch.zeros_like(centred))
    else:
        advantages = centred
    return advantages.to(out_dtype)


def broadcast_advantages(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages ``[batch, seq]``: each response's advantage on its masked-in tokens, 0 elsewhere.

    ``advantages``: ``[batch]``; ``loss_mask``: ``[batch, seq]`` (bool or 0/1).
    """
    if advantages.dim() != 1 or loss_mask.dim() != 2 or loss_mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"broadcast_advantages: advantages {tuple(advantages.shape)} and loss_mask {tuple(loss_mask.shape)} "
            "must be [batch] and [batch, seq]"
        )
    token_advantages = advantages[:, None].expand(loss_mask.shape)
    return torch.where(loss_mask.bool(), token_advantages, torch.zeros_like(token_advantages))
