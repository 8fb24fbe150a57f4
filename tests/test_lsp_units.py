"""Units of the LSP layer: settings parsing and position conversion."""

from __future__ import annotations

import pytest

from ghostline.engine.text import EditError
from ghostline.lsp.positions import Mirror, chars_to_column, column_to_chars
from ghostline.lsp.settings import Settings, SettingsError


def test_settings_merge_flat_nested_and_camel_case(caplog):
    s = Settings().merged({"ghostline": {"maxTokens": 20, "multiline": "never", "bogus": 1}})
    assert (s.max_tokens, s.multiline) == (20, "never")
    assert "bogus" in caplog.text
    assert Settings().merged({"debounce_ms": 0}).debounce_ms == 0
    assert Settings().merged(None) == Settings()
    fast = Settings().merged({"precision": "fp32", "head": "full"})
    assert (fast.precision, fast.head) == ("fp32", "full") and (Settings().precision, Settings().head) == ("int8", "code")
    dec = Settings().merged({"decoder": "lookup", "decoderMultiline": "adadec"})
    assert (dec.decoder, dec.decoder_multiline) == ("lookup", "adadec")


@pytest.mark.parametrize("raw", [{"max_tokens": 0}, {"max_tokens": "5"}, {"multiline": "sometimes"},
                                 {"time_cap_ms": -1}, {"memory_budget_mb": True}, {"drafts": 99}, [1, 2],
                                 {"precision": "fp8"}, {"head": "tiny"}, {"decoder": "adadec"},
                                 {"decoder_multiline": "beam"}])
def test_bad_settings_are_rejected(raw):
    with pytest.raises(SettingsError):
        Settings().merged(raw)


LINE = "a\u00e9\U0001F600b"  # a, é (2 UTF-8 bytes), emoji (4 bytes, 2 UTF-16 units), b


@pytest.mark.parametrize("encoding, columns", [("utf-16", [0, 1, 2, 4, 5]), ("utf-8", [0, 1, 3, 7, 8]),
                                               ("utf-32", [0, 1, 2, 3, 4])])
def test_columns_round_trip(encoding, columns):
    for chars, col in enumerate(columns):
        assert column_to_chars(LINE, col, encoding) == chars
        assert chars_to_column(LINE, chars, encoding) == col


def test_columns_inside_a_character_or_past_the_end_are_errors():
    with pytest.raises(EditError):
        column_to_chars(LINE, 3, "utf-16")  # between the emoji's surrogates
    with pytest.raises(EditError):
        column_to_chars(LINE, 2, "utf-8")  # inside é
    with pytest.raises(EditError):
        column_to_chars(LINE, 9, "utf-8")


def test_mirror_offsets_and_positions():
    m = Mirror("x = 1\n" + LINE + "\n", 1)
    assert m.offset(1, 4, "utf-16") == 6 + 3
    assert m.position(6 + 3, "utf-16") == (1, 4)
    assert m.offset(2, 0, "utf-16") == len(m.text)
    with pytest.raises(EditError):
        m.offset(5, 0, "utf-16")


def test_decoder_settings_pick_the_decoder_by_suggestion_kind():
    from ghostline.lsp.positions import Mirror
    from ghostline.lsp.server import GhostlineServer

    server = GhostlineServer(settings=Settings().merged({"decoder": "lookup", "decoder_multiline": "adadec"}))
    text = "def f(x):\n    \n    y = x\n"
    block, mid = server.options_for(Mirror(text, 1), 14), server.options_for(Mirror(text, 1), len(text) - 3)
    assert (block.multiline, block.decoder) == (True, "adadec")
    assert (mid.multiline, mid.decoder) == (False, "lookup")


def test_drafts_never_start_with_a_carriage_return_or_a_stray_tab():
    from ghostline.lsp.server import usable

    assert usable("\r\n    return x", "    y = 1") is None
    assert usable(" \t ", "x = ") is None
    assert usable("\tin text if c]", "    chunks = [c for c ") == "in text if c]"
    assert usable("\tx = 1", "") == "\tx = 1"  # at the line's start a tab indents
    assert usable("\t# note", "x = 1\t") == "\t# note"  # a line that uses tabs keeps them
    assert usable("\n    return x", "def f():") == "\n    return x"


@pytest.mark.parametrize("before, text, after, k", [
    ("    chunks = [c for c ", "in text if c]", "]", 1),  # the bracket VS Code closed
    ("f(g(", "x))", "))", 2),
    ("print(", "foo()", ")", 0),  # the suggestion leaves print( open: the ) after the cursor is print's
    ('s = "', 'abc"', '"', 1),
    ("x = ", "1", "", 0),
    ("x = [", "1, 2]", "]  # list", 1),
    ("f(", "a, b)", ", b)", 4),
])
def test_overlap_with_the_text_right_of_the_cursor(before, text, after, k):
    from ghostline.lsp.server import overlap

    assert overlap(before, text, after) == k


def test_inline_items_replace_the_closing_bracket_they_repeat():
    from lsprotocol import types

    from ghostline.lsp.server import GhostlineServer

    server, uri = GhostlineServer(), "file:///w.py"
    server.mirrors[uri] = Mirror("chunks = [c for c ]\n", 1)
    item = server.inline_item(uri, types.Position(0, 18), "in text if c]")
    assert item.insert_text == "in text if c]"
    assert (item.range.start, item.range.end) == (types.Position(0, 18), types.Position(0, 19))
    plain = server.inline_item(uri, types.Position(0, 18), "in text")
    assert plain.range.end == types.Position(0, 18)


def test_type_through_answers_every_draft_at_the_shown_offset():
    from ghostline.lsp.server import GhostlineServer, Shown

    server, uri = GhostlineServer(), "file:///w.py"
    text = "chunks = [c for c "
    server.shown[uri] = Shown(len(text), "in text]", text, ("in text]", "in words]", "for x]"))
    assert server.type_through(uri, Mirror(text, 1), len(text)) == ["in text]", "in words]", "for x]"]
    typed = Mirror(text + "in t", 2)
    assert server.type_through(uri, typed, len(typed.text)) == ["ext]"]
    assert server.type_through(uri, Mirror(text + "x", 3), len(text) + 1) is None


def test_completion_items_are_opt_in():
    assert Settings().completion_items is False
    assert Settings().merged({"completionItems": True}).completion_items is True
    with pytest.raises(SettingsError):
        Settings().merged({"completion_items": "yes"})


def test_lines_end_where_lsp_says_they_do():
    """\\n, \\r\\n and a lone \\r end a line; a form feed or \\u2028 does not (str.splitlines would)."""
    text = "a\rb\r\nc\nd\x0ce\u2028f"
    m = Mirror(text, 1)
    assert [m.line(n) for n in range(4)] == ["a", "b", "c", "d\x0ce\u2028f"]
    assert m.offset(1, 1, "utf-16") == 3 and m.offset(2, 0, "utf-16") == 5 and m.offset(3, 4, "utf-16") == 11
    with pytest.raises(EditError):
        m.offset(1, 2, "utf-16")  # past "b": the \r\n is not part of the line
    assert all(m.offset(*m.position(o, "utf-16"), "utf-16") == o for o in (0, 1, 2, 3, 5, 6, 7, 12))


def test_a_completion_waiting_stops_the_encode_of_a_file_just_opened(tiny_engine_factory):
    """The open's encode yields to a completion queued behind it: the rows not encoded stay missing
    (that completion encodes those it reads, idle work the rest); nothing fails, nothing is re-opened."""
    from ghostline.lsp.server import GhostlineServer

    server, uri, text = GhostlineServer(), "file:///w.py", "x = 1\n" * 40
    server.engine = engine = tiny_engine_factory(encode_chunk=16)
    server.open_in(engine, uri, text)
    assert engine.docs[uri].missing_count == 0
    server.worker.submit("complete", lambda stop: None, uri=uri)  # queued: the worker thread is not started
    server.open_in(engine, uri, text)
    doc = engine.docs[uri]
    assert doc.missing_count == len(doc.ids) > 16 and doc.text == text
    assert server.errors == 0 and not server.unsynced
