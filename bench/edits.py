"""Edit benchmark (../shared/EVAL.md): open `before`, apply `changes` as one edit, complete one line
at `cursor` (greedy, at most 48 new tokens), for each cache-update mode:

  full    re-encode the whole document after the edit (the quality reference)
  prefix  keep the cache up to the first changed token, re-encode the rest (prefix caching)
  pie     encode only the new tokens, move the suffix and rotate its keys (PIE)
  naive   encode the new tokens, move the suffix without fixing its positions

    python -m bench.edits --tasks ../shared/data/edits-requests.jsonl --mode all [--limit N]

One line per task, then (for --mode all) a markdown table, and last one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

from bench.tasks import cursor_offset, em, es, first_line, mean, pct, read_tasks
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions

MODES = ("full", "prefix", "pie", "naive")


def fork(engine: Engine, src: str, dst: str) -> None:
    """A copy of an open document with its own cache (so each mode starts from the same warm state)."""
    doc = copy.copy(engine.docs[src])
    doc.uri, doc.stale = dst, bytearray(doc.stale)
    doc.cache = None if doc.cache is None else doc.cache.clone()  # None: a long file's window not placed yet
    engine.docs[dst] = doc


def run(engine: Engine, tasks: list[dict], modes: tuple[str, ...], *, max_tokens: int = 48, log=print,
        out: str | None = None) -> list[dict]:
    """Run the tasks; with `out`, each task's rows are appended to that JSONL file as it finishes and
    tasks already there are skipped (so a long run can be resumed), and the summary covers the file."""
    rows = {m: [] for m in modes}
    done = set()
    if out and os.path.exists(out):
        for line in open(out):
            saved = json.loads(line)
            done.add(saved["id"])
            for m in modes:
                rows[m].append(saved[m])
    opts = CompletionOptions(multiline=False, max_tokens=max_tokens)
    for n, task in enumerate(tasks, 1):
        if task["id"] in done:
            continue
        t0 = time.perf_counter()
        engine.open("before", task["before"])
        open_ms = (time.perf_counter() - t0) * 1e3
        offset = cursor_offset(task)
        parts = []
        for mode in modes:
            fork(engine, "before", mode)
            up = engine.edit(mode, task["changes"], strategy=mode)
            assert engine.text(mode) == task["after"], "edit did not reproduce `after`"
            got = engine.complete(mode, offset, opts)
            pred = first_line(got.text)
            rows[mode].append({"em": em(pred, task["target"]), "es": es(pred, task["target"]), "update_ms": up.ms,
                               "complete_ms": got.ms, "ctx": got.ctx_tokens, "encoded": up.encoded, "stale": up.stale})
            parts.append(f"{mode} {rows[mode][-1]['em']:.0f}/{rows[mode][-1]['es']:.0f} {up.ms:.0f}ms")
            engine.close(mode)
        engine.close("before")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"id": task["id"], **{m: rows[m][-1] for m in modes}}) + "\n")
        log(f"[{n}/{len(tasks)}] {task['id']} tokens={len(engine.tok.encode(task['after'])[0])} open={open_ms:.0f}ms | "
            + " | ".join(parts), flush=True)
    return [summary(m, rows[m]) for m in modes]


def summary(mode: str, rows: list[dict]) -> dict:
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {
        "mode": mode, "tasks": len(rows), "em": round(mean(col("em")), 2), "es": round(mean(col("es")), 2),
        "update_ms_p50": round(pct(col("update_ms"), 50), 1), "update_ms_p95": round(pct(col("update_ms"), 95), 1),
        "complete_ms_p50": round(pct(col("complete_ms"), 50), 1), "complete_ms_p95": round(pct(col("complete_ms"), 95), 1),
        "ctx_tokens_p50": pct(col("ctx"), 50), "encoded_tokens_p50": pct(col("encoded"), 50),
        "stale_tokens_p50": pct(col("stale"), 50),
    }


def table(results: list[dict]) -> str:
    head = "| mode | tasks | EM | ES | update ms p50 | update ms p95 | complete ms p50 | ctx tokens p50 | encoded p50 | stale p50 |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {r['mode']} | {r['tasks']} | {r['em']:.1f} | {r['es']:.1f} | {r['update_ms_p50']:.1f} | "
                     f"{r['update_ms_p95']:.1f} | {r['complete_ms_p50']:.0f} | {r['ctx_tokens_p50']:.0f} | "
                     f"{r['encoded_tokens_p50']:.0f} | {r['stale_tokens_p50']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--mode", choices=MODES + ("all",), default="pie")
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32", help="layer weights (fp32: the reference)")
    p.add_argument("--head", choices=("full", "code"), default="full", help="LM head (full: the reference)")
    p.add_argument("--out", help="JSONL of per-task rows: appended as tasks finish; a rerun resumes from it")
    args = p.parse_args(argv)
    tasks = read_tasks(args.tasks, args.limit)
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    print(f"{args.precision}/{args.head} model {engine.loaded.source.name} loaded in {engine.loaded.seconds:.1f}s "
          f"({'cached' if engine.loaded.from_cache else 'first start'}); {len(tasks)} tasks", flush=True)
    modes = MODES if args.mode == "all" else (args.mode,)
    results = run(engine, tasks, modes, max_tokens=args.max_tokens, out=args.out)
    if args.mode == "all":
        print(table(results))
        print(json.dumps(results))
    else:
        print(json.dumps(results[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
