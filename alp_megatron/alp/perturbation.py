"""The ALP perturbation: a learnable per-layer sigma and layout-independent Gaussian noise (ALP.md §2, §6).

Training forward only, at the input of decoder layer ``l`` (before its input norm, so the residual stream
carries it):  ``h_l <- h_l + sigma_l * eps_l``,  ``sigma_l = exp(log_sigma_l)``,  ``eps_l ~ N(0, I)``.

The noise of one token is a function of ``(seed, optimizer step, global sample id, global layer, the
token's position within its sample, hidden index)`` only, never of how samples are batched, padded, packed
or split. It is drawn in fixed blocks of :data:`ROW_BLOCK` positions x :data:`COLUMN_BLOCK` columns of one
sample, each from its own explicitly seeded generator (never torch's or Megatron's RNG streams); a rank
draws only the blocks that overlap the rows and columns it holds (context and sequence parallelism split
rows, vocab parallelism splits the logits' columns), so its noise memory and time follow its local shard,
with at most one partial block at each edge of a sample's rows and of its column slice. Tensor-parallel
ranks holding replicated activations see identical noise, sharded ranks disjoint pieces of one draw.

At a 32k-token response, hidden 7168, one layer: the full sample's noise is 0.94 GB fp32; a rank of SP=8
draws its 4096 rows (117 MB) plus at most two row blocks (3.7 MB). The logits-only target at a 152k
vocabulary and TP=8 draws each token's 19k-column slice (24.6k with its edge blocks) instead of all 152k.

Only torch is imported here; the Megatron side (which rank holds which rows) is passed in as a
:class:`SequenceShard`.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from alp_megatron.errors import ConfigError

_MASK64 = (1 << 64) - 1
TARGETS = ("layers", "logits")


@dataclass(frozen=True)
class PerturbationConfig:
    """ALP settings (ALP.md §2). Layer indices are global and 0-based; ``perturb_end`` is exclusive."""

    enabled: bool = True
    sigma_0: float = 0.02
    perturb_start: int = 0
    perturb_end: Optional[int] = None  # None: up to the last layer
    learnable: bool = True
    seed: int = 1234
    sigma_lr: float = 1e-2
    sigma_weight_decay: float = 0.0
    # "layers": every decoder layer's input (ALP). "logits": one sigma on the final logits instead (the
    # paper's logits-only ablation; the decoder layers are left alone and perturb_start/end do not apply).
    target: str = "layers"
    # With MoE routing replay on: whether the perturbed training forward also takes the engine's routes (True),
    # or routes on the perturbed hidden states itself (False). Unperturbed passes always replay.
    replay_routes_when_perturbed: bool = True

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError("alp.target", f"{self.target!r} is not a perturbation target",
                              f"use one of {TARGETS} ('layers' is ALP; 'logits' is the logits-only ablation)")
        if not (isinstance(self.sigma_0, (int, float)) and math.isfinite(self.sigma_0) and self.sigma_0 > 0):
            raise ConfigError(
                "alp.sigma_0", f"must be a positive finite number, got {self.sigma_0!r}",
                "use e.g. 0.02 (the paper's single-turn default); to switch ALP off set alp.enabled=false",
            )
        if self.perturb_start < 0:
            raise ConfigError(
                "alp.perturb_start", f"must be >= 0, got {self.perturb_start}", "use 0 for the first layer"
            )
        if self.perturb_end is not None and self.perturb_end <= self.perturb_start:
            raise ConfigError(
                "alp.perturb_end",
                f"must be greater than alp.perturb_start ({self.perturb_start}), got {self.perturb_end}",
                "give an exclusive end layer index, or leave it unset for all layers",
            )
        if not (self.sigma_lr >= 0 and math.isfinite(self.sigma_lr)):
            raise ConfigError("alp.sigma_lr", f"must be >= 0, got {self.sigma_lr!r}", "use e.g. 1e-2")
        if not (self.sigma_weight_decay >= 0):
            raise ConfigError(
                "alp.sigma_weight_decay", f"must be >= 0, got {self.sigma_weight_decay!r}", "use 0.0"
            )

    def check_layers(self, num_layers: int) -> None:
        """Raise if the layer range does not fit a model of ``num_layers`` layers."""
        if self.perturb_start >= num_layers:
            raise ConfigError(
                "alp.perturb_start",
                f"layer {self.perturb_start} is outside the model's {num_layers} layers (0..{num_layers - 1})",
                f"use a value below {num_layers}",
            )
        if self.perturb_end is not None and self.perturb_end > num_layers:
            raise ConfigError(
                "alp.perturb_end",
                f"{self.perturb_end} is past the model's {num_layers} layers",
                f"use at most {num_layers}, or leave it unset for all layers",
            )

    def perturbs(self, layer_index: int, num_layers: int) -> bool:
        end = num_layers if self.perturb_end is None else self.perturb_end
        return self.enabled and self.target == "layers" and self.perturb_start <= layer_index < end

    @property
    def perturbs_logits(self) -> bool:
        return self.enabled and self.target == "logits"


@dataclass(frozen=True)
class SequenceShard:
    """Which rows of the full sequence this rank's hidden states hold.

    Context parallelism splits the sequence into ``2 * cp_size`` chunks and gives rank ``r`` chunks ``r`` and
    ``2 * cp_size - 1 - r`` (Megatron's load-balanced causal split); sequence parallelism then splits that
    local sequence into ``tp_size`` contiguous pieces.
    """

    tp_rank: int = 0
    tp_size: int = 1
    sequence_parallel: bool = False
    cp_rank: int = 0
    cp_size: int = 1

    def full_length(self, local_length: int) -> int:
        return local_length * self._sp * self.cp_size

    def local_length(self, full_length: int) -> int:
        return full_length // (self._sp * self.cp_size)

    def runs(self, local_length: int, segment_rows: Optional[Sequence[int]] = None) -> list[tuple[int, int, int]]:
        """The rows this rank holds as ``(local start, full-sequence start, length)`` runs, in local order.

        ``segment_rows`` (packed layout under context parallelism): the rows each sample occupies, in order;
        each sample is then split into ``2 * cp`` chunks on its own, as Megatron's THD format does. Otherwise
        context parallelism chunks the whole sequence. Sequence parallelism then takes this rank's contiguous
        part of the context-parallel rank's rows.
        """
        cp, rank = self.cp_size, self.cp_rank
        if cp == 1:
            before_sp = [(0, local_length * self._sp)]
        else:
            whole = [local_length * self._sp * cp] if segment_rows is None else list(segment_rows)
            before_sp, offset = [], 0
            for rows in whole:
                chunk = rows // (2 * cp)
                before_sp += [(offset + rank * chunk, chunk), (offset + (2 * cp - 1 - rank) * chunk, chunk)]
                offset += rows
        first = self.tp_rank * local_length if self._sp > 1 else 0
        runs, position = [], 0  # position: where each before-SP run starts in the CP rank's local sequence
        for start, length in before_sp:
            low, high = max(first, position), min(first + local_length, position + length)
            if low < high:
                runs.append((low - first, start + low - position, high - low))
            position += length
        return runs

    @property
    def _sp(self) -> int:
        return self.tp_size if self.sequence_parallel and self.tp_size > 1 else 1


def noise_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 per part), stable across processes and platforms."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


ROW_BLOCK = 64
"""Positions of one sample per noise block: a rank draws at most one partial block at each edge of its rows."""
COLUMN_BLOCK = 4096
"""Columns per noise block (a hidden state of 7168 is two blocks); a vocab-parallel logits slice draws only the
blocks that overlap it."""


@dataclass(frozen=True)
class NoiseKey:
    """What one micro-batch's forward is keyed by.

    ``lengths`` None: the padded layout ``[batch, S]``, one sample per batch row starting at position 0.
    ``lengths`` given: the packed layout ``[1, T]``, the samples concatenated in order along the sequence
    (``lengths[i]`` tokens each, positions restarting at 0 per sample; rows past their sum are padding and get
    no noise). Under context parallelism a packed sample occupies ``padded_lengths[i]`` rows (its length
    rounded up to Megatron's ``2 * cp`` chunks, split per sample as THD does); None means ``lengths``.
    """

    step: int
    sample_ids: tuple[int, ...]
    lengths: Optional[tuple[int, ...]] = None
    padded_lengths: Optional[tuple[int, ...]] = None

    @property
    def packed(self) -> bool:
        return self.lengths is not None

    @property
    def batch(self) -> int:
        return 1 if self.packed else len(self.sample_ids)


class NoiseSource:
    """What noise the ALP layers of one model draw for the micro-batch being run.

    The training loop calls :meth:`set_microbatch` before each micro-batch's forward (on every pipeline
    stage). Megatron's full activation recomputation re-runs a layer's forward during backward, after later
    micro-batches have already set their keys; so a forward that runs without grad under recomputation
    records its key, and the recomputation (which runs inside the autograd engine) replays the keys in the
    same first-in first-out order, which is the order every Megatron schedule runs backward in.
    """

    def __init__(self, seed: int, replays_recompute: bool = False):
        self.seed = int(seed)
        self.enabled = True
        self.replays_recompute = replays_recompute
        self._key: Optional[NoiseKey] = None
        self._pending: dict[int, deque[NoiseKey]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self.drawn_elements = 0  # noise values generated so far (edge blocks included): what the draws cost

    def set_microbatch(self, step: int, sample_ids: Sequence[int] | torch.Tensor,
                       lengths: Optional[Sequence[int] | torch.Tensor] = None,
                       padded_lengths: Optional[Sequence[int] | torch.Tensor] = None) -> None:
        """Key the next forward: ``step`` (optimizer step) and the global id of each sample in the micro-batch;
        ``lengths`` (and ``padded_lengths``) for a packed micro-batch (see :class:`NoiseKey`)."""
        if self._key is not None and self._key.step != step:
            self._pending.clear()
        self._key = NoiseKey(int(step), _ints(sample_ids), None if lengths is None else _ints(lengths),
                             None if padded_lengths is None else _ints(padded_lengths))
        if self._key.packed and len(self._key.lengths) != len(self._key.sample_ids):
            raise ValueError(f"set_microbatch: {len(self._key.sample_ids)} sample ids but "
                             f"{len(self._key.lengths)} lengths")

    def key_for(self, layer_index: int, training: bool) -> NoiseKey:
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and self.replays_recompute and self._pending.get(layer_index):
            return self._pending[layer_index].popleft()
        if self._key is None:
            raise RuntimeError(
                "the ALP perturbation has no noise key: call set_microbatch(step, sample_ids) on the model's "
                "NoiseSource before each training forward, or run the forward under alp_disabled(model) / eval()"
            )
        if self.replays_recompute and training and not torch.is_grad_enabled() and not in_backward:
            self._pending.setdefault(layer_index, deque()).append(self._key)
        return self._key

    def draw(
        self, key: NoiseKey, layer_index: int, shard: SequenceShard, local_shape: torch.Size, device,
        columns: Optional["ColumnShard"] = None,
    ) -> torch.Tensor:
        """fp32 noise of ``local_shape`` = ``[s_local, batch, hidden]`` for this rank; with ``columns`` the
        last dimension is this rank's slice of a wider one (vocab-parallel logits)."""
        local_len, batch, width = local_shape
        if batch != key.batch:
            what = "a packed micro-batch has one row" if key.packed else f"{len(key.sample_ids)} sample ids"
            raise RuntimeError(
                f"ALP noise key: {what} but the micro-batch has {batch} rows: pass one global sample id per "
                "sample to set_microbatch (and their lengths for a packed micro-batch)"
            )
        columns = columns or ColumnShard(0, width)
        out = torch.zeros(batch, local_len, width, device=device, dtype=torch.float32)
        full_len = shard.full_length(local_len)
        if key.packed:
            rows = key.padded_lengths or key.lengths
            if shard.cp_size > 1 and sum(rows) != full_len:
                raise RuntimeError(f"ALP noise key: the packed samples occupy {sum(rows)} rows but the context-"
                                   f"parallel sequence has {full_len}; give each sample's padded_lengths")
            segments = [list(zip(key.sample_ids, key.lengths, rows))]
            runs = shard.runs(local_len, rows if shard.cp_size > 1 else None)
        else:
            segments = [[(sample_id, full_len, full_len)] for sample_id in key.sample_ids]
            runs = shard.runs(local_len)
        for b, row_segments in enumerate(segments):
            for local_start, start, length in runs:
                for sample_id, position, count, local in _positions(row_segments, start, length):
                    self._fill(out[b, local_start + local : local_start + local + count], key.step, sample_id,
                               layer_index, position, columns)
        return out.transpose(0, 1)

    def _fill(self, out: torch.Tensor, step: int, sample_id: int, layer_index: int, position: int,
              columns: "ColumnShard") -> None:
        """Write the noise of positions ``[position, position + len(out))`` of one sample, columns
        ``columns.start ...`` (those past ``columns.full_width`` stay zero), into ``out``."""
        width = min(out.shape[1], columns.full_width - columns.start)
        if width <= 0:  # this rank's columns are all vocabulary padding
            return
        generator = self._generator(out.device)
        first_row, last_row = position // ROW_BLOCK, (position + out.shape[0] - 1) // ROW_BLOCK
        first_col, last_col = columns.start // COLUMN_BLOCK, (columns.start + width - 1) // COLUMN_BLOCK
        for row_block in range(first_row, last_row + 1):
            row0 = row_block * ROW_BLOCK
            lo, hi = max(position, row0), min(position + out.shape[0], row0 + ROW_BLOCK)
            for col_block in range(first_col, last_col + 1):
                col0 = col_block * COLUMN_BLOCK
                block_width = min(COLUMN_BLOCK, columns.full_width - col0)
                c_lo, c_hi = max(columns.start, col0), min(columns.start + width, col0 + block_width)
                generator.manual_seed(noise_seed(self.seed, step, sample_id, layer_index, row_block, col_block))
                target = out[lo - position : hi - position, c_lo - columns.start : c_hi - columns.start]
                if (hi - lo, c_hi - c_lo) == (ROW_BLOCK, block_width) and target.is_contiguous():
                    torch.randn(ROW_BLOCK, block_width, generator=generator, out=target)
                else:
                    block = torch.randn(ROW_BLOCK, block_width, generator=generator, device=out.device,
                                        dtype=torch.float32)
                    target.copy_(block[lo - row0 : hi - row0, c_lo - col0 : c_hi - col0])
                self.drawn_elements += ROW_BLOCK * block_width

    def _generator(self, device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _ints(values) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    return tuple(int(v) for v in values)


def _positions(segments, start: int, length: int):
    """For full-sequence rows ``[start, start + length)`` of one batch row holding ``segments`` (``(sample id,
    tokens, rows)`` in order), the pieces ``(sample id, first position, count, offset within the run)`` that
    are a sample's tokens (a segment's rows past its tokens are padding)."""
    offset = 0
    for sample_id, tokens, rows in segments:
        low, high = max(start, offset), min(start + length, offset + min(tokens, rows))
        if low < high:
            yield sample_id, low - offset, high - low, low - start
        offset += rows
        if offset >= start + length:
            break


@dataclass(frozen=True)
class ColumnShard:
    """This rank's columns ``[start, start + local width)`` of a last dimension ``full_width`` wide (the real
    vocabulary: columns past it, the padding that makes it divisible by tensor parallelism, get no noise)."""

    start: int
    full_width: int


class LayerPerturbation(torch.nn.Module):
    """``h + exp(log_sigma) * eps`` for one layer; identity in eval mode or when the source is disabled.

    ``log_sigma`` stays fp32 even when the model is cast to bf16/fp16 (Megatron's Float16Module), so small
    sigma updates are not rounded away. The realised ratio ``||h' - h|| / ||h||`` of the last training
    forward is kept (detached, rank-local) for metrics.
    """

    def __init__(self, source: NoiseSource, layer_index: int, shard: SequenceShard, sigma_0: float,
                 learnable: bool = True, sequence_parallel: bool = False, active: bool = True):
        super().__init__()
        self.source = source
        self.layer_index = layer_index
        self.shard = shard
        # An inactive module (a layer outside alp.perturb_start/end) never perturbs; it exists so that every
        # layer holds the same parameters, as Megatron's checkpoints need (a layer parameter, and its
        # optimizer state, is saved as one tensor stacked over all layers). Its log_sigma gets exactly zero
        # gradient, so it keeps its value (with sigma_weight_decay 0) and is never reported.
        self.active = active
        self.log_sigma = torch.nn.Parameter(
            torch.tensor(math.log(sigma_0), dtype=torch.float32), requires_grad=learnable
        )
        # Under SP each rank holds part of the sequence, so its log_sigma gradient is partial; Megatron's
        # finalize_model_grads all-reduces parameters marked like this over the tensor-parallel group.
        self.log_sigma.sequence_parallel = sequence_parallel
        self.log_sigma.is_alp_log_sigma = True
        self.last_noise_sq: Optional[torch.Tensor] = None
        self.last_hidden_sq: Optional[torch.Tensor] = None

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.log_sigma.dtype != torch.float32:
            self.log_sigma.data = self.log_sigma.data.float()
        return module

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.source.enabled):
            return hidden_states
        if not self.active:  # in the graph with zero gradient: Megatron's DDP expects a gradient for it
            return _ZeroGradientTie.apply(hidden_states, self.log_sigma)
        key = self.source.key_for(self.layer_index, self.training)
        eps = self._draw(key, hidden_states)
        # fp32 (or wider, for fp64 hidden states) product, then the hidden-state dtype
        compute = torch.promote_types(torch.float32, hidden_states.dtype)
        log_sigma = self._log_sigma_in_graph(hidden_states)
        delta = (log_sigma.to(compute).exp() * eps.to(compute)).to(hidden_states.dtype)
        with torch.no_grad():
            self.last_noise_sq = delta.float().pow(2).sum()
            self.last_hidden_sq = hidden_states.float().pow(2).sum()
        return hidden_states + delta

    def _draw(self, key: NoiseKey, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.source.draw(key, self.layer_index, self.shard, hidden_states.shape, hidden_states.device)

    def _log_sigma_in_graph(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.log_sigma

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, sigma={self.sigma.item():.4g}"


class LogitsPerturbation(LayerPerturbation):
    """The logits-only ablation: ``logits + exp(log_sigma) * eps`` on the output layer's logits.

    ``layer_index`` is the number of decoder layers (one past the last layer), so its noise and its metrics
    keys never collide with a layer's. Under tensor parallelism each rank holds a vocabulary slice
    (``columns``) of the full-vocabulary noise, so the result is layout-independent; each rank's
    ``log_sigma`` gradient then covers only its slice, and the full gradient is summed over ``tp_group``
    in backward (Megatron's DDP does not reduce replicated parameters over tensor parallelism).
    """

    def __init__(self, source: NoiseSource, layer_index: int, shard: SequenceShard, sigma_0: float,
                 columns: ColumnShard, learnable: bool = True, tp_group=None):
        super().__init__(source, layer_index, shard, sigma_0, learnable, sequence_parallel=False)
        self.columns = columns
        self.tp_group = tp_group

    def _gathered(self, logits: torch.Tensor) -> bool:
        """Logits gathered over the (padded) vocabulary: identical on every tensor-parallel rank."""
        return logits.shape[-1] >= self.columns.full_width

    def _draw(self, key: NoiseKey, logits: torch.Tensor) -> torch.Tensor:
        columns = ColumnShard(0, self.columns.full_width) if self._gathered(logits) else self.columns
        return self.source.draw(key, self.layer_index, self.shard, logits.shape, logits.device, columns)

    def _log_sigma_in_graph(self, logits: torch.Tensor) -> torch.Tensor:
        if self._gathered(logits) or self.tp_group is None or torch.distributed.get_world_size(self.tp_group) == 1:
            return self.log_sigma
        return _SumGradOverGroup.apply(self.log_sigma, self.tp_group)


class _ZeroGradientTie(torch.autograd.Function):
    """``hidden`` unchanged; in backward ``parameter`` gets an exact zero gradient (it joins the graph)."""

    @staticmethod
    def forward(ctx, hidden, parameter):
        ctx.parameter_shape = parameter.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.parameter_shape, dtype=torch.float32)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ``group``."""

    @staticmethod
    def forward(ctx, value, group):
        ctx.group = group
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def perturbation_modules(model: torch.nn.Module) -> Iterator[LayerPerturbation]:
    """The perturbations of ``model`` that perturb (inactive placeholders are skipped)."""
    for module in model.modules():
        if isinstance(module, LayerPerturbation) and module.active:
            yield module


def noise_sources(model: torch.nn.Module) -> list[NoiseSource]:
    sources: list[NoiseSource] = []
    for module in perturbation_modules(model):
        if all(module.source is not s for s in sources):
            sources.append(module.source)
    return sources


@contextlib.contextmanager
def alp_disabled(*models: torch.nn.Module):
    """Run forwards of ``models`` unperturbed (rollout-free logprobs, reference, metrics), then restore."""
    sources = [s for m in models for s in noise_sources(m)]
    previous = [s.enabled for s in sources]
    for s in sources:
        s.enabled = False
    try:
        yield
    finally:
        for s, was in zip(sources, previous):
            s.enabled = was


def set_microbatch(model: torch.nn.Module, step: int, sample_ids: Sequence[int] | torch.Tensor,
                   lengths: Optional[Sequence[int] | torch.Tensor] = None,
                   padded_lengths: Optional[Sequence[int] | torch.Tensor] = None) -> None:
    """Key the next training forward of every ALP layer in ``model`` (see NoiseSource.set_microbatch)."""
    for source in noise_sources(model):
        source.set_microbatch(step, sample_ids, lengths, padded_lengths)


def sigma_by_layer(model: torch.nn.Module) -> dict[int, float]:
    """``{global layer index: sigma}`` of the layers held by this rank."""
    return {m.layer_index: float(m.sigma.detach()) for m in perturbation_modules(model)}


def realised_ratio_by_layer(model: torch.nn.Module) -> dict[int, float]:
    """``{layer: ||h' - h|| / ||h||}`` of the last training forward, on this rank's rows."""
    ratios = {}
    for m in perturbation_modules(model):
        if m.last_noise_sq is not None and float(m.last_hidden_sq) > 0:
            ratios[m.layer_index] = math.sqrt(float(m.last_noise_sq) / float(m.last_hidden_sq))
    return ratios
