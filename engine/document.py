"""An open document: its text, token ids, character offsets, KV cache and stale-token mask.

Edits (PIE): re-tokenise the new text, diff the ids against the old ones, and for each changed span
`[i, j)` replaced by `m` new tokens keep the prefix, move the suffix by `delta = m - (j - i)` rotating
its keys, and encode only the new tokens. The suffix keeps K/V computed against the old text: those
tokens are *stale* until `refresh` re-encodes them. The new tokens' rows are *missing* (no K/V yet)
until encoded: at once, or, for a deferred edit, when a completion first reads them (rows before its
cursor) or the engine is idle, so a storm of edits costs only what the completions read.

Context (`head`): other files' text the document's requests read, cached in front of it as part of
the same token sequence (`text` starts with it). Replacing it is one more PIE edit: the document's
rows move and rotate, and the chunks the new context keeps are kept. The rows after a changed chunk
are then *shifted*: their K/V read another context, otherwise the text is theirs; they are read as
they are and refreshed only with a refresh that edits made due, except the rows just before where
the user works (`focus`, wherever it moves), encoded again when idle to read the new context (a new
context costs its own rows and those, never the whole document). Offsets the engine is given are in
the document's own text; `local` maps them into `text`.

Long documents (more than the engine's `window_tokens`): only a window of whole lines around where
the user works is tokenised and cached (`text`, `ids`, `cache` are the window's; `full` is the whole
text, `base` the window's start in it). Edits inside the window go through PIE as above, edits above
it move `base`, edits below it cost nothing; a completion outside the window moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Indel

STRATEGIES = ("pie", "naive", "prefix", "full")
FRESH, STALE, MISSING, SHIFTED = 0, 1, 2, 3  # a row's state in `Document.stale`


@dataclass(frozen=True)
class Hunk:
    """old ids [old_start, old_end) became new ids [new_start, new_end)."""

    old_start: int
    old_end: int
    new_start: int
    new_end: int


def token_hunks(old: list[int], new: list[int], *, multi: bool = False, merge_gap: int = 8) -> list[Hunk]:
    """Changed spans between two id lists, top to bottom. The common prefix and suffix are always
    kept; with `multi`, equal runs inside the middle are kept too (edits in several places), and
    hunks closer than `merge_gap` tokens are merged so a lone equal token does not split them."""
    n = min(len(old), len(new))
    p = 0
    while p < n and old[p] == new[p]:
        p += 1
    s = 0
    while s < n - p and old[-1 - s] == new[-1 - s]:
        s += 1
    a, b = old[p : len(old) - s], new[p : len(new) - s]
    if not a and not b:
        return []
    if not multi:
        return [Hunk(p, len(old) - s, p, len(new) - s)]
    spans: list[list[int]] = []  # [i1, i2, j1, j2] in the middle's coordinates
    for op in Indel.opcodes(a, b):  # a longest common subsequence (C++; difflib took 50 ms on 15k tokens)
        if op.tag == "equal":
            continue
        if spans and op.src_start - spans[-1][1] < merge_gap:
            spans[-1][1], spans[-1][3] = op.src_end, op.dest_end
        else:
            spans.append([op.src_start, op.src_end, op.dest_start, op.dest_end])
    hunks = []
    for i1, i2, j1, j2 in spans:  # a merged span keeps what it starts and ends with, as a lone change would
        while i1 < i2 and j1 < j2 and a[i1] == b[j1]:
            i1, j1 = i1 + 1, j1 + 1
        while i1 < i2 and j1 < j2 and a[i2 - 1] == b[j2 - 1]:
            i2, j2 = i2 - 1, j2 - 1
        hunks.append(Hunk(p + i1, p + i2, p + j1, p + j2))
    return hunks


class Document:
    def __init__(self, uri: str, text: str, ids: list[int], offsets: list[tuple[int, int]]):
        self.uri, self.text, self.offsets = uri, text, offsets
        self.ids = ids
        self.cache = None  # engine.cache.KVCache once encoded; None when evicted
        self.stale = bytearray(len(ids))  # per row: FRESH, STALE (its K/V saw an older text), MISSING or SHIFTED
        self.last_used = 0.0
        self.full: str | None = None  # a long document's whole text; `text` is then its cached window
        self.base = 0  # where the document's part of `text` starts in `full` (code points)
        self.head = ""  # the context cached before the document's text: `text` starts with it
        self.focus: int | None = None  # where the user last edited or asked (an offset of the document's own text)

    @property
    def whole(self) -> str:
        """The document's text: all of it, also when only a window of it is cached; no context."""
        return self.text[len(self.head) :] if self.full is None else self.full

    @property
    def own(self) -> str:
        """The document's part of `text`: all of it, or its cached window."""
        return self.text[len(self.head) :]

    def local(self, offset: int) -> int:
        """A code-point offset of the document (`whole`) as an offset into `text`."""
        return offset - self.base + len(self.head)

    @property
    def head_rows(self) -> int:
        """Rows [0, head_rows) hold the context (and BOS); the document's start at head_rows."""
        return self.token_at(len(self.head)) if self.head else 0

    @property
    def ids(self) -> list[int]:
        return self._ids

    @ids.setter
    def ids(self, ids: list[int]) -> None:
        self._ids, self._array = ids, None

    @property
    def array(self) -> np.ndarray:
        """The ids as an int64 array (for n-gram search), made once per version of the text."""
        if self._array is None:
            self._array = np.asarray(self._ids, dtype=np.int64)
        return self._array

    @property
    def stale_count(self) -> int:
        """Rows whose K/V is not what a full encode would give (stale, missing or shifted)."""
        return len(self.stale) - self.stale.count(FRESH)

    @property
    def edited_count(self) -> int:
        """Rows that edits left stale or missing (what makes a refresh due; shifted rows do not)."""
        return self.stale.count(STALE) + self.stale.count(MISSING)

    @property
    def missing_count(self) -> int:
        return self.stale.count(MISSING)

    @property
    def first_stale(self) -> int:
        marks = np.frombuffer(self.stale, dtype=np.uint8)
        i = int(np.argmax(marks != FRESH)) if len(marks) else 0
        return i if len(marks) and marks[i] != FRESH else len(self.ids)

    def missing_before(self, end: int) -> list[int]:
        """The missing rows below `end`, in order."""
        marks = np.frombuffer(self.stale, dtype=np.uint8)[:end]
        return np.flatnonzero(marks == MISSING).tolist()

    def splice_stale(self, h: Hunk, *, mark: int = STALE) -> None:
        """Mirror one hunk in the stale mask (indices already in the new layout above the hunk): its
        new rows are missing until encoded, and the rows after it turn `mark`: STALE after an edit of
        the text (shifted rows too), SHIFTED after a new context (fresh rows only)."""
        m, cut = h.new_end - h.new_start, h.new_start + (h.old_end - h.old_start)
        suffix = self.stale[cut:].replace(bytes([FRESH]), bytes([mark]))
        if mark == STALE:
            suffix = suffix.replace(bytes([SHIFTED]), bytes([STALE]))
        self.stale = self.stale[: h.new_start] + bytearray([MISSING]) * m + suffix

    def token_at(self, offset: int) -> int:
        """Index of the first token that ends after `offset` (tokens before it lie wholly before)."""
        lo, hi = 0, len(self.offsets)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.offsets[mid][1] <= offset:
                lo = mid + 1
            else:
                hi = mid
        return lo
