"""Each weight transport updates a real SGLang server (CPU here) to the trainer's weights, whole or not at all.

The "trainer" is a second tiny HF model with other weights; its ``transformers`` forward in fp32 gives the
reference logprobs. Buckets come from its safetensors files (no Megatron needed). One server per module.
"""

from __future__ import annotations

import gc
import glob
import os
import threading

import pytest
import requests
import torch

from alp_megatron.bridge.export import bucketed
from alp_megatron.bridge.transports import (
    WeightTransport,
    aligned_order,
    flatten_bucket,
    make_transport,
)
from alp_megatron.bridge.verify import verify_update
from alp_megatron.bridge.weight_sync import EngineSpec, WeightSync, WeightSyncConfig, WeightSyncError, ranks_beyond_tp
from alp_megatron.errors import ConfigError
from alp_megatron.rollout.engine_control import EngineControl
from alp_megatron.rollout.process import free_port
from tests.sglang_fixtures import launch_server, tiny_model

PROMPTS = [[1, 5, 20, 33, 41, 7], [1, 40, 41, 42, 19, 22, 30, 12, 9], [1, 3]]
BUCKET_BYTES = 64 * 1024  # the tiny model (~0.4 MB) travels in several buckets
TOLERANCE = 1e-4


# -------------------------------------------------------------------------------------------------
# Helpers shared with test_verify.py


def load_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files, by HF name, in file order."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def buckets_of(tensors: dict[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES):
    """A factory of buckets of at most ``bucket_bytes`` (a tensor larger than that gets its own bucket)."""

    def make():
        return bucketed(tensors.items(), bucket_bytes)

    return make


class HFReference:
    """Logprobs of token sequences under an HF model folder, ``transformers`` forward in fp32."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.no_grad()
    def __call__(self, sequences):
        out = []
        for sequence in sequences:
            ids = torch.tensor([sequence])
            logits = self.model(ids).logits.float()
            logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
            out.append(logprobs.gather(-1, ids[0, 1:, None])[:, 0])
        return out


def engine_logprobs(url: str, prompts=PROMPTS) -> list[list[float]]:
    """The engine's logprobs of each prompt token after the first (no generation)."""
    answer = requests.post(url + "/generate", json={
        "input_ids": prompts, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": 0}, timeout=60)
    answer.raise_for_status()
    return [[lp for lp, _, _ in item["meta_info"]["input_token_logprobs"][1:]] for item in answer.json()]


def max_logprob_diff(url: str, reference: HFReference) -> float:
    served = engine_logprobs(url)
    expected = reference(PROMPTS)
    return max(float((torch.tensor(s, dtype=torch.float64) - e.double()).abs().max())
               for s, e in zip(served, expected))


# -------------------------------------------------------------------------------------------------
# Fixtures: the served model (seed 0) and three "trainer" models with other weights are the package's
# (tests/bridge/conftest.py), shared with test_verify.py.


@pytest.fixture(scope="module")
def references(models):
    return {seed: HFReference(path) for seed, path in models.items()}


def _sync_config(server, transport, **fields):
    if transport == "distributed":
        # The gloo branch, also where a GPU exists: NCCL refuses a group with two ranks on one GPU, and the
        # test server shares the trainer's (the GPU tests below put the engine on another GPU).
        fields["transport_options"] = {"backend": "gloo", **fields.get("transport_options", {})}
    return WeightSyncConfig(engines=[EngineSpec(server.url)], transport=transport, retry_wait_s=0.1, **fields)


def _assert_serves(server, reference, version):
    control = EngineControl(server.url)
    assert control.weight_version() == version
    assert max_logprob_diff(server.url, reference) <= TOLERANCE
    # full check: every 1:1 tensor exactly, and greedy continuations' logprobs
    verify_update(control, prompts=PROMPTS, reference=reference, max_new_tokens=4, logprob_atol=TOLERANCE)


# -------------------------------------------------------------------------------------------------
# Engine-free parts


def test_factory_builds_each_transport_and_refuses_unknown_names():
    for name in ("tensor", "distributed", "disk"):
        transport = make_transport(name)
        assert isinstance(transport, WeightTransport) and transport.name == name
        transport.close()
    with pytest.raises(ConfigError, match="weight_sync.transport"):
        make_transport("carrier-pigeon")
    with pytest.raises(ConfigError, match="weight_sync.distributed.backend"):
        make_transport("distributed", backend="mpi")


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"weight_sync.engines\[0\].url"):
        WeightSyncConfig(engines=[EngineSpec("localhost:30000")])
    with pytest.raises(ConfigError, match="weight_sync.pause_mode"):
        WeightSyncConfig(engines=[EngineSpec("http://a:1")], pause_mode="later")
    with pytest.raises(ConfigError, match="weight_sync.engines"):
        WeightSyncConfig(engines=[EngineSpec("http://a:1"), EngineSpec("http://a:1/")])


def test_flattened_bucket_round_trip_with_mixed_dtypes():
    """fp8 weights of odd sizes beside fp32 scales stay aligned, and SGLang's reader rebuilds them exactly."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    bucket = [("a", torch.randn(3, 5).to(torch.float8_e4m3fn)), ("b", torch.randn(1, 3)),
              ("c", torch.randn(7).to(torch.bfloat16)), ("d", torch.randn(2, 2).to(torch.float8_e4m3fn))]
    ordered = aligned_order(bucket)
    buffer, metadata = flatten_bucket(ordered)
    rebuilt = dict(FlattenedTensorBucket(flattened_tensor=buffer, metadata=metadata).reconstruct_tensors())
    for name, tensor in bucket:
        assert rebuilt[name].dtype == tensor.dtype
        assert torch.equal(rebuilt[name].view(torch.uint8), tensor.view(torch.uint8))
    with pytest.raises(ValueError, match="aligned_order"):
        flatten_bucket(bucket)


# -------------------------------------------------------------------------------------------------
# Against the server


@pytest.mark.parametrize("transport,seed", [("tensor", 1), ("distributed", 2), ("disk", 3)])
def test_transport_updates_engine(server, models, references, transport, seed, tmp_path):
    # the served weights differ from this model's before the update, so the check below is not vacuous
    assert max_logprob_diff(server.url, references[seed]) > 1e-2
    before = EngineControl(server.url).weight_version()
    options = {"root": str(tmp_path)} if transport == "disk" else {}
    with WeightSync(_sync_config(server, transport, transport_options=options)) as sync:
        report = sync.sync(buckets_of(load_tensors(models[seed])), f"{transport}-1")
    assert report.buckets > 1 and report.attempts == 1 and not report.fp8
    assert before != f"{transport}-1"
    _assert_serves(server, references[seed], f"{transport}-1")


def test_distributed_builds_its_group_under_torchrun_too(server, models, references, monkeypatch):
    """Under torchrun (TORCHELASTIC_USE_AGENT_STORE) torch's tcp:// rendezvous makes every rank a client of
    the elastic agent's store, which serves no second world: the trainer hosts the group's store itself."""
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    with WeightSync(_sync_config(server, "distributed", retries=0, transport_options={"timeout_s": 60})) as sync:
        sync.sync(buckets_of(load_tensors(models[1])), "dist-under-torchrun")
    _assert_serves(server, references[1], "dist-under-torchrun")


def test_distributed_group_is_reused_then_destroyed(server, models, references):
    with WeightSync(_sync_config(server, "distributed")) as sync:
        sync.sync(buckets_of(load_tensors(models[1])), "dist-a")
        group = sync.transport.group_name
        assert group is not None
        sync.sync(buckets_of(load_tensors(models[2])), "dist-b")
        assert sync.transport.group_name == group  # the second sync used the same group
        _assert_serves(server, references[2], "dist-b")
        sync.transport.close()
        assert sync.transport.group_name is None
        # a closed group is rebuilt (under a new name) by the next sync
        sync.sync(buckets_of(load_tensors(models[1])), "dist-c")
        assert sync.transport.group_name not in (None, group)
    _assert_serves(server, references[1], "dist-c")


def test_disk_transport_keeps_only_the_newest_folder(server, models, references, tmp_path):
    os.makedirs(tmp_path / ".partial-000001")  # left by a crashed update: removed, its name reused
    with WeightSync(_sync_config(server, "disk", transport_options={"root": str(tmp_path)})) as sync:
        sync.sync(buckets_of(load_tensors(models[2])), "disk-a")
        first = sync.transport.current
        sync.sync(buckets_of(load_tensors(models[3])), "disk-b/with slash")
        second = sync.transport.current
    assert first != second and not os.path.exists(first)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(second)]
    assert {"config.json", "tokenizer.json", "model.safetensors.index.json"} <= set(os.listdir(second))
    assert EngineControl(server.url).model_info()["model_path"] == second
    _assert_serves(server, references[3], "disk-b/with slash")


def test_disk_transport_removes_its_temporary_root_with_itself(server, models, references, tmp_path):
    with WeightSync(_sync_config(server, "disk")) as sync:  # no root: a temporary folder of its own
        sync.sync(buckets_of(load_tensors(models[2])), "disk-tmp")
        root = sync.transport.root
        assert os.listdir(root)
    del sync
    gc.collect()
    assert not os.path.exists(root)
    _assert_serves(server, references[2], "disk-tmp")  # the engine serves what it loaded
    # the engine's model path is gone now: a disk sync asks for the source files by their setting, before
    # generation is paused (the engine goes on serving its weights)
    settings = dict(fp8="off", retries=0)  # (fp8 'auto' would ask for the served folder first)
    with WeightSync(_sync_config(server, "disk", transport_options={"root": str(tmp_path)}, **settings)) as sync:
        with pytest.raises(ConfigError, match="weight_sync.disk.source_dir"):
            sync.sync(buckets_of(load_tensors(models[3])), "disk-lost")
    _assert_serves(server, references[2], "disk-tmp")
    options = {"root": str(tmp_path / "kept"), "source_dir": models[0]}
    with WeightSync(_sync_config(server, "disk", transport_options=options, **settings)) as sync:
        sync.sync(buckets_of(load_tensors(models[3])), "disk-kept")  # (later tests read the served folder)
    _assert_serves(server, references[3], "disk-kept")


def test_a_sync_asks_model_info_once_and_checks_names_from_the_kept_manifest(server, models, references):
    """A later sync asks each engine's /model_info once before loading (liveness, FP8 and the served folder
    from one answer) and once after (the version check), and checks bucket names against the served
    checkpoint's shapes read at the first sync."""
    good = buckets_of(load_tensors(models[1]))
    with WeightSync(_sync_config(server, "tensor", retries=0)) as sync:
        sync.sync(good, "kept-1")
        control, calls = sync.engines[0].control, []
        model_info = control.model_info
        control.model_info = lambda: calls.append("model_info") or model_info()
        sync.sync(good, "kept-2")
        assert calls == ["model_info"] * 2
        with pytest.raises(WeightSyncError, match="no_such.weight is not a tensor of the served model"):
            sync.sync(lambda: [[("model.layers.0.no_such.weight", torch.zeros(2))]], "kept-bad")
        sync.sync(good, "kept-3")
    _assert_serves(server, references[1], "kept-3")


def test_a_wrong_tp_size_is_named_before_anything_changes(server, models):
    """An engine declared with another tensor-parallel size than it runs (payloads per TP rank and the
    broadcast group depend on it) is refused at the first sync, naming the field and the served size."""
    control = EngineControl(server.url)
    version = control.weight_version()
    config = WeightSyncConfig(engines=[EngineSpec(server.url, tp_size=2)], transport="tensor", retry_wait_s=0.1)
    with WeightSync(config) as sync, pytest.raises(ConfigError, match=r"weight_sync\.engines\[0\]\.tp_size") as caught:
        sync.sync(buckets_of(load_tensors(models[1])), "never")
    assert "--tp-size 1" in str(caught.value) and "set it to 1" in str(caught.value)
    assert control.weight_version() == version and not _paused(server.url)


def test_engines_whose_ranks_share_tp_ranks_are_told_apart(server):
    """The tensor and distributed transports address an engine's ranks by TP rank alone; pipeline stages and
    data-parallel replicas inside one server share TP ranks, and are read from /server_info (which SGLang
    0.5.23 fills in, so the check is not vacuous)."""
    info = EngineControl(server.url).server_info()
    assert info["pp_size"] == 1 and info["dp_size"] == 1 and "enable_dp_attention" in info
    assert ranks_beyond_tp(info) is None
    assert ranks_beyond_tp({**info, "pp_size": 2}) == "--pp-size 2"
    assert ranks_beyond_tp({**info, "dp_size": 4}) == "--dp-size 4"
    assert ranks_beyond_tp({**info, "dp_size": 4, "enable_dp_attention": True}) is None  # splits the TP ranks
    assert [make_transport(name).per_tp_rank for name in ("tensor", "distributed", "disk")] == [True, True, False]


def test_unreachable_engine_is_named_and_nothing_is_applied(server, models, references):
    """With a dead engine in the list, the error names its URL; the live engine is left as it was: old
    weights, old version, no weight-update session left open, generation not paused."""
    dead = f"http://127.0.0.1:{free_port()}"
    control = EngineControl(server.url)
    version = control.weight_version()
    before = engine_logprobs(server.url)
    config = WeightSyncConfig(engines=[EngineSpec(server.url), EngineSpec(dead)], transport="tensor", retries=1,
                              retry_wait_s=0.1)
    with WeightSync(config) as sync, pytest.raises(WeightSyncError) as caught:
        sync.sync(buckets_of(load_tensors(models[1])), "never")
    assert dead in str(caught.value) and caught.value.urls == [dead]
    assert "after 2 attempt(s)" in str(caught.value)
    assert control.weight_version() == version
    assert engine_logprobs(server.url) == before
    control.begin_weight_update()  # refused if a session had been left open
    control.end_weight_update()


def _paused(url: str) -> bool:
    """True if a generation request waits instead of running (generation is paused)."""
    waiter = threading.Thread(target=engine_logprobs, args=(url,), daemon=True)
    waiter.start()
    waiter.join(timeout=3)
    return waiter.is_alive()


def test_failed_update_closes_the_session_and_keeps_the_engine_paused(server, models, references):
    """Failures after some buckets were loaded (a tensor the served model shapes differently, caught before
    it is sent; an export that fails mid-stream): the error names the tensor, the session is closed, the new
    version is not stamped, and generation stays paused until a later sync succeeds."""
    good = buckets_of(load_tensors(models[1]))
    control = EngineControl(server.url)
    version = control.weight_version()

    def wrong_shape():
        buckets = list(good())
        last = buckets[-1]
        i = max(i for i, (_, tensor) in enumerate(last) if tensor.dim() == 2)
        name, tensor = last[i]
        last[i] = (name, tensor[:, :-1].contiguous())
        wrong_shape.name = name
        return buckets

    def export_fails():
        buckets = good()
        yield next(buckets)
        yield next(buckets)
        raise RuntimeError("export failed on a trainer rank")

    with WeightSync(_sync_config(server, "tensor", retries=1)) as sync:
        with pytest.raises(WeightSyncError) as caught:
            sync.sync(wrong_shape, "bad-shape")
        assert wrong_shape.name in str(caught.value) and "shape" in str(caught.value)
        assert "after 1 attempt(s)" in str(caught.value)  # a mismatch with the served model is not retried
        assert control.weight_version() == version
        assert _paused(server.url)
        control.begin_weight_update()  # no session was left open
        control.end_weight_update()

        with pytest.raises(RuntimeError, match="export failed"):
            sync.sync(export_fails, "bad-export")
        assert control.weight_version() == version
        control.begin_weight_update()
        control.end_weight_update()
        assert _paused(server.url)

        sync.sync(good, "good")  # a successful sync resumes generation
    assert not _paused(server.url)
    _assert_serves(server, references[1], "good")


def test_pause_retract_lets_an_inflight_rollout_finish_on_new_weights(server, models):
    """A rollout in flight during the sync is retracted, resumed on the new weights, and its tokens are
    attributed to both versions."""
    result = {}

    def rollout():
        result["answer"] = requests.post(server.url + "/generate", json={
            "input_ids": [1, 5, 6], "sampling_params": {"max_new_tokens": 600, "temperature": 0.0,
                                                        "ignore_eos": True}}, timeout=120).json()

    version = EngineControl(server.url).weight_version()
    thread = threading.Thread(target=rollout)
    thread.start()
    import time

    time.sleep(0.5)
    with WeightSync(_sync_config(server, "tensor", pause_mode="retract")) as sync:
        sync.sync(buckets_of(load_tensors(models[2])), "during-rollout")
    thread.join(timeout=120)
    meta = result["answer"]["meta_info"]
    assert meta["finish_reason"]["type"] == "length"
    versions = [span["version"] for span in meta["weight_versions"]]
    assert versions[0] == version and versions[-1] == "during-rollout"


# -------------------------------------------------------------------------------------------------
# GPU paths (CUDA IPC, NCCL, FP8 serving)

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU and a GPU SGLang install: CUDA IPC handles, NCCL and SGLang's FP8 GEMM kernels "
           "do not exist on CPU (the CPU branches are tested above)")


@pytest.fixture(scope="module")
def gpu_server(models, tmp_path_factory):
    """A GPU engine on the trainer's GPU (as colocated engines are)."""
    with launch_server(models[0], device="cuda", log_dir=str(tmp_path_factory.mktemp("gpu-logs"))) as server:
        yield server


@pytest.fixture(scope="module")
def second_gpu_server(models, tmp_path_factory):
    """A GPU engine on a GPU of its own (NCCL refuses two ranks of one group on one GPU)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL needs the engine on another GPU than the trainer (it refuses two ranks of one group on "
                    "one device); this machine has one GPU")
    with launch_server(models[0], device="cuda", base_gpu_id=1,
                       log_dir=str(tmp_path_factory.mktemp("gpu-logs-1"))) as server:
        yield server


@requires_gpu
@pytest.mark.parametrize("transport,seed", [("tensor", 1), ("distributed", 2)])
def test_gpu_transport_updates_engine(request, models, references, transport, seed):
    """CUDA IPC (tensor) into an engine on the trainer's GPU, NCCL (distributed) into one on another GPU."""
    gpu_server = request.getfixturevalue("gpu_server" if transport == "tensor" else "second_gpu_server")
    tensors = {name: t.cuda() for name, t in load_tensors(models[seed]).items()}
    with WeightSync(WeightSyncConfig(engines=[EngineSpec(gpu_server.url)], transport=transport,
                                     retry_wait_s=0.1)) as sync:
        sync.sync(buckets_of(tensors), f"gpu-{transport}")
        if transport == "distributed":
            assert sync.transport.backend == "nccl"
    _assert_serves(gpu_server, references[seed], f"gpu-{transport}")


@requires_gpu
def test_fp8_engine_serves_quantised_update(tmp_path_factory):
    """An engine serving a block-FP8 checkpoint takes the bridge's quantised weights: its logprobs equal the
    HF forward of the dequantised weights (up to the FP8 activation quantisation of SGLang's kernels)."""
    from alp_megatron.bridge import fp8

    root = tmp_path_factory.mktemp("fp8")
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    source = tiny_model(root / "source", seed=0, **shape)
    trainer = tiny_model(root / "trainer", seed=1, **shape)
    # The served checkpoint: FP8 linears with scales, and the quantization_config that makes SGLang use them.
    served = fp8.write_fp8_checkpoint(source, str(root / "served"))
    # The reference: the trainer's weights after an FP8 round trip.
    dequantised = root / "dequantised"
    tiny_model(dequantised, seed=1, **shape)
    tensors = load_tensors(trainer)
    from safetensors.torch import save_file

    for path in glob.glob(os.path.join(dequantised, "*.safetensors")):
        os.remove(path)
    save_file(dict(fp8.round_bucket(list(tensors.items()))), os.path.join(dequantised, "model.safetensors"))
    reference = HFReference(str(dequantised))
    with launch_server(served, device="cuda", dtype="bfloat16") as server:
        # the bound below means something only if the served weights are far further off (1.21 by transformers
        # on the CPU for these two models, both FP8-rounded; the rounding alone moves logprobs by 0.043)
        assert max_logprob_diff(server.url, reference) > 0.5
        with WeightSync(WeightSyncConfig(engines=[EngineSpec(server.url)], transport="tensor")) as sync:
            report = sync.sync(buckets_of({n: t.cuda() for n, t in tensors.items()}), "fp8-1")
        assert report.fp8
        # bf16 serving with FP8 activations: a loose bound, far below the gap to the old weights
        assert max_logprob_diff(server.url, reference) < 0.1


def test_distributed_refused_bucket_fails_fast_and_the_group_is_rebuilt(server, models, references):
    """An engine that refuses a bucket (here: no weight-update session open) never joins its broadcast:
    the push fails at once naming the engine instead of waiting out the group timeout, the group is torn
    down on both sides, and the next sync builds a new one."""
    import time

    from alp_megatron.bridge.transports import EngineTarget, TransportError
    from alp_megatron.bridge.transports.distributed import DistributedTransport, DistributedTransportConfig

    transport = DistributedTransport(DistributedTransportConfig(backend="gloo", timeout_s=120))
    transport.connect([EngineTarget(EngineControl(server.url))])
    bucket = next(iter(buckets_of(load_tensors(models[2]))()))
    start = time.monotonic()
    with pytest.raises(TransportError) as caught:
        transport.push(bucket)
    assert server.url in str(caught.value) and "begin_weight_update" in str(caught.value)
    transport.close()
    assert time.monotonic() - start < 30 and transport.group_name is None
    with WeightSync(_sync_config(server, "distributed")) as sync:
        sync.sync(buckets_of(load_tensors(models[2])), "after-refusal")
    _assert_serves(server, references[2], "after-refusal")
