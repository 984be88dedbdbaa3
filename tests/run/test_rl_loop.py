"""The RL loop end to end on CPU: `alp-train` under torchrun (TP=2) with a real SGLang server, the bridge
syncing every step, checkpoints, resume, one-step-off, and the errors a user can cause."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from alp_megatron.run.metrics import REQUIRED_KEYS, read_metrics
from tests.processes import descendants, kill_tree, wait_gone

pytestmark = pytest.mark.sglang

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "examples", "cpu_tiny.yaml")
# The CPU example, made small: 8 prompts x 4 samples, 2 mini-batch steps per rollout. The engine computes one
# request at a time (no batching, no prefix reuse): on CPU a matmul's rounding depends on how many rows are
# batched together, and SGLang has no batch-invariant mode there, so the engine's logprobs (the loss's
# denominator) repeat bit for bit only when every request runs alone.
ONE_REQUEST_AT_A_TIME = ('["--max-total-tokens","8192","--max-running-requests","1","--prefill-max-requests","1",'
                         '"--disable-radix-cache"]')  # no spaces: the Slurm test passes overrides word-split
SMALL = ["model.tiny_warm_start_steps=30", "data.prompts_per_step=8", "rollout.sampling.n=4",
         "actor.num_mini_batches=2", "actor.epochs=1", "actor.micro_batch_size=8",
         "rollout.startup_timeout_s=900", "metrics.tensorboard=false", "run.export_hf_at_end=true",
         f"rollout.server_extra_args={ONE_REQUEST_AT_A_TIME}"]


def alp_train(output_dir, *overrides, steps=4, resume=False, wait=True, config=CONFIG):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "alp_megatron.cli", "--config", config, "--output-dir", str(output_dir), "--steps", str(steps),
               *SMALL, *overrides]
    if resume:
        command.append("--resume")
    log = open(os.path.join(str(output_dir) + ".log"), "a")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not wait:
        return process
    code = process.wait(timeout=1500)
    assert code == 0, f"alp-train failed ({code}); log: {open(str(output_dir) + '.log').read()[-4000:]}"
    return process


# Checkpoints every 2 steps, the bridge checked every step, and a KL to the reference model (a resumed run
# must score the same reference).
CHECKED = ("weight_sync.verify_every=1", "checkpoint.save_every=2", "loss.kl_coef=0.001")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    alp_train(out, *CHECKED)
    return out


def test_every_step_logs_every_metric_and_the_bridge_check_passes(uninterrupted):
    records = read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for record in records:
        missing = [key for key in REQUIRED_KEYS if key not in record]
        assert not missing, f"step {record['step']} lacks {missing}"
        assert record["verify_max_logprob_diff"] <= 1e-4  # the engine's logprobs equal the trainer's
        assert record["verify_max_weight_diff"] == 0.0
        assert record["mismatch_k3"] < 1e-6  # fp32 engine and fp32 trainer agree
        assert record["kl_ref_mean"] > 0  # ALP's perturbed policy against the unperturbed starting one
    assert [r["weight_version"] for r in records] == [1, 2, 3, 4]
    assert all(r["time_sync"] > 0 and r["time_rollout"] > 0 and r["time_train"] > 0 for r in records)


def test_the_tiny_moe_example_trains_with_replayed_routes_at_ep2(tmp_path):
    """examples/cpu_tiny_moe.yaml, made small: a tiny Qwen3-MoE served by SGLang with its routes, Megatron at
    EP=2 replaying them, ALP on, weights synced and checked every step."""
    out = tmp_path / "moe"
    alp_train(out, "weight_sync.verify_every=1", steps=2, config=os.path.join(REPO, "examples", "cpu_tiny_moe.yaml"))
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["weight_version"] for r in records] == [1, 2]
    for record in records:
        assert record["verify_max_logprob_diff"] <= 1e-4 and record["verify_max_weight_diff"] == 0.0
        assert record["routes_bytes_per_sample"] > 0  # every sample carried its routes
        # fp32 engine and trainer: the trainer's own top-k is the engine's (ties aside)
        assert record["routing_agreement"] > 0.99 and "routing_agreement_layer1" in record
        assert record["mismatch_k3"] < 1e-6


def test_final_export_is_a_loadable_hf_folder_without_log_sigma(uninterrupted):
    from transformers import AutoModelForCausalLM

    folder = os.path.join(uninterrupted, "hf_final")
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    assert tensors and not any("sigma" in name for name in tensors)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.config.architectures == ["LlamaForCausalLM"]
    # long loads and writes report progress, rank 0 only
    log = open(str(uninterrupted) + ".log").read().splitlines()
    loaded = [line for line in log if "loading this rank's shards of" in line and "(100 %) in" in line]
    written = [line for line in log if f"writing {folder}: " in line and "(100 %) in" in line]
    assert len(loaded) == 1 and "[rank 0]" in loaded[0], log[-40:]
    assert len(written) == 1 and "[rank 0]" in written[0], log[-40:]
    assert sum(bool(re.search(r"\[rank 0\].* saved checkpoint \S+ in \d+\.\d s$", line)) for line in log) == 2


def _wait_until(condition, process, output_dir, what, timeout=1200):
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert condition(), f"{what} never happened; log: {open(str(output_dir) + '.log').read()[-3000:]}"


def test_resume_after_a_kill_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    process = alp_train(out, *CHECKED, wait=False)
    checkpoints = os.path.join(out, "checkpoints")
    latest = os.path.join(checkpoints, "latest")
    _wait_until(lambda: os.path.exists(latest), process, out, "the step-2 checkpoint")
    # every process of the run at once, by process id: torchrun, both ranks, the SGLang server's processes
    killed = kill_tree(process.pid)
    process.wait()
    assert wait_gone(killed, 30) == []
    assert len(killed) >= 5, killed  # torchrun, 2 ranks, SGLang's launcher, scheduler and detokenizer at least
    with open(latest) as handle:
        assert handle.read().strip() == "step_00000002"  # killed before the run could finish
    assert not os.path.exists(os.path.join(checkpoints, "step_00000004"))
    before = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in before][:2] == [0, 1] and len(before) <= 3

    alp_train(out, *CHECKED, resume=True)
    log = open(str(out) + ".log").read()
    assert re.search(r"\[rank 0\].*resumed from \S+/step_00000002 \(next step 2\)", log), log[-3000:]
    full = read_metrics(os.path.join(uninterrupted, "metrics.jsonl"))
    resumed = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]
    assert [r["run_start_step"] for r in resumed] == [0, 0, 2, 2]  # steps 2 and 3 by the resumed process
    assert [r["run_start_step"] for r in full] == [0, 0, 0, 0]

    def kept(record):
        return {k: v for k, v in record.items() if not k.startswith("time_") and k != "run_start_step"}

    for want, got in zip(full, resumed):  # every step identical, bit for bit (steps 2 and 3 after the resume)
        assert kept(got) == kept(want), got["step"]
    final_full = load_file(os.path.join(uninterrupted, "hf_final", "model.safetensors"))
    final_resumed = load_file(os.path.join(out, "hf_final", "model.safetensors"))
    assert final_full.keys() == final_resumed.keys()
    for name in final_full:
        assert torch.equal(final_resumed[name], final_full[name]), name


def test_a_killed_launcher_leaves_no_process_of_its_run(uninterrupted, tmp_path):
    """torchrun killed alone (SIGKILL): its ranks notice, stop the SGLang server rank 0 launched, and exit."""
    out = tmp_path / "orphaned"
    base_model = os.path.join(uninterrupted, "base_model")  # built once, by the uninterrupted run
    process = alp_train(out, f"model.hf_path={base_model}", steps=50, wait=False)
    metrics = os.path.join(out, "metrics.jsonl")
    _wait_until(lambda: os.path.exists(metrics) and read_metrics(metrics), process, out, "a first step")
    run = descendants(process.pid)
    ranks = [pid for pid in run if "alp_megatron.cli" in _cmdline(pid) and "torch.distributed.run" not in _cmdline(pid)]
    servers = [pid for pid in run if "sglang.launch_server" in _cmdline(pid)]
    assert len(ranks) == 2 and servers, {pid: _cmdline(pid) for pid in run}
    os.kill(process.pid, signal.SIGKILL)  # the launcher alone
    process.wait()
    killed_at = time.monotonic()
    left = wait_gone(run, 60)
    assert not left, {pid: _cmdline(pid) for pid in left}
    log = open(str(out) + ".log").read()
    gone = f"the launcher (pid {process.pid}) is gone: stopping what this rank launched"
    assert log.count(gone) == 2, log[-3000:]  # both ranks say so
    assert "Traceback" not in log.split(gone, 1)[1], log[-3000:]  # and stop cleanly
    print(f"every process of the run was gone {time.monotonic() - killed_at:.1f} s after the launcher's death")


def test_a_run_outlives_its_servers(uninterrupted, tmp_path):
    """Two servers behind the router. One is SIGKILLed mid-run, and once steps have completed without it, the
    other (no engine left): every step completes with every sample, the weight version advances by one a step,
    both servers are restarted (side by side), get the current weights (the equality check passes on every
    serving engine after every step) and serve again within the run."""
    out = tmp_path / "outlives"
    base_model = os.path.join(uninterrupted, "base_model")  # built once, by the uninterrupted run
    steps = 12
    process = alp_train(out, f"model.hf_path={base_model}", "rollout.mode=disaggregated", "rollout.servers=2",
                        "rollout.router=true", "weight_sync.verify_every=1", steps=steps, wait=False)
    metrics = os.path.join(out, "metrics.jsonl")

    def records():
        return read_metrics(metrics) if os.path.exists(metrics) else []

    def servers():  # each server's leader: its process group is its own
        return sorted(pid for pid in descendants(process.pid)
                      if "sglang.launch_server" in _cmdline(pid) and _group(pid) == pid)

    _wait_until(lambda: len(records()) >= 1, process, out, "a first step")
    first, second = servers()
    os.killpg(first, signal.SIGKILL)
    _wait_until(lambda: sum(r["servers_in_service"] == 1 for r in records()) >= 2, process, out,
                "two steps without the first server")  # the second one rolled out wholly without it
    os.killpg(second, signal.SIGKILL)
    assert process.wait(timeout=900) == 0, open(str(out) + ".log").read()[-4000:]
    done = records()
    assert [r["step"] for r in done] == list(range(steps))
    assert [r["weight_version"] for r in done] == list(range(1, steps + 1))
    assert all(r["samples"] == 32 and r["verify_max_weight_diff"] == 0.0 for r in done)
    # synchronous: every token was sampled by the weights about to be trained, on a restarted server too
    assert all(r["staleness_max"] == 0 for r in done)
    assert done[-1]["server_restarts"] == 2 and done[-1]["servers_in_service"] == 2
    log = open(str(out) + ".log").read()
    assert log.count("is back in service with the current weights") == 2


def _group(pid: int):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# Rollouts two batches ahead of training, weight updates landing mid-rollout, samples saved. Responses of 20
# tokens, one request at a time: a batch takes longer to generate than a step to train, so the engine is busy at
# every update (with 5-token responses it can finish every batch ahead before the first update).
ASYNCHRONOUS = ("rollout.mode=disaggregated", "rollout.max_staleness=2", "rollout.sampling.max_new_tokens=20",
                "rollout.sampling.ignore_eos=true", "metrics.save_rollouts=true")


@pytest.fixture(scope="module")
def asynchronous(uninterrupted, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "asynchronous"
    alp_train(out, f"model.hf_path={os.path.join(uninterrupted, 'base_model')}", *ASYNCHRONOUS, steps=4)
    return out


def _trained_token_ages(run_dir, records) -> tuple[list[int], int]:
    """For every trained token, how many versions its weights are older than the policy that trains on it;
    and how many samples carry two or more versions. Asserts every step trained a full batch."""
    ages, partial = [], 0
    for step, record in enumerate(records):
        assert record["weight_version"] == step + 1 and record["samples"] == 32
        for sample in _saved_samples(run_dir, step):
            versions = {span["version"] for span in sample["weight_versions"]}
            partial += len(versions) > 1
            for span in sample["weight_versions"]:
                ages += [step - int(span["version"][1:])] * sum(sample["loss_mask"][span["start"]:span["end"]])
    return ages, partial


def test_asynchronous_training_keeps_every_trained_token_within_the_staleness_bound(asynchronous):
    """Asserted from each trained token's weight version: none is more than 2 versions older than the policy
    that trains on it; samples continued across an update carry two or more versions; the metrics agree."""
    records = read_metrics(os.path.join(asynchronous, "metrics.jsonl"))
    ages, partial = _trained_token_ages(asynchronous, records)
    assert max(ages) <= 2 and max(ages) >= 1 and min(ages) >= 0  # the bound holds, and it is really asynchronous
    assert partial > 0 and any(r["partial_share"] > 0 for r in records)
    assert all(r["staleness_max"] <= 2 and r["stale_groups_dropped"] == 0 for r in records)
    assert records[0]["rollouts_ahead"] == 2


def test_a_resumed_asynchronous_run_keeps_the_bound_and_trains_every_prompt(uninterrupted, asynchronous, tmp_path):
    """Stopped after step 2 with two batches generating ahead, then resumed: the resumed run trains steps 2 and
    3 on the very prompts (by group id) the uninterrupted run trained there (the batches ahead were not in the
    checkpoint, so their prompts are drawn again: none lost, none twice), each a full batch within the bound."""
    out = tmp_path / "resumed"
    settings = (f"model.hf_path={os.path.join(uninterrupted, 'base_model')}", *ASYNCHRONOUS, "checkpoint.save_every=2")
    alp_train(out, *settings, steps=2)
    alp_train(out, *settings, steps=4, resume=True)
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["run_start_step"] for r in records] == [0, 0, 2, 2]
    ages, _ = _trained_token_ages(out, records)
    assert max(ages) <= 2 and min(ages) >= 0
    assert all(r["stale_groups_dropped"] == 0 for r in records)

    def prompts(run_dir, step):
        return {sample["group_id"]: sample["prompt_ids"] for sample in _saved_samples(run_dir, step)}

    for step in range(4):
        assert prompts(out, step) == prompts(asynchronous, step), step


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def one_step_off(tmp_path_factory):
    """One-step-off with a bfloat16 engine holding FP8-rounded weights (a real train-inference mismatch), the
    bridge checked every step in its FP8 form, dynamic sampling, its samples saved."""
    out = tmp_path_factory.mktemp("runs") / "one_step_off"
    alp_train(out, "rollout.mode=disaggregated", "rollout.one_step_off=true", "rollout.server_dtype=bfloat16",
              "weight_sync.rollout_precision=fp8_rounded", "weight_sync.verify_every=1",
              "rollout.dynamic_sampling.max_gen_batches=3", "metrics.save_rollouts=true", steps=3)
    return out


def test_dynamic_sampling_trains_only_on_groups_with_a_reward_spread(one_step_off):
    records = read_metrics(os.path.join(one_step_off, "metrics.jsonl"))
    for step, record in enumerate(records):
        assert 1 <= record["dynamic_sampling_gen_batches"] <= 3
        if not record["dynamic_sampling_capped"]:
            assert record["dynamic_sampling_kept_groups"] == 8 and record["samples"] == 32
        groups = {}
        for sample in _saved_samples(one_step_off, step):
            groups.setdefault(sample["group_id"], []).append(sample["reward"])
        assert len(groups) == record["dynamic_sampling_kept_groups"]
        assert all(max(rewards) > min(rewards) for rewards in groups.values())


def test_fp8_rounded_engines_hold_the_trainers_weights_rounded_from_the_first_rollout(one_step_off):
    """Every step's check in the FP8 form passes (the engine holds each quantised linear's e4m3 round trip, in
    bf16, exactly), and step 0's engine logprobs are nearer those of the rounded starting weights than of the
    starting weights themselves: the sync at start rounded them before the first rollout."""
    from transformers import AutoModelForCausalLM

    from alp_megatron.bridge import fp8

    records = read_metrics(os.path.join(one_step_off, "metrics.jsonl"))
    assert [r["verify_max_weight_diff"] for r in records] == [0.0, 0.0, 0.0]
    assert all(r["train_rollout_logprob_abs_diff"] > 0 and "staleness_token_mean" in r for r in records)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(one_step_off, "base_model"), dtype=torch.float64)
    samples = _saved_samples(one_step_off, 0)
    distance = {}
    for form in ("unrounded", "rounded"):
        if form == "rounded":
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if fp8.is_quantised_name(name):
                        parameter.copy_(fp8.round_blockwise(parameter.float()))
        distance[form] = sum(float((_hf_logprobs(model, s) - torch.tensor(s["rollout_logprobs"],
                                                                           dtype=torch.float64)).abs().sum())
                             for s in samples)
    assert distance["rounded"] < 0.5 * distance["unrounded"], distance


def _saved_samples(run_dir, step):
    with open(os.path.join(run_dir, "rollouts", f"step_{step:08d}.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _hf_logprobs(model, sample):
    """``transformers``' logprob of each response token of a saved sample."""
    prompt, response = sample["prompt_ids"], sample["response_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_one_step_off_keeps_staleness_at_most_one(one_step_off):
    records = read_metrics(os.path.join(one_step_off, "metrics.jsonl"))
    assert len(records) == 3
    assert records[0]["staleness_max"] == 0  # the first rollout uses the starting weights
    assert all(r["staleness_max"] <= 1 for r in records)
    assert any(r["staleness_mean"] == 1 for r in records[1:])


def test_reported_mismatch_equals_one_computed_from_the_same_samples(one_step_off):
    """Step 0's mismatch_k3 against one computed here from the saved samples' engine logprobs and the starting
    model's logprobs by transformers (every step-0 sample was generated from those weights, FP8-rounded, and
    the trainer scores them unrounded: the mismatch includes the rounding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(one_step_off, "base_model"), dtype=torch.float64)
    samples = _saved_samples(one_step_off, 0)
    assert len(samples) == 32
    total, tokens = 0.0, 0
    for sample in samples:
        log_ratio = _hf_logprobs(model, sample) - torch.tensor(sample["rollout_logprobs"], dtype=torch.float64)
        total += float((torch.exp(log_ratio) - 1 - log_ratio).sum())
        tokens += len(sample["response_ids"])
    expected = total / tokens
    reported = read_metrics(os.path.join(one_step_off, "metrics.jsonl"))[0]["mismatch_k3"]
    assert expected > 1e-7  # an FP8-rounded bfloat16 engine against the fp32 trainer: a mismatch worth measuring
    assert reported == pytest.approx(expected, rel=1e-2)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "alp_megatron.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_unknown_or_ill_typed_config_fields_fail_at_start(tmp_path):
    result = _cli("--config", CONFIG, "--output-dir", str(tmp_path), "alp.sigma0=0.1")
    assert result.returncode == 2 and "alp.sigma0" in result.stderr and "sigma_0" in result.stderr
    result = _cli("--config", CONFIG, "--output-dir", str(tmp_path), "actor.num_mini_batches=two")
    assert result.returncode == 2 and "actor.num_mini_batches" in result.stderr
    assert not os.listdir(tmp_path)


def test_distributed_into_colocated_engines_is_refused_where_it_would_be_nccl():
    from alp_megatron.errors import ConfigError
    from alp_megatron.bridge.weight_update import check_transport_reaches_engines

    with pytest.raises(ConfigError, match="weight_sync.transport") as caught:
        check_transport_reaches_engines("distributed", "colocated", cuda_available=True)
    assert "NCCL" in str(caught.value) and "transport=tensor" in str(caught.value)
    check_transport_reaches_engines("distributed", "colocated", cuda_available=False)  # gloo, as on CPU
    check_transport_reaches_engines("distributed", "disaggregated", cuda_available=True)
    check_transport_reaches_engines("tensor", "colocated", cuda_available=True)


def test_an_unreachable_engine_is_named(tmp_path):
    result = _cli("--config", CONFIG, "--output-dir", str(tmp_path / "run"), *SMALL, "parallel.tensor_parallel=1",
                  "rollout.mode=disaggregated", "rollout.server_urls=[http://127.0.0.1:9]")
    assert result.returncode != 0
    assert "http://127.0.0.1:9" in result.stderr


def test_a_checkpoint_of_another_model_is_refused_untouched(uninterrupted, tmp_path):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(uninterrupted, out)
    before = {name: os.path.getmtime(os.path.join(out, "checkpoints", name))
              for name in os.listdir(os.path.join(out, "checkpoints"))}
    # a differently shaped model (3 layers instead of 2) reading the 2-layer run's checkpoint
    other = tmp_path / "other_model"
    from alp_megatron.model.tiny import save_tiny_model
    from alp_megatron.model.warm_start import TINY_DEMO_SHAPE

    save_tiny_model(str(other), "LlamaForCausalLM", **{**TINY_DEMO_SHAPE, "num_hidden_layers": 3})
    result = _cli("--config", CONFIG, "--output-dir", str(out), "--resume", *SMALL, "parallel.tensor_parallel=1",
                  f"model.hf_path={other}", "run.steps=6")
    assert result.returncode != 0
    assert "does not fit this model" in result.stderr
    after = {name: os.path.getmtime(os.path.join(out, "checkpoints", name))
             for name in os.listdir(os.path.join(out, "checkpoints"))}
    assert after == before


def test_a_dataset_row_without_its_answer_is_named(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1234=", "label": "4321"}) + "\n" + json.dumps({"prompt": "5678="}) + "\n")
    result = _cli("--config", CONFIG, "--output-dir", str(tmp_path / "run"), *SMALL, "parallel.tensor_parallel=1",
                  "data.toy_task=null", f"data.paths=[{data}]", "data.apply_chat_template=false",
                  "reward.function=exact_match")
    assert result.returncode != 0
    assert "prompts.jsonl" in result.stderr and "line 2" in result.stderr and "label" in result.stderr


def test_the_tool_example_learns_to_use_the_python_tool(tmp_path):
    """examples/cpu_tiny_tools.yaml, made small: the tiny model writes code, the sandboxed Python tool runs it,
    the result comes back as tool tokens, the model answers; its reward rises within a few steps."""
    out = tmp_path / "tools"
    # the example's own settings (SMALL's are for the single-turn task), 6 steps
    alp_train(out, "model.tiny_warm_start_steps=300", "data.prompts_per_step=16", "rollout.sampling.n=8",
              "actor.epochs=2", "actor.num_mini_batches=4",
              'rollout.server_extra_args=["--max-total-tokens","16384","--max-running-requests","256"]',
              "run.export_hf_at_end=false", steps=6, config=os.path.join(REPO, "examples", "cpu_tiny_tools.yaml"))
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    rewards = [record["reward_mean"] for record in records]
    assert sum(rewards[-2:]) / 2 >= sum(rewards[:2]) / 2 + 0.05, rewards  # measured: 0.25 -> 0.40
    for record in records:
        assert record["agent_tool_calls_mean"] > 0.5 and record["agent_turns_mean"] > 1.5  # it used the tool
        assert record["agent_tool_tokens_mean"] > 0 and record["agent_tool_error_share"] < 0.5
        assert record["mismatch_k3"] < 1e-6  # fp32 engine and trainer agree on every model token
