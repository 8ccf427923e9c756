"""Latency timing: runtimes in turns of blocks, each block opened by untimed settling calls."""

from __future__ import annotations

import time

from bertforge.bench import time_runners


def test_runners_take_turns_in_blocks_and_the_settling_calls_are_not_timed():
    calls: list[str] = []
    # a: each block's first two calls are slow (a neighbour's spinning threads, cold caches), then fast
    slow_first = iter([0.05, 0.05] + [0.001] * 5 + [0.05, 0.05] + [0.001] * 5)
    runners = {"a": lambda: (calls.append("a"), time.sleep(next(slow_first))),
               "b": lambda: (calls.append("b"), time.sleep(0.002))}
    times = time_runners(runners, warmup=0, repeats=7, block=5, settle=2)
    assert calls == ["a"] * 7 + ["b"] * 7 + ["a"] * 7 + ["b"] * 7  # 7 repeats: two rounds of 5
    assert len(times["a"]) == len(times["b"]) == 10
    assert max(times["a"]) < 0.04  # no settling call was timed
    assert min(times["b"]) >= 0.002
