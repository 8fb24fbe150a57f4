"""Soak: several editors on one engine daemon, a storm of edits, and everything that goes wrong.

Each client is a real `ghostline serve` over stdio (`--engine daemon`, all sharing one daemon in a
private runtime folder) with real files open (this Python's standard library: code nobody tuned
on). Together they send random incremental edits at `--rate` a second (UTF-16 positions; astral
characters; CRLF and lone CR line breaks; multi-hunk changes; 0.5-3k-character pastes; deletions
across lines) in bursts (after one edit in 15 the user pauses 0.5-1.5 s for ghost text), with an
inline completion after some edits and at every pause, a fifth of which it cancels. Meanwhile the daemon is
killed (`kill -9`) every `--kill-every` seconds, one client vanishes mid-request, and malformed
frames reach a server and the daemon. Every `--check-s` seconds each document's engine text
(`ghostline/inspect`) is compared with the client's.

    python -m bench.soak --clients 3 --seconds 600 --rate 30 --kill-every 120
    python -m bench.soak --clients 1 --seconds 60 --rate 25 --big-lines 200000   # a huge file beside the others
    python -m bench.soak --strangers 300                                             # pre-auth cost of a team server

One line per check (stderr), then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types

from ghostline.lsp.client import SERVER, Client, running_server

ALPHABET = "abcdefghijklmnopqrstuvwxyz_ ().:=,'\"" + "é😀" + "\n" * 3


def stdlib_files(n: int, *, min_chars: int = 2000, max_chars: int = 12000) -> list[tuple[str, str]]:
    """`n` real Python files of the standard library (path, text), spread over it, sorted by path."""
    root = Path(os.__file__).parent
    paths = sorted(p for p in root.glob("*.py") if min_chars <= p.stat().st_size <= max_chars)
    step = max(1, len(paths) // max(n, 1))
    return [(str(p), p.read_text(encoding="utf-8")) for p in paths[::step][:n]]


def big_text(lines: int) -> str:
    """About `lines` lines of real code: standard library files one after another."""
    out, count = [], 0
    for p in sorted(Path(os.__file__).parent.rglob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append(t)
        count += t.count("\n")
        if count >= lines:
            break
    return "".join(out)


# positions as LSP counts them: lines end at \n, \r\n or \r; columns in UTF-16 units ------------------


def line_starts(text: str) -> list[int]:
    starts, i, n = [0], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\r" and i + 1 < n and text[i + 1] == "\n":
            i += 1
        if c in "\r\n":
            starts.append(i + 1)
        i += 1
    return starts


def position(text: str, starts: list[int], offset: int) -> types.Position:
    import bisect

    line = bisect.bisect_right(starts, offset) - 1
    col = sum(2 if ord(ch) > 0xFFFF else 1 for ch in text[starts[line] : offset])
    return types.Position(line, col)


def snap(text: str, offset: int) -> int:
    """Never between the \r and \n of one line break."""
    return offset - 1 if 0 < offset < len(text) and text[offset - 1] == "\r" and text[offset] == "\n" else offset


class Doc:
    def __init__(self, uri: str, text: str):
        self.uri, self.text, self.version, self.cursor = uri, text, 1, len(text) // 2


def random_changes(doc: Doc, rng: random.Random, pastes: list[str]) -> list[tuple[int, int, str]]:
    """One editor action on `doc` as code-point changes, each against the text the previous one left."""
    t, r = doc.text, rng.random()
    cur = snap(t, min(doc.cursor, len(t)))
    if r < 0.15:
        cur = snap(t, rng.randrange(len(t) + 1))
    if r < 0.55:
        return [(cur, cur, "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))))]
    if r < 0.75:
        span = rng.randint(1, 5) if rng.random() < 0.8 else rng.randint(10, 120)  # a character or across lines
        return [(snap(t, max(0, cur - span)), cur, "")]
    if r < 0.90:  # two places at once (a rename): the lower one first, so the upper offsets hold
        a, b = sorted(snap(t, rng.randrange(len(t) + 1)) for _ in range(2))
        return [(b, min(len(t), snap(t, b + rng.randint(0, 4))), "name_b"), (a, a, "name_a")]
    if r < 0.95:
        paste = rng.choice(pastes)
        start = rng.randrange(max(1, len(paste) - 500))
        paste = paste[start : start + rng.randint(500, 3000)]
        br = rng.random()
        paste = paste.replace("\n", "\r\n") if br < 0.3 else paste.replace("\n", "\r") if br < 0.4 else paste
        return [(cur, cur, paste)]
    ends = [i for i in (t.find("\n", cur), t.find("\r", cur)) if i >= 0]
    return [(cur, min(ends, default=len(t)), "")]  # delete to the end of the line


def send_changes(client: Client, doc: Doc, changes: list[tuple[int, int, str]]) -> None:
    events = []
    for start, end, new in changes:
        starts = line_starts(doc.text)
        events.append(types.TextDocumentContentChangePartial(
            range=types.Range(start=position(doc.text, starts, start), end=position(doc.text, starts, end)), text=new))
        doc.text = doc.text[:start] + new + doc.text[end:]
        doc.cursor = start + len(new)
    doc.version += 1
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=doc.uri, version=doc.version), content_changes=events))


# processes ------------------------------------------------------------------------------------------


def daemon_status(runtime: Path) -> dict | None:
    """The daemon's own account (`status`: where its engine thread's time went), over its socket."""
    from ghostline.lsp.remote import connect

    for sock in (runtime / "ghostline").glob("*.sock"):
        try:
            conn, _ = connect(str(sock), model=None)
            try:
                return conn.call("status", {})
            finally:
                conn.close()
        except Exception as exc:  # a daemon between restarts: the figures are missing, not the run
            print(f"daemon status: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None


def pids_matching(needle: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd:
                out.append(int(d.name))
    return out


def proc_stats(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        mb = lambda key: int(fields.get(key, "0 kB").split()[0]) / 1024  # noqa: E731
        return {"rss_mb": mb("VmRSS"), "hwm_mb": mb("VmHWM"), "anon_mb": mb("RssAnon"), "file_mb": mb("RssFile"),
                "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    except (OSError, KeyError, ValueError):
        return None


class Soak:
    def __init__(self, args, env: dict, runtime: Path):
        self.args, self.env, self.runtime = args, env, runtime
        self.rng = random.Random(args.seed)
        self.counts = {k: 0 for k in ("edits", "changes", "completions", "answered", "empty", "cancelled", "superseded", "errors",
                                      "checks", "mismatches", "check_errors", "kills", "malformed")}
        self.latencies: list[float] = []  # answered completions under the storm
        self.after_kill: list[float] = []  # ... and those that overlapped a kill of the daemon
        self.end_ok = False
        self.peak = {"server": 0.0, "daemon": 0.0}
        self.daemons: set[int] = set()
        self.kills: list[float] = []
        self.stop = False
        self.mismatched: list[str] = []

    def daemon_pids(self) -> list[int]:
        return pids_matching(f"ghostline engine --socket {self.runtime}")

    async def sample(self, servers: list[int]) -> None:
        log = open(self.args.rss_log, "a") if self.args.rss_log else None  # noqa: SIM115 (closed below)
        t0, n = time.monotonic(), 0
        while not self.stop:
            n += 1
            own = {}  # every 2 s the daemon's own account: cache bytes and what the allocator holds
            if log is not None and n % 4 == 0 and (status := await asyncio.to_thread(daemon_status, self.runtime)):
                own = {"caches_mb": status.get("memory_mb"), **(status.get("allocator") or {})}
            for pid in self.daemon_pids():
                self.daemons.add(pid)
                if (st := proc_stats(pid)) is not None:
                    self.peak["daemon"] = max(self.peak["daemon"], st["rss_mb"])
                    if log is not None:
                        log.write(json.dumps({"t": round(time.monotonic() - t0, 1), "pid": pid, **st, **own}) + "\n")
            for pid in servers:
                if (st := proc_stats(pid)) is not None:
                    self.peak["server"] = max(self.peak["server"], st["rss_mb"])
            await asyncio.sleep(0.5)
        if log is not None:
            log.close()

    async def complete(self, client: Client, doc: Doc, n: int) -> None:
        pos = position(doc.text, line_starts(doc.text), snap(doc.text, min(doc.cursor, len(doc.text))))
        msg_id = f"soak-{id(client)}-{n}"
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=doc.uri), position=pos,
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic))
        self.counts["completions"] += 1
        t0 = time.perf_counter()
        fut = asyncio.wrap_future(client.protocol.send_request("textDocument/inlineCompletion", params, msg_id=msg_id))
        cancel = self.rng.random() < 0.2
        if cancel:
            await asyncio.sleep(self.rng.uniform(0, 0.3))
            client.protocol.notify("$/cancelRequest", types.CancelParams(id=msg_id))
        try:
            res = await asyncio.wait_for(fut, 120)
        except Exception as exc:  # cancelled by us, or superseded by the next request of the document
            kind = "cancelled" if cancel else "superseded" if "cancel" in str(exc).lower() else "errors"
            self.counts[kind] += 1
            if kind == "errors":
                print(f"completion error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return
        if not cancel:
            ms = (time.perf_counter() - t0) * 1e3
            started = time.monotonic() - ms / 1e3
            if any(k >= started - 1.0 for k in self.kills):  # waited for a new daemon to load the model
                self.after_kill.append(ms)
            else:
                self.latencies.append(ms)
                if ms > 3000:
                    print(f"slow completion: {ms:.0f} ms in {doc.uri}", file=sys.stderr)
        self.counts["answered" if res is not None and res.items else "empty"] += 1

    async def storm(self, client: Client, docs: list[Doc], pastes: list[str], deadline: float) -> None:
        rate, n = self.args.rate / self.args.clients, 0
        pending: set[asyncio.Task] = set()
        while time.monotonic() < deadline and not self.stop:
            await asyncio.sleep(self.rng.expovariate(rate))
            doc = docs[0] if self.rng.random() < 0.7 else self.rng.choice(docs)
            changes = random_changes(doc, self.rng, pastes)
            send_changes(client, doc, changes)
            self.counts["edits"] += 1
            self.counts["changes"] += len(changes)
            pause = self.rng.random() < 1 / 15  # the end of a burst of typing: the user waits for ghost text
            if pause or self.rng.random() < 0.3:
                n += 1
                task = asyncio.ensure_future(self.complete(client, doc, n))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pause:
                await asyncio.sleep(self.rng.uniform(0.5, 1.5))
        if pending:
            await asyncio.wait(pending, timeout=180)

    async def check(self, clients: list[tuple[Client, list[Doc]]], label: str) -> None:
        for c, docs in clients:
            for doc in docs:
                try:
                    expected, got = await _inspected(c, doc)
                    t0 = time.monotonic()
                    while got is None and time.monotonic() - t0 < 120:  # the engine is restarting
                        await asyncio.sleep(1.0)
                        expected, got = await _inspected(c, doc)
                    got = got["text"] if isinstance(got, dict) else got.text
                except Exception as exc:
                    self.counts["check_errors"] += 1
                    print(f"{label}: inspect {doc.uri} failed: {exc}", file=sys.stderr)
                    continue
                self.counts["checks"] += 1
                if got != expected:
                    self.counts["mismatches"] += 1
                    self.mismatched.append(doc.uri)
                    print(f"{label}: MISMATCH {doc.uri} ({len(got or '')} vs {len(expected)} chars)", file=sys.stderr)

    async def chaos(self, servers: list[tuple[Client, int]], deadline: float) -> None:
        """kill -9 of the daemon every --kill-every s; malformed frames every 10 s."""
        next_kill = time.monotonic() + self.args.kill_every if self.args.kill_every else float("inf")
        next_bad = time.monotonic() + 5
        while time.monotonic() < deadline and not self.stop:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if now >= next_kill:
                next_kill = now + self.args.kill_every
                for pid in self.daemon_pids():
                    os.kill(pid, signal.SIGKILL)
                    self.counts["kills"] += 1
                    self.kills.append(now)
                    print(f"killed the daemon (pid {pid})", file=sys.stderr)
            if now >= next_bad:
                next_bad = now + 10
                client, _ = self.rng.choice(servers)
                client._server.stdin.write(b"Content-Length: 9\r\n\r\n{garbage}")
                not_rpc = json.dumps({"jsonrpc": "2.0", "x": 1}).encode()
                client._server.stdin.write(b"Content-Length: %d\r\n\r\n" % len(not_rpc) + not_rpc)
                for sock_path in self.runtime.glob("ghostline/*.sock"):
                    try:
                        with socket.socket(socket.AF_UNIX) as s:
                            s.settimeout(2)
                            s.connect(str(sock_path))
                            s.sendall(b"\x00\x00\x00\x05garbage-not-msgpack")
                    except OSError:
                        pass
                self.counts["malformed"] += 1

    async def vanish(self, files: list[tuple[str, str]]) -> float | None:
        """A client that opens a file, asks for a completion and vanishes: seconds until its server exits."""
        client = Client()
        await client.start_io(*SERVER, "--model", self.args.model, "--engine", "daemon", env=self.env)
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
        client.initialized(types.InitializedParams())
        await asyncio.wait_for(client.ready.wait(), 600)
        uri = "file:///soak/vanishing.py"
        client.open(uri, files[0][1])
        client.protocol.send_request("textDocument/inlineCompletion", types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(5, 0),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
        await asyncio.sleep(0.3)
        proc = client._server
        t0 = time.monotonic()
        proc.stdin.close()  # the editor is gone: its end of the pipes closes
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except asyncio.TimeoutError:
            proc.kill()
            return None
        return time.monotonic() - t0

    async def run(self) -> dict:
        a = self.args
        files = stdlib_files(a.clients * a.files + 1)
        pastes = [t for _, t in files]
        opts = {"debounce_ms": 0}
        out: dict = {}
        async with _servers(a.clients, a.model, opts, self.env, a.engine) as clients:
            server_pids = [c._server.pid for c in clients]
            sampler = asyncio.ensure_future(self.sample(server_pids))
            sessions = []
            for i, c in enumerate(clients):
                docs = [Doc(f"file:///soak/c{i}/{Path(p).name}", t) for p, t in files[i * a.files : (i + 1) * a.files]]
                for d in docs:
                    c.open(d.uri, d.text)
                sessions.append((c, docs))
            await self.check(sessions, "start")  # every file opened and encoded
            if a.big_lines:
                out["big"] = await self.big(clients[0], sessions[0][1][0], a.big_lines)
            start = {pid: proc_stats(pid) for pid in server_pids + self.daemon_pids()}
            deadline = time.monotonic() + a.seconds
            chaos = asyncio.ensure_future(self.chaos([(c, 0) for c in clients], deadline))
            vanished = asyncio.ensure_future(self.vanish(files)) if a.vanish else None
            storms = [asyncio.ensure_future(self.storm(c, docs, pastes, deadline)) for c, docs in sessions]
            t_next = time.monotonic() + a.check_s
            while time.monotonic() < deadline:
                await asyncio.sleep(max(0.0, min(t_next, deadline) - time.monotonic()))
                if time.monotonic() >= t_next:
                    t_next = time.monotonic() + a.check_s
                    await self.check(sessions, f"t={a.seconds - (deadline - time.monotonic()):.0f}s")
                    print(json.dumps({k: self.counts[k] for k in ("edits", "answered", "mismatches", "kills")}),
                          file=sys.stderr)
            await asyncio.gather(*storms)
            await chaos
            await asyncio.sleep(2.0)  # let the last updates land, then the final check
            before = (self.counts["mismatches"], self.counts["check_errors"])
            await self.check(sessions, "end")
            self.end_ok = before == (self.counts["mismatches"], self.counts["check_errors"])
            if a.big_lines:
                doc = out["big"].pop("doc")
                got = await clients[0].engine_text(doc.uri)
                out["big"]["text_intact"] = got == doc.text
            for i, c in enumerate(clients):
                for line in bytes(c.stderr).decode(errors="replace").splitlines():
                    if " ERROR " in line or "WARNING" in line or "resync" in line:
                        print(f"server {i}: {line[:300]}", file=sys.stderr)
            daemon = daemon_status(self.runtime)
            await asyncio.sleep(3.0)  # threads of finished requests wind down
            end = {pid: proc_stats(pid) for pid in server_pids + self.daemon_pids()}
            self.stop = True
            await sampler
            if vanished is not None:
                out["vanished_client_exit_s"] = await vanished
        growth = {str(pid): {k: end[pid][k] - start[pid][k] for k in ("threads", "fds")}
                  for pid in start if start.get(pid) and end.get(pid)}
        lat = sorted(self.latencies)
        return {**out, **self.counts, "daemon_pids_seen": len(self.daemons),
                "daemon_busy_s": (daemon or {}).get("busy_s"), "daemon_wait_ms_p50": (daemon or {}).get("wait_ms_p50"),
                "daemon_cache_mb_end": (daemon or {}).get("memory_mb"),
                "after_kill_ms_max": round(max(self.after_kill), 1) if self.after_kill else None,
                "recovered": len(self.daemons) > self.counts["kills"] and self.end_ok,
                "latency_ms_p50": round(statistics.median(lat), 1) if lat else None,
                "latency_ms_p95": round(lat[int(0.95 * (len(lat) - 1))], 1) if lat else None,
                "peak_rss_mb_server": round(self.peak["server"], 1), "peak_rss_mb_daemon": round(self.peak["daemon"], 1),
                "growth_same_pid": growth, "mismatched": sorted(set(self.mismatched)),
                "edits_per_s": round(self.counts["edits"] / a.seconds, 1) if a.seconds else None,
                "clients": a.clients, "seconds": a.seconds, "rate": a.rate, "model": a.model}

    async def big(self, client: Client, normal: Doc, lines: int) -> dict:
        """Open a huge file; then time the normal document's next completion and the huge one's first
        suggestion near its end (asked for as a user does, again every two seconds)."""
        doc = Doc("file:///soak/huge.py", big_text(lines))
        t0 = time.perf_counter()
        client.open(doc.uri, doc.text)
        res = await _invoked(client, normal, len(normal.text) // 2)
        normal_ms = (time.perf_counter() - t0) * 1e3
        t1, first = time.perf_counter(), None
        at = doc.text.rfind("\n", 0, len(doc.text) - 200) + 1
        while time.perf_counter() - t1 < 120:
            big = await _invoked(client, doc, at + doc.text[at:].find("(") + 1 if "(" in doc.text[at:] else at)
            if big is not None and big.items:
                first = time.perf_counter() - t1
                break
            await asyncio.sleep(2.0)
        return {"doc": doc, "lines": doc.text.count("\n"), "chars": len(doc.text),
                "normal_next_completion_ms": round(normal_ms, 1), "normal_answered": bool(res and res.items),
                "big_first_suggestion_s": None if first is None else round(first, 1)}


async def _inspected(client: Client, doc: Doc) -> tuple[str, object]:
    """The client's text of `doc` and the engine's view of it, the request sent before anything else
    runs (an edit sent between the two would make the engine's text newer than the one compared)."""
    fut = asyncio.wrap_future(client.protocol.send_request("ghostline/inspect", {"uri": doc.uri}))
    expected = doc.text
    return expected, await asyncio.wait_for(asyncio.shield(fut), 120)  # a timeout leaves pygls' future alone


async def _invoked(client: Client, doc: Doc, offset: int):
    pos = position(doc.text, line_starts(doc.text), offset)
    try:
        return await asyncio.wait_for(client.inline(doc.uri, pos.line, pos.character, invoked=True), 120)
    except Exception:
        return None


class _servers:
    """`n` started servers (one `running_server` each), entered and left together."""

    def __init__(self, n, model, options, env, engine):
        self.cms = [running_server(model=model, options=options, engine=engine, env=env, ready_timeout=900)
                    for _ in range(n)]

    async def __aenter__(self):
        return [await cm.__aenter__() for cm in self.cms]

    async def __aexit__(self, *exc):
        for cm in self.cms:
            await cm.__aexit__(*exc)


# strangers on a team server -----------------------------------------------------------------------


def strangers(args, env: dict) -> dict:
    """`--strangers` TCP connections that each announce a 16 MiB frame and send 2 MiB, without a
    token: the daemon's memory they cost, how soon they are closed, and whether a client with the
    token is served meanwhile."""
    from ghostline.engine.serving import wire
    from ghostline.lsp.remote import RemoteEngine

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = Path(env["GHOSTLINE_RUNTIME_DIR"]) / "token"
    token_file.write_text("soak-" + os.urandom(16).hex())
    token_file.chmod(0o600)
    daemon = subprocess.Popen([sys.executable, "-m", "ghostline", "engine", "--listen", f"127.0.0.1:{port}",
                               "--token-file", str(token_file), "--model", args.model], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and daemon.poll() is None, "the team server did not start"
                time.sleep(0.5)
        time.sleep(1.0)
        before = proc_stats(daemon.pid)["rss_mb"]
        socks, peak, t0 = [], before, time.monotonic()
        chunk = b"\x00" * 65536
        for _ in range(args.strangers):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            socks.append([s, wire.HEADER.pack(16 * 2**20) + chunk * 32, True])  # the header, then 2 MiB
        while time.monotonic() - t0 < 60 and any(open_ for _, _, open_ in socks):
            for entry in socks:
                s, left, open_ = entry
                if not open_:
                    continue
                try:
                    if left:
                        n = s.send(left[:65536])
                        entry[1] = left[n:]
                    elif s.recv(4096) == b"":
                        entry[2] = False
                except BlockingIOError:
                    pass
                except OSError:
                    entry[2] = False
            peak = max(peak, proc_stats(daemon.pid)["rss_mb"])
            time.sleep(0.01)
        closed_s = time.monotonic() - t0
        still_open = sum(open_ for _, _, open_ in socks)
        served = False
        remote = RemoteEngine.connect(("127.0.0.1", port), model=None, token=token_file.read_text().strip())
        text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return "
        remote.open("file:///served.py", text)
        served = remote.complete("file:///served.py", len(text)).stop_reason not in ("unavailable", "")
        for s, _, _ in socks:
            s.close()
        return {"strangers": args.strangers, "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1),
                "rss_delta_mb": round(peak - before, 1), "all_closed_within_s": round(closed_s, 1) if not still_open
                else None, "still_open_after_60_s": still_open, "token_client_served": served, "model": args.model}
    finally:
        daemon.terminate()
        daemon.wait(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--files", type=int, default=3, help="files each client opens")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--rate", type=float, default=10.0, help="edits a second, all clients together")
    p.add_argument("--kill-every", type=float, default=0.0, help="kill -9 the daemon this often (seconds; 0: never)")
    p.add_argument("--check-s", type=float, default=5.0, help="compare engine and client texts this often")
    p.add_argument("--vanish", action=argparse.BooleanOptionalAction, default=True,
                   help="one more client that vanishes mid-request")
    p.add_argument("--big-lines", type=int, default=0, help="also open a file of about this many lines")
    p.add_argument("--strangers", type=int, default=0, help="measure unauthenticated connections instead")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--engine", default="daemon", help="the servers' --engine (daemon: one shared daemon)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-log", help="append the daemon's memory (RSS, anonymous, file-backed) every half second here, "
                   "its cache bytes and allocator figures every 2 s")
    p.add_argument("--daemon-log", type=Path, help="keep a copy of the daemon's log here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ghostline-soak-") as tmp:
        runtime = Path(tmp) / "run"
        runtime.mkdir(mode=0o700)
        env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), GHOSTLINE_RUNTIME_DIR=str(runtime / "ghostline"),
                   GHOSTLINE_CACHE=str(Path(tmp) / "cache"), XDG_CACHE_HOME=str(Path(tmp) / "xdg-cache"),
                   XDG_CONFIG_HOME=str(Path(tmp) / "xdg-config"), XDG_DATA_HOME=str(Path(tmp) / "xdg-data"))
        (runtime / "ghostline").mkdir(mode=0o700)
        if args.strangers:
            result = strangers(args, env)
        else:
            result = asyncio.run(Soak(args, env, runtime).run())
            if args.daemon_log:
                logs = sorted((runtime / "ghostline").glob("*.log"))
                args.daemon_log.write_bytes(b"".join(p.read_bytes() for p in logs))
            for pid in pids_matching(f"ghostline engine --socket {runtime}"):
                os.kill(pid, signal.SIGTERM)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
