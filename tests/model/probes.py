"""Rank-side checks of the ALP model on Megatron-Core; each returns plain data for the test to assert on."""

from __future__ import annotations

import torch

from alp_megatron.alp.perturbation import (
    PerturbationConfig, alp_disabled, perturbation_modules, realised_ratio_by_layer, set_microbatch,
)
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.logprobs import shift_targets, token_entropy, token_logprobs
from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
from tests.tiny_models import hf_config

BATCH, SEQ = 2, 16


def _inputs(vocab: int):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    return tokens, torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)


def _alp_model(architecture: str, alp: PerturbationConfig, parallel=ParallelConfig(), seed=1234):
    initialize_parallel(parallel, seed=seed)
    torch.manual_seed(seed)
    arch = ModelArch.from_hf_config(hf_config(architecture))
    return arch, build_model(arch, parallel, ModelConfig(), alp)[0]


def _stock_model(architecture: str, seed=1234):
    """The same GPTModel from Megatron's unmodified local spec."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from alp_megatron.model.provider import transformer_config

    torch.manual_seed(seed)
    arch = ModelArch.from_hf_config(hf_config(architecture))
    config = transformer_config(arch, ParallelConfig(), ModelConfig())
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
                    max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
                    rotary_base=int(arch.rope_theta), share_embeddings_and_output_weights=arch.tie_word_embeddings)


def identity_checks(architecture: str) -> dict:
    """Logits of the ALP model (off, sigma -> 0, eval) against Megatron's unwrapped spec."""
    _, alp_model = _alp_model(architecture, PerturbationConfig(sigma_0=0.5))
    stock = _stock_model(architecture)
    weights_equal = all(
        torch.equal(p, dict(stock.named_parameters())[n])
        for n, p in alp_model.named_parameters() if "log_sigma" not in n
    )
    tokens, positions = _inputs(256)
    stock.train()
    reference = stock(tokens, positions, None)
    with alp_disabled(alp_model):
        disabled = alp_model(tokens, positions, None)
    alp_model.eval()
    evaluated = alp_model(tokens, positions, None)  # no noise key set: eval must not ask for one
    alp_model.train()
    set_microbatch(alp_model, 0, [0, 1])
    perturbed = alp_model(tokens, positions, None)
    _, tiny = _alp_model(architecture, PerturbationConfig(sigma_0=1e-30))
    set_microbatch(tiny, 0, [0, 1])
    tiny_sigma = tiny(tokens, positions, None)
    return dict(
        weights_equal=weights_equal,
        disabled_equal=torch.equal(disabled, reference),
        eval_equal=torch.equal(evaluated, reference),
        tiny_sigma_equal=torch.equal(tiny_sigma, reference),
        perturbed_max_diff=float((perturbed - reference).abs().max()),
        log_sigma_names=[n for n, _ in alp_model.named_parameters() if "log_sigma" in n],
    )


def realised_ratio_checks(sigma_0: float) -> dict:
    """Capture each ALP layer's input and what its input norm sees; compare with sigma."""
    _, model = _alp_model("LlamaForCausalLM", PerturbationConfig(sigma_0=sigma_0))
    captured = {}
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=index: captured.__setitem__(("in", i), kwargs["hidden_states"].detach()),
            with_kwargs=True,
        )
        layer.input_layernorm.register_forward_pre_hook(
            lambda mod, args, i=index: captured.__setitem__(("norm", i), args[0].detach())
        )
    tokens, positions = _inputs(256)
    set_microbatch(model, 0, [0, 1])
    model(tokens, positions, None)
    rows = {}
    reported = realised_ratio_by_layer(model)
    for index in range(model.config.num_layers):
        h, h_prime = captured[("in", index)], captured[("norm", index)]
        delta = h_prime - h
        rows[index] = dict(
            rms_delta=float(delta.pow(2).mean().sqrt()),
            ratio=float(delta.norm() / h.norm()),
            reported=reported[index],
        )
    return rows


def finite_difference_check() -> dict:
    """d loss / d log_sigma_l by autograd and by central differences, at fixed noise (float64 model)."""
    initialize_parallel(ParallelConfig(), seed=1234)
    torch.manual_seed(1234)
    arch = ModelArch.from_hf_config(hf_config("Qwen3ForCausalLM"))
    float64 = ModelConfig(extra=dict(params_dtype=torch.float64, pipeline_dtype=torch.float64))
    torch.set_default_dtype(torch.float64)  # norms and embeddings follow the default dtype
    try:
        model = build_model(arch, ParallelConfig(), float64, PerturbationConfig(sigma_0=0.3))[0]
    finally:
        torch.set_default_dtype(torch.float32)
    tokens, positions = _inputs(arch.vocab_size)
    targets = shift_targets(tokens)

    def loss() -> torch.Tensor:  # float64 end to end (token_logprobs works in fp32)
        set_microbatch(model, 5, [7, 8])
        logprobs = torch.log_softmax(model(tokens, positions, None), dim=-1)
        return -logprobs.gather(-1, targets.unsqueeze(-1)).mean()

    modules = list(perturbation_modules(model))
    loss().backward()
    rows = {}
    step = 1e-4  # log_sigma is fp32 (by design): divide by the step actually stored
    for module in modules:
        with torch.no_grad():
            base = module.log_sigma.item()
            module.log_sigma.fill_(base + step)
            at_up, up = module.log_sigma.item(), loss().item()
            module.log_sigma.fill_(base - step)
            at_down, down = module.log_sigma.item(), loss().item()
            module.log_sigma.fill_(base)
        rows[module.layer_index] = dict(autograd=module.log_sigma.grad.item(),
                                        numeric=(up - down) / (at_up - at_down))
    return rows


def logprob_checks(tensor_parallel: int) -> dict:
    """Vocab-parallel logprobs and entropy on this layout (the full vocabulary is never gathered)."""
    parallel = ParallelConfig(tensor_parallel=tensor_parallel)
    arch, model = _alp_model("Qwen2ForCausalLM", PerturbationConfig(), parallel)
    model.eval()
    tokens, positions = _inputs(arch.vocab_size)
    targets = shift_targets(tokens)
    logits = model(tokens, positions, None)
    result = dict(local_vocab=logits.shape[-1])
    result["logprobs"] = token_logprobs(logits, targets).tolist()
    result["logprobs_t07"] = token_logprobs(logits, targets, temperature=0.7).tolist()
    result["entropy"] = token_entropy(logits).tolist()
    if tensor_parallel == 1:
        full = torch.log_softmax(logits.double(), dim=-1)
        result["direct_logprobs"] = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
        result["direct_entropy"] = (-(full.exp() * full).sum(-1)).tolist()
    # gradient flows through the vocab-parallel logprobs
    model.train()
    with alp_disabled(model):
        token_logprobs(model(tokens, positions, None), targets).sum().backward()
    result["embedding_grad_sq"] = float(model.embedding.word_embeddings.weight.grad.double().pow(2).sum())
    return result


def run_all(architectures: list[str]) -> dict:
    """Single-rank entry point: every probe in one process."""
    return dict(
        identity={a: identity_checks(a) for a in architectures},
        ratio=realised_ratio_checks(0.05),
        finite_difference=finite_difference_check(),
        logprobs_tp1=logprob_checks(1),
        sigma_lr_group=sigma_group_check(),
    )


def sigma_group_check() -> dict:
    """log_sigma has its own optimizer group with sigma_lr / sigma_weight_decay, through Megatron's optimizer."""
    from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, wrap_ddp

    alp = PerturbationConfig(sigma_lr=0.123, sigma_weight_decay=0.01)
    _, model = _alp_model("LlamaForCausalLM", alp)
    settings = OptimizerSettings(lr=1e-4, weight_decay=0.1)
    ddp = wrap_ddp([model], settings)
    optimizer, scheduler = build_optimizer(ddp, settings, alp)
    groups = []
    for group in optimizer.param_groups:
        groups.append(dict(lr=group["lr"], weight_decay=group["weight_decay"], size=len(group["params"]),
                           sigma=bool(group.get("alp_sigma_group"))))
    return dict(groups=groups, num_log_sigma=len(list(perturbation_modules(model))))


def logprobs_entry(tensor_parallel: int) -> dict:
    return logprob_checks(tensor_parallel)

