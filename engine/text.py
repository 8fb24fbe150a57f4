"""Document text edits in code-point offsets: the engine's side of LSP's content changes.

The LSP layer converts the client's positions (UTF-16 by default) to code points; the engine sees
`{"range": {"start": {"line", "character"}, "end": {...}}, "text": ...}` with `character` counted in
code points, or `{"text": ...}` for a whole-document replacement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BREAK = re.compile(r"\r\n|\r|\n")


class EditError(ValueError):
    """A change that does not fit the document (range past the end, reversed range, bad shape)."""


@dataclass(frozen=True)
class Change:
    start: int  # code-point offset in the text as it stands when this change applies
    end: int
    text: str


def line_starts(text: str) -> list[int]:
    """Where each line starts. Lines end at \n, \r\n or a lone \r, as LSP counts them (not at the
    other breaks `str.splitlines` knows: form feeds, \u2028 ...)."""
    if "\r" in text:
        return [0] + [m.end() for m in _BREAK.finditer(text)]
    starts = [0]
    i = text.find("\n")
    while i >= 0:
        starts.append(i + 1)
        i = text.find("\n", i + 1)
    return starts


def line_end(text: str, starts: list[int], line: int) -> int:
    """Where `line`'s text ends (before its line break)."""
    if line + 1 >= len(starts):
        return len(text)
    end = starts[line + 1]
    return end - 2 if text.startswith("\r\n", end - 2) else end - 1


def offset_of(text: str, line: int, character: int, *, starts: list[int] | None = None) -> int:
    """(line, character) in code points -> offset; raises EditError past the end of the text or line."""
    starts = starts if starts is not None else line_starts(text)
    if line < 0 or character < 0:
        raise EditError(f"negative position {line}:{character}")
    if line >= len(starts):
        if line == len(starts) and character == 0 and text.endswith("\n"):
            return len(text)
        raise EditError(f"line {line} is past the end of the document ({len(starts)} lines)")
    end = line_end(text, starts, line)
    if starts[line] + character > end:
        raise EditError(f"character {character} is past the end of line {line} ({end - starts[line]} chars)")
    return starts[line] + character


def to_change(text: str, change) -> Change:
    """An LSP-shaped change (dict) or a Change -> Change against `text`."""
    if isinstance(change, Change):
        if not 0 <= change.start <= change.end <= len(text):
            raise EditError(f"range {change.start}..{change.end} does not fit a text of {len(text)} chars")
        return change
    if not isinstance(change, dict) or not isinstance(change.get("text"), str):
        raise EditError(f"a change needs a 'text' string: {change!r:.200}")
    rng = change.get("range")
    if rng is None:
        return Change(0, len(text), change["text"])
    try:
        s, e = rng["start"], rng["end"]
        starts = line_starts(text)
        a = offset_of(text, int(s["line"]), int(s["character"]), starts=starts)
        b = offset_of(text, int(e["line"]), int(e["character"]), starts=starts)
    except (KeyError, TypeError) as exc:
        raise EditError(f"malformed range {rng!r:.200}") from exc
    if b < a:
        raise EditError(f"range end {e} is before its start {s}")
    return Change(a, b, change["text"])


def apply_changes(text: str, changes) -> str:
    """Apply changes in order, each against the text left by the previous; all or nothing."""
    for change in changes:
        c = to_change(text, change)
        text = text[: c.start] + c.text + text[c.end :]
    return text
