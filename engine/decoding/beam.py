"""Beam search with k beams: the classic way to get k drafts, k rows of compute per step. A baseline
for superposed decoding (same draft protocol: `engine.decoding.superposed.Draft`, `finish`).

Each beam has its own row of a batch-k scratch cache; after a step the rows are permuted so that
row j holds beam j's history (its parent's rows). Scores are cumulative log-probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ghostline.engine.cache import ScratchCache
from ghostline.engine.decoding.superposed import Draft, Finish, ranked, select, settled


@torch.no_grad()
def beam_search(
    model, cache: ScratchCache, first: int, *, k: int, max_new: int, finish: Finish | None = None,
    first_mask: torch.Tensor | None = None,
) -> Iterator[list[Draft]]:
    """Yield the best k drafts after each step (finished and alive, best first). `cache` has batch k;
    `first` is the last context token, fed at `cache.start` in every row."""
    alive, done = [Draft([], 0.0)], {}
    dev = model.embed_tokens.weight.device
    inp = torch.full((k, 1), first, device=dev)  # [k, 1]: row j feeds beam j's last id (rows past the beams idle)
    pos = cache.start
    for step in range(max_new):
        logits = model(inp, torch.tensor([pos]), cache)[:, -1].float()  # [k, V]
        pos += 1
        if step == 0 and first_mask is not None:
            logits = logits.masked_fill(~first_mask.to(dev), float("-inf"))
        logp = torch.log_softmax(logits[: len(alive)], dim=-1)
        vals, idx = logp.topk(2 * k, dim=-1)  # [A, 2k]
        scores = torch.tensor([d.score for d in alive], dtype=torch.float64)[:, None] + vals.double().cpu()
        new = select(alive, idx.tolist(), scores, k=k, done=done, finish=finish)
        alive = [d for _, d in new]
        yield ranked(done, alive, k=k)
        if settled(done, alive, k=k):
            return
        parents = torch.tensor([a for a, _ in new] + [new[0][0]] * (k - len(new)), device=dev)
        n = pos - cache.start
        cache.k[:, :, :, :n] = cache.k[:, parents, :, :n]
        cache.v[:, :, :, :n] = cache.v[:, parents, :, :n]
        inp = torch.tensor([[d.ids[-1]] for d in alive] + [[alive[0].ids[-1]]] * (k - len(alive)), device=dev)
