"""The embedded CPU default: ALP RL on a tiny model, end to end, on any laptop.

    python -m alp_megatron.demo [--steps N] [--output-dir DIR] [--nproc 2] [section.key=value ...]

It runs ``examples/cpu_tiny.yaml``: a tiny char-level Llama built
offline and warm-started on reversing 4 digits, a real SGLang server on CPU generating the rollouts, the
Megatron trainer with ALP at TP=2 (two ranks under torchrun), the bridge pushing the weights into SGLang
after every step. It ends with a table and a PNG of reward, sequence-ratio tail and sigma per step.
Running it again continues the same run (``--resume``); delete the output directory for a fresh one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# The repository's examples/ folder (a source checkout or an editable install).
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cpu_tiny.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--output-dir", default="runs/cpu_tiny")
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks (the config's TP=2 needs 2)")
    args, overrides = parser.parse_known_args(argv)
    if not os.path.isfile(args.config):
        print(f"alp-demo: config {args.config} not found; pass --config examples/cpu_tiny.yaml from a checkout",
              file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "alp_megatron.cli", "--config", args.config, "--output-dir", args.output_dir, "--resume"]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    command += overrides
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("running:", " ".join(command), flush=True)
    code = subprocess.call(command, env=environment)
    if code != 0:
        return code
    from alp_megatron.report import summarize

    text, path = summarize(args.output_dir)
    print(text)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
