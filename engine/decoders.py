"""The decoder table: what a completion's decoder is handed, and the one shape it hands back.

A decoder is a function `Request -> Decode`, picked by name (`decoder_for`). It reads only its
`Request` (the model, the prompt it continues, the stop rules, token healing's mask, the exit heads,
the n-gram tables), never the engine. Its `Decode.steps` yield `(ids, text, reason)` as the
suggestion grows: the best sequence's ids so far, the text they show (None while a character is
split across tokens) and a stop reason once the stop rules or EOS end it. `Engine.stream` consumes
every decoder with one loop (time cap, cancelling, the scratch cache rolled back in a `finally`),
then calls `Decode.finish(out)`: what is left of the stop reason, and for k drafts the halting
cuts, the dedup and the show gate. The algorithms themselves live in `engine.decoding` (ids in,
ids out); this module is where their ids meet the document's text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ghostline.engine.cache import ScratchCache
from ghostline.engine.completion import SPECULATIVE, Completion, CompletionOptions, Prompt
from ghostline.engine.decoding.adadec import AdaDecParams, AdaDecStats, adadec
from ghostline.engine.decoding.beam import beam_search
from ghostline.engine.decoding.early_exit import ExitStats, early_exit
from ghostline.engine.decoding.greedy import greedy
from ghostline.engine.decoding.nucleus import nucleus
from ghostline.engine.decoding.speculative import DRAFT_RULES, Chain, EarlyLayers, SpecStats, speculative
from ghostline.engine.decoding.superposed import SuperposedParams, halt_cuts, superposed
from ghostline.engine.document import Document
from ghostline.engine.exits import Exits
from ghostline.engine.gate import Confidence, Gate, features, situation
from ghostline.engine.ngram import NgramIndex, PromptLookup
from ghostline.engine.stops import Shown

Step = tuple[list[int], str | None, str | None]  # (ids so far, shown text or None, stop reason or None)
DRAFT_METHODS = ("superposed", "beam", "nucleus")  # k drafts: CompletionOptions.decoder; any other: superposed


@dataclass
class Request:
    """What a decoder gets for one completion at `offset`, tokens [0, P) of `doc` before it."""

    model: object
    tok: object  # engine.tokenizer.Tokenizer
    doc: Document
    P: int
    offset: int
    opts: CompletionOptions
    prompt: Prompt  # what the decode continues (the document's cache, or a view with context)
    view: Shown  # ids -> the text they show, cut by the stop rules
    mask: torch.Tensor | None  # [V] bool: token healing's allowed first tokens (None: any)
    exits: Exits | None  # the request's halt/exit thresholds on the exit heads; None for neither
    exit_heads: Exits | None  # the model's exit heads whatever the request asks (self-speculation)
    head_cost: Callable[[], float]  # the LM head's cost in decoder layers
    adadec: AdaDecParams  # the model's calibrated AdaDec parameters
    ngrams: NgramIndex
    others: Callable[[], list] = list  # the other documents' token arrays in its scope (asked only by prompt lookup)
    gate: Gate | None = None
    trace_exits: bool = False  # record every step's P(stop) (benchmarks)

    def scratch(self, rows: int, batch: int = 1) -> ScratchCache:
        """A scratch cache of `rows` rows over the prompt, rolled back by the engine's loop."""
        return ScratchCache(self.prompt.prefix, self.prompt.start, rows, batch=batch)


@dataclass
class Decode:
    steps: Iterator[Step]
    scratch: ScratchCache
    stats: object | None = None  # ExitStats, AdaDecStats or SpecStats: the decoder's own figures
    finish: Callable[[Completion], None] | None = None  # once the loop is done (by default: the end reason)

    def end(self, out: Completion) -> None:
        if self.finish is not None:
            self.finish(out)
        else:
            out.stop_reason = out.stop_reason or ("halt" if getattr(self.stats, "halted", False) else "max_tokens")


def decoder_for(opts: CompletionOptions) -> Callable[[Request], Decode]:
    """The decoder a request's options name (k drafts when `drafts` > 1)."""
    if opts.drafts > 1:
        return drafts
    if opts.decoder not in TABLE:
        raise ValueError(f"unknown decoder {opts.decoder!r} ({', '.join(TABLE)})")
    return TABLE[opts.decoder]


# one sequence ------------------------------------------------------------------------------------

def one_sequence(gen: Iterator[int], req: Request) -> Iterator[Step]:
    """Steps of a decoder that yields one sequence's ids: the text after each, EOS as a stop."""
    ids, text = [], ""
    try:
        for tok in gen:
            if tok in req.tok.eos_ids:
                yield ids, text, "eos"
                return
            ids.append(tok)
            shown = req.view.text(ids)
            if shown is None:  # a character split across tokens: wait for the rest
                yield ids, None, None
                continue
            text, reason = shown
            yield ids, text, reason
    finally:
        gen.close()


def greedy_decoder(req: Request) -> Decode:
    """Greedy; with the request's exit thresholds, dynamic early exit and halting (engine.exits)."""
    p, n = req.prompt, req.opts.max_tokens
    scratch = req.scratch(n + 1)
    if req.exits is None:
        return Decode(one_sequence(greedy(req.model, scratch, p.first, max_new=n, first_mask=req.mask), req), scratch)
    stats = ExitStats(p_stop=[] if req.trace_exits else None)
    gen = early_exit(req.model, scratch, p.first, exits=req.exits, max_new=n, first_mask=req.mask, stats=stats)
    return Decode(one_sequence(gen, req), scratch, stats)


def adadec_decoder(req: Request) -> Decode:
    """AdaDec: pause at uncertain tokens and re-rank candidates by a short look-ahead."""
    p, n = req.prompt, req.opts.max_tokens
    scratch, stats = req.scratch(n + 1), AdaDecStats()
    gen = adadec(req.model, scratch, p.first, max_new=n, params=req.opts.adadec or req.adadec,
                 finish=lambda ids: req.view.finish(ids) is not None, first_mask=req.mask, stats=stats)
    return Decode(one_sequence(gen, req), scratch, stats)


def speculative_decoder(req: Request) -> Decode:
    """Speculative decoding (the same tokens as greedy): drafts from prompt lookup over the document
    and the others in its scope, from the model's early layers, or both."""
    opts, p = req.opts, req.prompt
    if opts.draft_length not in DRAFT_RULES:
        raise ValueError(f"draft_length must be one of {', '.join(DRAFT_RULES)}, not {opts.draft_length!r}")
    length = DRAFT_RULES[opts.draft_length]()
    scratch = req.scratch(opts.max_tokens + length.k_max + 2)
    lookup = PromptLookup()
    lookup.others = req.others()
    proposer, early = lookup, None
    if opts.decoder != "lookup":
        if req.exit_heads is None:
            raise ValueError(f"decoder {opts.decoder!r} needs the model's exit heads: run `ghostline calibrate --steps exits`")
        early = EarlyLayers(req.model, scratch, req.exit_heads, head_cost=req.head_cost())
        proposer = early if opts.decoder == "self" else Chain(lookup, early)
    stats, exits = SpecStats(), req.exits
    halt = None if exits is None else (lambda rows: exits.p_stop(rows) >= exits.halt_threshold)
    gen = speculative(req.model, scratch, p.first, context=req.doc.ids[: req.P - 1], proposer=proposer,
                      max_new=opts.max_tokens, first_mask=req.mask, stats=stats, length=length, halt=halt)
    return Decode(one_sequence(gen if early is None else _noting_layer(gen, stats, early), req), scratch, stats)


def _noting_layer(gen: Iterator[int], stats: SpecStats, early: EarlyLayers) -> Iterator[int]:
    """`gen`'s tokens; when it ends (or is closed), the layer self-speculation proposed from last."""
    try:
        yield from gen
    finally:
        stats.layer = early.layer


# k drafts ----------------------------------------------------------------------------------------

def drafts(req: Request) -> Decode:
    """k drafts at the cursor (superposed decoding, or the baselines beam and nucleus): the steps
    show the best draft so far; `finish` cuts each draft where the halting controller would stop,
    keeps the texts worth showing (best first) and lets the show gate withhold the whole answer."""
    opts, p, doc, view = req.opts, req.prompt, req.doc, req.view
    line_end = doc.text.find("\n", req.offset)
    line_end = len(doc.text) if line_end < 0 else line_end
    rest = (req.P, min(len(doc.ids), doc.token_at(line_end) + 1))  # the cursor's line from the cursor on
    method = opts.decoder if opts.decoder in DRAFT_METHODS else "superposed"
    params = opts.superposed or SuperposedParams()
    batch = opts.drafts if method == "beam" else 2 if method == "superposed" and params.anchor else 1
    scratch = req.scratch(opts.max_tokens + 1, batch=batch)
    common = dict(k=opts.drafts, max_new=opts.max_tokens, finish=view.finish, first_mask=req.mask)
    conf, last = [], []  # the first step's distribution at the cursor (for the gate); the last drafts
    if method == "superposed":
        gen = superposed(req.model, scratch, p.first, context=doc.ids[max(0, req.P - 6) : req.P - 1],
                         ngram=lambda tails, cands: req.ngrams.prob(tails, cands, uri=doc.uri), params=params,
                         on_first=lambda logits: conf.append(Confidence.of(logits)), last=doc.ids[req.P - 1],
                         **common)
    elif method == "beam":
        gen = beam_search(req.model, scratch, p.first, **common)
    else:
        gen = nucleus(req.model, scratch, p.first, **common)

    def steps() -> Iterator[Step]:
        text = ""
        # the text a draft goes before is no evidence: left out of the n-gram tables for the whole
        # decode (once, not at every step: that cost ~2 ms a step of table updates)
        with req.ngrams.without(doc.uri, *rest):
            try:
                for ds in gen:
                    if not ds:
                        continue
                    last[:] = ds
                    best = ds[0]
                    text = best.text if best.finished else (view.text(best.ids) or (text,))[0]
                    yield best.ids, text, None
            finally:
                gen.close()

    def finish(out: Completion) -> None:
        ds = last
        exits = req.exits
        if exits is not None and ds and exits.halt_threshold < float("inf"):  # cut each draft where it would halt
            cuts = halt_cuts(req.model, p.prefix, p.start, p.first, drafts=[d.ids for d in ds],
                             rule=lambda logits: exits.p_stop(logits) >= exits.halt_threshold)
            for d, cut in zip(ds, cuts):
                if cut < len(d.ids):
                    d.ids, d.text, d.reason = d.ids[:cut], None, "halt"
        texts = [d.text if d.finished else (view.text(d.ids) or ("",))[0] for d in ds]
        out.drafts = keep(texts, doc.text[line_end + 1 :])
        out.text = out.drafts[0] if out.drafts else ""
        best = next((d for d, t in zip(ds, texts) if out.drafts and t == out.drafts[0]), None)
        out.tokens = best.ids if best is not None else []
        halted = ds and all(d.reason == "halt" for d in ds)
        out.stop_reason = out.stop_reason or (best.reason if best is not None and best.reason else
                                              "halt" if halted else "max_tokens")
        out.first_step = conf[0] if conf else None
        by_text = {t: d for d, t in reversed(list(zip(ds, texts)))}  # the best draft of each text
        out.draft_scores = [by_text[t].score / max(1, len(by_text[t].ids)) for t in out.drafts if t in by_text]
        if req.gate is not None and conf and out.drafts:
            x = features(conf[0], out.drafts, **situation(doc.own, req.offset - len(doc.head)), multiline=opts.multiline,
                         scores=out.draft_scores)
            out.confidence = float(req.gate.p_kept(x)[0])
            strength = req.gate.strength(opts.gate_strength, opts.gate_record)
            if opts.gate and out.confidence < req.gate.threshold_at(strength):
                out.withheld = out.drafts[0]
                out.drafts, out.text, out.tokens, out.stop_reason = [], "", [], "gated"

    return Decode(steps(), scratch, None, finish)


def keep(texts: list[str], below: str) -> list[str]:
    """Texts worth showing, in order: non-blank, new (ignoring trailing blanks), and not only a
    repeat of the lines that follow the cursor's line (`below`)."""
    below_lines = [line.strip() for line in below.split("\n") if line.strip()]
    out, seen = [], set()
    for text in texts:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        key = text.rstrip()
        if not lines or key in seen or lines == below_lines[: len(lines)]:
            continue
        seen.add(key)
        out.append(text)
    return out


TABLE: dict[str, Callable[[Request], Decode]] = {
    "greedy": greedy_decoder,
    "adadec": adadec_decoder,
    **{name: speculative_decoder for name in SPECULATIVE},
}
