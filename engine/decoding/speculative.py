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
- *halt* (optional, engine.exits): a rule on one full-depth logits row; the first emitted token whose
  row it flags is not emitted and the decode ends there, exactly where halting greedy would end.
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
    halted: bool = False

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


class RejectionRule:
    """Draft length from the probability that the draft still holds (SpecDec++, arXiv 2405.19715):
    draft token i while P(tokens 1..i all accepted) >= `threshold`. SpecDec++ predicts each token's
    acceptance with a head on the draft model's states; a prompt-lookup draft has none, so the
    prediction here is the running acceptance rate at each draft position given the ones before it
    were accepted (counts with a prior of `prior` acceptance, decayed so it follows the request)."""

    def __init__(self, *, threshold: float = 0.35, k_max: int = 12, prior: float = 0.75, decay: float = 0.9):
        self.threshold, self.k_max, self.decay = threshold, k_max, decay
        self.hits = np.full(k_max, prior * 2)  # [k_max] accepted given reached (2 pseudo-tries each)
        self.tries = np.full(k_max, 2.0)

    @property
    def k(self) -> int:
        held = np.cumprod(self.hits / self.tries)  # [k_max] P(the first i + 1 draft tokens accepted)
        return max(1, int((held >= self.threshold).sum()))

    def update(self, proposed: int, accepted: int) -> None:
        reached = min(proposed, accepted + 1)  # positions the verify step judged: accepted ones + the first miss
        if reached == 0:
            return
        self.hits[:reached] *= self.decay
        self.tries[:reached] *= self.decay
        self.tries[:reached] += 1
        self.hits[: min(accepted, reached)] += 1


DRAFT_RULES = {"draft-verify": DraftLength, "rejection": RejectionRule}


def accept(draft: list[int], choice: list[int], *, stats: SpecStats, length) -> list[int]:
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
    length: DraftLength | RejectionRule | None = None,
    halt=None,
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
        if hasattr(proposer, "observe"):  # a proposer that picks its own depth learns the acceptance
            proposer.observe(len(draft), n)
        if halt is not None:
            flagged = halt(logits[: n + 1])  # [n + 1] bool: the rows that gave the emitted tokens
            if bool(flagged.any()):
                cut = int(flagged.nonzero()[0])
                cache.trim(pos - cache.start + cut)
                yield from new[:cut]
                stats.halted = True
                return
        cache.trim(pos - cache.start + 1 + n)  # keep rows of tok + accepted draft; roll back the rest
        pos += 1 + n
        seq = np.concatenate([seq, np.asarray(new, dtype=np.int64)])
        for t in new:
            produced += 1
            yield t
            if produced >= max_new:
                return
        tok = new[-1]


class EarlyLayers:
    """Proposer (self-speculation): the first l layers of the model and the exit head at l draft
    tokens one by one, stopping at the first one the controller is not sure of (P(exit) below
    `confident`). It writes rows of layers < l at the draft positions of the scratch cache; the
    verify step then overwrites those positions in every layer, so nothing of it stays visible.

    The layer is chosen by DEL's tokens-per-layer rule (arXiv 2504.05598) with SmartSpec's goodput
    view (arXiv 2406.14066): per candidate layer, expected tokens per verify step from the running
    acceptance over the cost of drafting and verifying, in layer units (the head's cost measured);
    if no layer beats plain decoding, `layer` is None and the proposer proposes nothing.
    """

    def __init__(self, model, cache: ScratchCache, exits, *, confident: float = 0.5, head_cost: float = 2.0,
                 verify_cost: float = 0.1):
        self.model, self.cache, self.exits, self.confident = model, cache, exits, confident
        self.head_cost, self.verify_cost = head_cost, verify_cost  # in layers; verify: per extra token
        agree = (exits.meta or {}).get("per_layer", {})
        self.alpha = {c: float(agree.get(str(l), {}).get("tuned_agree", 0.5)) for c, l in enumerate(exits.layers)}
        self.seen = {c: 0 for c in self.alpha}
        self.layer = self.choose()

    def goodput(self, c: int, k: int) -> float:
        """Expected tokens per layer-unit of cost with k drafts from candidate c (plain: 1 / (L + h))."""
        a, L, h = self.alpha[c], self.model.args.n_layers, self.head_cost
        tokens = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        return tokens / (k * (self.exits.layers[c] + h) + L + h + k * self.verify_cost * L)

    def choose(self) -> int | None:
        plain = 1 / (self.model.args.n_layers + self.head_cost)
        best = max(((self.goodput(c, k), c) for c in self.alpha for k in range(1, 9)), default=(0.0, None))
        return best[1] if best[0] > 1.05 * plain else None

    def observe(self, proposed: int, accepted: int) -> None:
        """Running acceptance of the current layer (a decayed mean), then the layer choice again."""
        if self.layer is None or proposed == 0:
            return
        c = self.layer
        rate = accepted / proposed
        self.seen[c] += 1
        w = max(0.1, 1 / self.seen[c])
        self.alpha[c] = (1 - w) * self.alpha[c] + w * min(rate, 0.99)
        self.layer = self.choose()

    @torch.no_grad()
    def propose(self, context: np.ndarray, k: int) -> list[int]:
        if self.layer is None or k <= 0:
            return []
        c, model = self.layer, self.model
        tok, pos, out = int(context[-1]), self.cache.start + self.cache.length, []
        for j in range(k):
            p = torch.tensor([pos + j])
            x = model(torch.tensor([[tok]]), p, self.cache, exit_layer=self.exits.layers[c], return_hidden=True)
            if float(self.exits.p_exit(c, x[0, -1])) < self.confident:
                break
            tok = int(model.head(self.exits.lens(c, x))[0, -1].argmax())
            out.append(tok)
        return out


class Chain:
    """Proposer: the first of `proposers` that proposes anything (prompt lookup, then early layers)."""

    def __init__(self, *proposers):
        self.proposers, self.last = proposers, None

    def propose(self, context: np.ndarray, k: int) -> list[int]:
        self.last = None
        for p in self.proposers:
            if draft := p.propose(context, k):
                self.last = p
                return draft
        return []

    def observe(self, proposed: int, accepted: int) -> None:
        if self.last is not None and hasattr(self.last, "observe"):
            self.last.observe(proposed, accepted)
