"""Padded against packed micro-batches on RL-shaped response lengths: same model, samples and steps, interleaved.

    python benchmarks/packing.py [--samples 16 --prompt 32 --max-new-tokens 512 --steps 3 --budget auto]

Response lengths are long-tailed like RL rollouts: lognormal with a median of a tenth of ``--max-new-tokens``,
capped there. Each step trains the same rollout batch twice, alternating which goes first: once with padded
micro-batches (``actor.micro_batch_size=1``: one sequence of the batch's longest length per micro-batch) and
once packed (``actor.max_tokens_per_microbatch``: ``auto``, the run's default, is the mini-batch's longest
sample, so each packed micro-batch holds at most the tokens of a padded one; ``max`` is the longest possible
sample, fewer and fuller micro-batches). Printed: median step time of each, useful
(non-padding) tokens per second, the padded share of the tokens each processed, and the throughput ratio
against the ideal one (the padded run's tokens over the useful tokens), and the peak memory of one step of
each beyond what the model and optimizer hold: on a GPU from ``max_memory_allocated``; on the CPU the peak of the bytes the CPU allocator holds during a
separate, untimed step, summed from the profiler's allocation events (the profiler slows a step down).

The local spec runs the packed row's attention with a dense block-diagonal mask, so its attention costs what
a padded row of the same length costs; Transformer Engine's THD attention (GPU) skips the masked blocks.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch


def response_lengths(count: int, max_new: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    median = max_new / 10
    draws = torch.exp(math.log(median) + torch.randn(count, generator=gen))
    return [int(min(max(1, round(float(x))), max_new)) for x in draws]


def cpu_peak_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held beyond what it held before, while ``fn()`` ran (from the
    profiler's allocation and free events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--budget", default="auto",
                        help="packed budget: auto (the run default: the mini-batch's longest sample), max (the "
                             "longest possible sample) or a number of tokens")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29583")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")

    from alp_megatron.alp.loss import LossConfig
    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
    from alp_megatron.trainer.actor import Actor, ActorConfig
    from alp_megatron.sample import Sample
    from alp_megatron.trainer.batch import build_training_batch
    from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, wrap_ddp

    longest = args.prompt + args.max_new_tokens
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": args.hidden, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
          "vocab_size": 1024, "max_position_embeddings": longest, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
          "tie_word_embeddings": False}
    parallel = ParallelConfig()
    initialize_parallel(parallel)
    arch = ModelArch.from_hf_config(hf)
    alp = PerturbationConfig(sigma_0=0.02)
    settings = OptimizerSettings(lr=1e-6)
    actors = {}
    state = None
    budget_of = {"auto": "auto", "max": longest}
    packed_budget = budget_of[args.budget] if args.budget in budget_of else int(args.budget)
    for mode, budget in (("padded", None), ("packed", packed_budget)):
        chunks = build_model(arch, parallel, ModelConfig(), alp)
        if state is None:
            state = chunks[0].state_dict()
        else:
            chunks[0].load_state_dict(state)
        ddp = wrap_ddp(chunks, settings)
        optimizer, scheduler = build_optimizer(ddp, settings, alp)
        actors[mode] = Actor(ddp, optimizer, scheduler, LossConfig(method="alp_seq"),
                             ActorConfig(micro_batch_size=1, max_tokens_per_microbatch=budget))
    cuda = torch.cuda.is_available()

    def batch_for(step: int):
        gen = torch.Generator().manual_seed(1000 + step)
        lengths = response_lengths(args.samples, args.max_new_tokens, seed=step)
        prompts = [torch.randint(0, arch.vocab_size, (args.prompt,), generator=gen).tolist() for _ in lengths]
        responses = [torch.randint(0, arch.vocab_size, (n,), generator=gen).tolist() for n in lengths]
        logprobs = [[-math.log(arch.vocab_size)] * n for n in lengths]
        advantages = torch.randn(args.samples, generator=gen).tolist()
        return build_training_batch([Sample.given(p, r, lp, a, step * 1000 + i) for i, (p, r, lp, a)
                                     in enumerate(zip(prompts, responses, logprobs, advantages))])

    times = {"padded": [], "packed": []}
    shares = {"padded": [], "packed": []}
    counts = {"padded": [], "packed": []}
    peak = {"padded": 0, "packed": 0}
    useful = processed_padded = 0
    for step in range(args.steps + 1):  # step 0 warms up
        batch = batch_for(step)
        for mode in (("padded", "packed") if step % 2 else ("packed", "padded")):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated()
            start = time.perf_counter()
            report = actors[mode].train(batch)
            shares[mode].append(report.metrics["padded_share"])
            counts[mode].append(report.metrics["micro_batches"])
            if cuda:
                torch.cuda.synchronize()
                peak[mode] = max(peak[mode], torch.cuda.max_memory_allocated() - held)
            if step:
                times[mode].append(time.perf_counter() - start)
        if step:
            useful += int(batch.lengths.sum())
            processed_padded += batch.size * batch.seq_length
    padded_time, packed_time = statistics.median(times["padded"]), statistics.median(times["packed"])
    useful_per_step = useful / args.steps
    ideal = processed_padded / useful
    measured = (useful_per_step / packed_time) / (useful_per_step / padded_time)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; {args.layers} layers, hidden {args.hidden}; {args.samples} samples a step, prompt "
          f"{args.prompt}, responses lognormal (median {args.max_new_tokens // 10}, cap {args.max_new_tokens}); "
          f"packed budget {args.budget} ({packed_budget}); {args.steps} steps each, interleaved")
    for mode, seconds in (("padded", padded_time), ("packed", packed_time)):
        print(f"{mode}: median step {seconds:.3f} s, {useful_per_step / seconds:,.0f} useful tokens/s, padded share "
              f"{statistics.mean(shares[mode]):.1%} (the actor's padded_share), "
              f"{statistics.mean(counts[mode]):.1f} micro-batches a step")
    print(f"throughput packed/padded {measured:.2f}; ideal (padded tokens / useful tokens) {ideal:.2f}; "
          f"measured/ideal {measured / ideal:.2f} (target >= 0.8)")
    if not cuda:  # one more step of each, untimed, under the profiler
        batch = batch_for(args.steps + 1)
        for mode in ("padded", "packed"):
            peak[mode] = cpu_peak_bytes(lambda: actors[mode].train(batch))
    print(f"peak memory of a step beyond the model and optimizer: padded {peak['padded'] / 2**20:,.1f} MiB, "
          f"packed {peak['packed'] / 2**20:,.1f} MiB ({peak['packed'] / peak['padded']:.2f} of padded)"
          + ("" if cuda else "; CPU allocator, from the profiler's events"))


if __name__ == "__main__":
    main()
