"""AdaDec (arXiv 2506.08980): pause at uncertain tokens and re-rank them by looking ahead. Ids in, ids out.

Terms, as used below:
- entropy: H = -sum p log p of a step's next-token distribution, in nats.
- paused step: a step whose H exceeds the model's threshold (learned by `fit_threshold` on
  teacher-forced code, see engine.calibration) and, optionally, whose top two probabilities are closer
  than `margin` (our addition: a high-entropy step with a clear favourite is not worth a look-ahead);
  every other step takes the greedy token.
- candidates: the top `width` tokens of a paused step.
- rollout: a candidate followed by up to `depth` greedy tokens, ending early where `finish` says the
  suggestion ends. All candidates roll out together, one batch-`width` forward per token, on a
  `ForkCache` over the scratch (the context is never re-encoded).
- score: the mean log-probability of a rollout's tokens, candidate included. The best candidate is
  committed and the rollouts are dropped, except that the winner's entries, which are exactly what
  the greedy decode after it would compute, are adopted while the decode follows it: a pause costs the
  other rows of a batched forward, not a second run of the winner.
- follow (our addition, on by default: the setting measured in bench/RESULTS.md): the winner's rollout tokens are committed as they are, with
  no new pause inside them (they were the look-ahead the candidate was judged by). A pause then costs
  at most `depth` batch-`width` forwards for up to `depth` + 1 tokens, which bounds AdaDec's cost by
  the ratio of a batch-`width` forward to a batch-1 one; without it, a pause inside an adopted run
  throws the rest of the run away.

`reference_adadec` is the same rule on a plain re-encode per token; the fast path is tested against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ghostline.engine.cache import ForkCache, KVCache, ScratchCache

Finish = Callable[[list[int]], bool]  # ids generated so far (committed + rollout) -> the suggestion has ended


@dataclass
class AdaDecParams:
    threshold: float = math.inf  # nats; inf never pauses (plain greedy)
    width: int = 3  # candidates per pause (B)
    depth: int = 5  # greedy look-ahead tokens per candidate (L)
    margin: float = 1.0  # pause only when p(top 1) - p(top 2) < margin; 1.0: entropy alone decides
    follow: bool = True  # commit the winner's rollout without pausing inside it (see the module docstring)


@dataclass
class AdaDecStats:
    steps: int = 0
    paused: int = 0
    changed: int = 0  # paused steps whose committed token is not the greedy one
    forwards: int = 0  # model calls (batch 1 or batch `width`)


def entropy(logp: torch.Tensor) -> float:
    """Entropy in nats of a log-probability row [V] (-inf entries contribute nothing)."""
    p = logp.exp()
    return float(-(p * torch.nan_to_num(logp, neginf=0.0)).sum())


def pauses(logp: torch.Tensor, params: AdaDecParams) -> bool:
    """Whether a step with next-token log-probabilities `logp` [V] pauses."""
    if entropy(logp) <= params.threshold:
        return False
    if params.margin >= 1.0:
        return True
    top = logp.topk(2).values.exp()
    return float(top[0] - top[1]) < params.margin


@dataclass
class Rollouts:
    """One pause's look-ahead: row r fed seqs[r][j] at fork.start + j and logits[j][r] followed it
    (rows that ended early keep running in the batch; their extra tokens are not in seqs)."""

    fork: ForkCache
    seqs: list[list[int]]
    scores: list[float]
    logits: list[torch.Tensor]  # [B, V] per fed entry
    best: int
    next: int = 0  # entries of the best row adopted by the decode so far

    def follows(self, tok: int, pos: int) -> bool:
        """The decode just committed `tok`, to be fed at `pos`: is that the best row's next entry?"""
        j, fed = self.next, self.seqs[self.best]
        return j < len(self.logits) and j < len(fed) and fed[j] == tok and self.fork.start + j == pos


def look_ahead(model, cache: ScratchCache, logp: torch.Tensor, pos: int, done: list[int], *,
               params: AdaDecParams, finish: Finish | None = None, stats: AdaDecStats | None = None) -> Rollouts:
    """Roll the top candidates of `logp` (the distribution for position `pos`) out together."""
    vals, cands = logp.topk(min(params.width, int(torch.isfinite(logp).sum())))
    B = len(cands)
    fork = ForkCache(cache, max(1, params.depth), batch=B)
    seqs = [[c] for c in cands.tolist()]
    total = vals.double().cpu().tolist()
    count = [1] * B
    alive = [finish is None or not finish(done + s) for s in seqs]
    inp, logits = cands[:, None], []
    for j in range(params.depth):
        if not any(alive):
            break
        lg = model(inp, torch.tensor([pos + j]), fork)[:, -1]  # [B, V]
        if stats is not None:
            stats.forwards += 1
        logits.append(lg)
        best_lp, nxt = torch.log_softmax(lg.float(), dim=-1).max(dim=-1)
        for r in range(B):
            if alive[r]:
                seqs[r].append(int(nxt[r]))
                total[r] += float(best_lp[r])
                count[r] += 1
                alive[r] = finish is None or not finish(done + seqs[r])
        inp = nxt[:, None]
    scores = [t / n for t, n in zip(total, count)]
    best = max(range(B), key=lambda r: (scores[r], -r))  # ties: the higher-ranked candidate
    return Rollouts(fork, seqs, scores, logits, best)


@torch.no_grad()
def adadec(model, cache: ScratchCache, first: int, *, max_new: int, params: AdaDecParams,
           finish: Finish | None = None, first_mask: torch.Tensor | None = None,
           stats: AdaDecStats | None = None) -> Iterator[int]:
    """Yield up to `max_new` tokens after the context (`first`, the last context token, is fed at
    `cache.start`, as in `greedy`). Stop by closing the generator; the caller trims the scratch."""
    stats = stats if stats is not None else AdaDecStats()
    dev = model.embed_tokens.weight.device
    pos = cache.start
    logits = model(torch.full((1, 1), first, device=dev), torch.tensor([pos]), cache)[0, -1]
    stats.forwards += 1
    pos += 1
    if first_mask is not None:
        logits = logits.masked_fill(~first_mask.to(dev), float("-inf"))
    ahead: Rollouts | None = None
    done: list[int] = []
    for _ in range(max_new):
        logp = torch.log_softmax(logits.float(), dim=-1)
        stats.steps += 1
        inside = params.follow and ahead is not None and ahead.next < len(ahead.seqs[ahead.best])
        if not inside and pauses(logp, params):
            stats.paused += 1
            ahead = look_ahead(model, cache, logp, pos, done, params=params, finish=finish, stats=stats)
            tok = ahead.seqs[ahead.best][0]
            stats.changed += tok != int(logp.argmax())
        else:
            tok = int(logp.argmax())
        done.append(tok)
        yield tok
        if len(done) == max_new:
            return
        if ahead is not None and ahead.follows(tok, pos):
            ahead.fork.adopt(ahead.best, ahead.next)  # already run: take its K/V and logits
            logits = ahead.logits[ahead.next][ahead.best]
            ahead.next += 1
        else:
            ahead = None
            logits = model(torch.full((1, 1), tok, device=dev), torch.tensor([pos]), cache)[0, -1]
            stats.forwards += 1
        pos += 1


@torch.no_grad()
def reference_adadec(model, ids: list[int], max_new: int, *, params: AdaDecParams,
                     finish: Finish | None = None) -> list[int]:
    """The same rule, re-encoding the whole sequence for every token of every rollout."""

    def next_logp(seq: list[int]) -> torch.Tensor:
        a, w = model.args, model.embed_tokens.weight
        c = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=w.dtype, device=w.device)
        c.reserve(len(seq))
        c.length = len(seq)
        return torch.log_softmax(model(torch.tensor([seq]), torch.arange(len(seq)), c, last_only=True)[0, -1].float(), -1)

    out: list[int] = []
    while len(out) < max_new:
        logp = next_logp(ids + out)
        tok = int(logp.argmax())
        if pauses(logp, params):
            vals, cands = logp.topk(min(params.width, int(torch.isfinite(logp).sum())))
            scores, seqs = [], []
            for v, c in zip(vals.tolist(), cands.tolist()):
                seq, total, n = [c], v, 1
                for _ in range(params.depth):
                    if finish is not None and finish(out + seq):
                        break
                    lp = next_logp(ids + out + seq)
                    seq.append(int(lp.argmax()))
                    total += float(lp.max())
                    n += 1
                scores.append(total / n)
                seqs.append(seq)
            best = max(range(len(scores)), key=lambda r: (scores[r], -r))
            if params.follow:
                out += seqs[best][: max_new - len(out)]
                continue
            tok = cands.tolist()[best]
        out.append(tok)
    return out


def fit_threshold(entropies: np.ndarray, correct: np.ndarray, *, held_out: float = 0.3, seed: int = 0) -> dict:
    """AdaDec's threshold: a one-feature logistic regression P(greedy is right | entropy) fit on part of
    the positions, the probability cut-off with the best accuracy on the rest, mapped back to entropy.
    Returns the threshold (nats) with the fit and its held-out accuracy beside always-greedy's."""
    h, y = np.asarray(entropies, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    order = np.random.default_rng(seed).permutation(len(h))
    cut = int(len(h) * (1 - held_out))
    tr, te = order[:cut], order[cut:]
    w = np.zeros(2)  # logit = w0 + w1 * h; Newton's method (IRLS) on the log-loss
    X = np.stack([np.ones(len(tr)), h[tr]], 1)
    for _ in range(50):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (p - y[tr])
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    prob = 1 / (1 + np.exp(-(w[0] + w[1] * h[te])))
    best_acc, best_c = -1.0, 0.5
    for c in np.unique(np.round(prob, 4)):
        acc = float(((prob >= c) == (y[te] > 0.5)).mean())
        if acc > best_acc:
            best_acc, best_c = acc, float(c)
    if w[1] >= 0:  # confidence does not fall with entropy on this data: never pause
        threshold = math.inf
    else:
        c = min(max(best_c, 1e-6), 1 - 1e-6)
        threshold = float((math.log(c / (1 - c)) - w[0]) / w[1])  # P(right) < c  <=>  entropy > threshold
    return {"threshold": threshold, "w0": float(w[0]), "w1": float(w[1]), "cutoff": best_c,
            "held_out_accuracy": best_acc, "greedy_right_share": float(y[te].mean()),
            "positions": int(len(h)), "paused_share": float((h[te] > threshold).mean())}
