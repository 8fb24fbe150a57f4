"""Where text and token ids meet: encoding with character offsets, decoding, token healing tables."""

from __future__ import annotations

import bisect
import threading

import torch


class Tokenizer:
    def __init__(self, hf):
        if not getattr(hf, "is_fast", False):
            raise ValueError("Ghostline needs a fast (Rust) tokenizer for character offsets")
        self.hf = hf
        self.vocab_size = len(hf)
        self.bos_id = hf.bos_token_id
        probe = hf("a", add_special_tokens=True).input_ids
        self.adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
        for name in ("<end_of_turn>", "<|endoftext|>", "<|im_end|>", "<eos>"):
            tid = hf.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != hf.unk_token_id and tid >= 0:
                eos.add(tid)
        self.eos_ids = eos
        self._strings: list[str] | None = None
        self._sorted: tuple[list[str], torch.Tensor] | None = None
        self._lock = threading.Lock()

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text -> ids (with BOS when the model wants it) and each id's (start, end) code-point span."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
        if self.adds_bos:
            ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def reencode(self, old: str, ids: list[int], offsets: list[tuple[int, int]], new: str, *,
                 margin: int = 8) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(new)`, given `old`'s encoding: only the whole lines around where the texts differ
        (with `margin` unchanged tokens each side) are encoded again, the tokens before and after are
        kept (offsets after the change shifted), so a keystroke in a long file costs what its lines
        cost. Where the stretch encoded again does not reproduce the kept tokens at both of its ends
        (a token across its edge), all of `new` is encoded."""
        n_old, n_new = len(old), len(new)
        if min(n_old, n_new) < 4096:
            return self.encode(new)
        p = _common_prefix(old, new)
        q = _common_prefix(old[p:][::-1], new[p:][::-1])  # common suffix, not overlapping the prefix
        first = 1 if self.adds_bos else 0
        before = bisect.bisect_right(offsets, p, lo=first, key=_end)  # tokens [.., before) end before the change
        after = bisect.bisect_left(offsets, n_old - q, lo=first, key=_start)  # [after, ..) start after it
        i = max(first, before - margin)
        while i > first and old[offsets[i][0] - 1] != "\n":
            i -= 1
        j = min(len(ids), max(after, before) + margin)
        while j < len(ids) and old[offsets[j][0] - 1] != "\n":
            j += 1
        a = 0 if i == first else offsets[i][0]
        b = offsets[j][0] if j < len(ids) else n_old
        shift = n_new - n_old
        if not (a <= p and b >= n_old - q):
            return self.encode(new)
        enc = self.hf.backend_tokenizer.encode(new[a : b + shift], add_special_tokens=False)
        mid_ids, mid_offs = list(enc.ids), [(s + a, e + a) for s, e in enc.offsets]
        head, tail = max(0, before - i), max(0, j - max(after, before))  # kept tokens it must reproduce
        if (len(mid_ids) < head + tail or mid_ids[:head] != ids[i : i + head] or mid_offs[:head] != offsets[i : i + head]
                or mid_ids[len(mid_ids) - tail :] != ids[j - tail : j]
                or [(s - shift, e - shift) for s, e in mid_offs[len(mid_offs) - tail :]] != offsets[j - tail : j]):
            return self.encode(new)
        return (ids[:i] + mid_ids + ids[j:],
                offsets[:i] + mid_offs + [(s + shift, e + shift) for s, e in offsets[j:]])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def strings(self) -> list[str]:
        """Each token's text on its own, as `decode` of that token alone gives it (no special tokens
        skipped): computed once, by the Rust tokenizer in one batch (~0.9 s for Gemma's 262k
        vocabulary here; transformers' batch_decode took 2.2 s). `warm()` computes it ahead."""
        return self._tables()[0]

    def _tables(self) -> tuple[list[str], list[str], torch.Tensor]:
        """`strings`, the same sorted, and each sorted entry's token id (built once, under a lock)."""
        with self._lock:
            if self._strings is None:
                ids = [[i] for i in range(self.vocab_size)]
                strings = self.hf.backend_tokenizer.decode_batch(ids, skip_special_tokens=False)
                order = sorted(range(len(strings)), key=strings.__getitem__)
                self._sorted = ([strings[i] for i in order], torch.tensor(order, dtype=torch.long))
                self._strings = strings
            return self._strings, *self._sorted

    def warm(self) -> threading.Thread:
        """Compute `strings` on a background thread, so the first completion that heals a word (the
        first one typed mid-word) does not wait for it."""
        thread = threading.Thread(target=lambda: self.strings, name="ghostline-token-strings", daemon=True)
        thread.start()
        return thread

    def starting_with(self, prefix: str, size: int) -> torch.Tensor:
        """Bool mask [size] of tokens whose text starts with `prefix` (token healing): a contiguous
        run of the sorted strings, found by bisection (a scan of all 262k took 20-30 ms a request)."""
        _, keys, order = self._tables()
        lo = hi = bisect.bisect_left(keys, prefix)
        while hi < len(keys) and keys[hi].startswith(prefix):
            hi += 1
        mask = torch.zeros(size, dtype=torch.bool)
        mask[order[lo:hi]] = True
        mask[torch.tensor([i for i in self.eos_ids if i < size], dtype=torch.long)] = False
        return mask


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over C-speed slice comparisons."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _start(span: tuple[int, int]) -> int:
    return span[0]


def _end(span: tuple[int, int]) -> int:
    return span[1]
