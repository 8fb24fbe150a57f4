"""`ghostline engine`: one engine for every editor window (Unix socket), or for a team (TCP + token).

The daemon loads the model once. Its event loop reads and writes frames (lsp.wire); every engine
call runs on one engine thread, the `Scheduler`, which serves one queue per client in turn. A
client's documents live in the one `Engine` under a per-client name, so one memory budget with LRU
eviction covers all clients, and no client sees another's documents. A client that disconnects has
its documents freed.

Before a TCP client has sent the token it may send one small frame (`hello_frame_bytes`), must do so
within `hello_timeout_s`, and only `max_unauthenticated` such connections are held at once; every
client's calls pass a token bucket (`rate_per_s`, `rate_burst`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from ghostline.engine.document import STRATEGIES
from ghostline.engine.engine import Cancelled, CompletionOptions, Engine, EngineOptions
from ghostline.engine.text import Change, EditError
from ghostline.lsp import wire
from ghostline.lsp.wire import ALREADY_RUNNING, lock_holder, take_lock
from ghostline.lsp.worker import Job

log = logging.getLogger("ghostline.daemon")
MAX_URI = 4096


@dataclass
class DaemonOptions:
    max_frame_bytes: int = wire.MAX_FRAME
    max_docs: int = 256  # cached documents per client; past it the least recently used one's cache is evicted
    max_open: int = 4096  # open documents (their texts) per client; an open past it is refused
    max_queued: int = 32  # requests waiting per client
    idle_refresh_s: float = 0.6  # quiet time before stale caches are re-encoded in the background
    slice_s: float = 0.2  # an encode runs this long before another client's completion may take the engine
    idle_exit_s: float | None = None  # exit once no client has been connected this long
    token: str | None = None  # what TCP clients must send in `hello` (compared in constant time)
    hello_frame_bytes: int = wire.HELLO_FRAME  # largest frame a TCP client may send before its token is accepted
    hello_timeout_s: float = 5.0  # a TCP client that has not sent a valid hello by then is closed
    max_unauthenticated: int = 64  # TCP connections held at once before their hello
    max_clients: int = 256  # connections held at once, all kinds
    rate_per_s: float = 200.0  # calls a second per client, on average ...
    rate_burst: int = 1000  # ... in bursts of up to this many (a reconnect re-opens every document)

    def __post_init__(self):
        """Every limit is checked here, once: a bad flag stops the daemon before it serves."""
        counts = ("max_frame_bytes", "max_docs", "max_open", "max_queued", "hello_frame_bytes",
                  "max_unauthenticated", "max_clients", "rate_burst")
        for name in counts:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        spans = {"hello_timeout_s": self.hello_timeout_s, "rate_per_s": self.rate_per_s,
                 "idle_refresh_s": self.idle_refresh_s}
        if self.idle_exit_s is not None:
            spans["idle_exit_s"] = self.idle_exit_s
        for name, value in spans.items():
            if not _number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if not _number(self.slice_s) or self.slice_s < 0:
            raise ValueError(f"slice_s must be a number >= 0, not {self.slice_s!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class RequestError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TokenBucket:
    """`rate` calls a second on average, in bursts of up to `burst`: `take()` is False past that."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


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
    until any job arrives."""

    def __init__(self, *, idle=None, idle_after_s: float = 0.6, slice_s: float = 0.2):
        self.idle, self.idle_after_s, self.slice_s = idle, idle_after_s, slice_s
        self._cv = threading.Condition()
        self._queues: dict[object, deque[Job]] = {}
        self._turns: deque = deque()  # clients with waiting jobs, in the order they are served
        self._stopping = False
        self.current: tuple[object, Job] | None = None
        self.counts: Counter = Counter()
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
                    self.current = None

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
        if not job.future.running() and not job.future.set_running_or_notify_cancel():
            return
        start, polls, yielded = time.monotonic(), 0, False

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
                job.future.set_exception(exc)
        except BaseException as exc:  # the client hears of it; the thread lives on
            job.future.set_exception(exc)

    def _interactive_waiting(self, client, uri) -> bool:
        """An edit or completion of another document (of any client) waits."""
        with self._cv:
            return any(j.kind != "encode" and not j.cancelled.is_set() and (c is not client or j.uri != uri)
                       for c, q in self._queues.items() for j in q)

    def _idle(self) -> None:
        if self.idle is None:
            return
        try:
            while not self._turns and not self._stopping and self.idle(lambda: bool(self._turns) or self._stopping):
                pass
        except Exception:  # background work must never take the engine thread down
            log.exception("idle work failed")


# the daemon --------------------------------------------------------------------------------------


class Session:
    """One connected client: its documents, its requests in flight, and the way back to it."""

    def __init__(self, sid: int, writer: asyncio.StreamWriter, *, tcp: bool, limit: int, bucket: TokenBucket):
        self.id, self.writer, self.tcp, self.limit, self.bucket = sid, writer, tcp, limit, bucket
        self.name = ""
        self.greeted = False
        self.closed = False
        self.docs: set[str] = set()
        self.inflight: dict[int, Job] = {}

    @property
    def trusted(self) -> bool:
        """A Unix socket peer of this user (checked on accept), or a TCP client that sent the token."""
        return self.greeted or not self.tcp

    def key(self, uri: str) -> str:
        """The document's name in the shared engine."""
        return f"c{self.id}|{uri}"

    def send(self, msg: dict) -> None:
        if self.closed or self.writer.is_closing():
            return
        try:
            data = wire.pack(msg, limit=self.limit)
        except wire.FrameTooLarge as exc:
            data = wire.pack(wire.error(msg.get("id"), "too_large", str(exc)))
        self.writer.write(data)


class Daemon:
    def __init__(self, engine: Engine, options: DaemonOptions | None = None):
        self.engine, self.options = engine, options or DaemonOptions()
        self.scheduler = Scheduler(idle=self._refresh, idle_after_s=self.options.idle_refresh_s,
                                   slice_s=self.options.slice_s)
        self.clients: dict[int, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address = None
        self._ids = itertools.count(1)
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task] = set()
        self._last_client = time.monotonic()
        self.started = time.time()
        self.calls = {"open": self._open, "edit": self._edit, "close": self._close, "complete": self._complete,
                      "cancel": self._cancel, "inspect": self._inspect, "status": self._status}

    # serving -------------------------------------------------------------------------------------

    async def serve(self, *, path: Path | None = None, host: str | None = None, port: int | None = None,
                    ready=None) -> None:
        """Serve on a Unix socket at `path` (mode 0600), or on TCP `host:port` (a token is required),
        until `stop()`; `ready(daemon)` is called once clients can connect."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if path is not None:
            server = await asyncio.start_unix_server(self._unix_connection, sock=bind_unix(path))
            self.address = str(path)
        else:
            if not self.options.token:
                raise ValueError("a TCP engine server needs a token")
            server = await asyncio.start_server(self._tcp_connection, host or "127.0.0.1", port or 0)
            self.address = server.sockets[0].getsockname()[:2]
        self.scheduler.start()
        log.info("engine daemon serving on %s (pid %d)", self.address, os.getpid())
        if ready is not None:
            ready(self)
        watch = asyncio.create_task(self._idle_exit())
        try:
            async with server:
                await self._stop.wait()
        finally:
            watch.cancel()
            for s in list(self.clients.values()):
                s.writer.close()  # their readers see the end, so their handlers finish
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=5)
            self.scheduler.stop()

    def stop(self) -> None:
        """Stop serving (from any thread)."""
        if self.loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop.set)

    async def _idle_exit(self) -> None:
        limit = self.options.idle_exit_s
        while limit is not None:
            await asyncio.sleep(min(1.0, limit))
            if not self.clients and time.monotonic() - self._last_client > limit:
                log.info("no client for %.0f s: exiting", limit)
                self._stop.set()
                return

    async def _unix_connection(self, reader, writer) -> None:
        if not _same_user(writer.get_extra_info("socket")):
            log.warning("refused a connection from another user")
            writer.close()
            return
        await self._connection(reader, writer, tcp=False)

    async def _tcp_connection(self, reader, writer) -> None:
        await self._connection(reader, writer, tcp=True)

    async def _connection(self, reader, writer, *, tcp: bool) -> None:
        peer = writer.get_extra_info("peername") if tcp else "unix socket"
        full = self._full(tcp=tcp)
        if full:
            log.warning("refused a connection (%s): %s", peer, full)
            writer.write(wire.pack(wire.error(None, "busy", full)))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        o = self.options
        s = Session(next(self._ids), writer, tcp=tcp, limit=o.max_frame_bytes,
                    bucket=TokenBucket(o.rate_per_s, o.rate_burst))
        self.clients[s.id] = s
        self._handlers.add(asyncio.current_task())
        log.info("client %d connected (%s)", s.id, peer)
        deadline = asyncio.get_running_loop().time() + o.hello_timeout_s
        try:
            while True:
                if s.trusted:
                    body = await wire.read_frame(reader, limit=o.max_frame_bytes)
                else:  # a stranger: one small frame, soon
                    left = deadline - asyncio.get_running_loop().time()
                    limit = min(o.hello_frame_bytes, o.max_frame_bytes)
                    body = await asyncio.wait_for(wire.read_frame(reader, limit=limit), max(left, 0.0))
                if body is None or not self._handle(s, body):
                    break
                await writer.drain()
        except wire.FrameTooLarge as exc:
            s.send(wire.error(None, "too_large", f"{exc}; closing"))
        except TimeoutError:
            log.warning("client %d sent no valid hello within %.1f s: closing", s.id, o.hello_timeout_s)
            s.send(wire.error(None, "hello_timeout", "no hello in time; closing"))
        except (ConnectionError, OSError):
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            self._drop(s)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            log.info("client %d (%s) left; its %d documents freed", s.id, s.name or "?", len(s.docs))

    def _full(self, *, tcp: bool) -> str | None:
        """Why a new connection is refused (too many held), or None."""
        o = self.options
        if len(self.clients) >= o.max_clients:
            return f"{o.max_clients} connections are open"
        if tcp and sum(not c.trusted for c in self.clients.values()) >= o.max_unauthenticated:
            return f"{o.max_unauthenticated} connections are waiting to say hello"
        return None

    def _drop(self, s: Session) -> None:
        s.closed = True
        self.clients.pop(s.id, None)
        self._last_client = time.monotonic()
        keys = [s.key(uri) for uri in s.docs]

        def free(_stop):
            for key in keys:
                self.engine.close(key)

        self.scheduler.drop(s, Job("update", free))

    # requests ------------------------------------------------------------------------------------

    def _handle(self, s: Session, body: bytes) -> bool:
        """Answer one frame; False closes the connection."""
        try:
            msg = wire.unpack(body)
        except wire.FrameError as exc:
            s.send(wire.error(None, "bad_frame", str(exc)))
            return s.greeted or not s.tcp
        rid, call, args = msg.get("id"), msg.get("call"), msg.get("args", {})
        if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < 2**63:
            s.send(wire.error(None, "bad_request", "a request needs an integer id"))
            return s.greeted or not s.tcp
        if not isinstance(args, dict):
            s.send(wire.error(rid, "bad_request", "args must be a map"))
            return s.greeted or not s.tcp
        if call == "hello":
            return self._hello(s, rid, args)
        if not s.greeted:
            s.send(wire.error(rid, "unauthorized" if s.tcp else "hello_first", "say hello first"))
            return not s.tcp
        if not s.bucket.take():
            s.send(wire.error(rid, "rate_limited", f"more than {self.options.rate_per_s:g} calls a second"))
            return True
        handler = self.calls.get(call) if isinstance(call, str) else None
        if handler is None:
            s.send(wire.error(rid, "unknown_call", f"unknown call {str(call)[:64]!r} (known: {', '.join(wire.CALLS)})"))
            return True
        try:
            handler(s, rid, args)
        except RequestError as exc:
            s.send(wire.error(rid, exc.code, str(exc)))
        return True

    def _hello(self, s: Session, rid: int, args: dict) -> bool:
        if s.tcp:
            given = args.get("token")
            expected = (self.options.token or "").encode()
            if not isinstance(given, str) or not expected or not hmac.compare_digest(given.encode(), expected):
                log.warning("client %d refused: missing or wrong token", s.id)
                s.send(wire.error(rid, "unauthorized", "a valid token is required"))
                return False
        if args.get("protocol", wire.PROTOCOL) != wire.PROTOCOL:
            s.send(wire.error(rid, "protocol", f"this daemon speaks protocol {wire.PROTOCOL}"))
            return not s.tcp
        s.greeted = True
        s.name = str(args.get("client", ""))[:200]
        loaded = getattr(self.engine, "loaded", None)
        s.send({"id": rid, "ok": {
            "server": "ghostline", "protocol": wire.PROTOCOL, "pid": os.getpid(), "client": s.id,
            "model": loaded.source.name if loaded is not None else "",
            "load_s": loaded.seconds if loaded is not None else 0.0,
            "from_cache": bool(loaded.from_cache) if loaded is not None else False,
            "limits": {"max_docs": self.options.max_docs, "max_queued": self.options.max_queued,
                       "max_frame_bytes": self.options.max_frame_bytes}}})
        return True

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
            s.send(wire.error(rid, "engine", f"{type(exc).__name__}: {exc}"))

    def _open(self, s: Session, rid: int, args: dict) -> None:
        uri, text = _uri(args), _arg(args, "text", str)
        if uri not in s.docs and len(s.docs) >= self.options.max_open:
            raise RequestError("limit", f"more than {self.options.max_open} open documents")
        key = s.key(uri)

        def run(stop):
            self._fit(s, key)
            return self.engine.open(key, text, should_stop=stop)

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
        """Run an encode; if another client's completion preempted it, finish it first in this client's turn."""
        try:
            return dataclasses.asdict(run(stop))
        except Cancelled:
            key = s.key(job.uri)
            self._keep_progress(key)
            if job.cancelled.is_set():
                raise
            finish = Job("encode", None, job.uri)
            finish.fn = lambda st: self._encode(s, finish, st, lambda st2: self.engine.refresh(key, should_stop=st2))
            self.scheduler.submit(s, finish, resume=True)
            return {"strategy": "open", "deferred": True}

    def _edit(self, s: Session, rid: int, args: dict) -> None:
        uri, raw = self._known(s, args), _arg(args, "changes", list)
        strategy = args.get("strategy", "pie")
        if strategy not in STRATEGIES:
            raise RequestError("bad_request", f"strategy must be one of {STRATEGIES}")
        changes = []
        for c in raw:
            if not (isinstance(c, (list, tuple)) and len(c) == 3 and _is_int(c[0]) and _is_int(c[1])
                    and isinstance(c[2], str)):
                raise RequestError("bad_request", "a change is [start, end, text]")
            changes.append(Change(c[0], c[1], c[2]))
        key = s.key(uri)

        def run(stop):
            self._ensure_cached(key)
            return dataclasses.asdict(self.engine.edit(key, changes, strategy=strategy))

        self._submit(s, rid, Job("update", run, uri))

    def _close(self, s: Session, rid: int, args: dict) -> None:
        uri = _uri(args)
        key = s.key(uri)
        self._submit(s, rid, Job("update", lambda stop: self.engine.close(key), uri))
        s.docs.discard(uri)

    def _complete(self, s: Session, rid: int, args: dict) -> None:
        uri, offset = self._known(s, args), _arg(args, "offset", int)
        opts, stream = _completion_options(args.get("options") or {}), bool(args.get("stream", False))
        key = s.key(uri)

        def run(stop):
            doc = self.engine.docs.get(key)
            if doc is not None and doc.cache is None:
                self._fit(s, key)
            self._ensure_cached(key)
            sent, out = None, None
            try:
                for out in self.engine.stream(key, offset, opts, should_stop=stop, should_yield=job.should_yield):
                    now = (out.text, tuple(out.drafts))
                    if stream and now != sent:
                        sent = now
                        self._threadsafe(s.send, {"id": rid, "partial": {"text": out.text, "drafts": list(out.drafts)}})
            except Cancelled:  # stopped (or yielded) while encoding the document first
                self._keep_progress(key)
                raise
            return _completion_dict(out)

        job = Job("complete", run, uri)
        self._submit(s, rid, job)

    def _ensure_cached(self, key: str) -> None:
        """Re-encode the rest of a document whose encode was stopped part-way (its cache ends early),
        before anything decodes from it or moves its rows."""
        doc = self.engine.docs.get(key)
        if doc is not None and doc.cache is not None and doc.cache.length < len(doc.ids):
            self.engine.refresh(key)

    def _keep_progress(self, key: str) -> None:
        """After an encode stopped part-way, every row its cache kept is current: unmark them, so
        finishing resumes where it stopped (the engine leaves the rows it just encoded marked stale,
        and finishing would start over each time)."""
        doc = self.engine.docs.get(key)
        if doc is not None and doc.cache is not None:
            n = min(doc.cache.length, len(doc.stale))
            doc.stale[:n] = bytes(n)

    def _cancel(self, s: Session, rid: int, args: dict) -> None:
        job = s.inflight.get(_arg(args, "id", int))
        if job is not None and not job.cancelled.is_set():
            job.cancel()
            self.scheduler.counts["cancelled"] += job.kind == "complete"
        s.send({"id": rid, "ok": {"cancelled": job is not None}})

    def _inspect(self, s: Session, rid: int, args: dict) -> None:
        uri = _uri(args)
        key = s.key(uri)
        self._submit(s, rid, Job("update", lambda stop: describe(self.engine, key), uri))

    def _status(self, s: Session, rid: int, args: dict) -> None:
        loaded = getattr(self.engine, "loaded", None)
        counts = self.scheduler.counts
        s.send({"id": rid, "ok": {
            "pid": os.getpid(), "model": loaded.source.name if loaded is not None else "",
            "uptime_s": round(time.time() - self.started, 1), "clients": len(self.clients),
            "docs": sum(len(c.docs) for c in self.clients.values()),
            "memory_mb": round(_cache_bytes(self.engine) / 2**20, 1),
            "budget_mb": self.engine.options.memory_budget_mb,
            "queued": sum(self.scheduler.waiting(c) for c in list(self.clients.values())),
            "cancelled": counts["cancelled"], "preempted": counts["preempted"], "refreshed": counts["refreshed"],
            "you": {"client": s.id, "docs": len(s.docs), "queued": self.scheduler.waiting(s)}}})

    def _known(self, s: Session, args: dict) -> str:
        uri = _uri(args)
        if uri not in s.docs:
            raise RequestError("not_open", f"document {uri!r} is not open")
        return uri

    def _refresh(self, should_stop) -> bool:
        """Background work when every queue is empty: refresh the first document that needs it."""
        for key, doc in list(self.engine.docs.items()):
            partial = doc.cache is not None and doc.cache.length < len(doc.ids)
            if partial or self.engine.needs_refresh(key):
                try:
                    stats = self.engine.refresh(key, should_stop=should_stop)
                except Cancelled:
                    self._keep_progress(key)
                    self.scheduler.counts["preempted"] += 1
                    return False
                self.scheduler.counts["refreshed"] += 1
                log.info("refreshed %s: %d tokens in %.0f ms", key, stats.encoded, stats.ms)
                return True
        return False


def describe(engine: Engine, uri: str) -> dict | None:
    """The engine's view of one document (for `ghostline/inspect`, tests and bug reports)."""
    doc = engine.docs.get(uri)
    if doc is None:
        return None
    return {"text": doc.whole, "tokens": len(doc.ids), "stale": doc.stale_count, "cached": doc.cache is not None,
            "window": None if doc.full is None else [doc.base, doc.base + len(doc.text)]}


def _cache_bytes(engine: Engine) -> int:
    total = 0
    for doc in list(engine.docs.values()):  # read from the event loop while the engine thread works
        cache = doc.cache
        total += cache.nbytes if cache is not None else 0
    return total


def _completion_dict(out) -> dict:
    if out is None:
        return {"text": "", "stop_reason": "no_context"}
    return {"text": out.text, "tokens": list(out.tokens), "stop_reason": out.stop_reason, "ctx_tokens": out.ctx_tokens,
            "heal": out.heal, "ms": out.ms, "first_token_ms": out.first_token_ms, "drafts": list(out.drafts),
            "confidence": out.confidence, "withheld": out.withheld}


def _completion_options(raw) -> CompletionOptions:
    if not isinstance(raw, dict):
        raise RequestError("bad_request", "options must be a map")
    opts = CompletionOptions()
    checks = {"multiline": lambda v: isinstance(v, bool), "max_tokens": lambda v: _is_int(v) and 1 <= v <= 1024,
              "time_cap_ms": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
              "decoder": lambda v: v in ("greedy", "lookup", "self", "lookup+self", "adadec"), "drafts": lambda v: _is_int(v) and 1 <= v <= 8,
              "halt": lambda v: isinstance(v, bool), "exit": lambda v: isinstance(v, bool),
              "halt_threshold": _unit_or_none, "exit_threshold": _unit_or_none, "gate": lambda v: isinstance(v, bool),
              "gate_strength": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 4}
    for key, value in raw.items():
        if key not in checks or not checks[key](value):
            raise RequestError("bad_request", f"bad completion option {str(key)[:40]}={str(value)[:40]}")
        setattr(opts, key, value)
    return opts


def _unit_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def _arg(args: dict, key: str, kind: type):
    value = args.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not _is_int(value)):
        raise RequestError("bad_request", f"argument {key!r} must be a {kind.__name__}")
    return value


def _uri(args: dict) -> str:
    uri = _arg(args, "uri", str)
    if not uri or len(uri) > MAX_URI:
        raise RequestError("bad_request", f"uri must be 1..{MAX_URI} characters")
    return uri


def _same_user(sock) -> bool:
    """The peer of a Unix socket runs as this user (the folder and the socket's mode say so too)."""
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    import struct

    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 (its folder is 0700). The caller holds the lock,
    so a socket file already there is a dead daemon's."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


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


def _token(args) -> str:
    if args.token_file:
        path = Path(args.token_file)
        if path.stat().st_mode & 0o077:
            log.warning("token file %s is readable by others; chmod 600 it", path)
        return path.read_text().strip()
    if os.environ.get("GHOSTLINE_TOKEN"):
        return os.environ["GHOSTLINE_TOKEN"]
    path = wire.runtime_dir() / "token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_urlsafe(32).encode())
        os.close(fd)
    log.info("token for TCP clients is in %s (give it to GHOSTLINE_TOKEN or engine_token_file)", path)
    return path.read_text().strip()


def daemon_options(args, *, token: str | None = None) -> DaemonOptions:
    """`ghostline engine`'s flags as options (a flag left out keeps the default)."""
    given = {"max_docs": args.max_docs, "max_open": args.max_open, "max_queued": args.max_queued,
             "idle_exit_s": args.idle_exit,
             "max_frame_bytes": int(args.max_frame_mb * 2**20) if args.max_frame_mb else None,
             "hello_frame_bytes": args.max_hello_bytes, "hello_timeout_s": args.hello_timeout,
             "max_unauthenticated": args.max_unauthenticated, "max_clients": args.max_clients,
             "rate_per_s": args.rate, "rate_burst": args.rate_burst}
    return DaemonOptions(**{k: v for k, v in given.items() if v is not None}, token=token)


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
    options = daemon_options(args, token=_token(args) if args.listen else None)
    fd = take_lock(lock)
    if fd is None:
        log.info("an engine daemon already holds %s (pid %s)", lock, lock_holder(lock))
        return ALREADY_RUNNING
    budget = {"memory_budget_mb": args.memory_budget_mb} if args.memory_budget_mb else {}
    budget.update({k: v for k, v in (("window_above", args.window_above), ("window_tokens", args.window_tokens))
                   if v is not None})
    engine = Engine.load(args.model, options=EngineOptions(**budget, precision=args.precision, head=args.head),
                         progress=lambda m: log.info("load: %s", m))
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
