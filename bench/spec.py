"""Speculative decoding benchmark: 64-token multi-line suggestions after the edit (../shared/EVAL.md
set-up: open `before`, apply `changes` with PIE, complete at `cursor`), greedy against each
speculative decoder, with a check that every output equals greedy's.

    python -m bench.spec --tasks ../shared/data/edits-requests.jsonl [--limit N]

Methods: `greedy`, `ngram` (prompt lookup in the document and the other open documents). The
self-speculation proposer (early layers + exit head) needs the exit heads of the early-exit work
and is not in this benchmark yet.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.tasks import cursor_offset, mean, read_tasks
from engine.engine import CompletionOptions, Engine

DECODERS = {"greedy": "greedy", "ngram": "lookup"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    engine = Engine.load(args.model)
    tasks = read_tasks(args.tasks, args.limit)
    rows = {m: {"ms": [], "tokens": [], "accepted": [], "outputs": []} for m in DECODERS}
    for n, task in enumerate(tasks, 1):
        engine.open("doc", task["before"])
        engine.edit("doc", task["changes"])
        offset = cursor_offset(task)
        parts = []
        for method, decoder in DECODERS.items():
            out = engine.complete("doc", offset, CompletionOptions(
                multiline=True, max_tokens=args.max_tokens, decoder=decoder))
            r = rows[method]
            r["ms"].append(out.ms)
            r["tokens"].append(len(out.tokens))
            r["outputs"].append(out.tokens)
            if decoder == "lookup":
                r["accepted"].append(engine.last_spec.mean_accepted)
            parts.append(f"{method} {len(out.tokens)} tok {out.ms:.0f}ms")
        same = rows["ngram"]["outputs"][-1] == rows["greedy"]["outputs"][-1]
        print(f"[{n}/{len(tasks)}] {task['id']} " + " | ".join(parts) + f" | identical={same}", flush=True)
        engine.close("doc")
    result = {}
    for method, r in rows.items():
        result[method] = {
            "tokens_per_s": round(sum(r["tokens"]) / (sum(r["ms"]) / 1e3), 2),
            "mean_accepted": round(mean(r["accepted"]), 3) if r["accepted"] else 0.0,
            "ms": round(mean(r["ms"]), 1),
            "identical": all(o == g for o, g in zip(r["outputs"], rows["greedy"]["outputs"])),
        }
    print("| method | tokens/s | mean accepted per verify step | ms per suggestion | identical to greedy |")
    print("|---|---|---|---|---|")
    for method, r in result.items():
        print(f"| {method} | {r['tokens_per_s']} | {r['mean_accepted']} | {r['ms']} | {r['identical']} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
