"""Edit-then-complete tasks (../shared/EVAL.md): loading, the cursor offset, and the scores."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from ghostline.engine.gate import accepted, first_word_end
from ghostline.engine.paths import cache_dir, model_cache_dir
from ghostline.engine.text import offset_of


def read_tasks(path: str | Path, limit: int | None = None) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def cursor_offset(task: dict) -> int:
    c = task["cursor"]
    return offset_of(task["after"], c["line"], c["character"])


def user_document(task: dict) -> tuple[str, int]:
    """`after` with the target removed from the cursor's line (EVAL.md: the document a user has when
    asking), and the cursor's offset in it."""
    c = task["cursor"]
    lines = task["after"].split("\n")
    lines[c["line"]] = lines[c["line"]][: c["character"]]
    return "\n".join(lines), sum(len(x) + 1 for x in lines[: c["line"]]) + c["character"]


def mid_line(task: dict) -> dict | None:
    """The task with the user past its target's first word (typed, the cursor after it) and the rest of
    the line as its target: a request mid-line; None where the target is one word."""
    end = first_word_end(task["target"])
    rest = task["target"][end:]
    if not end or not rest.strip():
        return None
    cursor = {**task["cursor"], "character": task["cursor"]["character"] + end}
    return {**task, "id": f"{task['id']}-mid", "cursor": cursor, "target": rest}


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def em(prediction: str, target: str) -> float:
    return 100.0 * (prediction.strip() == target.strip())


def es(prediction: str, target: str) -> float:
    return 100.0 * Levenshtein.normalized_similarity(prediction.strip(), target.strip())


def accept_figures(rows: list[dict]) -> dict:
    """The accept model's figures over requests that each showed `pred` (a first line, maybe empty)."""
    n = len(rows)
    shown = [r for r in rows if r["pred"].strip()]
    kept = [accepted(r["pred"], r["target"]) for r in shown]
    useful = sum(1 for k in kept if k.strip())
    return {"shown_pct": round(100 * len(shown) / n, 2) if n else None,
            "accept_pct": round(100 * useful / len(shown), 2) if shown else None,
            "chars_saved": round(sum(len(k) for k in kept) / n, 2) if n else None,
            "wrong_per_100": round(100 * (len(shown) - useful) / n, 2) if n else None}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]) if q < 100 else float(max(values))


def mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else float("nan")


def shard(tasks: list[dict], spec: str | None) -> list[dict]:
    """`spec` "i/n" keeps every n-th task from the i-th (0-based), so n processes split a task file."""
    if not spec:
        return tasks
    i, n = (int(x) for x in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"shard {spec!r}: need 0 <= i < n")
    return tasks[i::n]


def saved_rows(*paths: str | Path | None) -> dict[str, dict]:
    """Rows already written to JSONL results files (missing ones count as empty), by task id: a rerun
    skips those tasks, and `--summarize` merges the files of several shards. `.gz` files are read too."""
    out: dict[str, dict] = {}
    for path in paths:
        if path and Path(path).exists():
            raw = Path(path).read_bytes()
            text = (gzip.decompress(raw) if str(path).endswith(".gz") else raw).decode()
            rows = (json.loads(line) for line in text.splitlines() if line.strip())
            for r in rows:  # the same id in a later file adds its methods (and replaces those it repeats)
                out[r["id"]] = {**out.get(r["id"], {}), **r}
    return out


def own_state(folder: Path) -> dict[str, str]:
    """The variables that give a benchmarked server `folder` as its cache, holding a copy of the
    caller's compiled kernels, and the caller's model cache: its acceptance counts (and what the show
    gate learns from them) start empty and stay this run's, so neither a user's history nor another
    run moves its threshold, and it starts as on every start but the first."""
    kernels = cache_dir() / "kernels"
    if kernels.is_dir() and not (folder / "kernels").exists():
        shutil.copytree(kernels, folder / "kernels")
    return {"GHOSTLINE_CACHE": str(folder), "GHOSTLINE_MODEL_CACHE": str(model_cache_dir())}


@contextmanager
def fresh_state() -> Iterator[dict[str, str]]:
    """The whole environment for a benchmarked server with `own_state` in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="ghostline-bench-state-"))
    try:
        yield {**os.environ, **own_state(folder)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def append_row(path: str | Path | None, row: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def form_figures(rows: list[dict], form: str) -> dict:
    """EM, ES and the accept figures of the first lines rows hold under `form` (rows without it skipped)."""
    scored = [{"pred": r[form], "target": r["target"]} for r in rows if form in r]
    return {"tasks": len(scored), "em": round(mean([em(r["pred"], r["target"]) for r in scored]), 2),
            "es": round(mean([es(r["pred"], r["target"]) for r in scored]), 2), **accept_figures(scored)}


def chosen_forms(p, value: str, known: tuple[str, ...]) -> list[str]:
    """The `--forms` a form benchmark was given, in order; a parser error for one it does not know."""
    forms = [f for f in value.split(",") if f]
    if unknown := set(forms) - set(known):
        p.error(f"unknown forms {sorted(unknown)} (of {', '.join(known)})")
    return forms


def run_forms(tasks: list[dict], out: str | None, forms: list[str], run) -> list[dict]:
    """Each task's row (`run(task)`: its first line per form), resuming from the rows `out` holds and
    appending each new one there; a progress line per task."""
    saved = saved_rows(out)
    rows = [saved[t["id"]] for t in tasks if t["id"] in saved]
    for n, task in enumerate(tasks, 1):
        if task["id"] in saved:
            continue
        row = run(task)
        rows.append(row)
        append_row(out, row)
        print(f"[{n}/{len(tasks)}] {task['id']} | " + " | ".join(f"{f} {row[f].strip()[:30]!r}" for f in forms),
              flush=True)
    return rows


def add_run_args(p, *, max_tokens: int = 64) -> None:
    """The arguments of a per-task benchmark with resumable rows (bench.exit, bench.spec)."""
    p.add_argument("--tasks")
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--precision", default="int8", choices=("fp32", "int8"), help="as the server's (default int8)")
    p.add_argument("--head", default="code", choices=("full", "code"))
    p.add_argument("--shard", help="i/n: every n-th task from the i-th")
    p.add_argument("--out", help="append each task's row to this JSONL file (a rerun skips what is there)")
    p.add_argument("--summarize", nargs="+", help="rows files to report on, without running")


def run_rows(args, run_task, describe) -> list[dict]:
    """Rows of `args.out` plus `run_task(task)` for each task not there yet (appended as they finish)."""
    saved = saved_rows(args.out)
    rows = list(saved.values())
    tasks = shard(read_tasks(args.tasks, args.limit), args.shard)
    for n, task in enumerate(tasks, 1):
        if task["id"] in saved:
            continue
        row = run_task(task)
        rows.append(row)
        append_row(args.out, row)
        print(f"[{n}/{len(tasks)}] {task['id']} | {describe(row)}", flush=True)
    return rows
