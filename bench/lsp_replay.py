"""Latency through the LSP, measured as an editor sees it, against the two anchors on the same tasks.

Ghostline: the real server spawned over stdio. Set `edits` (../shared/EVAL.md): didOpen(before), wait
until the cache is warm, then didChange(changes) and textDocument/inlineCompletion at the cursor;
latency runs from sending the change to receiving the answer. Set `bigfile` (bench/bigfile.py): the
same on real ~4,000-token files, an edit in the upper half, the cursor in the lower half. Scenario
`typing` (edits tasks): after the edit, type the target line one character at a time with a request on
every keystroke (as editors do); the figure is the latency of the last request, and how many decodes
were cancelled on the way. Cold start: a fresh server, the first task's file opened and edited right
after `initialize`, explicitly invoked completions until one answers (the time a user waits after
starting the editor). `--mid-line`: each task asked mid-line instead, its target's first word typed
(`bench.tasks.mid_line`; ids end `-mid`), the rest of the line the target.

Anchors (bench/anchors.py), after the server has exited so that nothing shares the CPU: `hf`, HF
transformers re-encoding the text before the cursor on every request, and `llamacpp`, llama.cpp with
its prefix reuse; latency from the edit arriving to the one-line answer. One line of ghost text for
all (the first line of the answer), scored by EM / ES against the target.

Rows (id, set, system, ms, em, es, pred) are appended to --out as tasks finish; a rerun skips the
(set, system, id) already there, and --summarize prints the tables from rows files alone. Output: a
markdown table per set, then one JSON line keyed `ghostline`, `hf`, `llamacpp` (null: not run), each
with `latency_ms_p50, latency_ms_p95, em, es` and the accept model's `shown_pct, accept_pct,
chars_saved, wrong_per_100` (what a user keeps of what is shown, ../shared/EVAL.md) on `edits` and the
same under `bigfile`. Rows keep the target, so `--summarize` recomputes every figure.

    python -m bench.lsp_replay --tasks ../shared/data/edits-requests.jsonl [--limit N] [--bigfile 20] \
        [--anchors hf,llamacpp] [--shard i/n] [--out rows.jsonl] [--typing N] [--options JSON] [--no-cold-start] [--mid-line]
    python -m bench.lsp_replay --summarize rows.jsonl [more rows files]

llama-cpp-python is benchmark-only: `make anchors` builds and installs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lsprotocol import types

from bench.tasks import (accept_figures, append_row, cursor_offset, em, es, first_line, fresh_state, mean, mid_line, pct,
                         read_tasks, shard)
from ghostline.lsp.client import running_server

GATE_OFF = "ghostline_gate_off"  # the same run's suggestions before the show gate (see gate_off)
SYSTEMS = ("ghostline", GATE_OFF, "hf", "llamacpp")
SETS = ("edits", "bigfile")
ACCEPT_KEYS = ("shown_pct", "accept_pct", "chars_saved", "wrong_per_100")  # ../shared/EVAL.md


def _field(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


async def edits(c, tasks, log, *, kind: str = "edits", record: Callable = lambda row: None) -> list[dict]:
    rows = []
    for n, task in enumerate(tasks, 1):
        uri = f"file:///replay/{n}/{task['id']}.py"
        c.open(uri, task["before"])
        await c.inspect(uri)  # the editor had the file open: its cache is warm
        t0 = time.perf_counter()
        c.change_many(uri, 2, task["changes"])
        error = None
        try:
            res = await c.inline(uri, task["cursor"]["line"], task["cursor"]["character"])
            text = res.items[0].insert_text if res.items else ""
        except Exception as exc:  # counted, never fatal: the benchmark measures what users get
            error = repr(exc)[:300]
            text = ""
            log(f"  error: {exc}")
        ms = (time.perf_counter() - t0) * 1e3
        pred = first_line(text)
        last = _field(await c.inspect(uri), "last_completion") or {}
        last = last if isinstance(last, dict) else last._asdict()
        ungated = first_line(last.get("withheld") or "") if last.get("stop_reason") == "gated" else pred
        row = {"id": task["id"], "set": kind, "system": "ghostline", "ms": ms, "em": em(pred, task["target"]),
               "es": es(pred, task["target"]), "pred": pred, "target": task["target"],
               "confidence": last.get("confidence"), "pred_gate_off": ungated, **({"error": error} if error else {})}
        rows.append(row)
        record(row)
        log(f"[{kind} {n}/{len(tasks)}] {task['id']} {ms:.0f}ms em={row['em']:.0f} es={row['es']:.0f} "
            f"pred={pred.strip()[:60]!r}", flush=True)
        c.text_document_did_close(_close(uri))
    return rows


async def typing(c, tasks, log, *, key_ms: float, record: Callable = lambda row: None) -> dict:
    """Type each target line key by key, requesting on every keystroke without waiting."""
    last_ms, shown_em = [], []
    for n, task in enumerate(tasks, 1):
        uri = f"file:///typing/{n}/{task['id']}.py"
        at = cursor_offset(task)
        c.open(uri, task["after"][:at] + task["after"][at + len(task["target"]) :])  # the line still to type
        await c.inspect(uri)
        line, col = task["cursor"]["line"], task["cursor"]["character"]
        typed = task["target"][: max(1, len(task["target"]) // 2)]  # type half the line, then look
        pending = []
        for i, ch in enumerate(typed):
            c.change(uri, 2 + i, (line, col + i), (line, col + i), ch)
            pending.append((time.perf_counter(), asyncio.ensure_future(c.inline(uri, line, col + i + 1))))
            await asyncio.sleep(key_ms / 1e3)
        t_last, fut = pending[-1]
        res = await fut
        last_ms.append((time.perf_counter() - t_last) * 1e3)
        await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        text = typed + (res.items[0].insert_text if res.items else "")
        shown_em.append(em(first_line(text), task["target"]))
        record({"id": task["id"], "set": "typing", "system": "ghostline", "ms": last_ms[-1], "em": shown_em[-1],
                "key_ms": key_ms, "keys": len(typed), "pred": first_line(text)})
        log(f"[typing {n}/{len(tasks)}] {len(typed)} keys, last request {last_ms[-1]:.0f}ms, "
            f"line {first_line(text)[:60]!r}", flush=True)
        c.text_document_did_close(_close(uri))
    return {"tasks": len(last_ms), "key_ms": key_ms, "last_latency_ms_p50": round(pct(last_ms, 50), 1),
            "last_latency_ms_p95": round(pct(last_ms, 95), 1), "em_after_half_typed": round(mean(shown_em), 2)}


def _close(uri):
    return types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))


async def cold_start(args, task: dict, log) -> dict:
    """A fresh server, the task's file opened and edited right after `initialize`, explicitly invoked
    inline completions (as a user pressing the key) until one answers: the time from `initialize`
    to the first suggestion, with the model loaded from the cache as on every start but the first."""
    options = {"multiline": "never", **json.loads(args.options)}
    with fresh_state() as env:
        async with running_server(model=args.model, options=options, ready_timeout=None, env=env) as c:
            uri = "file:///replay/cold.py"
            c.open(uri, task["before"])
            c.change_many(uri, 2, task["changes"])
            line, col = task["cursor"]["line"], task["cursor"]["character"]
            empty, text = 0, ""
            deadline = time.perf_counter() + 600
            while time.perf_counter() < deadline:
                res = await c.inline(uri, line, col, invoked=True)
                text = res.items[0].insert_text if res.items else ""
                if text.strip():
                    break
                empty += 1
            ms = (time.perf_counter() - c.started_at) * 1e3
            ready = [s.get("message", "") for s in c.statuses if s.get("state") == "ready"]
    log(f"cold start: first suggestion {ms:.0f} ms after initialize ({empty} empty answers before it; "
        f"{ready[0] if ready else 'never ready'})", flush=True)
    return {"first_suggestion_ms": round(ms, 1), "empty_answers_before": empty, "pred": first_line(text),
            "load": ready[0] if ready else None}


async def ghostline(args, todo: dict[str, list[dict]], typed: list[dict], record: Callable, log) -> dict:
    """The server over stdio: each set's tasks, then the typing scenario; what rows do not hold."""
    options = {"multiline": "never", **json.loads(args.options)}
    extra = {}
    with fresh_state() as env:
        async with running_server(model=args.model, options=options, env=env) as c:
            log(f"server ready: {c.statuses[-1].get('message', '')}; "
                f"{', '.join(f'{len(ts)} {s}' for s, ts in todo.items())} tasks; options {options}", flush=True)
            for kind, tasks in todo.items():
                if tasks:
                    await edits(c, tasks, log, kind=kind, record=record)
            if typed:
                probe = "file:///replay/probe.py"
                c.open(probe, "x = 1\n")
                before = _field(await c.inspect(probe), "cancelled_decodes")
                extra["typing"] = await typing(c, typed, log, key_ms=args.key_ms, record=record)
                c.open(probe + "2", "x = 1\n")
                extra["cancelled"] = _field(await c.inspect(probe + "2"), "cancelled_decodes") - before
    return extra


def anchor(name: str, todo: dict[str, list[dict]], record: Callable, log) -> str | None:
    """Run one anchor on the sets' tasks; the reason when its package is missing."""
    from bench.anchors import RUNNERS, Missing

    kind = {t["id"]: s for s, ts in todo.items() for t in ts}
    targets = {t["id"]: t["target"] for ts in todo.values() for t in ts}
    tasks = [t for ts in todo.values() for t in ts]
    try:
        for n, row in enumerate(RUNNERS[name](tasks, log), 1):
            row = {"id": row["id"], "set": kind[row["id"]], "system": name, "target": targets[row["id"]], **row}
            record(row)
            log(f"[{name} {row['set']} {n}/{len(tasks)}] {row['id']} {row['ms']:.0f}ms em={row['em']:.0f} "
                f"es={row['es']:.0f} pred={row['pred'].strip()[:60]!r}"
                + (f" re-evaluated {row['evaluated']}/{row['prompt']} tokens" if "evaluated" in row else ""),
                flush=True)
    except Missing as exc:
        log(f"anchor {name} skipped: {exc}", flush=True)
        return str(exc)
    return None


def load_rows(*paths) -> list[dict]:
    """Rows from JSONL files, the last one of each (set, system, id) kept: shards and reruns merge."""
    out: dict[tuple, dict] = {}
    for path in paths:
        if path and Path(path).exists():
            for line in Path(path).read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    out[(r["set"], r["system"], r["id"])] = r
    return list(out.values())


def summary(rows: list[dict]) -> dict | None:
    if not rows:
        return None
    ms = [r["ms"] for r in rows if math.isfinite(r["ms"])]
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    accept = accept_figures(rows) if all("target" in r for r in rows) else dict.fromkeys(ACCEPT_KEYS)
    return {"tasks": len(rows), "em": round(mean(col("em")), 2), "es": round(mean(col("es")), 2),
            "latency_ms_p50": round(pct(ms, 50), 1) if ms else None,
            "latency_ms_p95": round(pct(ms, 95), 1) if ms else None,
            "errors": sum(1 for r in rows if r.get("error")), **accept}


def gate_off(rows: list[dict]) -> list[dict]:
    """The rows as `gate: false` would have shown them: the withheld suggestion where the gate withheld
    one, the same text elsewhere (a gate that lets a suggestion through never changes it). No latency:
    the gate's own cost is a dot product, the decode is the same."""
    return [{**r, "system": GATE_OFF, "pred": r["pred_gate_off"], "em": em(r["pred_gate_off"], r["target"]),
             "es": es(r["pred_gate_off"], r["target"]), "ms": math.nan}
            for r in rows if r["system"] == "ghostline" and "pred_gate_off" in r]


def report(rows: list[dict], *, extra: dict | None = None, skipped: dict | None = None) -> dict:
    """Print a markdown table per set; return the JSON keyed by system (null: no rows and not run)."""
    rows = rows + gate_off(rows)

    def pick(kind, system):
        return [r for r in rows if r["set"] == kind and r["system"] == system]

    for kind in SETS:
        if not any(r["set"] == kind for r in rows):
            continue
        print(f"\n{kind}\n\n| system | tasks | EM | ES | latency p50 ms | latency p95 ms | errors | shown % | "
              "accept % | chars saved | wrong /100 |\n|---|---|---|---|---|---|---|---|---|---|---|")
        for system in SYSTEMS:
            s = summary(pick(kind, system))
            if s is None:
                why = (skipped or {}).get(system)
                print(f"| {system} | 0 | | | | | {'skipped: ' + why[:60] if why else 'not run'} |")
            else:
                print(f"| {system} | {s['tasks']} | {s['em']} | {s['es']} | {s['latency_ms_p50']} | "
                      f"{s['latency_ms_p95']} | {s['errors']} | " + " | ".join(str(s[k]) for k in ACCEPT_KEYS) + " |")
    typed = pick("typing", "ghostline")
    if typed:
        print(f"\ntyping (ghostline, {typed[0]['key_ms']:.0f} ms a key, half the line typed): "
              f"{len(typed)} tasks, last request p50 {pct([r['ms'] for r in typed], 50):.1f} ms, "
              f"p95 {pct([r['ms'] for r in typed], 95):.1f} ms, EM after {mean([r['em'] for r in typed]):.2f}")
    print()
    keys = ("latency_ms_p50", "latency_ms_p95", "em", "es", *ACCEPT_KEYS)
    out = {}
    for system in SYSTEMS:
        mine = [r for r in rows if r["system"] == system]
        if not mine:
            out[system] = None
            continue
        e, b = summary(pick("edits", system)), summary(pick("bigfile", system))
        out[system] = {k: e[k] if e else None for k in keys}
        out[system].update(tasks=e["tasks"] if e else 0, errors=e["errors"] if e else 0)
        out[system]["bigfile"] = {k: b[k] for k in (*keys, "tasks", "errors")} if b else None
    if extra and "cold_start" in extra:
        out["ghostline"] = out["ghostline"] or {}
        out["ghostline"]["cold_start"] = extra["cold_start"]
    if typed:
        ms = [r["ms"] for r in typed]
        out["ghostline"]["typing"] = {
            "tasks": len(ms), "key_ms": typed[0]["key_ms"], "last_latency_ms_p50": round(pct(ms, 50), 1),
            "last_latency_ms_p95": round(pct(ms, 95), 1),
            "em_after_half_typed": round(mean([r["em"] for r in typed]), 2),
            **({"cancelled": extra["cancelled"]} if extra and "cancelled" in extra else {})}
    return out


def run(args) -> dict:
    log = print
    tasks = read_tasks(args.tasks, args.limit)
    if args.mid_line:
        tasks = [t for t in map(mid_line, tasks) if t is not None]
    sets = {"edits": shard(tasks, args.shard)}
    if args.bigfile:
        from bench import bigfile

        sets["bigfile"] = shard(bigfile.tasks(args.bigfile), args.shard)
        log(f"bigfile: {len(sets['bigfile'])} tasks from {', '.join(t['source'] for t in sets['bigfile'])}",
            flush=True)
    wanted = {(s, t["id"]) for s, ts in sets.items() for t in ts}
    typed = sets["edits"][: args.typing]
    wanted |= {("typing", t["id"]) for t in typed}
    rows = [r for r in load_rows(args.out) if (r["set"], r["id"]) in wanted]
    done = {(r["set"], r["system"], r["id"]) for r in rows}
    if done:
        log(f"{len(done)} rows already in {args.out}: skipped", flush=True)

    def record(row):
        rows.append(row)
        append_row(args.out, row)

    def todo(system):
        return {s: [t for t in ts if (s, system, t["id"]) not in done] for s, ts in sets.items()}

    extra = {}
    if args.cold_start and sets["edits"]:
        extra["cold_start"] = asyncio.run(cold_start(args, sets["edits"][0], log))
    typed = [t for t in typed if ("typing", "ghostline", t["id"]) not in done]
    if any(todo("ghostline").values()) or typed:
        extra.update(asyncio.run(ghostline(args, todo("ghostline"), typed, record, log)))
    skipped = {}
    for name in args.anchors:
        if any(todo(name).values()):
            why = anchor(name, todo(name), record, log)
            if why:
                skipped[name] = why
    return report(rows, extra=extra, skipped=skipped)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", help="EVAL task file (the `edits` set)")
    p.add_argument("--limit", type=int)
    p.add_argument("--mid-line", action="store_true", help="ask mid-line: each task with its target's first word "
                   "typed and the rest of the line as the target (tasks of one word left out)")
    p.add_argument("--bigfile", type=int, default=0, help="tasks of the 4k-token-file set (0: none)")
    p.add_argument("--anchors", default="", help="comma-separated: hf,llamacpp")
    p.add_argument("--shard", help="i/n: this process runs every n-th task from the i-th")
    p.add_argument("--out", help="JSONL rows, appended as tasks finish; a rerun skips what is there")
    p.add_argument("--summarize", nargs="+", metavar="ROWS", help="print the tables from rows files; run nothing")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--options", default="{}", help="server settings as JSON (initializationOptions)")
    p.add_argument("--typing", type=int, default=10, help="tasks for the typing scenario (0: none)")
    p.add_argument("--key-ms", type=float, default=80.0, help="time between keystrokes in the typing scenario")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false",
                   help="skip the cold start (a fresh server: initialize to the first suggestion)")
    args = p.parse_args(argv)
    if args.summarize:
        result = report(load_rows(*args.summarize))
    else:
        if not args.tasks:
            p.error("--tasks is required unless --summarize")
        args.anchors = [a for a in args.anchors.split(",") if a]
        unknown = set(args.anchors) - {"hf", "llamacpp"}
        if unknown:
            p.error(f"unknown anchors {sorted(unknown)}: choose from hf, llamacpp")
        result = run(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
