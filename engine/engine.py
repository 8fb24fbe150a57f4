"""The engine facade: documents in, completions out. Synchronous and single-threaded by design:
the LSP layer (or the daemon) calls it from one worker thread.

    engine = Engine.load()                      # embedded Gemma 3 270M
    engine.open("file:///a.py", text)
    engine.edit("file:///a.py", changes)        # PIE
    engine.complete("file:///a.py", offset).text
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ghostline.engine.cache import Framed, Holes, KVCache
from ghostline.engine.completion import Completion, CompletionOptions, Prompt, UpdateStats
from ghostline.engine.calibration import find, load_json, load_vocab
from ghostline.engine.decoders import Request, decoder_for
from ghostline.engine.decoding.adadec import AdaDecParams
from ghostline.engine.document import FRESH, MISSING, SHIFTED, STALE, STRATEGIES, Document, token_hunks
from ghostline.engine.exits import EXITS_FILE, Exits
from ghostline.engine.gate import CONTEXT_GATE_FILE, GATE_FILE, Gate
from ghostline.engine.infill import SUFFIX_TOKENS, detect, suffix_text
from ghostline.engine.ngram import NgramIndex, scope_of
from ghostline.engine.quant import quantize
from ghostline.engine.stops import Shown, StopRules
from ghostline.engine.text import to_change
from ghostline.engine.tokenizer import Tokenizer
from ghostline.kernels.rope_shift import apply_rope, delta_cos_sin

log = logging.getLogger("ghostline.engine")

@dataclass
class EngineOptions:
    memory_budget_mb: float = 2048.0  # all documents' KV caches together; LRU eviction past it
    encode_chunk: int = 256  # tokens per forward when encoding (bounds memory, allows cancelling)
    refresh_stale_share: float = 0.25  # refresh a document once edits left this share of its tokens stale
    refresh_stale_min: int = 64  # ... and at least this many
    reread: int = 1024  # when idle, the rows before where the user works that are not fresh are encoded again
    precision: str = "fp32"  # fp32 (the reference) | int8 (int8 layer weights, bf16 activations; CPU)
    head: str = "full"  # full | code (the LM head over the code vocabulary + the documents' tokens)
    window_above: int = 16384  # a document of more tokens is cached as a window around where the user works ...
    window_tokens: int = 4096  # ... of this many tokens
    window_first: int = 512  # a window placed where little is cached starts this small, then grows when idle
    mend_ms: float = 1500.0  # a completion spends about this long at most encoding the missing rows it reads ...
    mend_budget: int = 0  # ... or encodes this many of them at most (0: as many as mend_ms allows)

    def __post_init__(self):
        if isinstance(self.mend_budget, bool) or not isinstance(self.mend_budget, int) or self.mend_budget < 0:
            raise ValueError(f"mend_budget must be a non-negative integer, not {self.mend_budget!r}")
        if isinstance(self.mend_ms, bool) or not isinstance(self.mend_ms, (int, float)) or not self.mend_ms > 0:
            raise ValueError(f"mend_ms must be a positive number, not {self.mend_ms!r}")
        if isinstance(self.reread, bool) or not isinstance(self.reread, int) or self.reread < 0:
            raise ValueError(f"reread must be a non-negative integer, not {self.reread!r}")
        for name in ("window_above", "window_tokens", "window_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 256:
                raise ValueError(f"{name} must be an integer of at least 256, not {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, not {self.head!r}")


PRECISIONS = ("fp32", "int8")
HEADS = ("full", "code")
MEND_MIN_ROWS = 64  # a completion encodes at least this many missing rows, however slow the encode
BACKGROUND_CHUNK = 64  # rows a forward of background work (a request arriving waits for at most one)
REWRITE_TOKENS = 32  # a single change replacing more tokens than this by more is diffed inside
CHARS_PER_TOKEN = 8  # a text of more code points than this per token of `window_above` surely is long (not tokenised)


class Cancelled(Exception):
    """Raised when a `should_stop` callback asks an encode to stop; the document stays consistent."""


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, options: EngineOptions | None = None, *,
                 vocab_rows=None):
        """`options.precision`/`options.head` other than fp32/full turn `model` into the fast one in
        place (engine.quant); `head="code"` needs `vocab_rows` (engine.vocab), as `load` finds them."""
        self.model, self.tok = model, tokenizer
        self.options = options or EngineOptions()
        if self.options.head == "code" and vocab_rows is None:
            raise ValueError("head='code' needs the code vocabulary (vocab_rows)")
        if self.options.precision != "fp32" or self.options.head != "full":
            rows = None if self.options.head == "full" else torch.as_tensor(vocab_rows, dtype=torch.long)
            quantize(model, linear=self.options.precision == "int8", rows=rows,
                     int8_head=self.options.precision == "int8")
        self.docs: dict[str, Document] = {}
        self._masks: dict[str, torch.Tensor] = {}
        self.ngrams = NgramIndex()  # n-gram tables of the open documents (superposed decoding)
        self.adadec = AdaDecParams()  # threshold inf (greedy) until `load` finds the model's calibration
        self.exits: Exits | None = None  # exit heads + controller, when the model was calibrated for them
        self.gate: Gate | None = None  # the show gate, when the model was calibrated for it
        self.context_gate: Gate | None = None  # ... for completions that read context, when fitted for them
        self.trace_exits = False  # benchmarks: record every step's P(stop) in the completion's `stats.p_stop`
        self._head_cost: float | None = None  # the LM head's time in layers (`head_cost`)
        self.infill = detect(tokenizer.hf) if hasattr(tokenizer, "hf") else None  # the model's FIM tokens
        if self.infill is not None:
            self.tok.eos_ids = self.tok.eos_ids | self.infill.stops
        self._preludes: dict[int, tuple] = {}  # [BOS] + a token, encoded once (FIM's prefix marker)
        self._clock = 0
        self.encode_rate: float | None = None  # rows a second the encode runs at, once measured

    @classmethod
    def load(cls, spec=None, *, options: EngineOptions | None = None, progress=None) -> "Engine":
        from ghostline.engine.loader import load

        loaded = load(spec, progress=progress)
        options = options or EngineOptions()
        rows = None
        if options.head == "code":
            rows = load_vocab(loaded.source.stem)
            if rows is None:
                log.warning("no code vocabulary for %s (run `ghostline calibrate`): using the full head",
                            loaded.source.stem)
                options = dataclasses.replace(options, head="full")
        engine = cls(loaded.model, loaded.tokenizer, options, vocab_rows=rows)
        fitted = load_json(loaded.source.stem, "adadec.json")
        if fitted is not None:
            engine.adadec = AdaDecParams(threshold=fitted["threshold"], **fitted.get("decode", {}))
        if (path := find(loaded.source.stem, EXITS_FILE)) is not None:
            engine.exits = Exits.load(path)
        for name, attr in ((GATE_FILE, "gate"), (CONTEXT_GATE_FILE, "context_gate")):
            if (path := find(loaded.source.stem, name)) is not None:
                try:
                    setattr(engine, attr, Gate.load(path))
                except ValueError as exc:  # fitted for other features: no gate until recalibrated
                    log.warning("show gate not used: %s", exc)
        engine.loaded = loaded
        loaded.tokenizer.warm()  # token healing's table, ahead of the first completion typed mid-word
        return engine

    # documents -----------------------------------------------------------------------------------

    def open(self, uri: str, text: str, *, encode: bool = True,
             should_stop: Callable[[], bool] | None = None) -> UpdateStats:
        """Open (or re-open) a document and encode it; a long one (`window_above`) is kept as plain
        text until a completion places its window (`window_tokens`). `encode=False` leaves every row
        missing, as a deferred edit does: the next completion encodes those before its cursor within
        its budget, `background` the rest."""
        t0 = time.perf_counter()
        long = len(text) > CHARS_PER_TOKEN * self.options.window_above
        ids, offsets = ([], []) if long else self.tok.encode(text)
        long = long or len(ids) > self.options.window_above
        doc = Document(uri, "" if long else text, [] if long else ids, [] if long else offsets)
        doc.full = text if long else None
        self.docs[uri] = doc
        self._include(doc.ids, uri)
        self.ngrams.open(uri, doc.ids)
        self._touch(doc)
        n = 0
        if not long and encode:
            n = self._encode_all(doc, should_stop)
        elif not long:
            self._allocate(doc)
        return UpdateStats("window" if long else "open", encoded=n, stale=doc.stale_count,
                           ms=(time.perf_counter() - t0) * 1e3)

    def close(self, uri: str) -> None:
        self.docs.pop(uri, None)
        self.ngrams.close(uri)
        scope = scope_of(uri)
        drop = getattr(self.model.lm_head, "drop", None)
        if scope and drop is not None and not any(scope_of(u) == scope for u in self.docs):
            drop(scope)  # the scope's last document: its own head rows go with it

    def text(self, uri: str) -> str:
        return self._doc(uri).whole

    def describe(self, uri: str) -> dict | None:
        """The engine's view of one document, None if it is not open (`ghostline/inspect`, tests)."""
        doc = self.docs.get(uri)
        if doc is None:
            return None
        h = doc.head_rows
        return {"text": doc.whole, "tokens": len(doc.ids), "stale": doc.stale_count, "missing": doc.missing_count,
                "cached": doc.cache is not None, "context_text": doc.head, "context_tokens": h,
                "context_missing": doc.stale[:h].count(MISSING),
                "window": None if doc.full is None else [doc.base, doc.base + len(doc.own)],
                "due": self._due(doc)}

    def set_context(self, uri: str, text: str, *, should_stop=None) -> UpdateStats:
        """Make `text` (other files' chunks; "" for none) the context cached before the document, read
        by its completions: a PIE edit of the document's head. The rows the new context keeps and the
        document's own rows move and rotate and are *shifted*: they read the old context until a
        refresh, which a new context alone does not make due. Its new rows stay missing until
        `background` encodes them, then the `reread` rows before where the user last edited
        or asked (wherever that moves) are encoded again to read it; a completion never waits for
        either (it reads the rows of the context encoded so far)."""
        t0 = time.perf_counter()
        doc = self._doc(uri)
        if text == doc.head:
            return UpdateStats("context", ms=(time.perf_counter() - t0) * 1e3)
        own = doc.own
        doc.head = text
        if doc.full is not None and not doc.ids:  # a window not placed yet: the context goes in with it
            return UpdateStats("context", ms=(time.perf_counter() - t0) * 1e3)
        stats = self._retext(doc, text + own, False, "pie", should_stop, t0, encode=False, mark=SHIFTED)
        stats.strategy = "context"
        return stats

    def _near_focus(self, doc: Document) -> range:
        """The rows kept fresh when idle: the `reread` before the document's focus, what its next
        completion reads most, context rows in front included (none without a focus, or with it
        outside a long document's window)."""
        if doc.focus is None or not doc.ids:
            return range(0)
        local = doc.local(doc.focus)
        if not len(doc.head) <= local <= len(doc.text):  # outside a long document's window
            return range(0)
        end = doc.token_at(local)
        return range(max(0, end - self.options.reread), end)

    def edit(self, uri: str, changes: list, *, strategy: str = "pie", encode: bool = True,
             should_stop=None) -> UpdateStats:
        """Apply LSP-style changes (ranges in code points, in order); update the cache by `strategy`:
        `pie` (move + rotate the suffix), `naive` (move it unrotated), `prefix` (re-encode from the
        first change), `full` (re-encode everything). `encode=False` (pie, naive) leaves the new rows
        missing: the next completion encodes those before its cursor, `refresh` the rest. A document
        grown past `window_above` tokens becomes a window around the last change. A bad change raises
        EditError and changes nothing."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        t0 = time.perf_counter()
        doc = self._doc(uri)
        if doc.full is not None:
            return self._edit_window(doc, changes, strategy, encode, should_stop, t0)
        text, focus = doc.own, 0
        for raw in changes:
            c = to_change(text, raw)
            text, focus = text[: c.start] + c.text + text[c.end :], c.start + len(c.text)
        doc.focus = focus
        if len(text) > CHARS_PER_TOKEN * self.options.window_above:
            return self._grown(doc, text, focus, t0)
        return self._retext(doc, doc.head + text, len(changes) > 1, strategy, should_stop, t0, encode=encode,
                            focus=focus)

    def _grown(self, doc: Document, text: str, focus: int, t0: float) -> UpdateStats:
        """A document grown past `window_above` tokens: from now on a window around the last change
        (`focus`) is cached, keeping the rows it already has (moved and rotated); the rest is plain text."""
        doc.full, doc.base = text, 0
        self._place(doc, focus)
        return UpdateStats("window", stale=doc.stale_count, ms=(time.perf_counter() - t0) * 1e3)

    def _edit_window(self, doc: Document, changes: list, strategy: str, encode: bool, should_stop,
                     t0: float) -> UpdateStats:
        """Apply changes to a long document: those inside the window update it (PIE), those above it
        move it, those below cost nothing; one across its edge drops it (placed again when needed)."""
        full, base, window, local = doc.full, doc.base, doc.own, 0
        was = placed = bool(doc.ids)
        for raw in changes:
            c = to_change(full, raw)
            full = full[: c.start] + c.text + full[c.end :]
            doc.focus = c.start + len(c.text)
            if not placed:
                continue
            if base <= c.start and c.end <= base + len(window):
                window = window[: c.start - base] + c.text + window[c.end - base :]
                local += 1
            elif c.end <= base:
                base += len(c.text) - (c.end - c.start)
            elif c.start < base + len(window):
                placed = False
        doc.full, doc.base = full, base
        if was and not placed:
            self._set_window(doc, 0, "")
        if not (placed and local):
            return UpdateStats(strategy, ms=(time.perf_counter() - t0) * 1e3)
        return self._retext(doc, doc.head + window, local > 1, strategy, should_stop, t0, encode=encode)

    def _retext(self, doc: Document, new_text: str, multi: bool, strategy: str, should_stop, t0: float, *,
                encode: bool = True, focus: int | None = None, mark: int = STALE) -> UpdateStats:
        """Make `new_text` (its context first) the document's cached text, updating the cache by
        `strategy`; past `window_above` tokens of its own (given the last change's end `focus`, in the
        document's own text), a window around it instead. PIE leaves the rows after a change `mark`
        (`Document.splice_stale`)."""
        uri = doc.uri
        ids, offsets = self.tok.reencode(doc.text, doc.ids, doc.offsets, new_text) if doc.ids else self.tok.encode(new_text)
        lead = len(doc.head)
        if focus is not None and doc.full is None and len(ids) - _rows_before(offsets, lead) > self.options.window_above:
            return self._grown(doc, new_text[lead:], focus, t0)
        hunks = token_hunks(doc.ids, ids, multi=multi)
        if not multi and len(hunks) == 1 and min(hunks[0].old_end - hunks[0].old_start,
                                                   hunks[0].new_end - hunks[0].new_start) > REWRITE_TOKENS:
            hunks = token_hunks(doc.ids, ids, multi=True)  # one big replacement (a reload from disk): what changed in it
        old_len = len(doc.ids)
        doc.text, doc.ids, doc.offsets = new_text, ids, offsets
        self.ngrams.update(uri, ids)
        self._include(ids, uri)
        stats = UpdateStats(strategy, hunks=len(hunks), delta=len(ids) - old_len)
        self._touch(doc)
        if doc.cache is None or not hunks:
            doc.stale = doc.stale[: len(ids)] + bytearray([MISSING]) * max(0, len(ids) - len(doc.stale))
        elif strategy == "full":
            stats.encoded = self._encode_all(doc, should_stop)
        elif strategy == "prefix":
            first = hunks[0].new_start
            self._resize(doc)
            doc.stale[first:] = bytearray([MISSING]) * (len(ids) - first)
            stats.encoded = self._run(doc, list(range(first, len(ids))), should_stop)
        else:
            freqs = self.model.args.inv_freq if strategy == "pie" else None
            rows = peak = doc.cache.length
            for h in hunks:
                rows += (h.new_end - h.new_start) - (h.old_end - h.old_start)
                peak = max(peak, rows)
            self._make_room(doc, peak)
            for h in hunks:
                m = h.new_end - h.new_start
                doc.cache.splice(h.new_start, h.new_start + h.old_end - h.old_start, m, inv_freq=freqs)
                doc.splice_stale(h, mark=mark)
            if encode:
                stats.encoded = self._run(doc, doc.missing_before(len(ids)), should_stop)
        stats.stale = doc.stale_count
        stats.ms = (time.perf_counter() - t0) * 1e3
        return stats

    def needs_refresh(self, uri: str) -> bool:
        doc = self._doc(uri)
        s, o = doc.edited_count, self.options
        return doc.cache is not None and s >= o.refresh_stale_min and s >= o.refresh_stale_share * len(doc.ids)

    def refresh(self, uri: str, *, should_stop=None, chunk: int | None = None) -> UpdateStats:
        """Re-encode from the first stale or missing row to the end, so the cache equals a full encode."""
        t0 = time.perf_counter()
        doc = self._doc(uri)
        if doc.cache is None:
            n = self._encode_all(doc, should_stop)
        else:
            first = doc.first_stale  # rows after it are re-encoded over a changed row: stale until then
            doc.stale[first:] = doc.stale[first:].replace(bytes([FRESH]), bytes([STALE]))
            n = self._run(doc, list(range(first, len(doc.ids))), should_stop, chunk=chunk)
        return UpdateStats("refresh", encoded=n, ms=(time.perf_counter() - t0) * 1e3)

    def background(self, uri: str, *, should_stop=None) -> UpdateStats | None:
        """One piece of the work a document is due while nothing else waits, or None: encode its
        missing rows (deferred edits below a cursor), grow a window placed small by a chunk, refresh
        it once enough rows are stale (`needs_refresh`), or encode again the `reread` rows before its
        focus that are not fresh (stale after an edit above them or encoded over rows a completion
        skipped; shifted by a new context in front), wherever the focus has moved since, so that the
        next completion there reads what one encode would give. It runs `BACKGROUND_CHUNK` rows a
        forward, so a request that arrives waits for at most one; stopped (Cancelled), the rows done
        are kept."""
        doc = self._doc(uri)
        kind, t0 = self._due(doc), time.perf_counter()
        if kind == "mend":
            n = self._run(doc, doc.missing_before(len(doc.ids)), should_stop, chunk=BACKGROUND_CHUNK)
        elif kind == "grow":
            n = self._grow(doc, should_stop)
        elif kind == "refresh":
            return self.refresh(uri, should_stop=should_stop, chunk=BACKGROUND_CHUNK)
        elif kind == "reread":
            n = self._run(doc, self._unread(doc), should_stop, chunk=BACKGROUND_CHUNK)
        else:
            return None
        return UpdateStats(kind, encoded=n, stale=doc.stale_count, ms=(time.perf_counter() - t0) * 1e3)

    def _due(self, doc: Document) -> str | None:
        """The piece of idle work `background` would do next for the document, or None."""
        if doc.cache is None:
            return None
        if doc.missing_count:
            return "mend"
        if self._can_grow(doc):
            return "grow"
        if self.needs_refresh(doc.uri):
            return "refresh"
        return "reread" if self._unread(doc) else None

    def _unread(self, doc: Document) -> list[int]:
        """The rows before the focus that idle work encodes again (`_near_focus`): from the first one
        not fresh to the focus, fresh ones after it included, since their keys and values read the rows
        encoded again before them (an edit's rows encoded over rows a new context had shifted)."""
        near = self._near_focus(doc)
        first = next((r for r in near if doc.stale[r] != FRESH), near.stop)
        return list(range(first, near.stop))

    # completion ----------------------------------------------------------------------------------

    def complete(self, uri: str, offset: int, options: CompletionOptions | None = None, *, should_stop=None,
                 should_yield=None) -> Completion:
        result = Completion("")
        for result in self.stream(uri, offset, options, should_stop=should_stop, should_yield=should_yield):
            pass
        return result

    def stream(self, uri: str, offset: int, options: CompletionOptions | None = None, *, should_stop=None,
               should_yield=None) -> Iterator[Completion]:
        """Complete at code-point `offset`, yielding the suggestion as it grows (stop iterating to
        cancel; `should_stop()` is also polled between decoding steps). `should_yield()` is polled
        only while the document is encoded first: True stops there (Cancelled), keeping the rows
        done, so a scheduler can serve other work and call again."""
        opts = options or CompletionOptions()
        t0 = time.perf_counter()
        doc = self._doc(uri)
        if not 0 <= offset <= len(doc.whole):
            raise ValueError(f"offset {offset} is outside the document (0..{len(doc.whole)})")
        self._touch(doc)
        doc.focus = offset
        if doc.full is not None and self._misplaced(doc, offset):
            self._place(doc, offset)
        offset = doc.local(offset)
        if doc.cache is None:
            self._allocate(doc)
        self._scope_head(uri)
        P = doc.token_at(offset)  # tokens [0, P) lie wholly before the cursor
        if P > 1 and _in_word(doc.text, offset) and doc.offsets[P - 1][1] == offset:
            P -= 1  # a word typed up to the cursor: let the model re-choose its last token (token healing)
        if P == 0:
            yield Completion("", stop_reason="no_context")
            return
        prefix = self._readable(doc, P - 1, _either(should_stop, should_yield))
        heal = doc.text[doc.offsets[P - 1][1] : offset]  # text between the last kept token and the cursor
        line_start = doc.text.rfind("\n", 0, offset) + 1
        rules = StopRules(opts.multiline, doc.text[line_start:offset], _next_line(doc.text, offset))
        prompt = self.prompt(doc, P, offset, opts, prefix)
        scope = scope_of(doc.uri)
        h = doc.head_rows
        head = h - 1 - doc.stale[1:h].count(MISSING) if h else 0  # the context rows it reads (row 0 aside: BOS)
        gate = self.context_gate if head and self.context_gate is not None else self.gate
        req = Request(self.model, self.tok, doc, P, offset, opts, prompt, Shown(self.tok, doc.ids[P - 1], heal, rules),
                      self._mask(heal), self._exits(opts), self.exits, self.head_cost, self.adadec, self.ngrams,
                      lambda: [d.array for d in self.docs.values() if d is not doc and scope_of(d.uri) == scope],
                      gate, self.trace_exits)
        decode = decoder_for(opts)(req)
        out = Completion("", ctx_tokens=P, heal=heal, context_tokens=head, stats=decode.stats)
        try:
            for ids, text, reason in decode.steps:
                if not out.first_token_ms:
                    out.first_token_ms = (time.perf_counter() - t0) * 1e3
                out.tokens = ids
                if text is None:  # a character split across tokens: wait for the rest
                    continue
                out.text, out.ms = text, (time.perf_counter() - t0) * 1e3
                if reason is None and opts.time_cap_ms is not None and out.ms > opts.time_cap_ms and out.text.strip():
                    reason = "time_cap"
                if reason is None and should_stop is not None and should_stop():
                    reason = "cancelled"
                if reason:
                    out.stop_reason = reason
                    break
                yield out
        finally:
            decode.steps.close()
            decode.scratch.trim(0)
        decode.end(out)
        out.ms = (time.perf_counter() - t0) * 1e3
        yield out

    # internals -----------------------------------------------------------------------------------

    def prompt(self, doc: Document, P: int, offset: int, opts: CompletionOptions,
               prefix: KVCache | Holes | None = None) -> Prompt:
        """What a decode at `offset` continues, tokens [0, P) of `doc` before it (its context first):
        the document's cache (or `prefix`, a view of it without its holes) and its token P - 1; or,
        with `infill` (a model with FIM tokens) and no holes, a view with [BOS] `<PRE>` before the
        document, then `<SUF>` and the text after the cursor encoded after the prefix, `<MID>` fed first."""
        infill = self.infill if opts.infill else None
        prefix = doc.cache if prefix is None else prefix
        if infill is None or prefix is not doc.cache:
            return Prompt(prefix, P - 1, doc.ids[P - 1])
        k, v, skip = self._prelude(infill.prefix)
        view = Framed(doc.cache, k, v, start=skip - k.shape[2], skip=skip)
        suffix = self.tok.encode(suffix_text(doc.text, offset))[0][skip:][:SUFFIX_TOKENS]
        ids = [infill.suffix] + suffix
        with torch.no_grad():
            self.model(torch.tensor([ids], device=view.ck.device), torch.arange(P, P + len(ids)),
                       view.write_tail(P, len(ids)), return_hidden=True, last_only=True)
        return Prompt(view, P + len(ids), infill.middle)

    @torch.no_grad()
    def _prelude(self, token: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """k, v [L, KV, C, hd] of [BOS] + `token` (C rows; `skip` 1 with a BOS, else 0), encoded once
        per token, the keys rotated so the last row sits at position skip - 1: right before the
        document's rows from `skip` on (this BOS stands for the document's own)."""
        if token not in self._preludes:
            skip = 1 if self.tok.adds_bos else 0
            ids = ([self.tok.bos_id] if skip else []) + [token]
            cache = self.new_cache()
            cache.reserve(len(ids))
            cache.length = len(ids)
            self.model(torch.tensor([ids]), torch.arange(len(ids)), cache, return_hidden=True, last_only=True)
            k, v = cache.k[:, :, : len(ids)].clone(), cache.v[:, :, : len(ids)].clone()
            delta = skip - len(ids)  # rows 0.. move to positions skip - C..
            cos, sin = delta_cos_sin(delta, self.model.args.inv_freq, dtype=k.dtype)  # [L, hd]
            k = apply_rope(k, cos[:, None, None].to(k.device), sin[:, None, None].to(k.device))
            self._preludes[token] = (k, v, skip)
        return self._preludes[token]

    def head_cost(self) -> float:
        """The LM head's cost in decoder layers (for self-speculation's choice of depth), timed once."""
        if self._head_cost is None:
            from ghostline.engine.cache import KVCache

            a, m = self.model.args, self.model
            x = m.embed(torch.tensor([[1]]))
            cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=x.dtype)
            cache.reserve(1)
            cache.length = 1
            tables = m.rope_tables(torch.tensor([0]), x.dtype)
            with torch.no_grad():
                t = [time.perf_counter()]
                for _ in range(5):
                    m.layers[0](x, torch.tensor([0]), tables[m.rope_group[0]], cache)
                t.append(time.perf_counter())
                for _ in range(5):
                    m.head(x)
                t.append(time.perf_counter())
            self._head_cost = (t[2] - t[1]) / max(t[1] - t[0], 1e-9)
        return self._head_cost

    def _exits(self, opts: CompletionOptions) -> Exits | None:
        """The exit heads with the request's thresholds (inf for what is off), or None for neither."""
        if not (opts.halt or opts.exit):
            return None
        if self.exits is None:
            raise ValueError("halt/exit need the model's exit heads: run `ghostline calibrate --steps exits`")
        e = self.exits
        halt = (e.halt_threshold if opts.halt_threshold is None else opts.halt_threshold) if opts.halt else math.inf
        exit = (e.exit_threshold if opts.exit_threshold is None else opts.exit_threshold) if opts.exit else math.inf
        if opts.decoder != "greedy":
            exit = math.inf  # exits change tokens; the other decoders' outputs are defined at full depth
        return e.with_thresholds(exit=exit, halt=halt)

    def _include(self, ids: list[int], uri: str) -> None:
        """A shortlist head learns the document's tokens, so what the context uses stays choosable;
        a scoped document's ("c1|uri") only for its own scope (engine.ngram.scope_of)."""
        include = getattr(self.model.lm_head, "include", None)
        if include is not None:
            include(torch.tensor(ids, dtype=torch.long), scope=scope_of(uri))

    def _scope_head(self, uri: str) -> None:
        """Decode with the head rows of `uri`'s scope: the shared ones and its own documents' tokens."""
        if hasattr(self.model.lm_head, "scope"):
            self.model.lm_head.scope = scope_of(uri)

    def _misplaced(self, doc: Document, offset: int) -> bool:
        """A long document's window does not serve a completion at `offset`: none yet, the cursor
        outside it or in its first quarter (too little context above), or grown by pastes."""
        start, end = doc.base, doc.base + len(doc.own)
        return (not doc.ids or not start <= offset <= end or (start > 0 and offset - start < len(doc.own) // 4)
                or len(doc.ids) - doc.head_rows > self.options.window_tokens * 5 // 4)

    def _place(self, doc: Document, focus: int) -> None:
        """Cache a window of a long document around code point `focus`: up to `window_tokens`, three
        quarters of them above the focus (what a completion reads), cut at line starts. The rows the
        cache has are kept (moved and rotated). Where more than `window_first` * 3/4 of the tokens above
        the focus would be new (a jump, a first placement), the window starts with `window_first`
        tokens, so the completion that placed it encodes little, and `refresh` grows it upward later."""
        old = (doc.base, doc.base + len(doc.own)) if doc.cache is not None and doc.ids else (0, 0)
        c0, c1, new_above = self._span(doc.full, focus, self.options.window_tokens, old)
        first = min(self.options.window_first, self.options.window_tokens)
        if new_above > first * 3 // 4:
            c0, c1, _ = self._span(doc.full, focus, first, old)
        self._set_window(doc, c0, doc.full[c0:c1])
        log.info("%s: cached window %d..%d of %d chars (%d tokens, %d to encode)", doc.uri, c0, c1, len(doc.full),
                 len(doc.ids), doc.missing_count)

    def _span(self, full: str, focus: int, W: int, old: tuple[int, int]) -> tuple[int, int, int]:
        """Code points [c0, c1) of a window of about W tokens around `focus`, three quarters above it,
        cut at line starts; and how many of its tokens above the focus lie outside `old` (code points)."""
        lo, hi = max(0, focus - CHARS_PER_TOKEN * W * 3 // 4), min(len(full), focus + CHARS_PER_TOKEN * W // 4)
        lo = full.rfind("\n", 0, lo) + 1 if lo > 0 else 0
        _, offsets = self.tok.encode(full[lo:hi])
        at = next((i for i, (_, e) in enumerate(offsets) if lo + e > focus), len(offsets))
        s = max(0, at - W * 3 // 4)
        e = min(len(offsets), s + W)
        s = max(0, e - W)
        c0 = lo + offsets[s][0] if s > 0 else lo
        c1 = lo + offsets[e - 1][1] if e < len(offsets) else hi
        if c0 > 0 and full[c0 - 1] != "\n":
            nl = full.find("\n", c0, focus)
            c0 = nl + 1 if nl >= 0 else c0
        if c1 < len(full):
            nl = full.rfind("\n", focus, c1)
            c1 = nl + 1 if nl >= 0 else c1
        new = sum(1 for b, _ in offsets[s:at] if lo + b >= c0 and not old[0] <= lo + b < old[1])
        return c0, c1, new

    def _set_window(self, doc: Document, base: int, text: str) -> None:
        """Make full[base:] the window's start and `text` its text (after the context): from the rows
        the cache has where there are some (PIE, the new rows missing), else uncached; "" unplaces it."""
        if doc.cache is not None and doc.ids and text:
            doc.base = base
            self._retext(doc, doc.head + text, True, "pie", None, time.perf_counter(), encode=False)
            return
        text = doc.head + text if text else ""
        ids, offsets = self.tok.encode(text) if text else ([], [])
        doc.base, doc.text, doc.ids, doc.offsets = base, text, ids, offsets
        doc.cache, doc.stale = None, bytearray(len(ids))
        self.ngrams.open(doc.uri, ids)
        self._include(ids, doc.uri)

    def _can_grow(self, doc: Document) -> bool:
        """A window placed small with text above it and room to grow."""
        return (doc.full is not None and doc.cache is not None and doc.base > 0
                and len(doc.ids) - doc.head_rows + self.options.encode_chunk <= self.options.window_tokens)

    def _grow(self, doc: Document, should_stop) -> int:
        """Extend a window upward by about one encode chunk of whole lines and encode the new rows.
        Where the chunk holds no line start but the window's own, the lines above go in whole while
        the window has room for them, else it grows by the chunk from inside the line: it always
        grows (idle work that grew by nothing would run for ever)."""
        full, base, chunk = doc.full, doc.base, self.options.encode_chunk
        lo = full.rfind("\n", 0, max(0, base - CHARS_PER_TOKEN * chunk)) + 1
        _, offsets = self.tok.encode(full[lo:base])
        c0 = lo + offsets[-chunk][0] if len(offsets) > chunk else lo
        if c0 > lo and full[c0 - 1] != "\n":
            nl = full.find("\n", c0, base)
            if 0 <= nl < base - 1:
                c0 = nl + 1
            elif len(doc.ids) - doc.head_rows + len(offsets) <= self.options.window_tokens:
                c0 = lo
        if should_stop is not None and should_stop():
            raise Cancelled(f"growing the window of {doc.uri} stopped")
        self._set_window(doc, c0, full[c0 : base + len(doc.own)])
        return self._run(doc, doc.missing_before(len(doc.ids)), should_stop, chunk=BACKGROUND_CHUNK)

    def _doc(self, uri: str) -> Document:
        doc = self.docs.get(uri)
        if doc is None:
            raise KeyError(f"document {uri!r} is not open")
        return doc

    def _touch(self, doc: Document) -> None:
        self._clock += 1
        doc.last_used = self._clock

    def _mask(self, heal: str) -> torch.Tensor | None:
        if not heal:
            return None
        if heal not in self._masks:
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[heal] = self.tok.starting_with(heal, self.model.args.vocab_size)
        return self._masks[heal]

    def new_cache(self) -> KVCache:
        a = self.model.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=self.model.embed_tokens.weight.dtype)

    def _readable(self, doc: Document, end: int, should_stop) -> KVCache | Holes:
        """The document's rows [0, end) for a decode to read, its missing rows encoded first: as many
        as `mend_ms` allows at the encode rate measured so far (or `mend_budget`), those nearest `end`.
        Past the budget the others stay missing, out of the returned view (holes), and the rows encoded
        over them are stale; `background` mends them. The context's missing rows are always holes: a
        completion never waits for context."""
        missing, rate, h = doc.missing_before(end), self.encode_rate, doc.head_rows
        held = [p for p in missing if 0 < p < h]  # row 0 (BOS) is read whatever else is missing
        missing = [p for p in missing if not 0 < p < h] if held else missing
        budget = self.options.mend_budget or (
            len(missing) if rate is None else max(MEND_MIN_ROWS, int(rate * self.options.mend_ms / 1e3)))
        if len(missing) <= budget and not held:
            self._run(doc, missing, should_stop)
            return doc.cache
        cut = max(0, len(missing) - budget)
        view = Holes(doc.cache, sorted(held + missing[:cut]))
        self._run(doc, missing[cut:], should_stop, cache=view, mark=STALE)
        return view

    def _allocate(self, doc: Document) -> None:
        """A new cache for the document, every row missing."""
        doc.cache = self.new_cache()
        self._resize(doc)
        doc.stale = bytearray([MISSING]) * len(doc.ids)

    def _resize(self, doc: Document) -> None:
        self._make_room(doc, len(doc.ids))
        doc.cache.reserve(len(doc.ids))
        doc.cache.length = len(doc.ids)

    def _make_room(self, doc: Document, rows: int) -> None:
        """Drop the least recently used other documents' caches so that `doc`'s growing to `rows` rows
        keeps every cache, the old storage and the new one it is copied into, within the memory budget."""
        need = doc.cache.reserve_bytes(rows)
        if need:
            self._evict(keep=doc, need=doc.cache.nbytes + need)

    def _encode_all(self, doc: Document, should_stop) -> int:
        self._allocate(doc)
        return self._run(doc, list(range(len(doc.ids))), should_stop)

    @torch.no_grad()
    def _run(self, doc: Document, pos: list[int], should_stop, *, cache: KVCache | Holes | None = None,
             mark: int = FRESH, chunk: int | None = None) -> int:
        """Encode the document's rows `pos` (increasing) through the model, `encode_chunk` rows a
        forward; each row attends to the rows before its position, so every missing row below the
        last must be in `pos` (or a hole of `cache`, a view of the document's). Rows of several spans
        go together: one forward instead of one per span (small spans would each re-read all the
        weights). A chunk's rows are `mark` (fresh) once its forward has returned; `should_stop()`,
        polled before each chunk, raises Cancelled and keeps the rows done; a failed forward leaves its
        rows missing."""
        cache = doc.cache if cache is None else cache
        chunk = min(chunk or self.options.encode_chunk, self.options.encode_chunk)
        for i in range(0, len(pos), chunk):
            part = pos[i : i + chunk]
            if should_stop is not None and should_stop():
                raise Cancelled(f"encoding {doc.uri} stopped at row {part[0]} ({i} of {len(pos)} done)")
            try:
                t0 = time.perf_counter()
                self.model(torch.tensor([[doc.ids[p] for p in part]]), torch.tensor(part), cache,
                           return_hidden=True, last_only=True)
                if len(part) >= 16:  # rows a second, smoothed: what a completion can encode in its budget
                    rate = len(part) / max(time.perf_counter() - t0, 1e-6)
                    self.encode_rate = rate if self.encode_rate is None else 0.8 * self.encode_rate + 0.2 * rate
            except BaseException:
                for p in part:
                    doc.stale[p] = MISSING
                raise
            if part[-1] - part[0] + 1 == len(part):
                doc.stale[part[0] : part[-1] + 1] = bytes([mark]) * len(part)
            else:
                for p in part:
                    doc.stale[p] = mark
        return len(pos)

    def _evict(self, *, keep: Document, need: int) -> None:
        """Drop the least recently used caches other than `keep`'s until theirs and `need` bytes fit
        the memory budget (their documents are encoded again when next used)."""
        budget = self.options.memory_budget_mb * 2**20
        others = sorted((d for d in self.docs.values() if d.cache is not None and d is not keep),
                        key=lambda d: d.last_used)
        total = sum(d.cache.nbytes for d in others) + need
        for d in others:
            if total <= budget:
                break
            total -= d.cache.nbytes
            d.cache = None

    def memory_bytes(self) -> int:
        return sum(d.cache.nbytes for d in self.docs.values() if d.cache is not None)


def _rows_before(offsets: list[tuple[int, int]], end: int) -> int:
    """How many tokens lie wholly before code point `end` (a document's context rows, BOS included)."""
    return bisect.bisect_right([e for _, e in offsets], end) if end else 0


def _either(a, b):
    """A should_stop that is true when either callback (None: never) is."""
    if a is None or b is None:
        return a or b
    return lambda: a() or b()


def _in_word(text: str, offset: int) -> bool:
    """The cursor sits right after a word character (a name being typed)."""
    return offset > 0 and (text[offset - 1].isalnum() or text[offset - 1] == "_")


def _next_line(text: str, offset: int) -> str:
    """The first non-blank line below the cursor's line, stripped."""
    i = text.find("\n", offset)
    while i >= 0:
        j = text.find("\n", i + 1)
        line = text[i + 1 : j if j >= 0 else len(text)]
        if line.strip():
            return line.strip()
        i = j
    return ""
