"""Tests of alp_megatron/data/batches.py: seeded epoch order, batches across epochs, and exact resume."""

import json

import numpy as np
import pytest

from alp_megatron.data.batches import DataPosition, PromptBatches, epoch_order
from alp_megatron.data.prompts import Prompt, PromptDataConfig, PromptDataset
from alp_megatron.errors import ConfigError
from alp_megatron.model.tiny import build_char_tokenizer


class ListSource:
    """``n`` prompts whose label is their index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return Prompt(prompt_ids=(1, index), prompt_text=str(index), label=index, metadata={}, index=index,
                      source="list", row=index + 1)


def labels(batch):
    return [p.label for p in batch]


def test_epoch_order_is_a_seeded_permutation():
    first = epoch_order(50, seed=3, epoch=0)
    assert sorted(first.tolist()) == list(range(50))
    np.testing.assert_array_equal(first, epoch_order(50, seed=3, epoch=0))
    assert not np.array_equal(first, epoch_order(50, seed=3, epoch=1))
    assert not np.array_equal(first, epoch_order(50, seed=4, epoch=0))
    np.testing.assert_array_equal(epoch_order(5, seed=3, epoch=7, shuffle=False), np.arange(5))


def test_batches_cover_each_epoch_once_and_cross_into_the_next():
    batches = PromptBatches(ListSource(10), batch_size=4, seed=1)
    drawn = [labels(batches.next_batch()) for _ in range(5)]  # 20 prompts = exactly 2 epochs
    order0, order1 = epoch_order(10, 1, 0).tolist(), epoch_order(10, 1, 1).tolist()
    assert drawn[0] + drawn[1] + drawn[2][:2] == order0
    assert drawn[2][2:] + drawn[3] + drawn[4] == order1
    assert batches.position == DataPosition(epoch=2, index=0, seed=1)


def test_position_moves_through_epochs():
    batches = PromptBatches(ListSource(10), batch_size=4, seed=0)
    positions = []
    for _ in range(3):
        batches.next_batch()
        positions.append((batches.position.epoch, batches.position.index))
    assert positions == [(0, 4), (0, 8), (1, 2)]


def test_batch_larger_than_the_source_spans_epochs():
    batches = PromptBatches(ListSource(3), batch_size=7, seed=5)
    batch = labels(batches.next_batch())
    expected = (epoch_order(3, 5, 0).tolist() + epoch_order(3, 5, 1).tolist() + epoch_order(3, 5, 2).tolist()[:1])
    assert batch == expected
    assert batches.position == DataPosition(epoch=2, index=1, seed=5)


def test_no_shuffle_keeps_file_order():
    batches = PromptBatches(ListSource(5), batch_size=3, shuffle=False)
    assert [labels(next(batches)) for _ in range(3)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_same_seed_same_stream_other_seed_other_stream():
    stream = lambda seed: [labels(b) for b, _ in zip(PromptBatches(ListSource(20), 6, seed=seed), range(8))]
    assert stream(11) == stream(11)
    assert stream(11) != stream(12)


def write_dataset(tmp_path, n):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i}+1?", "label": str(i + 1)}) + "\n" for i in range(n)))
    return PromptDataConfig(paths=(str(path),), apply_chat_template=False, seed=7)


def test_resume_from_a_saved_position_continues_exactly(tmp_path):
    tokenizer = build_char_tokenizer()
    config = write_dataset(tmp_path, 13)

    uninterrupted = PromptBatches(PromptDataset(config, tokenizer), batch_size=5, seed=config.seed)
    reference = [uninterrupted.next_batch() for _ in range(8)]  # crosses 3 epoch boundaries

    interrupted = PromptBatches(PromptDataset(config, tokenizer), batch_size=5, seed=config.seed)
    for _ in range(3):
        interrupted.next_batch()
    saved = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint would store it
    assert saved == {"epoch": 1, "index": 2, "seed": 7, "num_prompts": 13}

    resumed = PromptBatches(PromptDataset(config, tokenizer), batch_size=5, seed=config.seed)
    resumed.load_state_dict(saved)
    after = [resumed.next_batch() for _ in range(5)]
    assert after == reference[3:]
    assert [p.prompt_ids for p in after[0]] == [p.prompt_ids for p in reference[3]]


def test_the_saved_seed_wins_over_the_configured_one():
    source = ListSource(9)
    original = PromptBatches(source, batch_size=4, seed=2)
    original.next_batch()
    expected = labels(original.next_batch())
    resumed = PromptBatches(source, batch_size=4, seed=99, position=DataPosition(epoch=0, index=4, seed=2))
    assert labels(resumed.next_batch()) == expected


def test_position_dict_round_trip_and_errors():
    position = DataPosition(epoch=3, index=5, seed=1)
    assert DataPosition.from_dict(position.to_dict()) == position
    with pytest.raises(ConfigError) as info:
        DataPosition.from_dict({"epoch": 1, "seed": 0})
    assert info.value.field == "data.position.index"
    with pytest.raises(ConfigError) as info:
        DataPosition.from_dict({"epoch": -1, "index": 0, "seed": 0})
    assert info.value.field == "data.position.epoch"
    with pytest.raises(ConfigError) as info:
        DataPosition.from_dict([1, 2, 3])
    assert info.value.field == "data.position"


def test_restoring_over_different_prompts_is_refused():
    batches = PromptBatches(ListSource(10), batch_size=2)
    with pytest.raises(ConfigError, match="saved over 12 prompts, but this prompt source has 10") as info:
        batches.load_state_dict({"epoch": 0, "index": 4, "seed": 0, "num_prompts": 12})
    assert info.value.field == "data.position.num_prompts"
    with pytest.raises(ConfigError, match="only 10 prompts") as info:
        batches.load_state_dict({"epoch": 0, "index": 10, "seed": 0})
    assert info.value.field == "data.position.index"


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        PromptBatches(ListSource(3), batch_size=0)
