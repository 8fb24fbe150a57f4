"""Speculative decoding, lossless against greedy.

Terms, as used below:
- *proposer*: anything with `propose(context, k) -> list[int]`; it only proposes (n-gram lookup,
  the model's early layers, ...). It never sees logits.
- *draft*: the up to k tokens a proposer guesses will follow the current token.
- *verify step*: one forward of `[current token] + draft` on the scratch cache. The logits at
  position i are the model's greedy choice after the first i draft tokens.
- *accepted*: the longest draft prefix equal to those greedy choices.
- *bonus token*: the greedy choice right after the accepted prefix; always correct, so a verify step
  emits accepted + 1 tokens and never fewer than plain greedy.
- *rollback*: scratch rows written for rejected draft tokens are trimmed before the next step.
The verifier only verifies: its output equals `greedy` token for token whatever the proposer says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.cache import ScratchCache


@dataclass
class SpecStats:
    steps: int = 0  # verify steps (forwards)
    proposed: int = 0
    accepted: int = 0
    history: list[int] = field(default_factory=list)  # accepted per step

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0


class DraftLength:
    """Draft length adapted to the running acceptance (Draft&Verify-style): grow after a fully
    accepted draft, shrink to what was accepted (+1) after a rejection."""

    def __init__(self, *, start: int = 4, k_min: int = 1, k_max: int = 12):
        self.k, self.k_min, self.k_max = start, k_min, k_max

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(self.k_min, accepted + 1)


def accept(draft: list[int], choice: list[int], *, stats: SpecStats, length: DraftLength) -> list[int]:
    """The verifier's rule: the accepted draft prefix plus the bonus token; records the step."""
    n = 0
    while n < len(draft) and draft[n] == choice[n]:
        n += 1
    stats.steps += 1
    stats.proposed += len(draft)
    stats.accepted += n
    stats.history.append(n)
    length.update(len(draft), n)
    return draft[:n] + [choice[n]]


@torch.no_grad()
def speculative(
    model,
    cache: ScratchCache,
    first: int,
    *,
    context: list[int],
    proposer,
    max_new: int,
    first_mask: torch.Tensor | None = None,
    stats: SpecStats | None = None,
    length: DraftLength | None = None,
) -> Iterator[int]:
    """Yield the same tokens as `greedy(model, cache, first, ...)`; `context` is the ids before
    `first` (what the proposer may search). Stop by closing the generator."""
    stats = stats if stats is not None else SpecStats()
    length = length or DraftLength()
    seq = np.asarray(list(context) + [first], dtype=np.int64)  # the proposer's view, grown as we go
    tok, pos, produced = first, cache.start, 0
    while produced < max_new:
        k = min(length.k, max_new - produced - 1)
        draft = proposer.propose(seq, k) if k > 0 and not (produced == 0 and first_mask is not None) else []
        inp = torch.tensor([[tok] + draft])
        logits = model(inp, torch.arange(pos, pos + len(draft) + 1), cache)[0]  # [1+k, V]
        if produced == 0 and first_mask is not None:
            logits[0] = logits[0].masked_fill(~first_mask, float("-inf"))
        choice = logits.argmax(-1).tolist()
        new = accept(draft, choice, stats=stats, length=length)
        n = len(new) - 1
        cache.trim(pos - cache.start + 1 + n)  # keep rows of tok + accepted draft; roll back the rest
        pos += 1 + n
        seq = np.concatenate([seq, np.asarray(new, dtype=np.int64)])
        for t in new:
            produced += 1
            yield t
            if produced >= max_new:
                return
        tok = new[-1]
