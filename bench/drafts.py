"""Drafts benchmark: k suggestions per request, after an edit (../shared/EVAL.md: open
`before`, apply `changes` as one edit, complete one line at `cursor`).

  greedy             1 draft, the reference
  superposed         k drafts, one forward per step (Superposed Decoding, engine.decoding.superposed)
  superposed_rerank  the same, final drafts re-scored by one batched forward (our addition)
  superposed_anchor  draft 1 greedy in its own row of a batch-2 step, k-1 superposed (our addition)
  nucleus            k samples (top_p 0.9, T 0.8), k separate decodes
  beam               beam search with k beams

    python -m bench.drafts --tasks ../shared/data/edits-requests.jsonl --k 3 [--limit N] [--model M]
    python -m bench.drafts --tasks FILE --shard 0/4 --out rows0.jsonl   # one of 4 processes; resumable
    python -m bench.drafts --summarize rows0.jsonl rows1.jsonl ...       # the table and JSON from rows

Per method: em/es of the top draft's first line, best_of_k_em/es (any draft's first line), distinct
drafts per request, ms per request. One line per task, a markdown table, and last one JSON line
keyed by method.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from bench.tasks import append_row, cursor_offset, em, es, first_line, mean, pct, read_tasks, saved_rows, shard
from ghostline.engine.decoding.superposed import SuperposedParams
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions

METHODS = ("greedy", "superposed", "superposed_rerank", "superposed_anchor", "nucleus", "beam")
URI = "file:///task.py"


def options(method: str, *, k: int, max_tokens: int, params: SuperposedParams | None = None) -> CompletionOptions:
    if method == "greedy":
        return CompletionOptions(max_tokens=max_tokens)
    if method.startswith("superposed"):
        params = params or SuperposedParams(rerank=method == "superposed_rerank", anchor=method == "superposed_anchor")
        return CompletionOptions(max_tokens=max_tokens, drafts=k, decoder="superposed", superposed=params)
    return CompletionOptions(max_tokens=max_tokens, drafts=k, decoder=method)


def prepare(engine: Engine, task: dict) -> int:
    """Open `before` (its n-gram table built, as in an editor where it was open), apply the edit;
    the cursor offset."""
    engine.open(URI, task["before"])
    engine.ngrams.prob([[0]], [0], uri=URI)
    engine.edit(URI, task["changes"])
    assert engine.text(URI) == task["after"], "edit did not reproduce `after`"
    return cursor_offset(task)


def score(out, target: str) -> dict:
    """Scores of one completion against the target line."""
    top = first_line(out.text)
    preds = [first_line(d) for d in (out.drafts or [out.text])]
    return {"em": em(top, target), "es": es(top, target), "best_of_k_em": max(em(p, target) for p in preds),
            "best_of_k_es": max(es(p, target) for p in preds), "distinct": len({p.strip() for p in preds if p.strip()}),
            "ms": out.ms, "top": top}


def summary(rows: list[dict]) -> dict:
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    out = {key: round(mean(col(key)), 2) for key in ("em", "es", "best_of_k_em", "best_of_k_es", "distinct")}
    out["ms_per_request"] = round(mean(col("ms")), 1)
    out["ms_p50"] = round(pct(col("ms"), 50), 1)
    out["tasks"] = len(rows)
    return out


def run(engine: Engine, tasks: list[dict], methods, *, k: int, max_tokens: int = 48, log=print,
        out: str | None = None) -> dict:
    """Run the tasks; with `out`, each task's rows are appended to that JSONL file as it finishes and
    tasks already there are skipped (a long run resumes), and the summary covers the file."""
    saved = saved_rows(out)
    rows = {m: [r[m] for r in saved.values()] for m in methods}
    for n, task in enumerate(tasks, 1):
        if task["id"] in saved:
            continue
        offset = prepare(engine, task)
        parts = []
        for m in methods:
            torch.manual_seed(n)  # nucleus samples are reproducible per task
            got = engine.complete(URI, offset, options(m, k=k, max_tokens=max_tokens))
            r = score(got, task["target"])
            rows[m].append(r)
            parts.append(f"{m} {r['em']:.0f}/{r['best_of_k_em']:.0f} d{r['distinct']} {r['ms']:.0f}ms")
        engine.close(URI)
        append_row(out, {"id": task["id"], **{m: rows[m][-1] for m in methods}})
        log(f"[{n}/{len(tasks)}] {task['id']} | " + " | ".join(parts), flush=True)
    return {m: summary(rows[m]) for m in methods}


def summarize(paths: list[str]) -> dict:
    """The summary over rows files written by `--out` (for example one per shard)."""
    saved = saved_rows(*paths)
    methods = [m for m in METHODS if all(m in r for r in saved.values())]
    return {m: summary([r[m] for r in saved.values()]) for m in methods}


def table(results: dict) -> str:
    lines = ["| method | EM | ES | best-of-k EM | best-of-k ES | distinct | ms/request | ms p50 |", "|" + "---|" * 8]
    for m, r in results.items():
        lines.append(f"| {m} | {r['em']:.1f} | {r['es']:.1f} | {r['best_of_k_em']:.1f} | {r['best_of_k_es']:.1f} | "
                     f"{r['distinct']:.2f} | {r['ms_per_request']:.0f} | {r['ms_p50']:.0f} |")
    return "\n".join(lines)


def warm(engine: Engine) -> None:
    """First-call costs out of the timings: the token-text table (token healing), one forward."""
    _ = engine.tok.strings
    engine.open(URI, "def f(x):\n    return x\n")
    engine.complete(URI, 10)
    engine.close(URI)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--plot", help="write a PNG: best-of-k EM against ms per request, one point per method")
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--head", choices=("code", "full"), default="code", help="LM head (code: the server's default)")
    p.add_argument("--shard", help="i/n: run every n-th task from the i-th (0-based), to split a run over processes")
    p.add_argument("--out", help="JSONL of per-task rows: appended as tasks finish; a rerun resumes from it")
    p.add_argument("--summarize", nargs="+", metavar="ROWS", help="no run: the table and JSON of these rows files")
    args = p.parse_args(argv)
    if args.summarize:
        return report(summarize(args.summarize), plot=args.plot, k=args.k)
    if not args.tasks:
        p.error("--tasks is required (or --summarize)")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}")
    tasks = shard(read_tasks(args.tasks, args.limit), args.shard)
    t0 = time.perf_counter()
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    warm(engine)
    print(f"model {engine.loaded.source.name} ready in {time.perf_counter() - t0:.1f}s; {len(tasks)} tasks; k={args.k}",
          flush=True)
    results = run(engine, tasks, methods, k=args.k, max_tokens=args.max_tokens, out=args.out)
    return report(results, plot=args.plot, k=args.k)


def report(results: dict, *, plot: str | None, k: int) -> int:
    print(table(results))
    if plot:
        from bench.plot import scatter_png

        points = {m: (r["ms_per_request"], r["best_of_k_em"]) for m, r in results.items()}
        scatter_png(points, plot, xlabel="time per request (ms, mean)", ylabel=f"best-of-{k} EM (%)",
                    title=f"Drafts: best-of-{k} exact match against time per request", legend_title="method",
                    caption=f"bench.drafts: {k} drafts per request, first line of each draft against the target.")
        print(f"plot -> {plot}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
