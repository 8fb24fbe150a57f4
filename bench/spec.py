"""Speculative decoding benchmark: 64-token multi-line suggestions after the edit (../shared/EVAL.md
set-up: open `before`, apply `changes` with PIE, complete at `cursor`), greedy against each
speculative decoder, with a check that every output equals greedy's.

    python -m bench.spec --tasks ../shared/data/edits-requests.jsonl [--limit N]

Methods: `greedy`, `ngram` (prompt lookup in the document and the other open documents), `self`
(the model's first layers + an exit head draft, engine.decoding.speculative.EarlyLayers: the depth
chosen by measured acceptance, no drafting where it does not pay), `both` (prompt lookup where it
finds a match, early layers elsewhere), `ngram-rejection` (prompt lookup with SpecDec++'s draft-length
rule, engine.decoding.speculative.RejectionRule, against Draft&Verify's). `--precision`/`--head` as the server's (default int8/code).
With --out, rows are appended per task (resumable; `--shard i/n`), `--summarize` reports from rows.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.tasks import add_run_args, cursor_offset, mean, run_rows, saved_rows
from engine.engine import CompletionOptions, Engine, EngineOptions

DECODERS = {"greedy": "greedy", "ngram": "lookup", "self": "self", "both": "lookup+self",
            "ngram-rejection": "lookup"}  # the last: SpecDec++'s draft-length rule instead of Draft&Verify's


def run_task(engine: Engine, task: dict, *, max_tokens: int) -> dict:
    engine.open("doc", task["before"])
    engine.edit("doc", task["changes"])
    offset = cursor_offset(task)
    row = {"id": task["id"]}
    for method, decoder in DECODERS.items():
        rule = "rejection" if method.endswith("-rejection") else "draft-verify"
        out = engine.complete("doc", offset, CompletionOptions(multiline=True, max_tokens=max_tokens, decoder=decoder,
                                                               draft_length=rule))
        r = {"ms": out.ms, "tokens": out.tokens}
        if decoder != "greedy":
            st = engine.last_spec
            r |= {"steps": st.steps, "accepted": st.accepted, "proposed": st.proposed}
        if decoder in ("self", "lookup+self"):
            r["layer"] = engine.last_early.layer
        row[method] = r
    engine.close("doc")
    return row


def summarize(rows: list[dict]) -> dict:
    result = {}
    for method in (m for m in DECODERS if all(m in r for r in rows)):  # rows of older runs lack newer methods
        rs = [r[method] for r in rows]
        tokens, secs = sum(len(r["tokens"]) for r in rs), sum(r["ms"] for r in rs) / 1e3
        steps = sum(r.get("steps", 0) for r in rs)
        result[method] = {
            "tokens_per_s": round(tokens / secs, 2) if secs else 0.0,
            "mean_accepted": round(sum(r.get("accepted", 0) for r in rs) / steps, 3) if steps else 0.0,
            "ms": round(mean([r["ms"] for r in rs]), 1),
            "identical": all(r[method]["tokens"] == r["greedy"]["tokens"] for r in rows),
        }
    g = result["greedy"]["tokens_per_s"]
    print(f"{len(rows)} tasks")
    print("| method | tokens/s | vs greedy | mean accepted per verify step | ms per suggestion | identical to greedy |")
    print("|---|---|---|---|---|---|")
    for method, r in result.items():
        print(f"| {method} | {r['tokens_per_s']} | {r['tokens_per_s'] / g:.2f}x | {r['mean_accepted']} | {r['ms']} | "
              f"{r['identical']} |")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    args = p.parse_args(argv)
    if args.summarize:
        rows = list(saved_rows(*args.summarize).values())
    else:
        if not args.tasks:
            p.error("--tasks is required unless --summarize")
        engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
        rows = run_rows(args, lambda task: run_task(engine, task, max_tokens=args.max_tokens), lambda row: " | ".join(
            f"{m} {len(row[m]['tokens'])} tok {row[m]['ms']:.0f}ms" for m in DECODERS) + " | identical="
            + str(all(row[m]["tokens"] == row["greedy"]["tokens"] for m in DECODERS)))
    print(json.dumps(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
