"""A tiny Hugging Face model folder (config, safetensors, tokenizer), built offline.

The embedded CPU default, the tests and the benchmarks all need a real checkpoint that SGLang,
``transformers`` and the bridge can load, without any download. The tokenizer is character level:
special tokens, digits, arithmetic signs, lowercase letters and a space, one token each.
"""

from __future__ import annotations

import os
from typing import Optional

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
CHARACTERS = tuple("0123456789+-=*/() .,?abcdefghijklmnopqrstuvwxyz")
ASCII_CHARACTERS = tuple(chr(code) for code in range(32, 127)) + ("\n",)
"""Printable ASCII and the newline: enough for a tiny model to write Python (the multi-turn tool tasks)."""

_ARCH_DEFAULTS = {
    "LlamaForCausalLM": {"model_type": "llama"},
    "Qwen2ForCausalLM": {"model_type": "qwen2"},
    "Qwen3ForCausalLM": {"model_type": "qwen3"},
    "Qwen3MoeForCausalLM": {
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "norm_topk_prob": True,
    },
}

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def build_char_tokenizer(characters: tuple = CHARACTERS):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``characters`` (:data:`CHARACTERS`, or
    :data:`ASCII_CHARACTERS`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(characters))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="?",
    )


def save_tiny_model(
    out_dir: str,
    architecture: str = "LlamaForCausalLM",
    seed: int = 0,
    vocab_size: Optional[int] = None,
    characters: tuple = CHARACTERS,
    **config_overrides,
) -> str:
    """Write a randomly initialised model of ``architecture`` with the char tokenizer to ``out_dir``.

    ``vocab_size`` defaults to the tokenizer's size; a larger one is allowed (ids past the tokenizer
    decode to nothing); ``characters``: the tokenizer's (see :func:`build_char_tokenizer`). Weights are fp32.
    Returns ``out_dir``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if architecture not in _ARCH_DEFAULTS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {sorted(_ARCH_DEFAULTS)}")
    tokenizer = build_char_tokenizer(characters)
    fields = {**TINY_SHAPE, **_ARCH_DEFAULTS[architecture], **config_overrides}
    model_type = fields.pop("model_type")
    fields.update(
        architectures=[architecture],
        vocab_size=vocab_size or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
