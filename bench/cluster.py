"""The cluster against the team server: simulated editors replaying the edit tasks through real
language servers (`ghostline serve --engine tcp://...`), on `ghostline engine --listen` (one daemon)
and on `ghostline cluster --replicas N`.

Per backend: one editor alone (latency p50/p95 of ghost text after an edit, as lsp_replay measures
it), then `--editors` at once (each a share of the tasks; suggestions a second over the wall time),
and the bare round trip of a call that does no model work (`inspect`), whose difference between
backends is the ingress hop's own cost. On the last cluster, a replica is killed with `kill -9`
while completions run on documents of real code (this Python's standard library): every request
must be answered, each moved document re-opened, and every text equal to the client's.

    python -m bench.cluster --tasks ../shared/data/edits-requests.jsonl --limit 12 --replicas 1,2

Lines on stderr as it goes, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.lsp_replay import edits
from bench.soak import stdlib_files
from bench.tasks import pct, read_tasks
from ghostline.lsp.client import running_server
from ghostline.engine.completion import CompletionOptions
from ghostline.lsp.remote import RemoteEngine


def log(*a, **k):
    print(*a, file=sys.stderr, **k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """`ghostline engine --listen` or `ghostline cluster` in a process of its own, until closed."""

    def __init__(self, kind: str, replicas: int, args, env: dict, token_file: Path):
        cmd = [sys.executable, "-m", "ghostline", kind, "--model", args.model, "--token-file", str(token_file)]
        if kind == "engine":
            cmd += ["--listen", f"127.0.0.1:{free_port()}"]
        else:
            cpus = args.cpus or max(1, (os.cpu_count() or 1) // replicas)  # the cores shared out, as the daemon has them all
            cmd += ["--listen", "127.0.0.1:0", "--replicas", str(replicas), "--cpus", str(cpus)]
        self.name = "daemon" if kind == "engine" else f"cluster-{replicas}"
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(args.log_dir / f"{self.name}.log", "w"),
                                     env=env, text=True, start_new_session=True)
        if kind == "engine":
            self.target = cmd[cmd.index("--listen") + 1]
            self._wait_port()
        else:
            line = self.proc.stdout.readline()
            if not line.startswith("engine: "):
                raise RuntimeError(f"{self.name} did not start: {line!r} (see {args.log_dir}/{self.name}.log)")
            self.target = line.split("tcp://", 1)[1].strip()
        self.start_s = time.perf_counter() - self.t0

    def _wait_port(self) -> None:
        host, port = self.target.rsplit(":", 1)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex((host, int(port))) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no answer on {self.target}")

    def engine(self, token: str) -> RemoteEngine:
        host, port = self.target.rsplit(":", 1)
        deadline = time.monotonic() + 300
        while True:  # the daemon listens before its model has loaded
            try:
                return RemoteEngine.connect((host, int(port)), model=None, token=token)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        with_signal(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with_signal(self.proc, signal.SIGKILL)
            self.proc.wait(10)


def with_signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def same_completion(engine: RemoteEngine, n: int = 40) -> dict:
    """One completion asked `n` times of one cached document (a stdlib file, 16 tokens): the engine's
    work is the same every time, so backends differ only by the way there and the CPU left to it."""
    (path, text), = stdlib_files(1, max_chars=6000)
    uri = f"file://{path}"
    engine.open(uri, text)
    engine.describe(uri)
    at = text.index("\n", len(text) // 2)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        engine.complete(uri, at, CompletionOptions(max_tokens=16))
        times.append((time.perf_counter() - t) * 1e3)
    engine.close(uri)
    return {"p50_ms": round(pct(times, 50), 1), "p95_ms": round(pct(times, 95), 1)}


def bare_round_trip(engine: RemoteEngine, n: int = 200) -> dict:
    """`inspect` of a small document: the request's way there and back, no model work."""
    uri = "file:///bench/probe.py"
    engine.open(uri, "x = 1\n")
    times = []
    for _ in range(n):
        t = time.perf_counter()
        engine.describe(uri)
        times.append((time.perf_counter() - t) * 1e3)
    engine.close(uri)
    return {"p50_ms": round(pct(times, 50), 2), "p95_ms": round(pct(times, 95), 2)}


async def replay(backend: Backend, tasks: list[dict], editors: int, args, env: dict) -> dict:
    """`editors` real language servers on the backend, each replaying its share of the tasks at once."""
    shares = [tasks[i::editors] for i in range(editors)]
    options = {"multiline": "never", "engine": f"tcp://{backend.target}"}

    async def one(share):
        async with running_server(model=args.model, options=options, engine=f"tcp://{backend.target}", env=env) as c:
            return await edits(c, share, lambda *a, **k: None)

    t0 = time.perf_counter()
    rows = [r for part in await asyncio.gather(*(one(s) for s in shares if s)) for r in part]
    wall = time.perf_counter() - t0
    ms = [r["ms"] for r in rows if "error" not in r]
    return {"editors": editors, "tasks": len(rows), "errors": sum("error" in r for r in rows),
            "p50_ms": round(pct(ms, 50), 1), "p95_ms": round(pct(ms, 95), 1),
            "suggestions_per_s": round(len(ms) / wall, 2), "wall_s": round(wall, 1)}


def kill_one(backend: Backend, token: str, docs: int) -> dict:
    """Completions on `docs` real files; one replica killed mid-way; every answer and text checked."""
    engine = backend.engine(token)
    files = stdlib_files(docs, max_chars=6000)
    for path, text in files:
        engine.open(f"file://{path}", text)
    where = {u: engine.describe(u)["replica"] for u in engine.docs}
    before = engine.daemon_status()
    victim = where[f"file://{files[0][0]}"]
    errors, answered = [], 0

    def complete(uri, text):
        nonlocal answered
        try:
            engine.complete(uri, len(text) // 2, CompletionOptions(max_tokens=48, multiline=True))
            answered += 1
        except Exception as exc:
            errors.append(repr(exc)[:200])

    threads = [threading.Thread(target=complete, args=(f"file://{p}", t)) for p, t in files]
    for t in threads:
        t.start()
    time.sleep(0.3)
    os.kill(int(victim.rsplit("/", 1)[1]), signal.SIGKILL)
    for t in threads:
        t.join(300)
    mismatched = sum(engine.describe(u)["text"] != text for u, text in engine.docs.items())
    after = engine.daemon_status()
    held = sum(r == victim for r in where.values())
    engine.disconnect()
    return {"docs": len(files), "on_killed_replica": held, "requests": len(files), "answered": answered,
            "errors": len(errors), "reopened": after["moved"] - before["moved"], "mismatched_texts": mismatched,
            "error_samples": errors[:3]}


def run(args) -> dict:
    args.log_dir = Path(tempfile.mkdtemp(prefix="ghostline-bench-cluster-"))
    token = secrets.token_urlsafe(24)
    token_file = args.log_dir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = dict(os.environ, GHOSTLINE_TOKEN=token, GHOSTLINE_RUNTIME_DIR=str(args.log_dir))
    tasks = [t for t in read_tasks(args.tasks) if len(t["before"]) <= args.max_chars][: args.limit]
    out = {"model": args.model, "tasks": len(tasks), "max_chars": args.max_chars, "editors": args.editors, "backends": {},
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    kinds = [("engine", 1)] + [("cluster", int(n)) for n in args.replicas.split(",")]
    for i, (kind, n) in enumerate(kinds):
        backend = Backend(kind, n, args, env, token_file)
        try:
            log(f"{backend.name}: ready in {backend.start_s:.1f} s on {backend.target}", flush=True)
            engine = backend.engine(token)
            fig = {"start_s": round(backend.start_s, 1), "bare_round_trip": bare_round_trip(engine),
                   "same_completion": same_completion(engine)}
            engine.disconnect()
            log(f"{backend.name}: bare {fig['bare_round_trip']} same completion {fig['same_completion']}", flush=True)
            if tasks:
                fig["alone"] = asyncio.run(replay(backend, tasks, 1, args, env))
                log(f"{backend.name}: alone {fig['alone']}", flush=True)
                fig["together"] = asyncio.run(replay(backend, tasks, args.editors, args, env))
                log(f"{backend.name}: {args.editors} editors {fig['together']}", flush=True)
            if kind == "cluster" and n > 1 and i == len(kinds) - 1 and args.kill_docs:
                fig["kill"] = kill_one(backend, token, args.kill_docs)
                log(f"{backend.name}: replica killed {fig['kill']}", flush=True)
            out["backends"][backend.name] = fig
        finally:
            backend.close()
    b = out["backends"]
    if "daemon" in b and "cluster-1" in b:
        out["hop_ms"] = {"bare_p50": round(b["cluster-1"]["bare_round_trip"]["p50_ms"]
                                           - b["daemon"]["bare_round_trip"]["p50_ms"], 2),
                         "same_completion_p50": round(b["cluster-1"]["same_completion"]["p50_ms"]
                                                      - b["daemon"]["same_completion"]["p50_ms"], 1),
                         "completion_p50": round(b["cluster-1"]["alone"]["p50_ms"] - b["daemon"]["alone"]["p50_ms"], 1)
                         if "alone" in b["daemon"] else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", required=True, help="EVAL task file (the `edits` set)")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--max-chars", type=int, default=6000,
                   help="only tasks whose file is this short (each task first encodes its whole file)")
    p.add_argument("--replicas", default="1,2", help="cluster sizes to run, comma-separated")
    p.add_argument("--editors", type=int, default=3, help="editors at once in the concurrent run")
    p.add_argument("--cpus", type=float, default=None,
                   help="CPUs per replica (its torch threads); default: the machine's cores shared out among the replicas")
    p.add_argument("--kill-docs", type=int, default=8, help="documents in the replica-kill run (0: skip it)")
    p.add_argument("--model", default="gemma3-270m")
    out = run(p.parse_args(argv))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
