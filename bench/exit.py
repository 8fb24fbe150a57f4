"""Early-exit benchmark: greedy vs greedy+halt vs greedy+exit vs both, on multi-line
suggestions (up to 64 tokens) after the edit (../shared/EVAL.md set-up).

    python -m bench.exit --tasks ../shared/data/edits-requests.jsonl [--limit N] [--shard i/n --out rows.jsonl]
    python -m bench.exit --summarize rows*.jsonl [--plot bench/results/exit.png]

Terms: the *author's text* is the task's `after` from the cursor; a shown suggestion's *matched*
characters are its longest common prefix with it. Per method:
- halt_precision: of the halted suggestions, the share whose next token (the one the halt withheld:
  the decode without halting shows it) would have been wrong, i.e. the text up to and including it is
  not a prefix of the author's text;
- halt_recall: of the suggestions that go wrong without halting (their text is not a prefix of the
  author's), the share halted;
- shown_precision: matched characters / shown characters over all suggestions; shown_chars: mean shown;
- layers_per_token: decoder layers run in full per generated token; ms: per suggestion;
- em, es: of the first line, against the task's `target`.
A traced greedy run records every step's P(stop), which gives shown precision against characters
shown for any halt threshold (the sweep and the plot) without decoding again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from bench.tasks import add_run_args, cursor_offset, em, es, first_line, mean, run_rows, saved_rows
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions

METHODS = {"greedy": {}, "halt": {"halt": True}, "exit": {"exit": True}, "both": {"halt": True, "exit": True}}
URI = "file:///task.py"


def matched(text: str, truth: str) -> int:
    n = 0
    for a, b in zip(text, truth):
        if a != b:
            break
        n += 1
    return n


def run(engine: Engine, offset: int, opts: CompletionOptions) -> dict:
    """One suggestion, with the text shown after each token count (for cuts and next tokens)."""
    texts, out = {0: ""}, None
    for out in engine.stream(URI, offset, opts):
        texts[len(out.tokens)] = out.text
    st = out.stats if (opts.halt or opts.exit) else None
    n_layers = engine.model.args.n_layers
    return {"text": out.text, "tokens": len(out.tokens), "ms": out.ms, "reason": out.stop_reason,
            "texts": {str(k): v for k, v in texts.items()},
            "layers": st.layers if st else len(out.tokens) * n_layers, "steps": st.steps if st else len(out.tokens),
            "p_stop": st.p_stop if st and st.p_stop is not None else None}


def text_at(texts: dict, n: int) -> str:
    """The shown text after the first n tokens (the longest recorded count <= n)."""
    counts = [int(k) for k in texts if int(k) <= n]
    return texts[str(max(counts))] if counts else ""


def run_task(engine: Engine, task: dict, *, max_tokens: int, sweep=()) -> dict:
    engine.open(URI, task["before"])
    engine.edit(URI, task["changes"])
    offset = cursor_offset(task)
    row = {"id": task["id"], "truth": task["after"][offset : offset + 2000], "target": task["target"],
           "halt_threshold": engine.exits.halt_threshold, "exit_threshold": engine.exits.exit_threshold}
    for name, flags in METHODS.items():
        row[name] = run(engine, offset, CompletionOptions(multiline=True, max_tokens=max_tokens, **flags))
    for thr in sweep:
        row[f"exit@{thr}"] = run(engine, offset, CompletionOptions(multiline=True, max_tokens=max_tokens, exit=True,
                                                                   exit_threshold=thr))
    engine.trace_exits = True
    try:
        row["trace"] = run(engine, offset, CompletionOptions(multiline=True, max_tokens=max_tokens, halt=True,
                                                     halt_threshold=math.inf))
    finally:
        engine.trace_exits = False
    engine.close(URI)
    return row


def judge(row: dict, method: str) -> dict:
    """The per-suggestion figures of `method` in a task's row (see the module docstring)."""
    r, truth = row[method], row["truth"]
    base = row["exit" if method == "both" else "trace" if method == "halt" else method]  # the decode without halting
    halted = r["reason"] == "halt"
    after = text_at(base["texts"], r["tokens"] + 1) if halted else None
    next_wrong = halted and not truth.startswith(after)  # a withheld token that shows nothing is no error
    base_wrong = not truth.startswith(base["text"])
    return {"halted": halted, "next_wrong": bool(next_wrong), "base_wrong": base_wrong,
            "shown": len(r["text"]), "matched": matched(r["text"], truth),
            "em": em(first_line(r["text"]), row["target"]), "es": es(first_line(r["text"]), row["target"]),
            "layers": r["layers"], "steps": r["steps"], "ms": r["ms"]}


def summary(rows: list[dict], method: str) -> dict:
    js = [judge(r, method) for r in rows]
    halted = [j for j in js if j["halted"]]
    wrong = [j for j in js if j["base_wrong"]]
    shown = sum(j["shown"] for j in js)
    steps = sum(j["steps"] for j in js)
    return {
        "halt_precision": round(100 * mean([j["next_wrong"] for j in halted]), 1) if halted else 0.0,
        "halt_recall": round(100 * mean([j["halted"] for j in wrong]), 1) if wrong else 0.0,
        "shown_precision": round(100 * sum(j["matched"] for j in js) / shown, 1) if shown else 0.0,
        "shown_chars": round(shown / len(js), 1),
        "layers_per_token": round(sum(j["layers"] for j in js) / steps, 2) if steps else 0.0,
        "ms": round(mean([j["ms"] for j in js]), 1),
        "em": round(mean([j["em"] for j in js]), 2), "es": round(mean([j["es"] for j in js]), 2),
        "halted": len(halted), "tasks": len(js),
    }


def sweep(rows: list[dict], thresholds) -> list[dict]:
    """Shown precision and characters shown if halting used each threshold (from the traced run)."""
    out = []
    for thr in thresholds:
        shown = hit = 0
        for row in rows:
            t = row["trace"]
            ps = t["p_stop"] or []
            cut = next((i for i, p in enumerate(ps) if p >= thr), None)
            text = t["text"] if cut is None else text_at(t["texts"], cut)
            shown += len(text)
            hit += matched(text, row["truth"])
        out.append({"threshold": round(float(thr), 4), "shown_precision": round(100 * hit / shown, 1) if shown else 0.0,
                    "shown_chars": round(shown / len(rows), 1)})
    return out


def report(rows: list[dict], *, default_halt: float | None, plot: str | None) -> dict:
    extra = sorted({k for r in rows for k in r if k.startswith("exit@")})
    result = {m: summary([r for r in rows if m in r], m) for m in (*METHODS, *extra)}
    print("| method | halt precision % | halt recall % | shown precision % | chars shown | layers/token | ms | EM | ES |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, s in result.items():
        print(f"| {m} | {s['halt_precision']} | {s['halt_recall']} | {s['shown_precision']} | {s['shown_chars']} | "
              f"{s['layers_per_token']} | {s['ms']} | {s['em']} | {s['es']} |")
    g = result["greedy"]
    for m in ("exit", *extra):
        print(f"{m}: {100 * (1 - result[m]['layers_per_token'] / g['layers_per_token']):.1f}% of layers saved, "
              f"ms {result[m]['ms'] / g['ms']:.2f}x greedy, first-line ES {result[m]['es'] - g['es']:+.2f}")
    all_p = np.array([p for r in rows for p in (r["trace"]["p_stop"] or []) if p >= 0])
    thresholds = sorted(set(np.quantile(all_p, [0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]).tolist()) |
                        ({default_halt} if default_halt else set()) | {math.inf}) if len(all_p) else [math.inf]
    table = sweep(rows, thresholds)
    print("| halt threshold | shown precision % | chars shown |")
    print("|---|---|---|")
    for s in table:
        mark = " (default)" if default_halt is not None and abs(s["threshold"] - default_halt) < 1e-4 else ""
        print(f"| {s['threshold']}{mark} | {s['shown_precision']} | {s['shown_chars']} |")
    if plot:
        from bench.plot import scatter_png

        pts = {("off" if math.isinf(s["threshold"]) else f"{s['threshold']:.2f}"): (s["shown_chars"], s["shown_precision"])
               for s in table}
        scatter_png(pts, plot, xlabel="characters shown per suggestion (mean)", ylabel="shown text precision (%)",
                    title="Halting: precision of the shown text across halt thresholds", line=True,
                    legend_title="halt threshold", caption="bench.exit: a traced greedy run's per-step P(stop) "
                    "cut at each threshold; precision = characters matching the author's text / characters shown.")
        print(f"plot -> {plot}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--plot", help="PNG of shown precision against chars shown across halt thresholds")
    p.add_argument("--exit-threshold", type=float, help="override the calibrated P(exit) cut-off")
    p.add_argument("--exit-sweep", default="", help="comma-separated P(exit) cut-offs run as extra methods exit@T")
    p.add_argument("--halt-threshold", type=float, help="override the calibrated P(stop) cut-off")
    args = p.parse_args(argv)
    engine = None
    if args.summarize:
        rows = list(saved_rows(*args.summarize).values())
    else:
        if not args.tasks:
            p.error("--tasks is required unless --summarize")
        engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
        if engine.exits is None:
            p.error("the model has no exit heads: run `ghostline calibrate --steps exits`")
        engine.exits = engine.exits.with_thresholds(exit=args.exit_threshold, halt=args.halt_threshold)
        sweep = [float(t) for t in args.exit_sweep.split(",") if t]
        rows = run_rows(args, lambda task: run_task(engine, task, max_tokens=args.max_tokens, sweep=sweep),
                        lambda row: " | ".join(f"{m} {row[m]['tokens']}t {row[m]['reason']} {row[m]['ms']:.0f}ms"
                                               for m in METHODS))
    default = None
    if engine is not None:
        default = engine.exits.halt_threshold
    elif rows and "halt_threshold" in rows[0]:
        default = rows[0]["halt_threshold"]
    result = report(rows, default_halt=default, plot=args.plot)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
