"""Check that an engine serves the trainer's weights after an update.

Two checks, both naming each mismatch and its largest absolute difference:

* **Weights** (:func:`check_weights`): ``/get_weights_by_name`` against the trainer's HF-named tensors, for a
  sample of names (all on request). SGLang answers from its own parameters, which are fused (q/k/v into
  ``qkv_proj``, gate/up into ``gate_up_proj``, experts into ``w13``/``w2``) and TP-sharded; its per-model
  name translation covers only some architectures (Llama yes, Qwen2/Qwen3 not at all in 0.5.23) and slices
  q/k/v assuming ``head_dim = hidden/heads`` on TP rank 0. So only tensors SGLang holds 1:1 are compared:
  ``embed_tokens``, ``lm_head``, every norm, ``o_proj`` and ``down_proj`` (dense; ``o_proj``/``down_proj``
  are gathered across TP by SGLang; embeddings and ``lm_head``, which SGLang pads to a multiple of 64 rows and
  shards over TP, are compared on their leading rows). The fused
  tensors are covered by the logprob check. Under FP8 serving the quantised ``o_proj``/``down_proj`` are
  skipped; in the FP8-rounded form (``rounded_fp8``, for ``rollout_precision: fp8_rounded``) they are compared
  with the trainer's tensor rounded through e4m3 blocks, which the engine must hold exactly (in its dtype). A name the engine cannot return (an unsupported architecture) is listed as unavailable, not failed.
* **Logprobs** (:func:`check_logprobs`): greedy ``/generate`` on fixed probe prompts (token ids in, a few new
  tokens), every prompt and output token's logprob against the trainer's unperturbed logprobs of the same
  sequences, which the caller computes (``reference(sequences)``).

:func:`verify_update` runs both and raises :class:`WeightMismatchError` naming what differs.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import requests
import torch

from alp_megatron.bridge import fp8
from alp_megatron.errors import AlpError
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.errors import EngineError, EngineUnreachableError

logger = logging.getLogger(__name__)

# HF names SGLang keeps as one parameter of the same layout (see the module docstring).
_ONE_TO_ONE = re.compile(r"(embed_tokens\.weight|lm_head\.weight|norm\.weight|o_proj\.weight|down_proj\.weight)$")

Reference = Callable[[list[list[int]]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Mismatch:
    """One tensor (or probe prompt) that differs: its name, largest absolute difference and a detail."""

    name: str
    max_abs_diff: float
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.name}: max abs diff {self.max_abs_diff:.3g}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class VerifyReport:
    """What :func:`verify_update` compared and found, for one engine."""

    url: str
    compared: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    max_weight_diff: float = 0.0
    max_logprob_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatches


class WeightMismatchError(AlpError):
    """The engine's weights or logprobs differ from the trainer's; names every mismatching tensor/probe."""

    def __init__(self, url: str, mismatches: Sequence[Mismatch], report: Optional[VerifyReport] = None):
        self.url = url
        self.mismatches = list(mismatches)
        self.report = report
        listing = "\n  ".join(str(m) for m in self.mismatches)
        super().__init__(
            f"engine {url} does not serve the trainer's weights; {len(self.mismatches)} mismatch(es):\n  {listing}\n"
            "Fix: check the bridge's name mapping and dtype for these tensors, and that the last sync succeeded")


def comparable_names(names: Sequence[str], fp8_served: bool = False) -> list[str]:
    """The names among ``names`` that ``/get_weights_by_name`` returns 1:1 (experts and FP8 linears excluded)."""
    chosen = []
    for name in names:
        if not _ONE_TO_ONE.search(name) or ".experts." in name:
            continue
        if fp8_served and fp8.is_quantised_name(name):
            continue
        chosen.append(name)
    return chosen


def check_weights(
    engine: EngineControl,
    tensors: Mapping[str, torch.Tensor],
    names: Union[str, Sequence[str]] = "sample",
    sample: int = 8,
    seed: int = 0,
    rows: Optional[int] = 128,
    served_dtype: Optional[torch.dtype] = None,
    atol: float = 0.0,
    fp8_served: bool = False,
    report: Optional[VerifyReport] = None,
    rounded_fp8: bool = False,
) -> VerifyReport:
    """Compare the engine's copy of HF tensors with ``tensors`` (each linear SGLang quantises first rounded
    through e4m3 blocks when ``rounded_fp8``).

    ``names``: ``"sample"`` (``sample`` names drawn with ``seed`` from the comparable ones), ``"all"``, or an
    explicit list (non-comparable names in it are listed as unavailable). ``rows``: leading rows compared per
    tensor (None: all; SGLang answers with JSON lists, so whole embeddings of large models are costly).
    ``served_dtype``: the engine's dtype; the trainer's tensor is rounded to it first (default: its own dtype).
    """
    report = report or VerifyReport(engine.url)
    candidates = comparable_names(sorted(tensors), fp8_served)
    if names == "all":
        chosen = candidates
    elif names == "sample":
        chosen = sorted(random.Random(seed).sample(candidates, min(sample, len(candidates))))
    else:
        chosen = [n for n in names if n in candidates]
        report.unavailable += [n for n in names if n not in candidates]
    for name in chosen:
        try:
            served = engine.get_weights_by_name(name, truncate_size=rows if rows is not None else 2**31 - 1)
        except EngineUnreachableError:
            raise
        except EngineError as error:
            logger.warning("engine %s cannot return %s: %s", engine.url, name, error)
            report.unavailable.append(name)
            continue
        if served is None:
            report.unavailable.append(name)
            continue
        report.compared.append(name)
        expected = fp8.round_blockwise(tensors[name]) if rounded_fp8 and fp8.is_quantised_name(name) else tensors[name]
        mismatch = _compare(name, torch.tensor(served, dtype=torch.float32), expected, rows, served_dtype, atol)
        if isinstance(mismatch, Mismatch):
            report.mismatches.append(mismatch)
            report.max_weight_diff = max(report.max_weight_diff, mismatch.max_abs_diff)
        else:
            report.max_weight_diff = max(report.max_weight_diff, mismatch)
    return report


def _compare(name, served: torch.Tensor, trainer: torch.Tensor, rows, served_dtype, atol) -> Union[Mismatch, float]:
    expected = trainer.detach().to("cpu")
    if served_dtype is not None:
        expected = expected.to(served_dtype)
    expected = expected.float()
    if rows is not None:
        expected = expected[:rows]
    if served.shape != expected.shape:
        # Only the row count of a vocab-parallel embedding / lm_head may differ: SGLang pads the vocabulary
        # (to a multiple of 64) and, under TP, answers with rank 0's shard. The leading rows are compared.
        if served.dim() == expected.dim() and served.shape[1:] == expected.shape[1:] and served.dim() > 0:
            common = min(served.shape[0], expected.shape[0])
            served, expected = served[:common], expected[:common]
        else:
            return Mismatch(name, float("inf"), f"engine shape {tuple(served.shape)}, trainer {tuple(expected.shape)}")
    diff = (served - expected).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > atol or not torch.isfinite(diff).all():
        where = tuple(int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape))
        return Mismatch(name, worst, f"worst at index {where}, {int((diff > atol).sum())} elements differ")
    return worst


def generate_greedy(engine: EngineControl, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    api_key: Optional[str] = None) -> list[tuple[list[int], list[float]]]:
    """Greedy ``/generate`` of ``max_new_tokens`` on each prompt (token ids); returns, per prompt, the full
    sequence (prompt + output ids) and the logprob of each of its tokens after the first."""
    body = {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = requests.post(engine.url + "/generate", json=body, headers=headers, timeout=engine.timeout_s)
    except requests.RequestException as error:
        raise EngineUnreachableError(engine.url, "/generate", f"{type(error).__name__}: {error}") from error
    if answer.status_code != 200:
        raise EngineError(engine.url, "/generate", answer.text.strip()[:500], status=answer.status_code)
    results = []
    for prompt, item in zip(prompts, answer.json()):
        meta = item["meta_info"]
        logprobs = [lp for lp, _, _ in meta["input_token_logprobs"][1:]] + [lp for lp, _, _ in meta["output_token_logprobs"]]
        results.append((list(prompt) + list(item["output_ids"]), logprobs))
    return results


def check_logprobs(
    engine: EngineControl,
    prompts: Sequence[Sequence[int]],
    reference: Reference,
    max_new_tokens: int = 4,
    atol: float = 1e-4,
    api_key: Optional[str] = None,
    report: Optional[VerifyReport] = None,
) -> VerifyReport:
    """Compare the engine's logprobs of greedy continuations of ``prompts`` with ``reference``.

    ``reference(sequences)`` returns, per sequence of token ids, the trainer's logprob of each token given
    the ones before it (a 1-D tensor of ``len(sequence) - 1``), computed without ALP's perturbation.
    """
    report = report or VerifyReport(engine.url)
    generated = generate_greedy(engine, prompts, max_new_tokens, api_key)
    expected = reference([sequence for sequence, _ in generated])
    for i, ((sequence, served), wanted) in enumerate(zip(generated, expected)):
        wanted = torch.as_tensor(wanted, dtype=torch.float64).flatten()
        served = torch.tensor(served, dtype=torch.float64)
        name = f"probe[{i}]"
        if served.shape != wanted.shape:
            report.mismatches.append(Mismatch(name, float("inf"), f"engine gave {served.numel()} logprobs, "
                                              f"reference {wanted.numel()} for {len(sequence)} tokens"))
            continue
        diff = (served - wanted).abs()
        worst = float(diff.max())
        report.max_logprob_diff = max(report.max_logprob_diff, worst)
        if worst > atol or not torch.isfinite(diff).all():
            position = int(torch.nan_to_num(diff, nan=float("inf")).argmax()) + 1
            report.mismatches.append(Mismatch(
                name, worst, f"logprob of token {position} of {len(sequence)} (prompt length {len(prompts[i])})"))
    return report


def verify_update(
    engine: EngineControl,
    tensors: Optional[Mapping[str, torch.Tensor]] = None,
    prompts: Sequence[Sequence[int]] = (),
    reference: Optional[Reference] = None,
    names: Union[str, Sequence[str]] = "sample",
    sample: int = 8,
    rows: Optional[int] = 128,
    served_dtype: Optional[torch.dtype] = None,
    weight_atol: float = 0.0,
    logprob_atol: float = 1e-4,
    max_new_tokens: int = 4,
    fp8_served: bool = False,
    api_key: Optional[str] = None,
    rounded_fp8: bool = False,
) -> VerifyReport:
    """Run :func:`check_weights` (when ``tensors`` is given) and :func:`check_logprobs` (when ``prompts``
    and ``reference`` are) against ``engine``; raise :class:`WeightMismatchError` if anything differs."""
    if tensors is None and not (prompts and reference):
        raise ValueError("verify_update needs trainer tensors, or probe prompts with a reference, or both")
    report = VerifyReport(engine.url)
    if tensors is not None:
        check_weights(engine, tensors, names, sample, rows=rows, served_dtype=served_dtype, atol=weight_atol,
                      fp8_served=fp8_served, report=report, rounded_fp8=rounded_fp8)
    if prompts and reference is not None:
        check_logprobs(engine, prompts, reference, max_new_tokens, logprob_atol, api_key, report=report)
    if report.mismatches:
        raise WeightMismatchError(engine.url, report.mismatches, report)
    logger.info("engine %s verified: %d tensors (max diff %.3g), logprob max diff %.3g%s", engine.url,
                len(report.compared), report.max_weight_diff, report.max_logprob_diff,
                f"; unavailable: {report.unavailable}" if report.unavailable else "")
    return report
