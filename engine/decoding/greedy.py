"""Greedy decoding, the reference every other decoder is tested against. Ids in, ids out."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.model import greedy_ids


@torch.no_grad()
def greedy(
    model, cache: ScratchCache, first: int, *, max_new: int, first_mask: torch.Tensor | None = None
) -> Iterator[int]:
    """Yield up to `max_new` greedy tokens after the context. `first` is the last context token: it
    is fed at position `cache.start` (the scratch's first row), so its logits give the first new
    token. `first_mask` [V] restricts the first token (token healing). Stop by closing the generator."""
    device = model.embed_tokens.weight.device
    tok, pos = first, cache.start
    if first_mask is not None:
        first_mask = first_mask.to(device, non_blocking=True)
    for step in range(max_new):
        # ids on the model's device (a fill, no copy); the position stays a host tensor, so the cache
        # and the attention read where to write without a device sync (the model copies it for RoPE).
        ids = torch.full((1, 1), tok, dtype=torch.long, device=device)
        h = model(ids, torch.tensor([pos]), cache, return_hidden=True)[0, -1]  # [D]
        if step == 0 and first_mask is not None:
            tok = int(model.head(h).masked_fill(~first_mask, float("-inf")).argmax())
        else:
            tok = int(greedy_ids(model, h))  # the one sync per token: the caller streams it
        pos += 1
        yield tok


@torch.no_grad()
def reference_greedy(model, ids: list[int], max_new: int, *, stop_ids=()) -> list[int]:
    """The naive generator: re-encode the whole sequence for every new token. Slow and obviously right."""
    a = model.args
    w = model.embed_tokens.weight
    seq, out = list(ids), []
    for _ in range(max_new):
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=w.dtype, device=w.device)
        cache.reserve(len(seq))
        cache.length = len(seq)
        logits = model(torch.tensor([seq]), torch.arange(len(seq)), cache, last_only=True)[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        seq.append(tok)
        if tok in stop_ids:
            break
    return out
