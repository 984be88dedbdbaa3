"""The async client against a real SGLang server: logprobs equal a transformers forward, bad requests
fail with errors naming the request, malformed answers are refused."""

import asyncio
import copy

import pytest
import requests
import torch

from alp_megatron.rollout.client import ClientConfig, RolloutClient, parse_completion
from alp_megatron.rollout.errors import EngineError, EngineUnreachableError, MalformedResponseError
from alp_megatron.rollout.process import free_port
from alp_megatron.rollout.sampler import RolloutError, Sampler, SamplerConfig
from alp_megatron.rollout.types import SamplingConfig

PROMPTS = [[1, 5, 6, 7], [1, 20, 21], [1, 30, 31, 32, 33, 34]]


def run(coroutine):
    return asyncio.run(coroutine)


async def _generate_all(config, prompts, params):
    async with RolloutClient(config) as client:
        return await asyncio.gather(*(client.generate(prompt, params) for prompt in prompts))


@pytest.fixture(scope="module")
def hf_model(model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dirs["v0"], dtype=torch.float32).eval()


def _hf_logprobs(model, prompt, response):
    """log p(response[i] | prompt + response[:i]) and the argmax ids at those positions."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[torch.arange(len(response)), torch.tensor(response)].tolist(), logits.argmax(-1).tolist()


def test_sampled_logprobs_equal_transformers_forward(client_config, hf_model):
    params = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "ignore_eos": True}
    completions = run(_generate_all(client_config, PROMPTS, params))
    for prompt, completion in zip(PROMPTS, completions):
        assert len(completion.output_ids) == len(completion.output_logprobs) == 16
        expected, _ = _hf_logprobs(hf_model, prompt, list(completion.output_ids))
        assert max(abs(a - b) for a, b in zip(completion.output_logprobs, expected)) <= 1e-5
        assert completion.weight_version == "v0" and completion.finish_reason == "length"


def test_greedy_ids_are_transformers_argmax(client_config, hf_model):
    params = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}
    completions = run(_generate_all(client_config, PROMPTS, params))
    for prompt, completion in zip(PROMPTS, completions):
        response = list(completion.output_ids)
        expected_logprobs, argmax = _hf_logprobs(hf_model, prompt, response)
        assert response == argmax
        assert max(abs(a - b) for a, b in zip(completion.output_logprobs, expected_logprobs)) <= 1e-5


def test_token_ids_outside_vocabulary_are_refused_before_sending(client_config, rollout_server):
    vocab = client_config.vocab_size
    with pytest.raises(EngineError) as caught:
        run(_generate_all(client_config, [[1, vocab + 3]], {"max_new_tokens": 2}))
    assert "outside the vocabulary" in str(caught.value) and caught.value.request.startswith("r-")
    assert requests.get(rollout_server.url + "/health", timeout=30).status_code == 200


def test_prompt_longer_than_context_names_the_request(client_config):
    async def go():
        async with RolloutClient(client_config) as client:
            await client.generate([1] * 5000, {"max_new_tokens": 2}, rid="too-long-prompt")

    with pytest.raises(EngineError) as caught:
        run(go())
    assert caught.value.status == 400 and caught.value.request == "too-long-prompt"
    assert "context length" in caught.value.message


def test_sampler_error_names_the_group(client_config):
    sampler = Sampler(RolloutClient(client_config),
                      SamplerConfig(SamplingConfig(n=2, max_new_tokens=4), show_progress=False))
    with pytest.raises(RolloutError, match="group 7"):
        sampler.run([[1, 5], [1] * 5000], group_ids=[3, 7])


def test_unreachable_server_error_names_url_and_request():
    url = f"http://127.0.0.1:{free_port()}"
    config = ClientConfig(urls=[url], max_attempts=2, retry_backoff_s=0.01)

    async def go():
        async with RolloutClient(config) as client:
            await client.generate([1, 2], {"max_new_tokens": 2}, rid="lonely")

    with pytest.raises(EngineUnreachableError) as caught:
        run(go())
    assert url in str(caught.value) and caught.value.request == "lonely" and "2 attempts" in str(caught.value)


def test_malformed_answers_are_errors_not_samples(rollout_server):
    answer = requests.post(rollout_server.url + "/generate", json={
        "input_ids": [1, 5, 6], "sampling_params": {"max_new_tokens": 4, "ignore_eos": True},
        "return_logprob": True}, timeout=60).json()
    assert len(parse_completion(answer, "ok", rollout_server.url).output_logprobs) == 4

    def broken(edit):
        item = copy.deepcopy(answer)
        edit(item["meta_info"], item)
        return item

    cases = {
        "one logprob short": lambda meta, item: meta["output_token_logprobs"].pop(),
        "logprob of another token": lambda meta, item: meta["output_token_logprobs"][1].__setitem__(1, 999),
        "NaN logprob": lambda meta, item: meta["output_token_logprobs"][0].__setitem__(0, float("nan")),
        "no finish reason": lambda meta, item: meta.pop("finish_reason"),
        "spans that miss tokens": lambda meta, item: meta["weight_versions"][0].__setitem__("end", 2),
        "non-integer ids": lambda meta, item: item["output_ids"].__setitem__(0, "a"),
    }
    for name, edit in cases.items():
        with pytest.raises(MalformedResponseError) as caught:
            parse_completion(broken(edit), f"case {name}", rollout_server.url)
        assert f"case {name}" in str(caught.value), name


def test_health_reports_each_worker(client_config, rollout_server):
    dead = f"http://127.0.0.1:{free_port()}"
    config = ClientConfig(urls=[rollout_server.url], control_urls=[rollout_server.url, dead])

    async def go():
        async with RolloutClient(config) as client:
            return await client.health(timeout_s=30)

    assert run(go()) == {rollout_server.url: True, dead: False}
