"""What MoE routing replay (R3) buys and costs on the tiny MoE example, in one invocation.

    python benchmarks/moe_replay.py [--steps 10] [--rounds 8] [--out runs/bench_moe]

Part 1 runs ``examples/cpu_tiny_moe.yaml`` (one SGLang server, Megatron at EP=2, ALP on) once per variant,
one after the other, same seed:

* ``replay``: the example (fp32 engine, routes replayed in every pass);
* ``free``: routes fetched for the agreement metric only (``routing_agreement=true``), the trainer routes
  itself;
* ``free_no_routes``: no routes asked for (servers without ``--enable-return-routed-experts``);
* ``bf16_replay`` / ``bf16_free``: the same two with the engine in bf16, a real train/inference mismatch
  (the trainer stays fp32).

It prints per variant the medians over steps (the first left out) of the step, train and rollout times,
the rollout throughput, ``routing_agreement``, ``mismatch_k3`` and ``routes_bytes_per_sample``, then the
ratios: step and train time replayed / free, rollout throughput with routes / without, and in bf16 the
agreement and ``mismatch_k3`` with replay against without.

Part 2 isolates what returning routes costs a request: one server started with the flag, the same rollout
(the run's base model, ``--prompts`` groups of 8, EOS ignored) with routes asked for and not, interleaved
round by round, prefix cache flushed before each; the ratio is the median over rounds of the two tokens/s
of one round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from alp_megatron.run.metrics import read_metrics  # noqa: E402

BF16 = ["rollout.server_dtype=bfloat16"]
FREE = ["model.megatron.routing_replay=none", "model.megatron.routing_agreement=true"]
VARIANTS = {"replay": [],
            "free": FREE,
            "free_no_routes": ["model.megatron.routing_replay=none"],
            "bf16_replay": BF16,
            "bf16_free": BF16 + FREE}


def run(out: str, steps: int, overrides: list[str]) -> list[dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "alp_megatron.cli", "--config", os.path.join(REPO, "examples", "cpu_tiny_moe.yaml"),
               "--output-dir", out, "--steps", str(steps), "metrics.tensorboard=false",
               "run.export_hf_at_end=false", "checkpoint.save_every=0", "weight_sync.verify_every=0", *overrides]
    print("running", os.path.basename(out), *overrides, flush=True)
    with open(out + ".log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    return read_metrics(os.path.join(out, "metrics.jsonl"))[1:]


def median(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else float("nan")


def throughput(records: list[dict]) -> float:
    """Generated tokens per second of rollout (median over steps)."""
    return statistics.median(r["response_tokens"] / r["time_rollout"] for r in records)


def loop_part(out: str, steps: int) -> dict:
    results = {name: run(f"{out}_{name}", steps, overrides) for name, overrides in VARIANTS.items()}
    print(f"\n{'variant':<15} {'step s':>7} {'train s':>8} {'rollout s':>9} {'tok/s':>7} {'agreement':>9} "
          f"{'k3':>9} {'route B/sample':>14}")
    for name, records in results.items():
        print(f"{name:<15} {median(records, 'time_step'):>7.2f} {median(records, 'time_train'):>8.2f} "
              f"{median(records, 'time_rollout'):>9.2f} {throughput(records):>7.0f} "
              f"{median(records, 'routing_agreement'):>9.4f} {median(records, 'mismatch_k3'):>9.2e} "
              f"{median(records, 'routes_bytes_per_sample'):>14.0f}")
    replay, free, bare = results["replay"], results["free"], results["free_no_routes"]
    print(f"\nreplay / free (fp32 engine): step time {median(replay, 'time_step') / median(free, 'time_step'):.3f}, "
          f"train time {median(replay, 'time_train') / median(free, 'time_train'):.3f}")
    print(f"rollout throughput, routes / no routes (fp32, no replay): {throughput(free) / throughput(bare):.3f}")
    b_replay, b_free = results["bf16_replay"], results["bf16_free"]
    print(f"bf16 engine: routing agreement {median(b_free, 'routing_agreement'):.4f} (free), "
          f"{median(b_replay, 'routing_agreement'):.4f} (replay); mismatch_k3 with replay "
          f"{median(b_replay, 'mismatch_k3'):.3e}, without {median(b_free, 'mismatch_k3'):.3e} "
          f"(ratio {median(b_replay, 'mismatch_k3') / median(b_free, 'mismatch_k3'):.3f}); "
          f"medians of {len(b_free)} steps")
    return results


def request_part(model_path: str, prompts_count: int, rounds: int) -> None:
    from rollout_overhead import make_prompts, timed

    from alp_megatron.model.arch import ModelArch
    from alp_megatron.rollout.client import ClientConfig, RolloutClient, model_vocab_size
    from alp_megatron.rollout.engine_control import EngineControl
    from alp_megatron.rollout.sampler import Sampler, SamplerConfig
    from alp_megatron.rollout.server import ServerConfig, SGLangServer
    from alp_megatron.rollout.types import SamplingConfig

    with open(os.path.join(model_path, "config.json")) as handle:
        arch = ModelArch.from_hf_config(json.load(handle))
    shape = (arch.num_layers, arch.moe_topk, arch.num_experts)
    vocab = model_vocab_size(model_path)
    with open(os.path.join(model_path, "config.json")) as handle:
        context = json.load(handle)["max_position_embeddings"]
    new_tokens = min(64, context - 8)
    sampling = SamplingConfig(n=8, max_new_tokens=new_tokens, ignore_eos=True)
    prompts = make_prompts(prompts_count, 8, vocab)
    config = ServerConfig(model_path=model_path, dtype="float32", extra_args=(
        "--enable-return-routed-experts", "--max-total-tokens", "16384", "--max-running-requests", "256",
        "--log-level", "warning"))

    async def rollout(url: str, routes) -> int:
        client = RolloutClient(ClientConfig(urls=[url], vocab_size=vocab, routed_experts=routes))
        sampler = Sampler(client, SamplerConfig(sampling, groups_in_flight=len(prompts), show_progress=False))
        try:
            batch = await sampler.rollout(prompts)
        finally:
            await client.close()
        return batch.num_tokens()

    with SGLangServer(config) as server:
        control = EngineControl(server.url)
        paths = {"routes": lambda: rollout(server.url, shape), "no_routes": lambda: rollout(server.url, None)}
        for path in paths.values():  # warm-up
            timed(path)
        ratios = []
        for round_index in range(rounds):
            rates = {}
            for name in (list(paths) if round_index % 2 == 0 else list(paths)[::-1]):
                control.flush_cache()
                tokens, seconds, _ = timed(paths[name])
                rates[name] = tokens / seconds
            ratios.append(rates["routes"] / rates["no_routes"])
            print(f"round {round_index}: routes {rates['routes']:.0f} tok/s, no routes {rates['no_routes']:.0f} "
                  f"tok/s", flush=True)
    print(f"rollout throughput, routes asked / not, same server (flag on): {statistics.median(ratios):.3f} "
          f"(median of {rounds} interleaved rounds; {prompts_count} groups x 8 x {new_tokens} new tokens)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "bench_moe"))
    parser.add_argument("--parts", default="loop,requests", help="loop, requests or both (requests reads the "
                        "base model the loop part wrote)")
    args = parser.parse_args()
    if "loop" in args.parts:
        loop_part(args.out, args.steps)
    if "requests" in args.parts:
        request_part(os.path.join(f"{args.out}_replay", "base_model"), args.prompts, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
