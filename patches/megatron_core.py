"""Runtime patches that let megatron-core run on CPU with gloo (no CUDA device).

Upstream limitation: megatron-core assumes a CUDA device. It calls ``torch.cuda.*`` directly (current
device, streams, RNG state), creates tensors with literal ``device="cuda"``, checks parameter types
against ``torch.cuda.*Tensor`` strings, and has three code paths that only work on GPU/NCCL (MoE router
without Transformer Engine on 0.16, alltoall split sizes kept as tensors on CPU, uneven ``all_gather``
that gloo rejects). Without these patches nothing beyond ``initialize_model_parallel`` runs on CPU.

The patches are applied only when ``torch.cuda.is_available()`` is False; on a machine with CUDA
``apply()`` changes nothing. Each patch names the megatron-core versions it was verified against and is
skipped outside them (a version outside the whole supported range is refused with an error). No file in
site-packages is edited. ``tests/patches/test_megatron_core.py`` shows, per patch, that the megatron
code path fails without it and works with it.

| id | what | needed by |
|----|------|-----------|
| P1 | ``torch.cuda.current_device`` -> "cpu"; ``synchronize``/``empty_cache`` and ``.cuda()`` /
|    | ``record_stream`` become no-ops | global memory buffer, SP/p2p buffers |
| P2 | stand-in ``torch.cuda.Stream``/``Event``/``current_stream``/``default_stream``/``stream`` | MoE alltoall |
| P3 | megatron's "CUDA" RNG state and tracker run on the CPU default generator | seeds, dropout forks, recompute |
| P4 | factory calls with ``device="cuda"`` (or an int) make CPU tensors; ``pin_memory`` off | schedules, optimizers |
| P5 | ``Tensor.type()`` without argument reports ``torch.cuda.*Tensor`` | distributed optimizer, clip_grads |
| P6 | ``moe_utils.te_general_gemm = None`` where the name is missing (0.16 bug without TE) | MoE router |
| P7 | ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` also converts CPU tensors | MoE alltoall split sizes |
| P8 | uneven ``_gather_along_first_dim``: pad, ``all_gather_into_tensor``, slice | MoE alltoall with TP > 1 |

One more patch corrects a bug, so it is applied on every machine, CUDA or not (``apply_fixes()``):

| P9 | optimizer param groups are matched on load by ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``
|    | only (< 0.19). Two groups that differ only in ``max_lr``/``min_lr`` (the ``log_sigma`` group beside the
|    | default group) collapse into one and loading a checkpoint fails with "loaded state dict contains a
|    | parameter group that doesn't match the size of optimizer's group". 0.19 adds the LR fields to the
|    | identifier; P9 does the same on older releases. | resuming any ALP checkpoint |
"""

from __future__ import annotations

import contextlib
import logging
import types
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from packaging.version import Version

logger = logging.getLogger(__name__)

SUPPORTED = (Version("0.16.1"), Version("0.20.0"))  # [low, high)


@dataclass(frozen=True)
class Patch:
    ident: str
    summary: str
    min_version: Version
    max_version: Version  # exclusive
    install: Callable[[], None]

    def covers(self, version: Version) -> bool:
        return self.min_version <= version < self.max_version


_applied: list[str] = []


def megatron_core_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


def applied() -> tuple[str, ...]:
    """Ids of the patches installed in this process, in order."""
    return tuple(_applied)


def apply(exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """Install every patch that covers the installed megatron-core, once per process.

    Does nothing when CUDA is available. ``exclude`` leaves named patches out (the tests use it to
    show each patch is needed). Returns the ids installed by this call.
    """
    if torch.cuda.is_available() or _applied:
        return ()
    version = megatron_core_version()
    if not (SUPPORTED[0] <= version < SUPPORTED[1]):
        raise RuntimeError(
            f"megatron-core {version} is outside the range the CPU patches were verified on "
            f"({SUPPORTED[0]} <= version < {SUPPORTED[1]}); install a version in that range "
            "(see setup.py) or run on a CUDA machine, where no patch is needed"
        )
    skipped = set(exclude)
    for patch in PATCHES:
        if patch.ident in skipped:
            continue
        if not patch.covers(version):
            logger.debug("patch %s not needed for megatron-core %s", patch.ident, version)
            continue
        patch.install()
        _applied.append(patch.ident)
    return tuple(_applied)


_fixes_applied: list[str] = []


def apply_fixes() -> tuple[str, ...]:
    """Install the correctness fixes (P9) that cover the installed megatron-core, on every machine."""
    if _fixes_applied:
        return ()
    version = megatron_core_version()
    for patch in FIXES:
        if patch.covers(version):
            patch.install()
            _fixes_applied.append(patch.ident)
    return tuple(_fixes_applied)


def fixes_applied() -> tuple[str, ...]:
    return tuple(_fixes_applied)


# ----------------------------------------------------------------------------------------------
# P1: device queries and .cuda() on a CPU-only build


def _install_p1() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, stream: None
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


# ----------------------------------------------------------------------------------------------
# P2: streams and events


class _CpuStream:
    """Stands in for ``torch.cuda.Stream``; CPU work is synchronous, so every wait is immediate."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


def _install_p2() -> None:
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda *args, **kwargs: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda *args, **kwargs: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# P3: RNG. On a CPU build torch.cuda's RNG calls raise, and setting a state is queued lazily and never
# runs, so megatron's tracker would silently never switch state. Route both to the CPU generator.


def _install_p3() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which must stay torch's own no-op.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(
        new_state
    )


# ----------------------------------------------------------------------------------------------
# P4: literal device="cuda" in factory calls. Every imported megatron.core module's global ``torch`` is
# replaced by a view of torch whose factory functions rewrite the device. (A global TorchFunctionMode
# would also work but is switched off inside handlers such as torch.autograd.backward, which is exactly
# where activation recomputation re-runs forward code.)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "eye", "as_tensor",
    "zeros_like", "ones_like", "empty_like", "full_like",
)

# Imported before the rewrite so that the modules we run are covered.
_MEGATRON_MODULES = (
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.dist_checkpointing",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.tensor_parallel.data",
)


def _names_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _on_cpu(factory):
    def factory_on_cpu(*args, **kwargs):
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)

    return factory_on_cpu


class _TorchWithCpuFactories(types.ModuleType):
    """``torch`` as seen by megatron modules: the same module, but factories never target CUDA."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _install_p4() -> None:
    import importlib
    import sys

    for name in _MEGATRON_MODULES:
        importlib.import_module(name)
    view = _TorchWithCpuFactories()
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = view


# ----------------------------------------------------------------------------------------------
# P5: type strings


_original_tensor_type = torch.Tensor.type


def _tensor_type_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _install_p5() -> None:
    torch.Tensor.type = _tensor_type_as_cuda


# ----------------------------------------------------------------------------------------------
# P6: megatron-core 0.16 references te_general_gemm in the router even when TE is absent


def _install_p6() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------------------------
# P7: alltoall split sizes must be numpy/lists for gloo's all_to_all_single binding


def _install_p7() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ----------------------------------------------------------------------------------------------
# P8: gloo's all_gather rejects unequal per-rank sizes (NCCL accepts them)


def _install_p8() -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(size) for size in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        pieces = [gathered[rank * longest : rank * longest + size] for rank, size in enumerate(sizes)]
        return torch.cat(pieces, dim=0)

    mappings._gather_along_first_dim = _gather_along_first_dim


# ----------------------------------------------------------------------------------------------
# P9: param groups that differ only in their LR range are told apart on checkpoint load


def _install_p9() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    # Every group built by megatron.core.optimizer._get_param_groups carries max_lr and min_lr.
    keys = tuple(optimizer.param_group_identifier_keys) + ("max_lr", "min_lr")
    optimizer.param_group_identifier_keys = keys
    distrib_optimizer.param_group_identifier_keys = keys  # imported by name there


_ALL = (Version("0.16.1"), Version("0.20.0"))

PATCHES: tuple[Patch, ...] = (
    Patch("P1", "device queries and .cuda() on CPU", *_ALL, _install_p1),
    Patch("P2", "stand-in CUDA streams and events", *_ALL, _install_p2),
    Patch("P3", "megatron RNG tracker on the CPU generator", *_ALL, _install_p3),
    Patch("P4", "device='cuda' factory calls make CPU tensors", *_ALL, _install_p4),
    Patch("P5", "Tensor.type() reports torch.cuda.*Tensor", *_ALL, _install_p5),
    Patch("P6", "te_general_gemm defined as None without TE", Version("0.16.1"), Version("0.19.0"),
          _install_p6),
    Patch("P7", "alltoall split sizes to numpy on CPU", *_ALL, _install_p7),
    Patch("P8", "uneven all_gather on gloo", *_ALL, _install_p8),
)

FIXES: tuple[Patch, ...] = (
    Patch("P9", "param groups told apart by max_lr/min_lr on load", Version("0.16.1"), Version("0.19.0"),
          _install_p9),
)
