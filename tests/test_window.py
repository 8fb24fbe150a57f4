"""Long documents: only a window around where the user works is cached. The window behaves as a
document of its own (its cache equals a fresh encode of its text), the engine's text stays the whole
document through edits above, inside, below and across the window, and a completion outside it
moves it."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostline.engine.engine import Cancelled, CompletionOptions
from ghostline.engine.text import Change
from tests.test_pie import SAMPLE, states_close

LONG = "".join(f"# part {i}\n{SAMPLE}" for i in range(4))  # ~20k characters: far past a 256-token window
W = 256
OPTS = CompletionOptions(max_tokens=6)


def window_equals_fresh(factory, eng, uri: str, offset: int) -> None:
    """The window's cache and a completion at `offset` equal a fresh document holding the window's text."""
    doc = eng.docs[uri]
    eng.complete(uri, offset, OPTS)  # places the window if it must move
    eng.refresh(uri)  # zero stale tokens (PIE leaves the rows below an edit stale)
    ref = factory("llama", window_tokens=W * 8, window_above=W * 8)
    ref.open("w", doc.text)
    assert doc.ids == ref.docs["w"].ids
    assert states_close(doc.cache, ref.docs["w"].cache, 0) < 1e-5
    assert eng.complete(uri, offset, OPTS).tokens == ref.complete("w", offset - doc.base, OPTS).tokens


def test_long_document_opens_as_text_and_caches_a_window_at_the_cursor(tiny_engine_factory):
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W)
    stats = eng.open("a", LONG)
    doc = eng.docs["a"]
    assert stats.encoded == 0 and doc.cache is None and eng.text("a") == LONG
    end = len(LONG) - 40
    eng.complete("a", end, OPTS)
    assert 0 < doc.base <= end <= doc.base + len(doc.text) and len(doc.ids) <= W
    assert LONG[doc.base - 1] == "\n" and LONG[doc.base : doc.base + len(doc.text)] == doc.text
    assert end - doc.base > len(doc.text) // 2  # most of the window lies above the cursor
    window_equals_fresh(tiny_engine_factory, eng, "a", end)

    top = 300
    eng.complete("a", top, OPTS)  # far above: the window moves there
    assert doc.base == 0 and top <= len(doc.text) and len(doc.ids) <= W
    window_equals_fresh(tiny_engine_factory, eng, "a", top)


def test_a_window_placed_where_nothing_is_cached_starts_small_and_grows_when_idle(tiny_engine_factory):
    """A completion far from any cached row encodes at most `window_first` tokens; idle refreshes
    then grow the window upward chunk by chunk to `window_tokens`, and it stays a document."""
    eng = tiny_engine_factory("llama", window_tokens=4 * W, window_above=W, window_first=W, encode_chunk=64)
    eng.open("a", LONG)
    end = len(LONG) - 40
    eng.complete("a", end, OPTS)
    doc = eng.docs["a"]
    assert len(doc.ids) <= W and doc.base > 0
    kinds = [eng.background("a") for _ in range(40)]
    assert "grow" in {k.strategy for k in kinds if k} and kinds[-1] is None  # grown, then nothing due
    assert 3 * W < len(doc.ids) <= 4 * W and doc.base + len(doc.text) >= end
    assert LONG[doc.base - 1] == "\n" and LONG[doc.base : doc.base + len(doc.text)] == doc.text
    window_equals_fresh(tiny_engine_factory, eng, "a", end)


def test_a_window_below_long_lines_still_grows_and_then_stops(tiny_engine_factory):
    """Lines longer than an encode chunk above the window: it grows by whole lines (more than a
    chunk) while they fit, and idle work ends, instead of growing by nothing for ever."""
    row = "values = [" + ", ".join(str(i) for i in range(120)) + "]\n"  # one line, hundreds of tokens
    text = row * 60
    eng = tiny_engine_factory("llama", window_tokens=8 * W, window_above=W, window_first=W, encode_chunk=64)
    eng.open("a", text)
    end = len(text) - 1
    eng.complete("a", end, OPTS)
    doc = eng.docs["a"]
    start = len(doc.ids)
    assert doc.base > 0
    kinds = [eng.background("a") for _ in range(60)]
    assert kinds[-1] is None  # nothing left to do
    assert start < len(doc.ids) <= 8 * W and doc.base + len(doc.text) >= end
    assert text[doc.base : doc.base + len(doc.text)] == doc.text
    window_equals_fresh(tiny_engine_factory, eng, "a", end)


def test_a_document_grown_past_the_limit_becomes_a_window_around_the_edit(tiny_engine_factory):
    """Edits that take a document past `window_above` tokens turn it into a window around the last
    change that keeps the rows it had (only the new text is encoded)."""
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W, encode_chunk=64)
    short = SAMPLE[:600]
    eng.open("a", short)
    doc = eng.docs["a"]
    assert doc.full is None
    at = short.rindex("\n", 0, 400) + 1
    paste = SAMPLE[2000:2600]
    stats = eng.edit("a", [Change(at, at, paste)], encode=False)
    text = short[:at] + paste + short[at:]
    assert stats.strategy == "window" and doc.full == text == eng.text("a")
    assert doc.base <= at + len(paste) <= doc.base + len(doc.text) and len(doc.ids) <= W
    assert 0 < doc.missing_count < len(doc.ids)  # the pasted rows; the rest kept, moved and rotated
    window_equals_fresh(tiny_engine_factory, eng, "a", at + len(paste))


def test_a_short_document_is_not_windowed(tiny_engine_factory):
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W)
    eng.open("a", SAMPLE[:600])
    assert eng.docs["a"].full is None and eng.docs["a"].cache.length == len(eng.docs["a"].ids)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 600), st.sampled_from(["", "x = 1\n", "é\n\n", "  ("])),
                min_size=1, max_size=8), st.booleans())
def test_edits_anywhere_keep_the_whole_text_and_the_window_a_document(tiny_engine_factory, edits, batched):
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W)
    eng.open("a", LONG)
    focus = len(LONG) // 2
    eng.complete("a", focus, OPTS)
    text, changes = LONG, []
    for where, span, new in edits:
        a = int(where * len(text))
        b = min(len(text), a + span)
        changes.append(Change(a, b, new))
        text = text[:a] + new + text[b:]
        if not batched:
            eng.edit("a", changes[-1:])
    if batched:
        eng.edit("a", changes)
    doc = eng.docs["a"]
    assert eng.text("a") == text
    assert text[doc.base : doc.base + len(doc.text)] == doc.text
    if doc.ids:
        assert doc.base == 0 or text[doc.base - 1] == "\n"
    cursor = min(len(text), doc.base + len(doc.text) - 1) if doc.ids else focus
    window_equals_fresh(tiny_engine_factory, eng, "a", max(cursor, 0))


def test_an_edit_across_the_window_edge_drops_it_until_the_next_completion(tiny_engine_factory):
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W)
    eng.open("a", LONG)
    eng.complete("a", len(LONG) - 10, OPTS)
    doc = eng.docs["a"]
    base = doc.base
    eng.edit("a", [Change(base - 5, base + 5, "")])
    assert not doc.ids and doc.cache is None
    assert eng.text("a") == LONG[: base - 5] + LONG[base + 5 :]
    window_equals_fresh(tiny_engine_factory, eng, "a", len(LONG) - 30)


def test_encoding_a_window_yields_and_resumes(tiny_engine_factory):
    """`should_yield` stops the window's encode between chunks (Cancelled, rows kept); the next call
    encodes only the rest, and the completion equals one in a single go."""
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W, encode_chunk=64, mend_budget=4096)
    eng.open("a", LONG)
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        eng.complete("a", len(LONG) - 10, OPTS, should_yield=lambda: next(calls) >= 2)
    doc = eng.docs["a"]
    assert doc.first_stale == 128 and doc.missing_count > 0
    window_equals_fresh(tiny_engine_factory, eng, "a", len(LONG) - 10)


def test_window_tokens_is_validated():
    from ghostline.engine.engine import EngineOptions

    with pytest.raises(ValueError, match="window_tokens"):
        EngineOptions(window_tokens=10)
    with pytest.raises(ValueError, match="window_above"):
        EngineOptions(window_above=True)


def test_only_documents_past_window_above_are_windowed(tiny_engine_factory):
    eng = tiny_engine_factory("llama", window_tokens=W, window_above=W * 8)
    eng.open("a", SAMPLE)  # more tokens than a window, fewer than window_above: cached whole
    doc = eng.docs["a"]
    assert doc.full is None and len(doc.ids) > W and doc.cache.length == len(doc.ids)
