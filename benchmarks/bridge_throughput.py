"""Weight-sync throughput: Megatron export + load into a real SGLang server, per transport, against a plain copy.

    python benchmarks/bridge_throughput.py [--layers 8 --hidden 1024 --intermediate 2816] [--bucket-mb 256]
                                           [--transports tensor distributed disk] [--repeats 9] [--source megatron]

Builds an HF Llama of a few hundred MB (fp32, offline), starts one SGLang server on it, imports a second
copy with other weights into a one-rank Megatron model, and times each full sync (Megatron export to HF
buckets, pause, session, transport, engine-side load, version check, resume), after one untimed sync per
transport. Against it, in the same run and interleaved: a plain copy of the same bytes (``torch.clone`` of
every parameter for the in-memory transports; a file copy of the safetensors checkpoint for ``disk``).
Prints the median wall time and CPU time of each and their ratios (CPU time counts the trainer and the
server, and is the steadier measure when other jobs share the cores), and the peak extra resident memory
of the trainer process and of the server during a sync.
``--source hf`` buckets the HF tensors directly (no Megatron).
Every process here (this one, the server, the copy helper) runs one OpenMP thread unless ``OMP_NUM_THREADS``
says otherwise, as the CPU runs do (``torchrun`` sets it per rank, ``alp_megatron.demo`` for the whole job):
with two spinning OpenMP threads in each of trainer and server on 2 cores, measured, a sync takes 3-4x as
long and varies 5x from run to run. On a GPU machine a second section times
CUDA IPC (the tensor transport from CUDA tensors) against a device-to-device copy: the same table, with the
model and server on the GPU; here it says why it is skipped.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP; see the docstring
import shutil
import statistics
import tempfile
import threading
import time
from typing import Optional

import torch


class Meter:
    """Wall time, CPU time (user + system, this process and the server's process tree) and the peak resident
    memory above the starting level of each, sampled every few milliseconds.

    CPU seconds do not grow when other jobs share the cores, so their ratio is the steadier one on a busy
    machine; the server's idle CPU use (its scheduler polls) is measured first and subtracted.
    """

    def __init__(self, server_pid: Optional[int], idle_cpu_per_s: float = 0.0, interval_s: float = 0.01):
        import psutil

        self._self = psutil.Process()
        self._server = psutil.Process(server_pid) if server_pid else None
        self._idle = idle_cpu_per_s
        self._interval = interval_s
        self._stop = threading.Event()

    def _tree(self):
        return [self._server] + self._server.children(recursive=True) if self._server else []

    def _sample(self):
        import psutil

        rss, cpu = [self._self.memory_info().rss, 0], [sum(self._self.cpu_times()[:2]), 0.0]
        for proc in self._tree():
            try:
                rss[1] += proc.memory_info().rss
                cpu[1] += sum(proc.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        return rss, cpu

    def __enter__(self):
        self._base_rss, self._base_cpu = self._sample()
        self.peak = list(self._base_rss)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            rss, _ = self._sample()
            self.peak = [max(p, r) for p, r in zip(self.peak, rss)]
            time.sleep(self._interval)
        self._sampler_cpu = time.thread_time()  # the sampling's own CPU, not counted below

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        _, cpu = self._sample()
        trainer = cpu[0] - self._base_cpu[0] - self._sampler_cpu
        self.split = (trainer, max(0.0, cpu[1] - self._base_cpu[1] - self._idle * self.wall))
        self.cpu = sum(self.split)
        self.extra = (self.peak[0] - self._base_rss[0], self.peak[1] - self._base_rss[1])


def idle_cpu_rate(server_pid: int, seconds: float = 2.0) -> float:
    """CPU seconds per second the idle server uses (its scheduler's polling)."""
    meter = Meter(server_pid)
    with meter:
        time.sleep(seconds)
    return meter.split[1] / meter.wall


def make_model(out_dir: str, seed: int, args) -> str:
    from alp_megatron.model.tiny import save_tiny_model

    return save_tiny_model(out_dir, seed=seed, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                           num_key_value_heads=args.hidden // 128, head_dim=64, max_position_embeddings=2048)


def megatron_source(folder: str, bucket_bytes: int):
    """A one-rank Megatron model with ``folder``'s weights; returns (make_buckets, parameters)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    from alp_megatron.alp.perturbation import PerturbationConfig
    from alp_megatron.bridge.export import export_hf_buckets
    from alp_megatron.bridge.hf_folder import arch_from_hf_folder
    from alp_megatron.bridge.hf_import import load_hf_weights
    from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel

    parallel = ParallelConfig()
    initialize_parallel(parallel)
    arch = arch_from_hf_folder(folder)
    chunks = build_model(arch, parallel, ModelConfig(), PerturbationConfig(sigma_0=0.02))
    load_hf_weights(chunks, folder, arch)
    params = [p.detach() for chunk in chunks for n, p in chunk.named_parameters() if "log_sigma" not in n]
    return (lambda: export_hf_buckets(chunks, arch, bucket_bytes)), params


def hf_source(folder: str, bucket_bytes: int):
    from alp_megatron.bridge.export import bucketed

    tensors = _named(folder)

    def make():
        return bucketed(tensors.items(), bucket_bytes)

    return make, list(tensors.values())


def _free_port() -> int:
    from alp_megatron.rollout.process import free_port

    return free_port()


def plain_copy(transport: str, params, folder: str, work: str) -> None:
    """The same bytes copied plainly: a file copy of the checkpoint for ``disk``, else a clone of every tensor."""
    if transport == "disk":
        target = os.path.join(work, "plain-copy")
        shutil.copytree(folder, target)
        shutil.rmtree(target)
    else:
        copies = [p.clone() for p in params]
        del copies[:]


def _copy_out(conn, buffer: torch.Tensor, layout: list) -> None:
    """Helper process of :class:`CrossProcessCopy`: copy bucket ``k`` out of ``buffer`` when told ``k``."""
    own = [[torch.ones(shape, dtype=dtype) for _, shape, dtype in bucket] for bucket in layout]  # touched
    conn.send("ready")
    while (k := conn.recv()) is not None:
        for (offset, shape, dtype), target in zip(layout[k], own[k]):
            nbytes = target.numel() * target.element_size()
            target.copy_(buffer[offset:offset + nbytes].view(dtype).view(shape))
        conn.send(k)


class CrossProcessCopy:
    """The least a move of the weights into another process costs: the trainer writes each bucket into one
    shared buffer (kept, so no page faults), a helper process copies it into tensors of its own (allocated
    and touched once), one pipe round trip per bucket."""

    def __init__(self, params: list[torch.Tensor], bucket_bytes: int):
        from alp_megatron.bridge.export import bucketed
        from alp_megatron.bridge.transports import aligned_order
        from alp_megatron.bridge.transports.tensor import file_system_sharing

        self._buckets = [aligned_order(bucket)
                         for bucket in bucketed(((str(i), p) for i, p in enumerate(params)), bucket_bytes)]
        largest = max(sum(t.numel() * t.element_size() for _, t in bucket) for bucket in self._buckets)
        context = torch.multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        with file_system_sharing():
            self._buffer = torch.zeros(largest, dtype=torch.uint8).share_memory_()
            layout = [[(m.start_idx, tuple(m.shape), m.dtype) for m in self._write(bucket)]
                      for bucket in self._buckets]
            self._process = context.Process(target=_copy_out, args=(child, self._buffer, layout), daemon=True)
            self._process.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the copy helper did not start")

    def _write(self, bucket) -> list:
        """``bucket`` into the shared buffer, laid out as the ``tensor`` transport lays it; its metadata."""
        from alp_megatron.bridge.transports import flatten_bucket

        return flatten_bucket(bucket, allocate=lambda nbytes, device: self._buffer[:nbytes])[1]

    @property
    def pid(self) -> int:
        return self._process.pid

    def copy(self) -> None:
        for k, bucket in enumerate(self._buckets):
            self._write(bucket)
            self._conn.send(k)
            if self._conn.recv() != k:
                raise RuntimeError("the copy helper answered out of turn")

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


def time_export(make_buckets) -> float:
    start = time.perf_counter()
    for bucket in make_buckets():
        del bucket
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--bucket-mb", type=float, default=None, help="default: the trainer's weight_sync.bucket_bytes")
    parser.add_argument("--transports", nargs="+", default=["tensor", "distributed", "disk"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--source", choices=["megatron", "hf"], default="megatron")
    args = parser.parse_args()

    from alp_megatron.bridge.verify import check_weights
    from alp_megatron.config import WeightSyncSection
    from alp_megatron.bridge.weight_sync import EngineSpec, WeightSync, WeightSyncConfig
    from alp_megatron.rollout.engine_control import EngineControl
    from alp_megatron.rollout.server import ServerConfig, SGLangServer

    work = tempfile.mkdtemp(prefix="alp-bridge-bench-")
    try:
        served = make_model(os.path.join(work, "served"), 0, args)
        trainer = make_model(os.path.join(work, "trainer"), 1, args)
        if args.bucket_mb is None:
            args.bucket_mb = WeightSyncSection().bucket_bytes / 2**20
        bucket_bytes = int(args.bucket_mb * 2**20)
        make_buckets, params = (megatron_source if args.source == "megatron" else hf_source)(trainer, bucket_bytes)
        nbytes = sum(p.numel() * p.element_size() for p in params)
        reference = _named(trainer)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        config = ServerConfig(model_path=served, dtype="float32", device=device, log_dir=os.path.join(work, "logs"),
                              startup_timeout_s=600,
                              extra_args=("--max-total-tokens", "4096", "--max-running-requests", "4",
                                          "--context-length", "1024", "--skip-server-warmup", "--log-level", "warning"))
        print(f"model: Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, fp32, "
              f"{nbytes / 2**20:.0f} MiB; buckets of {args.bucket_mb:g} MiB; source: {args.source}; "
              f"device: {device} ({os.cpu_count()} cores visible, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
        with SGLangServer(config) as server:
            export_s = statistics.median(time_export(make_buckets) for _ in range(args.repeats))
            print(f"export alone (iterate every bucket): {export_s:.3f} s "
                  f"({nbytes / 2**30 / export_s:.2f} GiB/s)")
            targets = [torch.empty_like(p) for p in params]
            warm = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for target, p in zip(targets, params):
                    target.copy_(p)
                warm.append(time.perf_counter() - start)
            del targets
            print(f"for reference, copy_ into already-touched memory: {statistics.median(warm):.3f} s "
                  "(the 'copy' columns below clone, i.e. allocate and fill new memory, as any full copy must)")
            idle = idle_cpu_rate(server.pid)
            print(f"server idle CPU use (subtracted from CPU times): {idle:.2f} CPU-s/s")
            floor = CrossProcessCopy(params, bucket_bytes)
            print(f"{'transport':<12} {'sync s':>13} {'copy s':>13} {'ratio':>11}   {'x-proc s':>13} {'ratio':>11}   "
                  f"{'CPU ratio':>9} {'GiB/s':>6} {'trainer +MiB':>12} {'server +MiB':>11}   "
                  "sync CPU-s trainer + server")
            print(f"{'':<12} {'median/best':>13} {'median/best':>13} {'median/best':>11}   {'median/best':>13} "
                  f"{'median/best':>11}   {'median':>9}")
            version = 0
            for name in args.transports:
                options = {"root": os.path.join(work, "disk")} if name == "disk" else {}
                runs = {"sync": [], "copy": [], "floor": []}
                splits, extra = [], (0, 0)
                with WeightSync(WeightSyncConfig(engines=[EngineSpec(server.url)], transport=name,
                                                 transport_options=options, retries=0)) as sync:
                    sync.sync(make_buckets, f"bench-warmup-{name}")  # group, staging buffers, first page faults
                    for _ in range(args.repeats):  # interleaved, so that a busy spell hits all three alike
                        version += 1
                        with Meter(server.pid, idle) as meter:
                            sync.sync(make_buckets, f"bench-{version}")
                        runs["sync"].append((meter.wall, meter.cpu))
                        splits.append(meter.split)
                        extra = tuple(max(a, b) for a, b in zip(extra, meter.extra))
                        with Meter(None) as meter:
                            plain_copy(name, params, trainer, work)
                        runs["copy"].append((meter.wall, meter.cpu))
                        if name != "disk":
                            with Meter(floor.pid) as meter:
                                floor.copy()
                            runs["floor"].append((meter.wall, meter.cpu))
                check = check_weights(EngineControl(server.url), reference, sample=4, rows=8)
                if not check.ok or not check.compared:
                    raise SystemExit(f"{name}: the engine does not serve the exported weights: {check.mismatches}")
                wall = {key: (statistics.median(t for t, _ in r), min(t for t, _ in r)) if r else None
                        for key, r in runs.items()}
                sync_c, copy_c = (statistics.median(c for _, c in runs[key]) for key in ("sync", "copy"))

                def pair(values, digits=3):
                    return "-" if values is None else f"{values[0]:.{digits}f}/{values[1]:.{digits}f}"

                def ratios(reference_key):
                    ref = wall[reference_key]
                    return None if ref is None else (wall["sync"][0] / ref[0], wall["sync"][1] / ref[1])

                print(f"{name:<12} {pair(wall['sync']):>13} {pair(wall['copy']):>13} {pair(ratios('copy'), 2):>11}   "
                      f"{pair(wall['floor']):>13} {pair(ratios('floor'), 2):>11}   {sync_c / copy_c:>9.2f} "
                      f"{nbytes / 2**30 / wall['sync'][0]:>6.2f} {extra[0] / 2**20:>12.0f} {extra[1] / 2**20:>11.0f}   "
                      f"{statistics.median(t for t, _ in splits):.2f} + {statistics.median(e for _, e in splits):.2f}")
            floor.close()
        gpu_section()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _named(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def gpu_section() -> None:
    if torch.cuda.is_available():
        print("on this GPU machine the rows above are the GPU numbers: 'tensor' sends CUDA IPC handles of the "
              "exported CUDA tensors and its 'copy' column is a device-to-device clone of every parameter")
    else:
        print("GPU section skipped: no CUDA device here. CUDA IPC handles, NCCL and a GPU SGLang server need one; "
              "run this script on a GPU machine for CUDA IPC vs device-to-device copy")


if __name__ == "__main__":
    main()
