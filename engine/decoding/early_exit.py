"""Greedy decoding with dynamic early exit and halting (SEC, arXiv 2401.09964). Ids in, ids out.

Terms (the exit heads, controller and thresholds are defined in `engine.exits`):
- exit: at a candidate layer whose P(exit) clears the exit threshold, the token is read from that
  layer's exit head; the keys and values of the layers it skipped are computed from the exit hidden
  state (`Transformer.copy_state`), so the cache has the same rows as after a full-depth step.
- halt: at full depth, when P(stop) clears the halt threshold, the suggestion ends before the token;
  the generator returns and `ExitStats.halted` says why.
With both thresholds at inf this is `greedy`, token for token.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ghostline.engine.cache import ScratchCache
from ghostline.engine.exits import Exits
from ghostline.engine.model import column_argmax, greedy_ids


@dataclass
class ExitStats:
    steps: int = 0  # forwards, the halted one included
    layers: int = 0  # decoder layers run in full (the state copying of skipped layers not counted)
    exited: int = 0
    halted: bool = False
    p_stop: list[float] | None = None  # a list: P(stop) of every step is recorded (-1 for exited steps)


@torch.no_grad()
def early_exit(model, cache: ScratchCache, first: int, *, exits: Exits, max_new: int,
               first_mask: torch.Tensor | None = None, stats: ExitStats | None = None) -> Iterator[int]:
    """Yield up to `max_new` tokens after the context as `greedy` does (same arguments), exiting and
    halting by `exits`' thresholds. Stop by closing the generator."""
    stats = stats if stats is not None else ExitStats()
    n_layers, candidates = model.args.n_layers, exits.layers
    can_exit = exits.exit_threshold < math.inf
    judge = exits.halt_threshold < math.inf or stats.p_stop is not None
    tok, pos = first, cache.start
    for step in range(max_new):
        p = torch.tensor([pos])
        x = model.embed(torch.tensor([[tok]]))  # [1, 1, D]
        tables = model.rope_tables(p, x.dtype)
        masked = step == 0 and first_mask is not None
        done, lens = 0, None  # layers run so far; the exit head's output where the step exits
        for c, layer in enumerate(candidates if can_exit and not masked else ()):
            x = model.run(x, p, tables, cache, range(done, layer))
            done = layer
            lens = exits.decide(c, x[0, -1])
            if lens is not None:
                model.copy_state(x, p, cache, start=layer, tables=tables)
                break
        if lens is not None:
            tok = int(greedy_ids(model, lens))
            stats.layers += done
            stats.exited += 1
            if stats.p_stop is not None:
                stats.p_stop.append(-1.0)
        else:
            h = model.run(x, p, tables, cache, range(done, n_layers))[0, -1]  # [D]
            stats.layers += n_layers
            if masked:
                logits, rows = model.head(h).masked_fill(~first_mask, float("-inf")), None  # [V]
            else:
                logits, rows = model.head_columns(h)  # [R]: a shortlist head's columns, never widened
            p_stop = float(exits.p_stop(logits)) if judge else -1.0
            if stats.p_stop is not None:
                stats.p_stop.append(p_stop)
            if p_stop >= exits.halt_threshold:
                stats.steps += 1
                stats.halted = True
                return
            tok = int(column_argmax(logits, rows, vocab_size=model.args.vocab_size))
        stats.steps += 1
        pos += 1
        yield tok
