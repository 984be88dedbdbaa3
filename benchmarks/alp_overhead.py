"""Training-step time and activation memory with ALP on vs off, same model and data, interleaved.

    python benchmarks/alp_overhead.py [--steps 30] [--layers 4 --hidden 256 --seq 128 --batch 4]

Prints the median step time of each (ALP on / off, alternating step by step so both see the same machine
state), their ratio, and the bytes autograd saves for backward in one forward with ALP on vs off (the extra
memory ALP costs: the fp32 noise kept for the log_sigma gradient). Absolute times mean something only on a
GPU; on CPU read the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def saved_bytes(run_forward) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29581")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")

    from alp_megatron.alp.loss import LossConfig, policy_loss
    from alp_megatron.alp.perturbation import PerturbationConfig, alp_disabled, set_microbatch
    from alp_megatron.model.arch import ModelArch
    from alp_megatron.model.logprobs import shift_targets, token_logprobs
    from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel
    from alp_megatron.trainer.step import OptimizerSettings, build_optimizer, train_step, wrap_ddp

    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": args.hidden, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 4 * args.hidden, "num_hidden_layers": args.layers,
          "vocab_size": 1024, "max_position_embeddings": args.seq, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
          "tie_word_embeddings": False}
    parallel = ParallelConfig()
    initialize_parallel(parallel)
    torch.manual_seed(0)
    arch = ModelArch.from_hf_config(hf)
    alp = PerturbationConfig(sigma_0=0.02)
    chunks = build_model(arch, parallel, ModelConfig(), alp)
    settings = OptimizerSettings(lr=1e-5)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, alp)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.randint(0, arch.vocab_size, (args.batch, args.seq), device=device)
    batch = dict(tokens=tokens, targets=shift_targets(tokens), position_ids=torch.arange(args.seq, device=device)
                 .expand(args.batch, -1), loss_mask=torch.ones(args.batch, args.seq, device=device),
                 rollout_logprobs=torch.full((args.batch, args.seq), -6.9, device=device),
                 advantages=torch.linspace(-1, 1, args.batch, device=device), sample_ids=list(range(args.batch)))
    cfg = LossConfig(method="alp_seq")

    def loss_function(logits, micro):
        logprobs = token_logprobs(logits, micro["targets"])
        loss, _ = policy_loss(logprobs, micro["rollout_logprobs"], micro["advantages"], micro["loss_mask"], cfg)
        units = micro["loss_mask"].sum()
        return loss * units, units.to(torch.int), {"loss_sum": (loss * units).detach(), "num_units": units}

    def step(alp_on: bool, index: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if alp_on:
            train_step(ddp, optimizer, scheduler, [batch], loss_function, index, args.seq)
        else:
            with alp_disabled(*chunks):
                train_step(ddp, optimizer, scheduler, [batch], loss_function, index, args.seq)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {True: [], False: []}
    for index in range(args.warmup + args.steps):
        for alp_on in ((True, False) if index % 2 else (False, True)):
            elapsed = step(alp_on, index)
            if index >= args.warmup:
                times[alp_on].append(elapsed)

    model = chunks[0]

    def forward():
        set_microbatch(model, 0, batch["sample_ids"])
        model(batch["tokens"], batch["position_ids"], None).sum()

    with_alp = saved_bytes(forward)
    with alp_disabled(model):
        without_alp = saved_bytes(forward)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device_name}; model: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"batch {args.batch}; {args.steps} steps each, interleaved")
    print(f"median step time  ALP on: {on * 1e3:.1f} ms   ALP off: {off * 1e3:.1f} ms   ratio on/off: {on / off:.3f}")
    print(f"saved activations ALP on: {with_alp / 2**20:.2f} MiB   off: {without_alp / 2**20:.2f} MiB   "
          f"extra: {(with_alp - without_alp) / 2**20:.2f} MiB ({with_alp / without_alp - 1:+.1%})")


if __name__ == "__main__":
    main()
