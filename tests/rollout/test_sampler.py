"""The sampler on a real SGLang server: weight updates mid-rollout are recorded per token span, and an
aborted rollout returns partial samples that never count as complete."""

import asyncio

import pytest

from alp_megatron.data.prompts import Prompt
from alp_megatron.rollout.client import RolloutClient
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.rollout.types import SamplingConfig, WeightSpan

PROMPTS = [[1, 5, 6, 7], [1, 20, 21]]
SLOW_FORWARD_S = 0.02  # per forward batch: long enough to catch requests mid-generation


@pytest.fixture
def slowed_server(rollout_server, model_dirs):
    """The shared server slowed down; afterwards full speed and the v0 weights again."""
    control = EngineControl(rollout_server.url)
    control.slow_down(SLOW_FORWARD_S)
    yield control
    control.slow_down(None)
    if control.weight_version() != "v0":
        control.update_weights_from_disk(model_dirs["v0"], weight_version="v0")


def test_groups_have_n_samples_with_ids_logprobs_and_versions(client_config):
    sampler = Sampler(RolloutClient(client_config),
                      SamplerConfig(SamplingConfig(n=3, max_new_tokens=10, stop_token_ids=(7,)), show_progress=False))
    record = Prompt(prompt_ids=tuple(PROMPTS[0]), prompt_text="", label=None, metadata={}, index=0,
                    source="/data/train.jsonl", row=1)
    batch = sampler.run([record, PROMPTS[1]], group_ids=[11, 12])  # a data record, or bare token ids
    groups = batch.groups()
    assert sorted(groups) == [11, 12] and all(len(group) == 3 for group in groups.values())
    for sample in batch.samples:
        assert sample.prompt_ids == PROMPTS[sample.group_id - 11]
        assert sample.prompt is (record if sample.group_id == 11 else None)  # the record travels with its samples
        assert 1 <= len(sample.response_ids) == len(sample.rollout_logprobs) <= 10
        assert sample.loss_mask == [1] * len(sample.response_ids) and sample.status in ("complete", "truncated")
        stopped = sample.response_ids[-1] in (7, 2)  # the stop token or eos; it may fall on the 10th token
        assert sample.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(sample.response_ids) == 10
        assert sample.weight_version == "v0" and sample.is_complete
        assert sample.weight_versions == [WeightSpan("v0", 0, len(sample.response_ids))]
    assert len(batch.complete_groups()) == 2


@pytest.mark.parametrize("mode", ["retract", "abort", "in_place", "restart"])
def test_weight_update_mid_rollout_is_recorded_in_version_spans(mode, client_config, slowed_server, model_dirs):
    """A request in flight at an update goes on under the new weights, each token recording its version; with
    ``restart`` (rollout.partial_rollouts, after an ``abort`` pause) it is generated again on the new weights."""
    new_version = f"v1-{mode}"
    tokens = 150  # at SLOW_FORWARD_S per step: at least 3 s, so the update lands mid-generation
    sampler = Sampler(RolloutClient(client_config),
                      SamplerConfig(SamplingConfig(n=2, max_new_tokens=tokens, ignore_eos=True), show_progress=False,
                                    restart_aborted=mode == "restart"))

    def update_weights():
        slowed_server.pause_generation("abort" if mode == "restart" else mode)
        # in_place keeps the KV cache of the paused requests, so the cache cannot be flushed.
        slowed_server.update_weights_from_disk(model_dirs["v1"], weight_version=new_version,
                                               flush_cache=mode != "in_place")
        slowed_server.continue_generation()

    async def scenario():
        rollout = asyncio.ensure_future(sampler.rollout(PROMPTS))
        await asyncio.sleep(1.5)
        assert not rollout.done(), "the rollout ended before the update; slow the server down more"
        await asyncio.to_thread(update_weights)
        try:
            return await rollout
        finally:
            await sampler.client.close()

    batch = asyncio.run(scenario())
    assert len(batch.complete_groups()) == len(PROMPTS)
    for sample in batch.samples:
        assert len(sample.response_ids) == len(sample.rollout_logprobs) == len(sample.loss_mask) == tokens
        if mode == "restart":  # nothing of the old weights is kept
            assert sample.weight_versions == [WeightSpan(new_version, 0, tokens)] and not sample.aborted
            assert sample.metadata["restarts"] == 1 and "continuations" not in sample.metadata
            continue
        old, new = sample.weight_versions
        assert old.version == "v0" and new.version == new_version
        assert old.start == 0 and 0 < old.end == new.start and new.end == tokens
        assert sample.weight_version == new_version and not sample.aborted
        assert sample.metadata.get("continuations", 0) == (1 if mode == "abort" else 0)


def test_abort_returns_partial_samples_never_complete(client_config, slowed_server):
    tokens = 200
    sampler = Sampler(RolloutClient(client_config),
                      SamplerConfig(SamplingConfig(n=2, max_new_tokens=tokens, ignore_eos=True),
                                    groups_in_flight=2, show_progress=False))

    async def scenario():
        rollout = asyncio.ensure_future(sampler.rollout([[1, 5], [1, 6], [1, 7]]))
        await asyncio.sleep(1.0)
        await sampler.abort()
        try:
            return await rollout
        finally:
            await sampler.client.close()

    batch = asyncio.run(scenario())
    assert len(batch.samples) == 4  # two groups were running; the third never started
    assert batch.complete_groups() == []
    assert any(len(sample.response_ids) > 0 for sample in batch.samples)
    for sample in batch.samples:
        assert sample.aborted and not sample.is_complete and sample.finish_reason == "abort"
        assert len(sample.response_ids) == len(sample.rollout_logprobs) < tokens
