"""The engine daemon: frames, the scheduler, the daemon over real sockets (a tiny random model in a
thread), and end to end: real language servers over stdio sharing a real daemon process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostline.engine.serving import wire
from ghostline.lsp.client import running_server
from ghostline.engine.serving.daemon import Daemon, DaemonOptions, Scheduler, lock_holder, stop_daemons
from ghostline.engine.engine import Cancelled, CompletionOptions
from ghostline.engine.text import Change, EditError
from ghostline.lsp.remote import Connection, DaemonError, RemoteEngine
from ghostline.engine.serving.worker import Job

PY = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\ndef sub(a, b):\n    "
URI = "file:///tmp/ghostline-test/calc.py"
HELLO = {"protocol": wire.PROTOCOL, "client": "test"}


# frames ------------------------------------------------------------------------------------------


def test_frames_round_trip_and_refuse_what_is_not_a_request():
    msg = {"id": 7, "call": "open", "args": {"uri": "file:///\u00e9.py", "text": "x = 1\n" * 3}}
    data = wire.pack(msg)
    assert wire.HEADER.unpack(data[:4])[0] == len(data) - 4
    assert wire.unpack(data[4:]) == msg
    with pytest.raises(wire.FrameTooLarge):
        wire.pack({"text": "x" * 100}, limit=50)
    with pytest.raises(wire.FrameTooLarge):
        wire.body_length(wire.HEADER.pack(51), limit=50)
    assert wire.body_length(wire.HEADER.pack(50), limit=50) == 50
    for bad in [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"a": 1}) + b"\x00", msgpack.packb({1: 2}),
                b"\x91" * 5000 + b"\xc0", b"\xa3ab"]:
        with pytest.raises(wire.FrameError):
            wire.unpack(bad)


values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
                      | st.text(max_size=30) | st.binary(max_size=30),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_any_map_survives_a_round_trip(msg):
    assert wire.unpack(wire.pack(msg)[4:]) == msg


def test_frames_read_byte_by_byte_and_ends_of_stream():
    data = wire.pack({"id": 1}) + wire.pack({"id": 2, "text": "y" * 3000})

    async def go():
        r = asyncio.StreamReader()

        async def feed():
            for i in range(len(data)):
                r.feed_data(data[i : i + 1])
                await asyncio.sleep(0)
            r.feed_eof()

        task = asyncio.create_task(feed())
        assert wire.unpack(await wire.read_frame(r)) == {"id": 1}
        assert wire.unpack(await wire.read_frame(r))["text"] == "y" * 3000
        assert await wire.read_frame(r) is None  # a clean end between frames
        await task
        for cut in (data[:2], data[len(wire.pack({"id": 1})) : -1]):  # inside a header; inside a body
            r = asyncio.StreamReader()
            r.feed_data(cut)
            r.feed_eof()
            with pytest.raises(ConnectionError):
                await wire.read_frame(r)
        r = asyncio.StreamReader()
        r.feed_data(wire.HEADER.pack(wire.MAX_FRAME + 1))
        with pytest.raises(wire.FrameTooLarge):
            await wire.read_frame(r)

    asyncio.run(go())
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        assert wire.unpack(wire.recv_frame(b)) == {"id": 1}
        assert len(wire.unpack(wire.recv_frame(b))["text"]) == 3000
        assert wire.recv_frame(b) is None


# the scheduler -----------------------------------------------------------------------------------


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_scheduler_turns_newest_completion_wins_and_encodes_yield_to_other_clients():
    sched = Scheduler(idle_after_s=5.0, slice_s=0.05)
    sched.start()
    try:
        a, b, ran, gate = object(), object(), [], threading.Event()
        block = Job("update", lambda stop: gate.wait(10))
        sched.submit(a, block)
        _wait(lambda: sched.current is not None)
        jobs = {name: Job("update", lambda stop, n=name: ran.append(n)) for name in ("a1", "a2", "b1", "b2")}
        for client, name in [(a, "a1"), (a, "a2"), (b, "b1"), (b, "b2")]:
            sched.submit(client, jobs[name])
        old = Job("complete", lambda stop: ran.append("old"), "u")
        new = Job("complete", lambda stop: ran.append("new"), "u")
        sched.submit(b, old)
        sched.submit(b, new)  # the same document: the older request is cancelled
        assert sched.waiting(b) == 3
        gate.set()
        new.future.result(10)
        assert old.future.cancelled()
        assert ran == ["a1", "b1", "a2", "b2", "new"]  # clients take turns; each client's order holds

        def encode(stop):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                if stop():
                    return "stopped"
                time.sleep(0.005)
            return "finished"

        mine = Job("encode", encode, "big")
        sched.submit(a, mine)
        _wait(lambda: sched.current is not None and sched.current[1] is mine)
        sched.submit(a, Job("complete", lambda stop: "a's own", "big"))  # the same document waits for it
        assert mine.future.result(10) == "finished"
        cases = [(b, "complete"), (b, "update"), (a, "complete")]  # another document's completion or edit
        for n, (client, kind) in enumerate(cases, 1):  # takes the engine, another client's or its own
            theirs = Job("encode", encode, "big")
            sched.submit(a, theirs)
            _wait(lambda: sched.current is not None and sched.current[1] is theirs)
            other = Job(kind, lambda stop: "other's", "v")
            sched.submit(client, other)
            assert theirs.future.result(10) == "stopped"
            assert other.future.result(10) == "other's" and sched.counts["preempted"] == n

        def late(stop):  # its first chunk starts after the slice (tokenising, a busy machine)
            time.sleep(0.1)
            return stop(), stop()

        gate.clear()
        sched.submit(b, Job("update", lambda stop: gate.wait(10)))
        slow = Job("encode", late, "big")
        sched.submit(a, slow)
        sched.submit(b, Job("update", lambda stop: None))
        gate.set()
        assert slow.future.result(10) == (False, True)  # the first chunk always runs: progress
    finally:
        sched.stop()
    assert not sched.alive


def test_a_completion_that_yields_while_encoding_runs_again_and_is_answered():
    """A completion that must encode first yields to another document's completion (raising
    Cancelled after `should_yield`), runs again after it, and its answer is the second run's; one
    cancelled while it waits is answered as cancelled."""
    sched = Scheduler(idle_after_s=5.0, slice_s=0.05)
    sched.start()
    try:
        a, ran = object(), []
        job = Job("complete", None, "big")

        def complete(stop):
            ran.append("big")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                if job.should_yield():
                    raise Cancelled("yielded")
                time.sleep(0.005)
            return "big's"

        job.fn = complete
        sched.submit(a, job)
        _wait(lambda: sched.current is not None and sched.current[1] is job)
        small = Job("complete", lambda stop: ran.append("small") or "small's", "small")
        sched.submit(a, small)
        assert small.future.result(10) == "small's" and job.future.result(10) == "big's"
        assert ran[:3] == ["big", "small", "big"]
        assert len(sched.waits_ms) == 2  # one wait each: the resumed run is not a second wait

        job = Job("complete", complete, "big")  # yields again; cancelled while it waits its turn
        sched.submit(a, job)
        _wait(lambda: sched.current is not None and sched.current[1] is job)
        gate = threading.Event()
        sched.submit(a, Job("complete", lambda stop: gate.wait(10), "small"))
        _wait(lambda: sched.current is not None and sched.current[1] is not job)
        job.cancel()
        gate.set()
        assert isinstance(job.future.exception(10), Cancelled)
    finally:
        sched.stop()


def test_idle_work_stops_when_a_job_arrives():
    seen, started = [], threading.Event()

    def idle(stop):
        started.set()
        t0 = time.monotonic()
        while not stop() and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        seen.append(time.monotonic() - t0)
        return False

    sched = Scheduler(idle=idle, idle_after_s=0.02)
    sched.start()
    try:
        assert started.wait(5)
        job = Job("complete", lambda stop: "done", "u")
        sched.submit(object(), job)
        assert job.future.result(5) == "done"
        assert seen and seen[0] < 5
    finally:
        sched.stop()


# the daemon over real sockets, with a tiny random model -------------------------------------------


@contextmanager
def serving(engine, *, tcp: bool = False, **opts):
    """A real Daemon on a Unix socket (or TCP on a free port) in a thread of this process."""
    folder = Path(tempfile.mkdtemp(prefix="gl-"))
    daemon, ready = Daemon(engine, DaemonOptions(**{"idle_refresh_s": 0.05, **opts})), threading.Event()
    kw = dict(host="127.0.0.1", port=0) if tcp else dict(path=folder / "e.sock")
    thread = threading.Thread(target=lambda: asyncio.run(daemon.serve(**kw, ready=lambda d: ready.set())), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield daemon
    finally:
        daemon.stop()
        thread.join(30)
        shutil.rmtree(folder, ignore_errors=True)
    assert not thread.is_alive() and not daemon.scheduler.alive


def greeted(daemon, **hello) -> Connection:
    conn = Connection.open(tuple(daemon.address) if isinstance(daemon.address, tuple) else daemon.address)
    conn.call("hello", {**HELLO, **hello})
    return conn


def frames(conn: Connection, request: tuple, timeout: float = 30.0) -> list[dict]:
    """Every frame answering a request (`conn.request`'s id and queue), through its last (ok or error)."""
    rid, q = request
    out = []
    while True:
        msg = conn.next(q, timeout)
        out.append(msg)
        if "partial" not in msg:
            conn.forget(rid)
            return out


@pytest.fixture
def tiny(tiny_engine_factory):
    return tiny_engine_factory("llama")


def test_a_client_without_documents_leaves_without_a_job(tiny):
    """A status check (hello, status, goodbye) never takes a turn on the engine thread: a job there
    would make the encodes running for everyone else yield to it."""
    with serving(tiny) as daemon:
        jobs = []
        submit = daemon.scheduler.submit
        daemon.scheduler.submit = lambda client, job, **kw: jobs.append(job.kind) or submit(client, job, **kw)
        for _ in range(3):
            conn = Connection.open(daemon.address)
            conn.call("hello", HELLO)
            assert conn.call("status", {})["docs"] == 0
            conn.close()
        _wait(lambda: not daemon.clients)
        assert jobs == []
        conn = Connection.open(daemon.address)
        conn.call("hello", HELLO)
        conn.call("open", {"uri": URI, "text": PY})
        conn.close()
        _wait(lambda: not daemon.clients)
        _wait(lambda: jobs[-1:] == ["update"])  # freeing its document, after its open
        _wait(lambda: not tiny.docs)
        assert len(jobs) == 2


def test_calls_stream_and_cancel_over_a_private_unix_socket(tiny):
    with serving(tiny) as daemon:
        assert stat.S_IMODE(os.stat(daemon.address).st_mode) == 0o600
        conn = Connection.open(daemon.address)
        with pytest.raises(DaemonError, match="hello_first"):
            conn.call("status", {})
        hello = conn.call("hello", HELLO)
        assert hello["protocol"] == wire.PROTOCOL and hello["pid"] == os.getpid()
        conn.call("open", {"uri": URI, "text": PY})
        conn.call("edit", {"uri": URI, "changes": [[4, 7, "plus"], [0, 0, "# calc\n"]]})
        text = "# calc\n" + PY.replace("def add", "def plus")
        assert conn.call("inspect", {"uri": URI})["text"] == text
        got = frames(conn, conn.request("complete", {"uri": URI, "offset": len(text), "stream": True, "options": {
            "multiline": True, "max_tokens": 8, "time_cap_ms": None}}))
        assert "ok" in got[-1] and got[-1]["ok"]["stop_reason"] and len(got[-1]["ok"]["tokens"]) >= 1
        assert len(got) >= 2 and all("partial" in m for m in got[:-1])  # the suggestion streamed as it grew
        conn.call("open", {"uri": "file:///d.py", "text": PY})
        got = frames(conn, conn.request("complete", {"uri": "file:///d.py", "offset": len(PY), "stream": True, "options": {
            "multiline": True, "max_tokens": 8, "drafts": 3}}))
        assert len(got) >= 2 and got[-1]["ok"]["drafts"], got[-1]  # the best draft as it grows, then all of them
        long = {"uri": URI, "offset": len(text), "options": {"multiline": True, "max_tokens": 1024, "time_cap_ms": None}}
        first = conn.request("complete", long)
        second = conn.request("complete", long)  # the newest request of a document cancels the older
        assert frames(conn, first)[-1]["ok"]["stop_reason"] == "cancelled"
        conn.cancel(second[0])
        assert frames(conn, second)[-1]["ok"]["stop_reason"] == "cancelled"
        status = conn.call("status", {})
        assert status["clients"] == 1 and status["docs"] == 2 and status["cancelled"] >= 1
        conn.call("close", {"uri": URI})
        assert conn.call("inspect", {"uri": URI}) is None
        conn.close()


def test_clients_see_only_their_documents_and_leaving_frees_them(tiny):
    with serving(tiny) as daemon:
        one, two = greeted(daemon), greeted(daemon)
        one.call("open", {"uri": URI, "text": PY})
        two.call("open", {"uri": URI, "text": "x = 1\n"})
        two.call("open", {"uri": "file:///two.py", "text": "y = 2\n"})
        assert one.call("inspect", {"uri": URI})["text"] == PY
        assert two.call("inspect", {"uri": URI})["text"] == "x = 1\n"
        assert one.call("inspect", {"uri": "file:///two.py"}) is None
        with pytest.raises(KeyError):
            one.call("complete", {"uri": "file:///two.py", "offset": 0})
        assert one.call("status", {})["docs"] == 3 and len(tiny.docs) == 3
        two.close()
        _wait(lambda: len(tiny.docs) == 1)
        status = one.call("status", {})
        assert status["clients"] == 1 and status["docs"] == 1
        one.close()


def test_a_documents_context_travels_stays_the_clients_own_and_is_resent_after_a_reconnect(tiny):
    """`context` caches text in front of the client's own document (another client's of the same
    name reads none), the daemon encodes it when idle, an `open` clears it, and a client that lost
    its connection sends it again with its documents."""
    ctx = "# lib.py\ndef sub(a, b):\n    return a - b\n"
    with serving(tiny) as daemon:
        one = RemoteEngine.connect(str(daemon.address), model=None, status=lambda *a: None)
        two = RemoteEngine.connect(str(daemon.address), model=None, status=lambda *a: None)
        one.open(URI, PY)
        two.open(URI, PY)
        one.set_context(URI, ctx)
        with pytest.raises(KeyError):
            one.set_context("file:///never.py", ctx)
        deadline = time.monotonic() + 30
        while one.describe(URI)["context_missing"]:  # encoded in the daemon's idle time (a poll is a job: not too often)
            assert time.monotonic() < deadline, "the daemon never encoded the context"
            time.sleep(0.3)
        opts = CompletionOptions(multiline=True, max_tokens=6)
        assert one.complete(URI, len(PY), opts).context_tokens > 5
        assert two.complete(URI, len(PY), opts).context_tokens == 0
        assert one.describe(URI)["context_text"] == ctx and two.describe(URI)["context_text"] == ""
        one.conn.close()  # the daemon freed one's documents; the next call reconnects and resends them
        assert one.describe(URI)["context_text"] == ctx
        assert one.describe(URI)["text"] == PY
        one.open(URI, PY)  # a fresh document: no context
        assert one.describe(URI)["context_text"] == "" and URI not in one.contexts
        one.disconnect()
        two.disconnect()


def test_opens_that_yield_to_each_other_finish_and_equal_an_uninterrupted_encode(tiny_engine_factory):
    big = PY * 12  # ~500 tokens: many chunks of 8, each one a chance to yield to the other client
    reference = tiny_engine_factory("llama", encode_chunk=8)
    reference.open(URI, big)
    expected = reference.complete(URI, len(big), CompletionOptions(max_tokens=6)).text
    engine = tiny_engine_factory("llama", encode_chunk=8)
    with serving(engine, slice_s=0.0) as daemon:
        one, two = greeted(daemon), greeted(daemon)
        sent = [(c, c.request(call, args)) for c in (one, two)
                for call, args in (("open", {"uri": URI, "text": big}), ("inspect", {"uri": URI}))]
        views = [frames(c, request)[-1]["ok"] for c, request in sent][1::2]
        assert all(v["text"] == big and v["stale"] == 0 for v in views)
        assert daemon.scheduler.counts["preempted"] >= 10  # they did take turns
        for key, doc in engine.docs.items():
            assert doc.cache.length == len(doc.ids) and doc.stale_count == 0, key
        for c in (one, two):
            assert c.call("complete", {"uri": URI, "offset": len(big), "options": {"max_tokens": 6}})["text"] == expected
            c.close()


def test_a_deferred_open_answers_before_encoding_and_the_idle_daemon_mends_it(tiny_engine_factory):
    """A resync after a restart opens with `defer`: the answer comes before any encoding; the rows are
    encoded when idle (or by the completion that reads them) and the answer equals an eager open's."""
    big = PY * 12
    reference = tiny_engine_factory("llama")
    reference.open(URI, big)
    expected = reference.complete(URI, len(big), CompletionOptions(max_tokens=6)).text
    engine = tiny_engine_factory("llama")
    with serving(engine) as daemon:
        conn = greeted(daemon)
        with pytest.raises(DaemonError, match="defer"):
            conn.call("open", {"uri": URI, "text": big, "defer": 1})
        opened = conn.call("open", {"uri": URI, "text": big, "defer": True})
        (doc,) = engine.docs.values()
        assert opened["encoded"] == 0 and opened["stale"] == len(doc.ids) > 100  # every row missing
        _wait(lambda: doc.missing_count == 0)  # read here, not asked: a request would postpone idle work
        assert conn.call("inspect", {"uri": URI})["stale"] == 0
        assert conn.call("complete", {"uri": URI, "offset": len(big), "options": {"max_tokens": 6}})["text"] == expected
        conn.close()


def _after_an_eager_open(tiny_engine_factory, text: str) -> str:
    """The completion at the end of `text` after an uninterrupted encode: the reference."""
    reference = tiny_engine_factory("llama", encode_chunk=8)
    reference.open(URI, text)
    return reference.complete(URI, len(text), CompletionOptions(max_tokens=6)).text


def _keep_busy(conn: Connection) -> tuple:
    """A long completion of another document sent on `conn`: the jobs sent after it queue."""
    other = "file:///tmp/ghostline-test/other.py"
    conn.call("open", {"uri": other, "text": PY})
    return conn.request("complete", {"uri": other, "offset": len(PY),
                                     "options": {"multiline": True, "max_tokens": 256, "time_cap_ms": None}})


def test_a_completion_of_a_file_being_opened_stops_its_encode_and_reads_what_it_needs(tiny_engine_factory):
    """A file opened and asked about at once: the open's encode stops for that completion and no rest
    of it is queued before the completion, which encodes the rows it reads within its budget; idle
    work mends the others and the answer then equals an eager open's."""
    big = PY * 12
    expected = _after_an_eager_open(tiny_engine_factory, big)
    engine = tiny_engine_factory("llama", encode_chunk=8, mend_budget=16)
    with serving(engine, idle_refresh_s=1.0) as daemon:
        conn = greeted(daemon)
        slow = _keep_busy(conn)
        opened = conn.request("open", {"uri": URI, "text": big})  # both wait behind the slow completion
        asked = conn.request("complete", {"uri": URI, "offset": len(big), "options": {"max_tokens": 6}})
        frames(conn, slow)
        assert frames(conn, opened)[-1]["ok"]["deferred"] is True
        assert "text" in frames(conn, asked)[-1]["ok"]
        doc = engine.docs[next(k for k in engine.docs if k.endswith("calc.py"))]
        assert doc.missing_count > len(doc.ids) // 2  # the completion encoded 16 rows of its own, no more
        _wait(lambda: doc.stale_count == 0)  # the rest, then those 16 again (they were encoded over holes)
        assert conn.call("complete", {"uri": URI, "offset": len(big), "options": {"max_tokens": 6}})["text"] == expected
        conn.close()


def test_a_language_server_that_stops_waiting_for_an_open_lets_its_completion_stop_the_encode(tiny_engine_factory):
    """Through `RemoteEngine` (the language server's side): an open and an edit whose waits are
    stopped (a completion waits in the server) return at once; the completion sent next stops the
    daemon's encode and reads the rows it needs; the daemon applies the edit in order, idle work mends
    the rest, and the answer then equals an eager open's of the edited text."""
    big, top = PY * 12, "# top\n"
    expected = _after_an_eager_open(tiny_engine_factory, top + big)
    engine = tiny_engine_factory("llama", encode_chunk=8, mend_budget=16)
    with serving(engine, idle_refresh_s=1.0) as daemon:
        busy = greeted(daemon)
        slow = _keep_busy(busy)
        remote = RemoteEngine.connect(str(daemon.address), model=None)
        assert remote.open(URI, big, should_stop=lambda: True) is None  # the open waits behind the slow job
        assert remote.edit(URI, [Change(0, 0, top)], should_stop=lambda: True) is None
        assert remote.complete(URI, len(top + big), CompletionOptions(max_tokens=6)).stop_reason != "unavailable"
        doc = engine.docs[next(k for k in engine.docs if k.endswith("calc.py"))]
        assert doc.missing_count > len(doc.ids) // 2  # the completion encoded 16 rows of its own, no more
        frames(busy, slow)
        _wait(lambda: doc.stale_count == 0)
        assert remote.complete(URI, len(top + big), CompletionOptions(max_tokens=6)).text == expected
        assert remote.describe(URI)["text"] == top + big == remote.docs[URI]
        remote.disconnect()
        busy.close()


def test_per_client_limits(tiny):
    with serving(tiny, max_open=3, max_queued=1) as daemon:
        conn = greeted(daemon)
        for i in range(3):
            conn.call("open", {"uri": f"file:///{i}.py", "text": PY})
        with pytest.raises(DaemonError, match="limit"):
            conn.call("open", {"uri": "file:///3.py", "text": PY})
        conn.call("open", {"uri": "file:///0.py", "text": PY + "1"})  # re-opening one is fine
        args = {"offset": len(PY), "options": {"multiline": True, "max_tokens": 100, "time_cap_ms": None}}
        sent = [conn.request("complete", {**args, "uri": f"file:///{i}.py"}) for i in range(3)]
        answers = [frames(conn, sent[0])[-1]]
        for request in sent[1:]:
            conn.cancel(request[0])
            answers.append(frames(conn, request)[-1])
        codes = [a["error"]["code"] if "error" in a else "ok" for a in answers]
        assert "limit" in codes and "ok" in codes, codes
        conn.close()


def _raw(daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.address)
    sock.settimeout(30)
    return sock


def _ask(sock, body: bytes) -> dict:
    sock.sendall(wire.HEADER.pack(len(body)) + body)
    return wire.unpack(wire.recv_frame(sock))


def test_malformed_frames_get_error_frames_and_the_connection_lives(tiny):
    with serving(tiny, max_frame_bytes=4096) as daemon:
        sock = _raw(daemon)
        pk = msgpack.packb
        assert "ok" in _ask(sock, pk({"id": 1, "call": "hello", "args": HELLO}))
        assert _ask(sock, pk({"id": 2, "call": "open", "args": {"uri": URI, "text": PY}}))["ok"]["strategy"] == "open"
        cases = [(b"\xc1", None, "bad_frame"), (pk([1, 2]), None, "bad_frame"), (b"", None, "bad_frame"),
                 (pk({"id": "x", "call": "status"}), None, "bad_request"),
                 (pk({"id": 5, "call": "nope"}), 5, "unknown_call"),
                 (pk({"id": 6, "call": "complete", "args": {"uri": URI, "offset": "3"}}), 6, "bad_request"),
                 (pk({"id": 7, "call": "complete", "args": {"uri": URI, "offset": 3, "options": {"max_tokens": 10**9}}}),
                  7, "bad_request"),
                 (pk({"id": 8, "call": "complete", "args": {"uri": URI, "offset": 10**6}}), 8, "bad_request"),
                 (pk({"id": 9, "call": "edit", "args": {"uri": URI, "changes": [[5, 1, "x"]]}}), 9, "edit"),
                 (pk({"id": 10, "call": "edit", "args": {"uri": URI, "changes": [["a"]]}}), 10, "bad_request"),
                 (pk({"id": 11, "call": "inspect", "args": []}), 11, "bad_request")]
        for body, rid, code in cases:
            answer = _ask(sock, body)
            assert answer["id"] == rid and answer["error"]["code"] == code, (body, answer)
        assert _ask(sock, pk({"id": 12, "call": "inspect", "args": {"uri": URI}}))["ok"]["text"] == PY
        sock.sendall(wire.HEADER.pack(4097))  # past the limit: an error frame, then the end
        assert wire.unpack(wire.recv_frame(sock))["error"]["code"] == "too_large"
        assert wire.recv_frame(sock) is None
        sock.close()
        _wait(lambda: not tiny.docs)  # that client's document was freed


TOKEN = "s3cret-" + "k" * 30


def test_tcp_refuses_without_the_token_and_never_logs_it(tiny, caplog):
    caplog.set_level("DEBUG")
    with pytest.raises(ValueError, match="token"):
        asyncio.run(Daemon(tiny).serve(host="127.0.0.1", port=0))
    with serving(tiny, tcp=True, token=TOKEN) as daemon:
        for hello in ({}, {"token": "wrong"}, {"token": TOKEN[:-1]}, {"token": 12}):
            conn = Connection.open(tuple(daemon.address))
            with pytest.raises(DaemonError, match="unauthorized"):
                conn.call("hello", {**HELLO, **hello})
            _wait(lambda: not conn.alive)  # refused and closed
        conn = Connection.open(tuple(daemon.address))
        with pytest.raises(DaemonError, match="unauthorized"):
            conn.call("status", {})  # nothing before hello
        _wait(lambda: not conn.alive)
        conn = greeted(daemon, token=TOKEN)
        conn.call("open", {"uri": URI, "text": PY})
        assert conn.call("complete", {"uri": URI, "offset": len(PY), "options": {"max_tokens": 4}})["stop_reason"]
        conn.close()
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text
    assert "refused" in caplog.text


def test_remote_engine_against_a_team_server(tiny):
    states = []
    with serving(tiny, tcp=True, token=TOKEN, max_frame_bytes=8192) as daemon:
        remote = RemoteEngine.connect(tuple(daemon.address), model=None, token=TOKEN,
                                      status=lambda state, message: states.append(state))
        remote.open(URI, PY)
        remote.edit(URI, [Change(4, 7, "plus")])
        assert remote.describe(URI)["text"] == PY.replace("def add", "def plus") == remote.docs[URI]
        out = remote.complete(URI, len(PY) + 1, CompletionOptions(max_tokens=4))
        assert out.stop_reason not in ("unavailable", "cancelled") and out.tokens
        with pytest.raises(DaemonError, match="too_large"):
            remote.open("file:///big.py", "x = 1\n" * 4000)  # over the daemon's frame limit: never sent
        assert "file:///big.py" not in remote.docs and remote.describe("file:///big.py") is None
        held = remote.docs[URI]
        with pytest.raises(DaemonError, match="too_large"):
            remote.edit(URI, [Change(0, 0, "x = 1\n" * 4000)])  # refused here: the record stays the daemon's
        remote.edit(URI, [Change(0, 0, "# one\n")])
        assert remote.describe(URI)["text"] == "# one\n" + held == remote.docs[URI]
        with pytest.raises(EditError):
            remote.edit(URI, [Change(5, 1, "x")])  # refused here, as the engine would
        assert remote.describe(URI)["text"] == remote.docs[URI]
    assert remote.complete(URI, 3).stop_reason == "unavailable"  # the server is gone: empty, never an error
    assert states[-1] == "error"
    remote.disconnect()


good_ids = st.integers(3, 2**20)
ids = good_ids | good_ids | good_ids | st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=4)
changes = st.lists(st.tuples(st.integers(-5, 200), st.integers(-5, 200), st.text(max_size=5)).map(list), max_size=3)
arg_values = values | changes | st.sampled_from([URI, URI, "file:///b.py", 0, 10, len(PY)])
plausible = st.fixed_dictionaries({"uri": st.sampled_from([URI, "file:///b.py"])}, optional={
    "text": st.text(max_size=40), "offset": st.integers(-1, 120), "changes": changes, "stream": st.booleans(),
    "id": good_ids, "strategy": st.sampled_from(["pie", "full", "prefix", "naive", "x"]),
    "options": st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(0, 12), "multiline": st.booleans(), "drafts": st.integers(0, 4),
        "time_cap_ms": st.none() | st.floats(-1, 100), "decoder": st.sampled_from(["greedy", "lookup", "?"])})})
requests = st.fixed_dictionaries({"id": ids, "call": st.sampled_from(wire.CALLS + ("nope", "")), "args": plausible | st.dictionaries(
    st.sampled_from(["uri", "text", "offset", "changes", "options", "stream", "id", "token", "strategy"]), arg_values,
    max_size=5) | values})
well_formed = st.fixed_dictionaries({"id": good_ids, "call": st.sampled_from(wire.CALLS), "args": plausible})
bodies = (st.binary(max_size=120) | values.map(msgpack.packb) | requests.map(msgpack.packb)
          | well_formed.map(msgpack.packb) | well_formed.map(msgpack.packb))


def test_fuzzed_frames_never_crash_the_daemon(tiny):
    with serving(tiny, max_frame_bytes=1 << 16, max_queued=8) as daemon:
        conns, answered = {}, Counter()

        def conn_for(greet: bool):
            sock = conns.get(greet)
            if sock is None:
                sock = conns[greet] = _raw(daemon)
                if greet:
                    _ask(sock, msgpack.packb({"id": 1, "call": "hello", "args": HELLO}))
                    _ask(sock, msgpack.packb({"id": 2, "call": "open", "args": {"uri": URI, "text": PY}}))
            return sock

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies, greet=st.booleans())
        def check(body, greet):
            sock = conn_for(greet)
            probe = 2**62
            sock.sendall(wire.HEADER.pack(len(body)) + body + wire.pack({"id": probe, "call": "status", "args": {}}))
            while True:  # the connection lives: the probe after the fuzzed frame is answered
                msg = wire.unpack(wire.recv_frame(sock))
                if msg.get("id") == probe:
                    assert "ok" in msg or msg["error"]["code"] == "hello_first"
                    return
                answered[msg["error"]["code"] if "error" in msg else "ok"] += 1

        check()
        assert sum(answered.values()) >= 100 and all(answered[k] for k in ("ok", "bad_frame", "bad_request")), answered
        for sock in conns.values():
            sock.close()
        assert daemon.scheduler.alive
        conn = greeted(daemon)
        conn.call("open", {"uri": URI, "text": PY})
        assert conn.call("complete", {"uri": URI, "offset": len(PY), "options": {"max_tokens": 4}})["stop_reason"]
        conn.close()


# end to end: language servers over stdio, one daemon process --------------------------------------


@pytest.fixture
def run_dir():
    folder = Path(tempfile.mkdtemp(prefix="gl-"))  # short: socket paths are limited to ~100 bytes
    try:
        yield folder
    finally:
        stop_daemons(folder)
        shutil.rmtree(folder, ignore_errors=True)


def servers(run_dir: Path, n: int, **options):
    env = dict(os.environ, GHOSTLINE_RUNTIME_DIR=str(run_dir))
    return [running_server(engine="daemon", env=env, options={"debounce_ms": 0, **options}) for _ in range(n)]


async def _until(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def daemon_pid(run_dir: Path) -> int | None:
    locks = list(run_dir.glob("engine-*.lock"))
    assert len(locks) == 1, locks
    return lock_holder(locks[0])


@pytest.mark.slow
def test_two_language_servers_share_one_daemon(run_dir):
    other = "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        "

    async def go():
        cms = servers(run_dir, 2)
        a, b = await asyncio.gather(*(cm.__aenter__() for cm in cms))  # both start it at once: one daemon wins
        try:
            pid = daemon_pid(run_dir)
            assert all(f"pid {pid}" in c.statuses[-1]["message"] for c in (a, b)), [a.statuses, b.statuses]
            a.open(URI, PY)
            b.open(URI, other)
            a.open("file:///only/a.py", "x = 1\n")
            ra, rb = await asyncio.gather(a.inline(URI, 9, 4), b.inline(URI, 5, 8))
            assert ra.items and ra.items[0].insert_text.strip() and rb.items and rb.items[0].insert_text.strip()
            assert await a.engine_text(URI) == PY and await b.engine_text(URI) == other
            assert await b.inspect("file:///only/a.py") is None
            conn = Connection.open(str(next(run_dir.glob("engine-*.sock"))))
            conn.call("hello", HELLO)
            assert {k: conn.call("status", {})[k] for k in ("clients", "docs")} == {"clients": 3, "docs": 3}
            await cms[1].__aexit__(None, None, None)
            cms.pop()
            await _until(lambda: conn.call("status", {})["docs"] == 2)  # b left: its document is freed
            conn.close()
        finally:
            for cm in cms:
                await cm.__aexit__(None, None, None)

    asyncio.run(asyncio.wait_for(go(), 300))


@pytest.mark.slow
def test_kill_9_of_the_daemon_mid_request_then_the_next_request_succeeds(run_dir):
    async def go():
        (cm,) = servers(run_dir, 1, time_cap_ms=None, max_tokens_multiline=32)
        c = await cm.__aenter__()
        try:
            c.open(URI, PY)
            c.change(URI, 2, (0, 4), (0, 7), "plus")
            await c.inspect(URI)
            pid, n = daemon_pid(run_dir), len(c.statuses)
            request = asyncio.ensure_future(c.inline(URI, 9, 4))  # a block body: a long multi-line decode
            while not any(s["state"] == "busy" for s in c.statuses[n:]):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            first = await asyncio.wait_for(request, 240)  # answered (retried on the new daemon), not an error
            assert first.items and first.items[0].insert_text.strip(), c.stderr.decode()[-3000:]
            c.change(URI, 3, (1, 11), (1, 16), "b + a")
            text = PY.replace("def add", "def plus").replace("return a + b", "return b + a")
            res = await c.inline(URI, 9, 4)
            assert res.items and res.items[0].insert_text.strip(), (c.statuses[n:], c.stderr.decode()[-3000:])
            assert await c.engine_text(URI) == text
            assert daemon_pid(run_dir) not in (None, pid)
            states = [(s["state"], s["message"]) for s in c.statuses[n:]]
            assert any(st == "loading" and "lost" in msg for st, msg in states), states
            assert any(st == "ready" and "resynced" in msg for st, msg in states), states
            assert not any(st == "error" for st, _ in states), states
            assert b"Traceback" not in c.stderr
        finally:
            await cm.__aexit__(None, None, None)

    asyncio.run(asyncio.wait_for(go(), 400))
