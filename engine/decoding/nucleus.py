"""Nucleus sampling, k separate decodes: what peers do for k suggestions (llama.vscode's n_cmpl,
Tabby's requests at T=0.8). A baseline for superposed decoding, same draft protocol.

Each sample draws from the smallest set of tokens whose probability (at temperature T) reaches
top_p. Samples are ranked by their log-probability under the model at T=1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ghostline.engine.cache import ScratchCache
from ghostline.engine.decoding.superposed import Draft, Finish


@torch.no_grad()
def nucleus(
    model, cache: ScratchCache, first: int, *, k: int, max_new: int, finish: Finish | None = None,
    top_p: float = 0.9, temperature: float = 0.8, first_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[list[Draft]]:
    """Yield the samples so far, best first, after each token of each of k samples."""
    samples: list[Draft] = []
    for _ in range(k):
        cache.trim(0)
        d, tok, pos = Draft([], 0.0), first, cache.start
        for step in range(max_new):
            logits = model(torch.tensor([[tok]]), torch.tensor([pos]), cache)[0, -1].float()  # [V]
            pos += 1
            if step == 0 and first_mask is not None:
                logits = logits.masked_fill(~first_mask.to(logits.device), float("-inf"))
            tok = sample_top_p(logits, top_p=top_p, temperature=temperature, generator=generator)
            d = Draft(d.ids + [tok], d.score + float(torch.log_softmax(logits, -1)[tok]))
            end = finish(d.ids) if finish is not None else None
            if end is not None:
                d.text, d.reason = end
            yield sorted(samples + [d], key=lambda x: -x.score)
            if end is not None:
                break
        samples.append(d)


def sample_top_p(logits: torch.Tensor, *, top_p: float, temperature: float, generator=None) -> int:
    """One id from logits [V]: softmax at `temperature`, cut to the top_p nucleus, renormalised."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the top token always stays
    sorted_p = sorted_p * keep
    i = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[i])
