"""The ALP layer spec on Megatron-Core: identity when off, the realised perturbation, the sigma gradient,
vocab-parallel logprobs, and sigma's optimizer group (real gloo ranks)."""

import math

import pytest
import torch

from tests.distributed import run_ranks
from tests.model.probes import logprobs_entry, run_all

pytestmark = pytest.mark.megatron

ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.fixture(scope="module")
def probes():
    return run_ranks(1, run_all, ARCHITECTURES)[0]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_perturbation_off_is_bit_identical_to_megatrons_unwrapped_spec(probes, architecture):
    result = probes["identity"][architecture]
    assert result["weights_equal"]
    assert result["disabled_equal"], "alp_disabled() changed the logits"
    assert result["eval_equal"], "eval mode perturbed the forward"
    assert result["tiny_sigma_equal"], "sigma -> 0 did not reduce to the unperturbed model"
    assert result["perturbed_max_diff"] > 1e-3, "the training forward was not perturbed"
    assert result["log_sigma_names"] == [f"decoder.layers.{i}.alp.log_sigma" for i in range(4)]


def test_realised_perturbation_matches_sigma(probes):
    for layer, row in probes["ratio"].items():
        # delta = sigma * eps with eps ~ N(0, 1): its RMS over 2 x 16 x 64 values is sigma within a few %
        assert row["rms_delta"] == pytest.approx(0.05, rel=0.06), f"layer {layer}"
        assert row["reported"] == pytest.approx(row["ratio"], rel=1e-5), f"layer {layer}"
    # noise enters the residual stream: later layers see a larger input, so a smaller ratio
    assert probes["ratio"][0]["ratio"] > probes["ratio"][3]["ratio"]


def test_log_sigma_gradient_agrees_with_finite_differences(probes):
    rows = probes["finite_difference"]
    assert len(rows) == 4
    for layer, row in rows.items():
        assert abs(row["autograd"]) > 1e-6, f"layer {layer} has no sigma gradient"
        assert row["autograd"] == pytest.approx(row["numeric"], rel=1e-4), f"layer {layer}"


def test_logprobs_and_entropy_equal_a_direct_softmax(probes):
    tp1 = probes["logprobs_tp1"]
    torch.testing.assert_close(torch.tensor(tp1["logprobs"]), torch.tensor(tp1["direct_logprobs"]).float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(tp1["entropy"]), torch.tensor(tp1["direct_entropy"]).float(),
                               rtol=1e-5, atol=1e-5)


def test_vocab_parallel_logprobs_at_tp2_equal_tp1(probes):
    tp2 = run_ranks(2, logprobs_entry, 2)
    tp1 = probes["logprobs_tp1"]
    for rank, result in enumerate(tp2):
        assert result["local_vocab"] == tp1["local_vocab"] // 2, "TP=2 must hold half the vocabulary"
        for key in ("logprobs", "logprobs_t07", "entropy"):
            torch.testing.assert_close(torch.tensor(result[key]), torch.tensor(tp1[key]), rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank}: {key}")
    # each rank holds half of the (vocab-parallel) embedding rows and their gradient
    total = sum(result["embedding_grad_sq"] for result in tp2)
    assert total == pytest.approx(tp1["embedding_grad_sq"], rel=1e-5)


def test_log_sigma_has_its_own_optimizer_group(probes):
    groups = probes["sigma_lr_group"]["groups"]
    sigma_groups = [g for g in groups if g["sigma"]]
    assert len(sigma_groups) == 1
    assert sigma_groups[0]["size"] == probes["sigma_lr_group"]["num_log_sigma"] == 4
    assert sigma_groups[0]["lr"] == pytest.approx(0.123)
    assert sigma_groups[0]["weight_decay"] == pytest.approx(0.01)
    others = [g for g in groups if not g["sigma"]]
    assert others and all(math.isclose(g["lr"], 1e-4) for g in others)
