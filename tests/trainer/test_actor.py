"""The actor on real gloo ranks: K mini-batch steps per rollout batch, independent of the layout, and
non-finite steps skipped, never applied."""

import functools
import math

import pytest

from alp_megatron.model.provider import ModelConfig, ParallelConfig
from tests.distributed import run_ranks
from tests.model.layouts import ALP, Layout, save_reference
from tests.trainer.actor_probes import actor_refusal, run_actor

pytestmark = pytest.mark.megatron

METRIC_KEYS = ("ratio_seq_p999", "ratio_seq_max", "clip_frac", "mismatch_k3", "entropy", "loss")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("actor_reference"))
    run_ranks(1, save_reference, Layout("actor"), directory)
    return directory


@pytest.fixture(scope="module")
def single_rank(reference_dir):
    return run_ranks(1, run_actor, ParallelConfig(), reference_dir, "alp_seq")[0]


def _assert_same_training(result, baseline, name, loss_abs=1e-7):
    for got, want in zip(result["reports"], baseline["reports"]):
        assert got["applied"] == want["applied"], name
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5, abs=loss_abs), f"{name}: losses"
        assert got["grad_norms"] == pytest.approx(want["grad_norms"], rel=1e-5), f"{name}: grad norms"
        for key in METRIC_KEYS:
            tolerance = loss_abs if key == "loss" else 1e-7
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-5, abs=tolerance), f"{name}: {key}"


def test_k_mini_batches_make_k_optimizer_steps(single_rank):
    assert single_rank["optimizer_steps"] == 6
    for report in single_rank["reports"]:
        assert report["applied"] == [True, True]
        assert all(math.isfinite(g) and g > 0 for g in report["grad_norms"])
        assert report["metrics"]["response_tokens"] == sum(6 + (i % 4) * 2 for i in range(8))
        # padded micro-batches of 2 rows of the batch's 16 positions hold 104 real tokens of 128
        assert report["metrics"]["padded_share"] == pytest.approx(1 - 104 / 128)
        assert report["metrics"]["micro_batches"] == 2.0
        assert report["metrics"]["entropy"] > 0


@pytest.mark.parametrize("name,parallel", [
    ("dp2", ParallelConfig()),
    ("pp2", ParallelConfig(pipeline_parallel=2)),
])
def test_actor_is_independent_of_layout(reference_dir, single_rank, name, parallel):
    results = run_ranks(2, run_actor, parallel, reference_dir, "alp_seq")
    for result in results:  # every rank holds the same report, the first pipeline stage included
        _assert_same_training(result, single_rank, name)


@pytest.mark.parametrize("name,ranks,parallel,budget,extra", [
    ("packed", 1, ParallelConfig(), 40, {}),  # 2-3 samples of 10-16 tokens per micro-batch
    pytest.param("packed_one_per_micro_batch", 1, ParallelConfig(), 16, {}, marks=pytest.mark.plumbing),
    # micro_batch_size (2) x the longest sample (16)
    pytest.param("packed_auto", 1, ParallelConfig(), "auto", {}, marks=pytest.mark.plumbing),
    pytest.param("packed_dp2", 2, ParallelConfig(), 40, {}, marks=pytest.mark.plumbing),
    ("packed_tp2_sp", 2, ParallelConfig(tensor_parallel=2, sequence_parallel=True), 40, {}),
    ("packed_pp2", 2, ParallelConfig(pipeline_parallel=2), 40, {}),
    ("packed_pp2_vpp2", 2, ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2), 40, {}),
    # one 48-token row would hold a mini-batch's share: interleaving needs micro-batches in groups of PP
    pytest.param("packed_pp2_vpp2_split_to_pp", 2, ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2),
                 60, {}, marks=pytest.mark.plumbing),
    ("packed_tp2_recompute", 2, ParallelConfig(tensor_parallel=2), 40, {"model": ModelConfig(recompute="full")}),
    ("packed_pp2_recompute", 2, ParallelConfig(pipeline_parallel=2), 16, {"model": ModelConfig(recompute="full")}),
    ("packed_dp2_distributed_optimizer", 2, ParallelConfig(), 40, {"distributed_optimizer": True}),
    ("packed_tp2_pp2", 4, ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 40, {}),
])
def test_packed_micro_batches_train_as_padded_ones(reference_dir, single_rank, name, ranks, parallel, budget, extra):
    """Samples packed by a token budget (block-diagonal attention, positions and ALP noise per sample; data-
    parallel shares balanced by tokens) give the padded run's losses, gradient norms and metrics (fp32, rtol
    1e-5)."""
    results = run_ranks(ranks, functools.partial(run_actor, max_tokens=budget, **extra), parallel, reference_dir,
                        "alp_seq")
    for result in results:  # the loss sums its O(1) terms in another grouping: a few 1e-7 absolute apart
        _assert_same_training(result, single_rank, name, loss_abs=1e-6)
        if not parallel.sequence_parallel and "pp2" not in name:  # no row padding needed
            assert all(report["metrics"]["padded_share"] == 0.0 for report in result["reports"]), name


def test_packed_pipeline_runs_mini_batches_of_different_lengths_in_one_shape(reference_dir):
    # the old-logprob pass runs both mini-batches in one schedule: their packed rows are padded to one length
    padded = run_ranks(1, functools.partial(run_actor, varied=True), ParallelConfig(), reference_dir, "alp_seq")[0]
    packed = functools.partial(run_actor, varied=True, max_tokens=40)
    for result in run_ranks(2, packed, ParallelConfig(pipeline_parallel=2), reference_dir, "alp_seq"):
        _assert_same_training(result, padded, "packed_pp2_varied", loss_abs=1e-6)


MOE = "Qwen3MoeForCausalLM"


@pytest.fixture(scope="module")
def moe_reference_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("actor_moe_reference"))
    run_ranks(1, save_reference, Layout("actor", MOE), directory)
    return directory


def test_packed_moe_trains_as_padded_also_under_expert_parallelism(moe_reference_dir):
    # The experts' matmuls see other token counts packed than padded (padding is routed too), so fp32 sums
    # round differently; a loss near 0 (advantage-weighted terms of either sign, each about 1) then differs
    # by a few 1e-7 absolute: the loss is held to 1e-6 absolute, the rest to rtol 1e-5.
    padded = run_ranks(1, functools.partial(run_actor, architecture=MOE), ParallelConfig(), moe_reference_dir,
                       "alp_seq")[0]
    packed = functools.partial(run_actor, architecture=MOE, max_tokens=40)
    _assert_same_training(run_ranks(1, packed, ParallelConfig(), moe_reference_dir, "alp_seq")[0], padded, "moe",
                          loss_abs=1e-6)
    for result in run_ranks(2, packed, ParallelConfig(expert_parallel=2), moe_reference_dir, "alp_seq"):
        _assert_same_training(result, padded, "moe_ep2", loss_abs=1e-6)


def test_replayed_moe_routes_train_the_same_under_every_layout(moe_reference_dir):
    """The engine's routes (random here, unlike the model's own choice) replayed in every pass: one rank,
    TP=2 + SP (each rank replays its slice of the sequence), EP=2 and PP=2 with full recomputation (1F1B over
    two micro-batches; the recompute replays each micro-batch's routes in backward order) train alike, and
    differently from routing freely."""
    replay = functools.partial(run_actor, architecture=MOE, routes=True, max_tokens=40,
                               model=ModelConfig(routing_replay="rollout"))
    one = run_ranks(1, replay, ParallelConfig(), moe_reference_dir, "alp_seq")[0]
    free = run_ranks(1, functools.partial(run_actor, architecture=MOE, routes=True, max_tokens=40), ParallelConfig(),
                     moe_reference_dir, "alp_seq")[0]
    assert one["reports"][0]["losses"] != pytest.approx(free["reports"][0]["losses"], rel=1e-3)
    assert one["reports"][0]["metrics"]["micro_batches"] >= 2
    # random routes of top-2 of 4 experts: the trainer's own choice agrees for about 1 in 6 (token, layer)s,
    # counted whether replayed or not (the first layer sees the same input either way: the same count), and
    # the same over every layout (the counts are reduced over the ranks)
    agreement = [report["metrics"]["routing_agreement"] for report in one["reports"]]
    assert all(0.05 < a < 0.4 for a in agreement)
    first_layer = [run["reports"][0]["metrics"]["routing_agreement_layer0"] for run in (one, free)]
    assert first_layer[0] == first_layer[1]
    # 1F1B runs both forwards of stage 0 before its first backward: the recompute must replay the first
    # micro-batch's routes, not the last ones set (a single rank would not tell them apart)
    recompute = functools.partial(replay, model=ModelConfig(routing_replay="rollout", recompute="full"))
    for result in run_ranks(2, recompute, ParallelConfig(pipeline_parallel=2), moe_reference_dir, "alp_seq"):
        _assert_same_training(result, one, "replay pp2 recompute", loss_abs=1e-6)
    # TP=2 splits each expert's matmul too, so a loss near 0 differs by up to ~2e-6 absolute (a wrong slice of
    # the routes: ~1e-3)
    # (TP=2 without SP: Megatron-Core's MoELayer refuses to train MoE under TP without SP)
    for name, parallel, loss_abs in (("tp2_sp", ParallelConfig(tensor_parallel=2, sequence_parallel=True), 1e-5),
                                     ("ep2", ParallelConfig(expert_parallel=2), 1e-6)):
        for result in run_ranks(2, replay, parallel, moe_reference_dir, "alp_seq"):
            _assert_same_training(result, one, f"replay {name}", loss_abs=loss_abs)
            assert [report["metrics"]["routing_agreement"] for report in result["reports"]] == agreement, name


@pytest.mark.plumbing
def test_a_replaying_actor_refuses_samples_without_routes(moe_reference_dir):
    run = functools.partial(run_actor, architecture=MOE, model=ModelConfig(routing_replay="rollout"))
    with pytest.raises(RuntimeError, match="routing_replay': is rollout, but the training batch carries no routes"):
        run_ranks(1, run, ParallelConfig(), moe_reference_dir, "alp_seq")


@pytest.mark.plumbing
def test_tokens_out_of_the_loss_mask_change_nothing(reference_dir, single_rank):
    """Tokens the policy did not produce (a tool's output: loss mask 0 in the Sample) train, packed, as if
    their rollout logprobs were anything; and masking them changes training."""
    runs = [run_ranks(1, functools.partial(run_actor, max_tokens="auto", tool_shift=shift), ParallelConfig(),
                      reference_dir, "alp_seq")[0] for shift in (0.0, 4.0)]
    _assert_same_training(runs[1], runs[0], "tool tokens' logprobs moved")
    tokens = sum(6 + (i % 4) * 2 for i in range(8))
    assert runs[0]["reports"][0]["metrics"]["response_tokens"] == tokens - sum(
        len(range(1, 6 + (i % 4) * 2, 4)) for i in range(8))
    assert runs[0]["reports"][0]["losses"] != pytest.approx(single_rank["reports"][0]["losses"], rel=1e-3)


def test_epochs_repeat_the_mini_batches(reference_dir, single_rank):
    result = run_ranks(1, run_actor, ParallelConfig(), reference_dir, "alp_seq", False, 2)[0]
    assert result["optimizer_steps"] == 12
    first = result["reports"][0]
    assert len(first["losses"]) == 4 and all(first["applied"])
    assert first["losses"][:2] == single_rank["reports"][0]["losses"]  # epoch 0 is the one-epoch run
    assert first["metrics"]["ratio_seq_max"] == single_rank["reports"][0]["metrics"]["ratio_seq_max"]


def test_old_policy_methods_recompute_pi_old(reference_dir):
    result = run_ranks(1, run_actor, ParallelConfig(), reference_dir, "grpo")[0]
    assert all(r["applied"] == [True, True] for r in result["reports"])
    _assert_mismatch_is_the_batch_s(result)


def test_reported_mismatch_is_computed_from_the_batch(single_rank):
    """mismatch_k3 of every rollout batch equals one computed by hand from the same batch: the rollout
    logprobs and the model's unperturbed logprobs before the batch's first optimizer step."""
    _assert_mismatch_is_the_batch_s(single_rank)


def _assert_mismatch_is_the_batch_s(result):
    reported = [report["metrics"]["mismatch_k3"] for report in result["reports"]]
    assert len(result["k3_by_hand"]) == 3 and min(result["k3_by_hand"]) > 1e-3
    assert reported == pytest.approx(result["k3_by_hand"], rel=1e-6)
    assert len(set(reported)) == 3  # the model moves between batches


def test_bypass_is_alp_seq_with_the_perturbation_off(reference_dir, single_rank):
    """A real model: bypass (ALP off) trains as alp_seq with every sigma at 1e-9 (rtol 1e-5), and not as
    alp_seq at the reference's sigma 0.1, so the comparison can fail."""
    import dataclasses

    bypass = run_ranks(1, run_actor, ParallelConfig(), reference_dir, "bypass", False, 1,
                       dataclasses.replace(ALP, enabled=False))[0]
    vanishing = run_ranks(1, run_actor, ParallelConfig(), reference_dir, "alp_seq", False, 1, ALP, 1e-9)[0]
    _assert_same_training(bypass, vanishing, "bypass vs alp_seq at sigma 1e-9")
    first_loss = [r["reports"][0]["losses"][0] for r in (bypass, single_rank)]
    assert first_loss[0] != pytest.approx(first_loss[1], rel=1e-3), first_loss  # sigma 0.1: another policy


def test_non_finite_step_is_skipped_and_reported(reference_dir, single_rank):
    result = run_ranks(1, run_actor, ParallelConfig(), reference_dir, "alp_seq", True)[0]
    poisoned = result["reports"][1]
    assert poisoned["applied"] == [False, True]  # the NaN advantage sits in the first mini-batch
    assert "loss is nan" in poisoned["skip_reasons"][0]
    # the skipped step changed nothing: the first rollout batch trained exactly as in the clean run
    assert result["reports"][0]["losses"] == single_rank["reports"][0]["losses"]
    before, after = result["parameter_sums"][1]
    assert math.isfinite(after) and after != before  # the second, finite mini-batch was applied
    assert all(math.isfinite(g) for g in result["reports"][2]["grad_norms"])


@pytest.mark.plumbing
def test_context_parallelism_is_refused_until_the_trainer_splits_sequences():
    """The actor does not split sequences over context-parallel ranks: it refuses CP rather than train on
    wrong attention (on a GPU, Transformer Engine would run it without complaint)."""
    for message in run_ranks(2, actor_refusal, ParallelConfig(context_parallel=2)):
        assert "parallel.context_parallel" in message and "does not split sequences" in message

