"""The weight-equality check: catches and names a corrupted tensor, on a real SGLang server (CPU here)."""

from __future__ import annotations

import pytest
import torch

from alp_megatron.bridge.verify import (
    Mismatch,
    WeightMismatchError,
    _compare,
    check_logprobs,
    check_weights,
    comparable_names,
    verify_update,
)
from alp_megatron.bridge.weight_sync import EngineSpec, WeightSync, WeightSyncConfig
from alp_megatron.rollout.engine_control import EngineControl
from tests.bridge.test_transports import PROMPTS, HFReference, buckets_of, load_tensors

CORRUPTED = "model.layers.1.self_attn.o_proj.weight"


# -------------------------------------------------------------------------------------------------
# Engine-free parts


def test_only_names_sglang_holds_one_to_one_are_compared():
    names = [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
    ]
    assert comparable_names(names) == [
        "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.q_norm.weight",
    ]
    # under FP8 serving the quantised linears come back as fp8 and are left to the logprob check
    assert "model.layers.0.self_attn.o_proj.weight" not in comparable_names(names, fp8_served=True)


def test_compare_reports_the_worst_element_and_accepts_a_vocab_shard():
    trainer = torch.arange(12.0).view(6, 2)
    served = trainer.clone()
    served[4, 1] += 0.25
    mismatch = _compare("w", served, trainer, rows=None, served_dtype=None, atol=0.0)
    assert isinstance(mismatch, Mismatch) and mismatch.max_abs_diff == 0.25 and "(4, 1)" in mismatch.detail
    # TP rank 0's rows of a vocab-parallel embedding, or SGLang's padded vocabulary: the common rows
    assert _compare("w", trainer[:3], trainer, rows=None, served_dtype=None, atol=0.0) == 0.0
    padded = torch.cat([trainer, torch.full((2, 2), 9.0)])
    assert _compare("w", padded, trainer, rows=None, served_dtype=None, atol=0.0) == 0.0
    # rounding to the served dtype first
    fine = trainer + 1e-3
    assert _compare("w", fine.bfloat16().float(), fine, None, torch.bfloat16, 0.0) == 0.0
    assert _compare("w", fine.bfloat16().float(), fine, None, None, 0.0).max_abs_diff > 0
    wrong = _compare("w", torch.zeros(6, 3), trainer, rows=None, served_dtype=None, atol=0.0)
    assert "engine shape (6, 3)" in wrong.detail


# -------------------------------------------------------------------------------------------------
# Against the server


@pytest.fixture(scope="module")
def reference(models):
    return HFReference(models[1])


def _push(server, tensors, version):
    config = WeightSyncConfig(engines=[EngineSpec(server.url)], transport="tensor")
    with WeightSync(config) as sync:
        sync.sync(buckets_of(tensors), version)


def test_correct_update_verifies(server, models, reference):
    tensors = load_tensors(models[1])
    _push(server, tensors, "good")
    control = EngineControl(server.url)
    report = verify_update(control, tensors, PROMPTS, reference, names="all", rows=None)
    assert report.ok and report.max_weight_diff == 0.0 and report.max_logprob_diff <= 1e-4
    assert len(report.compared) == len(comparable_names(list(tensors))) == 11
    # the default: a sample of names, their leading rows
    sampled = check_weights(control, tensors, sample=3, seed=1)
    assert len(sampled.compared) == 3 and sampled.ok
    # a fused tensor asked for explicitly is listed as not comparable rather than compared wrongly
    explicit = check_weights(control, tensors, names=["model.layers.0.self_attn.q_proj.weight", CORRUPTED])
    assert explicit.unavailable == ["model.layers.0.self_attn.q_proj.weight"] and explicit.compared == [CORRUPTED]


def test_corrupted_tensor_is_named(server, models, reference):
    tensors = load_tensors(models[1])
    corrupted = dict(tensors)
    corrupted[CORRUPTED] = tensors[CORRUPTED].clone()
    corrupted[CORRUPTED][3, 7] += 0.5
    _push(server, corrupted, "corrupted")
    with pytest.raises(WeightMismatchError) as caught:
        verify_update(EngineControl(server.url), tensors, PROMPTS, reference, names="all", rows=None)
    error = caught.value
    assert error.url == server.url and CORRUPTED in str(error)
    weight_mismatches = [m for m in error.mismatches if not m.name.startswith("probe")]
    assert [m.name for m in weight_mismatches] == [CORRUPTED]
    assert weight_mismatches[0].max_abs_diff == pytest.approx(0.5, abs=1e-6)
    assert "(3, 7)" in weight_mismatches[0].detail
    # the logprobs moved too, and each probe that differs is named
    assert any(m.name.startswith("probe[") for m in error.mismatches)


def test_corrupted_fused_tensor_is_caught_by_the_logprob_check(server, models, reference):
    tensors = load_tensors(models[1])
    corrupted = dict(tensors)
    corrupted["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"] * 3
    _push(server, corrupted, "corrupted-q")
    control = EngineControl(server.url)
    assert check_weights(control, tensors, names="all", rows=None).ok  # q_proj is not comparable by name
    with pytest.raises(WeightMismatchError) as caught:
        verify_update(control, prompts=PROMPTS, reference=reference)
    assert {m.name for m in caught.value.mismatches} <= {f"probe[{i}]" for i in range(len(PROMPTS))}
    assert all(m.max_abs_diff > 1e-4 for m in caught.value.mismatches)


def test_an_fp8_rounded_update_serves_the_trainers_weights_rounded_through_e4m3_blocks(server, models, tmp_path):
    """``rollout_precision: fp8_rounded``: the weight-equality check in its FP8 form holds exactly (the 1:1
    linears against their e4m3 round trip, the fused ones through the logprobs of a model holding the rounded
    weights), while the plain check names every rounded linear, and the engine's logprobs moved off the
    trainer's: the rounding is a mismatch, not a no-op."""
    import shutil

    from safetensors.torch import save_file

    from alp_megatron.bridge import fp8

    tensors = load_tensors(models[1])
    config = WeightSyncConfig(engines=[EngineSpec(server.url)], transport="tensor", rollout_precision="fp8_rounded")
    with WeightSync(config) as sync:
        sync.sync(buckets_of(tensors), "rounded")
    rounded_dir = tmp_path / "rounded"
    shutil.copytree(models[1], rounded_dir)
    save_file(dict(fp8.round_bucket(list(tensors.items()))), str(rounded_dir / "model.safetensors"))
    control = EngineControl(server.url)
    report = verify_update(control, tensors, PROMPTS, HFReference(str(rounded_dir)), names="all", rows=None,
                           rounded_fp8=True)
    assert report.max_weight_diff == 0.0 and report.max_logprob_diff <= 1e-4
    assert CORRUPTED in report.compared  # o_proj: quantised, compared in its rounded form
    with pytest.raises(WeightMismatchError) as caught:
        verify_update(control, tensors, names="all", rows=None)
    differ = {m.name for m in caught.value.mismatches}
    assert differ == {n for n in comparable_names(list(tensors)) if fp8.is_quantised_name(n)}
    unrounded = check_logprobs(control, PROMPTS, HFReference(models[1]), atol=float("inf"))
    assert unrounded.max_logprob_diff > 1e-3
