"""MoE routing replay on a real Megatron-Core model (tiny Qwen3-MoE, gloo): the routes a micro-batch carries
are the experts the routers use, padded or packed, under ALP's perturbed forward or not (by option), and
only where they are given."""

import functools

import pytest
import torch

from alp_megatron.model.provider import ModelConfig, ParallelConfig
from tests.distributed import run_ranks
from tests.model.layouts import Layout, arch_for, build

pytestmark = pytest.mark.megatron

MOE = "Qwen3MoeForCausalLM"
SEQ = 12
FORCED = 5  # the token whose layer-0 expert the test changes


def _logits(chunk, micro) -> torch.Tensor:
    from alp_megatron.model import packing, routing

    with torch.no_grad():
        out = packing.forward(chunk, micro)
    routing.clear([chunk])
    return out


def _own_routes(chunk, micro) -> torch.Tensor:
    """``[1, S, L, K]``: the experts the model picks by itself for ``micro`` (Megatron's RECORD action)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from alp_megatron.model.routing import routers

    for router in routers(chunk):
        router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
    with torch.no_grad():
        chunk(micro["tokens"], micro["position_ids"], None)
    recorded = [router.router_replay.get_recorded_indices() for router in routers(chunk)]  # [S, K] each
    for router in routers(chunk):
        router.router_replay.clear_router_replay_action()
    return torch.stack(recorded, dim=1)[None].to(torch.uint8)


def replay_probe(perturbed: bool, replay_when_perturbed: bool = True) -> dict:
    from alp_megatron.alp.perturbation import PerturbationConfig, set_microbatch

    alp = PerturbationConfig(sigma_0=0.05, replay_routes_when_perturbed=replay_when_perturbed)
    (chunk,) = build(Layout("routing", MOE, model=ModelConfig(routing_replay="rollout"), alp=alp))
    chunk.train(perturbed)
    vocab = arch_for(Layout("routing", MOE)).vocab_size
    tokens = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(3))
    micro = {"tokens": tokens, "position_ids": torch.arange(SEQ)[None], "lengths": torch.tensor([SEQ]),
             "sample_ids": torch.tensor([0])}

    def logits(routes=None):
        set_microbatch(chunk, 0, micro["sample_ids"])  # the same noise for every forward
        return _logits(chunk, micro if routes is None else {**micro, "extra.routed_experts": routes})

    natural = logits()
    own = _own_routes(chunk, micro) if not perturbed else None
    if perturbed:  # the routes the perturbed forward picks by itself: record under the same noise
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        from alp_megatron.model.routing import routers

        for router in routers(chunk):
            router.router_replay.set_router_replay_action(RouterReplayAction.RECORD)
        set_microbatch(chunk, 0, micro["sample_ids"])
        with torch.no_grad():
            chunk(tokens, micro["position_ids"], None)
        own = torch.stack([r.router_replay.get_recorded_indices() for r in routers(chunk)], dim=1)[None]
        own = own.to(torch.uint8)
        for router in routers(chunk):
            router.router_replay.clear_router_replay_action()
    forced = own.clone()
    experts = arch_for(Layout("routing", MOE)).num_experts
    row = forced[0, FORCED, 0].long()
    forced[0, FORCED, 0] = torch.tensor([e for e in range(experts) if e not in row.tolist()][: row.numel()],
                                        dtype=torch.uint8)
    replayed, changed = logits(own), logits(forced)
    after = (changed - natural).abs().amax(dim=-1).reshape(-1)  # [S] (b = 1): the largest change per position
    result = dict(own_equal=torch.equal(replayed, natural), before=float(after[:FORCED].max()),
                  from_forced=float(after[FORCED:].min()), at_forced=float(after[FORCED]))
    if not perturbed:  # the agreement of the model's own top-k with routes: its own, then one token forced
        from alp_megatron.model import routing

        for routes in (own, forced):
            with routing.measuring([chunk]):
                logits(routes)
            result.setdefault("agreement", []).append(routing.agreement([chunk]))
    return result


def test_replaying_the_models_own_routes_changes_nothing_and_one_forced_expert_changes_only_what_follows():
    result = run_ranks(1, replay_probe, False)[0]
    assert result["own_equal"]  # replay gathers the live scores at the given experts: the same forward
    # causal: positions before the forced token see nothing of it (but rounding: an expert's matmul now runs
    # over another set of tokens, and fp32 sums regroup)
    assert result["before"] <= 1e-6
    assert result["at_forced"] > 1e-3 and result["from_forced"] > 1e-6
    own, forced = result["agreement"]
    layers = len([key for key in own if key.startswith("routing_agreement_layer")])
    assert own["routing_agreement"] == 1.0 and layers == 4
    # the last token counts for nothing (the engine never routes it: it is never an input)
    assert forced["routing_agreement_layer0"] == (SEQ - 2) / (SEQ - 1) and forced["routing_agreement_layer1"] == 1.0
    assert forced["routing_agreement"] == (4 * (SEQ - 1) - 1) / (4 * (SEQ - 1))


@pytest.mark.parametrize("replay_when_perturbed", [True, False])
def test_the_perturbed_forward_replays_the_routes_or_routes_itself_by_option(replay_when_perturbed):
    result = run_ranks(1, functools.partial(replay_probe, replay_when_perturbed=replay_when_perturbed), True)[0]
    assert result["own_equal"]
    if replay_when_perturbed:  # the forced expert is taken
        assert result["before"] <= 1e-6 and result["at_forced"] > 1e-3
    else:  # the routes are ignored: the forward routes on its perturbed hidden states, as without them
        assert result["before"] == result["at_forced"] == result["from_forced"] == 0.0


def test_replay_is_refused_where_it_would_not_happen():
    from alp_megatron.errors import ConfigError
    from alp_megatron.model.provider import transformer_config

    arch = arch_for(Layout("routing", MOE))
    with pytest.raises(ConfigError, match="moe_router_fusion"):
        transformer_config(arch, ParallelConfig(), ModelConfig(routing_replay="rollout",
                                                               extra={"moe_router_fusion": True}))
    with pytest.raises(ConfigError, match="has no MoE layers"):
        transformer_config(arch_for(Layout("routing")), ParallelConfig(), ModelConfig(routing_replay="rollout"))
    with pytest.raises(ConfigError, match="routing_agreement.*has no MoE layers"):
        transformer_config(arch_for(Layout("routing")), ParallelConfig(), ModelConfig(routing_agreement=True))


def replaying_model(folder: str):
    """One rank's Megatron model of the HF folder ``folder``, in eval mode, replaying MoE routes, ALP off."""
    import json
    import os

    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.bridge.hf_import import load_hf_weights
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import build_model, initialize_parallel

    with open(os.path.join(folder, "config.json")) as handle:
        arch = ModelArch.from_hf_config(json.load(handle))
    initialize_parallel(ParallelConfig())
    (chunk,) = build_model(arch, ParallelConfig(), ModelConfig(routing_replay="rollout"),
                           PerturbationConfig(enabled=False))
    load_hf_weights([chunk], folder, arch)
    return chunk.eval()


def engine_agreement(folder: str, tokens: list, engine_routes: list, engine_logprobs: list, prompt: int) -> dict:
    """Megatron on ``folder``'s weights: its own top-k (RECORD) against the engine's routes, and its
    logprobs of the output tokens with the engine's routes replayed against the engine's."""
    from alp_megatron.model.logprobs import token_logprobs

    chunk = replaying_model(folder)
    seq = torch.tensor([tokens])
    micro = {"tokens": seq, "position_ids": torch.arange(len(tokens))[None], "lengths": torch.tensor([len(tokens)])}
    own = _own_routes(chunk, micro)[0, :-1].long()  # the last token is never an input of the engine
    routes = torch.tensor(engine_routes, dtype=torch.uint8)
    filler = torch.arange(routes.shape[-1], dtype=torch.uint8).expand(1, *routes.shape[1:])
    logits = _logits(chunk, {**micro, "extra.routed_experts": torch.cat([routes, filler])[None]})
    targets = torch.tensor([tokens[1:] + [0]])
    logprobs = token_logprobs(logits, targets)[0, prompt - 1 : len(tokens) - 1]
    return dict(order_equal=float((own == routes.long()).all(-1).float().mean()),
                max_logprob_diff=float((logprobs - torch.tensor(engine_logprobs)).abs().max()))


@pytest.mark.sglang
def test_the_engines_routes_are_the_trainers_top_k_and_replayed_give_the_engines_logprobs(moe_server,
                                                                                        moe_model_path):
    """fp32 engine and trainer: the routes of a fresh and of a prefix-cached request equal Megatron's own
    top-k for every (token, layer), order included, and with them replayed Megatron's logprobs equal the
    engine's within the bridge check's tolerance (1e-4)."""
    import asyncio

    from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
    from tests.sglang_fixtures import MOE_ROUTES

    prompt = [1, 9, 10, 11, 12, 13]

    async def twice():
        config = ClientConfig(urls=[moe_server.url], vocab_size=model_vocab_size(moe_model_path),
                              routed_experts=MOE_ROUTES)
        async with RolloutClient(config) as client:
            params = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 5}
            return [await client.generate(prompt, params) for _ in range(2)]

    for completion in asyncio.run(twice()):  # the second one reads the prompt's routes from the prefix cache
        tokens = prompt + list(completion.output_ids)
        result = run_ranks(1, engine_agreement, moe_model_path, tokens, completion.routed_experts.tolist(),
                           list(completion.output_logprobs), len(prompt))[0]
        assert result["order_equal"] == 1.0
        assert result["max_logprob_diff"] <= 1e-4


@pytest.mark.plumbing
def test_the_engines_return_routes_when_replayed_or_measured_only():
    from alp_megatron.run.build import engine_routes

    moe = arch_for(Layout("routing", MOE))
    assert engine_routes(ModelConfig(), moe) is None  # they cost bytes per token: not asked for by default
    routes = (moe.num_layers, moe.moe_topk, moe.num_experts)
    assert engine_routes(ModelConfig(routing_replay="rollout"), moe) == routes
    assert engine_routes(ModelConfig(routing_agreement=True), moe) == routes  # agreement without replay
