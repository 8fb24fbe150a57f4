"""Reliability and security limits: the team server before authentication, the kernel cache's
integrity, edit failures that never pass in silence, and per-client scope in a shared daemon."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import socket
import stat
import sys
import time

import numpy as np
import pytest
import torch
from lsprotocol import types

from ghostline.engine import decoders as decoders_module
from ghostline.engine.decoding.speculative import SpecStats
from ghostline.engine.document import MISSING
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.model import build
from ghostline.engine.ngram import PromptLookup
from ghostline.engine.quant import ShortlistHead
from ghostline.engine.text import Change
from ghostline.kernels import step
from ghostline.engine.serving import wire
from ghostline.lsp.cli import _engine_parser
from ghostline.lsp.client import running_server
from ghostline.engine.serving.daemon import DaemonOptions, TokenBucket, daemon_options
from ghostline.lsp.positions import Mirror
from ghostline.lsp.remote import DaemonError, RemoteEngine
from ghostline.lsp.server import GhostlineServer
from tests.conftest import tiny_hf
from tests.test_daemon import PY, TOKEN, URI, _wait, greeted, serving, tiny  # noqa: F401 (tiny: a fixture)

# the team server before authentication ------------------------------------------------------------


def _tcp(daemon, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(tuple(daemon.address), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _closing_answer(sock: socket.socket) -> dict | None:
    """The error frame a refused connection gets (None if the reset came first), then the end."""
    try:
        body = wire.recv_frame(sock)
        msg = wire.unpack(body) if body is not None else None
        while body is not None:
            body = wire.recv_frame(sock)
    except ConnectionResetError:
        return None
    return msg


def test_a_stranger_announcing_a_16_mib_frame_is_closed_after_its_header(tiny):
    """Before the token only a small frame is read: a 16 MiB length (the limit after hello) is
    refused at its 4-byte header, the connection closes, and the rest of the body finds no reader."""
    with serving(tiny, tcp=True, token=TOKEN) as daemon:
        sock = _tcp(daemon)
        sock.sendall(wire.HEADER.pack(16 * 2**20) + b"\x00" * 1024)
        answer = _closing_answer(sock)  # times out (the daemon waits for 16 MiB) where nothing is refused
        assert answer is None or answer["error"]["code"] == "too_large"
        with pytest.raises(OSError):
            sock.sendall(b"\x00" * 16 * 2**20)  # nobody reads it: the peer is gone
        sock.close()
        conn = greeted(daemon, token=TOKEN)  # an authenticated client sends what it needs
        conn.call("open", {"uri": URI, "text": PY * 100})
        assert len(conn.call("inspect", {"uri": URI})["text"]) > DaemonOptions().hello_frame_bytes
        conn.close()


def test_a_connection_that_never_says_hello_is_closed_after_the_deadline(tiny):
    with serving(tiny, tcp=True, token=TOKEN, hello_timeout_s=0.5) as daemon:
        conn = greeted(daemon, token=TOKEN)
        t0 = time.monotonic()
        silent = _tcp(daemon)
        answer = _closing_answer(silent)
        waited = time.monotonic() - t0
        assert answer is None or answer["error"]["code"] == "hello_timeout"
        assert 0.4 <= waited < 5.0, waited
        silent.close()
        assert conn.call("status", {})["clients"] == 1  # the greeted client outlives the deadline
        conn.close()


def test_connections_past_the_caps_are_refused_while_a_client_is_served(tiny):
    with serving(tiny, tcp=True, token=TOKEN, max_unauthenticated=2, max_clients=4, hello_timeout_s=60) as daemon:
        served = greeted(daemon, token=TOKEN)
        served.call("open", {"uri": URI, "text": PY})
        waiting = [_tcp(daemon) for _ in range(2)]
        _wait(lambda: len(daemon.clients) == 3)
        refused = _tcp(daemon)
        answer = _closing_answer(refused)
        assert answer is None or (answer["error"]["code"] == "busy" and "hello" in answer["error"]["message"])
        out = served.call("complete", {"uri": URI, "offset": len(PY), "options": {"max_tokens": 4}})
        assert out["tokens"]
        for sock in waiting + [refused]:
            sock.close()
        _wait(lambda: len(daemon.clients) == 1)
        others = [greeted(daemon, token=TOKEN) for _ in range(3)]  # 4 connections: the cap
        answer = _closing_answer(_tcp(daemon))
        assert answer is None or (answer["error"]["code"] == "busy" and "connections are open" in answer["error"]["message"])
        assert served.call("complete", {"uri": URI, "offset": len(PY), "options": {"max_tokens": 4}})["tokens"]
        for conn in others + [served]:
            conn.close()


def test_calls_past_the_rate_limit_get_an_error_and_the_connection_lives(tiny):
    with serving(tiny, tcp=True, token=TOKEN, rate_per_s=2.0, rate_burst=3) as daemon:
        conn = greeted(daemon, token=TOKEN)
        for _ in range(3):
            conn.call("status", {})
        with pytest.raises(DaemonError, match="rate_limited"):
            conn.call("status", {})
        time.sleep(0.6)  # a token comes back every half second
        assert conn.call("status", {})["clients"] == 1
        conn.close()


def test_token_bucket_and_the_limits_flags():
    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert bucket.take() and not bucket.take()
    p = argparse.ArgumentParser()
    _engine_parser(p.add_subparsers())
    args = p.parse_args(["engine", "--max-hello-bytes", "2048", "--hello-timeout", "2.5", "--max-unauthenticated", "8",
                         "--max-clients", "32", "--rate", "50", "--rate-burst", "100", "--max-docs", "16"])
    o = daemon_options(args)
    assert (o.hello_frame_bytes, o.hello_timeout_s, o.max_unauthenticated, o.max_clients, o.rate_per_s, o.rate_burst,
            o.max_docs) == (2048, 2.5, 8, 32, 50.0, 100, 16)
    d = daemon_options(p.parse_args(["engine"]))
    assert (d.hello_frame_bytes, d.hello_timeout_s, d.max_unauthenticated, d.max_clients) == (4096, 5.0, 64, 256)
    for bad in ({"rate_per_s": 0}, {"max_clients": 0}, {"hello_timeout_s": -1.0}, {"rate_burst": True}):
        with pytest.raises(ValueError):
            DaemonOptions(**bad)


# the kernel cache ----------------------------------------------------------------------------------


@pytest.fixture
def kernel_cache(monkeypatch, tmp_path):
    """A fresh GHOSTLINE_CACHE; this process's loaded kernel is put back afterwards."""
    monkeypatch.setenv("GHOSTLINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(step, "_fallback", None)
    monkeypatch.setattr(step, "_lib", step._lib)
    monkeypatch.setattr(step, "_tried", step._tried)
    return tmp_path / "cache" / "kernels"


@pytest.mark.slow
def test_a_tampered_kernel_library_is_rebuilt_not_loaded(kernel_cache, monkeypatch):
    """Compiles the kernel three times (a few seconds each on a busy machine)."""
    lib = step._compile()
    if lib is None:
        pytest.skip("no C compiler")
    assert lib.parent == kernel_cache and stat.S_IMODE(kernel_cache.stat().st_mode) == 0o700
    record = step._record(lib)
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and record.stat().st_uid == os.getuid()
    assert record.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    built = lib.read_bytes()
    lib.write_bytes(built + b"\x00" * 64)  # appended to
    tampered, inode = lib.read_bytes(), lib.stat().st_ino
    assert step._compile() == lib
    assert lib.stat().st_ino != inode and step._matches_record(lib)  # a new file, the one recorded
    assert lib.read_bytes() != tampered
    lib.write_bytes(b"\x7fELF" + os.urandom(4096))  # replaced, its record gone: a fresh start loads a rebuilt one
    record.unlink()
    tampered, inode = lib.read_bytes(), lib.stat().st_ino
    monkeypatch.setattr(step, "_lib", None)
    monkeypatch.setattr(step, "_tried", False)
    loaded = step._load()
    assert loaded is not None and loaded._name == str(lib) and loaded.ghostline_lanes() > 0
    assert lib.stat().st_ino != inode and lib.read_bytes() != tampered and step._matches_record(lib)


def test_a_kernel_cache_folder_others_may_write_or_own_is_refused(kernel_cache, caplog):
    caplog.set_level(logging.WARNING, logger="ghostline.kernels")
    kernel_cache.mkdir(parents=True)
    os.chmod(kernel_cache, 0o755)
    assert step._build_dir() == kernel_cache and stat.S_IMODE(kernel_cache.stat().st_mode) == 0o700  # tightened
    os.chmod(kernel_cache, 0o777)
    used = step._build_dir()
    assert used != kernel_cache and used.stat().st_uid == os.getuid() and stat.S_IMODE(used.stat().st_mode) == 0o700
    assert "writable by group or others" in caplog.text
    if os.getuid() == 0:  # only root can give a folder away
        os.chmod(kernel_cache, 0o700)
        os.chown(kernel_cache, 65534, 65534)
        assert step._build_dir() == used and "belongs to uid 65534" in caplog.text


# edit failures are never silent --------------------------------------------------------------------


def _fail_forward(model, *, on_calls: tuple[int, ...]):
    """Make the model's forward raise on the calls numbered `on_calls` (1-based) from now."""
    calls, forward = [0], model.forward

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] in on_calls:
            raise RuntimeError("injected encode failure")
        return forward(*args, **kwargs)

    model.forward = failing


OLD, NEW = "def mul(a, b):\n    return a * b", "def mul(a, b, c=1):\n    return a * b * c  # scaled product"
EDITED = PY.replace(OLD, NEW)


def _edit_change() -> Change:
    return Change(PY.index(OLD), PY.index(OLD) + len(OLD), NEW)


def test_rows_of_a_failed_edit_encode_stay_missing_and_refresh_mends_them(tiny_engine_factory):
    engine = tiny_engine_factory("llama", encode_chunk=2)
    engine.open(URI, PY)
    _fail_forward(engine.model, on_calls=(2,))  # the edit's first chunk runs, the second fails
    with pytest.raises(RuntimeError, match="injected"):
        engine.edit(URI, [_edit_change()])
    doc = engine.docs[URI]
    assert doc.text == EDITED
    hunk = [i for i, (a, b) in enumerate(zip(doc.ids, engine.tok.encode(PY)[0])) if a != b][0]
    assert doc.stale[hunk : hunk + 2] == b"\x00\x00"  # the chunk that ran is fresh ...
    assert doc.stale[hunk + 2] == MISSING and doc.missing_count > 0  # ... the rest has no K/V yet
    engine.refresh(URI)
    assert doc.stale_count == 0
    fresh = tiny_engine_factory("llama")
    fresh.open(URI, EDITED)
    opts = CompletionOptions(multiline=True, max_tokens=8)
    assert engine.complete(URI, len(EDITED), opts).tokens == fresh.complete(URI, len(EDITED), opts).tokens


def test_a_failed_update_is_logged_told_once_and_resynced_from_the_mirror(tiny_engine_factory, caplog):
    caplog.set_level(logging.ERROR, logger="ghostline.server")
    server = GhostlineServer()
    server.engine = engine = tiny_engine_factory("llama", encode_chunk=4)
    server.worker.start()
    try:
        server.mirrors[URI] = mirror = Mirror(PY, 1)
        server.submit_update(URI, lambda e: e.open(URI, PY))
        settled = lambda: server.worker.submit("update", lambda stop: None).future.result(60)  # noqa: E731
        settled()
        for version in (2, 3):  # the same failure twice: told once
            text = EDITED if version == 2 else PY
            before = engine.docs[URI]
            _fail_forward(engine.model, on_calls=(1,))
            change = _edit_change() if version == 2 else Change(0, len(EDITED), PY)
            mirror.set(text, version)
            server.submit_update(URI, lambda e, c=change: e.edit(URI, [c]))
            settled()
            doc = engine.docs[URI]
            assert doc is not before and doc.text == mirror.text  # re-opened from the mirror
            assert doc.stale_count == 0 and doc.cache.length == len(doc.ids)
        assert server.errors == 2 and len(server.told) == 1
        assert f"update of {URI} failed" in caplog.text and "injected encode failure" in caplog.text
        _fail_forward(engine.model, on_calls=(1, 2))  # the update and its resync fail ...
        mirror.set(EDITED, 4)
        server.submit_update(URI, lambda e: e.edit(URI, [_edit_change()]))
        settled()
        assert URI in server.unsynced and len(server.told) == 2
        mirror.set(EDITED + "x = 1\n", 5)  # ... so the next update sends the whole text
        server.submit_update(URI, lambda e: e.edit(URI, [Change(len(EDITED), len(EDITED), "x = 1\n")]))
        settled()
        assert not server.unsynced and engine.text(URI) == mirror.text and engine.docs[URI].stale_count == 0
        whole = Change(0, len(mirror.text), PY)
        mirror.set(PY, 6)
        server.submit_update(URI, lambda e: e.edit(URI, [whole]))
        settled()
        fresh = tiny_engine_factory("llama")
        fresh.open(URI, PY)
        opts = CompletionOptions(multiline=True, max_tokens=8)
        assert engine.complete(URI, len(PY), opts).tokens == fresh.complete(URI, len(PY), opts).tokens
    finally:
        server.worker.stop()


def test_edits_that_wait_are_applied_as_one_update_in_order(tiny_engine_factory):
    """Edits queued behind a busy engine reach it as one edit (all their changes, in order); an
    update that is not an edit (a resync's open) splits them, so nothing jumps ahead of it; the
    cache then equals a fresh encode of the editor's text."""
    import threading

    server = GhostlineServer()
    server.engine = engine = tiny_engine_factory("llama")
    calls = []
    edit = engine.edit
    engine.edit = lambda uri, changes, **k: calls.append(len(changes)) or edit(uri, changes, **k)
    server.worker.start()
    try:
        server.mirrors[URI] = mirror = Mirror(PY, 1)
        server.submit_update(URI, lambda e: e.open(URI, PY))
        gate = threading.Event()
        server.worker.submit("update", lambda stop: gate.wait(30))
        text, version = PY, 1
        for i in range(12):
            if i == 8:
                server.submit_update(URI, lambda e, t=text: e.open(URI, t))
            at = (7 * i) % len(text)
            change = Change(at, min(len(text), at + i % 3), f"x{i}")
            text = text[: change.start] + change.text + text[change.end :]
            version += 1
            mirror.set(text, version)
            server.submit_edit(URI, [change])
        gate.set()
        server.worker.submit("update", lambda stop: None).future.result(60)
        assert calls == [8, 4] and engine.text(URI) == text
        engine.refresh(URI)
        fresh = tiny_engine_factory("llama")
        fresh.open(URI, text)
        assert engine.docs[URI].ids == fresh.docs[URI].ids
        torch.testing.assert_close(engine.docs[URI].cache.state[0], fresh.docs[URI].cache.state[0], rtol=0, atol=1e-5)
    finally:
        server.worker.stop()


def test_remote_engine_keeps_the_daemons_text_when_the_daemon_refuses(tiny, monkeypatch):
    with serving(tiny) as daemon:
        remote = RemoteEngine.connect(daemon.address, model=None)
        remote.open(URI, PY)
        edit, open_ = tiny.edit, tiny.open
        monkeypatch.setattr(tiny, "edit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused edit")))
        with pytest.raises(DaemonError, match="engine"):
            remote.edit(URI, [Change(4, 7, "plus")])
        assert remote.docs[URI] == PY == remote.describe(URI)["text"]
        monkeypatch.setattr(tiny, "open", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("refused open")))
        with pytest.raises(DaemonError, match="engine"):
            remote.open("file:///new.py", "x = 1\n")
        assert "file:///new.py" not in remote.docs
        monkeypatch.setattr(tiny, "edit", edit)
        monkeypatch.setattr(tiny, "open", open_)
        remote.edit(URI, [Change(4, 7, "plus")])
        assert remote.docs[URI] == PY.replace("def add", "def plus") == remote.describe(URI)["text"]
        remote.disconnect()


def test_an_edit_that_finds_the_connection_lost_is_applied_once(tiny):
    """The reconnect re-opens the recorded text, which already holds the edit: it is not sent again."""
    with serving(tiny) as daemon:
        remote = RemoteEngine.connect(daemon.address, model=None)
        remote.open(URI, PY)
        remote.conn.close()  # the daemon went away (and is back)
        remote.edit(URI, [Change(0, 0, "# top\n")])
        assert remote.describe(URI)["text"] == "# top\n" + PY == remote.docs[URI]
        remote.disconnect()


def test_a_daemon_keeps_every_document_completable_past_max_docs(tiny_engine_factory):
    texts = {f"file:///{i}.py": PY.replace("sub", f"sub{i}") for i in range(3)}
    reference = tiny_engine_factory("llama")
    opts = {"multiline": True, "max_tokens": 6}
    expected = {}
    for uri, text in texts.items():
        reference.open(uri, text)
        expected[uri] = reference.complete(uri, len(text), CompletionOptions(**opts)).tokens
    with serving(tiny_engine_factory("llama"), max_docs=2) as daemon:
        conn = greeted(daemon)
        for uri, text in texts.items():
            conn.call("open", {"uri": uri, "text": text})
        cached = {uri: conn.call("inspect", {"uri": uri})["cached"] for uri in texts}
        assert cached == {"file:///0.py": False, "file:///1.py": True, "file:///2.py": True}  # LRU evicted
        for uri, text in texts.items():
            out = conn.call("complete", {"uri": uri, "offset": len(text), "options": opts})
            assert out["tokens"] == expected[uri], uri
        assert sum(conn.call("inspect", {"uri": uri})["cached"] for uri in texts) == 2
        conn.close()


SHOW_FAILURE = """
import sys
from ghostline.engine.engine import Engine
edit, calls = Engine.edit, []
def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
        raise RuntimeError("injected edit failure")
    return edit(self, *args, **kwargs)
Engine.edit = failing
from ghostline.lsp.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_edit_failure_over_stdio_shows_a_message_and_resyncs():
    async def go():
        command = [sys.executable, "-c", SHOW_FAILURE, "serve"]
        async with running_server(command=command, options={"debounce_ms": 0}) as c:
            shown = []
            c.feature(types.WINDOW_SHOW_MESSAGE)(lambda ls, params: shown.append(params))
            c.open(URI, PY)
            c.change(URI, 2, (0, 4), (0, 7), "plus")  # the engine raises on this one
            c.change(URI, 3, (1, 11), (1, 16), "b + a")
            text = PY.replace("def add", "def plus").replace("return a + b", "return b + a")
            assert await c.engine_text(URI) == text
            deadline = time.monotonic() + 30
            while not shown and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(shown) == 1 and shown[0].type == types.MessageType.Warning
            assert "injected edit failure" in shown[0].message and "resynced" in shown[0].message
            res = await c.inline(URI, 9, 4)
            assert res.items and res.items[0].insert_text.strip()

    asyncio.run(asyncio.wait_for(go(), 240))


# per-client scope in one daemon --------------------------------------------------------------------


def test_shortlist_head_scopes_keep_their_rows_apart():
    cfg, hf = tiny_hf("llama", 400)
    model = build(cfg, hf.state_dict())
    head = ShortlistHead(model.embed_tokens.weight, torch.arange(0, 100), int8=True)
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    alone = head(x)
    assert head.include(torch.tensor([150, 160, 5]), scope="c1") == 2
    assert head.include(torch.tensor([170]), scope="c2") == 1
    assert head.size == 100 and torch.equal(head(x), alone)  # the unscoped view is unchanged
    head.scope = "c1"
    assert head.rows.tolist()[100:] == [150, 160] and torch.equal(head(x)[:, :100], alone)
    head.scope = "c2"
    assert head.rows.tolist()[100:] == [170]
    head.include(torch.tensor([170, 180]))  # the shared rows take 170: c2's own row goes
    assert head.rows.tolist()[100:] == [170, 180] and len(head._scopes["c2"].ids) == 0
    head.drop("c1")
    head.scope = "c1"
    assert head.size == 102


@pytest.fixture
def code_head_engine(smol):
    cfg, hf = tiny_hf("llama", smol.tokenizer.vocab_size)
    return Engine(build(cfg, hf.state_dict()), smol.tokenizer, EngineOptions(precision="int8", head="code"),
                  vocab_rows=np.arange(0, 200, dtype=np.int32))


def test_a_second_client_does_not_change_the_first_clients_completions(code_head_engine, monkeypatch):
    """The second client's documents hold thousands of tokens outside the first one's head rows, and
    the first one's text: neither its head rows nor its prompt lookup reach the first client."""
    engine = code_head_engine
    unusual = PY + "".join(engine.tok.hf.decode([i]) for i in range(3000, 6000))
    corpora = []

    class Lookup(PromptLookup):
        def propose(self, context, k):
            corpora.append(len(self.others))
            return super().propose(context, k)

    spec_stats = []

    class Stats(SpecStats):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spec_stats.append(self)

    monkeypatch.setattr(decoders_module, "PromptLookup", Lookup)
    monkeypatch.setattr(decoders_module, "SpecStats", Stats)
    asks = {"greedy": {"multiline": True, "max_tokens": 12},
            "lookup": {"multiline": True, "max_tokens": 12, "decoder": "lookup"},
            "drafts": {"multiline": True, "max_tokens": 8, "drafts": 3}}

    def answers(conn):
        out = {}
        for name, opts in asks.items():
            done = conn.call("complete", {"uri": URI, "offset": len(PY), "options": opts})
            out[name] = (done["tokens"], done["drafts"])
            if name == "lookup":
                s = spec_stats[-1]
                out["lookup_stats"] = (s.steps, s.proposed, s.accepted, list(s.history), set(corpora))
                corpora.clear()
        return out

    with serving(engine) as daemon:
        one = greeted(daemon)
        one.call("open", {"uri": URI, "text": PY})
        alone = answers(one)
        two = greeted(daemon)
        two.call("open", {"uri": "file:///unusual.py", "text": unusual})
        two.call("open", {"uri": URI, "text": unusual})
        assert answers(one) == alone and alone["lookup_stats"][-1] == {0}
        assert two.call("complete", {"uri": URI, "offset": len(unusual), "options": asks["greedy"]})["stop_reason"]
        scope = f"c{two.call('status', {})['you']['client']}"
        assert scope in engine.model.lm_head._scopes
        two.close()
        _wait(lambda: len(engine.docs) == 1)
        assert scope not in engine.model.lm_head._scopes  # its head rows left with its documents
        one.close()
