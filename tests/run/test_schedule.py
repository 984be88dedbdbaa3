"""The asynchronous schedule's bookkeeping: how far rollouts run ahead of training, and what a checkpoint
holds. The engines are a stand-in that records what was started (the real loop is tested in test_rl_loop)."""

from concurrent.futures import Future

from alp_megatron.data.batches import PromptBatches
from alp_megatron.rollout.types import RolloutBatch
from alp_megatron.run.schedule import Asynchronous


class StartedRollouts:
    """Starts nothing: remembers each rollout asked for and finishes it when the test says so."""

    def __init__(self):
        self.started: list[tuple[list, list[int], Future]] = []

    def submit(self, prompts, group_ids, on_group=None):
        future = Future()
        self.started.append((list(prompts), list(group_ids), future))
        return future

    def wait(self, future):
        if not future.done():  # the batch trained next was started earliest: finish it
            for prompts, ids, pending in self.started:
                if pending is future:
                    future.set_result(RolloutBatch(samples=[], group_size=1, group_ids=ids))
        return future.result()


def test_rollouts_run_max_staleness_batches_ahead_and_a_checkpoint_redraws_the_ones_not_trained():
    engines = StartedRollouts()
    prompts = PromptBatches(list(range(100)), batch_size=2, shuffle=False)
    schedule = Asynchronous(engines, prompts, first_group_id=0, max_staleness=2)
    first = schedule.next_rollout()  # trains version 0: the batches of versions 0, 1 and 2 start now
    assert [ids for _, ids, _ in engines.started] == [[0, 1], [2, 3], [4, 5]]
    assert first.batch.group_ids == [0, 1] and first.metrics["rollouts_ahead"] == 2
    # a checkpoint after this step: the prompts of the two batches still running are drawn again on resume
    assert schedule.resume_state() == {"data_position": {"epoch": 0, "index": 2, "seed": 0}, "next_group_id": 2}
    second = schedule.next_rollout()  # version 1 is served: version 3's batch may start, not version 4's
    assert [ids for _, ids, _ in engines.started][3:] == [[6, 7]] and second.batch.group_ids == [2, 3]
    assert schedule.resume_state()["data_position"]["index"] == 4
    schedule.close()
