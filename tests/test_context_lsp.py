"""Context through the real server over stdio: the workspace folder read, the chunks chosen for the
cursor sent to the engine ahead of the request and attended over, a file changed on disk followed,
and nothing written to the user's files."""

from __future__ import annotations

import asyncio
from lsprotocol import types

from ghostline.lsp.client import running_server

HTTP = '''def fetch_json(session, url, timeout=10):
    """GET a URL and decode its JSON body."""
    response = session.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()
'''
APP = "import api.http\n\n\ndef load_user(session, user_id):\n    url = f'https://example.com/users/{user_id}'\n"


def _dict(x):
    return x if isinstance(x, dict) else x._asdict()


def test_workspace_context_reaches_the_engine_and_follows_the_disk(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "http.py").write_text(HTTP)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "secret.py").write_text("def fetch_json(x):\n    return 'not this one'\n")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "app.py").write_text(APP)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    uri = (tmp_path / "app.py").as_uri()

    async def main():
        opts = {"debounce_ms": 0, "drafts": 1, "gate": False, "context": True, "context_budget": 512}
        async with running_server(options=opts, folder=str(tmp_path)) as c:
            c.open(uri, APP)
            await c.inspect(uri)
            c.change(uri, 2, (5, 0), (5, 0), "    data = fetch_json(session, url")
            ctx = _dict(await c.context_ready(uri))
            assert ctx["files"] == 2 and ctx["pending"] == 0  # api/http.py and the open app.py; not ignored/
            await c.inline(uri, 5, 34)
            ctx = _dict(_dict(await c.inspect(uri))["context"])
            assert ctx["chosen"] == ["api/http.py:1"] and ctx["used"] == 1 and ctx["tokens"] > 20
            seen = _dict(await c.inspect(uri))
            assert seen["context_text"] == "# api/http.py\n" + HTTP and seen["text"] == APP + "    data = fetch_json(session, url"
            (tmp_path / "api" / "http.py").write_text(HTTP.replace("timeout=10", "timeout=30"))
            c.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(changes=[types.FileEvent(
                uri=(tmp_path / "api" / "http.py").as_uri(), type=types.FileChangeType.Changed)]))
            c.change(uri, 3, (5, 34), (5, 34), ", s")  # not the suggestion's start: no type-through
            await c.context_ready(uri)
            await c.inline(uri, 5, 37)
            assert _dict(await c.inspect(uri))["anticipated"] == 1  # the keystroke's completion answered it
            assert "timeout=30" in _dict(await c.inspect(uri))["context_text"]
            off = {"context": False}
            c.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=off))
            c.change(uri, 4, (5, 37), (5, 37), "t")
            await c.inline(uri, 5, 38)
            last = _dict(await c.inspect(uri))
            assert _dict(last["context"])["used"] == 1  # still the earlier request's: this one asked for none
            assert last["context_text"] == "" and last["context_tokens"] == 0  # turned off: the engine dropped it
            c.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri)))

    asyncio.run(main())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == {
        **before, tmp_path / "api" / "http.py": HTTP.replace("timeout=10", "timeout=30").encode()}
