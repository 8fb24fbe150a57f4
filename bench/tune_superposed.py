"""Fit superposed decoding's alpha, n-gram weight scale and temperature on tasks made from code that
is not in ../shared/data: the Python standard library of the interpreter running this script.

A task (EVAL.md's format): take a stdlib file, cut it 20 lines below a random cursor line (and
150 above), and make an edit a few lines above the cursor: the line was just written (insert) or
just finished (replace: `before` has it cut short). The target is the cursor line's text from its first non-blank
character. Each configuration of the grid completes every task with k drafts; the winner has the
highest best-of-k EM (ties: top-1 EM, then best-of-k ES). Writes the chosen parameters with every
configuration's scores and the tasks' sources to --out.

    python -m bench.tune_superposed --tasks 60 --k 3 [--model M] [--alphas 0,0.3,0.54,0.8] ...
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.drafts import URI, prepare, score, summary, warm
from ghostline.engine.decoding.superposed import SuperposedParams
from ghostline.engine.engine import CompletionOptions, Engine

PACKAGES = ("json", "http", "email", "urllib", "logging", "importlib", "concurrent/futures", "xml/dom", "asyncio")


def stdlib_files() -> list[Path]:
    root = Path(json.__file__).parent.parent
    files = [f for pkg in PACKAGES for f in sorted((root / pkg).glob("*.py"))]
    return [f for f in files if len(f.read_text(encoding="utf-8", errors="replace").splitlines()) >= 80]


def make_task(path: Path, rng: random.Random, *, below: int = 20, above: int = 150) -> dict | None:
    """One edit-then-complete task from a file, or None when the draw does not fit. The document
    keeps at most `above` lines above the cursor (long stdlib modules would make encoding dominate)."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    c = rng.randrange(30, len(lines) - 1)
    top = max(0, c - above)
    lines, c = lines[top:], c - top
    indent = len(lines[c]) - len(lines[c].lstrip())
    target = lines[c][indent:]
    if len(target.strip()) < 8 or target.startswith("#"):
        return None
    e = rng.randrange(max(1, c - 40), c - 2)
    if not lines[e].strip():
        return None
    after_lines = lines[: c + 1 + below]
    if rng.random() < 0.5:  # insert: line e was just written
        before_lines = after_lines[:e] + after_lines[e + 1 :]
        change = {"range": {"start": {"line": e, "character": 0}, "end": {"line": e, "character": 0}},
                  "text": after_lines[e] + "\n"}
        kind = "insert"
    else:  # replace: line e was cut short, now finished
        full = after_lines[e]
        cut = rng.randrange(len(full) - len(full.lstrip()), len(full))
        before_lines = after_lines[:e] + [full[:cut]] + after_lines[e + 1 :]
        change = {"range": {"start": {"line": e, "character": 0}, "end": {"line": e, "character": cut}},
                  "text": full}
        kind = "replace"
    rel = path.relative_to(Path(json.__file__).parent.parent)
    return {"id": f"stdlib/{rel}:{top + c + 1}", "source": f"python{sys.version_info.major}.{sys.version_info.minor}:{rel}",
            "edit_kind": kind, "before": "\n".join(before_lines), "changes": [change], "after": "\n".join(after_lines),
            "cursor": {"line": c, "character": indent}, "target": target}


def make_tasks(n: int, *, seed: int = 0) -> list[dict]:
    rng, files, tasks = random.Random(seed), stdlib_files(), []
    while len(tasks) < n:
        task = make_task(rng.choice(files), rng)
        if task is not None:
            tasks.append(task)
    return tasks


def grid(alphas, scales, temps, reranks, anchors) -> list[SuperposedParams]:
    out = []
    for a, s, t, r, anchor in itertools.product(alphas, scales, temps, reranks, anchors):
        if a == 0 and s != scales[0]:
            continue  # without n-grams the scale changes nothing
        out.append(SuperposedParams(alpha=a, ngram_scale=s, temperature=t, rerank=r, anchor=anchor))
    return out


def tune(engine: Engine, tasks: list[dict], configs: list[SuperposedParams], *, k: int, max_tokens: int = 48, log=print):
    rows = [[] for _ in configs]
    greedy = []
    for n, task in enumerate(tasks, 1):
        offset = prepare(engine, task)
        greedy.append(score(engine.complete(URI, offset, CompletionOptions(max_tokens=max_tokens)), task["target"]))
        for i, params in enumerate(configs):
            opts = CompletionOptions(max_tokens=max_tokens, drafts=k, superposed=params)
            rows[i].append(score(engine.complete(URI, offset, opts), task["target"]))
        engine.close(URI)
        log(f"[{n}/{len(tasks)}] {task['id']} greedy {greedy[-1]['em']:.0f} | best config so far: "
            f"{max(range(len(configs)), key=lambda i: _key(summary(rows[i])))}", flush=True)
    results = [{"params": asdict(p), **summary(r)} for p, r in zip(configs, rows)]
    return results, summary(greedy)


def _key(s: dict) -> tuple:
    return (s["best_of_k_em"], s["em"], s["best_of_k_es"])


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=60, help="how many tasks to make")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--alphas", default="0,0.3,0.54,0.8")
    p.add_argument("--scales", default="0.5,1,2", help="n-gram weight scale")
    p.add_argument("--temps", default="0.06,0.2,0.5,1")
    p.add_argument("--rerank", default="0,1", help="0: the paper's method, 1: with the final re-rank")
    p.add_argument("--anchor", default="0,1", help="0: the paper's method, 1: draft 1 greedy in its own row")
    p.add_argument("--out", default=str(Path(__file__).with_name("superposed_tuning.json")))
    p.add_argument("--save-tasks", help="also write the tasks as jsonl (for bench.drafts)")
    args = p.parse_args(argv)
    tasks = make_tasks(args.tasks, seed=args.seed)
    if args.save_tasks:
        Path(args.save_tasks).write_text("".join(json.dumps(t) + "\n" for t in tasks))
    flags = lambda text: [bool(int(x)) for x in text.split(",") if x]  # noqa: E731
    configs = grid(_floats(args.alphas), _floats(args.scales), _floats(args.temps), flags(args.rerank), flags(args.anchor))
    t0 = time.perf_counter()
    engine = Engine.load(args.model)
    warm(engine)
    print(f"model {engine.loaded.source.name}; {len(tasks)} tasks; {len(configs)} configurations; k={args.k}", flush=True)
    results, greedy = tune(engine, tasks, configs, k=args.k, max_tokens=args.max_tokens)
    best = max(results, key=_key)
    report = {
        "chosen": best["params"], "criterion": "max best_of_k_em, then em, then best_of_k_es",
        "chosen_scores": {key: best[key] for key in ("em", "es", "best_of_k_em", "best_of_k_es", "distinct", "ms_per_request")},
        "greedy": greedy, "model": engine.loaded.source.name, "k": args.k, "seed": args.seed,
        "tasks": [{"id": t["id"], "edit_kind": t["edit_kind"], "target": t["target"]} for t in tasks],
        "results": sorted(results, key=_key, reverse=True), "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"chosen {best['params']}: best-of-{args.k} EM {best['best_of_k_em']:.1f}, EM {best['em']:.1f} "
          f"(greedy EM {greedy['em']:.1f}); written to {args.out}")
    print(json.dumps({"chosen": best["params"], "greedy": greedy, "best": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
