"""Several editor windows at once: one shared engine daemon against an engine in every window.

Each window is a real language server over stdio (lsp.client) replaying edit-then-complete tasks
(../shared/EVAL.md) while the others do the same: open `before`, wait until its cache is warm, send
the change and ask for a completion at the cursor; latency runs from the change to the answer.
Window w starts its list at task w, so the windows do not move in step. `shared`: every server
uses one engine daemon (started here, in a private runtime folder); `separate`: every server loads
its own engine. Memory is the peak, over the run, of the summed resident set sizes of all the
processes (`rss_mb`); `pss_mb` counts pages the processes share (libraries) once.

    python -m bench.windows --tasks ../shared/data/edits-requests.jsonl --windows 3 [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types

from bench.tasks import pct, read_tasks
from ghostline.engine.serving import wire
from ghostline.lsp.client import running_server


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in kB; zeros once it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        pss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                   if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0, 0
    return rss, pss


async def sample(pids, peak: dict, every_s: float = 0.25) -> None:
    while True:
        rss, pss = map(sum, zip(*(memory_kb(p) for p in pids()))) if pids() else (0, 0)
        peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
        await asyncio.sleep(every_s)


async def replay(c, tasks: list[dict], w: int, out: list[float], log) -> int:
    errors = 0
    for n, task in enumerate(tasks, 1):
        uri = f"file:///window{w}/{n}/{task['id']}.py"
        c.open(uri, task["before"])
        await c.inspect(uri)  # the window had the file open: its cache is warm
        t0 = time.perf_counter()
        c.change_many(uri, 2, task["changes"])
        try:
            await c.inline(uri, task["cursor"]["line"], task["cursor"]["character"])
        except Exception as exc:  # counted, never fatal: the benchmark measures what users get
            errors += 1
            log(f"  window {w} error: {exc}")
        out.append((time.perf_counter() - t0) * 1e3)
        log(f"[window {w} {n}/{len(tasks)}] {task['id']} {out[-1]:.0f} ms", flush=True)
        c.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri)))
    return errors


async def run_mode(mode: str, args, tasks: list[dict], log) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="gl-bench-"))
    env = dict(os.environ, GHOSTLINE_RUNTIME_DIR=str(folder))
    daemon = None
    if mode == "shared":
        with open(folder / "daemon.log", "wb") as err:
            daemon = subprocess.Popen([sys.executable, "-m", "ghostline", "engine", "--model", args.model], env=env,
                                      stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)
        sock = folder / (wire.daemon_name(args.model) + ".sock")
        while not sock.exists():
            if daemon.poll() is not None:
                raise SystemExit(f"engine daemon exited: {(folder / 'daemon.log').read_text()[-2000:]}")
            await asyncio.sleep(0.1)
    options = {"multiline": "never", **json.loads(args.options)}
    engine = "daemon" if mode == "shared" else "in-process"
    peak, latencies, clients = {"rss": 0, "pss": 0}, [], []
    pids = lambda: [c._server.pid for c in clients] + ([daemon.pid] if daemon else [])  # noqa: E731
    sampler = asyncio.create_task(sample(pids, peak))
    t0 = time.perf_counter()
    try:
        async with contextlib.AsyncExitStack() as stack:
            cms = [running_server(model=args.model, engine=engine, env=env, options=options) for _ in range(args.windows)]
            clients += await asyncio.gather(*(stack.enter_async_context(cm) for cm in cms))
            log(f"{mode}: {args.windows} windows ready in {time.perf_counter() - t0:.1f} s", flush=True)
            orders = [tasks[w % len(tasks):] + tasks[: w % len(tasks)] for w in range(args.windows)]
            errors = await asyncio.gather(*(replay(c, order, w, latencies, log) for w, (c, order) in
                                            enumerate(zip(clients, orders))))
    finally:
        sampler.cancel()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        shutil.rmtree(folder, ignore_errors=True)
    return {"latency_ms_p50": round(pct(latencies, 50), 1), "latency_ms_p95": round(pct(latencies, 95), 1),
            "rss_mb": round(peak["rss"] / 1024, 1), "pss_mb": round(peak["pss"] / 1024, 1),
            "requests": len(latencies), "errors": sum(errors)}


async def main_async(args) -> dict:
    tasks = read_tasks(args.tasks, args.limit)
    result = {"windows": args.windows, "tasks": len(tasks), "model": args.model}
    for mode in args.modes.split(","):
        result[mode] = await run_mode(mode, args, tasks, print)
        print(f"{mode}: {json.dumps(result[mode])}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--limit", type=int, help="tasks per window")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--modes", default="shared,separate", help="comma-separated: shared, separate")
    p.add_argument("--options", default="{}", help="server settings as JSON (initializationOptions)")
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(main_async(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
