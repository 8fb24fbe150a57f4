"""Prompt lookup: find the latest earlier occurrence of the last few tokens and propose what followed.

Code repeats itself (names, call patterns, the line just edited), so the continuation of an earlier
match is often right. The corpus is the document's own ids (most relevant first) and other open
documents; a search is a vectorised compare over int32 arrays, so nothing is rebuilt per request.
"""

from __future__ import annotations

import numpy as np


def find_continuation(corpus: np.ndarray, tail: np.ndarray, k: int, *, end: int | None = None) -> list[int]:
    """The k tokens after the latest occurrence of `tail` in corpus[:end] (not overlapping its end)."""
    n, end = len(tail), len(corpus) if end is None else end
    if n == 0 or end - n < 1:
        return []
    hits = np.ones(end - n, dtype=bool)  # candidate starts 0 .. end-n-1 (a continuation must exist)
    for j in range(n):
        hits &= corpus[j : j + end - n] == tail[j]
    idx = np.flatnonzero(hits)
    if len(idx) == 0:
        return []
    start = int(idx[-1]) + n
    return corpus[start : min(start + k, end)].tolist()


class PromptLookup:
    """Proposer: the longest suffix (max_n .. min_n tokens) of the context found in the corpus."""

    def __init__(self, *, max_n: int = 4, min_n: int = 2):
        self.max_n, self.min_n = max_n, min_n
        self.others: list[np.ndarray] = []

    def propose(self, context: np.ndarray, k: int) -> list[int]:
        """context: the ids so far (document prefix + generated), int32 [N]."""
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            found = find_continuation(context, tail, k, end=len(context) - 1)
            if not found:
                for other in self.others:
                    found = find_continuation(other, tail, k)
                    if found:
                        break
            if found:
                return found
        return []
