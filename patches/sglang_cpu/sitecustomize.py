"""Two stand-ins for SGLang 0.5.23 servers on CPU (imported by Python at start-up from this folder).

**Host buffers without CUDA.** Upstream limitation: SGLang allocates the host buffers of its state capturers
(``--enable-return-routed-experts``: the routed experts of every token, ``state_capturer/base.py``) through
``ALLOC_MEMORY_FUNCS[device]``, whose default for every device but npu/musa/xpu is
``alloc_with_host_register``: it pins the buffer with ``cudaHostRegister``, so a CPU server started with that
flag dies at start-up. This stand-in makes ``ALLOC_MEMORY_FUNCS["cpu"]`` allocate the same buffer through the
given allocator, unpinned (there is no device to pin it for). Always installed from this folder, which is on a
server's path only without a GPU.

**Seeded sampling.** Upstream limitation: SGLang honours a request's ``sampling_params.sampling_seed`` only under
``--enable-deterministic-inference``, which refuses every CPU attention backend. On CPU a seed is silently
ignored and tokens come from the scheduler's global generator, so the same request gives different samples
from run to run (and after a server restart), and an RL run cannot be reproduced or resumed exactly.

This stand-in fills ``SamplingBatchInfo.sampling_seed`` for every batch, from each request's own seed (or a
fresh random one for unseeded requests), so SGLang's own seeded sampler (``multinomial_with_seed``: a Gumbel
draw from per-(seed, position, token) uniforms) is used. Its uniforms come from a MurmurHash kernel that on
CPU exists only in the CPU build of sgl-kernel; here they come from a torch generator seeded per (seed,
position) instead. A seeded request then gives the same tokens whatever it is batched with. Only when
``ALP_SGLANG_SEEDED_SAMPLING=1``.

Both only for sglang 0.5.23 (any other version: a warning, nothing changed). They live beside the other CPU
stand-ins, which go on the server's PYTHONPATH only when there is no GPU.
"""

import os
import sys

_BATCH_INFO = "sglang.srt.sampling.sampling_batch_info"
_SAMPLER = "sglang.srt.layers.sampler"
_HOST_POOL = "sglang.srt.mem_cache.pool_host.common"


def _install_host_buffers(module) -> None:
    import torch

    def alloc_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
        """The buffer ``alloc_with_host_register`` would make, without registering (pinning) it."""
        if allocator is None:
            return torch.empty(dims, dtype=dtype, device=device)
        return allocator.allocate(dims, dtype=dtype, device=device)

    module.ALLOC_MEMORY_FUNCS["cpu"] = alloc_unpinned


def _row_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed from (request seed, token position), well mixed (splitmix64 steps)."""
    value = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    for _ in range(2):
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value >> 1


def _install_uniforms(module) -> None:
    import torch

    hash_on_gpu = module.murmur_hash32

    def uniforms_uint32(seed, positions, col_indices):
        """``[n, m]`` integers uniform in [0, 2**32), one row per (seed, position), on CPU."""
        if seed.device.type != "cpu":
            return hash_on_gpu(seed, positions, col_indices)
        rows = []
        for row_seed, position in zip(seed.to(torch.int64).tolist(), positions.to(torch.int64).tolist()):
            generator = torch.Generator().manual_seed(_row_seed(row_seed, position))
            rows.append(torch.randint(0, 2**32, (col_indices.numel(),), generator=generator, dtype=torch.int64))
        return torch.stack(rows) if rows else torch.empty((0, col_indices.numel()), dtype=torch.int64)

    module.murmur_hash32 = uniforms_uint32


def _install_seeds(module) -> None:
    import random

    import torch

    cls = module.SamplingBatchInfo
    original = cls.from_schedule_batch.__func__

    def from_schedule_batch(klass, batch, vocab_size):
        info = original(klass, batch, vocab_size)
        if info.sampling_seed is None:
            seeds = [r.sampling_params.sampling_seed if r.sampling_params.sampling_seed is not None
                     else random.getrandbits(62) for r in batch.reqs]
            info.sampling_seed = torch.tensor(seeds, dtype=torch.int64, device=batch.device)
        return info

    cls.from_schedule_batch = classmethod(from_schedule_batch)


class _PatchOnImport:
    """A meta-path hook: once one of the SGLang modules of ``_INSTALLERS`` is loaded, apply its stand-in."""

    def find_spec(self, name, path=None, target=None):
        if name not in _INSTALLERS:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                from importlib.metadata import version

                installed = version("sglang")
            except Exception:  # noqa: BLE001 - no metadata: leave SGLang as it is
                return
            if installed != "0.5.23":
                sys.stderr.write(f"alp-megatron: the CPU stand-in for {name} is verified on sglang 0.5.23 only, "
                                 f"not {installed}; it is not applied\n")
                return
            _INSTALLERS[name](module)

        loader.exec_module = exec_module
        return spec


_INSTALLERS = {_HOST_POOL: _install_host_buffers}
if os.environ.get("ALP_SGLANG_SEEDED_SAMPLING") == "1":
    _INSTALLERS.update({_BATCH_INFO: _install_seeds, _SAMPLER: _install_uniforms})
sys.meta_path.insert(0, _PatchOnImport())
