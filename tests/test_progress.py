"""Progress lines: at most one per interval, never a 100 % line before the end, a closing line with the rate."""

from alp_megatron.progress import ByteProgress, size


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_are_spaced_by_the_interval_and_the_closing_line_has_the_total_and_rate():
    clock, lines = Clock(), []
    progress = ByteProgress("loading", lines.append, every_s=10, clock=clock)
    for second, done in ((1, 2**20), (11, 2 * 2**20), (15, 3 * 2**20), (22, 4 * 2**20)):
        clock.now = 100.0 + second
        progress(done, 4 * 2**20)
    assert lines == ["loading: 2.0 MiB of 4.0 MiB (50 %), 11 s"]  # 1 s: too soon; 15 s: 4 s after; 22 s: complete
    assert progress.done() == 22
    assert lines[-1] == "loading: 4.0 MiB of 4.0 MiB (100 %) in 22.0 s, 186.2 KiB/s"


def test_silent_without_a_writer_and_sizes_without_a_total():
    clock = Clock()
    silent = ByteProgress("loading", None, every_s=0, clock=clock)
    silent(1, 2)
    assert silent.done() == 0
    lines = []
    unknown = ByteProgress("gathering", lines.append, every_s=0, clock=clock)
    unknown(3 * 2**30, 0)
    unknown.done()
    assert lines == ["gathering: 3.0 GiB, 0 s", "gathering: 3.0 GiB in 0.0 s"]
    assert (size(512), size(2048), size(5 * 2**20)) == ("512 B", "2.0 KiB", "5.0 MiB")
