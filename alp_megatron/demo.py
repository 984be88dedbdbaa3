"""The embedded CPU default: a short ALP training run on a tiny model with tensor parallelism.

    python -m alp_megatron.demo [--steps N] [--tensor-parallel 2]

Without torchrun it spawns its own gloo ranks. Each step the model itself samples GROUP responses to each
of a few random prompts (unperturbed, no grad: a stand-in for the inference engine, whose logprobs become
the rollout logprobs); a response's reward is its share of even tokens. Then one ALP optimizer step
(perturbed forward, sequence-level ratio against the rollout logprobs, PPO clip) and a line with the
reward, loss and sigma. The full RL loop with SGLang replaces this stand-in.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from alp_megatron.alp.advantages import grpo_advantages
from alp_megatron.alp.loss import LossConfig, policy_loss
from alp_megatron.alp.perturbation import PerturbationConfig, alp_disabled, realised_ratio_by_layer, sigma_by_layer
from alp_megatron.model.arch import ModelArch
from alp_megatron.model.logprobs import shift_targets, token_logprobs
from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
from alp_megatron.trainer.engine import OptimizerSettings, build_optimizer, train_step, wrap_ddp

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 4, "vocab_size": 64,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
PROMPT, RESPONSE, GROUP, PROMPTS = 4, 8, 4, 4


@torch.no_grad()
def sample_rollouts(model, step: int, vocab: int) -> dict:
    """Sample responses from ``model`` (every TP rank draws the same tokens from the same seed)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    gen = torch.Generator().manual_seed(1000 + step)
    batch = PROMPTS * GROUP
    tokens = torch.randint(0, vocab, (PROMPTS, PROMPT), generator=gen).repeat_interleave(GROUP, dim=0)
    with alp_disabled(model):
        for _ in range(RESPONSE):
            positions = torch.arange(tokens.shape[1]).expand(batch, -1)
            logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None)[:, -1])
            next_token = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)
            tokens = torch.cat([tokens, next_token], dim=1)
        positions = torch.arange(tokens.shape[1]).expand(batch, -1)
        targets = shift_targets(tokens)
        rollout_logprobs = token_logprobs(model(tokens, positions, None), targets)
    rewards = (tokens[:, PROMPT:] % 2 == 0).float().mean(dim=1)
    loss_mask = torch.zeros_like(tokens, dtype=torch.float32)
    loss_mask[:, PROMPT - 1 : -1] = 1.0  # positions whose next token is a response token
    return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, rewards=rewards,
                rollout_logprobs=rollout_logprobs, advantages=grpo_advantages(rewards, group_size=GROUP),
                position_ids=positions, sample_ids=torch.arange(batch))


def run(steps: int, tensor_parallel: int) -> None:
    import torch.distributed as dist

    parallel = ParallelConfig(tensor_parallel=tensor_parallel)
    alp = PerturbationConfig(sigma_0=0.05, sigma_lr=0.02)
    initialize_parallel(parallel, seed=1234)
    torch.manual_seed(1234)
    arch = ModelArch.from_hf_config(TINY_LLAMA)
    chunks = build_model(arch, parallel, ModelConfig(), alp)
    settings = OptimizerSettings(lr=2e-3)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, alp)
    loss_cfg = LossConfig(method="alp_seq")
    rank0 = dist.get_rank() == 0
    if rank0:
        print(f"ALP demo: {arch.architecture} {arch.num_layers} layers, TP={tensor_parallel}, "
              f"sigma_0={alp.sigma_0}, {steps} steps")
        print(f"{'step':>4} {'reward':>7} {'loss':>9} {'grad_norm':>9} {'sigma_min':>9} {'sigma_mean':>10} "
              f"{'sigma_max':>9} {'h_ratio_l0':>10} {'time_s':>6}")
    for step in range(steps):
        start = time.perf_counter()
        batch = sample_rollouts(chunks[0], step, arch.vocab_size)

        def loss_function(output, micro):
            logprobs = token_logprobs(output, micro["targets"])
            loss, _ = policy_loss(logprobs, micro["rollout_logprobs"], micro["advantages"],
                                  micro["loss_mask"], loss_cfg)
            units = micro["loss_mask"].sum()
            return loss * units, units.to(torch.int), {"loss_sum": (loss * units).detach(), "num_units": units}

        micro = [{k: v[i : i + GROUP] for k, v in batch.items()} for i in range(0, PROMPTS * GROUP, GROUP)]
        result = train_step(ddp, optimizer, scheduler, micro, loss_function, step, PROMPT + RESPONSE)
        sigmas = list(sigma_by_layer(chunks[0]).values())
        ratio = realised_ratio_by_layer(chunks[0]).get(0, float("nan"))
        if rank0:
            print(f"{step:>4} {float(batch['rewards'].mean()):>7.3f} {result.loss:>9.4f} {result.grad_norm:>9.4f} {min(sigmas):>9.5f} "
                  f"{sum(sigmas) / len(sigmas):>10.5f} {max(sigmas):>9.5f} {ratio:>10.4f} "
                  f"{time.perf_counter() - start:>6.2f}")
    if rank0:
        print("reward = share of even tokens in the sampled responses (0.5 at random); it rises as the policy learns.")


def _spawned(rank: int, world_size: int, port: int, steps: int, tensor_parallel: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    run(steps, tensor_parallel)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tensor-parallel", type=int, default=2)
    args = parser.parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        run(args.steps, args.tensor_parallel)
        return
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_spawned, args=(args.tensor_parallel, port, args.steps, args.tensor_parallel),
             nprocs=args.tensor_parallel, join=True)


if __name__ == "__main__":
    main()
