"""KV caches. One small contract for all of them: `update` (called by the forward), `trim`, `nbytes`.

`KVCache` holds one document: k/v [L, KV, capacity, hd], position = index, keys stored rotated,
capacity grown in chunks. `ScratchCache` holds generated tokens: it attends to a prefix view of a
`KVCache` (never a copy) plus its own rows, and is rolled back by `trim`. `Framed` puts a few rows
encoded apart (fill-in-the-middle's [BOS] `<PRE>`) before a document's prefix view and rows encoded
over both (`<SUF>` and the text after the cursor) after it.
"""

from __future__ import annotations

import torch

from ghostline.kernels.rope_shift import rope_shift

Segment = tuple[torch.Tensor, torch.Tensor, int]  # K, V [B|1, KV, S, hd], position of row 0


class KVCache:
    def __init__(self, n_layers: int, n_kv: int, head_dim: int, *, dtype=torch.float32, device="cpu", chunk=512):
        self.shape = (n_layers, n_kv, head_dim)
        self.dtype, self.device, self.chunk = dtype, device, chunk
        self.k = torch.zeros(n_layers, n_kv, 0, head_dim, dtype=dtype, device=device)  # [L, KV, cap, hd]
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reserve_bytes(self, n: int) -> int:
        """What `reserve(n)` allocates: 0 when n rows fit, else its new storage (held beside the old
        one while the rows are copied)."""
        if n <= self.capacity:
            return 0
        L, KV, hd = self.shape
        return 2 * L * KV * self._grown(n) * hd * self.k.element_size()

    def _grown(self, n: int) -> int:
        return -(-(n + n // 8) // self.chunk) * self.chunk

    def reserve(self, n: int) -> None:
        """Make room for n rows (rows past `length` are undefined). Grown in whole chunks with an
        eighth to spare, so that a long document's edits seldom copy the whole cache."""
        if n <= self.capacity:
            return
        cap = self._grown(n)
        L, KV, hd = self.shape
        k = torch.empty(L, KV, cap, hd, dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def trim(self, n: int) -> None:
        """Keep the first n rows."""
        self.length = min(self.length, max(0, n))

    def release(self) -> None:
        """Drop the storage (eviction); the owner re-encodes on demand."""
        self.k = self.k[:, :, :0].clone()
        self.v = self.v[:, :, :0].clone()
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
        """Write new rows k/v [1, KV, T, hd] at rows pos [T] (increasing; the rows of several hunks
        when they are not consecutive); return the visible segment [0, pos[-1]]."""
        start, end = int(pos[0]), int(pos[-1]) + 1
        if end - start == k.shape[2]:
            self.k[layer, :, start:end] = k[0]
            self.v[layer, :, start:end] = v[0]
        else:
            self.k[layer].index_copy_(1, pos.to(self.device), k[0])
            self.v[layer].index_copy_(1, pos.to(self.device), v[0])
        return self.segments(layer, end)

    def segments(self, layer: int, end: int) -> list[Segment]:
        """What a token after rows [0, end) attends to in `layer`: those rows, at positions 0.."""
        return [(self.k[layer, :, :end][None], self.v[layer, :, :end][None], 0)]

    def splice(self, start: int, end: int, m: int, *, inv_freq: torch.Tensor | None) -> None:
        """Replace rows [start, end) by m undefined rows: the suffix moves by delta = m - (end - start)
        and, given the per-layer RoPE frequencies, its keys are rotated by delta (PIE). Without
        frequencies the suffix moves unrotated (the naive baseline)."""
        delta = m - (end - start)
        old_len = self.length
        self.reserve(old_len + delta)
        if delta != 0 and end < old_len:
            if inv_freq is None:
                self.k[:, :, end + delta : old_len + delta] = self.k[:, :, end:old_len].clone()
                self.v[:, :, end + delta : old_len + delta] = self.v[:, :, end:old_len].clone()
            else:
                rope_shift(self.k, self.v, end, old_len, end + delta, inv_freq)
        self.length = old_len + delta

    def clone(self) -> "KVCache":
        c = KVCache(*self.shape, dtype=self.dtype, device=self.device, chunk=self.chunk)
        c.reserve(self.length)
        c.k[:, :, : self.length], c.v[:, :, : self.length] = self.state
        c.length = self.length
        return c


class Holes:
    """A document cache seen without some of its rows: the rows of a deferred edit a request skips
    to keep its encode within budget (their K/V is missing). A forward over it writes into the cache
    and attends to the runs of rows between the holes, each at its own positions."""

    one_plane = False  # several key segments: not for a step that reads one prefix plane
    MAX_GAPS = 3  # the rows read stay in at most 4 runs (the C step reads 6 segments, scratch rows included)

    def __init__(self, cache: KVCache, holes: list[int]):
        self.cache, self.shape, self.dtype, self.device = cache, cache.shape, cache.dtype, cache.device
        gaps: list[list[int]] = []  # [start, end) runs of holes, in order
        for h in holes:
            if gaps and gaps[-1][1] == h:
                gaps[-1][1] = h + 1
            else:
                gaps.append([h, h + 1])
        # past MAX_GAPS, the gaps are joined across all but the longest runs of rows between them
        keep = sorted(sorted(range(1, len(gaps)), key=lambda i: gaps[i][0] - gaps[i - 1][1])[-(self.MAX_GAPS - 1):])
        self.gaps = [(gaps[i][0], gaps[j - 1][1]) for i, j in zip([0, *keep], [*keep, len(gaps)])] if gaps else []

    @property
    def length(self) -> int:
        return self.cache.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
        self.cache.update(layer, k, v, pos)
        return self.segments(layer, int(pos[-1]) + 1)

    def segments(self, layer: int, end: int) -> list[Segment]:
        k, v, out, row = self.cache.k[layer], self.cache.v[layer], [], 0
        for g0, g1 in self.gaps:
            if g0 >= end:
                break
            if g0 > row:
                out.append((k[:, row:g0][None], v[:, row:g0][None], row))
            row = g1
        if row < end:
            out.append((k[:, row:end][None], v[:, row:end][None], row))
        return out


class ScratchCache:
    """Rows for generated tokens [L, B, KV, cap, hd] at positions start.., over prefix rows [0, start).

    `storage=(k, v)` reuses preallocated rows (at least `capacity` of them, kept whole so their
    address and shape stay fixed: the CUDA-graph runner in `engine.cuda` keeps one such pair)."""

    def __init__(self, prefix: KVCache, start: int, capacity: int, *, batch: int = 1,
                 storage: tuple[torch.Tensor, torch.Tensor] | None = None):
        L, KV, hd = prefix.shape
        self.prefix, self.start, self.length = prefix, start, 0
        if storage is None:
            self.k = torch.zeros(L, batch, KV, capacity, hd, dtype=prefix.dtype, device=prefix.device)
            self.v = torch.zeros_like(self.k)
        else:
            self.k, self.v = storage
            if self.k.shape[:3] != (L, batch, KV) or self.k.shape[4] != hd or self.k.shape[3] < capacity:
                raise ValueError(f"scratch storage {tuple(self.k.shape)} cannot hold {capacity} rows of {(L, batch, KV, hd)}")
            if self.v.shape != self.k.shape:
                raise ValueError("scratch storage k and v differ in shape")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def trim(self, n: int) -> None:
        self.length = min(self.length, max(0, n))

    def claim(self, pos: int, n: int) -> int:
        """Row i of n new tokens from position pos (their rows are [i, i + n)), counted as held."""
        i = pos - self.start
        end = i + n
        if i < 0 or end > self.k.shape[3]:
            raise IndexError(f"scratch area full ({self.k.shape[3]} rows)" if i >= 0 else f"position {pos} is in the prefix")
        self.length = max(self.length, end)
        return i

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
        i = self.claim(int(pos[0]), k.shape[2])
        end = i + k.shape[2]
        self.k[layer, :, :, i:end] = k
        self.v[layer, :, :, i:end] = v
        return self.prefix.segments(layer, self.start) + [(self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.start)]


class ForkCache:
    """B rows of look-ahead over a `ScratchCache`'s current state: they attend to its prefix view and
    its rows (shared, never copied) plus their own rows [L, B, KV, cap, hd] from `start` on. Used for
    AdaDec's rollouts; dropped after use, so the scratch itself is never touched."""

    def __init__(self, base: ScratchCache, capacity: int, *, batch: int):
        L, B0, KV, _, hd = base.k.shape
        if B0 != 1:
            raise ValueError("a fork needs a batch-1 scratch to fork from")
        self.base, self.start, self.length = base, base.start + base.length, 0
        self.k = torch.zeros(L, batch, KV, capacity, hd, dtype=base.k.dtype, device=base.k.device)
        self.v = torch.zeros_like(self.k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
        i = int(pos[0]) - self.start
        end = i + k.shape[2]
        if end > self.k.shape[3]:
            raise IndexError(f"fork area full ({self.k.shape[3]} rows)")
        self.k[layer, :, :, i:end] = k
        self.v[layer, :, :, i:end] = v
        self.length = max(self.length, end)
        b = self.base
        return b.prefix.segments(layer, b.start) + [(b.k[layer, :, :, : b.length], b.v[layer, :, :, : b.length], b.start),
                                                     (self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.start)]

    def adopt(self, row: int, i: int) -> None:
        """Append the fork's row `row`, entry i (position start + i), to the base scratch: a token the
        look-ahead already ran through the model is committed without running it again."""
        b = self.base
        if b.start + b.length != self.start + i:
            raise ValueError("the base scratch must end right before the adopted entry")
        b.k[:, 0, :, b.length] = self.k[:, row, :, i]
        b.v[:, 0, :, b.length] = self.v[:, row, :, i]
        b.length += 1


class Framed:
    """A document's cache seen after rows encoded apart: k/v [L, KV, C, hd] at positions
    start..start+C-1 (keys rotated there), then the document's rows from `skip` on at their own
    positions. With a tokenizer that adds BOS, the leading rows' row 0 is the BOS and the document's own
    (row 0) is skipped (`skip=1`), so a token attends to BOS, those rows, the document: the prompt a
    joint encode would see. Then a tail: the document's rows from `tail_at` on replaced by rows encoded
    over all of it (`write_tail`). Read-only otherwise: a ScratchCache's prefix."""

    one_plane = False  # rows before the document: not for a step that reads one prefix plane

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor, *, start: int, skip: int):
        self.cache, self.ck, self.cv, self.start, self.skip = cache, k, v, start, skip
        self.shape, self.dtype, self.device = cache.shape, cache.dtype, cache.device
        self.tail_at: int | None = None
        self.tk = self.tv = None  # [L, KV, R, hd] at positions tail_at..

    @property
    def k(self) -> torch.Tensor:
        return self.cache.k

    @property
    def v(self) -> torch.Tensor:
        return self.cache.v

    @property
    def length(self) -> int:
        return self.cache.length

    def segments(self, layer: int, end: int) -> list[Segment]:
        stop = end if self.tail_at is None else min(end, self.tail_at)
        out = [(self.ck[layer][None], self.cv[layer][None], self.start)]
        if stop > self.skip:
            out.append((self.k[layer, :, self.skip : stop][None], self.v[layer, :, self.skip : stop][None], self.skip))
        if self.tail_at is not None and end > self.tail_at:
            n = end - self.tail_at
            out.append((self.tk[layer, :, :n][None], self.tv[layer, :, :n][None], self.tail_at))
        return out

    def write_tail(self, at: int, n: int) -> "_Tail":
        """Make rows [at, at + n) the tail (to be written by a forward over `_Tail`)."""
        L, KV, hd = self.shape
        self.tail_at = at
        self.tk = torch.zeros(L, KV, n, hd, dtype=self.dtype, device=self.device)
        self.tv = torch.zeros_like(self.tk)
        return _Tail(self)


class _Tail:
    """The cache a forward of the tail's tokens writes: rows into the view's tail, attending to the
    leading rows, the document before the tail and the tail so far."""

    def __init__(self, view: Framed):
        self.view = view

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> list[Segment]:
        w = self.view
        i, end = int(pos[0]) - w.tail_at, int(pos[-1]) + 1
        w.tk[layer, :, i : i + k.shape[2]] = k[0]
        w.tv[layer, :, i : i + k.shape[2]] = v[0]
        return w.segments(layer, end)
