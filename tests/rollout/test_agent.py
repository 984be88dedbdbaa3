"""Multi-turn rollouts, token in and token out: against the session's real MoE server (fp32, routes on), and
the turn logic on its own."""

import asyncio

import pytest
import torch

from alp_megatron.errors import ConfigError
from alp_megatron.model.tiny import build_char_tokenizer
from alp_megatron.rollout.agent import Agent, AgentConfig
from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.rollout.tools import (Action, PythonTool, SimpleTIRFormat, ToolResult, call_tool, load_format,
                                        load_tool)
from alp_megatron.rollout.types import SamplingConfig
from alp_megatron.sample import ROUTES, Sample
from tests.distributed import run_ranks
from tests.rollout.test_routes import _hf_top_k
from tests.sglang_fixtures import MOE_ROUTES

PROMPTS = [[1, 5, 6, 7, 8], [1, 20, 21]]


class DigitCalls:
    """A turn format the random tiny model follows by chance: a step stops at a digit (or another of
    ``stops``); a turn that ends with one calls the tool with its text, one with a '.' answers, any other is
    void."""

    name = "digits"

    def __init__(self, stops: str = "0123456789", always_call: bool = False):
        self.stop, self.always_call = tuple(stops), always_call  # always_call: every turn calls (until the budget)

    def inside_call(self, text):
        return False

    def action(self, text):
        if self.always_call:
            return Action("tool", text)
        if "." in text:
            return Action("answer")
        return Action("tool", text) if text[-1:] and text[-1] in self.stop else Action("void")

    def observation(self, result):
        return f" ({result.output}) "


class CountingTool:
    """Answers with the length of its payload."""

    name = "count"

    async def __call__(self, payload):
        return ToolResult(str(len(payload)))


def trainer_logprobs(folder: str, samples: list) -> list:
    """Megatron on ``folder``'s weights, replaying each sample's routes: the logprob of every response token
    at the position ``build_training_batch`` puts it, and the batch's loss mask there."""
    from alp_megatron.model import packing, routing
    from alp_megatron.model.logprobs import token_logprobs
    from alp_megatron.trainer.batch import build_training_batch
    from tests.model.test_routing import replaying_model

    chunk = replaying_model(folder)
    batch = build_training_batch(samples)
    micro = {"tokens": batch.tokens, "position_ids": batch.position_ids, "lengths": batch.lengths,
             "extra." + ROUTES: batch.extras[ROUTES]}
    with torch.no_grad():
        logits = packing.forward(chunk, micro)
    routing.clear([chunk])
    logprobs = token_logprobs(logits, batch.targets)
    return [dict(logprobs=logprobs[i].tolist(), mask=batch.loss_mask[i].tolist(),
                 engine=batch.rollout_logprobs[i].tolist()) for i in range(len(samples))]


@pytest.fixture(scope="module")
def trajectories(moe_server, moe_model_path):
    agent = Agent(AgentConfig(max_turns=4, observation_tokens=6, max_context_tokens=40), build_char_tokenizer(),
                  tool=CountingTool(), turn_format=DigitCalls())
    client = RolloutClient(ClientConfig(urls=[moe_server.url], vocab_size=model_vocab_size(moe_model_path),
                                        routed_experts=MOE_ROUTES))
    sampling = SamplingConfig(n=4, max_new_tokens=40, temperature=1.0, seed=3)
    return Sampler(client, SamplerConfig(sampling, show_progress=False), agent=agent).run(PROMPTS).samples


def _segments(mask: list) -> list:
    """``[(start, end)]`` of the runs of 0 in ``mask``."""
    runs, start = [], None
    for i, bit in enumerate(mask + [1]):
        if bit == 0 and start is None:
            start = i
        elif bit == 1 and start is not None:
            runs.append((start, i))
            start = None
    return runs


@pytest.mark.sglang
def test_a_trajectory_is_exactly_the_prompt_the_engines_tokens_and_the_tool_tokens(trajectories):
    """Each tool segment (mask 0, logprob 0) is exactly the tokens of the observation of the turn before it
    (the turn's text decoded only to be read), the model's tokens all carry the engine's logprobs, and no
    trajectory ends on tool tokens."""
    tokenizer = build_char_tokenizer()
    stats = [sample.metadata["agent"] for sample in trajectories]
    assert max(s["turns"] for s in stats) >= 3 and sum(s["tool_calls"] for s in stats) >= 4  # multi-turn happened
    checked = 0
    for sample, stat in zip(trajectories, stats):
        assert sample.length <= 40  # the context bounds every step (the budget alone would allow prompt + 40)
        if stat["masked"]:  # a void trajectory: all 0 (tested below)
            assert set(sample.loss_mask) == {0} and stat["ending"] == "void"
            continue
        mask = sample.loss_mask
        assert mask[-1] == 1  # never ends on tool tokens
        turn_start = 0
        segments = _segments(mask)
        checked += len(segments)
        for begin, end in segments:
            turn = tokenizer.decode(sample.response_ids[turn_start:begin])
            assert sample.response_ids[begin:end] == tokenizer.encode(f" ({len(turn)}) ", add_special_tokens=False)
            assert set(sample.rollout_logprobs[begin:end]) == {0.0}
            turn_start = end
        # a call whose observation would not fit ends the trajectory before it (truncated)
        assert len(segments) == stat["tool_calls"] - (stat["ending"] == "truncated" and stat["tool_calls"] > 0
                                                      and stat["turns"] < 4)
        assert all(lp < 0 for lp, bit in zip(sample.rollout_logprobs, mask) if bit)
    assert checked >= 2


@pytest.mark.sglang
def test_multi_turn_routes_and_trainer_logprobs_equal_the_engines(trajectories, moe_model_path):
    """Routes chained across turns (each step asks from the first token without a row) equal HF's own top-k
    for every token, tool tokens included; Megatron replaying them scores every model token, at the position
    the training batch puts it, within 1e-4 of the engine (fp32 both)."""
    samples = [Sample.given(s.prompt_ids, s.response_ids, s.rollout_logprobs, 0.0, i, s.loss_mask, s.extras)
               for i, s in enumerate(trajectories)]
    for sample in samples:
        expected = _hf_top_k(moe_model_path, sample.prompt_ids + sample.response_ids[:-1])
        assert torch.equal(sample.extras[ROUTES][:-1].long(), expected)
    scored = run_ranks(1, trainer_logprobs, moe_model_path, samples)[0]
    for sample, row in zip(samples, scored):
        if not any(sample.loss_mask):  # a void trajectory, out of the loss
            continue
        pairs = [(mine, engine) for mine, engine, bit in zip(row["logprobs"], row["engine"], row["mask"]) if bit]
        assert len(pairs) == sum(sample.loss_mask) > 0
        assert max(abs(mine - engine) for mine, engine in pairs) <= 1e-4


# -- the turn logic, without a server ------------------------------------------------------------------------


def test_simpletir_finds_the_call_the_answer_or_neither_and_shows_the_result():
    fmt = SimpleTIRFormat()
    assert fmt.inside_call("Let me compute.\n```python") and not fmt.inside_call("```python\nx\n```")
    assert fmt.action("so\n```python\nprint(6 * 7)\n```") == Action("tool", "print(6 * 7)")
    assert fmt.action("```py\na = 1\nprint(a)\n```").payload == "a = 1\nprint(a)"
    assert fmt.action("The answer is \\boxed{42}.") == Action("answer")
    assert fmt.action("I think so.") == Action("void")
    assert fmt.action("```python\nprint(1)") == Action("void")  # a call never closed is malformed: void
    assert fmt.observation(ToolResult("42\n")) == "\nCode execution result: 42\n\n"
    assert fmt.observation(ToolResult("", "ZeroDivisionError: division by zero", "error")) == (
        "\nCode execution result: ZeroDivisionError: division by zero\n")
    assert fmt.observation(ToolResult("", "interpreter timeout", "timeout")).endswith("interpreter timeout\n")
    long = fmt.observation(ToolResult("a" * 300 + "b" * 300))
    marker = "\n..._This content has been truncated to stay below 512 characters_...\n"
    assert long == "\nCode execution result: " + "a" * 256 + marker + "b" * 256 + "\n"


def test_the_python_tool_runs_a_call_in_the_sandbox_and_reports_errors_and_timeouts():
    from alp_megatron.rollout.sandbox import SandboxConfig

    tool = PythonTool(SandboxConfig(timeout_s=2.0, cpu_s=1))
    fmt = SimpleTIRFormat()

    async def calls():
        return [await call_tool(tool, code) for code in ("print(6 * 7)", "1 / 0", "while True:\n    pass")]

    ok, error, timeout = asyncio.run(calls())
    assert ok.ok and fmt.observation(ok) == "\nCode execution result: 42\n\n"
    assert error.status == "error" and error.error == "ZeroDivisionError: division by zero"
    assert timeout.status == "timeout" and fmt.observation(timeout).endswith("interpreter timeout\n")


def test_a_tool_that_raises_or_returns_garbage_is_a_tool_error_not_the_runs_end():
    class Raises:
        name = "raises"

        async def __call__(self, payload):
            raise ValueError("no such file")

    class Garbage:
        name = "garbage"

        async def __call__(self, payload):
            return "text"

    raised = asyncio.run(call_tool(Raises(), "x"))
    assert raised.status == "tool_error" and raised.error == "ValueError: no such file"
    assert asyncio.run(call_tool(Garbage(), "x")).status == "tool_error"


def test_bad_tools_and_settings_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="rollout.agent.tool.*'calculator' is neither a built-in tool"):
        load_tool("calculator")
    with pytest.raises(ConfigError, match="rollout.agent.format.*neither a built-in turn format"):
        load_format("xml")
    (tmp_path / "my_tools.py").write_text(
        "class Blocking:\n    name = 'blocking'\n    def __call__(self, payload):\n        return None\n"
        "class Nameless:\n    async def __call__(self, payload):\n        return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="is not async"):
        load_tool("my_tools:Blocking")
    with pytest.raises(ConfigError, match=r"lacks \['name'\]"):
        load_tool("my_tools:Nameless")
    from alp_megatron.config import load_run_config
    from alp_megatron.run.build import check_run_inputs

    with pytest.raises(ConfigError, match="rollout.agent.tool"):  # at start, before any model or server
        check_run_inputs(load_run_config(None, ("data.toy_task=add1", "rollout.agent.tool=my_tools:Nameless")))
    for field, value in (("max_turns", 0), ("observation_tokens", -1), ("max_turn_tokens", 0)):
        with pytest.raises(ConfigError, match=f"rollout.agent.{field}"):
            AgentConfig(**{field: value})


def _finished(ending: str, config: AgentConfig) -> Sample:
    from alp_megatron.rollout.agent import _finish

    sample = Sample(prompt_ids=[1], response_ids=[5, 6, 7], rollout_logprobs=[-1.0, 0.0, -1.0], finish_reason="stop",
                    weight_version="v0", weight_versions=[], group_id=0, sample_index=0, loss_mask=[1, 0, 1])
    return _finish(sample, ending, {"turns": 2}, config)


def test_void_trajectories_leave_the_loss_and_truncated_ones_by_option():
    default = AgentConfig()
    void = _finished("void", default)
    assert void.loss_mask == [0, 0, 0] and void.status == "void" and void.metadata["agent"]["model_tokens"] == 2
    assert _finished("complete", default).loss_mask == [1, 0, 1]
    truncated = _finished("truncated", default)
    assert truncated.loss_mask == [1, 0, 1] and truncated.status == "truncated"
    assert _finished("truncated", AgentConfig(mask_truncated=True)).loss_mask == [0, 0, 0]
    assert _finished("void", AgentConfig(mask_void=False)).loss_mask == [1, 0, 1]


def test_trajectory_metrics_count_turns_calls_failures_and_endings():
    from alp_megatron.rollout.agent import trajectory_metrics

    def stats(ending, calls, errors, timeouts, masked):
        return {"agent": {"turns": calls + 1, "tool_calls": calls, "tool_errors": errors, "tool_timeouts": timeouts,
                          "tool_seconds": 0.5 * calls, "tool_tokens": 4 * calls, "steps": calls + 1,
                          "ending": ending, "model_tokens": 10, "masked": masked}}

    samples = [Sample.given([1], [2], [-1.0], 0.0, i) for i in range(4)]
    for sample, meta in zip(samples, (stats("complete", 2, 1, 0, False), stats("void", 0, 0, 0, True),
                                      stats("truncated", 2, 1, 1, False), stats("complete", 0, 0, 0, False))):
        sample.metadata.update(meta)
    metrics = trajectory_metrics(samples)
    assert metrics["agent_turns_mean"] == 2.0 and metrics["agent_tool_calls_mean"] == 1.0
    assert metrics["agent_tool_error_share"] == 0.5 and metrics["agent_tool_timeout_share"] == 0.25
    assert metrics["agent_void_share"] == metrics["agent_truncated_share"] == metrics["agent_masked_share"] == 0.25
    assert metrics["agent_tool_tokens_mean"] == 4.0 and metrics["agent_model_tokens_mean"] == 10.0
    assert trajectory_metrics([Sample.given([1], [2], [-1.0], 0.0, 9)]) == {}


def test_a_prompt_that_fills_the_context_is_refused_naming_its_row():
    from alp_megatron.data.prompts import Prompt
    from alp_megatron.rollout.sampler import RolloutError

    agent = Agent(AgentConfig(), build_char_tokenizer(), tool=CountingTool(), turn_format=DigitCalls(),
                  context_tokens=4)
    sampler = Sampler(RolloutClient(ClientConfig(urls=["http://127.0.0.1:9"])), SamplerConfig(show_progress=False),
                      agent=agent)  # nothing is sent: the prompt is refused first
    record = Prompt(prompt_ids=(1, 5, 6, 7, 8), prompt_text="x", label="y", metadata={}, index=3,
                    source="train.jsonl", row=4)
    with pytest.raises(RolloutError, match="train.jsonl, row 4: group 0: a prompt of 5 tokens leaves no room in the "
                                           "context of 4 tokens"):
        sampler.run([record])


def test_the_served_context_is_the_servers_flag_or_the_models(tmp_path):
    import json

    from alp_megatron.rollout.fleet import _context_tokens

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert _context_tokens(str(tmp_path)) == 4096
    assert _context_tokens(str(tmp_path), ("--log-level", "warning", "--context-length", "1024")) == 1024


def test_a_weight_update_between_turns_gives_each_turns_tokens_their_version():
    """Turn 1 by v0, a tool's tokens (in no span), turn 2 by v1 after an update: the spans cover each turn's
    model tokens at their place in the response, and scoring's staleness reads the oldest."""
    from alp_megatron.rollout.agent import _append_tool
    from alp_megatron.rollout.sampler import append_completion
    from alp_megatron.rollout.types import Completion, WeightSpan

    def completion(ids, version):
        return Completion(rid="r", url="u", output_ids=tuple(ids), output_logprobs=(-1.0,) * len(ids),
                          finish_reason="stop", weight_version=version,
                          weight_spans=(WeightSpan(version, 0, len(ids)),), prompt_tokens=3)

    sample = Sample(prompt_ids=[1, 2, 3], response_ids=[], rollout_logprobs=[], finish_reason="stop",
                    weight_version="", weight_versions=[], group_id=0, sample_index=0)
    sample = append_completion(sample, completion([5, 6, 7], "v0"))
    sample = _append_tool(sample, [8, 9])
    sample = append_completion(sample, completion([10, 11], "v1"))
    assert sample.weight_versions == [WeightSpan("v0", 0, 3), WeightSpan("v1", 5, 7)]
    assert sample.loss_mask == [1, 1, 1, 0, 0, 1, 1] and sample.weight_version == "v1"
    assert sample.rollout_logprobs == [-1.0, -1.0, -1.0, 0.0, 0.0, -1.0, -1.0]


def test_a_trajectorys_steps_go_to_its_server_while_that_one_is_up():
    import time

    client = RolloutClient(ClientConfig(urls=["http://a:1", "http://b:1"]))
    first, second = client._endpoints
    first.in_flight = 5  # the least busy would be b
    assert client._pick(prefer="http://a:1") is first
    assert client._pick() is second
    first.down_until = time.monotonic() + 60  # a died: the step goes elsewhere
    assert client._pick(prefer="http://a:1") is second


class _ScriptedEngine:
    """Completions in a fixed order. SGLang under load can return a stop string followed by the next sampled
    token, EOS included; the real server does so only under load, so the turn logic is shown it here."""

    def __init__(self, steps: list):
        self.steps, self.requests = list(steps), []

    def new_rid(self, label: str = "r") -> str:
        return f"{label}-{len(self.requests)}"

    async def generate(self, ids, params, rid, routes_start=0, prefer=None):
        from alp_megatron.rollout.types import Completion, WeightSpan

        self.requests.append(params)
        output, stop = self.steps.pop(0)
        return Completion(rid=rid, url="http://engine:1", output_ids=tuple(output),
                          output_logprobs=(-1.0,) * len(output), finish_reason="stop", weight_version="v0",
                          weight_spans=(WeightSpan("v0", 0, len(output)),), prompt_tokens=len(ids),
                          matched_stop=stop)


class _CallsAtThree:
    """A turn that holds a '3' calls the tool, one with a '.' answers."""

    name, stop = "threes", ("3",)

    def inside_call(self, text):
        return False

    def action(self, text):
        return Action("answer") if "." in text else Action("tool", text) if "3" in text else Action("void")

    def observation(self, result):
        return f"({result.output})"


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_under_ignore_eos_an_eos_after_the_stop_string_does_not_end_the_trajectory(ignore_eos):
    tokenizer = build_char_tokenizer()
    eos = tokenizer.eos_token_id
    engine = _ScriptedEngine([(tokenizer.encode("ab3", add_special_tokens=False) + [eos], "3"),
                              (tokenizer.encode("c.", add_special_tokens=False), None)])
    agent = Agent(AgentConfig(max_turns=3, observation_tokens=6), tokenizer, tool=CountingTool(),
                  turn_format=_CallsAtThree())
    sampling = SamplingConfig(n=1, max_new_tokens=40, ignore_eos=ignore_eos)
    sample = asyncio.run(agent.trajectory(engine, [1, 5, 6], sampling, group_id=0, index=0))
    stats = sample.metadata["agent"]
    assert stats["ending"] == "complete" and all(request["ignore_eos"] == ignore_eos for request in engine.requests)
    if ignore_eos:  # the engine did not stop at EOS: the turn's call runs, the next turn answers
        assert stats["tool_calls"] == 1 and stats["turns"] == 2 and sample.response_ids[-2:] == \
            tokenizer.encode("c.", add_special_tokens=False)
    else:  # EOS ends the trajectory where the engine ended it
        assert stats["tool_calls"] == 0 and stats["turns"] == 1 and sample.response_ids[-1] == eos
