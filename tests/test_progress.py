"""Progress: plain lines in a log (quiet when quick), a rich bar on a terminal, one line on Ctrl-C."""

from __future__ import annotations

import io

import pytest

from stabguard.progress import Progress, command_progress, duration, labelled


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def run(progress, clock, total, seconds_each):
    for done in range(1, total + 1):
        clock.now += seconds_each
        progress("boards generated", done, total)


def test_quick_work_prints_nothing_in_a_log():
    stream, clock = io.StringIO(), Clock()
    with Progress(stream, every_s=5, clock=clock) as progress:
        run(progress, clock, total=10, seconds_each=0.1)
    assert stream.getvalue() == "" and progress.last == ("boards generated", 10, 10)


def test_long_work_prints_a_line_every_few_seconds_with_time_left_and_a_last_line():
    stream, clock = io.StringIO(), Clock()
    with Progress(stream, every_s=5, clock=clock) as progress:
        run(progress, clock, total=20, seconds_each=1.0)
        progress("boards generated", 20, 20)  # the end reported twice is printed once
    lines = stream.getvalue().splitlines()
    # the clock starts at the first report (board 1, t=1): lines at t=6, 11, 16, and the end at t=20
    assert lines == ["stabguard: boards generated 6/20 (30%), 5.0s elapsed, about 14.0s left",
                     "stabguard: boards generated 11/20 (55%), 10.0s elapsed, about 9.0s left",
                     "stabguard: boards generated 16/20 (80%), 15.0s elapsed, about 4.0s left",
                     "stabguard: boards generated 20/20 (100%), 19.0s"]


def test_a_terminal_gets_a_bar_with_counts():
    stream, clock = Terminal(), Clock()
    with Progress(stream, clock=clock) as progress:
        run(progress, clock, total=10, seconds_each=0.1)
    assert "boards generated" in stream.getvalue() and "10/10" in stream.getvalue()
    assert "stabguard: boards" not in stream.getvalue()  # no plain lines on a terminal


def test_labelled_names_the_file_and_passes_none_through():
    seen = []
    labelled(lambda *args: seen.append(args), "train")("rows checked", 3, 9)
    assert seen == [("train rows checked", 3, 9)] and labelled(None, "train") is None


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    with pytest.raises(SystemExit) as info:
        with command_progress("nothing written to out/train.jsonl") as progress:
            progress("boards generated", 412, 2000)
            raise KeyboardInterrupt
    assert info.value.code == 130
    assert capsys.readouterr().err == ("stabguard: interrupted after 412/2000 boards generated; "
                                       "nothing written to out/train.jsonl\n")


@pytest.mark.parametrize("seconds, text", [(4.24, "4.2s"), (92, "1m32s"), (3600 + 5 * 60 + 20, "1h05m")])
def test_duration(seconds, text):
    assert duration(seconds) == text
