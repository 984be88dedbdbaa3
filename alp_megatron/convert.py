"""``alp-convert``: Hugging Face checkpoint <-> Megatron dist-checkpoint.

    alp-convert hf-to-mcore --hf HF_DIR --out CKPT_DIR --tp N --pp N [--ep N]
    alp-convert mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--tp N --pp N --ep N] [--dtype bfloat16]
    (both: [--progress-every-s S], progress lines on rank 0's stderr)

Launch ``tp x pp x ep`` ranks: ``torchrun --nproc_per_node <world> -m alp_megatron.convert ...``; one rank
runs without torchrun. The Megatron checkpoint loads at any layout, so the two directions may use
different ones. Bad input (missing files, an unsupported architecture, tensors that do not fit, a world
size that does not match) stops with one message naming the file or flag and the fix, and writes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time
from typing import Callable, Iterator, Optional

from alp_megatron.errors import AlpError, ConfigError
from alp_megatron.progress import ByteProgress

DTYPES = ("float32", "bfloat16", "float16")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.command(args)
    except AlpError as error:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank raises the same error; print it once
            print(f"alp-convert: error: {error}", file=sys.stderr)
        return 2
    finally:
        _shutdown()
    return 0


def hf_to_mcore(args: argparse.Namespace) -> None:
    """Read the HF folder on every rank (each rank its own shards) and save a Megatron dist-checkpoint."""
    from alp_megatron.bridge.checkpoint import save_megatron_checkpoint
    from alp_megatron.bridge.hf_folder import output_folder_problem, read_hf_config
    from alp_megatron.bridge.hf_import import load_hf_weights, weight_map
    from alp_megatron.model.arch import ModelArch

    config = read_hf_config(args.hf)
    arch = ModelArch.from_hf_config(config)
    parallel = _parallel(args, arch)
    weight_map(args.hf)  # index and shard files present
    _refuse_output(output_folder_problem(args.out))
    chunks = _build(arch, parallel, config)
    say = _say_on_rank0()
    say(f"{arch.architecture} from {args.hf} at tp={args.tp} pp={args.pp} ep={args.ep}")
    loading = ByteProgress("loading rank 0's shards of the HF weights", say, args.progress_every_s)
    load_hf_weights(chunks, args.hf, arch, progress=loading)
    loading.done()
    with _phase(say, f"writing the Megatron checkpoint {args.out}"):
        save_megatron_checkpoint(chunks, args.out, args.hf)


def mcore_to_hf(args: argparse.Namespace) -> None:
    """Load a converter checkpoint at the given layout and write an HF folder (rank 0 writes)."""
    import torch

    from alp_megatron.bridge.checkpoint import checkpoint_hf_folder, load_megatron_checkpoint
    from alp_megatron.bridge.hf_folder import output_folder_problem, read_hf_config, save_hf_folder
    from alp_megatron.model.arch import ModelArch

    hf_dir = checkpoint_hf_folder(args.ckpt)
    config = read_hf_config(hf_dir)
    arch = ModelArch.from_hf_config(config)
    parallel = _parallel(args, arch)
    _refuse_output(output_folder_problem(args.out))
    chunks = _build(arch, parallel, config)
    say = _say_on_rank0()
    with _phase(say, f"loading the Megatron checkpoint {args.ckpt} at tp={args.tp} pp={args.pp} ep={args.ep}"):
        load_megatron_checkpoint(chunks, args.ckpt)
    dtype = getattr(torch, args.dtype or _config_dtype(config))
    writing = ByteProgress(f"gathering and writing the HF folder {args.out}", say, args.progress_every_s)
    save_hf_folder(chunks, hf_dir, args.out, tokenizer_dir=hf_dir, dtype=dtype, progress=writing)
    writing.done()


def _say_on_rank0() -> Callable[[str], None]:
    """Writes progress lines on rank 0's stderr; the other ranks do the same work and stay quiet."""
    from alp_megatron.bridge.hf_folder import is_rank0

    quiet = not is_rank0()

    def say(line: str) -> None:
        if not quiet:
            print(f"alp-convert: {line}", file=sys.stderr, flush=True)

    return say


@contextlib.contextmanager
def _phase(say: Callable[[str], None], what: str) -> Iterator[None]:
    """A line when a single long step (a dist-checkpoint save or load) starts, and one with its time."""
    started = time.monotonic()
    say(f"{what} ...")
    yield
    say(f"{what}: done in {time.monotonic() - started:.1f} s")


def _parallel(args: argparse.Namespace, arch):
    """The layout, checked against the model and the launched world size."""
    from alp_megatron.model.provider import ParallelConfig

    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp, expert_parallel=args.ep)
    parallel.check_model(arch)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    needed = args.tp * args.pp * args.ep
    if world != needed:
        raise ConfigError(
            "--tp/--pp/--ep", f"{world} ranks were launched but --tp x --pp x --ep = {needed}",
            f"launch `torchrun --nproc_per_node {needed} -m alp_megatron.convert ...`, or change the sizes",
        )
    return parallel


def _build(arch, parallel, config: dict) -> list:
    """Start the process group (one local rank without torchrun) and build the model, ALP off."""
    import torch
    import torch.distributed as dist

    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.model.provider import ModelConfig, build_model, initialize_parallel

    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    initialize_parallel(parallel)
    # bf16 checkpoints stay bf16 (exact round trip); anything else is held in fp32, which holds fp16 exactly
    model = ModelConfig(dtype="bfloat16" if _config_dtype(config) == "bfloat16" else "float32")
    return build_model(arch, parallel, model, PerturbationConfig(enabled=False))


def _config_dtype(config: dict) -> str:
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in DTYPES else "float32"


def _refuse_output(problem) -> None:
    if problem is not None:
        from alp_megatron.bridge.mapping import WeightMappingError

        raise WeightMappingError(*problem.args)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alp-convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="{hf-to-mcore,mcore-to-hf}")

    to_mcore = commands.add_parser("hf-to-mcore", help="HF folder -> Megatron dist-checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF folder: config.json, *.safetensors, tokenizer")
    to_mcore.add_argument("--out", required=True, help="new checkpoint folder (must not exist or be empty)")
    to_mcore.set_defaults(command=hf_to_mcore)

    to_hf = commands.add_parser("mcore-to-hf", help="Megatron dist-checkpoint -> HF folder")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint folder written by hf-to-mcore")
    to_hf.add_argument("--out", required=True, help="new HF folder (must not exist or be empty)")
    to_hf.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: config.json's dtype)")
    to_hf.set_defaults(command=mcore_to_hf)

    for sub, required in ((to_mcore, True), (to_hf, False)):
        sub.add_argument("--tp", type=int, required=required, default=1, help="tensor-parallel size")
        sub.add_argument("--pp", type=int, required=required, default=1, help="pipeline-parallel size")
        sub.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE)")
        sub.add_argument("--progress-every-s", type=float, default=10.0, metavar="S",
                         help="a progress line on stderr at most every S seconds (default 10; 0: every tensor)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
