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

from ghostline.engine.cache import ScratchCache
from ghostline.engine.model import greedy_ids


@dataclass
class SpecStats:
    steps: int = 0  # verify steps (forwards)
    proposed: int = 0
    accepted: int = 0
    history: list[int] = field(default_factory=list)  # accepted per step
    halted: bool = False
    layer: int | None = None  # self-speculation: the exit layer proposing when the decode ended

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


class MatchGoodput:
    """Draft length from the kind of prompt-lookup match behind the draft, by SmartSpec's goodput
    (arXiv 2406.14066): keep the k draft tokens that maximise expected emitted tokens per unit of
    verify cost, (1 + sum_i<k P(first i + 1 accepted)) / cost[k], k = 0 when nothing pays.

    `cost[k]`: a verify step of 1 + k tokens against a decode step. On a CPU extra rows are not free
    (their int8 products, attention and head rows); the default was measured on a 2-core AMD EPYC at a
    3,194-token context with the one-call C step (bench/RESULTS.md). The odds depend on the match:
    a long suffix match (>= `long_match` tokens) whose every earlier occurrence went on the same way
    is a copy (first token right 80-92 % of the time on the requests tasks, later ones more often),
    anything else a guess (30-56 %). Per kind and draft position, acceptance is a decayed running
    count started from those priors (`weight` pseudo-tries each): it follows the request without
    giving up on a kind after two misses."""

    COST = (1.0, 1.23, 1.53, 1.83, 2.26, 2.72, 3.1, 3.47, 4.14)  # [k] a verify step of 1 + k tokens

    def __init__(self, *, cost: tuple[float, ...] = COST, long_match: int = 5,
                 priors: tuple[float, float] = (0.45, 0.92), weight: float = 8.0, decay: float = 0.9):
        self.cost, self.long_match, self.decay = np.asarray(cost), long_match, decay
        self.k = self.k_max = len(cost) - 1  # the longest draft it asks for
        self.hits = np.array([np.full(self.k, p * weight) for p in priors])  # [kind, k] (`weight` pseudo-tries)
        self.tries = np.full((len(priors), self.k), float(weight))
        self.kind = 0  # 0: guess, 1: copy

    def keep(self, match) -> int:
        """How many tokens of a draft backed by `match` (engine.ngram.Match, or None) to verify."""
        self.kind = int(match is not None and match.n >= self.long_match and match.agree)
        held = np.cumprod(self.hits[self.kind] / self.tries[self.kind])  # [k] P(first i + 1 accepted)
        return int(((1 + np.concatenate([[0.0], np.cumsum(held)])) / self.cost).argmax())

    def update(self, proposed: int, accepted: int) -> None:
        reached = min(proposed, accepted + 1)
        if reached == 0:
            return
        h, t = self.hits[self.kind], self.tries[self.kind]
        h[:reached] *= self.decay
        t[:reached] *= self.decay
        t[:reached] += 1
        h[: min(accepted, reached)] += 1


DRAFT_RULES = {"draft-verify": DraftLength, "rejection": RejectionRule, "match": MatchGoodput}


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


class ForwardVerifier:
    """The verify step as one forward of the model on the scratch cache (any draft length)."""

    verify_tokens = None  # the most tokens one verify step takes (None: any)

    def __init__(self, model):
        self.model = model

    def verify(self, cache: ScratchCache, tokens: list[int], pos: int, *,
               logits: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """The greedy choice after each of `tokens` (fed at positions pos..), and with `logits` their
        full-vocabulary rows [T, V]."""
        h = self.model(torch.tensor([tokens]), torch.arange(pos, pos + len(tokens)), cache, return_hidden=True)[0]  # [T, D]
        if not logits:
            return greedy_ids(self.model, h).tolist(), None
        rows = self.model.head(h)  # [T, V]
        return rows.argmax(-1).tolist(), rows


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
    length: DraftLength | RejectionRule | MatchGoodput | None = None,
    halt=None,
    verifier=None,
) -> Iterator[int]:
    """Yield the same tokens as `greedy(model, cache, first, ...)`; `context` is the ids before
    `first` (what the proposer may search). `verifier` runs the verify steps (by default one forward
    of `model`; `engine.cuda.CudaRunner` has static ones). Stop by closing the generator."""
    verifier = verifier or ForwardVerifier(model)
    cap = verifier.verify_tokens  # None, or drafts of at most cap - 1 tokens
    stats = stats if stats is not None else SpecStats()
    length = length or (DraftLength() if cap is None else DraftLength(k_max=cap - 1))
    seq = np.asarray(list(context) + [first], dtype=np.int64)  # the proposer's view, grown as we go
    tok, pos, produced = first, cache.start, 0
    while produced < max_new:
        masked = produced == 0 and first_mask is not None  # token healing constrains the first token
        k = min(length.k, max_new - produced - 1, max_new if cap is None else cap - 1)
        draft = list(proposer.propose(seq, k))[:k] if k > 0 and not masked else []
        if draft and hasattr(length, "keep"):  # a rule that judges each draft by its match
            draft = draft[: length.keep(getattr(proposer, "match", None))]
        choice, logits = verifier.verify(cache, [tok] + draft, pos, logits=halt is not None or masked)
        if masked:
            logits[0] = logits[0].masked_fill(~first_mask.to(logits.device), float("-inf"))
            choice[0] = int(logits[0].argmax())
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
            p_exit, y = self.exits.judge(c, x[0, -1])
            if float(p_exit) < self.confident:
                break
            tok = int(greedy_ids(model, y))
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

    @property
    def match(self):
        """The prompt-lookup match behind the latest draft, when a lookup proposed it."""
        return getattr(self.last, "match", None)

    def observe(self, proposed: int, accepted: int) -> None:
        if self.last is not None and hasattr(self.last, "observe"):
            self.last.observe(proposed, accepted)
