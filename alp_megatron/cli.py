"""``alp-train``: run ALP RL post-training from one YAML config.

    alp-train --config examples/cpu_tiny.yaml [--steps N] [--output-dir DIR] [--resume] [section.key=value ...]
    torchrun --nproc_per_node 2 -m alp_megatron.cli --config examples/cpu_tiny.yaml

Under ``torchrun`` (or ``srun torchrun``) every rank runs it; without torchrun it runs as a single rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Optional

from alp_megatron.errors import AlpError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alp-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: the built-in defaults)")
    parser.add_argument("--steps", type=int, help="RL steps to run (run.steps)")
    parser.add_argument("--output-dir", help="checkpoints, metrics.jsonl, logs, HF export (run.output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config and overrides, print the resolved config, and exit (starts nothing)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def _single_rank_environment() -> None:
    """torch.distributed's env:// variables for a run started without torchrun."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after the options
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    from alp_megatron.config import load_run_config

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"run.steps={args.steps}")
    if args.output_dir is not None:
        overrides.append(f"run.output_dir={args.output_dir}")
    try:
        config = load_run_config(args.config, tuple(overrides))
        if args.check_config:
            from alp_megatron.run.build import check_run_inputs

            check_run_inputs(config)
    except AlpError as error:
        print(f"alp-train: {error}", file=sys.stderr)
        return 2
    if args.check_config:
        import yaml

        from alp_megatron.config_loading import to_dict

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    from alp_megatron.launcher_watch import follow_launcher

    watch = None
    try:
        watch = follow_launcher()
        _single_rank_environment()
        from alp_megatron.run.loop import run

        run(config, resume=args.resume)
    except BaseException as error:
        if watch is not None and watch.launcher_gone():  # whatever broke, it broke because the launcher died
            logging.getLogger("alp-train").error("stopped: the launcher (pid %d) is gone (%s)", watch.launcher_pid,
                                                 type(error).__name__)
            return 1
        if not isinstance(error, AlpError):
            raise
        logging.getLogger("alp-train").error("%s", error)
        return 1
    finally:
        if watch is not None:
            watch.disarm()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
