"""Context cached in front of a document (`Engine.set_context`): other files' chunks in the same
token sequence as the document, replaced by PIE edits. The reference is one encode of the context
and the document together: at zero staleness the cache and the completions equal it."""

from __future__ import annotations

import pytest
import torch

from ghostline.engine.document import FRESH, SHIFTED, STALE
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.model import build
from tests.conftest import tiny_hf

BLOCKS = {  # two chunks of other files, each under its path
    "a": "# lib/http.py\ndef fetch_json(session, url, timeout=10):\n    return session.get(url, timeout=timeout).json()\n",
    "b": "# lib/models.py\nclass Response:\n    def __init__(self, status, body):\n        self.status = status\n",
}
DOC = "import lib.http\n\ndef load(session):\n    data = fetch_json(session, "


def engine_for(tokenizer, kind: str = "gemma3") -> Engine:
    cfg, hf = tiny_hf(kind, tokenizer.vocab_size, seed=3)
    return Engine(build(cfg, hf.state_dict()), tokenizer, EngineOptions())


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def tokenizer(request, smol):
    if request.param == "no-bos":
        return smol.tokenizer
    from ghostline.engine.loader import load

    return load("gemma3-270m").tokenizer


HEAD = BLOCKS["a"] + BLOCKS["b"]


def _rows_equal(a, b, n: int) -> None:
    torch.testing.assert_close(a.k[:, :, :n], b.k[:, :, :n], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(a.v[:, :, :n], b.v[:, :, :n], atol=2e-4, rtol=1e-4)


def test_a_context_set_then_refreshed_equals_one_encode_of_context_and_document(tokenizer):
    eng = engine_for(tokenizer)
    eng.open("doc", DOC)
    eng.set_context("doc", HEAD)
    assert eng.text("doc") == DOC and eng.describe("doc")["context_missing"] > 20
    eng.refresh("doc")
    eng.open("ref", HEAD + DOC)
    doc, ref = eng.docs["doc"], eng.docs["ref"]
    assert doc.ids == ref.ids and doc.stale_count == 0
    _rows_equal(doc.cache, ref.cache, len(ref.ids))
    opts = CompletionOptions(multiline=True, max_tokens=8)
    out, want = eng.complete("doc", len(DOC), opts), eng.complete("ref", len(HEAD + DOC), opts)
    assert out.tokens == want.tokens and len(out.tokens) >= 3
    assert out.context_tokens == doc.head_rows - 1 > 20
    k = CompletionOptions(multiline=True, max_tokens=8, drafts=3)  # k drafts read it too
    eng.open("bare", DOC)
    drafts, ref_drafts = eng.complete("doc", len(DOC), k), eng.complete("ref", len(HEAD + DOC), k)
    assert drafts.drafts == ref_drafts.drafts != eng.complete("bare", len(DOC), k).drafts


def test_a_new_context_is_an_edit_that_keeps_the_chunks_it_shares(tokenizer):
    eng = engine_for(tokenizer)
    eng.open("doc", DOC)
    eng.set_context("doc", HEAD)
    eng.refresh("doc")
    doc = eng.docs["doc"]
    cache, kept = doc.cache, len(tokenizer.encode(BLOCKS["b"])[0])
    new = BLOCKS["b"] + "# lib/util.py\ndef clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"
    stats = eng.set_context("doc", new)
    assert stats.strategy == "context" and stats.encoded == 0 and doc.cache is cache
    assert eng.text("doc") == DOC and doc.text == new + DOC
    assert doc.missing_count < doc.head_rows - kept + 4  # chunk b's rows were kept (moved), not left to encode
    assert doc.stale_count >= len(doc.ids) - doc.head_rows  # the document's rows have not read it yet
    while eng.background("doc") is not None:  # its new rows encoded when idle
        pass
    assert doc.missing_count == 0
    eng.refresh("doc")
    eng.open("ref", new + DOC)
    assert doc.stale_count == 0 and doc.ids == eng.docs["ref"].ids
    _rows_equal(doc.cache, eng.docs["ref"].cache, len(doc.ids))
    eng.set_context("doc", "")
    eng.refresh("doc")
    eng.open("bare", DOC)
    assert doc.text == DOC and doc.head_rows == 0
    _rows_equal(doc.cache, eng.docs["bare"].cache, len(doc.ids))


def test_a_new_context_costs_its_own_rows_and_only_edits_make_a_refresh_due(smol):
    eng = Engine(engine_for(smol.tokenizer).model, smol.tokenizer, EngineOptions(refresh_stale_min=1, refresh_stale_share=0.0))
    eng.open("doc", DOC)
    eng.set_context("doc", HEAD)
    doc = eng.docs["doc"]
    own = len(doc.ids) - doc.head_rows
    work = []
    while (stats := eng.background("doc")) is not None:
        work.append(stats)
    assert {s.strategy for s in work} == {"mend"} and sum(s.encoded for s in work) == doc.head_rows
    assert doc.stale[doc.head_rows :] == bytes([SHIFTED]) * own and not eng.needs_refresh("doc")
    eng.edit("doc", [{"range": {"start": {"line": 0, "character": 7}, "end": {"line": 0, "character": 10}},
                      "text": "core"}])  # the rows after it are stale now (shifted or not): a refresh is due
    assert eng.needs_refresh("doc") and SHIFTED not in doc.stale[doc.stale.index(STALE) :]
    while eng.background("doc") is not None:
        pass
    eng.open("ref", HEAD + eng.text("doc"))
    assert doc.stale_count == 0 and doc.ids == eng.docs["ref"].ids
    _rows_equal(doc.cache, eng.docs["ref"].cache, len(doc.ids))


@pytest.mark.parametrize("reread", [3, 10**6])
def test_a_new_context_encodes_again_the_rows_before_where_the_user_works(smol, reread):
    model = engine_for(smol.tokenizer).model
    eng = Engine(model, smol.tokenizer, EngineOptions(reread=reread))
    opts = CompletionOptions(max_tokens=6)
    eng.open("doc", DOC)
    eng.edit("doc", [{"range": {"start": {"line": 0, "character": 7}, "end": {"line": 0, "character": 10}},
                      "text": "core"}], encode=False)  # the rows after it are stale, its own missing
    text = eng.text("doc")
    eng.complete("doc", len(text), opts)  # the user works at the end
    eng.set_context("doc", HEAD)
    doc = eng.docs["doc"]
    end = doc.token_at(doc.local(len(text)))
    work = []
    while (stats := eng.background("doc")) is not None:
        work.append(stats)
    assert [s.strategy for s in work if s.strategy != "mend"] == ["reread"]
    assert sum(s.encoded for s in work if s.strategy == "reread") == min(reread, end - doc.head_rows)
    assert doc.stale[end - min(reread, end - doc.head_rows) : end].count(SHIFTED) == 0 and not eng.needs_refresh("doc")
    if reread < end - doc.head_rows:  # the user moves up: the rows before the new place are encoded again
        eng.complete("doc", text.index("def load"), opts)
        moved = list(iter(lambda: eng.background("doc"), None))
        assert [s.strategy for s in moved] == ["reread"] and moved[0].encoded == reread
    else:  # every row before the cursor read the new context: as one encode of both
        ref = Engine(model, smol.tokenizer)
        ref.open("ref", HEAD + text)
        _rows_equal(doc.cache, ref.docs["ref"].cache, end)
        assert eng.complete("doc", len(text), opts).tokens == ref.complete("ref", len(HEAD + text), opts).tokens


def test_an_edit_while_a_new_context_waits_is_encoded_again_with_the_rows_before_it(smol):
    """A new context shifts the document's rows; an edit typed before idle work encodes them again
    gets rows of its own, encoded over the shifted ones. Idle work encodes both again (the edit's rows
    read the rows encoded again before them): the cache then equals one encode of context and text."""
    model = engine_for(smol.tokenizer).model
    eng = Engine(model, smol.tokenizer, EngineOptions(reread=10**6))
    eng.open("doc", DOC)
    eng.set_context("doc", HEAD)
    while eng.background("doc") is not None:  # the context's rows; no focus yet, so nothing else
        pass
    doc = eng.docs["doc"]
    assert SHIFTED in doc.stale
    eng.edit("doc", [{"range": {"start": {"line": 2, "character": 0}, "end": {"line": 2, "character": 0}},
                      "text": "import lib.models\n"}])  # its rows encoded now, over the shifted rows above
    text = eng.text("doc")
    eng.complete("doc", len(text), CompletionOptions(max_tokens=4))  # the user works at the end
    while eng.background("doc") is not None:
        pass
    ref = Engine(model, smol.tokenizer)
    ref.open("ref", HEAD + text)
    end = doc.token_at(doc.local(len(text)))
    assert doc.ids == ref.docs["ref"].ids and doc.stale[:end].count(FRESH) == end
    _rows_equal(doc.cache, ref.docs["ref"].cache, end)
    eng.set_context("doc", BLOCKS["b"])  # the chunk it keeps moves up: its rows read a chunk now gone
    assert SHIFTED in doc.stale[: doc.head_rows]
    while eng.background("doc") is not None:
        pass
    ref.open("ref", BLOCKS["b"] + text)
    end = doc.token_at(doc.local(len(text)))
    assert doc.ids == ref.docs["ref"].ids and doc.stale[:end].count(FRESH) == end
    _rows_equal(doc.cache, ref.docs["ref"].cache, end)


def test_a_completion_never_waits_for_context_and_edits_keep_it(smol):
    eng = engine_for(smol.tokenizer)
    eng.open("doc", DOC)
    eng.set_context("doc", HEAD)
    doc = eng.docs["doc"]
    missing = doc.missing_count
    out = eng.complete("doc", len(DOC), CompletionOptions(max_tokens=4))
    assert out.context_tokens == 0 and doc.missing_count == missing - 1  # none of the context encoded (row 0 aside)
    eng.edit("doc", [{"range": {"start": {"line": 3, "character": 4}, "end": {"line": 3, "character": 8}},
                      "text": "body"}])
    assert eng.text("doc") == DOC.replace("data", "body") and doc.text == HEAD + eng.text("doc")
    eng.refresh("doc")
    eng.open("ref", HEAD + eng.text("doc"))
    _rows_equal(doc.cache, eng.docs["ref"].cache, len(doc.ids))
    eng.open("doc", DOC)  # re-opened: a fresh document, no context
    assert eng.docs["doc"].head == "" and eng.describe("doc")["context_tokens"] == 0


def test_a_long_documents_window_keeps_its_context_in_front(smol):
    cfg, hf = tiny_hf("llama", smol.tokenizer.vocab_size, seed=3)
    eng = Engine(build(cfg, hf.state_dict()), smol.tokenizer,
                 EngineOptions(window_above=256, window_tokens=256, window_first=256))
    long = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(150)) + DOC
    eng.open("doc", long)
    eng.set_context("doc", HEAD)  # the window is not placed yet: it comes with it
    out = eng.complete("doc", len(long), CompletionOptions(max_tokens=4))
    doc = eng.docs["doc"]
    assert doc.full == long == eng.text("doc") and doc.text == HEAD + long[doc.base :] and doc.base > 0
    eng.refresh("doc")
    base = doc.base
    out = eng.complete("doc", len(long), CompletionOptions(max_tokens=6, multiline=True))
    ref = Engine(eng.model, smol.tokenizer)  # no window: the context and the window encoded as one text
    ref.open("ref", HEAD + long[base:])
    want = ref.complete("ref", len(HEAD + long[base:]), CompletionOptions(max_tokens=6, multiline=True))
    assert doc.base == base
    assert out.tokens == want.tokens and out.context_tokens == doc.head_rows - 1
