"""Megatron-Core <-> Hugging Face parameter names and tensor layouts, one declarative table per architecture.

A table row says: this Megatron parameter (name relative to the model, a decoder layer or an expert) is
built from these HF tensors by this :class:`Layout`. A layout knows how the HF tensors become one rank's
Megatron shard (``load``) and how the shards of all tensor-parallel ranks become the HF tensors again
(``merge``); the two are exact inverses. The facts behind each layout (query-group interleave of the fused
QKV, gate/up sliced per rank, vocab padding, expert renumbering under EP) are measured in
``notes/megatron-hf-mapping.md``.

The table is chosen by the exact HF architecture name. Every Megatron parameter must match a row or be in
:data:`NOT_MODEL_WEIGHTS`; anything else is an error that lists the names. Only torch is needed here; the
parallel ranks are passed in as :class:`ParallelRanks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from alp_megatron.errors import AlpError
from alp_megatron.model.arch import SUPPORTED_ARCHITECTURES, ModelArch
from alp_megatron.model.provider import padded_vocab_size


class WeightMappingError(AlpError, ValueError):
    """Weights do not fit the model: names what (file, tensor, parameter) and how to fix it."""

    def __init__(self, where: str, problem: str, fix: str):
        self.where, self.problem, self.fix = where, problem, fix
        super().__init__(f"{where}: {problem}. Fix: {fix}")

    def __reduce__(self):  # picklable across processes despite the three-argument constructor
        return type(self), (self.where, self.problem, self.fix)


# Megatron parameters that are not model weights: never imported or exported. Names relative to a layer or
# to the model: the ALP per-layer sigma, and the logits-only ablation's sigma on the model (alp/perturbation.py).
NOT_MODEL_WEIGHTS = ("alp.log_sigma",)


@dataclass(frozen=True)
class Shard:
    """Position of this rank in the group that splits a tensor (tensor- or expert-tensor-parallel)."""

    rank: int = 0
    size: int = 1


@dataclass(frozen=True)
class ParallelRanks:
    """This rank's place in the groups that shard weights."""

    tensor: Shard = Shard()
    expert_tensor: Shard = Shard()
    expert: Shard = Shard()

    @classmethod
    def current(cls) -> "ParallelRanks":
        """Read from Megatron's parallel state (initialised)."""
        from megatron.core import parallel_state as ps

        return cls(
            tensor=Shard(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            expert_tensor=Shard(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
            expert=Shard(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
        )


# ----------------------------------------------------------------------------------------------------------
# Layouts. ``sources`` are the HF tensors of a row in order, as anything sliceable with ``[a:b]`` /
# ``[:, a:b]`` (a torch tensor, a meta tensor, a safetensors slice), so a rank reads only the rows it needs.
# ``stacked`` is ``[shard.size, *local_shape]``: the local shards of all ranks of the splitting group.


class Layout:
    """How HF tensors become one Megatron shard and back. ``split_dim``: the Megatron dim the group splits."""

    split_dim: Optional[int] = None

    def hf_shapes(self, arch: ModelArch, full_shape: tuple, experts: int) -> list[tuple]:
        """Shapes of the HF tensors, given the unsplit Megatron shape and the number of experts covered."""
        return [tuple(full_shape)]

    def load(self, sources: Sequence, shard: Shard, arch: ModelArch) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, stacked: torch.Tensor, arch: ModelArch, experts: int = 1) -> list[torch.Tensor]:
        raise NotImplementedError


class Replicated(Layout):
    """Every rank holds the whole tensor (norms, router)."""

    def load(self, sources, shard, arch):
        return sources[0][:]

    def merge(self, stacked, arch, experts=1):
        return [stacked[0]]


class RowParallel(Layout):
    """Split along dim 1 (input features): attention output projection, MLP down projection."""

    split_dim = 1

    def load(self, sources, shard, arch):
        cols = _shape(sources[0])[1] // shard.size
        return sources[0][:, shard.rank * cols:(shard.rank + 1) * cols]

    def merge(self, stacked, arch, experts=1):
        return [stacked.movedim(0, 1).flatten(1, 2)]


class VocabParallel(Layout):
    """Embedding / output layer rows: padded with zero rows to a multiple of the group size, split on dim 0.
    The HF tensor has exactly ``arch.vocab_size`` rows; merge strips the padding."""

    split_dim = 0

    def hf_shapes(self, arch, full_shape, experts):
        return [(arch.vocab_size, *full_shape[1:])]

    def load(self, sources, shard, arch):
        source = sources[0]
        rows = padded_vocab_size(arch.vocab_size, shard.size) // shard.size
        start = min(shard.rank * rows, arch.vocab_size)
        real = source[start:min(shard.rank * rows + rows, arch.vocab_size)]
        if real.shape[0] == rows:
            return real
        padding = torch.zeros((rows - real.shape[0], *real.shape[1:]), dtype=real.dtype, device=real.device)
        return torch.cat([real, padding])

    def merge(self, stacked, arch, experts=1):
        return [stacked.flatten(0, 1)[: arch.vocab_size]]


class FusedQKV(Layout):
    """HF q, k, v projections (weights or biases) -> Megatron ``linear_qkv``, interleaved per query group:
    for each group g, ``[q heads of g, k_g, v_g]`` along dim 0; then split evenly on dim 0 (a rank holds
    whole groups when groups >= ranks, else an even part of one group's block)."""

    split_dim = 0

    def hf_shapes(self, arch, full_shape, experts):
        rest = tuple(full_shape[1:])
        kv = (arch.num_query_groups * arch.head_dim, *rest)
        return [(arch.num_attention_heads * arch.head_dim, *rest), kv, kv]

    @staticmethod
    def _sizes(arch: ModelArch) -> tuple[int, int, int]:
        q_rows = arch.num_attention_heads // arch.num_query_groups * arch.head_dim  # q rows per group
        return q_rows, arch.head_dim, q_rows + 2 * arch.head_dim  # q, k (= v), whole group block

    def load(self, sources, shard, arch):
        q, k, v = sources
        q_rows, kv_rows, block = self._sizes(arch)
        per_rank = arch.num_query_groups * block // shard.size
        start, stop = shard.rank * per_rank, (shard.rank + 1) * per_rank
        first, last = start // block, math.ceil(stop / block)
        blocks = []
        for g in range(first, last):
            kv = slice(g * kv_rows, (g + 1) * kv_rows)
            blocks += [q[g * q_rows:(g + 1) * q_rows], k[kv], v[kv]]
        return torch.cat(blocks)[start - first * block: stop - first * block]

    def merge(self, stacked, arch, experts=1):
        q_rows, kv_rows, block = self._sizes(arch)
        rest = stacked.shape[2:]
        groups = stacked.reshape(arch.num_query_groups, block, *rest)
        q, k, v = groups.split([q_rows, kv_rows, kv_rows], dim=1)
        return [t.reshape(-1, *rest) for t in (q, k, v)]


class FusedGateUp(Layout):
    """HF gate and up projections [F, H] -> Megatron ``linear_fc1`` [2F, H]: each rank holds
    ``cat(gate rows of the rank, up rows of the rank)`` (a plain split of cat(gate, up) would be wrong)."""

    split_dim = 0

    def hf_shapes(self, arch, full_shape, experts):
        return [(full_shape[0] // 2, *full_shape[1:])] * 2

    def load(self, sources, shard, arch):
        gate, up = sources
        rows = _shape(gate)[0] // shard.size
        part = slice(shard.rank * rows, (shard.rank + 1) * rows)
        return torch.cat([gate[part], up[part]])

    def merge(self, stacked, arch, experts=1):
        size, rows2 = stacked.shape[:2]
        halves = stacked.reshape(size, 2, rows2 // 2, *stacked.shape[2:])
        return [halves[:, 0].flatten(0, 1), halves[:, 1].flatten(0, 1)]



class GroupedGateUp(Layout):
    """Legacy ``GroupedMLP.weight1`` [H, E_local * 2I / tp] of all local experts. Its memory is
    ``[E_local, H, 2I / tp]`` (Megatron views it so), each expert's block the transpose of that expert's
    :class:`FusedGateUp` shard. Sources: gate_e, up_e for each local expert. Grouped GEMM runs on GPU only;
    the layout is unit-tested on its shapes and inverse."""

    split_dim = 1

    def hf_shapes(self, arch, full_shape, experts):
        return [(full_shape[1] // (2 * experts), full_shape[0])] * (2 * experts)

    def load(self, sources, shard, arch):
        pairs = [sources[i:i + 2] for i in range(0, len(sources), 2)]
        blocks = torch.stack([FusedGateUp().load(pair, shard, arch).t() for pair in pairs])  # [E, H, 2I/tp]
        return blocks.reshape(blocks.shape[1], -1)

    def merge(self, stacked, arch, experts=1):
        size, hidden = stacked.shape[:2]
        blocks = stacked.reshape(size, experts, hidden, -1)
        return [t for e in range(experts) for t in FusedGateUp().merge(blocks[:, e].transpose(1, 2), arch)]


class GroupedDown(Layout):
    """Legacy ``GroupedMLP.weight2`` [E_local * I / tp, H]: memory ``[E_local, I / tp, H]``, each expert's
    block the transpose of that expert's :class:`RowParallel` down-projection shard."""

    split_dim = 0

    def hf_shapes(self, arch, full_shape, experts):
        return [(full_shape[1], full_shape[0] // experts)] * experts

    def load(self, sources, shard, arch):
        blocks = torch.stack([RowParallel().load([source], shard, arch).t() for source in sources])
        return blocks.flatten(0, 1)

    def merge(self, stacked, arch, experts=1):
        size, rows, hidden = stacked.shape
        blocks = stacked.reshape(size, experts, rows // experts, hidden)
        return [RowParallel().merge(blocks[:, e].transpose(1, 2), arch)[0] for e in range(experts)]


def _shape(source) -> tuple:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


REPLICATED, ROW, VOCAB = Replicated(), RowParallel(), VocabParallel()
QKV, GATE_UP, GROUPED_GATE_UP, GROUPED_DOWN = FusedQKV(), FusedGateUp(), GroupedGateUp(), GroupedDown()


# ----------------------------------------------------------------------------------------------------------
# Tables. Megatron names are relative to the model, to ``decoder.layers.{i}.`` or (experts) to the layer;
# HF templates use ``{layer}`` (global, 0-based) and ``{expert}`` (global).


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: tuple[str, ...]
    layout: Layout


@dataclass(frozen=True)
class ArchitectureTable:
    architecture: str
    embedding: tuple[Row, ...]  # first pipeline stage
    layer: tuple[Row, ...]  # every decoder layer
    dense_mlp: tuple[Row, ...]  # layers with a dense MLP
    moe_mlp: tuple[Row, ...] = ()  # layers with experts: router
    experts: tuple[Row, ...] = ()  # per expert; Megatron's {expert} is the local index, HF's the global one
    final: tuple[Row, ...] = ()  # last pipeline stage (output layer handled by :func:`output_row`)
    ignored_hf: tuple[str, ...] = ()  # HF tensors that are no weights of the model (old RoPE caches)


_L = "model.layers.{layer}."
_E = _L + "mlp.experts.{expert}."

EMBEDDING = (Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),)
FINAL = (Row("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),)
ATTENTION = (
    Row("input_layernorm.weight", (_L + "input_layernorm.weight",), REPLICATED),
    Row("self_attention.linear_qkv.weight",
        tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV),
    Row("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), ROW),
    Row("pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), REPLICATED),
)
QKV_BIAS = (Row("self_attention.linear_qkv.bias", tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV),)
QK_NORMS = (
    Row("self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), REPLICATED),
    Row("self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), REPLICATED),
)
DENSE_MLP = (
    Row("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), GATE_UP),
    Row("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), ROW),
)
ROUTER = (Row("mlp.router.weight", (_L + "mlp.gate.weight",), REPLICATED),)
EXPERTS = (
    Row("mlp.experts.local_experts.{expert}.linear_fc1.weight", (_E + "gate_proj.weight", _E + "up_proj.weight"),
        GATE_UP),
    Row("mlp.experts.local_experts.{expert}.linear_fc2.weight", (_E + "down_proj.weight",), ROW),
)
ROPE_CACHE = (_L + "self_attn.rotary_emb.inv_freq",)

TABLES = {
    table.architecture: table
    for table in (
        ArchitectureTable("LlamaForCausalLM", EMBEDDING, ATTENTION, DENSE_MLP, final=FINAL, ignored_hf=ROPE_CACHE),
        ArchitectureTable("Qwen2ForCausalLM", EMBEDDING, ATTENTION + QKV_BIAS, DENSE_MLP, final=FINAL,
                          ignored_hf=ROPE_CACHE),
        ArchitectureTable("Qwen3ForCausalLM", EMBEDDING, ATTENTION + QK_NORMS, DENSE_MLP, final=FINAL),
        ArchitectureTable("Qwen3MoeForCausalLM", EMBEDDING, ATTENTION + QK_NORMS, DENSE_MLP, ROUTER, EXPERTS,
                          final=FINAL),
    )
}
assert set(TABLES) == set(SUPPORTED_ARCHITECTURES)

# How Megatron stores experts; the table's EXPERTS rows are the "sequential" (local spec) form.
EXPERT_LAYOUTS = ("sequential", "te_grouped", "legacy_grouped")
# Transformer Engine fuses the input norms into the following linear layer, renaming their weights.
TE_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def table_for(architecture: str) -> ArchitectureTable:
    """The mapping table of an HF architecture name (``config.architectures[0]``), exactly."""
    if architecture not in TABLES:
        raise WeightMappingError(
            "config.json: architectures", f"{architecture!r} has no weight mapping",
            f"use a checkpoint of one of: {', '.join(TABLES)}",
        )
    return TABLES[architecture]


def output_row(arch: ModelArch) -> Row:
    """The output layer: ``lm_head`` when untied; with tied embeddings Megatron's last pipeline stage keeps
    a copy of the embedding (loaded from ``embed_tokens``, never exported)."""
    source = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
    return Row("output_layer.weight", (source,), VOCAB)


def expert_rows(table: ArchitectureTable, expert_layout: str) -> tuple[Row, ...]:
    """The table's expert rows in one of :data:`EXPERT_LAYOUTS`."""
    fc1, fc2 = table.experts
    if expert_layout == "sequential":
        return table.experts
    if expert_layout == "te_grouped":  # TEGroupedMLP: one weight per local expert, named weight{e}
        return (replace(fc1, megatron="mlp.experts.linear_fc1.weight{expert}"),
                replace(fc2, megatron="mlp.experts.linear_fc2.weight{expert}"))
    if expert_layout == "legacy_grouped":  # GroupedMLP: all local experts in one tensor
        return (Row("mlp.experts.weight1", fc1.hf, GROUPED_GATE_UP), Row("mlp.experts.weight2", fc2.hf, GROUPED_DOWN))
    raise ValueError(f"expert layout {expert_layout!r} is not one of {EXPERT_LAYOUTS}")


def hf_tensor_names(arch: ModelArch) -> list[str]:
    """Every tensor name an HF checkpoint of ``arch`` holds, in export order."""
    table = table_for(arch.architecture)
    names = [n for row in table.embedding for n in row.hf]
    for layer in range(arch.num_layers):
        rows = table.layer + (table.moe_mlp if arch.layer_is_moe(layer) else table.dense_mlp)
        names += [n.format(layer=layer) for row in rows for n in row.hf]
        if arch.layer_is_moe(layer):
            names += [n.format(layer=layer, expert=e) for row in table.experts
                      for e in range(arch.num_experts) for n in row.hf]
    names += [n for row in table.final for n in row.hf]
    if not arch.tie_word_embeddings:
        names += list(output_row(arch).hf)
    return names


def is_ignored_hf_name(arch: ModelArch, name: str) -> bool:
    """True for HF tensors that are not model weights (e.g. an old checkpoint's RoPE ``inv_freq``), and for
    an ``lm_head`` stored beside tied embeddings."""
    if arch.tie_word_embeddings and name == "lm_head.weight":
        return True
    templates = table_for(arch.architecture).ignored_hf
    return any(name == t.format(layer=layer) for t in templates for layer in range(arch.num_layers))


# ----------------------------------------------------------------------------------------------------------
# Binding this rank's Megatron parameters to rows.


@dataclass(frozen=True)
class Binding:
    """One Megatron parameter of this rank and where its values come from."""

    chunk: int  # index of the model chunk (virtual pipeline stage)
    name: str  # full name in ``chunk.named_parameters()``
    param: torch.nn.Parameter
    row: Row
    layer: Optional[int]  # global layer, 0-based; None outside the decoder layers
    experts: tuple[int, ...]  # global experts held (empty for non-expert tensors)
    exported: bool  # False for the tied embedding copy on the last pipeline stage
    order: tuple  # position in the model-wide export order

    @property
    def layout(self) -> Layout:
        return self.row.layout

    @property
    def is_expert(self) -> bool:
        return bool(self.experts)

    def hf_names(self, experts: Optional[Sequence[int]] = None) -> list[str]:
        """HF names of this parameter, or of the same tensor on the rank holding ``experts``."""
        if not self.is_expert:
            return [t.format(layer=self.layer) for t in self.row.hf]
        return [t.format(layer=self.layer, expert=e) for e in (experts or self.experts) for t in self.row.hf]

    def shard(self, ranks: ParallelRanks) -> Shard:
        if self.layout.split_dim is None:
            return Shard()
        return ranks.expert_tensor if self.is_expert else ranks.tensor

    def full_shape(self, ranks: ParallelRanks) -> tuple:
        """The Megatron shape before tensor-parallel splitting."""
        shape = list(self.param.shape)
        if self.layout.split_dim is not None:
            shape[self.layout.split_dim] *= self.shard(ranks).size
        return tuple(shape)

    def hf_shapes(self, arch: ModelArch, ranks: ParallelRanks) -> list[tuple]:
        return self.layout.hf_shapes(arch, self.full_shape(ranks), max(1, len(self.experts)))


def bind_parameters(chunks: Sequence[torch.nn.Module], arch: ModelArch, ranks: ParallelRanks) -> list[Binding]:
    """Bind every parameter of this rank's model chunks (``GPTModel``s, unwrapped) to a table row.

    Raises :class:`WeightMappingError` listing the Megatron names no row maps (other than
    :data:`NOT_MODEL_WEIGHTS`) and the rows the model lacks. Pure: no collectives.
    """
    table = table_for(arch.architecture)
    bindings, unknown, missing = [], [], []
    for index, chunk in enumerate(chunks):
        params = dict(chunk.named_parameters())
        bound: set[str] = set()

        def bind(name: str, row: Row, layer=None, experts=(), exported=True, order=()):
            if name not in params:
                missing.append(f"chunk {index}: {name}")
                return
            bound.add(name)
            bindings.append(Binding(index, name, params[name], row, layer, tuple(experts), exported, order))

        tied = getattr(chunk, "share_embeddings_and_output_weights", False)
        if chunk.pre_process:
            for i, row in enumerate(table.embedding):
                bind(row.megatron, row, order=(0, i))
        for local, layer_module in enumerate(chunk.decoder.layers):
            layer = layer_module.layer_number - 1
            prefix = f"decoder.layers.{local}."
            rows = table.layer + (table.moe_mlp if arch.layer_is_moe(layer) else table.dense_mlp)
            for i, row in enumerate(rows):
                bind(prefix + _te_name(row.megatron, prefix, params), row, layer, order=(1, layer, i))
            if arch.layer_is_moe(layer):
                layout = _expert_layout(prefix, params)
                per_rank = arch.num_experts // ranks.expert.size
                first = ranks.expert.rank * per_rank
                for i, row in enumerate(expert_rows(table, layout), start=len(rows)):
                    if layout == "legacy_grouped":
                        bind(prefix + row.megatron, row, layer, range(first, first + per_rank), order=(1, layer, i, 0))
                        continue
                    for local_expert in range(per_rank):
                        bind(prefix + row.megatron.format(expert=local_expert), row, layer, (first + local_expert,),
                             order=(1, layer, i, local_expert))
            bound.update(prefix + name for name in NOT_MODEL_WEIGHTS if prefix + name in params)
        if chunk.post_process:
            bound.update(name for name in NOT_MODEL_WEIGHTS if name in params)
            for i, row in enumerate(table.final):
                bind(row.megatron, row, order=(2, i))
            if not tied or not chunk.pre_process:  # tied on one stage: the output layer uses the embedding
                bind("output_layer.weight", output_row(arch), exported=not tied, order=(2, len(table.final)))
        unknown += [f"chunk {index}: {name}" for name in params if name not in bound]
    if unknown or missing:
        problems = []
        if unknown:
            problems.append(f"Megatron parameters without a mapping: {', '.join(unknown)}")
        if missing:
            problems.append(f"parameters the {arch.architecture} table expects but the model lacks: "
                            f"{', '.join(missing)}")
        raise WeightMappingError(
            f"{arch.architecture} weight mapping", "; ".join(problems),
            "build the model from this checkpoint's config (model/provider.py build_model); add trainer-only "
            "parameters to bridge.mapping.NOT_MODEL_WEIGHTS",
        )
    return bindings


def _te_name(name: str, prefix: str, params: dict) -> str:
    fused = TE_FUSED_NORMS.get(name)
    if fused and prefix + name not in params and prefix + fused in params:
        return fused
    return name


def _expert_layout(prefix: str, params: dict) -> str:
    if prefix + "mlp.experts.weight1" in params:
        return "legacy_grouped"
    if prefix + "mlp.experts.linear_fc1.weight0" in params:
        return "te_grouped"
    return "sequential"
