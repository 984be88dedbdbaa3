"""Scoring a rollout: a reward that cannot be computed names the dataset file and row of its prompt."""

import pytest

from alp_megatron.data.prompts import Prompt
from alp_megatron.rewards import RewardError, exact_match_reward
from alp_megatron.rollout.types import RolloutBatch, Sample, WeightSpan
from alp_megatron.run.scoring import score_rollout, training_batch
from alp_megatron.sample import ROUTES


class Characters:
    """Token id i is the character chr(i): enough of a tokenizer for scoring."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def prompt(label, row):
    return Prompt(prompt_ids=(49,), prompt_text="1", label=label, metadata={}, index=row - 1,
                  source="/data/train.jsonl", row=row)


def sample(group_id, index, record, response=(52, 51)):
    return Sample(prompt_ids=[49], response_ids=list(response), rollout_logprobs=[-0.1] * len(response),
                  finish_reason="stop", weight_version="v1",
                  weight_versions=[WeightSpan(version="v1", start=0, end=len(response))],
                  group_id=group_id, sample_index=index, prompt=record)


def rollout(first, second):
    samples = [sample(0, 0, first), sample(0, 1, first, (52, 50)), sample(1, 0, second), sample(1, 1, second)]
    return RolloutBatch(samples=samples, group_size=2, group_ids=[0, 1])


def test_scores_each_sample_from_the_prompt_it_carries_and_a_bad_label_names_its_row():
    scored = score_rollout(rollout(prompt("43", 7), prompt("12", 8)), exact_match_reward, Characters(), 1)
    assert [s.reward for s in scored.samples] == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"^/data/train.jsonl, row 8: a toy-task label must be"):
        score_rollout(rollout(prompt("43", 7), prompt(None, 8)), exact_match_reward, Characters(), 1)
    with pytest.raises(ValueError, match="sample 0 of group 1 carries no data prompt"):
        score_rollout(rollout(prompt("43", 7), None), exact_match_reward, Characters(), 1)


def test_routes_report_their_bytes_per_sample():
    import torch

    batch = rollout(prompt("43", 7), prompt("12", 8))
    for sample in batch.samples:
        sample.extras[ROUTES] = torch.zeros(sample.length, 48, 8, dtype=torch.uint8)
    scored = score_rollout(batch, exact_match_reward, Characters(), 1)
    assert scored.metrics["routes_bytes_per_sample"] == 3 * 48 * 8  # 3 tokens x 48 layers x top-8, one byte each
    assert "routes_bytes_per_sample" not in score_rollout(rollout(prompt("43", 7), prompt("12", 8)),
                                                          exact_match_reward, Characters(), 1).metrics


def test_the_training_batch_is_made_from_the_scored_records():
    scored = score_rollout(rollout(prompt("43", 7), prompt("12", 8)), exact_match_reward, Characters(), 1)
    batch = training_batch(scored, std_normalize=False, divisible_by=2, pad_id=0, first_sample_id=500)
    assert [s.sample_id for s in scored.samples] == [500, 501, 502, 503] == batch.sample_ids.tolist()
    assert [s.advantage for s in scored.samples] == [0.5, -0.5, 0.0, 0.0] == batch.advantages.tolist()
    assert batch.tokens[1].tolist() == [49, 52, 50]
    scored.samples[0].loss_mask = [1, 0]  # a token the policy did not produce stays out of the loss
    assert training_batch(scored, False, 2, 0).loss_mask[0].tolist() == [1, 0, 0]
    # whole groups are dropped until the count divides: 4 samples, divisible by 8 -> none left
    assert training_batch(scored, False, 8, 0) is None and scored.samples == []


def test_per_token_staleness_counts_model_tokens_by_the_version_that_produced_them():
    """A partial sample (3 tokens of v1, 1 tool token, 2 of v3) and a whole one (4 of v3), trained at v3."""
    from alp_megatron.run.scoring import staleness_metrics, token_staleness

    partial = Sample(prompt_ids=[1], response_ids=[5, 6, 7, 8, 9, 10], rollout_logprobs=[-0.1] * 6,
                     loss_mask=[1, 1, 1, 0, 1, 1], finish_reason="stop", weight_version="v3",
                     weight_versions=[WeightSpan("v1", 0, 3), WeightSpan("v3", 4, 6)], group_id=0, sample_index=0)
    whole = Sample(prompt_ids=[1], response_ids=[5, 6, 7, 8], rollout_logprobs=[-0.1] * 4, finish_reason="stop",
                   weight_version="v3", weight_versions=[WeightSpan("v3", 0, 4)], group_id=0, sample_index=1)
    assert token_staleness(partial, 3) == {2: 3, 0: 2}
    assert token_staleness(whole, 4) == {1: 4}
    metrics = staleness_metrics([partial, whole], policy_version=3)
    assert metrics == {"staleness_tokens_0": 6 / 9, "staleness_tokens_2": 3 / 9,
                       "staleness_token_mean": 6 / 9, "partial_share": 0.5}
