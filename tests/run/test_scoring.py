"""Scoring a rollout: a reward that cannot be computed names the dataset file and row of its prompt."""

import pytest

from alp_megatron.data.prompts import Prompt
from alp_megatron.rewards import RewardError, exact_match_reward
from alp_megatron.rollout.types import RolloutBatch, Sample, WeightSpan
from alp_megatron.run.scoring import score_rollout


class Characters:
    """Token id i is the character chr(i): enough of a tokenizer for scoring."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def prompt(label, row):
    return Prompt(prompt_ids=(49,), prompt_text="1", label=label, metadata={}, index=row - 1,
                  source="/data/train.jsonl", row=row)


def sample(group_id, index):
    return Sample(prompt_ids=[49], response_ids=[52, 51], rollout_logprobs=[-0.1, -0.2], finish_reason="stop",
                  weight_version="v1", weight_versions=[WeightSpan(version="v1", start=0, end=2)],
                  group_id=group_id, sample_index=index)


def test_scores_each_sample_and_a_bad_label_names_its_row():
    rollout = RolloutBatch(samples=[sample(0, 0), sample(0, 1), sample(1, 0), sample(1, 1)], group_size=2,
                           group_ids=[0, 1])
    scored = score_rollout(rollout, {0: prompt("43", 7), 1: prompt("12", 8)}, exact_match_reward, Characters(), 1)
    assert [s.reward for s in scored.samples] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"^/data/train.jsonl, row 8: a toy-task label must be"):
        score_rollout(rollout, {0: prompt("43", 7), 1: prompt(None, 8)}, exact_match_reward, Characters(), 1)
