"""128x128 block-wise FP8 (e4m3) rollout weights, quantised on the trainer side.

An SGLang engine serving a checkpoint whose ``config.json`` carries :data:`FP8_QUANTIZATION_CONFIG` holds
every quantised linear as ``<prefix>.weight`` (``float8_e4m3fn``, shape ``[..., n, k]``) plus
``<prefix>.weight_scale_inv`` (fp32, shape ``[..., ceil(n/128), ceil(k/128)]``), and dequantises
``w = weight.float() * scale_inv`` per block (SGLang's ``block_quant_dequant``). Despite its name,
``weight_scale_inv`` is that multiplier: ``amax(|block|) / 448``. Such an engine cannot take bf16 weights
for those layers, so the bridge quantises them here (:func:`quantize_bucket`) before any transport.

Only the layers SGLang quantises are converted: the ``LinearBase`` projections (attention q/k/v/o,
MLP gate/up/down, per-expert and shared-expert gate/up/down). Embeddings, norms, ``lm_head`` and the MoE
router (``mlp.gate``, ``shared_expert_gate``; SGLang builds them with ``quant_config=None``) keep their dtype,
and so do the linears the served checkpoint's ``ignored_layers`` cover (:func:`served_ignored_layers`).

``scale_format="ue8m0"`` rounds each scale up to a power of two, as DeepGEMM's ``per_block_cast_to_fp8``
does (Blackwell's UE8M0 scale format); the default keeps the exact fp32 scale of FP8 checkpoints. Not
verified: updating an engine that runs DeepGEMM's UE8M0 mode (sm100/sm120). After its first load SGLang
0.5.23 repacks such an engine's scales into another layout (``format_ue8m0``) and splits merged scales by
it, so an update in the checkpoint layout sent here may not fit; on Hopper (sm90) that mode is off.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Optional, Sequence

import torch

from alp_megatron.errors import ConfigError

E4M3_MAX = 448.0
BLOCK = (128, 128)
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "weight_block_size": list(BLOCK),
    "activation_scheme": "dynamic",
}
SCALE_FORMATS = ("fp32", "ue8m0")
# A block of zeros still needs a finite, non-zero scale; DeepGEMM clamps amax to the same floor.
_AMAX_FLOOR = 1e-4

# HF parameter names of the linears SGLang's Fp8Config quantises (LinearBase and FusedMoE experts).
_QUANTISED = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")

Bucket = list[tuple[str, torch.Tensor]]


def is_quantised_name(name: str, ignored: Sequence[str] = ()) -> bool:
    """True if SGLang holds the HF parameter ``name`` as block-wise FP8: a quantised linear whose module path
    no entry of ``ignored`` covers. An entry covers a path when it is a dotted run of it (``mlp.gate`` covers
    ``model.layers.0.mlp.gate``, not ``...mlp.gate_proj``; ``model.layers.1`` covers all of layer 1), as
    SGLang matches a checkpoint's ``ignored_layers``."""
    if not _QUANTISED.search(name):
        return False
    module = f".{name[: -len('.weight')]}."
    return not any(f".{entry.strip('.')}." in module for entry in ignored)


def _ceil_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x for positive fp32 x (the UE8M0 scale format), by exponent arithmetic."""
    bits = x.float().view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    exponent = exponent + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent.clamp(1, 254) << 23).view(torch.float32)


def _blocked(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``[..., n, k]`` as fp32, zero-padded to whole blocks and viewed as ``[..., n_blocks, bn, k_blocks, bk]``
    (a new tensor, free to be changed in place)."""
    bn, bk = block
    *batch, n, k = x.shape
    nb, kb = -(-n // bn), -(-k // bk)
    padded = x.new_zeros(*batch, nb * bn, kb * bk, dtype=torch.float32)
    padded[..., :n, :k] = x
    return padded.view(*batch, nb, bn, kb, bk)


def quantize_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = BLOCK, scale_format: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``weight`` ``[..., n, k]`` to e4m3 with one scale per ``block`` (rows x columns).

    Returns ``(q, scale_inv)``: ``q`` is ``float8_e4m3fn`` of the same shape, ``scale_inv`` is fp32 of shape
    ``[..., ceil(n/bn), ceil(k/bk)]`` with ``weight ~= q.float() * scale_inv`` broadcast over each block.
    Partial edge blocks take their scale from their own elements only. Runs on the weight's device.
    """
    if weight.dim() < 2:
        raise ValueError(f"block-wise FP8 needs a [..., n, k] weight, got shape {tuple(weight.shape)}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"scale_format {scale_format!r} is not one of {SCALE_FORMATS}")
    *batch, n, k = weight.shape
    # One fp32 copy of the weight is changed in place; beside it only |block| for the amax (peak: two fp32
    # copies, which matters for a large weight on the trainer's GPU).
    blocks = _blocked(weight, block)
    amax = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=_AMAX_FLOOR)
    scale = amax / E4M3_MAX
    if scale_format == "ue8m0":
        scale = _ceil_to_power_of_two(scale)
    q = blocks.div_(scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(*batch, blocks.shape[-4] * block[0], blocks.shape[-2] * block[1])[..., :n, :k].contiguous()
    return q, scale.squeeze(-1).squeeze(-2).contiguous()


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = BLOCK
) -> torch.Tensor:
    """The fp32 weight an engine computes from ``q`` ``[..., n, k]`` and ``scale_inv`` ``[..., nb, kb]``."""
    *_, n, k = q.shape
    scale = scale_inv.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return q.float() * scale[..., :n, :k]


def quantize_bucket(
    bucket: Bucket,
    block: tuple[int, int] = BLOCK,
    scale_format: str = "fp32",
    ignored: Sequence[str] = (),
) -> Bucket:
    """Replace each quantised linear of ``bucket`` by its ``.weight`` (e4m3) and ``.weight_scale_inv`` (fp32).

    Every other tensor passes through unchanged and in order; a weight is followed by its scale.
    """
    out: Bucket = []
    for name, tensor in bucket:
        if is_quantised_name(name, ignored):
            q, scale_inv = quantize_blockwise(tensor, block, scale_format)
            out.append((name, q))
            out.append((name[: -len("weight")] + "weight_scale_inv", scale_inv))
        else:
            out.append((name, tensor))
    return out


def quantize_buckets(
    buckets: Iterable[Bucket],
    block: tuple[int, int] = BLOCK,
    scale_format: str = "fp32",
    ignored: Sequence[str] = (),
) -> Iterator[Bucket]:
    """:func:`quantize_bucket` over a stream of buckets (one bucket in memory at a time)."""
    for bucket in buckets:
        yield quantize_bucket(bucket, block, scale_format, ignored)


def served_fp8_config(model_dir: str) -> Optional[dict]:
    """The block-wise FP8 ``quantization_config`` of the checkpoint an engine serves, or None if it is not
    quantised.

    Raises :class:`ConfigError` for any quantisation this module cannot produce (another method such as
    compressed-tensors, AWQ or GPTQ; FP8 that is not 128x128 block-wise or has static activations): sending
    unquantised or differently quantised tensors into it would corrupt the engine's weights.
    """
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        config = json.load(f).get("quantization_config")
    if not config:
        return None
    method = config.get("quant_method")
    fix = (f"serve an unquantised checkpoint, or one with quantization_config {FP8_QUANTIZATION_CONFIG} "
           "(the bridge quantises every update to match)")
    if method != "fp8":
        raise ConfigError(f"{path}: quantization_config.quant_method", f"{method!r} is not a format the bridge "
                          "can update", fix)
    if list(config.get("weight_block_size") or ()) != list(BLOCK) or config.get("activation_scheme",
                                                                                 "dynamic") != "dynamic":
        raise ConfigError(f"{path}: quantization_config", f"{config} is not 128x128 block-wise FP8 with dynamic "
                          "activations, the only FP8 the bridge produces", fix)
    return config


def served_ignored_layers(quantization_config: dict) -> tuple[str, ...]:
    """The module paths a served FP8 checkpoint keeps unquantised: its ``ignored_layers`` or, when that key is
    absent, ``modules_to_not_convert`` (the keys SGLang reads, in its order)."""
    for key in ("ignored_layers", "modules_to_not_convert"):
        if key in quantization_config:
            return tuple(quantization_config[key] or ())
    return ()


def with_fp8_quantization_config(config: dict, block: tuple[int, int] = BLOCK) -> dict:
    """A copy of an HF ``config.json`` dict that makes SGLang serve the model as block-wise FP8."""
    return {**config, "quantization_config": {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(block)}}
