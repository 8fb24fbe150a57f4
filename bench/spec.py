"""Speculative decoding benchmark: 64-token multi-line suggestions after the edit (../shared/EVAL.md
set-up: open `before`, apply `changes` with PIE, complete at `cursor`), greedy against each
speculative decoder, with a check that every output equals greedy's.

    python -m bench.spec --tasks ../shared/data/edits-requests.jsonl [--limit N]

Methods: `greedy`, `ngram` (prompt lookup in the document and the other open documents), `self`
(the model's first layers + an exit head draft, engine.decoding.speculative.EarlyLayers: the depth
chosen by measured acceptance, no drafting where it does not pay), `both` (prompt lookup where it
finds a match, early layers elsewhere), `ngram-draft-verify` (prompt lookup with Draft&Verify's
draft-length rule, engine.decoding.speculative.DraftLength, against the default MatchGoodput). `--precision`/`--head` as the server's (default int8/code).
With --out, rows are appended per task (resumable; `--shard i/n`), `--summarize` reports from rows.

    python -m bench.spec --tasks ../shared/data/edits-requests.jsonl --simulate ROWS [--row-cost 0 0.1 0.2]

    python -m bench.spec --tasks ../shared/data/edits-requests.jsonl --verify-costs 0 3 40

`--verify-costs I...` times a verify step of T = 1..9 tokens (forward + greedy choice of every row,
minimum of 20) at the cursor of tasks I (after their edit): the cost table behind
MatchGoodput.COST, as ratios to the decode step (T = 1).

`--simulate` answers "what would prompt lookup give if a verify row cost b of a decode step": it
replays the engine's proposer and draft-length rule (PromptLookup, MatchGoodput with costs 1 + b k)
against the greedy outputs recorded in ROWS, accepting each draft up to its first token that differs
from greedy's (what verification accepts), and prices each verify step of 1 + k tokens 1 + b k. The
context is the tokenized `after` text up to the cursor (the engine's PIE-edited ids can differ a
little), so the ratio is a model of the run, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench.tasks import add_run_args, cursor_offset, mean, read_tasks, run_rows, saved_rows
import numpy as np

from ghostline.engine.decoding.speculative import MatchGoodput
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.ngram import PromptLookup

DECODERS = {"greedy": "greedy", "ngram": "lookup", "self": "self", "both": "lookup+self",
            "ngram-draft-verify": "lookup"}  # the last: Draft&Verify's draft-length rule instead of the default


def run_task(engine: Engine, task: dict, *, max_tokens: int, methods=tuple(DECODERS)) -> dict:
    engine.open("doc", task["before"])
    engine.edit("doc", task["changes"])
    offset = cursor_offset(task)
    row = {"id": task["id"]}
    for method in methods:
        decoder = DECODERS[method]
        rule = "draft-verify" if method.endswith("-draft-verify") else "match"
        out = engine.complete("doc", offset, CompletionOptions(multiline=True, max_tokens=max_tokens, decoder=decoder,
                                                               draft_length=rule))
        r = {"ms": out.ms, "tokens": out.tokens}
        if decoder != "greedy":
            st = out.stats
            r |= {"steps": st.steps, "accepted": st.accepted, "proposed": st.proposed}
        if decoder in ("self", "lookup+self"):
            r["layer"] = out.stats.layer
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


def simulate(contexts: list[np.ndarray], outputs: list[list[int]], *, row_cost: float, max_tokens: int) -> dict:
    """Prompt lookup + MatchGoodput replayed against greedy outputs, verify steps priced 1 + row_cost k."""
    cost = tuple(1 + row_cost * k for k in range(len(MatchGoodput.COST)))
    work = steps = tokens = 0.0
    for ctx, out in zip(contexts, outputs):
        lookup, rule, seq, done = PromptLookup(), MatchGoodput(cost=cost), ctx, 0
        while done < len(out):
            draft = lookup.propose(seq, min(rule.k, max_tokens - done - 1))
            draft = draft[: rule.keep(lookup.match)] if draft else []
            n = 0
            while n < len(draft) and done + n < len(out) and draft[n] == out[done + n]:
                n += 1
            rule.update(len(draft), n)
            work, steps = work + cost[len(draft)], steps + 1
            seq = np.concatenate([seq, np.asarray(out[done : done + n + 1], dtype=seq.dtype)])
            done += n + 1
        tokens += len(out)
    return {"row_cost": row_cost, "speedup": round(tokens / work, 3), "tokens_per_step": round(tokens / steps, 3)}


def acceptance(contexts: list[np.ndarray], outputs: list[list[int]], *, k: int = 8, long_match: int = 5) -> dict:
    """Prompt lookup's drafts of up to `k` tokens replayed against greedy outputs, by the kind of match
    behind each (MatchGoodput's: a copy is a match of >= `long_match` tokens whose occurrences agree,
    anything else a guess): how often draft token i is right given the ones before it were. What
    MatchGoodput's priors are (one rate per kind, pooled over positions)."""
    hits, tries = np.zeros((2, k)), np.zeros((2, k))
    for ctx, out in zip(contexts, outputs):
        lookup, seq, done = PromptLookup(), ctx, 0
        while done < len(out):
            draft = lookup.propose(seq, min(k, len(out) - done))
            m = lookup.match
            kind = int(m is not None and m.n >= long_match and m.agree)
            n = 0
            while n < len(draft) and draft[n] == out[done + n]:
                n += 1
            reached = min(len(draft), n + 1)
            tries[kind, :reached] += 1
            hits[kind, :n] += 1
            seq = np.concatenate([seq, np.asarray(out[done : done + n + 1], dtype=seq.dtype)])
            done += n + 1
    return {name: {"drafts": int(tries[i, 0]), "first": round(hits[i, 0] / tries[i, 0], 3) if tries[i, 0] else None,
                   "pooled": round(hits[i].sum() / tries[i].sum(), 3) if tries[i].sum() else None,
                   "by_position": [round(h / t, 3) if t else None for h, t in zip(hits[i], tries[i])]}
            for i, name in enumerate(("guess", "copy"))}


def verify_costs(engine: Engine, task: dict, *, rows: int = 9, repeat: int = 20) -> dict:
    """ms of a verify step of T = 1..rows tokens at the task's cursor, the best of `repeat`."""
    import time

    import torch

    from ghostline.engine.cache import ScratchCache
    from ghostline.engine.model import greedy_ids

    engine.open("doc", task["before"])
    engine.edit("doc", task["changes"])
    doc = engine.docs["doc"]
    P = doc.token_at(cursor_offset(task))
    scratch, model, ms = ScratchCache(doc.cache, P - 1, rows + 1), engine.model, {}
    for T in range(1, rows + 1):
        ids, pos, best = torch.tensor([doc.ids[P - T : P]]), torch.arange(P - 1, P - 1 + T), float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            scratch.trim(0)
            greedy_ids(model, model(ids, pos, scratch, return_hidden=True)[0]).tolist()
            best = min(best, time.perf_counter() - t0)
        ms[T] = round(best * 1e3, 2)
    engine.close("doc")
    return {"context": P, "ms": ms, "cost": [round(ms[T] / ms[1], 2) for T in ms]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(p)
    p.add_argument("--simulate", help="rows file whose greedy outputs to replay prompt lookup against")
    p.add_argument("--row-cost", type=float, nargs="+", default=[0.0, 0.08, 0.14, 0.2, 0.3],
                   help="with --simulate: a verify row's cost against a decode step")
    p.add_argument("--verify-costs", type=int, nargs="+", metavar="I", help="time verify steps at these tasks' cursors")
    p.add_argument("--acceptance", action="store_true",
                   help="with --simulate: prompt lookup's acceptance by kind of match (MatchGoodput's priors)")
    p.add_argument("--methods", default=",".join(DECODERS), help=f"some of {', '.join(DECODERS)}")
    args = p.parse_args(argv)
    methods = tuple(m for m in args.methods.split(",") if m)
    if "greedy" not in methods or not set(methods) <= set(DECODERS):
        p.error(f"--methods: greedy and any of {', '.join(DECODERS)}")
    if args.verify_costs:
        if not args.tasks:
            p.error("--verify-costs needs --tasks")
        tasks = read_tasks(args.tasks)
        engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
        results = [verify_costs(engine, tasks[i]) for i in args.verify_costs]
        print("| context | " + " | ".join(f"T={T}" for T in results[0]["ms"]) + " |")
        print("|---|" + "---|" * len(results[0]["ms"]))
        for r in results:
            print(f"| {r['context']} | " + " | ".join(f"{ms} ms ({c}x)" for ms, c in zip(r["ms"].values(), r["cost"])) + " |")
        print(json.dumps(results))
        return 0
    if args.simulate:
        if not args.tasks:
            p.error("--simulate needs --tasks (the contexts)")
        from ghostline.engine.loader import load

        rows = saved_rows(args.simulate)
        tok = load(args.model).tokenizer
        contexts, outputs = [], []
        for task in read_tasks(args.tasks, args.limit):
            if task["id"] in rows:
                ids, offsets = tok.encode(task["after"])
                cursor = cursor_offset(task)
                contexts.append(np.asarray(ids[: sum(1 for o in offsets if o[1] <= cursor)], dtype=np.int64))
                outputs.append(rows[task["id"]]["greedy"]["tokens"])
        if args.acceptance:
            result = acceptance(contexts, outputs)
            print(f"{len(contexts)} tasks")
            print("| match | drafts | first token right | any draft token right given the earlier ones |")
            print("|---|---|---|---|")
            for kind, r in result.items():
                print(f"| {kind} | {r['drafts']} | {r['first']} | {r['pooled']} |")
            print(json.dumps(result))
            return 0
        results = [simulate(contexts, outputs, row_cost=b, max_tokens=args.max_tokens) for b in args.row_cost]
        print(f"{len(contexts)} tasks")
        print("| verify row cost (of a decode step) | tokens per step | speedup over greedy |")
        print("|---|---|---|")
        for r in results:
            print(f"| {r['row_cost']} | {r['tokens_per_step']} | {r['speedup']}x |")
        print(json.dumps(results))
        return 0
    if args.summarize:
        rows = list(saved_rows(*args.summarize).values())
    else:
        if not args.tasks:
            p.error("--tasks is required unless --summarize")
        engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
        rows = run_rows(args, lambda task: run_task(engine, task, max_tokens=args.max_tokens, methods=methods),
                        lambda row: " | ".join(f"{m} {len(row[m]['tokens'])} tok {row[m]['ms']:.0f}ms" for m in methods)
                        + " | identical=" + str(all(row[m]["tokens"] == row["greedy"]["tokens"] for m in methods)))
    print(json.dumps(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
