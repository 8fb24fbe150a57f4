"""Re-encoding only the lines around an edit gives exactly what encoding the whole text gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_pie import SAMPLE

TEXT = SAMPLE * 2  # past the length where re-encoding a stretch pays

NEW = st.sampled_from(["", "x", " ", "\n", "\r\n", "\t", "é", "😀", "    ", "\n\n", "def f(x):\n    return x\n",
                       "ab cd", "'''", "# note\n"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 300), NEW), min_size=1, max_size=10))
def test_reencode_equals_encoding_the_whole_text(smol, edits):
    tok = smol.tokenizer
    text = TEXT
    ids, offsets = tok.encode(text)
    for where, span, new in edits:
        a = int(where * len(text))
        b = min(len(text), a + span)
        edited = text[:a] + new + text[b:]
        got = tok.reencode(text, ids, offsets, edited)
        assert got == tok.encode(edited)
        text, (ids, offsets) = edited, got


def test_a_keystroke_re_encodes_only_its_lines(smol, monkeypatch):
    tok = smol.tokenizer
    ids, offsets = tok.encode(TEXT)
    at = TEXT.index("\n", len(TEXT) // 2) - 3
    edited = TEXT[:at] + "x" + TEXT[at:]
    expected = tok.encode(edited)
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("encoded the whole text"))
    assert tok.reencode(TEXT, ids, offsets, edited) == expected
