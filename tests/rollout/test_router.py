"""Two real SGLang servers behind sglang-router: groups complete, and a server killed mid-rollout loses
no sample (its requests are served by the other) and is restarted."""

import asyncio
import os
import signal
import time

import pytest

from alp_megatron.model.tiny import build_char_tokenizer
from alp_megatron.rollout.agent import Agent, AgentConfig
from alp_megatron.rollout.client import ClientConfig, RolloutClient
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.process import group_running, group_shared_memory
from alp_megatron.rollout.router import RouterConfig, SGLangRouter
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.rollout.server import ServerSupervisor
from alp_megatron.rollout.types import SamplingConfig
from tests.rollout.test_agent import CountingTool, DigitCalls


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    for server in servers:
        if not server.is_alive():
            server.restart()
    config = RouterConfig([server.url for server in servers], policy="round_robin",
                          log_dir=str(tmp_path_factory.mktemp("router-logs")))
    with SGLangRouter(config) as started:
        yield started
    assert not group_running(started.pid)


def _sampler(router, servers, client_config, **sampling):
    config = ClientConfig(urls=[router.url], control_urls=[server.url for server in servers],
                          vocab_size=client_config.vocab_size, max_attempts=10, retry_backoff_s=0.5)
    return Sampler(RolloutClient(config), SamplerConfig(SamplingConfig(**sampling), groups_in_flight=4,
                                                        show_progress=False))


def _assert_every_group_full(batch, prompts, n):
    keys = [(sample.group_id, sample.sample_index) for sample in batch.samples]
    assert sorted(keys) == [(g, i) for g in range(len(prompts)) for i in range(n)]  # none lost, none twice
    assert len(batch.complete_groups()) == len(prompts)
    for sample in batch.samples:
        assert sample.prompt_ids == prompts[sample.group_id]
        assert len(sample.response_ids) == len(sample.rollout_logprobs) > 0


def test_a_second_router_on_the_host_starts_beside_the_first(router, servers, tmp_path):
    """Each router gets a metrics port of its own (sglang-router's default, 29000, is the same for all)."""
    config = RouterConfig([server.url for server in servers], log_dir=str(tmp_path))
    with SGLangRouter(config) as second:
        assert second.workers() and router.workers()
        assert "--prometheus-port" in second.command() and second.command() != router.command()


def test_groups_complete_through_the_router(router, servers, client_config):
    prompts = [[1, 5 + i, 6 + i] for i in range(6)]
    sampler = _sampler(router, servers, client_config, n=4, max_new_tokens=24, ignore_eos=True)
    batch = sampler.run(prompts)
    _assert_every_group_full(batch, prompts, 4)
    assert all(len(sample.response_ids) == 24 for sample in batch.samples)
    assert {worker["url"] for worker in router.workers()} == {server.url for server in servers}


def test_seeded_rollouts_repeat_through_the_router(router, servers, client_config):
    """Each response has its own seed: the same rollout twice gives the same tokens (whichever worker
    served it), and the responses of a group differ."""
    prompts = [[1, 8, 9], [1, 10]]
    runs = [_sampler(router, servers, client_config, n=3, max_new_tokens=12, seed=5).run(prompts) for _ in range(2)]
    for batch in runs:
        _assert_every_group_full(batch, prompts, 3)
    first, second = ([(s.group_id, s.sample_index, s.response_ids) for s in batch.samples] for batch in runs)
    assert first == second
    for group in runs[0].groups().values():
        assert len({tuple(sample.response_ids) for sample in group}) > 1


class GatedTool(CountingTool):
    """Counts its callers and holds them until ``gate`` is set; then answers as CountingTool."""

    def __init__(self):
        self.waiting, self.gate = 0, asyncio.Event()

    async def __call__(self, payload):
        self.waiting += 1
        await self.gate.wait()
        return await super().__call__(payload)


def test_server_killed_mid_rollout_loses_no_sample_and_is_restarted(router, servers, client_config):
    """Three rollouts run while one server is killed: one through the router (which sends the failed
    requests to the other worker), one whose client talks to both servers directly (our client
    re-requests them on the survivor), and multi-turn trajectories, two of them on the victim, which go on
    from their token ids on the survivor."""
    survivor, victim = servers
    prompts = [[1, 10 + i, 11 + i] for i in range(4)]  # 2 x 4 x n=2 single-turn + 4 trajectories: < 16 a server
    sampling = dict(n=2, max_new_tokens=80, ignore_eos=True)
    via_router = _sampler(router, servers, client_config, **sampling)
    direct = Sampler(RolloutClient(ClientConfig(urls=[server.url for server in servers],
                                                vocab_size=client_config.vocab_size, retry_backoff_s=0.2)),
                     SamplerConfig(SamplingConfig(**sampling), groups_in_flight=4, show_progress=False))
    def multi_turn_sampler(urls, tool):
        agent = Agent(AgentConfig(max_turns=40, observation_tokens=6), build_char_tokenizer(), tool=tool,
                      turn_format=DigitCalls("0123456789aeiou", always_call=True))  # steps of a few tokens
        return Sampler(RolloutClient(ClientConfig(urls=urls, vocab_size=client_config.vocab_size, retry_backoff_s=0.2)),
                       SamplerConfig(SamplingConfig(**sampling), groups_in_flight=4, show_progress=False), agent=agent)

    for server in servers:  # a fresh server's first stop-string requests are slow: warm both before the clock runs
        multi_turn_sampler([server.url], CountingTool()).run(prompts[:1])
    gated = GatedTool()  # holds every trajectory after its first turn until the kill: two of them are on the victim
    multi_turn = multi_turn_sampler([server.url for server in servers], gated)
    for server in servers:
        EngineControl(server.url).slow_down(0.02)
    old_pid = victim.pid
    left_behind = [path for path in group_shared_memory(old_pid) if "/sglang_loads_" in path]

    async def scenario():
        rollouts = asyncio.gather(via_router.rollout(prompts), direct.rollout(prompts),
                                  multi_turn.rollout(prompts[:2]))
        try:
            deadline = time.monotonic() + 120  # under a loaded CI machine the slowed servers' first turns take long
            while gated.waiting < 4 and time.monotonic() < deadline:  # each trajectory has had a turn
                await asyncio.sleep(0.05)
            assert gated.waiting == 4 and not rollouts.done(), "the rollouts ended before the kill"
            os.killpg(victim.pid, signal.SIGKILL)
            gated.gate.set()
            return await rollouts
        finally:
            for sampler in (via_router, direct, multi_turn):
                await sampler.client.close()

    with ServerSupervisor(servers, interval_s=1.0) as supervisor:
        try:
            batches = asyncio.run(scenario())
        finally:
            EngineControl(survivor.url).slow_down(None)
        for batch in batches[:2]:
            _assert_every_group_full(batch, prompts, 2)
            assert all(len(sample.response_ids) == 80 for sample in batch.samples)
        # multi-turn: a trajectory whose server died goes on from its token ids on the other one
        _assert_every_group_full(batches[2], prompts[:2], 2)
        moved = [s for s in batches[2].samples if len(s.metadata["agent"]["servers"]) == 2]
        assert moved and all(s.metadata["agent"]["steps"] >= 2 for s in moved)
        assert direct.client.stats.failures_by_url.get(victim.url, 0) >= 1  # requests were re-requested

        deadline = time.monotonic() + victim.config.startup_timeout_s + 60
        while supervisor.restarts[victim.url] == 0 and time.monotonic() < deadline:
            time.sleep(1)
    assert supervisor.restarts == {survivor.url: 0, victim.url: 1}
    assert victim.pid != old_pid and not group_running(old_pid)
    assert left_behind and not [path for path in left_behind if os.path.exists(path)]  # the restart removed it
    assert EngineControl(victim.url).health()

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the router takes the restarted worker back
        healthy = {worker["url"] for worker in router.workers() if worker.get("is_healthy")}
        if victim.url in healthy:
            break
        time.sleep(1)
    assert victim.url in healthy
