"""Rollout overhead: tokens/s through our Sampler against direct batched ``/generate`` calls, same server.

Three paths generate the same work (``prompts`` groups of ``n`` samples, ``max_new_tokens`` each, EOS
ignored, logprobs returned) on the same server in the same run, interleaved round by round, with the
prefix cache flushed before every run:

* ``one_call``: every sample in a single batched ``/generate`` call, plain aiohttp;
* ``per_group``: one batched ``/generate`` call per group, all in flight at once, plain aiohttp (the
  request pattern of the sampler without any of our code);
* ``sampler``: ``Sampler`` + ``RolloutClient`` (one call per group, validated, turned into samples).

Each round runs the three back to back (order rotating); a ratio is the median over rounds of the
sampler's tokens/s over a direct path's in the same round, which cancels slow drifts of a shared
machine. 1.0 means no overhead.

    python benchmarks/rollout_overhead.py                     # starts a server on the tiny model
    python benchmarks/rollout_overhead.py --url http://127.0.0.1:30000 --model-path /path/to/model
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time

import aiohttp

from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.sampler import Sampler, SamplerConfig
from alp_megatron.rollout.server import ServerConfig, SGLangServer
from alp_megatron.rollout.types import SamplingConfig


def make_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab_size) for _ in range(length - 1)] for _ in range(count)]


async def _post(session: aiohttp.ClientSession, url: str, input_ids: list, params: dict) -> int:
    body = {"input_ids": input_ids, "sampling_params": params, "return_logprob": True}
    async with session.post(url + "/generate", json=body) as response:
        response.raise_for_status()
        answers = await response.json()
    return sum(len(answer["output_ids"]) for answer in answers)


async def one_call_run(url: str, prompts, n: int, params: dict) -> int:
    """All samples in one batched ``/generate`` call; returns the number of generated tokens."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        return await _post(session, url, [prompt for prompt in prompts for _ in range(n)], params)


async def per_group_run(url: str, prompts, n: int, params: dict) -> int:
    """One batched ``/generate`` call per group, all at once; returns the number of generated tokens."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        counts = await asyncio.gather(*(_post(session, url, [prompt] * n, params) for prompt in prompts))
    return sum(counts)


async def sampler_run(url: str, vocab_size: int, prompts, sampling: SamplingConfig) -> int:
    client = RolloutClient(ClientConfig(urls=[url], vocab_size=vocab_size))
    sampler = Sampler(client, SamplerConfig(sampling, groups_in_flight=len(prompts), show_progress=False))
    try:
        batch = await sampler.rollout(prompts)
    finally:
        await client.close()
    assert len(batch.complete_groups()) == len(prompts)
    return batch.num_tokens()


def timed(coroutine_factory) -> tuple[int, float, float]:
    """Run one path: (tokens, wall seconds, CPU seconds of this client process)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    tokens = asyncio.run(coroutine_factory())
    return tokens, time.perf_counter() - start, time.process_time() - cpu_start


@contextlib.contextmanager
def tiny_server():
    from alp_megatron.model.tiny import save_tiny_model

    folder = tempfile.mkdtemp(prefix="alp-bench-")
    model_path = save_tiny_model(folder, max_position_embeddings=2048)
    config = ServerConfig(model_path=model_path, dtype="float32", extra_args=(
        "--max-total-tokens", "32768", "--max-running-requests", "256", "--context-length", "2048",
        "--log-level", "warning"))
    with SGLangServer(config) as server:
        yield server.url, model_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an SGLang server to measure (default: start one on the tiny model)")
    parser.add_argument("--model-path", help="the model the --url server serves (for its vocab size)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if args.url and not args.model_path:
        parser.error("--url needs --model-path (the served model, for its vocabulary size)")

    with (contextlib.nullcontext((args.url, args.model_path)) if args.url else tiny_server()) as (url, model_path):
        vocab = model_vocab_size(model_path)
        prompts = make_prompts(args.prompts, args.prompt_len, vocab)
        sampling = SamplingConfig(n=args.n, max_new_tokens=args.max_new_tokens, ignore_eos=True)
        params = sampling.sglang_params()
        control = EngineControl(url)
        paths = {
            "one_call": lambda: one_call_run(url, prompts, args.n, params),
            "per_group": lambda: per_group_run(url, prompts, args.n, params),
            "sampler": lambda: sampler_run(url, vocab, prompts, sampling),
        }
        for path in paths.values():  # warm-up, not counted
            timed(path)
        rates: dict[str, list[float]] = {name: [] for name in paths}
        client_cpu: dict[str, list[float]] = {name: [] for name in paths}
        names = list(paths)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                control.flush_cache()
                tokens, seconds, cpu = timed(paths[name])
                rates[name].append(tokens / seconds)
                client_cpu[name].append(cpu)
                print(f"round {round_index} {name:9s} {tokens} tokens in {seconds:.2f} s "
                      f"= {tokens / seconds:.0f} tok/s (client CPU {cpu * 1000:.0f} ms)", flush=True)
        print(f"workload: {args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, "
              f"prompt {args.prompt_len} tokens, {args.rounds} interleaved rounds")
        for name in names:
            print(f"{name:9s}: {statistics.median(rates[name]):.0f} tok/s, client CPU "
                  f"{statistics.median(client_cpu[name]) * 1000:.0f} ms per run (medians)")
        for baseline in ("one_call", "per_group"):
            ratios = [ours / theirs for ours, theirs in zip(rates["sampler"], rates[baseline])]
            print(f"ratio sampler/{baseline}: {statistics.median(ratios):.3f} (median of per-round ratios; "
                  f"range {min(ratios):.2f}-{max(ratios):.2f})")
        extra_cpu = statistics.median(client_cpu["sampler"]) - statistics.median(client_cpu["per_group"])
        wall = args.prompts * args.n * args.max_new_tokens / statistics.median(rates["per_group"])
        print(f"client CPU the sampler adds over per_group: {extra_cpu * 1000:.0f} ms per run, "
              f"{100 * extra_cpu / wall:.1f}% of a per_group run's wall time")


if __name__ == "__main__":
    sys.exit(main())
