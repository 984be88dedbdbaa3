"""ALP training is independent of the parallel layout (real gloo ranks, fp32).

Same reference weights, data and seed: after 3 optimizer steps the loss, gradient norm and every
log_sigma value and gradient under each layout equal the single-rank run (rtol 1e-5).
"""

import dataclasses

import pytest
import torch

from alp_megatron.model.provider import ModelConfig, ParallelConfig
from tests.distributed import run_ranks
from tests.model.layouts import ALP, Layout, run_layouts, run_reference

pytestmark = pytest.mark.megatron

DENSE = "LlamaForCausalLM"  # GQA, RMSNorm, SwiGLU, RoPE, tied embeddings
MOE = "Qwen3MoeForCausalLM"  # q/k norms, 4 experts top-2, untied embeddings

ALP_LAYERS = 4  # decoder layers of the tiny test models (tests/tiny_models.py)
LOGITS_ONLY = dataclasses.replace(ALP, target="logits")  # the ablation: one sigma on the vocab-parallel logits

REFERENCES = [Layout("dense", DENSE), Layout("moe", MOE, loss_method="alp_token"),
              Layout("dense_logits_only", DENSE, loss_method="alp_token", alp=LOGITS_ONLY)]

TWO_RANKS = [
    Layout("tp2", DENSE, ParallelConfig(tensor_parallel=2)),
    Layout("tp2_sp", DENSE, ParallelConfig(tensor_parallel=2, sequence_parallel=True)),
    Layout("pp2_1f1b", DENSE, ParallelConfig(pipeline_parallel=2)),
    Layout("pp2_vpp2_interleaved", DENSE, ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2)),
    Layout("dp2_distributed_optimizer", DENSE, distributed_optimizer=True),
    Layout("tp2_recompute", DENSE, ParallelConfig(tensor_parallel=2), ModelConfig(recompute="full")),
    # 4 micro-batches through 2 stages: the first stage runs micro-batch 1's forward before micro-batch 0's
    # backward recomputes, so only the replayed noise key (not the current one) gives the same noise
    Layout("pp2_recompute", DENSE, ParallelConfig(pipeline_parallel=2), ModelConfig(recompute="full")),
    Layout("ep2_alltoall", MOE, ParallelConfig(expert_parallel=2), loss_method="alp_token"),
    Layout("ep2_allgather", MOE, ParallelConfig(expert_parallel=2), ModelConfig(moe_dispatcher="allgather"),
           loss_method="alp_token"),
    Layout("tp2_sp_logits_only", DENSE, ParallelConfig(tensor_parallel=2, sequence_parallel=True),
           loss_method="alp_token", alp=LOGITS_ONLY),
    Layout("pp2_logits_only", DENSE, ParallelConfig(pipeline_parallel=2), loss_method="alp_token", alp=LOGITS_ONLY),
]
FOUR_RANKS = [
    Layout("tp2_pp2", DENSE, ParallelConfig(tensor_parallel=2, pipeline_parallel=2)),
    Layout("tp2_ep2_sp", MOE, ParallelConfig(tensor_parallel=2, expert_parallel=2, sequence_parallel=True),
           loss_method="alp_token"),
]


@pytest.fixture(scope="module")
def reference_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    return {layout.reference: str(root / layout.name) for layout in REFERENCES}


@pytest.fixture(scope="module")
def baselines(reference_dirs):
    results = run_ranks(1, run_reference, REFERENCES, reference_dirs)[0]
    return {layout.reference: result for layout, result in zip(REFERENCES, results)}


@pytest.fixture(scope="module")
def two_rank_results(reference_dirs, baselines):
    return _merge(TWO_RANKS, run_ranks(2, run_layouts, TWO_RANKS, reference_dirs))


@pytest.fixture(scope="module")
def four_rank_results(reference_dirs, baselines):
    return _merge(FOUR_RANKS, run_ranks(4, run_layouts, FOUR_RANKS, reference_dirs))


def _merge(layouts, per_rank):
    """One result per layout: every layer's log_sigma from the rank that holds it, replicas consistent."""
    merged = {}
    for index, layout in enumerate(layouts):
        results = [rank_results[index] for rank_results in per_rank]
        combined = dict(losses=results[0]["losses"], grad_norms=results[0]["grad_norms"],
                        log_sigma={}, log_sigma_grad={})
        for result in results:
            assert result["losses"] == combined["losses"], f"{layout.name}: ranks disagree on the loss"
            for key in ("log_sigma", "log_sigma_grad"):
                for layer, value in result[key].items():
                    if layer in combined[key]:
                        assert value == combined[key][layer], f"{layout.name}: replicas of layer {layer} differ"
                    combined[key][layer] = value
        merged[layout.name] = combined
    return merged


def assert_same_training(result, baseline, name):
    close = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result["losses"], baseline["losses"], **close, msg=f"{name}: loss")
    torch.testing.assert_close(result["grad_norms"], baseline["grad_norms"], **close, msg=f"{name}: grad norm")
    assert sorted(result["log_sigma"]) == sorted(baseline["log_sigma"]), f"{name}: layers with log_sigma"
    for key in ("log_sigma", "log_sigma_grad"):
        for layer, value in baseline[key].items():
            torch.testing.assert_close(result[key][layer], value, **close, msg=f"{name}: {key}[{layer}]")


def test_reference_run_learns_sigma(baselines):
    """The baseline itself must move sigma, or equal sigmas across layouts would prove nothing."""
    for result in baselines.values():
        initial = torch.log(torch.tensor(0.1)).item()
        assert all(abs(v - initial) > 1e-3 for v in result["log_sigma"].values())
        assert all(abs(g) > 1e-5 for g in result["log_sigma_grad"].values())
    # the logits-only ablation has one sigma, keyed one past the last decoder layer
    logits_only = REFERENCES[-1]
    assert list(baselines[logits_only.reference]["log_sigma"]) == [ALP_LAYERS]


@pytest.mark.parametrize("layout", TWO_RANKS, ids=lambda layout: layout.name)
def test_two_rank_layout_matches_single_rank(layout, two_rank_results, baselines):
    assert_same_training(two_rank_results[layout.name], baselines[layout.reference], layout.name)


@pytest.mark.parametrize("layout", FOUR_RANKS, ids=lambda layout: layout.name)
def test_four_rank_layout_matches_single_rank(layout, four_rank_results, baselines):
    assert_same_training(four_rank_results[layout.name], baselines[layout.reference], layout.name)
