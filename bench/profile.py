"""Where the time goes between an edit and its one-line suggestion, in process.

For each task (../shared/EVAL.md: open `before`, apply `changes` as one edit, complete one line at
the cursor) the edit and the completion are timed whole and split into parts by wrapping the
functions that do them:

  edit      tokenize (the whole new text), diff (token hunks), ngrams (the n-gram index update),
            include (the document's tokens into the code head), splice (move + rotate the suffix
            keys), encode (the model over the new tokens), rest (Python around them)
  complete  layers (the model's layers for the decode steps and the cursor's tokens), attention
            (inside layers: the prefix/scratch attention), head (final norm + LM head), rest
            (token healing, stop rules, sampling, Python)

    python -m bench.profile --tasks ../shared/data/edits-requests.jsonl [--limit N] [--precision int8] [--head full]
        [--decoder lookup]

Prints a line per task, a markdown table (per part: mean and p50 ms per request, share of the total),
and last one JSON line: {"edit": {...}, "complete": {...}, "steps_p50": ..., "step_ms": {...}}.
What the language server adds (debounce, JSON-RPC, scheduling) is the LSP replay's latency minus this.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict

import ghostline.kernels.segment_attention as segment_attention
from bench.tasks import cursor_offset, em, first_line, mean, pct, read_tasks
from ghostline.engine import engine as engine_mod
from ghostline.engine.cache import KVCache
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions

URI = "file:///task.py"
EDIT_PARTS = ("tokenize", "diff", "ngrams", "include", "splice", "encode")
COMPLETE_PARTS = ("layers", "attention", "head")


class Timers:
    """Accumulated milliseconds per part while `phase` is set; wrappers nest (inner parts are not
    subtracted from outer ones: `layers` includes `attention`, the model call includes `head`). A part
    called inside itself (`head` calls `head_columns`) counts once; time inside `model` is also
    kept as `<part>@model`, so that layers = model - head@model whether the decoder reads the
    logits through the model call or through `head_columns` after it."""

    def __init__(self):
        self.phase: str | None = None
        self.ms: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.active: set[str] = set()

    def wrap(self, fn, part: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.phase is None or part in self.active:
                return fn(*args, **kwargs)
            inside_model = "model" in self.active
            self.active.add(part)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.active.discard(part)
                ms = (time.perf_counter() - t0) * 1e3
                self.ms[f"{self.phase}.{part}"] += ms
                self.calls[f"{self.phase}.{part}"] += 1
                if inside_model:
                    self.ms[f"{self.phase}.{part}@model"] += ms

        return timed


def instrument(engine: Engine, timers: Timers) -> None:
    engine.tok.encode = timers.wrap(engine.tok.encode, "tokenize")
    engine_mod.token_hunks = timers.wrap(engine_mod.token_hunks, "diff")
    engine.ngrams.update = timers.wrap(engine.ngrams.update, "ngrams")
    engine._include = timers.wrap(engine._include, "include")
    engine._encode = timers.wrap(engine._encode, "encode")
    engine._encode_spans = timers.wrap(engine._encode_spans, "encode")
    KVCache.splice = timers.wrap(KVCache.splice, "splice")
    engine.model.forward = timers.wrap(engine.model.forward, "model")
    engine.model.head = timers.wrap(engine.model.head, "head")
    engine.model.head_columns = timers.wrap(engine.model.head_columns, "head")
    segment_attention.segment_attention = timers.wrap(segment_attention.segment_attention, "attention")


def run(engine: Engine, tasks: list[dict], *, max_tokens: int, decoder: str = "greedy", drafts: int = 1,
        log=print) -> dict:
    timers = Timers()
    instrument(engine, timers)
    opts = CompletionOptions(max_tokens=max_tokens, decoder=decoder, drafts=drafts)
    rows = []
    for n, task in enumerate(tasks, 1):
        engine.open(URI, task["before"])
        timers.ms.clear()
        timers.calls.clear()
        timers.phase = "edit"
        t0 = time.perf_counter()
        up = engine.edit(URI, task["changes"])
        t1 = time.perf_counter()
        timers.phase = "complete"
        got = engine.complete(URI, cursor_offset(task), opts)
        t2 = time.perf_counter()
        timers.phase = None
        engine.close(URI)
        ms = dict(timers.ms)
        row = {"edit": (t1 - t0) * 1e3, "complete": (t2 - t1) * 1e3, "steps": len(got.tokens), "encoded": up.encoded,
               "forwards": timers.calls["complete.model"],
               "text": got.text, "em": em(first_line(got.text), task["target"])}
        for p in EDIT_PARTS:
            row[f"edit.{p}"] = ms.get(f"edit.{p}", 0.0)
        row["edit.rest"] = row["edit"] - sum(row[f"edit.{p}"] for p in EDIT_PARTS)
        model_ms = ms.get("complete.model", 0.0)
        row["complete.head"] = ms.get("complete.head", 0.0)
        row["complete.attention"] = ms.get("complete.attention", 0.0)
        row["complete.layers"] = model_ms - ms.get("complete.head@model", 0.0)
        row["complete.rest"] = row["complete"] - row["complete.layers"] - row["complete.head"]
        rows.append(row)
        log(f"[{n}/{len(tasks)}] {task['id']} edit {row['edit']:.0f} ms (encode {row['edit.encode']:.0f}, "
            f"{up.encoded} tokens) complete {row['complete']:.0f} ms ({row['steps']} tokens, {row['forwards']} "
            f"forwards: layers "
            f"{row['complete.layers']:.0f}, head {row['complete.head']:.0f}, rest {row['complete.rest']:.0f})", flush=True)
    return summary(rows)


def summary(rows: list[dict]) -> dict:
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    total = mean(col("edit")) + mean(col("complete"))
    out = {"tasks": len(rows), "total_ms_mean": round(total, 1), "em": round(mean(col("em")), 2),
           "total_ms_p50": round(pct([r["edit"] + r["complete"] for r in rows], 50), 1)}
    for phase, parts in (("edit", EDIT_PARTS), ("complete", COMPLETE_PARTS)):
        out[phase] = {"ms_mean": round(mean(col(phase)), 1), "ms_p50": round(pct(col(phase), 50), 1)}
        for p in parts + ("rest",):
            k = f"{phase}.{p}"
            out[phase][p] = {"ms_mean": round(mean(col(k)), 1), "ms_p50": round(pct(col(k), 50), 1),
                             "share": round(mean(col(k)) / total, 4) if total else 0.0}
    forwards = sum(col("forwards"))
    out["steps_p50"] = pct(col("steps"), 50)
    out["tokens_per_forward"] = round(sum(col("steps")) / forwards, 3) if forwards else 0.0
    out["step_ms"] = {k: round(sum(col(f"complete.{k}")) / forwards, 2) if forwards else 0.0 for k in ("layers", "head")}
    return out


def table(s: dict) -> str:
    lines = ["| part | ms mean | ms p50 | share of edit + complete |", "|---|---:|---:|---:|"]
    for phase, parts in (("edit", EDIT_PARTS), ("complete", COMPLETE_PARTS)):
        lines.append(f"| **{phase}** | **{s[phase]['ms_mean']:.1f}** | **{s[phase]['ms_p50']:.1f}** | |")
        for p in parts + ("rest",):
            r = s[phase][p]
            note = " (inside layers)" if p == "attention" else ""
            lines.append(f"| {phase}: {p}{note} | {r['ms_mean']:.1f} | {r['ms_p50']:.1f} | {100 * r['share']:.1f} % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--head", choices=("code", "full"), default="code", help="LM head (code: the server's default)")
    p.add_argument("--decoder", choices=("greedy", "lookup"), default="greedy")
    p.add_argument("--drafts", type=int, default=1, help="3: the server's default (superposed drafts)")
    args = p.parse_args(argv)
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    engine.open(URI, "def f(x):\n    return x\n")
    engine.complete(URI, 10)  # first-call costs (token-text table, allocations) out of the timings
    engine.close(URI)
    s = run(engine, read_tasks(args.tasks, args.limit), max_tokens=args.max_tokens, decoder=args.decoder, drafts=args.drafts)
    print(table(s))
    print(f"a forward of the completion: layers {s['step_ms']['layers']:.1f} ms + head {s['step_ms']['head']:.1f} ms; "
          f"{s['steps_p50']:.0f} tokens per suggestion (p50), {s['tokens_per_forward']:.2f} tokens per forward; "
          f"EM {s['em']:.1f}")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
