"""The noise scheme and the perturbation module, without Megatron or process groups."""

import math

import pytest
import torch

from alp_megatron.alp.perturbation import (
    LayerPerturbation, NoiseKey, NoiseSource, PerturbationConfig, SequenceShard, alp_disabled, noise_seed,
)
from alp_megatron.errors import ConfigError

FULL = torch.Size([12, 2, 8])  # [seq, batch, hidden]


def draw(shard: SequenceShard, key=NoiseKey(3, (10, 11)), layer=2) -> torch.Tensor:
    local = torch.Size([FULL[0] // (shard.full_length(1)), FULL[1], FULL[2]])
    return NoiseSource(seed=5).draw(key, layer, shard, local, "cpu")


def test_noise_is_a_function_of_seed_step_sample_and_layer():
    a = draw(SequenceShard())
    assert torch.equal(a, draw(SequenceShard()))
    assert not torch.equal(a, draw(SequenceShard(), key=NoiseKey(4, (10, 11))))
    assert not torch.equal(a, draw(SequenceShard(), layer=3))
    # a sample's noise does not depend on which other samples share its micro-batch
    single = NoiseSource(seed=5).draw(NoiseKey(3, (11,)), 2, SequenceShard(), torch.Size([12, 1, 8]), "cpu")
    assert torch.equal(single[:, 0], a[:, 1])


def test_noise_is_standard_normal():
    source = NoiseSource(seed=1)
    eps = source.draw(NoiseKey(0, tuple(range(8))), 0, SequenceShard(), torch.Size([256, 8, 64]), "cpu")
    assert eps.dtype == torch.float32
    assert abs(eps.mean().item()) < 0.01 and abs(eps.std().item() - 1) < 0.01


def test_sequence_parallel_shards_are_exact_slices_of_the_unsharded_noise():
    full = draw(SequenceShard())
    shards = [draw(SequenceShard(tp_rank=r, tp_size=3, sequence_parallel=True)) for r in range(3)]
    assert torch.equal(torch.cat(shards, dim=0), full)


def test_tensor_parallel_without_sp_sees_identical_noise():
    full = draw(SequenceShard())
    for rank in range(2):
        assert torch.equal(draw(SequenceShard(tp_rank=rank, tp_size=2)), full)


def test_context_parallel_uses_megatrons_load_balanced_chunks():
    full = draw(SequenceShard())  # 12 rows = 4 chunks of 3 for cp=2
    chunks = full.chunk(4, dim=0)
    rank0 = draw(SequenceShard(cp_rank=0, cp_size=2))
    rank1 = draw(SequenceShard(cp_rank=1, cp_size=2))
    assert torch.equal(rank0, torch.cat([chunks[0], chunks[3]]))
    assert torch.equal(rank1, torch.cat([chunks[1], chunks[2]]))
    # context then sequence parallel: each TP rank holds half of its CP rank's rows
    both = [draw(SequenceShard(tp_rank=t, tp_size=2, sequence_parallel=True, cp_rank=1, cp_size=2))
            for t in range(2)]
    assert torch.equal(torch.cat(both), rank1)



def _noise(key, shard, rows, hidden=8, source=None, columns=None):
    """This rank's noise for a sequence of ``rows`` full rows."""
    source = source or NoiseSource(seed=5)
    local = torch.Size([shard.local_length(rows), key.batch, hidden if columns is None else columns[0]])
    return source.draw(key, 2, shard, local, "cpu", None if columns is None else columns[1])


def test_a_tokens_noise_is_the_same_padded_to_any_length_or_packed_at_any_offset():
    # samples longer than a noise block, at offsets that are not multiples of one
    short, long = 70, 150
    padded = _noise(NoiseKey(3, (10, 11)), SequenceShard(), 160)
    assert torch.equal(_noise(NoiseKey(3, (10, 11)), SequenceShard(), 224)[:160], padded)
    first = _noise(NoiseKey(3, (10, 11), lengths=(short, long)), SequenceShard(), 230)[:, 0]
    second = _noise(NoiseKey(3, (11, 10), lengths=(long, short)), SequenceShard(), 230)[:, 0]
    assert torch.equal(first[:short], padded[:short, 0]) and torch.equal(second[long : long + short], padded[:short, 0])
    assert torch.equal(first[short : short + long], padded[:long, 1]) and torch.equal(second[:long], padded[:long, 1])
    assert not first[short + long :].any()  # the packed micro-batch's padding gets no noise


def test_packed_samples_split_by_sequence_parallelism_are_exact_slices():
    key = NoiseKey(3, (10, 11, 12), lengths=(70, 150, 9))
    whole = _noise(key, SequenceShard(), 232)
    for tp in (2, 4):
        parts = [_noise(key, SequenceShard(tp_rank=r, tp_size=tp, sequence_parallel=True), 232) for r in range(tp)]
        assert torch.equal(torch.cat(parts), whole)


def test_packed_context_parallelism_splits_each_sample_into_its_own_chunks():
    # Megatron's THD format under CP=2: each sample padded to a multiple of 4 rows and cut into 4 chunks;
    # CP rank r holds chunks r and 3 - r of every sample, and SP then splits that
    lengths, padded = (70, 150), (72, 152)
    key = NoiseKey(3, (10, 11), lengths=lengths, padded_lengths=padded)
    whole = _noise(key, SequenceShard(), 224)
    samples = whole.split(list(padded))
    for cp_rank in range(2):
        expected = torch.cat([torch.cat([c[cp_rank], c[3 - cp_rank]]) for c in (s.chunk(4) for s in samples)])
        assert torch.equal(_noise(key, SequenceShard(cp_rank=cp_rank, cp_size=2), 224), expected)
        split = [_noise(key, SequenceShard(tp_rank=t, tp_size=2, sequence_parallel=True, cp_rank=cp_rank,
                                           cp_size=2), 224) for t in range(2)]
        assert torch.equal(torch.cat(split), expected)
    assert not samples[0][70:].any() and not samples[1][150:].any()  # the rows CP padding adds


def test_a_rank_draws_noise_for_its_own_rows_only():
    from alp_megatron.alp.perturbation import ROW_BLOCK

    rows, hidden, key = 16 * ROW_BLOCK, 8, NoiseKey(0, (4,))
    for shard, local in ((SequenceShard(), rows), (SequenceShard(tp_size=4, sequence_parallel=True), rows // 4),
                         (SequenceShard(cp_rank=1, cp_size=2), rows // 2),
                         (SequenceShard(cp_rank=1, cp_size=4, tp_rank=1, tp_size=2, sequence_parallel=True),
                          rows // 8)):
        source = NoiseSource(seed=5)
        _noise(key, shard, rows, hidden, source)
        assert source.drawn_elements == local * hidden  # block-aligned rows: nothing drawn but what is used
    # rows that start and end inside a block cost at most one block at each edge of each run
    source = NoiseSource(seed=5)
    shard = SequenceShard(tp_rank=1, tp_size=3, sequence_parallel=True)
    _noise(key, shard, 3 * 100, hidden, source)
    assert 100 * hidden <= source.drawn_elements <= (100 + 2 * ROW_BLOCK) * hidden


def test_a_vocab_parallel_rank_draws_the_logits_noise_of_its_own_columns_only():
    from alp_megatron.alp.perturbation import COLUMN_BLOCK, ROW_BLOCK, ColumnShard

    vocab, tp = 152064, 8
    width = vocab // tp
    for rank in (0, 3, 7):
        source = NoiseSource(seed=5)
        _noise(NoiseKey(0, (4,)), SequenceShard(), ROW_BLOCK, source=source,
               columns=(width, ColumnShard(rank * width, vocab)))
        assert source.drawn_elements <= ROW_BLOCK * (width + 2 * COLUMN_BLOCK) < ROW_BLOCK * vocab / 2


def test_noise_seed_is_stable_and_mixes_every_part():
    assert noise_seed(1, 2, 3, 4) == noise_seed(1, 2, 3, 4)
    seeds = {noise_seed(1, 2, 3, 4), noise_seed(1, 2, 4, 3), noise_seed(2, 1, 3, 4), noise_seed(1, 2, 3, 5)}
    assert len(seeds) == 4
    assert 0 <= noise_seed(2**70, -1) < 2**63


def perturbation(sigma_0=0.1, seed=0):
    source = NoiseSource(seed)
    return source, LayerPerturbation(source, layer_index=0, shard=SequenceShard(), sigma_0=sigma_0)


def test_training_forward_adds_sigma_times_noise_and_eval_does_not():
    source, module = perturbation(sigma_0=0.25)
    hidden = torch.randn(FULL)
    source.set_microbatch(7, [0, 1])
    out = module(hidden)
    eps = source.draw(NoiseKey(7, (0, 1)), 0, SequenceShard(), FULL, "cpu")
    torch.testing.assert_close(out, hidden + 0.25 * eps, rtol=0, atol=1e-6)
    module.eval()
    assert module(hidden) is hidden


def test_disabled_context_skips_and_restores():
    source, module = perturbation()
    hidden = torch.randn(FULL)
    source.set_microbatch(0, [0, 1])
    with alp_disabled(module):
        assert module(hidden) is hidden
    assert not torch.equal(module(hidden), hidden)


def test_missing_key_is_a_clear_error():
    _, module = perturbation()
    with pytest.raises(RuntimeError, match="set_microbatch"):
        module(torch.randn(FULL))


def test_wrong_number_of_sample_ids_is_an_error():
    source, module = perturbation()
    source.set_microbatch(0, [0, 1, 2])
    with pytest.raises(RuntimeError, match="3 sample ids but the micro-batch has 2"):
        module(torch.randn(FULL))


def test_log_sigma_gradient_is_the_reparameterised_one():
    source, module = perturbation(sigma_0=0.3)
    hidden = torch.randn(FULL)
    weights = torch.randn(FULL)
    source.set_microbatch(1, [4, 5])
    (module(hidden) * weights).sum().backward()
    eps = source.draw(NoiseKey(1, (4, 5)), 0, SequenceShard(), FULL, "cpu")
    expected = (weights * 0.3 * eps).sum()  # d/dlog_sigma of sigma*eps = sigma*eps
    torch.testing.assert_close(module.log_sigma.grad, expected, rtol=1e-5, atol=1e-6)


def test_log_sigma_stays_fp32_when_the_model_is_cast():
    _, module = perturbation()
    module.bfloat16()
    assert module.log_sigma.dtype == torch.float32


def test_bf16_hidden_states_get_bf16_output():
    source, module = perturbation()
    source.set_microbatch(0, [0, 1])
    assert module(torch.randn(FULL, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_recomputation_replays_the_key_of_each_micro_batch_in_order():
    """A no-grad training forward (Megatron's checkpoint first pass) queues its key; the re-run inside
    backward takes the keys in first-in first-out order even after later micro-batches set theirs."""
    source = NoiseSource(seed=0, replays_recompute=True)
    source.set_microbatch(0, [0])
    with torch.no_grad():
        assert source.key_for(1, training=True) == NoiseKey(0, (0,))
    source.set_microbatch(0, [1])
    with torch.no_grad():
        assert source.key_for(1, training=True) == NoiseKey(0, (1,))
    replayed = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            replayed.append(source.key_for(1, training=True))
            return grad

    x = torch.ones(1, requires_grad=True)
    (Probe.apply(x) + Probe.apply(x)).sum().backward()
    assert replayed == [NoiseKey(0, (0,)), NoiseKey(0, (1,))]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sigma_0=-0.1), "alp.sigma_0"),
        (dict(sigma_0=0.0), "alp.sigma_0"),
        (dict(sigma_0=math.inf), "alp.sigma_0"),
        (dict(perturb_start=-1), "alp.perturb_start"),
        (dict(perturb_start=2, perturb_end=2), "alp.perturb_end"),
        (dict(sigma_lr=-1.0), "alp.sigma_lr"),
        (dict(sigma_weight_decay=-0.1), "alp.sigma_weight_decay"),
    ],
)
def test_bad_perturbation_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as error:
        PerturbationConfig(**kwargs)
    assert "Fix:" in str(error.value)


def test_layer_range_outside_the_model_names_the_field():
    with pytest.raises(ConfigError, match="alp.perturb_start"):
        PerturbationConfig(perturb_start=4).check_layers(4)
    with pytest.raises(ConfigError, match="alp.perturb_end"):
        PerturbationConfig(perturb_end=5).check_layers(4)
    PerturbationConfig(perturb_start=1, perturb_end=4).check_layers(4)


def test_layer_range_selects_layers():
    cfg = PerturbationConfig(perturb_start=1, perturb_end=3)
    assert [cfg.perturbs(i, 4) for i in range(4)] == [False, True, True, False]
    assert not PerturbationConfig(enabled=False).perturbs(0, 4)


def test_vocab_parallel_logits_noise_is_an_exact_column_slice():
    from alp_megatron.alp.perturbation import ColumnShard

    source, key, shape = NoiseSource(seed=5), NoiseKey(3, (10, 11)), torch.Size([12, 2, 8])
    full = source.draw(key, 4, SequenceShard(), shape, "cpu", ColumnShard(0, 8))
    halves = [source.draw(key, 4, SequenceShard(), torch.Size([12, 2, 4]), "cpu", ColumnShard(start, 8))
              for start in (0, 4)]
    assert torch.equal(torch.cat(halves, dim=-1), full)
    # a vocabulary of 7 padded to 8 for two ranks: the padding column gets no noise
    real = source.draw(key, 4, SequenceShard(), torch.Size([12, 2, 7]), "cpu", ColumnShard(0, 7))
    padded = [source.draw(key, 4, SequenceShard(), torch.Size([12, 2, 4]), "cpu", ColumnShard(start, 7))
              for start in (0, 4)]
    assert torch.equal(torch.cat(padded, dim=-1)[..., :7], real)
    assert torch.equal(padded[1][..., 3], torch.zeros(12, 2))


def test_logits_target_leaves_the_layers_alone():
    config = PerturbationConfig(target="logits")
    assert config.perturbs_logits and not any(config.perturbs(layer, 4) for layer in range(4))
    assert not PerturbationConfig().perturbs_logits
    assert not PerturbationConfig(target="logits", enabled=False).perturbs_logits
    with pytest.raises(ConfigError, match="alp.target"):
        PerturbationConfig(target="embeddings")
