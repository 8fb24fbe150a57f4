"""`ghostline engine`: one engine for every editor window (Unix socket), or for a team (TCP + token).

The daemon loads the model once. Its event loop reads and writes frames (engine.serving.wire); every engine
call runs on one engine thread, the `Scheduler`, which serves one queue per client in turn. A
client's documents live in the one `Engine` under a per-client name, so one memory budget with LRU
eviction covers all clients, and no client sees another's documents. A client that disconnects has
its documents freed. Connections, the token and the limits on strangers are `engine.serving.front`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from pathlib import Path

from ghostline.engine import allocator
from ghostline.engine.document import STRATEGIES
from ghostline.engine.completion import CompletionOptions
from ghostline.engine.engine import Cancelled, Engine, EngineOptions
from ghostline.engine.text import EditError
from ghostline.engine.serving import wire
from ghostline.engine.serving.front import (DaemonOptions, Front, RequestError, Session, TokenBucket, arg, daemon_options, edit_changes,
                                  engine_options, load_token, uri_of)
from ghostline.engine.serving.wire import ALREADY_RUNNING, lock_holder, take_lock
from ghostline.engine.serving.worker import Job, unpinned

log = logging.getLogger("ghostline.daemon")
__all__ = ["Daemon", "DaemonOptions", "RequestError", "Scheduler", "TokenBucket", "daemon_options", "edit_changes", "run"]


# the engine thread -------------------------------------------------------------------------------


class Scheduler:
    """The engine thread. One queue per client, served in turn, a job at a time, in each client's
    order. The newest completion of a document cancels the older ones. Encoding is the long kind of
    work (an open, finishing one, a completion that must first encode its document or window):
    once it has run `slice_s` and encoded at least one chunk it yields to any waiting edit or
    completion of another document (this client's or another's) and resumes later, ahead of its
    client's later jobs on the same document. An encode job sees this through `should_stop`; any
    job may read `should_yield` and raise Cancelled after it returned True, to be run again. When
    every queue has been empty for `idle_after_s`, `idle(should_stop)` (background refresh) runs
    until any job arrives; once it has nothing left to do, the allocator's free memory goes back to
    the system (`allocator.trim`), once per idle spell."""

    def __init__(self, *, idle=None, idle_after_s: float = 0.6, slice_s: float = 0.2):
        self.idle, self.idle_after_s, self.slice_s = idle, idle_after_s, slice_s
        self._cv = threading.Condition()
        self._queues: dict[object, deque[Job]] = {}
        self._turns: deque = deque()  # clients with waiting jobs, in the order they are served
        self._stopping = False
        self.current: tuple[object, Job] | None = None
        self.counts: Counter = Counter()
        self.busy_s: Counter = Counter()  # engine-thread seconds by kind of work ("idle": background)
        self.waits_ms: deque[float] = deque(maxlen=256)  # recent completions: submitted -> started
        self._trimmed = True  # no job has run since the last trim
        self._thread = threading.Thread(target=self._run, name="ghostline-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            for q in self._queues.values():
                for job in q:
                    job.cancel()
            if self.current is not None:
                self.current[1].cancel()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, client, job: Job, *, resume: bool = False) -> None:
        """Queue `job` behind the client's others; `resume`: ahead of its jobs on the same document
        (work that yielded continues before what depends on it)."""
        with self._cv:
            q = self._queues.setdefault(client, deque())
            if job.kind == "complete" and not resume:
                running = [self.current[1]] if self.current is not None and self.current[0] is client else []
                for old in list(q) + running:
                    if old.kind == "complete" and old.uri == job.uri and not old.cancelled.is_set():
                        old.cancel()
                        self.counts["cancelled"] += 1
            at = next((i for i, j in enumerate(q) if j.uri == job.uri), len(q)) if resume else len(q)
            q.insert(at, job)
            if client not in self._turns:
                self._turns.append(client)
            self._cv.notify()

    def waiting(self, client) -> int:
        with self._cv:
            return sum(not j.cancelled.is_set() for j in self._queues.get(client, ()))

    def asked(self, client, uri: str) -> bool:
        """A completion of the client's document `uri` waits."""
        with self._cv:
            return any(j.kind == "complete" and j.uri == uri and not j.cancelled.is_set()
                       for j in self._queues.get(client, ()))

    def drop(self, client, last: Job | None = None) -> None:
        """Cancel everything of a client; `last` (freeing its documents) then runs in its turn."""
        with self._cv:
            for job in self._queues.pop(client, ()):
                job.cancel()
            if self.current is not None and self.current[0] is client:
                self.current[1].cancel()
            with contextlib.suppress(ValueError):
                self._turns.remove(client)
        if last is not None:
            self.submit(client, last)

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._turns and not self._stopping:
                    self._cv.wait(self.idle_after_s)
                if self._stopping:
                    return
                picked = self._pick()
                self.current = picked
            if picked is None:
                self._idle()
            else:
                self._execute(*picked)
                with self._cv:
                    self.current = picked = None  # the finished job is the caller's, not this loop's

    def _pick(self):
        while self._turns:
            client = self._turns.popleft()
            q = self._queues.get(client)
            while q:
                job = q.popleft()
                if not job.cancelled.is_set():
                    if q:
                        self._turns.append(client)
                    return client, job
                if job.future.running():  # cancelled after it yielded: answer it
                    job.future.set_exception(Cancelled("cancelled"))
            self._queues.pop(client, None)
        return None

    def _execute(self, client, job: Job) -> None:
        resumed = job.future.running()  # it ran before and yielded: its wait was counted then
        if not resumed and not job.future.set_running_or_notify_cancel():
            return
        start, polls, yielded = time.monotonic(), 0, False
        self._trimmed = False
        if job.kind == "complete" and not resumed:
            self.waits_ms.append((start - job.queued) * 1e3)

        def should_yield() -> bool:  # polled before each chunk: the first chunk always runs (progress)
            nonlocal polls, yielded
            polls += 1
            if polls > 1 and time.monotonic() - start > self.slice_s and self._interactive_waiting(client, job.uri):
                self.counts["preempted"] += 1
                yielded = True
            return yielded

        job.should_yield = should_yield
        should_stop = (lambda: job.cancelled.is_set() or should_yield()) if job.kind == "encode" else job.cancelled.is_set
        try:
            job.future.set_result(job.fn(should_stop))
        except Cancelled as exc:
            if yielded and not job.cancelled.is_set():
                self.submit(client, job, resume=True)  # the rest in a later turn; the answer waits
            else:
                job.future.set_exception(unpinned(exc))
        except BaseException as exc:  # the client hears of it; the thread lives on
            job.future.set_exception(exc)
        finally:
            self.busy_s[job.kind] += time.monotonic() - start

    def _interactive_waiting(self, client, uri) -> bool:
        """An edit or completion of another document (of any client) waits."""
        with self._cv:
            return any(j.kind != "encode" and not j.cancelled.is_set() and (c is not client or j.uri != uri)
                       for c, q in self._queues.items() for j in q)

    def _idle(self) -> None:
        if self.idle is None:
            return
        start = time.monotonic()
        try:
            while not self._turns and not self._stopping and self.idle(lambda: bool(self._turns) or self._stopping):
                pass
        except Exception:  # background work must never take the engine thread down
            log.exception("idle work failed")
        finally:
            self.busy_s["idle"] += time.monotonic() - start
        if not self._turns and not self._trimmed:
            start, self._trimmed = time.monotonic(), True
            allocator.trim()
            self.busy_s["trim"] += time.monotonic() - start


# the daemon --------------------------------------------------------------------------------------




class Daemon(Front):
    """An engine server: one `Engine` in this process, its calls run by the `Scheduler`."""

    what = "engine daemon"

    def __init__(self, engine: Engine, options: DaemonOptions | None = None):
        super().__init__(options)
        self.engine = engine
        self.scheduler = Scheduler(idle=self._refresh, idle_after_s=self.options.idle_refresh_s,
                                   slice_s=self.options.slice_s)
        self.calls = {"open": self._open, "edit": self._edit, "context": self._context, "close": self._close,
                      "complete": self._complete, "cancel": self._cancel, "inspect": self._inspect,
                      "status": self._status}

    def _starting(self) -> None:
        self.scheduler.start()

    def _stopping(self) -> None:
        self.scheduler.stop()

    def _forget(self, s: Session) -> None:
        keys = [s.key(uri) for uri in s.docs]
        if not keys:  # a client without documents (a status check) costs the engine thread nothing
            self.scheduler.drop(s)
            return

        def free(_stop):
            for key in keys:
                self.engine.close(key)

        self.scheduler.drop(s, Job("update", free))

    def _about(self) -> dict:
        loaded = getattr(self.engine, "loaded", None)
        return {"model": loaded.source.name if loaded is not None else "",
                "load_s": loaded.seconds if loaded is not None else 0.0,
                "from_cache": bool(loaded.from_cache) if loaded is not None else False}

    def _submit(self, s: Session, rid: int, job: Job) -> None:
        if rid in s.inflight:
            raise RequestError("bad_request", f"request {rid} is already in flight")
        if self.scheduler.waiting(s) >= self.options.max_queued:
            raise RequestError("limit", f"more than {self.options.max_queued} requests waiting")
        s.inflight[rid] = job
        job.future.add_done_callback(lambda f: self._threadsafe(self._answer, s, rid, job))
        self.scheduler.submit(s, job)

    def _threadsafe(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to answer
            self.loop.call_soon_threadsafe(fn, *args)

    def _answer(self, s: Session, rid: int, job: Job) -> None:
        if s.inflight.get(rid) is job:
            del s.inflight[rid]
        f = job.future
        if f.cancelled():
            s.send({"id": rid, "ok": {"text": "", "stop_reason": "cancelled"} if job.kind == "complete" else None})
            return
        exc = f.exception()
        if exc is None:
            s.send({"id": rid, "ok": f.result()})
        elif isinstance(exc, EditError):
            s.send(wire.error(rid, "edit", str(exc)))
        elif isinstance(exc, KeyError):
            s.send(wire.error(rid, "not_open", str(exc.args[0] if exc.args else exc)))
        elif isinstance(exc, Cancelled):
            s.send(wire.error(rid, "cancelled", str(exc)))
        elif isinstance(exc, ValueError):
            s.send(wire.error(rid, "bad_request", str(exc)))
        else:
            log.error("client %d request %d (%s) failed", s.id, rid, job.uri, exc_info=exc)
            exc.__traceback__ = None  # logged: its frames (and the tensors they hold) may go
            s.send(wire.error(rid, "engine", f"{type(exc).__name__}: {exc}"))

    def _open(self, s: Session, rid: int, args: dict) -> None:
        uri, text, defer = uri_of(args), arg(args, "text", str), args.get("defer", False)
        if not isinstance(defer, bool):
            raise RequestError("bad_request", "argument 'defer' must be true or false")
        if uri not in s.docs and len(s.docs) >= self.options.max_open:
            raise RequestError("limit", f"more than {self.options.max_open} open documents")
        key = s.key(uri)

        def run(stop):  # a completion of this document stops the encode too: it reads what it needs
            self._fit(s, key)
            asked = lambda: stop() or self.scheduler.asked(s, uri)  # noqa: E731
            return self.engine.open(key, text, encode=not defer, should_stop=asked)

        if defer:  # its rows are encoded by the completions that read them, or when idle
            self._submit(s, rid, Job("update", lambda stop: dataclasses.asdict(run(stop)), uri))
        else:
            job = Job("encode", None, uri)
            job.fn = lambda stop: self._encode(s, job, stop, run)
            self._submit(s, rid, job)
        s.docs.add(uri)

    def _fit(self, s: Session, key: str) -> None:
        """Make room to cache `key`: a client keeps at most `max_docs` documents cached; past that the
        least recently used one's cache is evicted (its text stays, re-encoded when next used)."""
        prefix = s.key("")
        cached = sorted((d for k, d in self.engine.docs.items()
                         if k.startswith(prefix) and k != key and d.cache is not None), key=lambda d: d.last_used)
        for doc in cached[: max(0, len(cached) - self.options.max_docs + 1)]:
            doc.cache = None
            log.info("client %d: more than %d documents cached: evicted %s", s.id, self.options.max_docs, doc.uri)

    def _encode(self, s: Session, job: Job, stop, run) -> dict:
        """Run an encode; if another document's edit or completion preempted it, finish it first in this
        client's turn; if a completion of its own document stopped it, leave the rest missing: that
        completion encodes the rows it reads (within `mend_ms`), idle work the others."""
        try:
            return dataclasses.asdict(run(stop))
        except Cancelled:
            key = s.key(job.uri)
            if job.cancelled.is_set():
                raise
            if self.scheduler.asked(s, job.uri):
                return {"strategy": "open", "deferred": True}
            finish = Job("encode", None, job.uri)
            finish.fn = lambda st: self._encode(s, finish, st, lambda st2: self.engine.refresh(key, should_stop=st2))
            self.scheduler.submit(s, finish, resume=True)
            return {"strategy": "open", "deferred": True}

    def _edit(self, s: Session, rid: int, args: dict) -> None:
        uri, changes = self._known(s, args), edit_changes(args)
        strategy = args.get("strategy", "pie")
        if strategy not in STRATEGIES:
            raise RequestError("bad_request", f"strategy must be one of {STRATEGIES}")
        key = s.key(uri)

        def run(stop):  # the new rows are encoded by the completion that reads them, or when idle
            return dataclasses.asdict(self.engine.edit(key, changes, strategy=strategy, encode=False))

        self._submit(s, rid, Job("update", run, uri))

    def _context(self, s: Session, rid: int, args: dict) -> None:
        uri, text = self._known(s, args), arg(args, "text", str)
        key = s.key(uri)  # its rows are encoded when idle
        self._submit(s, rid, Job("update", lambda stop: dataclasses.asdict(self.engine.set_context(key, text)), uri))

    def _close(self, s: Session, rid: int, args: dict) -> None:
        uri = uri_of(args)
        key = s.key(uri)
        self._submit(s, rid, Job("update", lambda stop: self.engine.close(key), uri))
        s.docs.discard(uri)

    def _complete(self, s: Session, rid: int, args: dict) -> None:
        uri, offset = self._known(s, args), arg(args, "offset", int)
        opts, stream = _completion_options(args.get("options") or {}), bool(args.get("stream", False))
        key = s.key(uri)

        def run(stop):
            doc = self.engine.docs.get(key)
            if doc is not None and doc.cache is None:
                self._fit(s, key)
            sent, out = None, None  # stopped or yielded while encoding the rows it reads, it raises Cancelled
            for out in self.engine.stream(key, offset, opts, should_stop=stop, should_yield=job.should_yield):
                now = (out.text, tuple(out.drafts))
                if stream and now != sent:
                    sent = now
                    self._threadsafe(s.send, {"id": rid, "partial": {"text": out.text, "drafts": list(out.drafts)}})
            return _completion_dict(out)

        job = Job("complete", run, uri)
        self._submit(s, rid, job)

    def _cancel(self, s: Session, rid: int, args: dict) -> None:
        job = s.inflight.get(arg(args, "id", int))
        if job is not None and not job.cancelled.is_set():
            job.cancel()
            self.scheduler.counts["cancelled"] += job.kind == "complete"
        s.send({"id": rid, "ok": {"cancelled": job is not None}})

    def _inspect(self, s: Session, rid: int, args: dict) -> None:
        uri = uri_of(args)
        key = s.key(uri)
        self._submit(s, rid, Job("update", lambda stop: self.engine.describe(key), uri))

    def _status(self, s: Session, rid: int, args: dict) -> None:
        loaded = getattr(self.engine, "loaded", None)
        counts = self.scheduler.counts
        s.send({"id": rid, "ok": {
            "pid": os.getpid(), "model": loaded.source.name if loaded is not None else "",
            "uptime_s": round(time.time() - self.started, 1), "clients": len(self.clients),
            "docs": sum(len(c.docs) for c in self.clients.values()),
            "memory_mb": round(_cache_bytes(self.engine) / 2**20, 1),
            "budget_mb": self.engine.options.memory_budget_mb,
            "allocator": allocator.figures(),
            "queued": sum(self.scheduler.waiting(c) for c in list(self.clients.values())),
            "cancelled": counts["cancelled"], "preempted": counts["preempted"], "refreshed": counts["refreshed"],
            "busy_s": {k: round(v, 1) for k, v in self.scheduler.busy_s.items()},
            "wait_ms_p50": _median(self.scheduler.waits_ms),
            "you": {"client": s.id, "docs": len(s.docs), "queued": self.scheduler.waiting(s)}}})

    def _known(self, s: Session, args: dict) -> str:
        uri = uri_of(args)
        if uri not in s.docs:
            raise RequestError("not_open", f"document {uri!r} is not open")
        return uri

    def _refresh(self, should_stop) -> bool:
        """Background work when every queue is empty: the most recently used document's that is due."""
        for key in sorted(self.engine.docs, key=lambda k: -self.engine.docs[k].last_used):
            try:
                stats = self.engine.background(key, should_stop=should_stop)
            except Cancelled:
                self.scheduler.counts["preempted"] += 1
                return False
            if stats is not None:
                self.scheduler.counts["refreshed"] += 1
                log.log(logging.INFO if stats.strategy == "refresh" else logging.DEBUG,  # mends follow most edits
                        "%s %s: %d tokens in %.0f ms", stats.strategy, key, stats.encoded, stats.ms)
                return True
        return False


def _median(values) -> float | None:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 1) if ordered else None


def _cache_bytes(engine: Engine) -> int:
    total = 0
    for doc in list(engine.docs.values()):  # read from the event loop while the engine thread works
        cache = doc.cache
        total += cache.nbytes if cache is not None else 0
    return total


def _completion_dict(out) -> dict:
    return {"text": "", "stop_reason": "no_context"} if out is None else out.to_wire()


def _completion_options(raw) -> CompletionOptions:
    try:
        return CompletionOptions.from_wire(raw)
    except ValueError as exc:
        raise RequestError("bad_request", f"bad completion option: {str(exc)[:120]}") from None


# locks and the command ---------------------------------------------------------------------------


def stop_daemons(folder: Path, *, timeout: float = 10.0) -> list[int]:
    """Stop every live daemon whose lock is in `folder` (SIGTERM, then SIGKILL); their pids."""
    pids = [pid for pid in (lock_holder(p) for p in sorted(folder.glob("engine-*.lock"))) if pid is not None]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (our own child, not yet reaped) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True





def run(args) -> int:
    logging.getLogger("ghostline").setLevel(logging.getLogger().level)
    if args.stop:
        pids = stop_daemons(wire.runtime_dir())
        print(f"stopped {len(pids)} engine daemon(s) {pids}" if pids else "no engine daemon running")
        return 0
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        host, path = host or "127.0.0.1", None
        lock = wire.runtime_dir() / f"engine-tcp-{int(port)}.lock"
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: frames are not encrypted; put TLS or an SSH tunnel in front", host)
    else:
        path = Path(args.socket) if args.socket else wire.socket_path(args.model)
        lock = wire.lock_path(path)
    options = daemon_options(args, token=load_token(args) if args.listen else None)
    fd = take_lock(lock)
    if fd is None:
        log.info("an engine daemon already holds %s (pid %s)", lock, lock_holder(lock))
        return ALREADY_RUNNING
    engine = Engine.load(args.model, options=EngineOptions(**engine_options(args)),
                         progress=lambda m: log.info("load: %s", m))
    allocator.freeze()
    daemon = Daemon(engine, options)

    async def main():
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        await daemon.serve(path=path, host=host if args.listen else None, port=int(port) if args.listen else None)

    try:
        asyncio.run(main())
    finally:
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if daemon.scheduler.alive:  # a decode step inside torch must not meet interpreter teardown
        os._exit(0)
    return 0
