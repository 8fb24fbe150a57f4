"""LSP positions <-> code-point offsets. LSP counts `character` in UTF-16 code units by default,
or UTF-8 bytes / UTF-32 code points when negotiated; the engine counts code points."""

from __future__ import annotations

from ghostline.engine.text import EditError, line_end, line_starts


def _units(ch: str, encoding: str) -> int:
    if encoding == "utf-8":
        return len(ch.encode("utf-8"))
    if encoding == "utf-16":
        return 2 if ord(ch) > 0xFFFF else 1
    return 1


def column_to_chars(line: str, column: int, encoding: str) -> int:
    """A column in `encoding` units on `line` -> code points; raises EditError past the line's end."""
    if encoding == "utf-32":
        if column > len(line):
            raise EditError(f"character {column} is past the end of the line ({len(line)})")
        return column
    units = 0
    for i, ch in enumerate(line):
        if units >= column:
            if units > column:
                raise EditError(f"character {column} splits a character")
            return i
        units += _units(ch, encoding)
    if units == column:
        return len(line)
    if units < column:
        raise EditError(f"character {column} is past the end of the line ({units} {encoding} units)")
    raise EditError(f"character {column} splits a character")


def chars_to_column(line: str, chars: int, encoding: str) -> int:
    if encoding == "utf-32":
        return chars
    return sum(_units(ch, encoding) for ch in line[:chars])


class Mirror:
    """The server's copy of one document: its text and version, for conversions and resync."""

    def __init__(self, text: str, version: int | None):
        self.text, self.version = text, version
        self._starts = line_starts(text)

    def set(self, text: str, version: int | None) -> None:
        self.text, self.version = text, version
        self._starts = line_starts(text)

    def line(self, n: int) -> str:
        if n >= len(self._starts):
            return ""
        end = line_end(self.text, self._starts, n)
        return self.text[self._starts[n] : end]

    def offset(self, line: int, character: int, encoding: str) -> int:
        if line < 0 or character < 0:
            raise EditError(f"negative position {line}:{character}")
        if line >= len(self._starts):
            raise EditError(f"line {line} is past the end of the document ({len(self._starts)} lines)")
        return self._starts[line] + column_to_chars(self.line(line), character, encoding)

    def position(self, offset: int, encoding: str) -> tuple[int, int]:
        from bisect import bisect_right

        line = bisect_right(self._starts, offset) - 1
        return line, chars_to_column(self.line(line), offset - self._starts[line], encoding)
