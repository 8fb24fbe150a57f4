"""N-grams over the open documents: prompt lookup (speculative decoding) and count tables
(superposed decoding).

Prompt lookup: find the latest earlier occurrence of the longest suffix of the context and propose
what followed. Code repeats itself (names, call patterns, the line just edited), so the
continuation of an earlier match is often right. The corpus is the document's own ids and the other
open documents of its scope (`scope_of`: one daemon client's); a search is one vectorised compare
over the ids, so nothing is rebuilt per request.

Count tables (`NgramIndex`): per document, counts of its n-grams of orders 2..6 keyed by a rolling
hash, kept current under edits by recounting only the changed span, giving the interpolated
p_ngram(token | last n-1 tokens) that superposed decoding mixes into its draft scores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


@dataclass
class Match:
    """The longest suffix of the context found earlier: its length in tokens, how many times it
    occurs, and whether every occurrence was followed by the same token (a copy, not a fork)."""

    n: int
    count: int
    agree: bool


def longest_match(corpus: np.ndarray, tail: np.ndarray, *, end: int, max_n: int) -> tuple[Match, int] | None:
    """The longest suffix (<= max_n tokens) of `tail` that ends at some i < end - 1 of corpus (so a
    continuation exists in corpus[:end]); returns the match and i of its latest occurrence. One
    vectorised compare over the corpus for the last token, then only the candidates are extended."""
    if len(tail) == 0 or end < 2:
        return None
    cand = np.flatnonzero(corpus[: end - 1] == tail[-1])  # [C] end positions of 1-token matches
    if len(cand) == 0:
        return None
    n = 1
    while n < min(max_n, len(tail)):
        prev = cand - n
        keep = prev >= 0
        longer = cand[keep][corpus[prev[keep]] == tail[-1 - n]]
        if len(longer) == 0:
            break
        cand, n = longer, n + 1
    nxt = corpus[cand + 1]
    return Match(n, len(cand), bool((nxt == nxt[-1]).all())), int(cand[-1])


class PromptLookup:
    """Proposer: what followed the latest occurrence of the longest suffix (max_n .. min_n tokens)
    of the context, in the context itself or another open document (the longer match; the
    context on a tie). `match` is the match behind the latest draft (None when there was none),
    for the draft-length rule."""

    def __init__(self, *, max_n: int = 16, min_n: int = 1):
        self.max_n, self.min_n = max_n, min_n
        self.others: list[np.ndarray] = []
        self.match: Match | None = None

    def propose(self, context: np.ndarray, k: int) -> list[int]:
        """context: the ids so far (document prefix + generated), int [N]."""
        self.match = None
        if k <= 0 or len(context) < 2:
            return []
        tail, best = context[-self.max_n :], None
        for corpus, end in [(context, len(context) - 1)] + [(o, len(o)) for o in self.others]:
            found = longest_match(corpus, tail, end=end, max_n=self.max_n)
            if found is not None and found[0].n >= self.min_n and (best is None or found[0].n > best[0].n):
                best = (*found, corpus, end)
        if best is None:
            return []
        self.match, i, corpus, end = best
        return corpus[i + 1 : min(i + 1 + k, end)].tolist()


# n-gram tables for superposed decoding ---------------------------------------------------------

ORDERS = (2, 3, 4, 5, 6)
REFERENCE_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)  # orders 2..6, from the Superposed Decoding code
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the rolling hash
_MASK = (1 << 64) - 1


def gram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of ids [N] -> uint64 [N-n+1] (wrapping polynomial hash of ids + 1)."""
    m = len(ids) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(1)
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * _P + x[j : j + m]
    return h


def hash_of(ids) -> int:
    """The same hash for one short sequence, in Python ints."""
    h, p = 0, int(_P)
    for t in ids:
        h = (h * p + int(t) + 1) & _MASK
    return h


def extend_hash(h: int, tok: int) -> int:
    return (h * int(_P) + tok + 1) & _MASK


class NgramTable:
    """One document's n-gram counts, orders 2..6. For order n, `grams[n]` counts hash(n-gram) and
    `ctx[n]` counts hash(its first n-1 tokens), so p_n(t | c) = grams[n][c + t] / ctx[n][c]."""

    def __init__(self, ids: np.ndarray | None = None):
        self.grams: dict[int, dict[int, int]] = {n: {} for n in ORDERS}
        self.ctx: dict[int, dict[int, int]] = {n: {} for n in ORDERS}
        if ids is not None:
            self.count(ids, +1)

    @property
    def entries(self) -> int:
        return sum(len(d) for d in self.grams.values()) + sum(len(d) for d in self.ctx.values())

    def count(self, ids: np.ndarray, sign: int) -> None:
        """Add (sign=+1) or remove (-1) every n-gram lying wholly inside ids."""
        for n in ORDERS:
            m = len(ids) - n + 1
            if m <= 0:
                continue
            _bump(self.grams[n], gram_hashes(ids, n), sign)
            _bump(self.ctx[n], gram_hashes(ids[: len(ids) - 1], n - 1), sign)


def _bump(table: dict[int, int], hashes: np.ndarray, sign: int) -> None:
    keys, counts = np.unique(hashes, return_counts=True)
    for key, c in zip(keys.tolist(), counts.tolist()):
        v = table.get(key, 0) + sign * c
        if v > 0:
            table[key] = v
        else:
            table.pop(key, None)


class _Entry:
    def __init__(self, ids: np.ndarray):
        self.ids, self.table, self.last_used = ids, None, 0


class NgramIndex:
    """p_ngram over the open documents of one language, for superposed decoding.

    Each document has its own `NgramTable`, built on first use and then kept current: an edit
    removes the n-grams of the old changed span widened by 5 tokens each side (every n-gram that
    touches it) and adds those of the new one. Tables of the least recently used documents are
    dropped past `max_entries` (~100 bytes each) and rebuilt if that document is queried again.

    p_ngram(t | tail) = sum_n w_n * count(c_n + t) / count(c_n) over the orders whose context c_n
    (the last n-1 ids of tail) occurs in some document; w are the reference weights normalised to
    sum 1, so p_ngram is at most 1 and lower where only short contexts are known.
    """

    def __init__(self, *, weights=REFERENCE_WEIGHTS, max_entries: int = 1_000_000):
        total = sum(weights)
        self.weights = [w / total for w in weights]
        self.max_entries = max_entries
        self.docs: dict[str, _Entry] = {}
        self._clock = 0

    def open(self, uri: str, ids) -> None:
        self.docs[uri] = _Entry(np.asarray(ids, dtype=np.int64))

    def close(self, uri: str) -> None:
        self.docs.pop(uri, None)

    def update(self, uri: str, ids) -> None:
        """The document's ids are now `ids`: update its counts for the changed span only."""
        e = self.docs.get(uri)
        new = np.asarray(ids, dtype=np.int64)
        if e is None:
            return self.open(uri, new)
        old, e.ids = e.ids, new
        if e.table is None:
            return
        p, s = _common_ends(old, new)
        if p == len(old) == len(new):
            return
        w = ORDERS[-1] - 1
        e.table.count(old[max(0, p - w) : len(old) - s + w], -1)
        e.table.count(new[max(0, p - w) : len(new) - s + w], +1)

    @contextmanager
    def without(self, uri: str, start: int, end: int):
        """Leave out the n-grams touching ids[start:end) of `uri` for the duration (the text a draft
        is about to replace is no evidence for it)."""
        e = self.docs.get(uri)
        table = self._table(uri) if e is not None and end > start else None
        if table is None:
            yield
            return
        w = ORDERS[-1] - 1
        a, b = max(0, start - w), min(len(e.ids), end + w)
        parts = (e.ids[a:b], e.ids[a:start], e.ids[end:b])
        for ids, sign in zip(parts, (-1, +1, +1)):
            table.count(ids, sign)
        try:
            yield
        finally:
            for ids, sign in zip(parts, (+1, -1, -1)):
                table.count(ids, sign)

    def prob(self, tails: list, cands: list[int], *, uri: str | None = None) -> np.ndarray:
        """p_ngram(cand | tail) for each tail (the last ids of a draft) -> float64 [len(tails), len(cands)].
        With `uri`, only documents of its language count (and its table is built if missing)."""
        tables = self._tables(uri)
        out = np.zeros((len(tails), len(cands)))
        for b, tail in enumerate(tails):
            for n, w in zip(ORDERS, self.weights):
                if len(tail) < n - 1:
                    continue
                h = hash_of(tail[len(tail) - n + 1 :])
                total = sum(t.ctx[n].get(h, 0) for t in tables)
                if total == 0:
                    continue
                for c, tok in enumerate(cands):
                    g = extend_hash(h, int(tok))
                    out[b, c] += w * sum(t.grams[n].get(g, 0) for t in tables) / total
        return out

    @property
    def entries(self) -> int:
        return sum(e.table.entries for e in self.docs.values() if e.table is not None)

    def _table(self, uri: str) -> NgramTable:
        e = self.docs[uri]
        self._clock += 1
        e.last_used = self._clock
        if e.table is None:
            e.table = NgramTable(e.ids)
            self._evict(keep=e)
        return e.table

    def _tables(self, uri: str | None) -> list[NgramTable]:
        lang = _language(uri) if uri is not None else None
        scope = scope_of(uri) if uri is not None else None
        uris = [u for u in self.docs if lang is None or (_language(u) == lang and scope_of(u) == scope)]
        if uri in self.docs:  # the querying document first: it is the one kept past the bound
            uris.remove(uri)
            uris.append(uri)
        return [self._table(u) for u in uris]

    def _evict(self, *, keep: _Entry) -> None:
        total = self.entries
        for e in sorted(self.docs.values(), key=lambda e: e.last_used):
            if total <= self.max_entries:
                break
            if e is keep or e.table is None:
                continue
            total -= e.table.entries
            e.table = None


def _common_ends(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Lengths of the common prefix and (non-overlapping) common suffix of two id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    p = int(diff[0]) if len(diff) else n
    m = n - p
    diff = np.flatnonzero(a[len(a) - m :][::-1] != b[len(b) - m :][::-1]) if m else np.zeros(0)
    s = int(diff[0]) if len(diff) else m
    return p, s


def scope_of(uri: str) -> str:
    """A document named "scope|uri" (the engine daemon names each client's documents so) draws
    evidence (n-grams, prompt lookup, the code head's extra rows) only from documents of the same
    scope: one client's text never steers another's; "" for a plain uri."""
    return uri.split("|", 1)[0] if "|" in uri else ""


def _language(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""
