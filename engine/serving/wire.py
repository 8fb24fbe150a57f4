"""What the engine daemon and its clients agree on: frames, calls, error codes, and where the local
daemon lives.

A frame is a 4-byte big-endian length and that many bytes of msgpack holding one map. Requests are
`{"id": int, "call": str, "args": map}`; answers carry the request's id and one of `ok` (the
result), `partial` (a completion as it grows; more frames follow) or `error` (`{"code", "message"}`).
An error about a frame that has no readable id carries `id: None`.

Calls: `hello {version, client, token?}` (first, always; TCP needs the token), `open {uri, text,
defer?}` (`defer`: answer before encoding, the rows encoded when read or idle),
`edit {uri, changes: [[start, end, text], ...]}` (code-point offsets, in order), `context {uri,
text}` (other files' text cached in front of the document, read by its completions; an `open` clears
it), `close {uri}`,
`complete {uri, offset, options?, stream?}`, `cancel {id}`, `inspect {uri}`, `status {}`.

Until a TCP client's `hello` is accepted a frame may hold at most `HELLO_FRAME` bytes; a refused
connection hears why before it closes (`busy`, `too_large`, `hello_timeout`, `unauthorized`), and a
call past a client's rate gets `rate_limited` (the connection lives on).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import socket
import struct
import tempfile
from pathlib import Path

import msgpack

PROTOCOL = 1
HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 2**20
HELLO_FRAME = 4096  # the largest frame before a TCP client's token is accepted
CALLS = ("hello", "open", "edit", "context", "close", "complete", "cancel", "inspect", "status")


class FrameError(ValueError):
    """A frame whose bytes are no request: answered with an error frame, the connection lives on."""


class FrameTooLarge(FrameError):
    """A length past the limit: the stream cannot be trusted after it, so the connection closes."""


def pack(msg: dict, *, limit: int = MAX_FRAME) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > limit:
        raise FrameTooLarge(f"frame of {len(body)} bytes is over the limit of {limit}")
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict:
    """One frame's body -> its map; FrameError for anything else (bad msgpack, trailing bytes, not a map)."""
    try:
        msg = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises ValueError subclasses, and TypeError for unhashable keys
        raise FrameError(f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(msg, dict):
        raise FrameError(f"a frame must hold a map, not {type(msg).__name__}")
    return msg


def body_length(header: bytes, *, limit: int) -> int:
    (n,) = HEADER.unpack(header)
    if n > limit:
        raise FrameTooLarge(f"frame of {n} bytes is over the limit of {limit}")
    return n


async def read_frame(reader: asyncio.StreamReader, *, limit: int = MAX_FRAME) -> bytes | None:
    """The next frame's body, or None at a clean end of stream; ConnectionError if it ends mid-frame."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError("stream ended inside a frame header") from None
        return None
    n = body_length(header, limit=limit)
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectionError("stream ended inside a frame") from None


def recv_frame(sock: socket.socket, *, limit: int = MAX_FRAME) -> bytes | None:
    """Blocking read_frame for a socket."""
    header = _recv_exactly(sock, HEADER.size, eof_ok=True)
    if header is None:
        return None
    return _recv_exactly(sock, body_length(header, limit=limit), eof_ok=False)


def _recv_exactly(sock: socket.socket, n: int, *, eof_ok: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if eof_ok and not buf:
                return None
            raise ConnectionError("stream ended inside a frame")
        buf += chunk
    return bytes(buf)


def error(rid, code: str, message: str) -> dict:
    return {"id": rid, "error": {"code": code, "message": message}}


# where the local daemon lives ---------------------------------------------------------------------


def runtime_dir() -> Path:
    """The user's private folder for daemon sockets and locks: $GHOSTLINE_RUNTIME_DIR, else
    $XDG_RUNTIME_DIR/ghostline, else <tmp>/ghostline-<uid>; created 0700, refused if someone else owns it."""
    if os.environ.get("GHOSTLINE_RUNTIME_DIR"):
        path = Path(os.environ["GHOSTLINE_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "ghostline"
    else:
        path = Path(tempfile.gettempdir()) / f"ghostline-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        raise PermissionError(f"{path} is not a folder of this user: refusing to put the engine socket there")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def daemon_name(model: str | None) -> str:
    """`engine-<model>-<hash>`: one daemon per model, a short name (socket paths are limited to ~100 bytes)."""
    spec = model or "gemma3-270m"
    key = os.path.abspath(spec) if os.path.exists(spec) else spec
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", Path(spec).name)[:24].strip("-") or "model"
    return f"engine-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def socket_path(model: str | None) -> Path:
    return runtime_dir() / (daemon_name(model) + ".sock")


def lock_path(socket: Path) -> Path:
    """The lock a live daemon holds for as long as it runs (it also holds the daemon's pid)."""
    return socket.with_suffix(".lock")


ALREADY_RUNNING = 3  # exit status of a daemon that finds another holding its lock


def take_lock(path: Path) -> int | None:
    """Hold `path` for this process's life (the kernel lets go when it dies); None if a live daemon holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def lock_holder(path: Path) -> int | None:
    """The pid of the live daemon holding `path`, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(raw) if raw.isdigit() else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
