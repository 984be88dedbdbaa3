"""The study's numbers, table and claims from metrics records (no runs needed)."""

import math

import pytest

from alp_megatron.study.analysis import (
    claims, configuration_result, markdown_table, plot_all, results_by_configuration, verdicts,
)
from alp_megatron.study.plan import StudyConfig

STUDY = StudyConfig()


def records(rewards, p999=2.0, k3=1e-5, grad=1.0, alp=False, spike_at=None):
    out = []
    for step, reward in enumerate(rewards):
        record = {"step": step, "reward_mean": reward, "train_infer_ratio_seq_p2": 0.5,
                  "train_infer_ratio_seq_p98": 1.5, "train_infer_ratio_seq_p999": p999 + step,
                  "train_infer_ratio_seq_max": 2 * p999 + step, "mismatch_k3": k3, "grad_norm_max": grad,
                  "sigma_mean": 0.02, "sigma_layer0": 0.02, "sigma_layer1": 0.021}
        if step == spike_at:
            record.update(grad_norm_max=10 * grad, mismatch_k3=1.0)
        if alp:
            record["noise_ratio_mean"] = 0.01
        out.append(record)
    return out


def test_configuration_numbers_across_seeds():
    seeds = [records([0.1] * 5 + [0.5] * 5, spike_at=3), records([0.1] * 5 + [0.7] * 5, alp=True)]
    result = configuration_result("alp_seq", seeds, STUDY)
    assert result.reward_final_mean == pytest.approx(0.6)
    assert result.reward_final_std == pytest.approx(math.sqrt(0.02))
    assert result.ratio_p999 == pytest.approx(2.0 + 9) and result.ratio_max == pytest.approx(4.0 + 9)
    assert result.k3_spike_steps == 0.5 and result.grad_spikes == 0.5
    assert result.ratio_spike_steps == 9  # p99.9 = 2.0 + step: above 2.0 from step 1 (p2 = 0.5 is not below 1/2)
    assert result.sigma_end == pytest.approx(0.02)


def test_claims_compare_alp_with_each_baseline_and_ablation():
    runs = {"bypass": [records([0.2] * 6, p999=5.0, k3=1e-3), records([0.2] * 6, p999=5.5, k3=2e-3)],
            "alp_seq": [records([0.4] * 6, alp=True), records([0.4] * 6, p999=2.5, k3=2e-5, alp=True)],
            "late_third": [records([0.5] * 6, alp=True)]}
    found = {claim.text: claim.holds for claim in claims(results_by_configuration(runs, STUDY))}
    assert found["ALP's sequence-ratio tail (p99.9) stays below that of bypass"] is True
    assert found["ALP's train-inference KL (mismatch k3) stays below that of bypass"] is True
    assert found["perturbing all layers beats late third"] is None  # one seed: no spread to judge by


def test_tail_and_kl_claims_within_the_seed_spread_are_not_shown():
    runs = {"bypass": [records([0.2] * 6, p999=5.0, k3=3e-3), records([0.2] * 6, p999=9.0, k3=4e-3)],
            "tis": [records([0.2] * 6, p999=1.0, k3=1e-3), records([0.2] * 6, p999=1.2, k3=1.1e-3)],
            "alp_seq": [records([0.4] * 6, p999=4.0, k3=3.5e-3, alp=True),
                        records([0.4] * 6, p999=6.0, k3=3.6e-3, alp=True)]}
    found = {claim.text: claim.holds for claim in claims(results_by_configuration(runs, STUDY))}
    assert found["ALP's sequence-ratio tail (p99.9) stays below that of bypass"] is None  # 2.0 apart, std 2.8
    assert found["ALP's train-inference KL (mismatch k3) stays below that of bypass"] is None
    assert found["ALP's sequence-ratio tail (p99.9) stays below that of tis"] is False  # 3.9 apart, std 1.4
    assert found["ALP's train-inference KL (mismatch k3) stays below that of tis"] is False


def test_reward_claims_use_the_seed_spread():
    seeds = lambda rewards, **kw: [records([r] * 6, **kw) for r in rewards]  # noqa: E731
    runs = {"bypass": seeds([0.30, 0.32]), "alp_seq": seeds([0.50, 0.52], alp=True),
            "late_third": seeds([0.49, 0.53], alp=True), "logits_only": seeds([0.70, 0.72], alp=True)}
    found = {claim.text: claim.holds for claim in claims(results_by_configuration(runs, STUDY))}
    assert found["ALP learns at least as well as bypass"] is True
    assert found["perturbing all layers beats late third"] is None  # inside one std
    assert found["perturbing all layers beats logits only"] is False


def test_a_verdict_per_claim_names_where_it_held_and_failed_and_says_untested_below_the_gate():
    seeds = lambda rewards, **kw: [records([r] * 6, **kw) for r in rewards]  # noqa: E731
    runs = {"bypass": seeds([0.30, 0.32], p999=5.0), "tis": seeds([0.30, 0.32], p999=1.0),
            "alp_seq": seeds([0.50, 0.52], p999=2.0, alp=True), "logits_only": seeds([0.70, 0.72], alp=True)}
    found = claims(results_by_configuration(runs, STUDY))
    lines = verdicts(found, gate_reached=True)
    assert len(lines) == 4
    tail = next(line for line in lines if "tail" in line)
    assert "holds against bypass" in tail and "FAILS against tis" in tail
    assert "FAILS against logits_only" in next(line for line in lines if "all layers" in line)
    assert all("untested here" in line for line in verdicts(found, gate_reached=False))


def test_a_seed_without_a_number_does_not_blank_the_configuration():
    complete, partial = records([0.4] * 6), records([0.6] * 6)
    for record in partial:
        del record["train_infer_ratio_seq_p999"]
    result = configuration_result("bypass", [complete, partial], STUDY)
    assert result.ratio_p999 == pytest.approx(2.0 + 5) and result.reward_final_mean == pytest.approx(0.5)
    assert math.isnan(configuration_result("bypass", [complete], STUDY).reward_final_std)


def test_table_and_plots(tmp_path):
    runs = {"grpo": [records([0.2] * 6)] * 2, "alp_seq": [records([0.3] * 6, alp=True)] * 2}
    table = markdown_table(results_by_configuration(runs, STUDY), STUDY)
    assert table.count("\n") == 3 and "| alp_seq | 2 |" in table
    paths = plot_all(runs, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["ratio_envelope.png", "reward.png", "sigma.png"]


def test_the_corrected_share_is_what_the_methods_correction_truncated_or_masked():
    tis = [records([0.4] * 4), records([0.4] * 4)]
    for step, record in enumerate(tis[0] + tis[1]):
        record["tis_clip_frac"] = 0.1 * (step % 2)
    assert configuration_result("tis", tis, STUDY).corrected == pytest.approx(0.05)
    assert configuration_result("bypass", [records([0.4] * 4)], STUDY).corrected is None
    table = markdown_table(results_by_configuration({"tis": tis, "bypass": [records([0.4] * 4)]}, STUDY), STUDY)
    assert "| corrected share |" in table.splitlines()[0] and "| 0.0500 |" in table and table.count("|") > 20
