"""Each CPU runtime patch of megatron-core (``patches/megatron_core.py``) is needed, and works.

The patches are process-global, so every run happens in fresh processes (real gloo ranks, CUDA hidden,
``tests.distributed.run_ranks``): one 2-rank run applies every patch and runs all eight scenarios of
``tests/patches/patch_probes.py``; then, per patch Pn, a run with ``apply(exclude={"Pn"})`` runs the
scenario that needs Pn and must fail with megatron-core's (or torch's) own error.
"""

from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version as installed_version

import pytest
import torch
from packaging.version import Version

from alp_megatron._patches.megatron_core import PATCHES, SUPPORTED
from tests.distributed import run_ranks
from tests.patches import patch_probes

pytestmark = pytest.mark.megatron

MEGATRON_CORE = Version(installed_version("megatron-core"))
COVERING = tuple(p.ident for p in PATCHES if p.covers(MEGATRON_CORE))
REFUSED = ["0.15.0", str(SUPPORTED[1])]  # just outside the range on each side
TIMEOUT = 300

# torch's error when a CUDA call meets a machine without CUDA (CPU wheel; CUDA wheel without devices).
NO_CUDA = ("Torch not compiled with CUDA enabled", "No CUDA GPUs are available", "Found no NVIDIA driver",
           "CUDA driver version is insufficient")


@pytest.fixture(scope="module")
def runs(request):
    """Every spawned run of this module, two at a time (most runs are one rank; CI has 2 cores).

    ``runs["patched"]``: per-rank reports of the run with every patch (``patch_probes.with_all_patches``).
    ``runs[ident]``: the outcome of the run without patch ``ident``, for the patches whose test is selected.
    Each value is ``("returned", value)`` or ``("raised", message)``.
    """
    selected = {item.name.split("_")[1].upper() for item in request.session.items
                if item.module is request.module and item.name.startswith("test_p")}
    jobs = [("patched", 2, patch_probes.with_all_patches, REFUSED)]
    world_size = lambda ident: patch_probes.WORLD_SIZE.get(ident, 1)  # noqa: E731
    for ident in sorted(selected & set(COVERING), key=lambda ident: (-world_size(ident), ident)):
        jobs.append((ident, world_size(ident), patch_probes.without_patch, ident))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_outcome, size, fn, arg) for name, size, fn, arg in jobs}
        return {name: future.result() for name, future in futures.items()}


def _outcome(world_size: int, fn, arg) -> tuple:
    try:
        return ("returned", run_ranks(world_size, fn, arg, timeout=TIMEOUT))
    except (RuntimeError, TimeoutError) as error:
        return ("raised", f"{type(error).__name__}: {error}")


@pytest.fixture(scope="module")
def patched(runs):
    """Per-rank reports of the run with every patch applied."""
    status, value = runs["patched"]
    if status != "returned":
        pytest.fail(f"the run with every patch applied failed:\n{value}")
    return value


def works(patched, ident: str) -> list:
    """The scenario of ``ident``'s per-rank results in the all-patches run; fails on its traceback."""
    results = []
    for rank, report in enumerate(patched):
        status, value = report["scenarios"][ident]
        if status != "ok":
            pytest.fail(f"{ident} scenario failed with every patch applied (rank {rank}):\n{value}")
        results.append(value)
    return results


def fails_without(runs, ident: str, must_contain: tuple = (), one_of: tuple = ()) -> str:
    """The failing rank's traceback of ``ident``'s scenario run without ``ident``, after checking it."""
    status, message = runs[ident]
    if status == "returned":
        pytest.fail(f"{ident} is not needed: its scenario ran without it and returned {message!r}")
    assert not message.startswith("TimeoutError"), message
    assert "without_patch" in message and patch_probes.SCENARIOS[ident].__name__ in message, message
    for needle in must_contain:
        assert needle in message, f"{needle!r} not in the error without {ident}:\n{message}"
    if one_of:
        assert any(needle in message for needle in one_of), f"none of {one_of} in:\n{message}"
    return message


# ----------------------------------------------------------------------------------------------
# apply() itself


def test_nothing_is_applied_on_import(patched):
    # Imported: alp_megatron, the patches module, alp_megatron.model.provider and trainer.step.
    for report in patched:
        assert report["applied_on_import"] == ()


def test_apply_installs_every_covering_patch_once(patched):
    if MEGATRON_CORE == Version("0.16.1"):
        assert COVERING == ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8")
    for report in patched:
        # megatron-core may report a local suffix (e.g. "+<commit>") that package metadata lacks
        assert Version(report["version"]).release == MEGATRON_CORE.release
        assert report["first_apply"] == COVERING
        assert report["second_apply"] == ()  # idempotent: nothing is installed twice
        assert report["applied"] == COVERING


def test_unsupported_megatron_core_is_refused(patched):
    assert Version(REFUSED[0]) < SUPPORTED[0] and Version(REFUSED[1]) >= SUPPORTED[1]
    for report in patched:
        for refused in REFUSED:
            message = report["refusals"][refused]
            assert message is not None, f"megatron-core {refused} was not refused"
            assert f"megatron-core {refused} is outside the range" in message
            assert f"{SUPPORTED[0]} <= version < {SUPPORTED[1]}" in message
        assert report["applied_after_refusals"] == ()  # a refusal installs nothing


# ----------------------------------------------------------------------------------------------
# one test per patch: the scenario works with it and fails without it


def test_p1_current_device(runs, patched):
    for result in works(patched, "P1"):
        assert result["logits_shape"] == (2, patch_probes.SEQ, 256) and result["finite"]
        assert result["buffer_shape"] == (4, 3) and result["buffer_device"] == "cpu"
    # RoPE moves its inverse frequencies to torch.cuda.current_device() in the first forward.
    fails_without(runs, "P1", must_contain=("torch.cuda.current_device()",), one_of=NO_CUDA)


def test_p2_cuda_stream(runs, patched):
    for result in works(patched, "P2"):
        assert result["dispatchers"] == ["MoEAlltoAllTokenDispatcher"] * 2  # one per layer
    message = fails_without(runs, "P2", must_contain=("torch.cuda.Stream()",),
                            one_of=("torch.cuda.Stream requires CUDA", *NO_CUDA))
    assert "MoEAlltoAllTokenDispatcher" in message or "token_dispatcher.py" in message


def test_p3_rng_tracker(runs, patched):
    for result in works(patched, "P3"):
        # The forks draw from the model-parallel state (seed 1234 + 2718), one continuing stream ...
        assert result["forked"] == result["expected_forked"]
        # ... which differs from the default generator's, and the default stream resumes unchanged.
        assert result["forked"] != result["default"][:6]
        assert result["default"] == result["expected_default"]
    fails_without(runs, "P3", must_contain=("model_parallel_cuda_manual_seed", "torch.cuda.get_rng_state()"),
                  one_of=NO_CUDA)


def test_p4_device_cuda_factories(runs, patched):
    for result in works(patched, "P4"):
        assert result["optimizers"] == ["FP32Optimizer"]
        assert result["applied"] and torch.isfinite(torch.tensor([result["loss"], result["grad_norm"]])).all()
        assert result["params_changed"] == result["num_params"]
    # FP32Optimizer.__init__: self._scale = torch.tensor([1.0], dtype=torch.float, device='cuda')
    fails_without(runs, "P4", must_contain=("FP32Optimizer", "device='cuda'"), one_of=NO_CUDA)


def test_p5_cuda_type_strings(runs, patched):
    distributed = works(patched, "P5")
    for result, fp32 in zip(distributed, works(patched, "P4")):
        assert result["optimizers"] == ["DistributedOptimizer"]
        assert result["applied"] and result["params_changed"] == result["num_params"]
        # Same model, data and step as the P4 scenario: the distributed optimizer's loss and grad norm
        # (its own clip_grads path) agree with the FP32 optimizer's.
        assert result["loss"] == pytest.approx(fp32["loss"], rel=1e-6)
        assert result["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=1e-5)
    # DistributedOptimizer._build_model_and_main_param_groups checks param.type() against torch.cuda.*.
    fails_without(runs, "P5",
                  must_contain=("Wrapped parameters must be one of", "Received torch.FloatTensor"))


@pytest.mark.skipif("P6" not in COVERING,
                    reason=f"P6 (te_general_gemm without TE) does not cover megatron-core {MEGATRON_CORE}: "
                           "the bug it works around is fixed there")
def test_p6_router_without_transformer_engine(runs, patched):
    for result in works(patched, "P6"):
        assert result["logits_shape"] == (2, patch_probes.SEQ, 256) and result["finite"]
    fails_without(runs, "P6", must_contain=("name 'te_general_gemm' is not defined",))


def test_p7_alltoall_split_sizes(runs, patched):
    for result in works(patched, "P7"):
        assert result["logits_shape"] == (2, patch_probes.SEQ, 256) and result["finite"]
        assert result["same_weights"]
        # Tokens exchanged by the alltoall come back to the right rank and position: the logits equal
        # the allgather dispatcher's on the same weights and tokens.
        assert result["max_abs_diff"] == 0.0
    fails_without(runs, "P7", must_contain=("all_to_all_single(): incompatible function arguments",))


def test_p8_uneven_gather(runs, patched):
    expected = torch.cat([patch_probes.tp_piece(0), patch_probes.tp_piece(1)])
    weight = torch.arange(expected.numel(), dtype=torch.float32).reshape(expected.shape)
    summed_weight = weight * (1 + 2)  # the backward sums both ranks' weights (rank r: weight * (r + 1))
    offsets = (0, patch_probes.UNEVEN_SIZES[0], sum(patch_probes.UNEVEN_SIZES))
    results = works(patched, "P8")
    assert sorted(result["tp_rank"] for result in results) == [0, 1]
    for result in results:
        assert torch.equal(torch.tensor(result["gathered"]), expected)
        rank = result["tp_rank"]
        assert torch.equal(torch.tensor(result["grad"]), summed_weight[offsets[rank] : offsets[rank + 1]])
    fails_without(runs, "P8", must_contain=("all_gather", "invalid tensor size"))
