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

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

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
        rope_theta = get("rope_theta")
        if rope_theta is None:
            rope_theta = (get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            architecture=architecture,
            num_layers=get("num_hidden_layers"),
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
            qkv_bias=architecture == "Qwen2ForCausalLM" or bool(get("attention_bias")),
            qk_layernorm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            num_experts=get("num_experts") if moe else None,
            moe_topk=get("num_experts_per_tok") if moe else None,
            moe_ffn_hidden_size=get("moe_intermediate_size") if moe else None,
            moe_norm_topk_prob=bool(get("norm_topk_prob")) if moe else True,
        )


def _getter(hf_config: Any):
    if isinstance(hf_config, Mapping):
        return hf_config.get
    return lambda name: getattr(hf_config, name, None)
