"""The language server's side of the engine daemon: a connection, and `RemoteEngine`, which has the
part of `Engine`'s surface the server uses, so the server's handlers do not care where the engine
runs.

`RemoteEngine` keeps the text it has sent of every open document. When the daemon dies it
reconnects (starting a new daemon if it was a local one), re-opens those documents (deferred: their rows
are encoded as completions read them or when idle, so a restart does not wait for every file) and carries on;
the editor sees `ghostline/status` go loading -> ready, never an error dialog. Nothing here imports
torch, so a language server on the daemon stays small and starts fast.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ghostline.engine.completion import Completion, CompletionOptions
from ghostline.engine.text import EditError, to_change
from ghostline.engine.serving import wire
from ghostline.engine.serving.wire import ALREADY_RUNNING, lock_holder

log = logging.getLogger("ghostline.remote")
LOST = object()  # put in every waiting queue when the connection ends
STOP_POLL_S = 0.05  # how often a wait that can be stopped asks whether to stop


class ConnectionLost(ConnectionError):
    """The daemon went away (killed, crashed, or closed the connection)."""


class Unavailable(ConnectionError):
    """No daemon could be reached or started."""


class DaemonError(RuntimeError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class RemoteOptions:
    spawn_timeout_s: float = 300.0  # a first start de-quantises the model (about a minute for Gemma)
    idle_exit_s: float = 300.0  # a daemon we start exits this long after its last client leaves
    memory_budget_mb: float = 2048.0  # for a daemon we start (the `memory_budget_mb` setting)
    precision: str = "int8"  # for a daemon we start (the `precision` and `head` settings)
    head: str = "code"
    max_retry_s: float = 30.0  # longest wait between attempts to reach an unavailable daemon


@dataclass
class DaemonModel:
    """What the daemon loaded, shaped like `engine.loader.Loaded` where the server reads it."""

    source: Path
    seconds: float
    from_cache: bool


class Connection:
    """One socket to a daemon. Frames go out under a lock; a reader thread routes each answer to
    the queue of its request id."""

    def __init__(self, sock: socket.socket, *, limit: int = wire.MAX_FRAME):
        self.sock, self.limit = sock, limit
        self.alive = True
        self._lock = threading.Lock()
        self._routes: dict[int, queue.SimpleQueue] = {}
        self._ids = itertools.count(1)
        threading.Thread(target=self._read, name="ghostline-daemon-reader", daemon=True).start()

    @classmethod
    def open(cls, target: str | tuple[str, int], *, timeout: float = 5.0) -> "Connection":
        if isinstance(target, tuple):
            sock = socket.create_connection(target, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target)
            except OSError:
                sock.close()
                raise
        sock.settimeout(None)
        return cls(sock)

    def request(self, call: str, args: dict) -> tuple[int, queue.SimpleQueue]:
        rid, q = next(self._ids), queue.SimpleQueue()
        self._routes[rid] = q
        try:
            if not self.alive:
                raise ConnectionLost("connection to the engine daemon is closed")
            self.send({"id": rid, "call": call, "args": args})
        except ConnectionLost:
            self.forget(rid)
            raise
        return rid, q

    def cancel(self, rid: int) -> None:
        """Ask the daemon to stop request `rid` (its answer still comes, cut short)."""
        self.send({"id": next(self._ids), "call": "cancel", "args": {"id": rid}})

    def send(self, msg: dict) -> None:
        data = wire.pack(msg, limit=self.limit)
        with self._lock:
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self._lost()
                raise ConnectionLost(str(exc)) from None

    def next(self, q: queue.SimpleQueue, timeout: float | None = None) -> dict:
        msg = q.get(timeout=timeout)
        if msg is LOST:
            raise ConnectionLost("the engine daemon went away")
        return msg

    def forget(self, rid: int) -> None:
        self._routes.pop(rid, None)

    def call(self, call: str, args: dict, *, should_stop=None):
        """One request, its result; DaemonError (EditError, KeyError) for an error answer.
        `should_stop()`, polled while waiting, ends the wait (None): the daemon goes on with the
        request and its answer is dropped (an error one logged)."""
        rid, q = self.request(call, args)
        try:
            while True:
                try:
                    return result(self.next(q, None if should_stop is None else STOP_POLL_S))
                except queue.Empty:
                    if should_stop():
                        return None
        finally:
            self.forget(rid)

    def close(self) -> None:
        self._lost()

    def _read(self) -> None:
        try:
            while True:
                body = wire.recv_frame(self.sock, limit=self.limit)
                if body is None:
                    break
                msg = wire.unpack(body)
                q = self._routes.get(msg.get("id"))
                if q is not None:
                    q.put(msg)
                elif "error" in msg:
                    log.warning("engine daemon: %s", msg["error"])
        except (OSError, wire.FrameError) as exc:
            if self.alive:
                log.warning("engine daemon connection: %s", exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        if not self.alive:
            return
        self.alive = False
        for q in list(self._routes.values()):
            q.put(LOST)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def result(msg: dict):
    if "error" not in msg:
        return msg.get("ok")
    err = msg["error"] if isinstance(msg["error"], dict) else {}
    code, message = str(err.get("code", "?")), str(err.get("message", ""))
    if code == "edit":
        raise EditError(message)
    if code == "not_open":
        raise KeyError(message)
    raise DaemonError(code, message)


def parse_target(value: str) -> str | tuple[str, int]:
    """`daemon` (the local daemon) or `tcp://HOST:PORT` -> "daemon" or (host, port)."""
    if value == "daemon":
        return value
    host, _, port = value.removeprefix("tcp://").rpartition(":")
    return host or "127.0.0.1", int(port)


def connect(target: str | tuple[str, int], *, model: str | None, token: str | None = None,
            options: RemoteOptions | None = None, should_stop=None, progress=None) -> tuple[Connection, dict]:
    """A greeted connection to the engine: over TCP at (host, port), or to the local daemon for
    `model`, which is started (detached) when none answers. The daemon's lock settles races between
    servers starting at once: one daemon wins, the others exit and everyone connects to it."""
    opts = options or RemoteOptions()
    hello = {"protocol": wire.PROTOCOL, "client": f"ghostline-lsp pid {os.getpid()}", "token": token}
    if target != "daemon":
        try:
            conn = Connection.open(target)
        except OSError as exc:
            raise Unavailable(f"engine server {target[0]}:{target[1]}: {exc}") from None
        return conn, _greet(conn, hello)
    try:
        path = wire.socket_path(model)
    except OSError as exc:
        raise Unavailable(f"no runtime folder for the engine daemon: {exc}") from None
    deadline, child = time.monotonic() + opts.spawn_timeout_s, None
    while True:
        try:
            conn = Connection.open(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            conn = None
        except OSError as exc:
            raise Unavailable(f"engine daemon socket {path}: {exc}") from None
        if conn is not None:
            try:
                return conn, _greet(conn, hello)
            except ConnectionLost:  # a dying daemon's socket took the connection: wait for the next daemon
                conn.close()
        if child is None and lock_holder(wire.lock_path(path)) is None:
            child = spawn(model, path, opts)
            if progress is not None:
                progress(f"starting the engine daemon (log: {path.with_suffix('.log')})")
        elif child is not None and child.poll() is not None:
            if child.returncode != ALREADY_RUNNING:
                raise Unavailable(f"engine daemon exited ({child.returncode}): {_log_tail(path)}")
            child = None  # another server's daemon won the lock: wait for its socket
        why = "stopped" if should_stop is not None and should_stop() else (
            f"no answer within {opts.spawn_timeout_s:.0f} s" if time.monotonic() > deadline else None)
        if why is not None:
            if child is not None and child.poll() is None:
                child.terminate()  # nobody uses it yet; a server still waiting for it starts its own
            raise Unavailable(f"{why} while waiting for the engine daemon on {path}")
        time.sleep(0.05)


def _greet(conn: Connection, hello: dict) -> dict:
    try:
        info = conn.call("hello", hello)
    except (DaemonError, KeyError, EditError) as exc:
        conn.close()
        raise Unavailable(f"engine daemon refused us: {exc}") from None
    limit = (info.get("limits") or {}).get("max_frame_bytes")
    if isinstance(limit, int) and 0 < limit < conn.limit:
        conn.limit = limit  # never send what the daemon would refuse (it closes the connection)
    return info


def spawn(model: str | None, path: Path, opts: RemoteOptions) -> subprocess.Popen:
    """Start a daemon for `model` at `path`, detached from this server (its own session; output to a log)."""
    import ghostline

    root = str(Path(ghostline.__file__).resolve().parent.parent)  # the folder holding the `ghostline` package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "ghostline", "engine", "--socket", str(path), "--idle-exit", str(opts.idle_exit_s),
           "--memory-budget-mb", str(opts.memory_budget_mb), "--precision", opts.precision, "--head", opts.head] \
        + (["--model", model] if model else [])
    with os.fdopen(os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=path.parent,
                                env=env, start_new_session=True)
    threading.Thread(target=proc.wait, name="ghostline-daemon-reaper", daemon=True).start()
    log.info("started an engine daemon (pid %d) for %s", proc.pid, model or "the default model")
    return proc


def _log_tail(path: Path) -> str:
    try:
        lines = path.with_suffix(".log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(lines[-3:])[-600:]


class RemoteEngine:
    """The engine in a daemon. Calls block (they run on the server's engine worker thread)."""

    def __init__(self, target: str | tuple[str, int], *, model: str | None, token: str | None = None,
                 status: Callable[[str, str], None] | None = None, options: RemoteOptions | None = None):
        self.target, self.model, self.token = target, model, token
        self.status = status or (lambda state, message: None)
        self.options = self.remote = options or RemoteOptions()  # `options.memory_budget_mb`, as Engine's
        self.docs: dict[str, str] = {}  # every open document's text as sent, for resyncing a new daemon
        self.contexts: dict[str, str] = {}  # the context sent for a document since it was opened
        self.conn: Connection | None = None
        self.info: dict = {}
        self.reconnects = 0
        self.closed = False
        self._failures, self._retry_at = 0, 0.0

    @classmethod
    def connect(cls, target, *, model, token=None, status=None, options=None, should_stop=None, progress=None):
        """A connected RemoteEngine; Unavailable if the daemon cannot be reached or started."""
        engine = cls(target, model=model, token=token, status=status, options=options)
        engine.conn, engine.info = connect(target, model=model, token=token, options=engine.remote,
                                           should_stop=should_stop, progress=progress)
        return engine

    @property
    def loaded(self) -> DaemonModel:
        i = self.info
        return DaemonModel(Path(str(i.get("model", ""))), float(i.get("load_s", 0.0)), bool(i.get("from_cache")))

    @property
    def where(self) -> str:
        place = "team server" if self.target != "daemon" else "shared engine daemon"
        return f"{place} pid {self.info.get('pid')}"

    # documents -----------------------------------------------------------------------------------

    def open(self, uri: str, text: str, *, encode: bool = True, should_stop=None) -> dict | None:
        """Open (or re-open) a document; the daemon's update stats (it encodes in its own time:
        `encode` is accepted for the same call as Engine.open). `should_stop()` ends the wait for the
        encode (None), so that a completion sent next can stop it in the daemon. A refusal
        (DaemonError, ...) leaves the text recorded as the daemon holds it."""
        self.contexts.pop(uri, None)  # an open clears the document's context
        return self._record(uri, text, "open", {"uri": uri, "text": text}, should_stop=should_stop)

    def edit(self, uri: str, changes: list, *, strategy: str = "pie", encode: bool = False,
             should_stop=None) -> dict | None:
        """As Engine.edit; the daemon always defers the encode (`encode` is accepted for the same call).
        `should_stop()` ends the wait for the daemon's answer (None), as for `open`."""
        text = self.docs.get(uri)
        if text is None:
            raise KeyError(f"document {uri!r} is not open")
        sent = []
        for change in changes:  # all or nothing, as Engine.edit
            c = to_change(text, change)
            text = text[: c.start] + c.text + text[c.end :]
            sent.append([c.start, c.end, c.text])
        return self._record(uri, text, "edit", {"uri": uri, "changes": sent, "strategy": strategy},
                            should_stop=should_stop)

    def set_context(self, uri: str, text: str, *, should_stop=None) -> dict | None:
        """As Engine.set_context (the daemon encodes its rows in its own idle time); `should_stop()`
        ends the wait for the daemon's answer (None), as for `open`."""
        if uri not in self.docs:
            raise KeyError(f"document {uri!r} is not open")
        self.contexts[uri] = text  # sent even when unchanged: the engine may have lost it (another replica)
        try:
            return self._update("context", {"uri": uri, "text": text}, should_stop=should_stop)
        except (DaemonError, KeyError):
            self.contexts.pop(uri, None)
            raise

    def close(self, uri: str) -> None:
        self.contexts.pop(uri, None)
        if self.docs.pop(uri, None) is not None:
            self._update("close", {"uri": uri})

    def text(self, uri: str) -> str:
        return self.docs[uri]

    def background(self, uri: str, *, should_stop=None) -> None:
        return None  # the daemon does its documents' background work in its own idle time

    def describe(self, uri: str) -> dict | None:
        conn = self._connection()
        if conn is None:
            return None
        try:
            return conn.call("inspect", {"uri": uri})
        except ConnectionLost:
            return None

    def daemon_status(self) -> dict | None:
        conn = self._connection()
        return conn.call("status", {}) if conn is not None else None

    def disconnect(self) -> None:
        """Leave the daemon for good (it frees our documents); later calls do nothing."""
        self.closed = True
        if self.conn is not None:
            self.conn.close()

    def _record(self, uri: str, text: str, call: str, args: dict, *, should_stop=None) -> dict | None:
        """Send an update that makes the document `text`. The text is recorded first (a reconnect
        re-opens what is recorded, so a lost connection still carries it), and put back as it was
        when the daemon refuses the update: the record is what the daemon holds."""
        before = self.docs.get(uri)
        self.docs[uri] = text
        try:
            return self._update(call, args, should_stop=should_stop)
        except (DaemonError, EditError, KeyError):
            if self.docs.get(uri) is text:
                if before is None:
                    self.docs.pop(uri, None)
                else:
                    self.docs[uri] = before
            raise

    def _update(self, call: str, args: dict, *, should_stop=None) -> dict | None:
        """Send an update; if the daemon is gone, the resync after reconnecting carries it (also when
        that reconnect happens here: the update is then in the re-opened text, not sent again)."""
        fresh = self.conn is None or not self.conn.alive
        conn = self._connection()
        if conn is None or fresh:
            return None
        try:
            return conn.call(call, args, should_stop=should_stop)
        except ConnectionLost:
            self._connection()
        except wire.FrameTooLarge as exc:  # nothing was sent: the daemon holds what it held
            raise DaemonError("too_large", f"{args.get('uri')} is too large for the engine daemon ({exc}): "
                                           "no completions for it until it is smaller") from None
        return None

    # completion ----------------------------------------------------------------------------------

    def complete(self, uri: str, offset: int, options: CompletionOptions | None = None, *,
                 should_stop=None) -> Completion:
        """As `Engine.complete`."""
        out = Completion("")
        for out in self.stream(uri, offset, options, should_stop=should_stop):
            pass
        return out

    def stream(self, uri: str, offset: int, options: CompletionOptions | None = None, *,
               should_stop=None) -> Iterator[Completion]:
        """As `Engine.stream`; a completion cut short by a dying daemon is asked again of the new one."""
        if uri not in self.docs:
            raise KeyError(f"document {uri!r} is not open")
        args = {"uri": uri, "offset": offset, "stream": True, "options": (options or CompletionOptions()).to_wire()}
        for _attempt in range(2):
            conn = self._connection()
            if conn is None:
                break
            try:
                yield from self._stream(conn, args, should_stop)
                return
            except ConnectionLost:
                if should_stop is not None and should_stop():
                    break
            except KeyError as exc:  # the daemon does not hold it (too large to send): no suggestion
                log.warning("engine daemon: %s", exc)
                break
        yield Completion("", stop_reason="unavailable")

    def _stream(self, conn: Connection, args: dict, should_stop) -> Iterator[Completion]:
        rid, q = conn.request("complete", args)
        cancelled = False
        try:
            while True:
                try:
                    msg = conn.next(q, timeout=0.01)
                except queue.Empty:
                    if not cancelled and should_stop is not None and should_stop():
                        conn.cancel(rid)
                        cancelled = True
                    continue
                if "partial" in msg:
                    yield _completion(msg["partial"])
                    continue
                try:
                    done = result(msg)
                except DaemonError as exc:
                    if exc.code != "cancelled":
                        raise
                    done = {"stop_reason": "cancelled"}
                yield _completion(done)
                return
        finally:
            conn.forget(rid)

    # the connection ------------------------------------------------------------------------------

    def _connection(self) -> Connection | None:
        """The live connection; after a loss, a new one with every document re-opened, or None while
        the daemon cannot be reached (tried again after a back-off)."""
        if self.conn is not None and self.conn.alive:
            return self.conn
        if self.closed or time.monotonic() < self._retry_at:
            return None
        lost, self.conn = self.conn is not None, None
        self.status("loading", "engine daemon lost; reconnecting" if lost else "connecting to the engine daemon")
        try:
            conn, info = connect(self.target, model=self.model, token=self.token, options=self.remote)
            for uri, text in list(self.docs.items()):  # deferred: a resync must not wait for every encode
                try:
                    conn.call("open", {"uri": uri, "text": text, "defer": True})
                    if self.contexts.get(uri):
                        conn.call("context", {"uri": uri, "text": self.contexts[uri]})
                except wire.FrameTooLarge:
                    pass
                except (DaemonError, EditError, KeyError) as exc:  # one refused document: the others go on
                    log.warning("engine daemon refused to re-open %s: %s", uri, exc)
        except (Unavailable, ConnectionLost, DaemonError) as exc:
            self._failures += 1
            wait = min(self.remote.max_retry_s, 0.5 * 2**self._failures)
            self._retry_at = time.monotonic() + wait
            log.error("engine daemon unavailable (%s); trying again in %.0f s", exc, wait)
            self.status("error", f"engine daemon unavailable: {exc}")
            return None
        self.conn, self.info, self._failures = conn, info, 0
        self.reconnects += lost
        log.info("engine daemon pid %s: %d documents resynced", info.get("pid"), len(self.docs))
        self.status("ready", f"{self.where}: reconnected, {len(self.docs)} documents resynced")
        return conn


def _completion(d) -> Completion:
    out = Completion.from_wire(d if isinstance(d, dict) else {})
    out.text = out.text if isinstance(out.text, str) else ""
    out.drafts = [t for t in (out.drafts or []) if isinstance(t, str)]
    out.context_tokens = out.context_tokens if isinstance(out.context_tokens, int) else 0
    return out
