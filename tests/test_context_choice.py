"""The choice of context (lsp/context.py): deterministic, within its budget, never from the current
file or past the cursor's line, the workspace read as .gitignore says; and the chunks the engine
holds kept in step with their files (a real tiny engine)."""

from __future__ import annotations

import random

import pytest
import torch

from ghostline.engine.document import MISSING
from ghostline.lsp.context import (CHARS_PER_TOKEN, CHUNK_LINES, Chooser, Held, Library, Options, choose, chunk_file,
                                   imports, scan)

HTTP = '''"""HTTP helpers."""


def fetch_json(session, url, timeout=10):
    """GET a URL and decode its JSON body."""
    response = session.get(url, timeout=timeout)
    response.raise_for_status()
    return response.json()


def post_form(session, url, fields):
    return session.post(url, data=fields)
'''
MODELS = '''class Response:
    def __init__(self, status, body):
        self.status = status
        self.body = body

    def ok(self):
        return 200 <= self.status < 300
'''
DOC = '''import api.http
from api.models import Response


def load_user(session, user_id):
    url = f"https://example.com/users/{user_id}"
    data = fetch_json(session, url'''


def library(extra: int = 0) -> Library:
    lib = Library()
    lib.put("api/http.py", HTTP)
    lib.put("api/models.py", MODELS)
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "session", "url", "value", "index", "record", "parse"]
    for i in range(extra):
        lines = [f"def f{i}_{j}({rng.choice(words)}, {rng.choice(words)}):\n    return {rng.choice(words)}" for j in range(40)]
        lib.put(f"pkg/m{i}.py", "\n".join(lines))
    return lib


def test_the_choice_is_deterministic_within_budget_and_ranks_the_chunk_sharing_most_names_first():
    lib = library(extra=12)
    opts = Options(budget=200)
    a = choose(lib, DOC, len(DOC), path="app.py", opts=opts, open_paths=set())
    b = choose(library(extra=12), DOC, len(DOC), path="app.py", opts=opts, open_paths=set())
    assert [(c.path, c.first) for _, c in a] == [(c.path, c.first) for _, c in b] and a
    assert sum(len(c.text) for _, c in a) <= 200 * CHARS_PER_TOKEN
    assert a[0][1].path == "api/http.py"  # fetch_json, session, url, data: the most names above the cursor
    assert [s for s, _ in a] == sorted((s for s, _ in a), reverse=True)
    lib = Library()  # many shared names beat one rare name's definition
    lib.put("one.py", "def render_page(x):\n    return x\n")
    lib.put("two.py", "session.url = request.headers\n")
    for i in range(10):
        lib.put(f"filler{i}.py", f"value_{i} = session.get(url)\n")
    doc = "session = request = None\nheaders = url = 1\nrender_page("
    got = [c.path for _, c in choose(lib, doc, len(doc), path="d.py", opts=Options(), open_paths=set())]
    assert got[0] == "two.py" and got[-1] == "one.py"


def test_nothing_from_the_current_file_or_below_the_cursor_line():
    lib = library(extra=4)
    lib.put("app.py", DOC + "\n\nfetch_json = None\n")  # the document itself, as the disk has it
    opts = Options(budget=4000)
    cut = len(DOC)
    below = DOC + ")\n\n\ndef unrelated(record, parse):\n    return Response(record, parse).ok()\n"
    got = choose(lib, below, cut, path="app.py", opts=opts, open_paths=set())
    assert all(c.path != "app.py" for _, c in got)
    after = choose(lib, DOC + "Response(status).ok()\nrecord = parse", cut, path="app.py", opts=opts, open_paths=set())
    assert after == got  # the rest of the line and below: not read


def test_imports_and_recent_edits_raise_a_chunk():
    lib = Library()
    body = "\n".join(f"def helper_{i}(session, url):\n    return session, url" for i in range(CHUNK_LINES // 2))
    lib.put("a/one.py", body)
    lib.put("a/two.py", body)
    doc = "import a.two\n\nsession = url = None\nhelper_3(session, url"
    got = choose(lib, doc, len(doc), path="x.py", opts=Options(budget=1000), open_paths=set())
    assert [c.path for _, c in got] == ["a/two.py"]  # the same lines twice are taken once
    plain = doc.replace("import a.two", "import os")
    assert choose(lib, plain, len(plain), path="x.py", opts=Options(), open_paths=set())[0][1].path == "a/one.py"
    edited = choose(lib, plain, len(plain), path="x.py", opts=Options(), open_paths=set(), edited=[("a/two.py", 3)])
    assert edited[0][1].path == "a/two.py"
    assert imports("from a.b import c, d\nimport e.f as g") == {"a.b", "a.b.c", "a.b.d", "e.f"}


def test_a_choice_is_kept_while_the_cursor_stays_in_its_region():
    lib = library(extra=3)
    chooser = Chooser(lib, Options(budget=300))
    one = chooser("file:///app.py", "app.py", DOC, len(DOC), set())
    typed = DOC + ", timeout=3"
    assert chooser("file:///app.py", "app.py", typed, len(typed), set()) is one
    far = DOC + "\n" * 40 + "x = Response("
    assert chooser("file:///app.py", "app.py", far, len(far), set()) is not one
    lib.put("api/new.py", "def fetch_json_again(session):\n    pass\n")
    assert chooser("file:///app.py", "app.py", far, len(far), set()) is not one


def test_sources_can_be_turned_off():
    lib = library()
    both = choose(lib, DOC, len(DOC), path="app.py", opts=Options(), open_paths={"api/models.py"})
    no_open = choose(lib, DOC, len(DOC), path="app.py", opts=Options(open_files=False), open_paths={"api/models.py"})
    no_ws = choose(lib, DOC, len(DOC), path="app.py", opts=Options(workspace=False), open_paths={"api/models.py"})
    assert {c.path for _, c in both} == {"api/http.py", "api/models.py"}
    assert {c.path for _, c in no_open} == {"api/http.py"}
    assert {c.path for _, c in no_ws} == {"api/models.py"}


def test_the_workspace_scan_follows_gitignore_and_skips_what_it_cannot_read(tmp_path):
    (tmp_path / ".gitignore").write_text("generated/\n*.gen.py\n!keep.gen.py\n/top_only.py\n")
    files = {"a.py": "x = 1\n", "generated/b.py": "y = 2\n", "c.gen.py": "z\n", "keep.gen.py": "k\n",
             "top_only.py": "t\n", "sub/top_only.py": "s\n", "sub/.gitignore": "local.py\n", "sub/local.py": "l\n",
             "node_modules/m.js": "m\n", ".hidden/h.py": "h\n", "notes.txt": "n\n", "big.py": "#" * (600 * 1024)}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
    assert sorted(scan(tmp_path)) == ["a.py", "keep.gen.py", "sub/top_only.py"]


def test_chunks_are_whole_lines_under_their_path():
    text = "\n".join(f"line_{i} = {i}" for i in range(2 * CHUNK_LINES + 6))
    chunks = chunk_file("m/x.py", text)
    assert [c.first for c in chunks] == [0, CHUNK_LINES, 2 * CHUNK_LINES]
    n = CHUNK_LINES
    assert chunks[1].text.startswith(f"# m/x.py\nline_{n} = {n}\n") and chunks[1].text.endswith(f"line_{2 * n - 1} = {2 * n - 1}\n")


def test_a_documents_context_is_cached_in_front_of_it_and_a_new_choice_edits_it(tiny_engine_factory):
    eng = tiny_engine_factory("gemma3")
    held, owner = Held(), "file:///a.py"
    lib = library(extra=3)
    chunks = [c for f in lib.files.values() for c in f.chunks][:5]
    eng.open(owner, DOC)
    assert not held.current(owner, chunks[:2]) and held.names(owner) == []
    assert held.sync(eng, owner, chunks[:2])
    doc = eng.docs[owner]
    assert held.current(owner, chunks[:2]) and doc.head == chunks[0].text + chunks[1].text
    assert eng.text(owner) == DOC and doc.missing_count == 0
    assert held.names(owner) == [f"{c.path}:{c.first + 1}" for c in chunks[:2]]
    cache = doc.cache
    assert held.sync(eng, owner, [chunks[1], chunks[2]])  # a new choice: an edit of the same document
    assert doc.head == chunks[1].text + chunks[2].text and doc.cache is cache
    assert held.sync(eng, owner, [chunks[1], chunks[2]])  # nothing new: held whole already
    assert not held.sync(eng, owner, chunks[3:], should_stop=lambda: True)
    assert not held.current(owner, chunks[3:]) and doc.head == chunks[1].text + chunks[2].text  # the older one serves
    assert not held.sync(eng, "file:///closed.py", chunks[3:]) and held.names("file:///closed.py") == []
    held.drop(owner)
    assert held.names(owner) == []


def test_a_context_cut_short_keeps_its_rows_and_is_finished_not_restarted(tiny_engine_factory):
    eng = tiny_engine_factory("gemma3", refresh_stale_min=10**6)  # the context's rows only, no refresh after
    held, owner = Held(), "file:///a.py"
    lib = library(extra=3)
    chunks = [c for f in lib.files.values() for c in f.chunks][:4]
    eng.open(owner, DOC)
    polls = []

    def stop_at_second_forward():
        polls.append(1)
        return len(polls) >= 3  # the send's own check, the first forward's, then stop

    assert not held.sync(eng, owner, chunks, should_stop=stop_at_second_forward)
    doc = eng.docs[owner]
    done = doc.head_rows - doc.stale[: doc.head_rows].count(MISSING)
    assert held.current(owner, chunks) and 0 < done < doc.head_rows  # the text is held, its first rows kept
    encoded = []
    forward = eng.model.forward
    eng.model.forward = lambda ids, *a, **k: (encoded.append(ids.shape[1]), forward(ids, *a, **k))[1]
    assert held.sync(eng, owner, chunks)  # the same choice again: finished where it stopped
    eng.model.forward = forward
    assert sum(encoded) == doc.head_rows - done and doc.missing_count == 0
    eng.open("file:///whole.py", Held.text(chunks) + DOC)  # the same text encoded in one go
    whole = eng.docs["file:///whole.py"].cache
    n = doc.head_rows
    torch.testing.assert_close(doc.cache.k[:, :, :n], whole.k[:, :, :n])
    torch.testing.assert_close(doc.cache.v[:, :, :n], whole.v[:, :, :n])


@pytest.mark.parametrize("budget", [0, 1])
def test_no_budget_no_context(budget):
    got = choose(library(), DOC, len(DOC), path="app.py", opts=Options(budget=budget), open_paths=set())
    assert got == []
