"""k drafts at a cursor (`CompletionOptions.drafts > 1`): the engine's side of the draft decoders.

The decoders (`superposed`, and the baselines `beam`, `nucleus`) speak ids; this module gives them
the engine's stop rules as `finish(ids)` (decode the draft, apply `StopRules`, EOS), the n-gram
index for superposed decoding, and turns the final drafts into texts: best first, without empty
drafts, duplicates (after trailing blanks) and drafts that only repeat the lines below the cursor;
then the show gate (engine.gate), when the model has one, withholds the whole answer if it is unlikely
that the user keeps any of it (`CompletionOptions.gate`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from ghostline.engine.cache import ScratchCache
from ghostline.engine.completion import Completion, Prompt
from ghostline.engine.decoding.beam import beam_search
from ghostline.engine.decoding.nucleus import nucleus
from ghostline.engine.decoding.superposed import SuperposedParams, halt_cuts, superposed
from ghostline.engine.gate import Confidence, features
from ghostline.engine.stops import Shown

METHODS = ("superposed", "beam", "nucleus")  # CompletionOptions.decoder; any other name: superposed


def stream_drafts(engine, doc, *, P: int, offset: int, heal: str, rules, opts, t0: float, should_stop=None,
                  prompt=None) -> Iterator:
    """Like `Engine.stream`, for k drafts: yields Completions whose `text` is the best draft so far;
    the last one carries `drafts`. Called by `Engine.stream` once the context P is known; `prompt`
    what the decode continues (`Engine.prompt`; by default the document's cache and its token P - 1)."""
    prompt = prompt or Prompt(doc.cache, P - 1, doc.ids[P - 1])
    k, first, start, prefix = opts.drafts, prompt.first, prompt.start, prompt.prefix
    view = Shown(engine.tok, doc.ids[P - 1], heal, rules)
    shown, finish = view.text, view.finish

    line_end = doc.text.find("\n", offset)
    line_end = len(doc.text) if line_end < 0 else line_end
    rest = (P, min(len(doc.ids), doc.token_at(line_end) + 1))  # the cursor's line from the cursor on

    def ngram(tails, cands):
        return engine.ngrams.prob(tails, cands, uri=doc.uri)

    conf = []  # the first step's distribution at the cursor, for the show gate

    def on_first(logits):
        conf.append(Confidence.of(logits))

    mask, method = engine._mask(heal), opts.decoder if opts.decoder in METHODS else "superposed"
    params = opts.superposed or SuperposedParams()
    batch = k if method == "beam" else 2 if method == "superposed" and params.anchor else 1
    scratch = ScratchCache(prefix, start, opts.max_tokens + 1, batch=batch)
    common = dict(k=k, max_new=opts.max_tokens, finish=finish, first_mask=mask)
    if method == "superposed":
        gen = superposed(engine.model, scratch, first, context=doc.ids[max(0, P - 6) : P - 1], ngram=ngram,
                         params=params, on_first=on_first, last=doc.ids[P - 1], **common)
    elif method == "beam":
        gen = beam_search(engine.model, scratch, first, **common)
    else:
        gen = nucleus(engine.model, scratch, first, **common)
    out, drafts = Completion("", ctx_tokens=P, heal=heal), []
    # the text a draft goes before is no evidence: left out of the n-gram tables for the whole decode
    # (once, not at every step: that cost ~2 ms a step of table updates)
    with engine.ngrams.without(doc.uri, *rest):
        try:
            for drafts in gen:
                if not drafts:
                    continue
                if not out.first_token_ms:
                    out.first_token_ms = (time.perf_counter() - t0) * 1e3
                out.tokens = drafts[0].ids
                out.text = drafts[0].text if drafts[0].finished else (shown(drafts[0].ids) or (out.text,))[0]
                out.ms = (time.perf_counter() - t0) * 1e3
                if opts.time_cap_ms is not None and out.ms > opts.time_cap_ms and out.text.strip():
                    out.stop_reason = "time_cap"
                    break
                if should_stop is not None and should_stop():
                    out.stop_reason = "cancelled"
                    break
                yield out
        finally:
            gen.close()
            scratch.trim(0)
    exits = engine._exits(opts)
    if exits is not None and drafts and exits.halt_threshold < float("inf"):  # cut each draft where it would halt
        cuts = halt_cuts(engine.model, prefix, start, first, drafts=[d.ids for d in drafts],
                         rule=lambda logits: exits.p_stop(logits) >= exits.halt_threshold)
        for d, cut in zip(drafts, cuts):
            if cut < len(d.ids):
                d.ids, d.text, d.reason = d.ids[:cut], None, "halt"
    texts = [d.text if d.finished else (shown(d.ids) or ("",))[0] for d in drafts]
    out.drafts = keep(texts, doc.text[line_end + 1 :])
    out.text = out.drafts[0] if out.drafts else ""
    best = next((d for d, t in zip(drafts, texts) if out.drafts and t == out.drafts[0]), None)
    out.tokens = best.ids if best is not None else []
    halted = drafts and all(d.reason == "halt" for d in drafts)
    out.stop_reason = out.stop_reason or (best.reason if best is not None and best.reason else
                                          "halt" if halted else "max_tokens")
    out.first_step = conf[0] if conf else None
    by_text = {t: d for d, t in reversed(list(zip(drafts, texts)))}  # the best draft of each text
    out.draft_scores = [by_text[t].score / max(1, len(by_text[t].ids)) for t in out.drafts if t in by_text]
    if engine.gate is not None and conf and out.drafts:
        line_start = doc.text.rfind("\n", 0, offset) + 1
        x = features(conf[0], out.drafts, line_before=doc.text[line_start:offset],
                     line_after=doc.text[offset:line_end], multiline=opts.multiline, scores=out.draft_scores)
        out.confidence = float(engine.gate.p_kept(x)[0])
        if opts.gate and out.confidence < engine.gate.threshold_at(opts.gate_strength):
            out.withheld = out.drafts[0]
            out.drafts, out.text, out.tokens, out.stop_reason = [], "", [], "gated"
    out.ms = (time.perf_counter() - t0) * 1e3
    yield out


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

