"""HF -> Megatron import and Megatron -> HF export on real gloo ranks, at TP, PP (and virtual stages), EP.

Each tiny HF model (random weights giving O(1) logits) is imported under each layout; the Megatron logits
must equal transformers' own fp32 eager forward (max abs diff <= 1e-4), and the export must give every HF
tensor back bit-identical (torch.equal), never a ``log_sigma``, in buckets that respect the byte limit.
Bad checkpoints fail with one error on every rank and leave every weight unchanged.
"""

import dataclasses
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from alp_megatron.model.provider import ParallelConfig
from tests.bridge.bridge_probes import (
    ALP,
    SAVED_SHARD_BYTES, Case, hf_logits, hf_tensors, make_hf_folder, run_all, run_cases, save_sharded_copy,
)
from tests.distributed import run_ranks

pytestmark = pytest.mark.megatron

MODELS = {  # key: (architecture, seed, vocab_size or None (tokenizer's 50), config overrides)
    "llama": ("LlamaForCausalLM", 1, 51, {}),  # GQA 4/2, untied, vocab 51: padded at TP=2
    "qwen2": ("Qwen2ForCausalLM", 2, None, {}),  # q/k/v biases
    "qwen3": ("Qwen3ForCausalLM", 3, None, {"head_dim": 24}),  # head_dim != hidden/heads, q/k norms
    "qwen3_tied": ("Qwen3ForCausalLM", 4, None, {"tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", 5, None, {"mlp_only_layers": [0]}),  # layer 0 dense
    # MoE on layers 1 and 3 only, softmax over all experts without renormalising, vocab 51
    "qwen3_moe_sparse": ("Qwen3MoeForCausalLM", 6, 51, {"decoder_sparse_step": 2, "norm_topk_prob": False}),
}
DENSE = ["llama", "qwen2", "qwen3", "qwen3_tied"]
TP2, PP2 = ParallelConfig(tensor_parallel=2), ParallelConfig(pipeline_parallel=2)
VPP = ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2)
EP2 = ParallelConfig(expert_parallel=2)

TWO_RANKS = (
    [Case("tp2", m, TP2) for m in DENSE + ["qwen3_moe", "qwen3_moe_sparse"]]
    + [Case("pp2", m, PP2) for m in DENSE + ["qwen3_moe"]]
    + [Case("pp2_vpp2", m, VPP) for m in ("llama", "qwen3_tied")]
    + [Case("ep2", m, EP2) for m in ("qwen3_moe", "qwen3_moe_sparse")]
    + [Case("tp2_logits_only_alp", "llama", TP2, alp=dataclasses.replace(ALP, target="logits"))]
    + [Case("tp2_bf16_export", "qwen2", TP2, dtype=torch.bfloat16),
       # read from transformers' shards + index; written back with save_hf_folder in shards
       Case("ep2_sharded_folders", "qwen3_moe_sharded", EP2, save_as="saved_qwen3_moe")]
)
FOUR_RANKS = (
    [Case("tp2_pp2", m, ParallelConfig(tensor_parallel=2, pipeline_parallel=2)) for m in DENSE + ["qwen3_moe_sparse"]]
    + [Case("tp2_ep2", "qwen3_moe", ParallelConfig(tensor_parallel=2, expert_parallel=2)),
       Case("pp2_ep2", "qwen3_moe", ParallelConfig(pipeline_parallel=2, expert_parallel=2))]
)


def case_id(case):
    return f"{case.layout}-{case.model}"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    made = {}
    for key, (architecture, seed, vocab, overrides) in MODELS.items():
        made[key] = make_hf_folder(str(root / key), architecture, seed, vocab, **overrides)
    made.update(_bad_folders(root, made))
    made["qwen3_moe_sharded"] = save_sharded_copy(made["qwen3_moe"], str(root / "qwen3_moe_sharded"), "60KB")
    made["saved_qwen3_moe"] = str(root / "saved_qwen3_moe")  # written by the ranks
    return made


@pytest.fixture(scope="module")
def references(folders):
    logits = {key: hf_logits(folders[key]) for key in MODELS}
    logits["qwen3_moe_sharded"] = logits["qwen3_moe"]
    return logits


@pytest.fixture(scope="module")
def two_ranks(folders):
    return run_ranks(2, run_all, TWO_RANKS, FAILURES, folders)


@pytest.fixture(scope="module")
def two_rank_results(two_ranks):
    return [rank["cases"] for rank in two_ranks]


@pytest.fixture(scope="module")
def four_rank_results(folders):
    return run_ranks(4, run_cases, FOUR_RANKS, folders)


def _check_case(index, case, per_rank, folders, references):
    results = [rank_results[index] for rank_results in per_rank]
    logits = [r["logits"] for r in results if r["logits"] is not None]
    assert logits, f"{case_id(case)}: no rank returned logits"
    reference = references[case.model]
    assert reference.abs().max() > 1.0, "the reference logits are too small to test anything"
    for value in logits:
        assert value.shape == reference.shape
        diff = float((value - reference).abs().max())
        assert diff <= 1e-4, f"{case_id(case)}: max |logits - HF| = {diff}"
    for result in results:  # vocab padding: zero rows, masked to a logit far below any real one
        padded = result["padded_columns"]
        if padded is not None and padded.numel():
            assert float(padded.max()) <= -1e8, f"{case_id(case)}: padded vocab columns are not masked"
    hf_names = set(hf_tensors(folders[case.model]))
    first = results[0]
    for rank, result in enumerate(results):
        assert result["names"] == first["names"], f"{case_id(case)}: rank {rank} got other buckets or order"
        assert result["bucket_sizes"] == first["bucket_sizes"]
        assert not result["mismatched"], f"{case_id(case)} rank {rank}: not bit-identical: {result['mismatched']}"
        assert result["bucket_rule"], f"{case_id(case)}: a bucket over the limit held more than one tensor"
        assert result["log_sigma_unchanged"] and result["log_sigma_count"] > 0
    assert sorted(first["names"]) == sorted(hf_names), f"{case_id(case)}: exported names differ from the file"
    assert not any("log_sigma" in name for name in first["names"])
    assert len(first["bucket_sizes"]) > 1, "the byte limit should split the export into several buckets"


@pytest.mark.parametrize("index,case", list(enumerate(TWO_RANKS)), ids=[case_id(c) for c in TWO_RANKS])
def test_two_ranks_logits_match_hf_and_export_is_bit_identical(index, case, two_rank_results, folders, references):
    _check_case(index, case, two_rank_results, folders, references)


@pytest.mark.parametrize("index,case", list(enumerate(FOUR_RANKS)), ids=[case_id(c) for c in FOUR_RANKS])
def test_four_ranks_logits_match_hf_and_export_is_bit_identical(index, case, four_rank_results, folders, references):
    _check_case(index, case, four_rank_results, folders, references)


def test_saved_folder_is_sharded_complete_and_loads_in_transformers(folders, two_rank_results, references):
    import json

    saved = folders["saved_qwen3_moe"]
    files = sorted(os.listdir(saved))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and all(f"-of-{len(shards):05d}.safetensors" in f for f in shards)
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert name in files
    assert not [f for f in os.listdir(os.path.dirname(saved)) if ".partial-" in f]
    index = json.load(open(os.path.join(saved, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # at most the shard limit, unless one tensor alone is larger
        tensors = load_file(os.path.join(saved, shard))
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= SAVED_SHARD_BYTES
    original, written = hf_tensors(folders["qwen3_moe"]), hf_tensors(saved)
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    torch.testing.assert_close(hf_logits(saved), references["qwen3_moe"], rtol=0, atol=0)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_table_names_exactly_what_transformers_saves(key, folders):
    from alp_megatron.bridge.hf_folder import arch_from_hf_folder
    from alp_megatron.bridge.mapping import hf_tensor_names

    names = hf_tensor_names(arch_from_hf_folder(folders[key]))
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(load_file(os.path.join(folders[key], "model.safetensors")))


def test_vocab_padding_and_moe_layer_pattern_were_exercised(folders, two_rank_results):
    from alp_megatron.bridge.hf_folder import arch_from_hf_folder
    from alp_megatron.model.provider import padded_vocab_size

    tp2_llama = TWO_RANKS.index(Case("tp2", "llama", TP2))
    assert two_rank_results[0][tp2_llama]["padded_columns"].shape[-1] == 1  # 51 -> 52 rows at TP=2

    sparse = arch_from_hf_folder(folders["qwen3_moe_sparse"])
    assert sparse.moe_layers == (False, True, False, True)
    assert padded_vocab_size(sparse.vocab_size, 2) == 52 != sparse.vocab_size
    assert arch_from_hf_folder(folders["qwen3_moe"]).moe_layers == (False, True, True, True)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def _bad_folders(root, made):
    """Copies of the MoE model with a defect each (expert 3 sits on expert-parallel rank 1 at EP=2)."""
    source = made["qwen3_moe"]

    def variant(key, edit):
        folder = str(root / key)
        shutil.copytree(source, folder)
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
        return folder

    def misshape(tensors):
        tensors["model.layers.2.mlp.experts.3.down_proj.weight"] = torch.zeros(64, 40)

    def missing_and_unexpected(tensors):
        del tensors["model.layers.1.mlp.experts.0.up_proj.weight"]
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    no_weights = str(root / "no_weights")
    shutil.copytree(source, no_weights)
    os.remove(os.path.join(no_weights, "model.safetensors"))
    return {"misshaped": variant("misshaped", misshape),
            "missing": variant("missing", missing_and_unexpected),
            "no_weights": no_weights}


FAILURES = [
    ("import", "misshaped", EP2, "qwen3_moe"),
    ("import", "missing", EP2, "qwen3_moe"),
    ("import", "no_weights", EP2, "qwen3_moe"),
    ("import", "qwen3", TP2, "qwen2"),  # another model's weights: qkv biases missing, q/k norms unexpected
    ("unmapped", "llama", TP2, None),
    ("export_one_stage", "llama", PP2, None),
]


@pytest.fixture(scope="module")
def failures(two_ranks):
    return [[rank["failures"][i] for rank in two_ranks] for i in range(len(FAILURES))]


def _one_error_everywhere(results):
    errors = [r["error"] for r in results]
    assert errors[0] is not None, "the import did not fail"
    assert all(e == errors[0] for e in errors), "ranks raised different errors"
    assert all(r["unchanged"] for r in results), "a weight changed before the error"
    return errors[0]


def test_misshaped_tensor_on_one_rank_fails_every_rank_and_changes_nothing(failures):
    error = _one_error_everywhere(failures[0])
    assert "model.layers.2.mlp.experts.3.down_proj.weight is [64, 40]" in error
    assert "needs [64, 64]" in error and "model.safetensors" in error and "Fix:" in error


def test_missing_and_unexpected_tensors_in_one_error(failures):
    error = _one_error_everywhere(failures[1])
    assert "missing tensors: model.layers.1.mlp.experts.0.up_proj.weight" in error
    assert "unexpected tensors: model.layers.0.mlp.extra.weight" in error


def test_folder_without_weights_names_the_files_it_looked_for(failures):
    error = _one_error_everywhere(failures[2])
    assert "model.safetensors" in error and "model.safetensors.index.json" in error


def test_weights_of_another_model_are_refused(failures):
    error = _one_error_everywhere(failures[3])
    assert "missing tensors: model.layers.0.self_attn.q_proj.bias" in error
    assert "model.layers.0.self_attn.q_norm.weight" in error  # unexpected
    assert "mis-shaped" in error  # qwen3's head_dim 24 projections


def test_unmapped_megatron_parameter_is_an_error_listing_it(failures):
    for message in failures[4]:
        assert message is not None and "decoder.layers.0.extra_scale" in message
        assert "log_sigma" not in message  # excluded by NOT_MODEL_WEIGHTS, not reported


def test_an_unmapped_parameter_on_one_stage_fails_the_export_on_every_stage(failures):
    messages = failures[5]
    assert all(m == messages[0] for m in messages) and "decoder.layers.0.extra_scale" in messages[0], messages
