"""Stop rules for code: where a suggestion ends, decided on its text."""

from __future__ import annotations

import re
from dataclasses import dataclass

# A unit of 2-8 characters repeated 8 times at the end of the text: a model stuck in a loop
# (`':':':':...`). Single characters are left alone: rulers such as `# ======` are real code.
LOOP = re.compile(r"(.{2,8}?)\1{7,}$")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


@dataclass
class StopRules:
    """`multiline=False`: end of line. `multiline=True`: a line dedented below the cursor's block (or,
    after a block header ending in ':', back to the header's level), or a line repeating the first
    non-blank line below the cursor."""

    multiline: bool
    line_before: str = ""  # the cursor's line up to the cursor
    below: str = ""  # first non-blank line below the cursor's line, stripped

    def apply(self, text: str) -> tuple[str, str | None]:
        """Generated text -> (text to show, stop reason or None to go on)."""
        shown, reason = self._apply(text)
        loop = LOOP.search(shown, max(0, len(shown) - 200))
        if loop and len(set(loop.group(1))) > 1:  # what came before the loop may be worth showing
            return shown[: loop.start()].rstrip(), "repetition"
        return shown, reason

    def _apply(self, text: str) -> tuple[str, str | None]:
        if not self.multiline:
            i = text.find("\n")
            return (text, None) if i < 0 else (text[:i], "end_of_line")
        lines = text.split("\n")
        base = indent_of(self.line_before)
        header = (self.line_before + lines[0]).rstrip().endswith(":")
        for i in range(1, len(lines)):
            line, complete = lines[i], i < len(lines) - 1
            if not line.strip():
                continue
            ind = indent_of(line)
            if ind < base or (header and ind <= base):
                return "\n".join(lines[:i]).rstrip(), "end_of_block"
            if complete and self.below and line.strip() == self.below:
                return "\n".join(lines[:i]).rstrip(), "repeat_below"
        return text, None


class Shown:
    """Token ids of a suggestion -> the text it shows, and whether it has ended. Decoders speak ids;
    this is where their ids meet the stop rules. `first` is the last context token (decoded with the
    ids so that leading spaces survive) and `heal` the text between it and the cursor."""

    def __init__(self, tokenizer, first: int, heal: str, rules: StopRules):
        self.tok, self.first, self.heal, self.rules = tokenizer, first, heal, rules
        self.prev = tokenizer.decode([first])

    def text(self, ids: list[int]) -> tuple[str, str | None] | None:
        """(text cut by the rules, stop reason or None); None while a character is split across tokens."""
        raw = self.tok.decode([self.first] + ids)[len(self.prev) :]
        return None if raw.endswith("\ufffd") else self.rules.apply(raw[len(self.heal) :])

    def finish(self, ids: list[int]) -> tuple[str, str] | None:
        """(final text, reason) once the ids end the suggestion (a stop rule or EOS), else None."""
        if ids and ids[-1] in self.tok.eos_ids:
            return (self.text(ids[:-1]) or ("", None))[0], "eos"
        s = self.text(ids)
        return s if s is not None and s[1] is not None else None
