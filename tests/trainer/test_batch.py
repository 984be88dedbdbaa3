"""Micro-batches from rollout samples: the padded batch, the token-budget plan and the packed row."""

import pytest
import torch

from alp_megatron.errors import AlpError
from alp_megatron.trainer.batch import (balanced_shares, build_training_batch, micro_batch_counts, packed_micro_batch,
                                       plan_micro_batches)


def _batch(lengths, prompt=2):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 50, (prompt,), generator=gen).tolist() for _ in lengths]
    responses = [torch.randint(1, 50, (n - prompt,), generator=gen).tolist() for n in lengths]
    logprobs = [(-torch.rand(n - prompt, generator=gen)).tolist() for n in lengths]
    return build_training_batch(prompts, responses, logprobs, [0.5 * i for i in range(len(lengths))],
                                [100 + i for i in range(len(lengths))])


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
