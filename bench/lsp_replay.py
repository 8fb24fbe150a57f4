"""Latency through the LSP, measured as an editor sees it: the real server is spawned over stdio.

Scenario `edits` (../shared/EVAL.md): didOpen(before), wait until the cache is warm, then
didChange(changes) and textDocument/inlineCompletion at the cursor; latency runs from sending the
change to receiving the answer. Scenario `typing`: after the edit, type the target line one
character at a time with a request on every keystroke (as editors do); the figure is the latency of
the last request, and how many decodes were cancelled on the way.

    python -m bench.lsp_replay --tasks ../shared/data/edits-requests.jsonl [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from lsprotocol import types

from bench.tasks import cursor_offset, em, es, first_line, mean, pct, read_tasks
from lsp.client import running_server


def _field(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


async def edits(c, tasks, log) -> dict:
    rows, errors = [], 0
    for n, task in enumerate(tasks, 1):
        uri = f"file:///replay/{n}/{task['id']}.py"
        c.open(uri, task["before"])
        await c.inspect(uri)  # the editor had the file open: its cache is warm
        t0 = time.perf_counter()
        c.change_many(uri, 2, task["changes"])
        try:
            res = await c.inline(uri, task["cursor"]["line"], task["cursor"]["character"])
            text = res.items[0].insert_text if res.items else ""
        except Exception as exc:  # counted, never fatal: the benchmark measures what users get
            errors += 1
            text = ""
            log(f"  error: {exc}")
        ms = (time.perf_counter() - t0) * 1e3
        pred = first_line(text)
        rows.append({"em": em(pred, task["target"]), "es": es(pred, task["target"]), "ms": ms})
        log(f"[{n}/{len(tasks)}] {task['id']} {ms:.0f}ms em={rows[-1]['em']:.0f} es={rows[-1]['es']:.0f} "
            f"pred={pred.strip()[:60]!r}", flush=True)
        c.text_document_did_close(_close(uri))
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {"tasks": len(rows), "em": round(mean(col("em")), 2), "es": round(mean(col("es")), 2),
            "latency_ms_p50": round(pct(col("ms"), 50), 1), "latency_ms_p95": round(pct(col("ms"), 95), 1),
            "errors": errors}


async def typing(c, tasks, log, *, key_ms: float) -> dict:
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
        log(f"[typing {n}/{len(tasks)}] {len(typed)} keys, last request {last_ms[-1]:.0f}ms, line {first_line(text)[:60]!r}",
            flush=True)
        c.text_document_did_close(_close(uri))
    return {"tasks": len(last_ms), "key_ms": key_ms, "last_latency_ms_p50": round(pct(last_ms, 50), 1),
            "last_latency_ms_p95": round(pct(last_ms, 95), 1), "em_after_half_typed": round(mean(shown_em), 2)}


def _close(uri):
    return types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))


async def main_async(args) -> dict:
    tasks = read_tasks(args.tasks, args.limit)
    options = {"multiline": "never", **json.loads(args.options)}
    log = print
    async with running_server(model=args.model, options=options) as c:
        log(f"server ready: {c.statuses[-1].get('message', '')}; {len(tasks)} tasks; options {options}", flush=True)
        result = await edits(c, tasks, log)
        probe = "file:///replay/probe.py"
        c.open(probe, "x = 1\n")
        before = _field(await c.inspect(probe), "cancelled_decodes")
        result["typing"] = await typing(c, tasks[: args.typing], log, key_ms=args.key_ms)
        c.open(probe + "2", "x = 1\n")
        result["cancelled"] = _field(await c.inspect(probe + "2"), "cancelled_decodes") - before
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--limit", type=int)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--options", default="{}", help="server settings as JSON (initializationOptions)")
    p.add_argument("--typing", type=int, default=10, help="tasks for the typing scenario")
    p.add_argument("--key-ms", type=float, default=80.0, help="time between keystrokes in the typing scenario")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
