"""The decoder architecture read from a Hugging Face config: what the Megatron model must match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from alp_megatron.errors import ConfigError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


@dataclass(frozen=True)
class ModelArch:
    """Shape and numerics of a supported decoder, in HF terms that map one-to-one onto Megatron's."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    num_experts: Optional[int] = None
    moe_topk: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk_prob: bool = True
    # Per layer (0-based): True where the MLP is a mixture of experts. None for dense models.
    moe_layers: Optional[tuple[bool, ...]] = None
    # Llama 3 style RoPE scaling ("rope_type": "llama3"); None means plain RoPE.
    rope_scaling_factor: Optional[float] = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    def layer_is_moe(self, layer: int) -> bool:
        """Whether global layer ``layer`` (0-based) has a mixture-of-experts MLP."""
        return self.is_moe and (self.moe_layers is None or self.moe_layers[layer])

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelArch":
        """Read a ``transformers`` config object or a ``config.json`` dict."""
        get = _getter(hf_config)
        architectures = get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                "model.architectures",
                f"{architecture!r} is not supported",
                f"use a checkpoint of one of: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        moe = architecture == "Qwen3MoeForCausalLM"
        _refuse_unsupported_options(architecture, get)
        rope_parameters = dict(get("rope_parameters") or {})
        rope_theta = get("rope_theta")
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        num_layers = get("num_hidden_layers")
        num_experts = (get("num_experts") or get("num_local_experts")) if moe else None
        return cls(
            architecture=architecture,
            num_layers=num_layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            ffn_hidden_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings"),
            norm_eps=get("rms_norm_eps"),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            qkv_bias=architecture == "Qwen2ForCausalLM",  # hard-coded in HF Qwen2; others refuse biases
            qk_layernorm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            num_experts=num_experts,
            moe_topk=get("num_experts_per_tok") if moe else None,
            moe_ffn_hidden_size=get("moe_intermediate_size") if moe else None,
            moe_norm_topk_prob=bool(get("norm_topk_prob")) if moe else True,
            moe_layers=_moe_layers(get, num_layers) if moe else None,
            rope_scaling_factor=_llama3_rope_factor(rope_parameters, get("rope_scaling")),
        )


def _moe_layers(get, num_layers: int) -> tuple[bool, ...]:
    """HF Qwen3-MoE's rule: layer i is MoE unless listed in ``mlp_only_layers``, and only every
    ``decoder_sparse_step``-th layer counting from 1 (Megatron's integer ``moe_layer_freq`` counts from 0)."""
    dense = set(get("mlp_only_layers") or ())
    step = get("decoder_sparse_step") or 1
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


# Megatron-Core's RotaryEmbedding applies Llama 3 scaling with these constants fixed; only the factor is free.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_rope_factor(rope_parameters: dict, rope_scaling: Optional[dict]) -> Optional[float]:
    params = {**(rope_scaling or {}), **rope_parameters}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(
            "model.rope_parameters.rope_type", f"RoPE scaling {rope_type!r} is not supported",
            "use a checkpoint with default or 'llama3' RoPE",
        )
    for name, value in _LLAMA3_FIXED.items():
        if name in params and float(params[name]) != value:
            raise ConfigError(
                f"model.rope_parameters.{name}",
                f"{params[name]} is not supported: Megatron-Core's llama3 RoPE scaling fixes it to {value}",
                "use a checkpoint with the published Llama 3.1-3.3 RoPE constants",
            )
    return float(params["factor"])


def _refuse_unsupported_options(architecture: str, get) -> None:
    """HF options that change the computation in ways the Megatron model does not reproduce."""
    act = get("hidden_act") or "silu"
    if act != "silu":
        raise ConfigError("model.hidden_act", f"{act!r} is not supported", "use a SwiGLU ('silu') checkpoint")
    if architecture != "Qwen2ForCausalLM" and get("attention_bias"):
        raise ConfigError(
            "model.attention_bias", f"{architecture} with attention_bias=true also has an o_proj bias, which "
            "Megatron's linear_proj (add_bias_linear=False) does not hold", "use a checkpoint without attention biases",
        )
    if get("mlp_bias"):
        raise ConfigError("model.mlp_bias", "MLP biases are not supported", "use a checkpoint with mlp_bias=false")
    if get("use_sliding_window"):
        raise ConfigError(
            "model.use_sliding_window", "sliding-window attention is not supported",
            "use a checkpoint with use_sliding_window=false",
        )


def _getter(hf_config: Any):
    if isinstance(hf_config, Mapping):
        return hf_config.get
    return lambda name: getattr(hf_config, name, None)
