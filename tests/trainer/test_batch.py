"""Micro-batches from rollout samples: the padded batch, the token-budget plan and the packed row."""

import pytest
import torch

from alp_megatron.errors import AlpError
from alp_megatron.sample import EXTRA_PREFIX, Sample
from alp_megatron.trainer.batch import (balanced_shares, build_training_batch, micro_batch_counts,
                                       packed_micro_batch, plan_micro_batches)


def _batch(lengths, prompt=2):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (prompt,), generator=gen).tolist() for _ in lengths]
    responses = [torch.randint(1, 50, (n - prompt,), generator=gen).tolist() for n in lengths]
    logprobs = [(-torch.rand(n - prompt, generator=gen)).tolist() for n in lengths]
    return build_training_batch([Sample.given(p, r, lp, 0.5 * i, 100 + i) for i, (p, r, lp)
                                 in enumerate(zip(prompts, responses, logprobs))])


def test_a_record_becomes_its_row_with_mask_and_logprobs_at_the_predicting_positions():
    batch = build_training_batch([Sample.given([5, 6, 7], [8, 9], [-0.5, -0.25], 1.0, 42)], pad_to_multiple=4)
    assert batch.tokens.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch.targets.tolist() == [[6, 7, 8, 9, 0, 0, 0, 0]]
    # position 2 predicts token 8 (the first response token), position 3 predicts 9
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0]]
    assert batch.rollout_logprobs.tolist() == [[0, 0, -0.5, -0.25, 0, 0, 0, 0]]
    assert batch.sample_ids.tolist() == [42] and batch.advantages.tolist() == [1.0]


def test_the_records_loss_mask_leaves_out_the_tokens_the_policy_did_not_produce():
    # a model turn (8, 9), a tool's output (20, 21: mask 0, no logprob), another model turn (10)
    record = Sample.given([5, 6], [8, 9, 20, 21, 10], [-0.5, -0.25, 0.0, 0.0, -0.75], 1.0, 3,
                          loss_mask=[1, 1, 0, 0, 1])
    batch = build_training_batch([record])
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0, 0, 1, 0]]
    assert batch.rollout_logprobs.tolist() == [[0, -0.5, -0.25, 0, 0, -0.75, 0]]


def test_per_token_extras_travel_with_their_tokens_padded_and_packed():
    routes = [torch.arange(n * 6, dtype=torch.int16).reshape(n, 2, 3) + 100 * i for i, n in enumerate([5, 3, 4])]
    records = [Sample.given([1, 2], [3] * (n - 2), [-1.0] * (n - 2), 0.0, i, extras={"routes": r})
               for i, (n, r) in enumerate(zip([5, 3, 4], routes))]
    batch = build_training_batch(records)
    assert batch.extras["routes"].shape == (3, 5, 2, 3) and batch.extras["routes"].dtype == torch.int16
    for i, r in enumerate(routes):
        assert torch.equal(batch.extras["routes"][i, : len(r)], r)
        assert not batch.extras["routes"][i, len(r):].any()
    micro = packed_micro_batch(batch, [2, 0], pad_to_multiple=4)  # 4 + 5 tokens, padded to 12 rows
    assert torch.equal(micro[EXTRA_PREFIX + "routes"][0, :9], torch.cat([routes[2], routes[0]]))
    assert micro[EXTRA_PREFIX + "routes"].shape == (1, 12, 2, 3) and not micro[EXTRA_PREFIX + "routes"][0, 9:].any()
    assert torch.equal(batch.select(slice(1, 2)).as_micro_batch()[EXTRA_PREFIX + "routes"], batch.extras["routes"][1:2])


def test_a_bad_record_is_an_error_naming_it():
    cases = [
        (Sample.given([1], [2, 3], [-1.0], 0.0, 7), "sample 0 .id 7. has 2 response tokens but 1 rollout logprobs"),
        (Sample.given([1], [2], [float("-inf")], 0.0, 7), "non-finite rollout logprobs"),
        (Sample.given([1], [2, 3], [-1.0, -1.0], 0.0, 7, loss_mask=[1]), "loss mask of 1 values for 2 response"),
        (Sample.given([1], [2], [-1.0], 0.0, 7, loss_mask=[2]), "one 0 or 1 per response token"),
        (Sample.given([1], [2], [-1.0], 0.0, 7, extras={"routes": torch.zeros(1, 4)}),
         "extra 'routes' of shape .1, 4.; it needs one row per token of prompt and response .2."),
        (Sample.given([], [2], [-1.0], 0.0, 7), "empty prompt"),
    ]
    for record, message in cases:
        with pytest.raises(AlpError, match=message):
            build_training_batch([record])
    with pytest.raises(AlpError, match="more than the model's 2"):
        build_training_batch([Sample.given([1, 2], [3], [-1.0], 0.0, 7)], max_length=2)
    unscored = Sample.given([1], [2], [-1.0], 0.0, 7)
    unscored.advantage = None
    with pytest.raises(AlpError, match="sample 0 has no advantage; score the rollout first"):
        build_training_batch([unscored])
    with pytest.raises(AlpError, match="sample 1 .id 8. has extras .'routes'., sample 0 has .."):
        build_training_batch([Sample.given([1], [2], [-1.0], 0.0, 7),
                              Sample.given([1], [2], [-1.0], 0.0, 8, extras={"routes": torch.zeros(2, 1)})])


def test_the_plan_keeps_every_micro_batch_within_the_budget_and_is_deterministic():
    lengths = [30, 5, 12, 30, 7, 22, 3, 18]
    plan = plan_micro_batches(lengths, 40)
    assert sorted(i for micro in plan for i in micro) == list(range(8))
    assert all(sum(lengths[i] for i in micro) <= 40 for micro in plan)
    assert len(plan) == 4 == -(-sum(lengths) // 40)  # first-fit decreasing fills these exactly
    assert plan == plan_micro_batches(list(lengths), 40)
    assert all(micro == sorted(micro) for micro in plan) and [m[0] for m in plan] == sorted(m[0] for m in plan)


def test_data_parallel_shares_are_equal_in_size_and_balanced_in_tokens():
    lengths = [900, 40, 35, 700, 20, 650, 30, 25]  # long-tailed, the long ones first in a contiguous split
    shares = balanced_shares(lengths, 2)
    assert sorted(i for share in shares for i in share) == list(range(8)) and [len(s) for s in shares] == [4, 4]
    tokens = [sum(lengths[i] for i in share) for share in shares]
    assert abs(tokens[0] - tokens[1]) <= max(lengths)
    assert abs(tokens[0] - tokens[1]) < abs(sum(lengths[:4]) - sum(lengths[4:]))  # better than contiguous
    assert shares == balanced_shares(list(lengths), 2)
    with pytest.raises(ValueError, match="equal shares"):
        balanced_shares(lengths, 3)


def test_the_plan_splits_to_the_count_every_rank_must_run():
    lengths = [10, 40, 10, 40, 10, 40, 10, 40]
    assert micro_batch_counts(lengths, 40, 2) == [3, 3]  # each share 40, 40, 10, 10: [40] [40] [10 10]
    lengths = [10, 10, 10, 10]
    plan = plan_micro_batches(lengths, 40, count=4)
    assert sorted(len(micro) for micro in plan) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="5 micro-batches"):
        plan_micro_batches(lengths, 40, count=5)


def test_a_sample_over_the_budget_is_an_error_naming_both_numbers_and_the_fix():
    with pytest.raises(AlpError) as error:
        plan_micro_batches([10, 41, 5], 40, sample_ids=[7, 8, 9])
    message = str(error.value)
    assert "sample 1 (id 8)" in message and "41 tokens" in message and "(40)" in message
    assert "actor.max_tokens_per_microbatch to at least 41" in message


def test_a_packed_row_holds_the_samples_back_to_back_and_unpacks_to_their_rows():
    batch = _batch([5, 9, 4])
    micro = packed_micro_batch(batch, [0, 2], pad_to_multiple=4)
    assert micro["tokens"].shape == (1, 12)  # 5 + 4 tokens, padded to a multiple of 4
    assert torch.equal(micro["tokens"][0, :5], batch.tokens[0, :5])
    assert torch.equal(micro["tokens"][0, 5:9], batch.tokens[2, :4])
    assert micro["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0]
    assert micro["lengths"].tolist() == [5, 4] and micro["sample_ids"].tolist() == [100, 102]
    # the per-sample loss fields are the padded batch's rows, cut to the longest packed sample
    assert torch.equal(micro["loss_mask"], batch.loss_mask[[0, 2], :5])
    assert torch.equal(micro["rollout_logprobs"], batch.rollout_logprobs[[0, 2], :5])
    assert torch.equal(micro["advantages"], batch.advantages[[0, 2]])
    # unpacking a per-token value of the packed row gives each sample's own positions (targets, for one)
    unpacked = micro["packed_targets"][0][micro["unpack_index"]]
    mask = micro["loss_mask"].bool()
    assert torch.equal(unpacked[mask], batch.targets[[0, 2], :5][mask])
    with pytest.raises(ValueError, match="do not fit"):
        packed_micro_batch(batch, [0, 1], total=10)


def test_the_block_causal_mask_keeps_attention_inside_each_sample():
    from alp_megatron.model.packing import block_causal_mask

    mask = block_causal_mask(torch.tensor([2, 3]), 6)[0, 0]  # True: masked
    allowed = (~mask).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]  # the padding row sees itself only
