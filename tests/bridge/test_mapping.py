"""The mapping tables and tensor layouts, without process groups: each layout's load/merge are exact
inverses at every split, the Megatron layouts are the measured ones, and the tables name exactly the
tensors transformers saves."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alp_megatron.bridge.mapping import (
    GATE_UP, GROUPED_DOWN, GROUPED_GATE_UP, QKV, REPLICATED, ROW, TABLES, VOCAB, WeightMappingError,
    Shard, expert_rows, hf_tensor_names, is_ignored_hf_name, table_for,
)
from alp_megatron.errors import ConfigError
from alp_megatron.model.arch import ModelArch
from tests.tiny_models import hf_config

H = 64
LLAMA = ModelArch.from_hf_config(hf_config("LlamaForCausalLM", vocab_size=51))  # 4 heads, 2 groups, hd 16
ONE_GROUP = ModelArch.from_hf_config(hf_config("LlamaForCausalLM", num_key_value_heads=1))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(layout, sources, size, arch, experts=1):
    shards = [layout.load(sources, Shard(rank, size), arch) for rank in range(size)]
    return shards, layout.merge(torch.stack(shards), arch, experts)


CASES = {
    "replicated": (REPLICATED, lambda: [randn(H)], LLAMA),
    "row": (ROW, lambda: [randn(H, 128)], LLAMA),
    "vocab_51": (VOCAB, lambda: [randn(51, H)], LLAMA),
    "qkv": (QKV, lambda: [randn(64, H, seed=1), randn(32, H, seed=2), randn(32, H, seed=3)], LLAMA),
    "qkv_bias": (QKV, lambda: [randn(64, seed=1), randn(32, seed=2), randn(32, seed=3)], LLAMA),
    "qkv_one_group": (QKV, lambda: [randn(64, H, seed=1), randn(16, H, seed=2), randn(16, H, seed=3)], ONE_GROUP),
    "gate_up": (GATE_UP, lambda: [randn(128, H, seed=1), randn(128, H, seed=2)], LLAMA),
}


@pytest.mark.parametrize("size", [1, 2, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_inverts_load_at_every_split(name, size):
    layout, make, arch = CASES[name]
    sources = make()
    shards, merged = roundtrip(layout, sources, size, arch)
    assert len(merged) == len(sources)
    for got, want in zip(merged, sources):
        assert torch.equal(got, want)
    if layout.split_dim is not None and size > 1:
        assert shards[0].shape[layout.split_dim] * size >= sources[0].shape[layout.split_dim]
        assert not torch.equal(shards[0], shards[1]), "ranks must hold different shards"


def test_fused_qkv_interleaves_query_groups():
    q, k, v = CASES["qkv"][1]()
    groups, per_group, hd = 2, 2 * 16, 16
    expected = torch.cat([q.view(groups, per_group, H), k.view(groups, hd, H), v.view(groups, hd, H)], 1).view(-1, H)
    (full,), _ = roundtrip(QKV, [q, k, v], 1, LLAMA)
    assert torch.equal(full, expected)
    assert not torch.equal(full, torch.cat([q, k, v])), "a plain concatenation is the wrong layout"
    shards, _ = roundtrip(QKV, [q, k, v], 2, LLAMA)
    assert torch.equal(shards[1], torch.cat([q[32:], k[16:], v[16:]]))  # rank 1 holds query group 1 whole


def test_fused_qkv_with_fewer_groups_than_ranks_splits_the_group_block():
    q, k, v = CASES["qkv_one_group"][1]()
    block = torch.cat([q, k, v])  # one group: [4 q heads, k, v]
    shards, _ = roundtrip(QKV, [q, k, v], 2, ONE_GROUP)
    assert torch.equal(shards[0], block[:48]) and torch.equal(shards[1], block[48:])


def test_gate_up_is_sliced_per_rank_not_as_one_block():
    gate, up = CASES["gate_up"][1]()
    shards, _ = roundtrip(GATE_UP, [gate, up], 2, LLAMA)
    assert torch.equal(shards[1], torch.cat([gate[64:], up[64:]]))
    assert not torch.equal(shards[1], torch.cat([gate, up])[128:])


def test_vocab_rows_are_zero_padded_then_stripped():
    (embedding,) = CASES["vocab_51"][1]()
    shards, (merged,) = roundtrip(VOCAB, [embedding], 2, LLAMA)
    assert [s.shape[0] for s in shards] == [26, 26]
    assert torch.equal(shards[1][-1], torch.zeros(H)) and merged.shape == (51, H)
    assert VOCAB.hf_shapes(LLAMA, (52, H), 1) == [(51, H)]


def test_layouts_read_the_same_from_safetensors_slices(tmp_path):
    """Ranks read slices of the file (only their rows/columns); the shard equals one cut from the tensor."""
    tensors = {f"{name}.{i}": t for name in CASES for i, t in enumerate(CASES[name][1]())}
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    with safe_open(path, framework="pt") as handle:
        for name, (layout, make, arch) in CASES.items():
            sources = make()
            slices = [handle.get_slice(f"{name}.{i}") for i in range(len(sources))]
            for rank in range(2):
                from_file = layout.load(slices, Shard(rank, 2), arch)
                assert torch.equal(from_file, layout.load(sources, Shard(rank, 2), arch)), name


def test_shapes_on_meta_tensors_need_no_data():
    meta = [torch.empty(64, H, device="meta"), torch.empty(32, H, device="meta"), torch.empty(32, H, device="meta")]
    assert QKV.load(meta, Shard(1, 2), LLAMA).shape == (64, H)
    assert QKV.hf_shapes(LLAMA, (128, H), 1) == [(64, H), (32, H), (32, H)]


# ----------------------------------------------------------------------------------------------------------
# Grouped-GEMM expert layouts (GPU only in Megatron; shape rules and inverses checked here)

EXPERTS, INNER = 3, 32


def _expert_sources():
    gates = [randn(INNER, H, seed=10 + e) for e in range(EXPERTS)]
    ups = [randn(INNER, H, seed=20 + e) for e in range(EXPERTS)]
    downs = [randn(H, INNER, seed=30 + e) for e in range(EXPERTS)]
    return gates, ups, downs


@pytest.mark.parametrize("size", [1, 2])
def test_legacy_grouped_mlp_weight1_is_megatrons_view_of_the_per_expert_fc1(size):
    gates, ups, _ = _expert_sources()
    sources = [t for e in range(EXPERTS) for t in (gates[e], ups[e])]
    shards, merged = roundtrip(GROUPED_GATE_UP, sources, size, LLAMA, EXPERTS)
    assert shards[0].shape == (H, EXPERTS * 2 * INNER // size)
    for rank, weight1 in enumerate(shards):
        for e in range(EXPERTS):  # GroupedMLP.forward: weight1.view(experts, hidden, -1), used as x @ w1[e]
            fc1 = GATE_UP.load([gates[e], ups[e]], Shard(rank, size), LLAMA)
            assert torch.equal(weight1.view(EXPERTS, H, -1)[e].t(), fc1)
    assert all(torch.equal(a, b) for a, b in zip(merged, sources))
    assert GROUPED_GATE_UP.hf_shapes(LLAMA, (H, EXPERTS * 2 * INNER), EXPERTS) == [(INNER, H)] * (2 * EXPERTS)


@pytest.mark.parametrize("size", [1, 2])
def test_legacy_grouped_mlp_weight2_is_megatrons_view_of_the_per_expert_fc2(size):
    _, _, downs = _expert_sources()
    shards, merged = roundtrip(GROUPED_DOWN, downs, size, LLAMA, EXPERTS)
    assert shards[0].shape == (EXPERTS * INNER // size, H)
    for rank, weight2 in enumerate(shards):
        for e in range(EXPERTS):  # GroupedMLP.forward: weight2.view(experts, -1, hidden)
            assert torch.equal(weight2.view(EXPERTS, -1, H)[e].t(), ROW.load([downs[e]], Shard(rank, size), LLAMA))
    assert all(torch.equal(a, b) for a, b in zip(merged, downs))
    assert GROUPED_DOWN.hf_shapes(LLAMA, (EXPERTS * INNER, H), EXPERTS) == [(H, INNER)] * EXPERTS


def test_expert_layout_names():
    table = table_for("Qwen3MoeForCausalLM")
    names = {layout: [row.megatron for row in expert_rows(table, layout)]
             for layout in ("sequential", "te_grouped", "legacy_grouped")}
    assert names["sequential"] == ["mlp.experts.local_experts.{expert}.linear_fc1.weight",
                                   "mlp.experts.local_experts.{expert}.linear_fc2.weight"]
    assert names["te_grouped"] == ["mlp.experts.linear_fc1.weight{expert}", "mlp.experts.linear_fc2.weight{expert}"]
    assert names["legacy_grouped"] == ["mlp.experts.weight1", "mlp.experts.weight2"]
    for layout in ("sequential", "te_grouped", "legacy_grouped"):
        assert [row.hf for row in expert_rows(table, layout)] == [row.hf for row in table.experts]


# ----------------------------------------------------------------------------------------------------------
# Tables and architectures


def test_table_is_chosen_by_the_exact_architecture_name():
    assert set(TABLES) == {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"}
    with pytest.raises(WeightMappingError) as error:
        table_for("LlamaForCausalLm")
    assert "LlamaForCausalLM" in str(error.value) and "Fix:" in str(error.value)
    with pytest.raises(ConfigError) as config_error:
        ModelArch.from_hf_config(hf_config("MistralForCausalLM"))
    assert config_error.value.field == "model.architectures"


def test_ignored_and_tied_names():
    assert is_ignored_hf_name(LLAMA, "model.layers.3.self_attn.rotary_emb.inv_freq")
    assert not is_ignored_hf_name(LLAMA, "model.layers.3.self_attn.rotary.inv_freq")
    tied = ModelArch.from_hf_config(hf_config("Qwen3ForCausalLM", tie_word_embeddings=True))
    assert is_ignored_hf_name(tied, "lm_head.weight") and "lm_head.weight" not in hf_tensor_names(tied)
    assert hf_tensor_names(LLAMA)[-1] == "lm_head.weight"


def test_arch_reads_the_moe_pattern_expert_count_and_rope_scaling():
    moe = ModelArch.from_hf_config({**hf_config("Qwen3MoeForCausalLM", mlp_only_layers=[2]), "num_experts": None,
                                    "num_local_experts": 4})
    assert moe.num_experts == 4 and moe.moe_layers == (True, True, False, True)
    llama3 = ModelArch.from_hf_config(hf_config(rope_theta=None, rope_parameters={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 5e5}))
    assert llama3.rope_scaling_factor == 32.0 and llama3.rope_theta == 5e5
    assert LLAMA.rope_scaling_factor is None


@pytest.mark.parametrize("overrides,field", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "model.rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 4096}},
     "model.rope_parameters.original_max_position_embeddings"),
    ({"attention_bias": True}, "model.attention_bias"),
    ({"mlp_bias": True}, "model.mlp_bias"),
    ({"hidden_act": "gelu"}, "model.hidden_act"),
])
def test_unsupported_options_are_refused_by_name(overrides, field):
    with pytest.raises(ConfigError) as error:
        ModelArch.from_hf_config(hf_config(**overrides))
    assert error.value.field == field and "Fix:" in str(error.value)


def test_output_folder_problems(tmp_path):
    from alp_megatron.bridge.hf_folder import output_folder_problem

    assert output_folder_problem(str(tmp_path / "new")) is None
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in output_folder_problem(str(tmp_path / "full")).args[1]
    assert "does not exist" in output_folder_problem(str(tmp_path / "no" / "out")).args[1]
    assert os.listdir(tmp_path) == ["full"] or sorted(os.listdir(tmp_path)) == ["full"]
