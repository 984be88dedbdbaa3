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


def round_blockwise(weight: torch.Tensor, block: tuple[int, int] = BLOCK, scale_format: str = "fp32") -> torch.Tensor:
    """``weight`` rounded through e4m3 blocks and dequantised, in its own dtype: the weight an FP8 engine
    multiplies with (FP8 weight rounding, without FP8 activations)."""
    q, scale_inv = quantize_blockwise(weight, block, scale_format)
    return dequantize_blockwise(q, scale_inv, block).to(weight.dtype)


def round_bucket(
    bucket: Bucket,
    block: tuple[int, int] = BLOCK,
    scale_format: str = "fp32",
    ignored: Sequence[str] = (),
) -> Bucket:
    """``bucket`` with each linear SGLang would quantise replaced by :func:`round_blockwise` of it (same names,
    shapes and dtypes): what ``weight_sync.rollout_precision: fp8_rounded`` sends to an engine that keeps its
    own dtype."""
    return [(name, round_blockwise(tensor, block, scale_format) if is_quantised_name(name, ignored) else tensor)
            for name, tensor in bucket]


def quantize_buckets(
    buckets: Iterable[Bucket],
    block: tuple[int, int] = BLOCK,
    scale_format: str = "fp32",
    ignored: Sequence[str] = (),
) -> Iterator[Bucket]:
    """:func:`quantize_bucket` over a stream of buckets (one bucket in memory at a time)."""
    for bucket in buckets:
        yield quantize_bucket(bucket, block, scale_format, ignored)


def block_quant_problems(arch, tp_size: int, block: tuple[int, int] = BLOCK) -> list[str]:
    """Why an SGLang engine of ``tp_size`` ranks cannot serve ``arch`` (a :class:`ModelArch`) as block-wise
    FP8 (empty when it can). SGLang 0.5.23's ``Fp8LinearMethod`` and ``Fp8MoEMethod`` need every output part of
    a merged (q/k/v, gate/up) or column-parallel linear to be whole blocks of ``block[0]`` rows, and, under
    TP, the input part of a row-parallel one (o_proj, down_proj) whole blocks of ``block[1]`` columns; a model
    that breaks this fails while the engine loads it."""
    bn, bk = block
    kv_heads = max(arch.num_query_groups // tp_size, 1)  # SGLang replicates KV heads below one per rank
    parts = {"q_proj rows": arch.num_attention_heads * arch.head_dim // tp_size,
             "k_proj/v_proj rows": kv_heads * arch.head_dim}
    sizes = []
    if not arch.is_moe or arch.moe_layers is None or not all(arch.moe_layers):
        sizes.append(("", arch.ffn_hidden_size // tp_size))
    if arch.is_moe:
        sizes.append(("expert ", arch.moe_ffn_hidden_size // tp_size))
    for prefix, intermediate in sizes:
        parts[f"{prefix}gate_proj/up_proj rows"] = intermediate
    problems = [f"{what} per engine rank = {size}, not a multiple of {bn}" for what, size in parts.items()
                if size % bn]
    if tp_size > 1:
        inputs = {"o_proj columns": arch.num_attention_heads * arch.head_dim // tp_size,
                  **{f"{prefix}down_proj columns": size for prefix, size in sizes}}
        problems += [f"{what} per engine rank = {size}, not a multiple of {bk}" for what, size in inputs.items()
                     if size % bk]
    return problems


def write_fp8_checkpoint(source: str, target: str, scale_format: str = "fp32") -> str:
    """Write ``source`` (an unquantised HF folder) as the 128x128 block-FP8 checkpoint an engine serves under
    ``weight_sync.rollout_precision: fp8``: every linear SGLang quantises as e4m3 with its
    ``weight_scale_inv``, everything else as it was, ``config.json`` with :data:`FP8_QUANTIZATION_CONFIG`.
    One safetensors file at a time is in memory; ``target`` appears complete or not at all. Returns ``target``."""
    import shutil

    from safetensors.torch import load_file, save_file

    from alp_megatron.bridge.hf_folder import copy_side_files, new_staging_folder, publish_folder, read_hf_config

    staging = new_staging_folder(target)
    try:
        copy_side_files(source, staging, include_config=False)
        index_path = os.path.join(source, "model.safetensors.index.json")
        weight_map = {}
        for name in sorted(os.listdir(source)):
            if name.endswith(".safetensors"):
                bucket = quantize_bucket(sorted(load_file(os.path.join(source, name)).items()),
                                         scale_format=scale_format)
                save_file(dict(bucket), os.path.join(staging, name), metadata={"format": "pt"})
                weight_map.update({tensor_name: name for tensor_name, _ in bucket})
        if os.path.isfile(index_path):
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as handle:
                json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as handle:
            json.dump(with_fp8_quantization_config(read_hf_config(source)), handle, indent=2)
        publish_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


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
