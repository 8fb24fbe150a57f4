"""The allocator's free memory goes back to the system when the engine thread goes idle."""

from __future__ import annotations

import time

import pytest

from ghostline.engine import allocator
from ghostline.engine.serving.daemon import Scheduler
from ghostline.engine.serving.worker import EngineWorker, Job


def _anon_mb() -> float:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / 1024


@pytest.mark.skipif(allocator.figures() is None, reason="glibc's malloc only")
def test_trim_returns_freed_heap_pages():
    blocks = [bytearray(64 * 1024) for _ in range(2000)]  # 125 MB in the heap, under the mmap threshold
    keep = blocks[::16]  # every 16th stays: the heap cannot shrink from its top alone
    del blocks
    figures = allocator.figures()
    assert figures["heap_free_mb"] > 100
    before = _anon_mb()
    assert allocator.trim()
    assert before - _anon_mb() > 80
    assert len(keep) == 125


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("kind", ["scheduler", "worker"])
def test_trims_once_per_idle_spell(monkeypatch, kind):
    trims = []
    monkeypatch.setattr(allocator, "trim", lambda: trims.append(time.monotonic()))
    idle_runs = []
    idle = lambda stop: idle_runs.append(1) and False  # noqa: E731 (no background work left)
    if kind == "scheduler":
        thread = Scheduler(idle=idle, idle_after_s=0.02)
        submit = lambda: thread.submit(object(), job := Job("update", lambda stop: "ok")) or job  # noqa: E731
    else:
        thread = EngineWorker(idle=idle, idle_after_s=0.02)
        submit = lambda: thread.submit("update", lambda stop: "ok")  # noqa: E731
    thread.start()
    try:
        _wait(lambda: len(idle_runs) >= 5)
        assert trims == []  # nothing ran yet: nothing to give back
        assert submit().future.result(5) == "ok"
        _wait(lambda: len(trims) == 1)
        runs = len(idle_runs)
        _wait(lambda: len(idle_runs) >= runs + 5)
        assert len(trims) == 1  # idle again and again, trimmed once
        assert submit().future.result(5) == "ok"
        _wait(lambda: len(trims) == 2)
    finally:
        thread.stop()
