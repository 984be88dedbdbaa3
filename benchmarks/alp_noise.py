"""ALP noise per rank: the blocks a rank draws for its own rows against a full-sequence draw, side by side.

    python benchmarks/alp_noise.py [--tokens 8192 --hidden 1024 --vocab 32768 --repeats 5]

For one sample of ``--tokens`` tokens and one layer, each layout's rank 0 draws its noise two ways,
interleaved: as :class:`~alp_megatron.alp.perturbation.NoiseSource` does (only the row and column blocks that
overlap the rank's shard), and as a full-sequence draw that every rank makes and then slices (the previous
scheme: ``randn(tokens, width)`` per sample and layer). Printed per layout: noise values generated per rank
(local / full) and the median time ratio. The logits-only target is measured the same way on the
vocabulary (``--vocab`` columns, split by tensor parallelism). CPU times: read the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from alp_megatron.alp.perturbation import ColumnShard, NoiseKey, NoiseSource, SequenceShard, noise_seed


def full_draw(shard: SequenceShard, tokens: int, width: int, columns: ColumnShard) -> torch.Tensor:
    """The full-sequence scheme: the whole sample's noise, then this rank's rows and columns."""
    generator = torch.Generator().manual_seed(noise_seed(1, 0, 0, 0))
    full = torch.randn(tokens, columns.full_width, generator=generator)[:, columns.start : columns.start + width]
    local = shard.local_length(tokens)
    return torch.cat([full[start : start + length] for _, start, length in shard.runs(local)])


def measure(shard: SequenceShard, tokens: int, width: int, columns: ColumnShard, repeats: int) -> dict:
    local = shard.local_length(tokens)
    key = NoiseKey(0, (0,))
    blocks, full = [], []
    for _ in range(repeats):
        source = NoiseSource(seed=1)
        start = time.perf_counter()
        source.draw(key, 0, shard, torch.Size([local, 1, width]), "cpu", columns)
        blocks.append(time.perf_counter() - start)
        start = time.perf_counter()
        full_draw(shard, tokens, width, columns)
        full.append(time.perf_counter() - start)
    return {"local_values": source.drawn_elements, "full_values": tokens * columns.full_width,
            "time_ratio": statistics.median(blocks) / statistics.median(full)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--logits-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hidden = ColumnShard(0, args.hidden)
    layouts = [
        ("SP=2", SequenceShard(tp_size=2, sequence_parallel=True), args.tokens, args.hidden, hidden),
        ("CP=2", SequenceShard(cp_size=2), args.tokens, args.hidden, hidden),
        ("CP=4", SequenceShard(cp_size=4), args.tokens, args.hidden, hidden),
        ("CP=2 x SP=2", SequenceShard(cp_size=2, tp_size=2, sequence_parallel=True), args.tokens, args.hidden, hidden),
    ]
    for tp in (2, 4, 8):
        width = args.vocab // tp
        layouts.append((f"logits TP={tp}", SequenceShard(), args.logits_tokens, width, ColumnShard(0, args.vocab)))
    print(f"one sample, one layer; rank 0 of each layout; {args.repeats} interleaved repeats; CPU, 1 thread")
    print(f"{'layout':<18} {'values local':>13} {'values full':>12} {'local/full':>10} {'time ratio':>10}")
    for name, shard, tokens, width, columns in layouts:
        result = measure(shard, tokens, width, columns, args.repeats)
        share = result["local_values"] / result["full_values"]
        print(f"{name:<18} {result['local_values']:>13,} {result['full_values']:>12,} {share:>10.3f} "
              f"{result['time_ratio']:>10.3f}")


if __name__ == "__main__":
    main()
