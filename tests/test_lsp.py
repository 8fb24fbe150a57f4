"""End-to-end: the real server over stdio, driven by pygls' real client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

from ghostline.lsp.client import SERVER, running_server

PY = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\ndef sub(a, b):\n    "
URI = "file:///tmp/ghostline-test/calc.py"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def test_open_edit_complete_and_settings():
    async def go():
        options = {"no_such_setting": 1, "max_tokens": 16, "debounce_ms": 0, "completion_items": True}
        async with running_server(options=options) as c:
            caps = c.init_result.capabilities
            assert caps.inline_completion_provider is not None and caps.completion_provider is not None
            assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
            assert [s["state"] for s in c.statuses][-1] == "ready"
            assert c.progress and "begin" in str(c.progress[0]) and "end" in str(c.progress[-1])
            c.open(URI, PY)
            c.change(URI, 2, (0, 4), (0, 7), "plus")  # def add -> def plus
            res = await c.inline(URI, 9, 4)
            assert res.items and res.items[0].insert_text.strip()
            assert res.items[0].range.start == types.Position(9, 4)
            states = [(s["state"], s["message"]) for s in c.statuses]
            assert ("busy", "encoding calc.py") in states, states  # not `ready` while the open encodes
            comp = await c.text_document_completion_async(types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(9, 4)))
            assert comp.is_incomplete and comp.items
            assert await c.engine_text(URI) == PY.replace("def add", "def plus")
            c.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"ghostline": {"drafts": 3}}))
            many = await c.inline(URI, 5, 4)
            texts = [i.insert_text for i in many.items]
            assert 1 < len(texts) <= 3 and len(set(texts)) == len(texts)
            assert any("no_such_setting" in m for m in c.logs) or b"no_such_setting" in c.stderr
    run(go())


def test_a_keystroke_starts_the_completion_its_request_takes_over():
    """In a document the editor asks about on its own, a typed character starts the completion at its
    end; the request that follows there gets it (the same suggestion as a fresh ask), neither a
    request elsewhere nor one the user invoked takes a keystroke's completion, and keystrokes the
    editor stops asking about stop starting them."""

    def anticipated(res) -> int:
        return res["anticipated"] if isinstance(res, dict) else res.anticipated

    async def go():
        async with running_server(options={"max_tokens": 12, "gate": False}) as c:
            c.open(URI, PY)
            await c.inline(URI, 1, 4)  # the editor asks as the user moves and types
            c.change(URI, 2, (9, 4), (9, 4), "r")
            await asyncio.sleep(1.5)  # the keystroke's completion runs before the request arrives
            ahead = await c.inline(URI, 9, 5)
            assert anticipated(await c.inspect(URI)) == 1
            again = "file:///tmp/ghostline-test/again.py"
            c.open(again, PY + "r")
            fresh = await c.inline(again, 9, 5)
            assert ahead.items and [i.insert_text for i in ahead.items] == [i.insert_text for i in fresh.items]
            c.change(URI, 3, (9, 5), (9, 5), "x")
            assert (await c.inline(URI, 5, 4)).items  # elsewhere: its own decode
            c.change(URI, 4, (9, 6), (9, 6), "y")
            assert (await c.inline(URI, 9, 7, invoked=True)).items  # invoked: its own decode, ungated
            assert anticipated(await c.inspect(URI)) == 1
            for n, ch in enumerate("abcd"):  # keystrokes nobody asks about: after three, none starts
                c.change(URI, 5 + n, (9, 7 + n), (9, 7 + n), ch)
                await asyncio.sleep(0.2)
            assert (await c.inline(URI, 9, 11)).items is not None
            assert anticipated(await c.inspect(URI)) == 1
            c.change(URI, 9, (9, 11), (9, 11), "e")  # asked again: the next keystroke starts one
            await c.inline(URI, 9, 12)
            assert anticipated(await c.inspect(URI)) == 2
            c.change(URI, 10, (9, 12), (9, 12), "()")  # an opener closed by the editor: asked between
            await c.inline(URI, 9, 13)
            assert anticipated(await c.inspect(URI)) == 3
            assert await c.engine_text(URI) == PY + "rxyabcde()"
    run(go())


def test_an_accepted_word_prefetches_the_next_suggestion():
    """Once an accepted part of a suggestion lands in the text, the server decodes the next suggestion
    at its end before the editor asks: the request there is answered without a decode of its own
    (no busy status), with what a fresh ask of the same text gives."""

    async def go():
        async with running_server(options={"max_tokens": 12, "gate": False, "debounce_ms": 0}) as c:
            c.open(URI, PY)
            first = (await c.inline(URI, 9, 4)).items[0].insert_text
            word = first[: len(first) - len(first.lstrip())] + first.lstrip().split(" ", 1)[0]  # accept word
            assert word.strip() and len(word) < len(first.rstrip()), first
            c.change(URI, 2, (9, 4), (9, 4), word)
            c.protocol.notify("ghostline/didAccept", {"uri": URI, "text": word, "position": {"line": 9, "character": 4}})
            await c.engine_text(URI)
            await asyncio.sleep(1.0)  # the prefetch decodes
            n = len(c.statuses)
            ahead = await c.inline(URI, 9, 4 + len(word))
            assert not any(st["state"] == "busy" for st in c.statuses[n:])
            again = "file:///tmp/ghostline-test/again.py"
            c.open(again, PY + word)
            fresh = await c.inline(again, 9, 4 + len(word))
            assert ahead.items and ahead.items[0].insert_text == fresh.items[0].insert_text
    run(go())


def test_a_suggestion_passed_over_but_typed_counts_as_kept():
    """`ghostline/didReject` reports a suggestion that was not taken; where the user typed at least a
    word of it instead, the server counts it as `typed`, which the gate's record counts as kept (as its
    calibration does, EVAL.md's accept model); one that the text does not follow for a whole word, or
    at a position past the end or malformed, stays rejected."""
    from ghostline.lsp.server import DID_REJECT
    from ghostline.lsp.stats import Stats, kept

    at = {"line": 9, "character": 4}

    async def go():
        async with running_server(options={"gate": False}) as c:
            c.open(URI, PY)
            before = Stats().load()
            c.change(URI, 2, (9, 4), (9, 4), "return a - c")
            for shown in ("return a - b", "return a", "returns a", "yield a", "pass"):
                c.protocol.notify(DID_REJECT, {"uri": URI, "text": shown, "position": at})
            c.protocol.notify(DID_REJECT, {"uri": URI, "text": "return", "position": {"line": 99, "character": 0}})
            c.protocol.notify(DID_REJECT, {"uri": URI, "text": "return", "position": [9, 4]})  # malformed: not kept
            await c.engine_text(URI)
            return before, Stats().load()

    before, after = run(go())
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in ("typed", "rejected", "accepted")}
    assert delta == {"typed": 2, "rejected": 5, "accepted": 0}, delta
    now, then = (kept(d.get("by_kind", {}).get("python:source", {})) for d in (after, before))
    assert (now[0] - then[0], now[1] - then[1]) == (2, 5)


def test_utf16_and_utf8_positions_with_non_ascii():
    text = 's = "h\u00e9llo \U0001F600 w"  # x\nt = 1\n'

    async def go(encoding, col):
        async with running_server(encodings=(encoding,), options={"debounce_ms": 0}) as c:
            assert c.init_result.capabilities.position_encoding == encoding
            assert c.init_result.capabilities.completion_provider is None  # ghost text only, by default
            c.open(URI, text)
            c.change(URI, 2, (0, col), (0, col + 1), "W")  # the "w" after the emoji
            assert await c.engine_text(URI) == text.replace(" w\"", " W\"")
            res = await c.inline(URI, 1, 5)
            assert isinstance(res.items, (list, tuple))

    run(go("utf-16", 14))  # the emoji is 2 UTF-16 units (1 code point)
    run(go("utf-8", 17))  # é is 2 bytes, the emoji 4


def test_cancel_coalescing_and_bad_input():
    async def go():
        async with running_server(options={"debounce_ms": 50}) as c:
            c.open(URI, PY)
            first = asyncio.ensure_future(c.inline(URI, 9, 4))
            await asyncio.sleep(0.01)
            second = await c.inline(URI, 9, 4)
            try:  # superseded by the newer request: no items, or cancelled if it was already decoding
                assert not (await first).items
            except JsonRpcRequestCancelled:
                pass
            assert second.items
            # $/cancelRequest of an in-flight request
            fut = c.protocol.send_request("textDocument/inlineCompletion", types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=URI), position=types.Position(5, 4),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)),
                msg_id="to-cancel")  # a new position: the shown suggestion cannot answer it
            n = len(c.statuses)
            while not any(st["state"] == "busy" for st in c.statuses[n:]):  # decoding is under way
                await asyncio.sleep(0.01)
            c.protocol.notify("$/cancelRequest", types.CancelParams(id="to-cancel"))
            with pytest.raises(Exception, match="cancel"):
                await asyncio.wait_for(asyncio.wrap_future(fut), 30)
            stats = await c.protocol.send_request_async("ghostline/inspect", {"uri": URI})
            assert stats.cancelled_decodes >= 1
            # bad input: unknown document, range past the end, version out of order, garbage frame
            assert not (await c.inline("file:///nope.py", 0, 0)).items
            c.change(URI, 3, (500, 0), (501, 0), "x")
            c.change(URI, 2, (0, 0), (0, 0), "# old version\n")
            c._server.stdin.write(b"Content-Length: 9\r\n\r\n{garbage}")
            not_rpc = json.dumps({"jsonrpc": "2.0", "x": 1}).encode()  # valid JSON, not a JSON-RPC message
            c._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(not_rpc) + not_rpc)
            c.change(URI, 10, (0, 0), (0, 0), "import os\n")
            text = await c.engine_text(URI)
            assert text.startswith("import os\n") and "def sub(a, b):" in text
            res = await c.inline(URI, 10, 4)
            assert isinstance(res.items, (list, tuple))
    run(go())


def test_client_vanishing_mid_request_ends_the_server_cleanly(tmp_path):
    proc = subprocess.Popen(SERVER + ["--model", "smollm2-135m"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp_path)

    def send(obj):
        body = json.dumps(obj).encode()
        proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        proc.stdin.flush()

    send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "initializationOptions": {"debounce_ms": 0}}})
    send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    send({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": URI, "languageId": "python", "version": 1, "text": PY}}})
    send({"jsonrpc": "2.0", "id": 2, "method": "textDocument/inlineCompletion", "params": {
        "textDocument": {"uri": URI}, "position": {"line": 9, "character": 4}, "context": {"triggerKind": 1}}})
    time.sleep(3)
    proc.stdin.close()  # the editor is gone
    proc.stdout.close()
    try:
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert list(tmp_path.iterdir()) == []  # never writes to the user's files
