"""Superposed decoding (Shen et al., 2024, arXiv 2405.18400): k drafts for the cost of about one.

Terms, as used below:
- *draft*: a candidate continuation: its generated ids and its *score*, the cumulative
  interpolated log-probability of those ids. Drafts are *alive* while they grow and *finished* once
  the caller's `finish(ids)` says a stop rule ended them (EOS, end of line, ...); finished drafts
  are kept, at most one per text, and compete with the alive ones for the k places.
- *superposed input*: the one input embedding of a step, `sum_i gamma_i E[last id of alive draft i]`
  with `gamma = softmax(alive scores)`. All drafts share one scratch cache: one sequence of
  superposed inputs, one forward per step, whatever k.
- *candidates*: the top `3k` ids of that one next-token distribution (temperature T).
- *score of draft i extended by candidate t*:
  `score_i + (1 - alpha) log p_LM(t) + alpha log p_ngram(t | draft i's last 5 ids)`.
  The n-gram term is what tells the drafts apart (p_LM is shared) and keeps each one coherent;
  p_ngram is floored at `floor` so a token unseen in the document is unlikely, not impossible.
- *step*: keep the best k alive (draft, candidate) pairs as the new alive drafts (distinct: each
  pair is a different sequence); the first step seeds k drafts from one empty draft. Scores only
  fall, so decoding ends once k finished drafts all beat the best alive one.

With k=1 and alpha=0 this is greedy decoding token for token (the test's reference). The defaults
are the reference's (alpha 0.54, T 0.06, n-gram weights for orders 2..6 in `engine.ngram`) until
`bench/tune_superposed.py` fits better ones on code.

Two additions, off by default (the paper's method is the default):
- *rerank*: the final drafts re-scored by their true log-probability, one batched forward. Every
  draft but the heaviest was scored on a mixed input, so superposed scores misorder them.
- *anchor*: draft 1 is the greedy draft, fed its own ids in row 0 of a batch-2 step (about the cost
  of batch 1: a decode step reads the weights once); the other k-1 drafts are superposed in row 1
  and may also branch off the greedy draft at any step (its non-argmax candidates join the pool).
  Top-1 is then greedy's, and the alternatives have a context of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ghostline.engine.cache import ScratchCache

Finish = Callable[[list[int]], "tuple[str, str] | None"]  # ids -> (shown text, stop reason) or None
NgramProb = Callable[[list[list[int]], list[int]], np.ndarray]  # tails, candidates -> p [tails, cands]


@dataclass
class SuperposedParams:
    alpha: float = 0.54  # weight of log p_ngram against log p_LM
    temperature: float = 0.06  # of p_LM (scores and gamma); the reference's, near greedy for draft 1
    floor: float = 1e-4  # p_ngram of a token the documents never show after this context
    ngram_scale: float = 1.0  # multiplies p_ngram before the floor (how much n-gram evidence counts)
    candidates: int = 3  # per draft: top candidates * k ids of the shared distribution
    rerank: bool = False  # re-score the final drafts by one batched forward (not in the paper)
    anchor: bool = False  # draft 1 is greedy, in its own row of a batch-2 step (not in the paper)


@dataclass
class Draft:
    ids: list[int]
    score: float
    text: str | None = None  # what the stop rules left, once finished
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.text is not None


@torch.no_grad()
def superposed(
    model,
    cache: ScratchCache,
    first: int,
    *,
    k: int,
    max_new: int,
    finish: Finish | None = None,
    context: Sequence[int] = (),
    ngram: NgramProb | None = None,
    params: SuperposedParams | None = None,
    first_mask: torch.Tensor | None = None,
    on_first: Callable[[torch.Tensor], None] | None = None,
    last: int | None = None,
) -> Iterator[list[Draft]]:
    """Yield, after each step, the best k drafts so far (finished and alive, best first). `first`
    is the last context token, fed at `cache.start`; `context` the ids before it (n-gram tails).
    The scratch has batch 1 (batch 2 with `params.anchor`). Stop by closing the generator; the
    last list yielded is the answer. `on_first(logits)` sees the first step's logits at the cursor
    (temperature 1, masked; the show gate reads them). `last`: the last id of the text before the
    drafts where that is not `first` (a fill-in-the-middle marker is fed first), for the n-gram tails."""
    p = params or SuperposedParams()
    rows = 2 if p.anchor else 1
    if cache.k.shape[1] != rows:
        raise ValueError(f"superposed decoding needs a scratch of batch {rows}, got {cache.k.shape[1]}")
    use_ngram = ngram is not None and p.alpha > 0
    head = list(context[-5:]) + [first if last is None else last]
    lead = Draft([], 0.0) if p.anchor else None  # anchor: the greedy draft, in row 0
    alive, done = ([] if p.anchor else [Draft([], 0.0)]), {}  # done: text -> best finished draft with it
    width = k - 1 if p.anchor else k  # superposed drafts
    dev = model.embed_tokens.weight.device
    x = model.embed(torch.full((rows, 1), first, device=dev))  # [rows, 1, D]
    pos = cache.start
    for step in range(max_new):
        hidden = model(None, torch.tensor([pos]), cache, embeds=x, return_hidden=True)[:, -1]  # [rows, D]
        logits, columns = model.head_columns(hidden)  # [rows, R]: a shortlist head's columns only
        logits = logits.float()
        pos += 1
        if step == 0 and first_mask is not None:
            allowed = first_mask.to(dev)
            logits = logits.masked_fill(~(allowed if columns is None else allowed[columns]), float("-inf"))
        if step == 0 and on_first is not None:
            on_first(logits[rows - 1])
        logp = torch.log_softmax(logits / p.temperature, dim=-1)
        vals, idx = logp.topk(min(p.candidates * k, logp.shape[-1]), dim=-1)  # [rows, C]
        vals, cands = vals.double().cpu(), (idx if columns is None else columns[idx]).tolist()
        growing = lead is not None and not lead.finished
        parents = ([lead] if growing else []) + alive
        prow = [0] * growing + [rows - 1] * len(alive)  # the row whose distribution each parent reads
        lm = torch.where(vals.isneginf(), vals, (1 - p.alpha) * vals)[prow]  # [A, C]; masked ids stay -inf
        scores = torch.tensor([d.score for d in parents], dtype=torch.float64)[:, None] + lm
        if use_ngram:
            tails, pn = [(head + d.ids)[-5:] for d in parents], np.zeros(tuple(scores.shape))  # [A, C]
            for r in sorted(set(prow)):
                sel = [i for i, q in enumerate(prow) if q == r]
                pn[sel] = ngram([tails[i] for i in sel], cands[r])
            scores = scores + p.alpha * torch.from_numpy(np.log(np.clip(p.ngram_scale * pn + p.floor, None, 1.0)))
        if growing:  # the lead takes the argmax; its other candidates are branches for the rest
            lead = Draft(lead.ids + [cands[0][0]], float(scores[0, 0]))
            end = finish(lead.ids) if finish is not None else None
            if end is not None:
                lead.text, lead.reason = end
            scores[0, 0] = -math.inf
        new = select(parents, [cands[r] for r in prow], scores, k=width, done=done, finish=finish) if width else []
        alive = [d for _, d in new]
        final = (lead is None or lead.finished) and settled(done, alive, k=width)
        if final or step == max_new - 1:
            yield _answer(model, cache, first, lead=lead, rest=ranked(done, alive, k=width), rescore=p.rerank)
            return
        yield ([lead] if lead is not None else []) + ranked(done, alive, k=width)
        xs = []
        if rows == 2:  # row 0: the lead's own token (a finished lead idles on its last one)
            xs.append(model.embed(torch.tensor([[lead.ids[-1]]], device=dev))[0, 0])
        if alive:
            gamma = torch.softmax(torch.tensor([d.score for d in alive]), dim=0)  # [A]
            e = model.embed(torch.tensor([[d.ids[-1] for d in alive]], device=dev))[0]  # [A, D]
            xs.append((gamma.to(e)[:, None] * e).sum(0))
        else:
            xs.append(xs[0])
        x = torch.stack(xs)[:, None]  # [rows, 1, D]


def _answer(model, cache, first: int, *, lead: Draft | None, rest: list[Draft], rescore: bool) -> list[Draft]:
    """The final drafts: the lead first (when anchored), the rest best first, re-scored if asked."""
    if lead is not None:
        rest = [d for d in rest if d.text is None or d.text != lead.text]
    if rescore:
        rest = rerank(model, cache, first, drafts=rest)
    return ([lead] if lead is not None else []) + rest


@torch.no_grad()
def rerank(model, cache: ScratchCache, first: int, *, drafts: list[Draft]) -> list[Draft]:
    """The drafts re-scored by their true log-probability (each fed its own ids: one forward of
    [k, 1 + longest] on a batch-k scratch over the same prefix), best first. Superposed scores are
    approximate: every draft but the heaviest saw a mixed input, not its own tokens."""
    drafts = [d for d in drafts if d.ids]
    if len(drafts) < 2:
        return drafts
    logits, ids = draft_logits(model, cache.prefix, cache.start, first, drafts=[d.ids for d in drafts])
    logp = torch.log_softmax(logits.float(), dim=-1)  # [k, n, V]: row i, position t -> id t
    tok = logp.gather(-1, ids[..., None])[..., 0].cpu()  # [k, n]
    for d, row in zip(drafts, tok):
        d.score = float(row[: len(d.ids)].sum())
    return sorted(drafts, key=lambda d: -d.score)


@torch.no_grad()
def draft_logits(model, prefix, start: int, first: int, *, drafts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each draft fed its own ids after `first` (one forward of [k, 1 + longest] on a batch-k scratch
    over `prefix`'s rows [0, start)): logits [k, n, V] where position t predicts id t, and the ids
    [k, n] (padded past each end with the draft's last id)."""
    n = max(len(d) for d in drafts)
    dev = model.embed_tokens.weight.device
    rows = [[first] + d + [d[-1]] * (n - len(d)) for d in drafts]
    scratch = ScratchCache(prefix, start, n + 1, batch=len(drafts))
    logits = model(torch.tensor(rows, device=dev), torch.arange(start, start + n + 1), scratch)
    return logits[:, :-1], torch.tensor([r[1:] for r in rows], device=dev)


def halt_cuts(model, prefix, start: int, first: int, *, drafts: list[list[int]], rule) -> list[int]:
    """Halting for drafts (engine.exits): per draft, how many of its ids come before the first position
    whose logits `rule` flags ([..., V] -> [...] bool), read from one batched forward of the drafts."""
    live = [d for d in drafts if d]
    if not live:
        return [0] * len(drafts)
    logits, _ = draft_logits(model, prefix, start, first, drafts=live)
    flagged = rule(logits).cpu()  # [k, n]
    cuts = iter([next((t for t in range(len(d)) if flagged[i, t]), len(d)) for i, d in enumerate(live)])
    return [next(cuts) if d else 0 for d in drafts]


def select(
    alive: list[Draft], cands: list[list[int]], scores: torch.Tensor, *, k: int, done: dict, finish
) -> list[tuple[int, Draft]]:
    """The best k alive extensions as (parent index, draft), best first; extensions that `finish`
    ends go to `done` (the best per text). cands [A][C] ids, scores [A, C]. Shared with beam search."""
    C = scores.shape[1]
    flat_scores = scores.flatten()
    order = torch.argsort(flat_scores, descending=True, stable=True).tolist()
    flat_scores = flat_scores.tolist()
    worst_done = sorted(d.score for d in done.values())[-k] if len(done) >= k else -math.inf
    new = []
    for flat in order:
        s = flat_scores[flat]
        if s == -math.inf or (len(new) == k and s <= worst_done):
            break
        a, c = divmod(flat, C)
        d = Draft(alive[a].ids + [cands[a][c]], s)
        end = finish(d.ids) if finish is not None else None
        if end is None:
            if len(new) < k:
                new.append((a, d))
            continue
        d.text, d.reason = end
        if d.text not in done or done[d.text].score < s:
            done[d.text] = d
            if len(done) >= k:
                worst_done = sorted(x.score for x in done.values())[-k]
    return new


def ranked(done: dict, alive: list[Draft], *, k: int) -> list[Draft]:
    return sorted(list(done.values()) + alive, key=lambda d: -d.score)[:k]


def settled(done: dict, alive: list[Draft], *, k: int) -> bool:
    """No draft left alive, or k finished ones all beat the best alive one (scores only fall)."""
    if k == 0:
        return True
    best_done = sorted(d.score for d in done.values())[-k:]
    return not alive or (len(best_done) == k and alive[0].score <= best_done[0])
