"""MoE routes from a real SGLang server on CPU (tiny Qwen3-MoE, ``--enable-return-routed-experts``, which
starts on CPU only with the host-buffer stand-in of ``patches/sglang_cpu``): every sample carries the
experts each layer routed each of its tokens to, equal to Hugging Face's router top-k (order included)
whether the prompt was computed afresh or served from the prefix cache; a continuation asks only for the
routes it adds; and with ``sglang-router`` in front (which drops the request's field) the routes still come,
from the workers directly."""

import asyncio

import pytest
import requests
import torch

from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
from alp_megatron.rollout.router import RouterConfig, SGLangRouter
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.sample import ROUTES
from alp_megatron.rollout.types import SamplingConfig
from tests.sglang_fixtures import MOE_ROUTES

PROMPTS = [[1, 5, 6, 7, 8], [1, 20, 21]]
LAYERS, TOP_K, EXPERTS = MOE_ROUTES


def _config(url: str, model_path: str) -> ClientConfig:
    return ClientConfig(urls=[url], vocab_size=model_vocab_size(model_path), routed_experts=MOE_ROUTES)


def _sampler(url: str, model_path: str, n: int = 2) -> Sampler:
    sampling = SamplingConfig(n=n, max_new_tokens=8, ignore_eos=True)
    return Sampler(RolloutClient(_config(url, model_path)), SamplerConfig(sampling, show_progress=False))


@pytest.fixture(scope="module")
def rollout(moe_server, moe_model_path):
    return _sampler(moe_server.url, moe_model_path).run(PROMPTS)


@torch.no_grad()
def _hf_top_k(model_path: str, tokens: list[int]) -> torch.Tensor:
    """``[len(tokens), layers, top_k]``: Hugging Face's router choice per token and layer, by descending weight."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = model(torch.tensor([tokens]), output_router_logits=True)
    return torch.stack([logits.softmax(-1).topk(TOP_K, dim=-1).indices for logits in out.router_logits], dim=1)


def test_every_sample_carries_one_route_row_per_token(rollout):
    for sample in rollout.samples:
        routes = sample.extras[ROUTES]
        assert routes.shape == (sample.length, LAYERS, TOP_K) and routes.dtype == torch.uint8  # 4 experts
        assert int(routes.max()) < EXPERTS
        assert (routes[:, :, 0] != routes[:, :, 1]).all()  # top-2: two different experts
        assert routes[-1].tolist() == [[0, 1]] * LAYERS  # the last token was never an input: filler row
    for group in rollout.groups().values():  # the prompt's tokens are routed the same for every sample
        prompt = len(group[0].prompt_ids)
        assert torch.equal(group[0].extras[ROUTES][:prompt], group[1].extras[ROUTES][:prompt])


def test_routes_equal_the_hf_routers_top_k_computed_afresh_or_from_the_prefix_cache(moe_server, moe_model_path):
    async def twice():
        async with RolloutClient(_config(moe_server.url, moe_model_path)) as client:
            params = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
            first = await client.generate(PROMPTS[0], params)
            again = await client.generate(PROMPTS[0], params)  # the prompt is in the prefix cache now
            return first, again

    first, again = asyncio.run(twice())
    tokens = PROMPTS[0] + list(first.output_ids)
    expected = _hf_top_k(moe_model_path, tokens[:-1])
    assert torch.equal(torch.from_numpy(first.routed_experts).long(), expected)
    assert again.output_ids == first.output_ids
    assert torch.equal(torch.from_numpy(again.routed_experts).long(), expected)


def test_a_continuation_asks_only_for_the_routes_it_adds(moe_server, moe_model_path):
    async def scenario():
        async with RolloutClient(_config(moe_server.url, moe_model_path)) as client:
            params = {"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True}
            head = await client.generate(PROMPTS[1], params)
            sequence = PROMPTS[1] + list(head.output_ids)
            tail = await client.generate(sequence, params, routes_start=len(sequence) - 1)
            whole = await client.generate(sequence + list(tail.output_ids)[:-1], {**params, "max_new_tokens": 1})
            return head, tail, whole, len(sequence)

    head, tail, whole, length = asyncio.run(scenario())
    assert head.routed_experts.shape[0] == length - 1
    assert tail.routed_experts.shape[0] == 5 and tail.routes_start == length - 1  # no prefix sent again
    joined = torch.cat([torch.from_numpy(head.routed_experts), torch.from_numpy(tail.routed_experts)])
    assert torch.equal(joined, torch.from_numpy(whole.routed_experts)[: joined.shape[0]])


def test_with_a_router_in_front_the_routes_come_from_the_workers_directly(moe_server, moe_model_path, tmp_path):
    """sglang-router 0.3.2 drops the request's return_routed_experts (its GenerateRequest struct lacks it), so
    a client asked for routes sends /generate to the workers itself; a request through the router shows the
    drop (when this starts to fail, the router passes the field and may carry routed requests again)."""
    with SGLangRouter(RouterConfig([moe_server.url], log_dir=str(tmp_path))) as router:
        body = {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": True}
        answer = requests.post(router.url + "/generate", json=body, timeout=60).json()
        assert "routed_experts" not in answer["meta_info"]
        config = ClientConfig(urls=[router.url], control_urls=[moe_server.url],
                              vocab_size=model_vocab_size(moe_model_path), routed_experts=MOE_ROUTES)
        sampling = SamplingConfig(n=1, max_new_tokens=6, temperature=0.0, ignore_eos=True)
        batch = Sampler(RolloutClient(config), SamplerConfig(sampling, show_progress=False)).run(PROMPTS[:1])
    (sample,) = batch.samples
    expected = _hf_top_k(moe_model_path, sample.prompt_ids + sample.response_ids[:-1])
    assert torch.equal(sample.extras[ROUTES][:-1].long(), expected)


def test_a_continued_sample_joins_its_routes_without_a_gap_or_a_repeat():
    from alp_megatron.rollout.sampler import _with_last_row, append_completion
    from alp_megatron.rollout.types import Completion, Sample, WeightSpan

    rows = torch.arange(9 * LAYERS * TOP_K, dtype=torch.uint8).reshape(9, LAYERS, TOP_K)  # 3 prompt + 6 tokens
    partial = Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5], rollout_logprobs=[-1.0, -1.0], finish_reason="abort",
                     weight_version="v0", weight_versions=[WeightSpan("v0", 0, 2)], group_id=0, sample_index=0,
                     aborted=True, extras={ROUTES: _with_last_row(rows[:4])})  # rows of tokens 0..3
    more = Completion(rid="r", url="u", output_ids=(6, 7, 8, 9), output_logprobs=(-1.0,) * 4, finish_reason="length",
                      weight_version="v1", weight_spans=(WeightSpan("v1", 0, 4),), prompt_tokens=5,
                      routed_experts=rows[4:8].numpy(), routes_start=4)  # asked from token 4: the one without a row
    joined = append_completion(partial, more)
    assert joined.length == 9 and joined.loss_mask == [1] * 6
    assert torch.equal(joined.extras[ROUTES][:8], rows[:8]) and joined.extras[ROUTES].shape[0] == 9


def test_bad_routes_are_refused_naming_the_request():
    """Routes of the wrong length or layer count, or naming an expert the model lacks, never become a sample."""
    import base64

    import numpy as np

    from alp_megatron.rollout.client import parse_completion
    from alp_megatron.rollout.errors import MalformedResponseError

    def answer(routes):  # a prompt of 3 tokens and 2 output tokens: 4 input tokens have routes
        return {"output_ids": [5, 6], "meta_info": {
            "finish_reason": {"type": "length"}, "weight_version": "v0", "prompt_tokens": 3, "completion_tokens": 2,
            "routed_experts": base64.b64encode(np.asarray(routes, dtype="<i4").tobytes()).decode()}}

    good = np.zeros((4, LAYERS, TOP_K), dtype=np.int32)
    parsed = parse_completion(answer(good), "r1", "http://e", with_logprobs=False, routed_experts=MOE_ROUTES)
    assert parsed.routed_experts.shape == (4, LAYERS, TOP_K)
    for name, routes, message in [
        ("a row short", good[:3], "not 4 input tokens x 2 layers x 2 experts"),
        ("a layer short", good[:, :1], "not 4 input tokens x 2 layers x 2 experts"),
        ("an expert the model lacks", np.full((4, LAYERS, TOP_K), EXPERTS), r"outside \[0, 4\)"),
    ]:
        with pytest.raises(MalformedResponseError, match=message) as error:
            parse_completion(answer(routes), "request g7", "http://e", with_logprobs=False, routed_experts=MOE_ROUTES)
        assert "g7" in str(error.value), name
