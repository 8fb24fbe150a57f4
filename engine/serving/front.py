"""The connection side of an engine server: frames in, frames out, and who may send them.

`Front` accepts clients on a Unix socket (this user only) or on TCP (a token first), reads their
frames (engine.serving.wire), checks every request's shape, and hands each call to the subclass's `calls`:
`Daemon` (one engine in this process) or the cluster's ingress (engine replicas on Ray Serve).

Before a TCP client has sent the token it may send one small frame (`hello_frame_bytes`), must do so
within `hello_timeout_s`, and only `max_unauthenticated` such connections are held at once; every
client's calls pass a token bucket (`rate_per_s`, `rate_burst`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ghostline.engine.text import Change
from ghostline.engine.serving import wire

MAX_URI = 4096  # characters of a document's uri

log = logging.getLogger("ghostline.front")


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


class Session:
    """One connected client: its documents, its requests in flight, and the way back to it."""

    def __init__(self, sid: int, writer: asyncio.StreamWriter, *, tcp: bool, limit: int, bucket: TokenBucket):
        self.id, self.writer, self.tcp, self.limit, self.bucket = sid, writer, tcp, limit, bucket
        self.name = ""
        self.greeted = False
        self.closed = False
        self.docs: set[str] = set()
        self.inflight: dict[int, object] = {}  # request id -> what answers it

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


class Front:
    """Serves clients until `stop()`; a subclass fills `calls` (name -> handler(session, id, args)) and
    may override the hooks `_starting`, `_stopping`, `_forget` (a client left) and `_about` (hello)."""

    what = "engine server"

    def __init__(self, options: DaemonOptions | None = None):
        self.options = options or DaemonOptions()
        self.clients: dict[int, Session] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address = None
        self._ids = itertools.count(1)
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task] = set()
        self._last_client = time.monotonic()
        self.started = time.time()
        self.calls: dict = {}

    def adopt(self, loop: asyncio.AbstractEventLoop) -> None:
        """Answer requests handed to `dispatch` on `loop`, with no socket of our own (a cluster replica)."""
        self.loop = loop
        self._starting()

    def _starting(self) -> None:
        """Called once the socket listens (or `adopt`), before clients are served."""

    def _stopping(self) -> None:
        """Called after the last client was closed."""

    def _forget(self, s: Session) -> None:
        """A client left: free what it held."""

    def _about(self) -> dict:
        """What `hello` tells a client about the engine behind this server."""
        return {}

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
                raise ValueError(f"a TCP {self.what} needs a token")
            server = await asyncio.start_server(self._tcp_connection, host or "127.0.0.1", port or 0)
            self.address = server.sockets[0].getsockname()[:2]
        self._starting()
        log.info("%s serving on %s (pid %d)", self.what, self.address, os.getpid())
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
            self._stopping()

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
        self._forget(s)

    # requests ------------------------------------------------------------------------------------

    def _handle(self, s: Session, body: bytes) -> bool:
        """Answer one frame; False closes the connection."""
        try:
            msg = wire.unpack(body)
        except wire.FrameError as exc:
            s.send(wire.error(None, "bad_frame", str(exc)))
            return s.greeted or not s.tcp
        return self.dispatch(s, msg)

    def dispatch(self, s: Session, msg: dict) -> bool:
        """Answer one request (a map); False closes the connection."""
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
        s.send({"id": rid, "ok": {"server": "ghostline", "protocol": wire.PROTOCOL, "pid": os.getpid(), "client": s.id,
                                  **self._about(),
                                  "limits": {"max_docs": self.options.max_docs, "max_queued": self.options.max_queued,
                                             "max_frame_bytes": self.options.max_frame_bytes}}})
        return True


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


# requests' arguments and the server flags -------------------------------------------------------


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31


def arg(args: dict, key: str, kind: type):
    value = args.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and not is_int(value)):
        raise RequestError("bad_request", f"argument {key!r} must be a {kind.__name__}")
    return value


def uri_of(args: dict) -> str:
    uri = arg(args, "uri", str)
    if not uri or len(uri) > MAX_URI:
        raise RequestError("bad_request", f"uri must be 1..{MAX_URI} characters")
    return uri


def edit_changes(args: dict) -> list[Change]:
    """An `edit` call's changes, checked: each is [start, end, text]."""
    changes = []
    for c in arg(args, "changes", list):
        if not (isinstance(c, (list, tuple)) and len(c) == 3 and is_int(c[0]) and is_int(c[1])
                and isinstance(c[2], str)):
            raise RequestError("bad_request", "a change is [start, end, text]")
        changes.append(Change(c[0], c[1], c[2]))
    return changes


def load_token(args) -> str:
    """The TCP token: `--token-file`, else $GHOSTLINE_TOKEN, else one made once in the runtime folder."""
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


def engine_options(args) -> dict:
    """The engine flags given (`EngineOptions` fields; a flag left out keeps the default)."""
    given = {"memory_budget_mb": args.memory_budget_mb, "window_above": args.window_above,
             "window_tokens": args.window_tokens, "precision": args.precision, "head": args.head}
    return {k: v for k, v in given.items() if v is not None}
