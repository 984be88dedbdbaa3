"""Dynamic sampling on a real SGLang server: groups without a reward spread are filtered, the batch is
refilled from further generation batches up to the cap, and what still generates once it is full is aborted on
the engine and never returned."""

import pytest

from alp_megatron.config import RolloutSection
from alp_megatron.data.batches import PromptBatches
from alp_megatron.data.prompts import Prompt
from alp_megatron.rollout.client import model_vocab_size
from alp_megatron.rollout.dynamic_sampling import DynamicSamplingConfig, FilteredRollout
from alp_megatron.rollout.fleet import RolloutEngines
from alp_megatron.rollout.types import SamplingConfig

pytestmark = pytest.mark.sglang

N = 4


def prompt(index, label):
    return Prompt(prompt_ids=(1, 5 + index, 9), prompt_text=str(index), label=label, metadata={}, index=index,
                  source="/data/train.jsonl", row=index + 1)


def score(group):
    """``flat`` prompts: the same reward for every sample (no advantage); ``spread``: reward = sample index."""
    for sample in group:
        sample.reward = 0.0 if sample.prompt.label == "flat" else float(sample.sample_index)


@pytest.fixture
def engines(rollout_server, model_dirs, tmp_path):
    # Two groups at a time and long responses, so groups of a refill batch are still queued when the batch fills.
    section = RolloutSection(mode="disaggregated", server_urls=(rollout_server.url,), groups_in_flight=2,
                             sampling=SamplingConfig(n=N, max_new_tokens=48, ignore_eos=True))
    engines = RolloutEngines(section, model_dirs["v0"], str(tmp_path), "v0", model_vocab_size(model_dirs["v0"]))
    yield engines
    engines.close()


def filtered(engines, labels, max_gen_batches, batch_size=4):
    batches = PromptBatches([prompt(i, label) for i, label in enumerate(labels)], batch_size, shuffle=False)
    next_id = iter(range(10**6))

    def draw():
        prompts = batches.next_batch()
        return prompts, [next(next_id) for _ in prompts]

    rollout = FilteredRollout(engines, draw, score, wanted=batch_size,
                              config=DynamicSamplingConfig(max_gen_batches=max_gen_batches))
    return rollout, rollout.result(), batches


def test_a_batch_with_flat_groups_is_refilled_and_the_leftovers_are_aborted(engines):
    # batch 1: one flat group and three with a spread; batch 2: four with a spread, one of them needed
    rollout, (batch, metrics), batches = filtered(engines, ["flat"] + ["spread"] * 7, max_gen_batches=3)
    assert metrics == {"dynamic_sampling_gen_batches": 2.0, "dynamic_sampling_kept_groups": 4.0,
                       "dynamic_sampling_filtered_groups": 1.0, "dynamic_sampling_unused_groups": 3.0,
                       "dynamic_sampling_capped": 0.0}
    assert len(batch.complete_groups()) == 4 and len(batch.samples) == 4 * N
    assert all(s.prompt.label == "spread" and s.is_complete and len(s.response_ids) == 48 for s in batch.samples)
    assert batches.position.index == 0 and batches.position.epoch == 1  # two batches drawn, no more
    # the three unused groups (of either batch: the two run side by side): what still generated when the batch
    # filled was aborted on the engine (two groups of a batch run at a time, 48 tokens each: the last cannot have
    # finished), and none of it was returned
    groups = {**rollout._futures[0].result().groups(), **rollout._futures[1].result().groups()}
    returned = {s.group_id for s in batch.samples}
    unused = [group for group_id, group in groups.items() if group_id not in returned and group_id != 0]  # 0: flat
    assert len(groups) == 8 and len(unused) == 3 and any(s.aborted for group in unused for s in group)
    assert all(not s.aborted for s in batch.samples)
    # the engine is free again: a plain rollout right after runs every group to the end
    plain = engines.submit([prompt(0, "spread")], [10**6]).result(timeout=120)
    assert len(plain.complete_groups()) == 1


def test_the_cap_is_honoured_and_reported(engines):
    rollout, (batch, metrics), _ = filtered(engines, ["flat"] * 8, max_gen_batches=2)
    assert metrics["dynamic_sampling_gen_batches"] == 2.0 and metrics["dynamic_sampling_capped"] == 1.0
    assert metrics["dynamic_sampling_filtered_groups"] == 8.0 and metrics["dynamic_sampling_kept_groups"] == 0.0
    assert batch.samples == [] and batch.group_ids == []


def test_a_cap_of_zero_batches_names_the_field():
    from alp_megatron.config import load_run_config
    from alp_megatron.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        load_run_config(None, ("rollout.dynamic_sampling.max_gen_batches=0",))
    assert error.value.field == "rollout.dynamic_sampling.max_gen_batches"
    assert "null to turn it off" in error.value.fix
