"""Block-wise FP8 quantisation of rollout weights: shapes, error bound, agreement with SGLang's own code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from alp_megatron.bridge import fp8
from alp_megatron.errors import ConfigError

SHAPES = [(256, 384), (300, 200), (128, 1), (1, 130), (4, 257, 129)]


def _weight(shape, seed=0, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator) * scale
    # Blocks of very different magnitude, so a wrong block index changes the scale visibly.
    return x * torch.linspace(0.01, 10.0, x.shape[-1])


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_dtypes(shape):
    q, scale_inv = fp8.quantize_blockwise(_weight(shape))
    *batch, n, k = shape
    assert q.shape == torch.Size(shape) and q.dtype == torch.float8_e4m3fn
    assert scale_inv.shape == torch.Size([*batch, -(-n // 128), -(-k // 128)])
    assert scale_inv.dtype == torch.float32


@pytest.mark.parametrize("scale_format", fp8.SCALE_FORMATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantised_error_bound(shape, scale_format):
    x = _weight(shape)
    q, scale_inv = fp8.quantize_blockwise(x, scale_format=scale_format)
    restored = fp8.dequantize_blockwise(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normals, and an absolute error of at
    # most half the smallest subnormal (2^-10) times the block's scale below them.
    scale = scale_inv.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    bound = x.abs() * 2.0**-4 + scale * 2.0**-10
    assert ((restored - x).abs() <= bound * (1 + 1e-6)).all()
    # and the scale uses the fp8 range: the largest element of each block maps to at most 448
    assert q.float().abs().max() <= fp8.E4M3_MAX


def test_scale_is_block_amax_over_448_including_partial_blocks():
    x = _weight((300, 200))
    _, scale_inv = fp8.quantize_blockwise(x)
    for i, rows in enumerate([(0, 128), (128, 256), (256, 300)]):
        for j, cols in enumerate([(0, 128), (128, 200)]):
            block = x[rows[0]:rows[1], cols[0]:cols[1]]
            assert scale_inv[i, j] == pytest.approx(float(block.abs().max()) / 448.0, rel=1e-6)


def test_zero_block_stays_zero_with_finite_scale():
    x = torch.zeros(128, 256)
    x[:, 128:] = 1.0
    q, scale_inv = fp8.quantize_blockwise(x)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    assert (q[:, :128].float() == 0).all()
    assert torch.equal(fp8.dequantize_blockwise(q, scale_inv), x)


def test_ue8m0_scales_are_powers_of_two():
    _, scale_inv = fp8.quantize_blockwise(_weight((300, 200)), scale_format="ue8m0")
    mantissa, _ = torch.frexp(scale_inv)
    assert (mantissa == 0.5).all()


def test_only_linears_sglang_quantises_are_converted():
    bucket = [
        ("model.embed_tokens.weight", torch.randn(64, 32)),
        ("model.layers.0.input_layernorm.weight", torch.ones(32)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(32, 32)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(32)),
        ("model.layers.0.mlp.gate.weight", torch.randn(4, 32)),  # MoE router
        ("model.layers.0.mlp.shared_expert_gate.weight", torch.randn(1, 32)),
        ("model.layers.0.mlp.experts.3.down_proj.weight", torch.randn(32, 16)),
        ("model.layers.0.mlp.shared_expert.up_proj.weight", torch.randn(16, 32)),
        ("model.layers.1.self_attn.o_proj.weight", torch.randn(32, 32)),
        ("lm_head.weight", torch.randn(64, 32)),
    ]
    out = dict(fp8.quantize_bucket(bucket, ignored=["model.layers.1.self_attn.o_proj"]))
    quantised = {n for n, t in out.items() if t.dtype == torch.float8_e4m3fn}
    assert quantised == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.experts.3.down_proj.weight",
        "model.layers.0.mlp.shared_expert.up_proj.weight",
    }
    for name in quantised:
        scale = out[name.replace(".weight", ".weight_scale_inv")]
        assert scale.dtype == torch.float32 and scale.shape == (1, 1)
    for name, tensor in bucket:
        if name not in quantised:
            assert out[name] is tensor
    assert len(out) == len(bucket) + len(quantised)


def test_served_fp8_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(fp8.with_fp8_quantization_config({"model_type": "llama"})))
    assert fp8.served_fp8_config(str(tmp_path))["weight_block_size"] == [128, 128]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert fp8.served_fp8_config(str(tmp_path)) is None
    # what the bridge cannot produce is refused before anything is sent, naming the field
    refused = [({"quant_method": "fp8"}, "block-wise"),
               ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "block-wise"),
               ({**fp8.FP8_QUANTIZATION_CONFIG, "activation_scheme": "static"}, "block-wise"),
               ({"quant_method": "compressed-tensors"}, "'compressed-tensors' is not a format"),
               ({"quant_method": "awq", "bits": 4}, "'awq' is not a format")]
    for config, problem in refused:
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
        with pytest.raises(ConfigError, match=problem) as error:
            fp8.served_fp8_config(str(tmp_path))
        assert error.value.field.startswith(str(tmp_path / "config.json"))


_SGLANG_SIDE = textwrap.dedent("""
    import sys, torch
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant, per_block_cast_to_fp8
    data = torch.load(sys.argv[1])
    out = {}
    for key, x in data["inputs"].items():
        out["cast_" + key] = per_block_cast_to_fp8(x)
    for key, (q, s) in data["ours"].items():
        out["dequant_" + key] = block_quant_dequant(q, s, [128, 128], torch.float32)
    torch.save(out, sys.argv[2])
""")


def test_agrees_with_sglang_block_fp8(tmp_path):
    """SGLang's loader dequantises our (weight, weight_scale_inv) exactly as we do, and our UE8M0 mode is
    bit-identical to DeepGEMM's ``per_block_cast_to_fp8`` that SGLang ships (fp32 and bf16 inputs)."""
    from alp_megatron._patches.sglang import server_environment

    inputs = {"fp32": _weight((300, 200)), "bf16": _weight((256, 130), seed=1).to(torch.bfloat16)}
    ours = {key: fp8.quantize_blockwise(x) for key, x in inputs.items()}
    torch.save({"inputs": inputs, "ours": ours}, tmp_path / "in.pt")
    # SGLang's quantization package imports model configs that need the CPU stand-ins: its own process.
    subprocess.run([sys.executable, "-c", _SGLANG_SIDE, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=server_environment(dict(os.environ), device="cpu"), check=True, capture_output=True, timeout=120)
    sglang = torch.load(tmp_path / "out.pt")
    for key, x in inputs.items():
        q, s = ours[key]
        assert torch.equal(sglang["dequant_" + key], fp8.dequantize_blockwise(q, s))
        q_ue8m0, s_ue8m0 = fp8.quantize_blockwise(x, scale_format="ue8m0")
        q_ref, s_ref = sglang["cast_" + key]
        assert torch.equal(q_ue8m0.view(torch.uint8), q_ref.view(torch.uint8))
        assert torch.equal(s_ue8m0, s_ref)



_SGLANG_SKIPS = textwrap.dedent("""
    import json, sys
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.utils import is_layer_skipped
    skipped = []
    for ignored, prefix in json.loads(sys.argv[1]):
        config = Fp8Config.from_config({"quant_method": "fp8", "activation_scheme": "dynamic",
                                        "weight_block_size": [128, 128], "ignored_layers": ignored})
        skipped.append(is_layer_skipped(prefix, config.ignored_layers))
    print(json.dumps(skipped))
""")


def test_ignored_layers_are_matched_as_sglang_matches_them():
    """A served checkpoint's ``ignored_layers`` keep linears unquantised in SGLang; the bridge leaves exactly
    those in their dtype (SGLang's own Fp8Config and is_layer_skipped decide, on its fused module names)."""
    from alp_megatron._patches.sglang import server_environment

    assert fp8.served_ignored_layers({"modules_to_not_convert": ["lm_head"]}) == ("lm_head",)
    assert fp8.served_ignored_layers({"ignored_layers": ["a"], "modules_to_not_convert": ["b"]}) == ("a",)
    assert fp8.served_ignored_layers(fp8.FP8_QUANTIZATION_CONFIG) == ()
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    names = [f"model.layers.{i}.{part}.{proj}.weight" for i in (0, 1)
             for part, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 ("mlp", ("gate_proj", "up_proj", "down_proj"))) for proj in projs]
    ignore_lists = [[], ["model.layers.1"], ["layers.0.self_attn"], ["mlp.gate", "lm_head"], ["model.layers.0.mlp"],
                    ["model.layers.1.self_attn.o_proj"], ["mlp.down_proj"], ["model.layers.1.mlp.gate_up_proj"]]
    cases, ours = [], []
    for ignored in ignore_lists:
        for name in names:
            module, proj = name[: -len(".weight")].rsplit(".", 1)
            cases.append([ignored, f"{module}.{fused.get(proj, proj)}"])
            ours.append(not fp8.is_quantised_name(name, ignored))
    result = subprocess.run([sys.executable, "-c", _SGLANG_SKIPS, json.dumps(cases)], capture_output=True, text=True,
                            env=server_environment(dict(os.environ), device="cpu"), check=True, timeout=120)
    skipped = json.loads(result.stdout.strip().splitlines()[-1])
    assert any(skipped) and not all(skipped)
    assert ours == skipped, [(c, o, t) for c, o, t in zip(cases, ours, skipped) if o != t]


def test_rounding_keeps_names_shapes_and_dtypes_and_rounds_only_what_sglang_quantises():
    """``fp8_rounded`` sends each quantised linear as its e4m3 round trip in its own dtype, the rest untouched."""
    bucket = [("model.layers.0.self_attn.q_proj.weight", _weight((256, 130))),
              ("model.layers.0.mlp.down_proj.weight", _weight((130, 300), seed=1).to(torch.bfloat16)),
              ("model.layers.0.mlp.gate.weight", _weight((4, 130), seed=2)),
              ("model.norm.weight", torch.ones(130))]
    rounded = fp8.round_bucket(bucket)
    assert [(n, t.shape, t.dtype) for n, t in rounded] == [(n, t.shape, t.dtype) for n, t in bucket]
    for (name, tensor), (_, out) in zip(bucket, rounded):
        if fp8.is_quantised_name(name):
            expected = fp8.dequantize_blockwise(*fp8.quantize_blockwise(tensor)).to(tensor.dtype)
            assert torch.equal(out, expected) and not torch.equal(out, tensor)
        else:
            assert out is tensor
    kept = fp8.round_bucket(bucket, ignored=["mlp.down_proj"])
    assert kept[1][1] is bucket[1][1]  # a layer the served checkpoint keeps unquantised is not rounded


def _arch(**overrides):
    from alp_megatron.model.arch import ModelArch
    from tests.tiny_models import hf_config

    return ModelArch.from_hf_config(hf_config(**overrides))


def test_block_quant_problems_follow_sglangs_partition_rules():
    # the tiny test model: 64-wide projections are not whole 128-row blocks
    tiny = fp8.block_quant_problems(_arch(), tp_size=1)
    assert any("q_proj rows per engine rank = 64" in p for p in tiny)
    assert any("k_proj/v_proj rows per engine rank = 32" in p for p in tiny)
    # Qwen3-8B's shapes fit at every TP size SGLang serves it with
    qwen3_8b = dict(architecture="Qwen3ForCausalLM", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, intermediate_size=12288)
    assert all(fp8.block_quant_problems(_arch(**qwen3_8b), tp) == [] for tp in (1, 2, 4, 8))
    # Qwen3-30B-A3B's experts (768 wide) split over 8 ranks are 96 wide: refused, naming the experts
    qwen3_30b = dict(architecture="Qwen3MoeForCausalLM", hidden_size=2048, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8)
    assert fp8.block_quant_problems(_arch(**qwen3_30b), 2) == []
    problems = fp8.block_quant_problems(_arch(**qwen3_30b), 8)
    assert problems == ["expert gate_proj/up_proj rows per engine rank = 96, not a multiple of 128",
                        "expert down_proj columns per engine rank = 96, not a multiple of 128"]


def test_an_fp8_copy_of_a_checkpoint_is_what_the_bridge_sends(tmp_path):
    """The checkpoint launched servers serve under ``rollout_precision: fp8``: the quantization_config SGLang
    reads, the names and shapes of the bridge's quantised buckets, the tokenizer, and weights within e4m3's bound."""
    from alp_megatron.bridge.weight_sync import ServedManifest
    from tests.bridge.test_transports import load_tensors
    from tests.sglang_fixtures import tiny_model

    source = tiny_model(tmp_path / "source", hidden_size=256, intermediate_size=512, head_dim=64)
    target = fp8.write_fp8_checkpoint(source, str(tmp_path / "served"))
    assert fp8.served_fp8_config(target) == fp8.FP8_QUANTIZATION_CONFIG
    assert sorted(os.listdir(tmp_path)) == ["served", "source"]  # no staging folder left
    original, served = load_tensors(source), load_tensors(target)
    manifest = ServedManifest(target)
    manifest.check(fp8.quantize_bucket(list(original.items())), last=True)  # raises on any difference
    assert {n for n in served if n.endswith("weight_scale_inv")} == {
        n[: -len("weight")] + "weight_scale_inv" for n in original if fp8.is_quantised_name(n)}
    for name, tensor in original.items():
        if fp8.is_quantised_name(name):
            restored = fp8.dequantize_blockwise(served[name], served[name[: -len("weight")] + "weight_scale_inv"])
            assert torch.equal(restored, fp8.round_blockwise(tensor))
            assert (restored - tensor).abs().max() <= tensor.abs().max() / 16  # e4m3: 3 mantissa bits
        else:
            assert torch.equal(served[name], tensor)
    assert {f for f in os.listdir(source) if "token" in f} <= set(os.listdir(target))
