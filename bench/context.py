"""Context beyond the prefix through the LSP: what other files' chunks, encoded ahead, are worth.

For each task (../shared/EVAL.md), its workspace (the repository's other files at the parent of the
task's commit) is written to a folder the real server has as its workspace folder (a change of
checkout between tasks is reported as `workspace/didChangeWatchedFiles`, as an editor's watcher
does); the task's file is opened there, the edit applied, and the target removed from the cursor's
line (the document at completion time). Then, one line, the server's default settings otherwise:

- `context`: the product path: the server chooses chunks for the edit's place and sends them to the
  engine after the change; the benchmark waits until they are encoded and the engine's idle work on
  the document is done (the rows before the cursor encoded again to read them, `EngineOptions.reread`;
  a user's pause after an edit; `update_ms` is that time, from the change), then asks (`ms`, request
  to answer);
- `prefix`: no context (`context: false`), the same steps but for the wait;
- `settled`: no context, and the same wait as `context` for the engine's idle work on the document
  (the rows before the cursor that the edit left stale encoded again, `EngineOptions.reread`): what
  of `context`'s gain the wait alone gives;
- `reencode`: the quality reference: the same chunks (those `context` used, else chosen here by the
  same code) and the document encoded together from scratch for the request (`ms` includes that
  encode).

`prefix` and `context` run one after the other, each on the document opened as the editor had it and
closed after (turning context off drops the context the engine caches in front of a document). EM/ES score the suggestion before the show gate (what the
model wrote, `withheld` where the gate held it back); the accept model (`shown_pct`, `accept_pct`,
`chars_saved`, `wrong_per_100`) scores what was shown, with the gate at its default strength: the
server starts with acceptance counts of its own and hears no accept or reject, so nothing learned (by
a user or another run) moves the threshold, and each row keeps the gate's P(kept) (`confidence`) to
re-threshold from. Rows go to --out as tasks finish (a rerun skips
those there); JSON last, keyed by mode.

    python -m bench.context --tasks ../shared/data/edits-requests.jsonl \
        --workspace ../shared/data/requests-workspace.json.gz [--limit N] [--modes prefix,context,reencode] \
        [--out rows.jsonl] [--options JSON] [--summarize rows.jsonl]

`--first`: instead, a user's first minute on the first task's workspace with `context` on: the
server started, the file opened and edited, and asked at once and then every second (the
suggestion dismissed in between) without waiting for anything; JSON with the seconds from the
start to the first answer (`first_answer_s`) and to the first answer that attended over context
(`first_context_s`).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import shutil
import tempfile
import time
from pathlib import Path

from lsprotocol import types

from bench.tasks import accept_figures, append_row, em, es, first_line, fresh_state, mean, pct, read_tasks, shard, user_document
from ghostline.lsp.client import running_server
from ghostline.lsp.context import Chooser, Library, Options
from ghostline.lsp.server import DID_REJECT

MODES = ("prefix", "settled", "context", "reencode")


def workspace_of(ws: dict, task: dict) -> tuple[str, dict[str, str]]:
    """The task file's path and its workspace: path -> text, without the task's own file."""
    commit, path = task["source"].split("@", 1)[1].split(":", 1)
    files = ws["commits"][ws["parents"][commit]]
    return path, {p: ws["blobs"][b] for p, b in files.items() if p != path}


def checkout(folder: Path, files: dict[str, str], current: dict[str, str]) -> list[types.FileEvent]:
    """Make `folder` hold `files` (after `current`); the watcher's events for what changed."""
    events = []
    for path in sorted(set(current) - set(files)):
        (folder / path).unlink(missing_ok=True)
        events.append(types.FileEvent(uri=(folder / path).as_uri(), type=types.FileChangeType.Deleted))
    for path, text in sorted(files.items()):
        if current.get(path) == text:
            continue
        p = folder / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        kind = types.FileChangeType.Changed if path in current else types.FileChangeType.Created
        events.append(types.FileEvent(uri=p.as_uri(), type=kind))
    return events


def _d(x) -> dict:
    return x if isinstance(x, dict) else (x._asdict() if x is not None else {})


async def _answer(c, uri: str, line: int, char: int) -> tuple[str, float, dict]:
    """The first line shown and before the gate, the request's ms, the server's record of it."""
    t0 = time.perf_counter()
    res = await c.inline(uri, line, char)
    ms = (time.perf_counter() - t0) * 1e3
    shown = first_line(res.items[0].insert_text) if res.items else ""
    info = _d(await c.inspect(uri))
    last = _d(info.get("last_completion"))
    model = first_line(last.get("withheld") or "") if last.get("stop_reason") == "gated" else shown
    return shown, ms, {"model": model, "context": _d(info.get("context")), "stop_reason": last.get("stop_reason"),
                       "confidence": last.get("confidence")}


def _row(task: dict, mode: str, shown: str, ms: float, info: dict, **extra) -> dict:
    model = info["model"]
    ctx = info["context"] if mode == "context" else {}
    return {"id": task["id"], "mode": mode, "ms": round(ms, 1), "em": em(model, task["target"]),
            "es": es(model, task["target"]), "pred": model, "shown": shown, "target": task["target"],
            "confidence": info["confidence"], "chosen": ctx.get("chosen"), "asked": ctx.get("asked"),
            "used": ctx.get("used"), "context_tokens": ctx.get("tokens"), **extra}


async def run_tasks(args, tasks: list[dict], ws: dict, record, log, prior: dict | None = None) -> dict:
    """Run `tasks` through one server; `prior`: earlier `context` rows by id (the chunks `reencode` copies)."""
    prior = prior or {}
    folder = Path(tempfile.mkdtemp(prefix="ghostline-context-bench-"))
    options = {"multiline": "never", **json.loads(args.options)}
    modes = args.modes
    current: dict[str, str] = {}
    try:
        path, files = workspace_of(ws, tasks[0])
        checkout(folder, files, current)
        current = files
        t_start = time.perf_counter()
        with fresh_state() as env:
            async with running_server(model=args.model, engine=args.engine, env=env,
                                      options={**options, "context": "context" in modes}, folder=str(folder)) as c:
                extra = {"ready_s": round(time.perf_counter() - t_start, 2)}
                log(f"server ready in {extra['ready_s']} s: {c.statuses[-1].get('message', '')}; {len(tasks)} tasks, "
                    f"modes {', '.join(modes)}, options {options}", flush=True)
                for n, task in enumerate(tasks, 1):
                    path, files = workspace_of(ws, task)
                    events = checkout(folder, files, current)
                    current = files
                    if events:
                        c.workspace_did_change_watched_files(types.DidChangeWatchedFilesParams(changes=events))
                    text, offset = user_document(task)
                    line, char = task["cursor"]["line"], task["cursor"]["character"]
                    uri = (folder / path).as_uri()
                    rows = []
                    ctx_on = types.DidChangeConfigurationParams(settings={"context": True})
                    ctx_off = types.DidChangeConfigurationParams(settings={"context": False})
                    for mode in [m for m in ("prefix", "settled", "context") if m in modes]:  # each on the document as the editor had it
                        c.workspace_did_change_configuration(ctx_on if mode == "context" else ctx_off)
                        c.open(uri, task["before"])
                        await c.inspect(uri)  # the editor had the file open: its cache is warm
                        t_change = time.perf_counter()
                        c.change_many(uri, 2, task["changes"])
                        c.change(uri, 3, (line, char), (line, len(task["after"].split("\n")[line])), "")
                        await c.inspect(uri)
                        if mode == "context":
                            await c.context_ready(uri)  # the context sent and encoded ...
                        if mode in ("context", "settled"):
                            await c.settled(uri)  # ... and read by the rows before the cursor: a quiet state
                        update_ms = (time.perf_counter() - t_change) * 1e3
                        shown, ms, info = await _answer(c, uri, line, char)
                        if mode == "context" and n == 1:
                            extra["first_suggestion_s"] = round(time.perf_counter() - t_start, 2)
                        rows.append(_row(task, mode, shown, ms, info, **({"update_ms": round(update_ms, 1)}
                                                                          if mode != "prefix" else {})))
                        c.text_document_did_close(types.DidCloseTextDocumentParams(
                            text_document=types.TextDocumentIdentifier(uri=uri)))
                    if "reencode" in modes:
                        c.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"context": False}))
                        lib = Library()
                        for p, t in files.items():
                            lib.put(p, t)
                        chunks = {f"{ch.path}:{ch.first + 1}": ch for f in lib.files.values() for ch in f.chunks}
                        served = next((r["asked"] for r in rows if r["mode"] == "context"), None)
                        if served is None and task["id"] in prior:
                            served = prior[task["id"]].get("asked")
                        if served is None:  # no context run to copy: the same code, here
                            budget = json.loads(args.options).get("context_budget", Options.budget)
                            served = [f"{ch.path}:{ch.first + 1}" for ch in
                                      Chooser(lib, Options(budget=budget))("bench", path, text, offset, set()).chunks]
                        choice = [chunks[name] for name in served if name in chunks]
                        joined = "".join(ch.text for ch in choice)
                        ref = (folder / "__reencode__" / path).as_uri()
                        t0 = time.perf_counter()
                        c.open(ref, joined + text)
                        await c.inspect(ref)  # encoded whole before the request: no time cap cuts the reference
                        shown, _, info = await _answer(c, ref, line + joined.count("\n"), char)
                        ms = (time.perf_counter() - t0) * 1e3
                        rows.append(_row(task, "reencode", shown, ms, info,
                                         chosen=[f"{ch.path}:{ch.first + 1}" for ch in choice]))
                        c.text_document_did_close(types.DidCloseTextDocumentParams(
                            text_document=types.TextDocumentIdentifier(uri=ref)))
                    for row in rows:
                        record(row)
                    log(f"[{n}/{len(tasks)}] {task['id']} " + " ".join(
                        f"{r['mode']}={r['es']:.0f}/{r['ms']:.0f}ms" for r in rows) + f" target={task['target'].strip()[:40]!r}",
                        flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return extra


async def first_minute(args, task: dict, ws: dict, *, cap_s: float = 180.0) -> dict:
    """Seconds from a server's start on `task`'s workspace (context on) to its first answer at the
    task's cursor, and to its first answer that attended over context."""
    folder = Path(tempfile.mkdtemp(prefix="ghostline-context-first-"))
    try:
        path, files = workspace_of(ws, task)
        checkout(folder, files, {})
        uri = (folder / path).as_uri()
        line, char = task["cursor"]["line"], task["cursor"]["character"]
        out = {"files": len(files), "first_answer_s": None, "first_context_s": None, "asks": 0}
        t0 = time.perf_counter()
        options = {"multiline": "never", **json.loads(args.options), "context": True}
        with fresh_state() as env:
            async with running_server(model=args.model, engine=args.engine, options=options, folder=str(folder), env=env,
                                      ready_timeout=None) as c:  # the editor opens the file while the model loads
                c.open(uri, task["before"])
                c.change_many(uri, 2, task["changes"])
                c.change(uri, 3, (line, char), (line, len(task["after"].split("\n")[line])), "")
                while time.perf_counter() - t0 < cap_s and out["first_context_s"] is None:
                    res = await c.inline(uri, line, char)
                    out["asks"] += 1
                    if not any(st.get("state") in ("ready", "busy") for st in c.statuses):
                        await asyncio.sleep(1.0)  # still loading: inspect would wait for the load
                        continue
                    info = _d(await c.inspect(uri))
                    now = round(time.perf_counter() - t0, 2)
                    if info.get("last_completion") is not None and out["first_answer_s"] is None:
                        out["first_answer_s"] = now
                        out["first_shown"] = bool(res and res.items)
                    if _d(info.get("context")).get("used"):
                        out["first_context_s"] = now
                        out["context_tokens"] = _d(info.get("context")).get("tokens")
                    c.protocol.notify(DID_REJECT, {"uri": uri})
                    await asyncio.sleep(1.0)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(rows: list[dict], extra: dict | None = None) -> dict:
    out = {}
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            out[mode] = None
            continue
        ms = [r["ms"] for r in rs]
        out[mode] = {"tasks": len(rs), "em": round(mean([r["em"] for r in rs]), 2), "es": round(mean([r["es"] for r in rs]), 2),
                     "ms_p50": round(pct(ms, 50), 1), "ms_p95": round(pct(ms, 95), 1),
                     **accept_figures([{"pred": r["shown"], "target": r["target"]} for r in rs])}
        if upd := [r["update_ms"] for r in rs if r.get("update_ms") is not None]:
            out[mode].update(update_ms_p50=round(pct(upd, 50), 1), update_ms_p95=round(pct(upd, 95), 1))
        if mode == "context":
            out[mode].update(used_share=round(mean([(r["used"] or 0) / max(1, len(r["chosen"] or [])) for r in rs]), 3),
                             context_tokens_mean=round(mean([r["context_tokens"] or 0 for r in rs]), 1))
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], {})[r["mode"]] = r
    same = [v["context"]["asked"] == v["reencode"]["chosen"] for v in by_id.values() if "context" in v and "reencode" in v]
    if same:
        out["same_choice_pct"] = round(100 * sum(same) / len(same), 1)
    if extra:
        out.update(extra)
    return out


def table(result: dict) -> str:
    lines = ["| mode | tasks | EM | ES | ms p50 | ms p95 | shown % | accept % | chars saved | wrong /100 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in MODES:
        r = result.get(mode)
        if r:
            lines.append(f"| {mode} | {r['tasks']} | {r['em']} | {r['es']} | {r['ms_p50']} | {r['ms_p95']} | "
                         f"{r['shown_pct']} | {r['accept_pct']} | {r['chars_saved']} | {r['wrong_per_100']} |")
    return "\n".join(lines)


def load_rows(*paths) -> list[dict]:
    rows = {}
    for p in paths:
        if p and Path(p).exists():
            for line in Path(p).read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    rows[(r["id"], r["mode"])] = r
    return list(rows.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks")
    p.add_argument("--workspace", help="the tasks' workspaces (EVAL.md: *-workspace.json.gz)")
    p.add_argument("--limit", type=int)
    p.add_argument("--shard", help="i/n: every n-th task from the i-th")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--engine", default="in-process", help="the server's --engine: in-process (one process to measure) or daemon")
    p.add_argument("--options", default="{}", help="server settings as JSON (initializationOptions)")
    p.add_argument("--out", help="JSONL rows, appended as tasks finish; a rerun skips the tasks there")
    p.add_argument("--summarize", nargs="+", metavar="ROWS", help="report on rows files; run nothing")
    p.add_argument("--first", action="store_true", help="a user's first minute on the first task's workspace")
    args = p.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if bad := set(args.modes) - set(MODES):
        p.error(f"unknown modes {sorted(bad)} (known: {', '.join(MODES)})")
    if args.first:
        if not (args.tasks and args.workspace):
            p.error("--tasks and --workspace are needed to run")
        with gzip.open(args.workspace) as f:
            ws = json.load(f)
        print(json.dumps(asyncio.run(first_minute(args, read_tasks(args.tasks, 1)[0], ws))))
        return 0
    if args.summarize:
        result = report(load_rows(*args.summarize))
    else:
        if not (args.tasks and args.workspace):
            p.error("--tasks and --workspace are needed to run")
        rows = load_rows(args.out)
        done = {r["id"] for r in rows if r["mode"] in args.modes}
        tasks = [t for t in shard(read_tasks(args.tasks, args.limit), args.shard) if t["id"] not in done]
        with gzip.open(args.workspace) as f:
            ws = json.load(f)

        def record(row):
            rows.append(row)
            append_row(args.out, row)

        prior = {r["id"]: r for r in rows if r["mode"] == "context"}
        extra = asyncio.run(run_tasks(args, tasks, ws, record, print, prior)) if tasks else {}
        result = report(rows, extra)
    print(table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
