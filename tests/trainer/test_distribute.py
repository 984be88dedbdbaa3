"""The rollout batch reaches each rank once: rank 0 sends each data-parallel group its share as tensors, and
the group's first rank passes it on inside the group (real gloo ranks)."""

import pytest
import torch

from alp_megatron.model.provider import ParallelConfig
from alp_megatron.sample import Sample
from alp_megatron.trainer.actor import ActorConfig
from alp_megatron.trainer.batch import build_training_batch, share_indices
from alp_megatron.trainer.distribute import flatten, unflatten
from tests.distributed import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.plumbing]

LENGTHS = [30, 5, 12, 30, 7, 22, 3, 18]  # responses; prompts are 3 tokens


def _batch():
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 90, (3,), generator=gen).tolist() for _ in LENGTHS]
    responses = [torch.randint(1, 90, (n,), generator=gen).tolist() for n in LENGTHS]
    logprobs = [(-torch.rand(n, generator=gen)).tolist() for n in LENGTHS]
    advantages = torch.randn(len(LENGTHS), generator=gen).tolist()
    masks = [[int(j % 5 != 2) for j in range(n)] for n in LENGTHS]  # every fifth token a tool's
    routes = [torch.randint(0, 8, (3 + n, 2, 3), generator=gen, dtype=torch.int16) for n in LENGTHS]
    return build_training_batch([Sample.given(p, r, lp, a, 50 + i, loss_mask=m, extras={"routes": e})
                                 for i, (p, r, lp, a, m, e)
                                 in enumerate(zip(prompts, responses, logprobs, advantages, masks, routes))])


def test_flatten_then_unflatten_gives_back_every_real_token():
    batch = _batch()
    rows = torch.tensor([6, 0, 3])
    flat = flatten(batch, rows)
    assert flat["tokens"].numel() == int(batch.lengths[rows].sum())  # no padding travels
    again = unflatten(flat, pad_to_multiple=4)
    assert again.seq_length == 36 and torch.equal(again.sample_ids, batch.sample_ids[rows])
    for i, row in enumerate(rows.tolist()):
        n = int(batch.lengths[row])
        for name in ("tokens", "loss_mask", "rollout_logprobs"):
            assert torch.equal(getattr(again, name)[i, :n], getattr(batch, name)[row, :n]), name
        assert torch.equal(again.targets[i, : n - 1], batch.targets[row, : n - 1])
        assert not again.loss_mask[i, n - 1 :].any()
        assert torch.equal(again.extras["routes"][i, :n], batch.extras["routes"][row, :n])
        assert again.extras["routes"].dtype == torch.int16 and not again.extras["routes"][i, n:].any()
    assert 0 < batch.loss_mask.sum() < sum(LENGTHS)  # the tool tokens' zeros travel too


def _receive(parallel: ParallelConfig, config: ActorConfig) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from alp_megatron.model.provider import initialize_parallel
    from alp_megatron.trainer.distribute import distribute

    initialize_parallel(parallel)
    batch = _batch()  # the expected values; only rank 0 passes it on
    local = distribute(batch if dist.get_rank() == 0 else None, config)
    expected = share_indices(batch.lengths.tolist(), config, parallel_state.get_data_parallel_world_size(),
                             parallel_state.get_data_parallel_rank())
    same = True
    for share, rows in zip(local.shares, expected):
        for i, row in enumerate(rows):
            n = int(batch.lengths[row])
            same &= all(torch.equal(getattr(share, name)[i, :n], getattr(batch, name)[row, :n])
                        for name in ("tokens", "targets", "loss_mask", "rollout_logprobs"))
            same &= float(share.advantages[i]) == float(batch.advantages[row])
            same &= torch.equal(share.extras["routes"][i, :n], batch.extras["routes"][row, :n])
    return dict(dp_rank=parallel_state.get_data_parallel_rank(), same=same,
                ids=[share.sample_ids.tolist() for share in local.shares], lengths=local.mini_batch_lengths)


@pytest.mark.parametrize("parallel,packed", [
    (ParallelConfig(tensor_parallel=2), True),  # DP=2 x TP=2: each share goes to one rank, then to its TP peer
    (ParallelConfig(pipeline_parallel=2), False),
])
def test_each_data_parallel_rank_gets_its_own_share_and_nothing_else(parallel, packed):
    config = ActorConfig(num_mini_batches=2, max_tokens_per_microbatch="auto" if packed else None)
    results = run_ranks(4, _receive, parallel, config)
    batch = _batch()
    by_dp = {}
    for result in results:
        assert result["same"]
        assert result["lengths"] == [batch.lengths[:4].tolist(), batch.lengths[4:].tolist()]
        by_dp.setdefault(result["dp_rank"], []).append(result["ids"])
    assert all(len(set(map(str, holders))) == 1 for holders in by_dp.values())  # a group's ranks agree
    shares = [holders[0] for _, holders in sorted(by_dp.items())]
    for m in range(2):  # every sample of each mini-batch on exactly one data-parallel rank
        assert sorted(i for share in shares for i in share[m]) == list(range(50 + 4 * m, 54 + 4 * m))
