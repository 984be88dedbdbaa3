"""Rank-side code of the bridge tests, and the tiny HF folders they use.

The parent test builds HF folders (random weights with O(1) logits) and transformers' own logits; the
ranks import the folder into Megatron under a layout, run the forward and the export, and return plain
data (logits, exported names, mismatches) for the test to assert on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from alp_megatron.alp.perturbation import PerturbationConfig
from alp_megatron.model.provider import ModelConfig, ParallelConfig, build_model, initialize_parallel

BATCH, SEQ = 2, 16
ALP = PerturbationConfig(sigma_0=0.1)  # on, so log_sigma parameters exist; eval() switches the noise off


# ----------------------------------------------------------------------------------------------------------
# HF side (parent process)


def make_hf_folder(out_dir: str, architecture: str, seed: int, vocab_size: Optional[int] = None,
                   **overrides) -> str:
    """A tiny HF folder whose weights give O(1) logits: linear weights N(0, 1/fan_in), norms 1 + 0.2 N,
    biases 0.1 N, embeddings N(0, 1). Written with transformers' ``save_pretrained`` layout."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from alp_megatron.model.tiny import save_tiny_model

    fields = dict(num_hidden_layers=4)
    fields.update(overrides)
    save_tiny_model(out_dir, architecture, seed=seed, vocab_size=vocab_size, **fields)
    path = os.path.join(out_dir, "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    with safe_open(path, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    for name, tensor in tensors.items():
        noise = torch.randn(tensor.shape, generator=gen)
        if "norm" in name:
            tensors[name] = 1.0 + 0.2 * noise
        elif name.endswith("bias"):
            tensors[name] = 0.1 * noise
        elif "embed_tokens" in name or "lm_head" in name:
            tensors[name] = noise
        else:
            tensors[name] = noise / tensor.shape[1] ** 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return out_dir


def tokens_for(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def hf_logits(folder: str) -> torch.Tensor:
    """transformers' own fp32 eager forward on :func:`tokens_for`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens_for(model.config.vocab_size)).logits


def hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (one file or shards with an index)."""
    from alp_megatron.bridge.hf_import import HFWeights

    with HFWeights(folder) as weights:
        return {name: weights.get_slice(name)[:] for name in weights.names()}


def save_sharded_copy(folder: str, out_dir: str, max_shard_size: str) -> str:
    """``folder`` saved again by transformers in shards with an index."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------------------
# Megatron side (ranks)


@dataclasses.dataclass(frozen=True)
class Case:
    """One model under one layout."""

    layout: str
    model: str  # key of the test's HF folders
    parallel: ParallelConfig
    bucket_bytes: int = 40_000
    dtype: Optional[torch.dtype] = None  # export cast
    save_as: Optional[str] = None  # key of a folder to write with save_hf_folder (in shards)
    alp: PerturbationConfig = ALP  # the ALP parameters the model carries (never imported or exported)


def build(folder: str, parallel: ParallelConfig, model: ModelConfig = ModelConfig(), alp: PerturbationConfig = ALP):
    from alp_megatron.bridge.hf_folder import arch_from_hf_folder

    initialize_parallel(parallel, seed=1234)
    torch.manual_seed(1234)
    arch = arch_from_hf_folder(folder)
    return arch, build_model(arch, parallel, model, alp)


def megatron_logits(chunks: list, arch) -> Optional[torch.Tensor]:
    """Logits ``[b, s, vocab]`` (padding stripped) on the last pipeline stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    tokens = tokens_for(arch.vocab_size)
    positions = torch.arange(SEQ).unsqueeze(0)
    samples = [tokens[i : i + 1] for i in range(BATCH)]  # one sample per micro-batch (virtual stages need >= PP)

    def forward_step(data_iterator, model):
        output = model(next(data_iterator), positions, None, runtime_gather_output=True)
        return output, lambda logits, non_loss_data=True: logits.detach().clone()

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter(samples) for _ in chunks] if len(chunks) > 1 else iter(samples),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=BATCH, seq_length=SEQ, micro_batch_size=1,
            forward_only=True, collect_non_loss_data=True,
        )
    return torch.cat(outputs) if outputs else None


def parameters(chunks: list) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, chunk in enumerate(chunks) for n, p in chunk.named_parameters()}


def export_report(chunks: list, arch, reference: dict, bucket_bytes: int, dtype=None) -> dict:
    """Export every bucket and compare each tensor with the HF file (torch.equal, dtype included)."""
    from alp_megatron.bridge.export import export_hf_buckets

    names, mismatched, bucket_sizes, oversize_alone = [], [], [], True
    for bucket in export_hf_buckets(chunks, arch, bucket_bytes, dtype=dtype):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        bucket_sizes.append(size)
        oversize_alone &= size <= bucket_bytes or len(bucket) == 1
        for name, tensor in bucket:
            names.append(name)
            want = reference.get(name)
            if want is not None and dtype is not None:
                want = want.to(dtype)
            if want is None or tensor.dtype != want.dtype or not torch.equal(tensor, want):
                mismatched.append(name)
        del bucket
    return dict(names=names, mismatched=mismatched, bucket_sizes=bucket_sizes, bucket_rule=oversize_alone)


SAVED_SHARD_BYTES = 60_000


def run_case(case: Case, folders: dict) -> dict:
    """Import the case's folder under its layout; report logits, export and what the import left alone;
    write the model back as an HF folder if asked."""
    from alp_megatron.bridge.hf_folder import save_hf_folder
    from alp_megatron.bridge.hf_import import load_hf_weights

    folder = folders[case.model]

    arch, chunks = build(folder, case.parallel, alp=case.alp)
    sigma_before = {n: p.detach().clone() for n, p in parameters(chunks).items() if "log_sigma" in n}
    load_hf_weights(chunks, folder, arch)
    sigma_after = {n: p for n, p in parameters(chunks).items() if "log_sigma" in n}
    logits = megatron_logits(chunks, arch)  # [b, s, padded vocab] on the last stage
    report = export_report(chunks, arch, hf_tensors(folder), case.bucket_bytes, case.dtype)
    report.update(
        logits=None if logits is None else logits[..., : arch.vocab_size],
        padded_columns=None if logits is None else logits[..., arch.vocab_size:],
        log_sigma_count=len(sigma_before),
        log_sigma_unchanged=all(torch.equal(sigma_before[n], sigma_after[n]) for n in sigma_before),
    )
    if case.save_as:
        save_hf_folder(chunks, folder, folders[case.save_as], tokenizer_dir=folder, max_shard_bytes=SAVED_SHARD_BYTES)
    return report


def run_cases(cases: list[Case], folders: dict) -> list[dict]:
    """Rank entry point: every case in turn in one process group."""
    return [run_case(case, folders) for case in cases]


def import_failure(folder: str, parallel: ParallelConfig, reference_folder: str) -> dict:
    """Import a bad ``folder`` into a model built from ``reference_folder``'s config: the error each rank
    raised and whether any parameter changed."""
    from alp_megatron.bridge.hf_import import load_hf_weights
    from alp_megatron.bridge.mapping import WeightMappingError

    arch, chunks = build(reference_folder, parallel)
    before = parameters(chunks)
    error = None
    try:
        load_hf_weights(chunks, folder, arch)
    except WeightMappingError as raised:
        error = str(raised)
    after = parameters(chunks)
    return dict(error=error, unchanged=all(torch.equal(before[n], after[n]) for n in before))


def unmapped_parameter(folder: str, parallel: ParallelConfig) -> Optional[str]:
    """Register a parameter the table does not know; the binding error message."""
    from alp_megatron.bridge.mapping import ParallelRanks, WeightMappingError, bind_parameters

    arch, chunks = build(folder, parallel)
    chunks[0].decoder.layers[0].register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    try:
        bind_parameters(chunks, arch, ParallelRanks.current())
    except WeightMappingError as error:
        return str(error)
    return None


def export_with_a_parameter_on_one_stage(folder: str, parallel: ParallelConfig) -> Optional[str]:
    """A parameter the table does not know, on the first pipeline stage only: the export's error (every stage
    must raise it; before, the other stage waited in the export's collectives)."""
    from megatron.core import parallel_state

    from alp_megatron.bridge.export import export_hf_buckets
    from alp_megatron.bridge.mapping import WeightMappingError

    arch, chunks = build(folder, parallel)
    if parallel_state.get_pipeline_model_parallel_rank() == 0:
        chunks[0].decoder.layers[0].register_parameter("extra_scale", torch.nn.Parameter(torch.ones(3)))
    try:
        for _ in export_hf_buckets(chunks, arch, 2**20):
            pass
    except WeightMappingError as error:
        return str(error)
    return None


def run_failures(checks: list[tuple], folders: dict) -> list:
    """Rank entry point for the bad-input checks: ``(kind, folder key, parallel, reference key)``."""
    results = []
    for kind, key, parallel, reference in checks:
        if kind == "import":
            results.append(import_failure(folders[key], parallel, folders[reference]))
        elif kind == "export_one_stage":
            results.append(export_with_a_parameter_on_one_stage(folders[key], parallel))
        else:
            results.append(unmapped_parameter(folders[key], parallel))
    return results


def run_all(cases: list[Case], checks: list[tuple], folders: dict) -> dict:
    """Rank entry point: the layout cases, then the bad-input checks, in one process group."""
    return dict(cases=run_cases(cases, folders), failures=run_failures(checks, folders))


# ----------------------------------------------------------------------------------------------------------
# Export memory


class LiveTensorBytes:
    """While active, the bytes of tensor storages created by torch ops (every op goes through the dispatcher)
    that are still alive, and their peak. Storages that existed before (the model's parameters) do not
    count, even when an op returns a view of them."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self.mode = Mode()
        self.live: dict = {}
        self.peak = 0
        self.preexisting: set = set()

    def exclude(self, tensors) -> None:
        self.preexisting.update(t.untyped_storage().data_ptr() for t in tensors)

    def _record(self, out) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_leaves

        self.collect()
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                storage = value.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and key not in self.preexisting and storage.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, self.current())

    def collect(self) -> None:
        for key, (ref, _) in list(self.live.items()):
            if ref.expired():
                del self.live[key]

    def current(self) -> int:
        return sum(nbytes for _, nbytes in self.live.values())


def export_memory(parallel: ParallelConfig, hf: dict, bucket_bytes: int) -> dict:
    """Peak bytes the export holds at once (buckets dropped as they are consumed), and for contrast when
    every bucket is kept; with the sizes the bound is made of."""
    from alp_megatron.bridge.export import export_hf_buckets
    from alp_megatron.model.arch import ModelArch

    initialize_parallel(parallel, seed=1234)
    arch = ModelArch.from_hf_config(hf)
    chunks = build_model(arch, parallel, ModelConfig(), ALP)
    params = [p for chunk in chunks for p in chunk.parameters()]
    streamed = LiveTensorBytes()
    streamed.exclude(params)
    sizes, largest_bucket, fresh_bytes = {}, 0, 0
    with streamed.mode:
        for bucket in export_hf_buckets(chunks, arch, bucket_bytes):
            largest_bucket = max(largest_bucket, sum(t.numel() * t.element_size() for _, t in bucket))
            sizes.update({name: t.numel() * t.element_size() for name, t in bucket})
            # tensors not sharing memory with this rank's parameters (gathered, or from another stage)
            fresh_bytes += sum(t.numel() * t.element_size() for _, t in bucket
                               if t.untyped_storage().data_ptr() not in streamed.preexisting)
            del bucket
    kept = LiveTensorBytes()
    kept.exclude(params)
    with kept.mode:
        everything = list(export_hf_buckets(chunks, arch, bucket_bytes))
    kept_peak = kept.peak
    del everything
    layer_bytes = max(sum(n for name, n in sizes.items() if f".layers.{i}." in name) for i in range(arch.num_layers))
    return dict(peak=streamed.peak, kept_peak=kept_peak, largest_bucket=largest_bucket, model_bytes=sum(sizes.values()),
                fresh_bytes=fresh_bytes, largest_tensor=max(sizes.values()), layer_bytes=layer_bytes)


def export_memory_layouts(layouts: dict, hf: dict, bucket_bytes: int) -> dict:
    """Rank entry point: :func:`export_memory` under each layout."""
    return {name: export_memory(parallel, hf, bucket_bytes) for name, parallel in layouts.items()}
