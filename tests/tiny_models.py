"""Tiny HF configs of each supported architecture, built offline for tests."""

BASE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "vocab_size": 256,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def hf_config(architecture: str = "LlamaForCausalLM", **overrides) -> dict:
    config = {**BASE, "architectures": [architecture]}
    if architecture == "Qwen3MoeForCausalLM":
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)
    config.update(overrides)
    return config
