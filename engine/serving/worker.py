"""One engine thread: every model call runs here, never in an LSP handler.

Jobs run in submission order, so document updates and completions see a consistent text. Each job
gets a `should_stop()` polled between decoding steps; cancelling a job (cancel-previous, or
`$/cancelRequest`) sets it. When the queue stays empty for a while, `idle` work runs (background
refresh of stale caches) and yields as soon as a job arrives; once it has nothing left to do, the
allocator's free memory goes back to the system, once per idle spell.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ghostline.engine import allocator

log = logging.getLogger("ghostline.worker")


@dataclass
class Job:
    kind: str  # "load" | "update" | "complete"
    fn: Callable[[Callable[[], bool]], object]
    uri: str | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    should_yield: Callable[[], bool] = field(default=lambda: False)  # set by a scheduler that time-slices encodes
    queued: float = field(default_factory=time.monotonic)  # when it was submitted

    def cancel(self) -> None:
        self.cancelled.set()
        self.future.cancel()  # succeeds only while queued


def unpinned(exc: BaseException) -> BaseException:
    """A cancellation without its traceback, any other error as it is. A traceback keeps every
    frame's locals alive: a stopped decode's cache views, the old storage of a cache grown since.
    Stored in a job's future (which its frames reach through the job) it is a cycle that only the
    garbage collector's rare full pass breaks, so such tensors piled up under edit storms."""
    from ghostline.engine.engine import Cancelled

    return exc.with_traceback(None) if isinstance(exc, Cancelled) else exc


class EngineWorker:
    def __init__(self, *, idle: Callable[[Callable[[], bool]], bool] | None = None, idle_after_s: float = 0.6):
        self.idle, self.idle_after_s = idle, idle_after_s
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ghostline-engine", daemon=True)
        self.current: Job | None = None
        self.cancelled_decodes = 0
        self._trimmed = True  # no job has run since the last trim

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        if self.current is not None:
            self.current.cancelled.set()
        self._q.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def waiting(self, kind: str | None = None) -> bool:
        """Jobs (of `kind`) are queued: background work in a job yields to them."""
        with self._q.mutex:
            return any(job is not None and kind in (None, job.kind) for job in self._q.queue)

    def submit(self, kind: str, fn, *, uri: str | None = None) -> Job:
        job = Job(kind, fn, uri)
        self._q.put(job)
        return job

    def _run(self) -> None:
        while True:
            try:
                job = self._q.get(timeout=self.idle_after_s)
            except queue.Empty:
                self._idle()
                continue
            if job is None:
                return
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                if job.kind == "complete":
                    self.cancelled_decodes += 1
                continue
            self.current, self._trimmed = job, False
            try:
                job.future.set_result(job.fn(job.cancelled.is_set))
            except BaseException as exc:  # the job's caller decides; the thread lives on
                job.future.set_exception(unpinned(exc))
            finally:
                if job.kind == "complete" and job.cancelled.is_set():
                    self.cancelled_decodes += 1
                self.current = job = None  # the finished job is the caller's, not this loop's

    def _idle(self) -> None:
        if self.idle is None:
            return
        try:
            while self._q.empty() and self.idle(lambda: not self._q.empty()):
                pass
        except Exception:  # background work must never take the worker down
            log.exception("idle work failed")
        if self._q.empty() and not self._trimmed:
            self._trimmed = True
            allocator.trim()
