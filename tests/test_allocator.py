"""Memory the engine thread no longer needs goes back: a stopped job pins no tensors, and the
allocator's free memory returns to the system when the thread goes idle."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from ghostline.engine import allocator
from ghostline.engine.engine import Cancelled
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


@pytest.mark.parametrize("kind", ["scheduler", "worker"])
def test_a_stopped_job_pins_no_tensors(kind):
    """A job stopped mid-way (a superseded completion) leaves nothing of its frames behind once its
    caller has read the answer, without waiting for a garbage collection: its traceback would keep
    the tensors its frames held (a cache's old storage) alive in a cycle through the job."""
    held, box, ready = [], [], threading.Event()

    def run(stop):
        ready.wait(5)
        job = box[0]  # the frame reaches its job, as the daemon's closures do
        big = torch.zeros(256, 1024)  # what a stopped decode's frames hold
        held.append(weakref.ref(big))
        raise Cancelled(f"superseded: {job.kind}")

    thread = Scheduler(idle_after_s=5.0) if kind == "scheduler" else EngineWorker(idle_after_s=5.0)
    thread.start()
    gc.disable()
    try:
        if kind == "scheduler":
            job = Job("complete", run, "u")
            thread.submit(object(), job)
        else:
            job = thread.submit("complete", run)
        box.append(job)
        ready.set()
        with pytest.raises(Cancelled):
            job.future.result(5)
        del job
        _wait(lambda: thread.current is None)
        assert held[0]() is None
    finally:
        gc.enable()
        thread.stop()
