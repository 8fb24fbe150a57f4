"""The extension in a real VS Code: code-server (`make vscode-deps`) with the packaged .vsix, driven
through Debian's chromium by Playwright. It types into a Python file and reads the editor's DOM:
ghost text, Tab, the next draft, accept word, a mismatching keystroke, an auto-closed bracket, the
suggest widget, the status bar and the server log. Screenshots of each step go to build/vscode-ui/."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest

from bench.vscode import CODE_SERVER, CodeServer, Editor, build_vsix, run

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "build" / "vscode-ui"

# `letters` repeats `words`: the model continues the new line from the one above, so the
# suggestions are predictable enough for a UI test on a 135M model.
SOURCE = '''def words(text):
    """The non-empty words of text."""
    chunks = [c for c in text.split() if c]
    return chunks


def letters(text):
    """The non-empty letters of text."""
'''
SETTINGS = {
    "ghostline.serverArgs": ["--engine", "in-process"],  # after `serve`
    "ghostline.model": "smollm2-135m",
    "ghostline.maxTokens": 16,
    "ghostline.multiline": "never",
    "ghostline.gate": False,
    "editor.autoClosingBrackets": "always",
}
# An output channel line's time and level, then (a line from stderr) the Python logger's.
LOG_PREFIX = re.compile(r"^\S+ \S+ \[\w+\] (\S+ \S+ \S+ (DEBUG|INFO|WARNING|ERROR) )?")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a first `make vscode-deps` takes ~3.5 minutes


@pytest.fixture(scope="module")
def vscode_deps():
    """code-server, node 24 and chromium from `make vscode-deps` (cached under build/ after the first run)."""
    if shutil.which("make") is None or shutil.which("npm") is None:
        pytest.skip("make or npm missing: cannot install code-server")
    proc = run(["make", "-s", "vscode-deps"])
    if proc.returncode != 0 or shutil.which("chromium") is None or not CODE_SERVER.exists():
        pytest.skip(f"code-server/chromium could not be installed (make vscode-deps: {proc.returncode}):\n"
                    f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")


@pytest.fixture(scope="module")
def code_server(vscode_deps, tmp_path_factory):
    """A running code-server with the packaged extension; it starts `.venv/bin/python -m ghostline
    serve --engine in-process` on SmolLM2."""
    base = tmp_path_factory.mktemp("vscode")
    vsix = build_vsix(base / "ghostline.vsix")
    with CodeServer(base / "code-server", vsix, SETTINGS, {"words.py": SOURCE}) as cs:
        yield cs


def outcomes(cs: CodeServer) -> tuple[int, int]:
    """Accepted and rejected suggestions as the server counted them (`ghostline/didAccept`, `didReject`)
    in the cache folder code-server gave it."""
    path = cs.cache / "stats.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return data.get("accepted", 0), data.get("rejected", 0)


def saved(work: Path, ed: Editor) -> str:
    ed.press("Control+s")
    ed.page.wait_for_timeout(500)
    return (work / "words.py").read_text()


def open_file(ed: Editor, url: str) -> str:
    """Opens words.py and waits for the status bar's `ready`; returns the status."""
    ed.page.goto(url)
    ed.page.wait_for_selector(".monaco-workbench", timeout=60_000)
    ed.open("words.py")
    deadline = time.monotonic() + 120
    while not ed.status() and time.monotonic() < deadline:  # the extension activates
        ed.page.wait_for_timeout(100)
    ed.shot("loading")
    ready = ed.wait_status("ready")
    ed.shot("ready")
    return ready


def complete_a_line(ed: Editor, work: Path) -> tuple[str, str]:
    """Ghost text after an auto-closed bracket, the suggest widget, the next draft, accept word, Tab;
    returns the ghost text and the line saved."""
    ed.press("Control+End")
    ed.type("    chunks = [c for c ")
    assert ed.line().endswith("[c for c ]"), f"VS Code closed the bracket itself: {ed.line()!r}"
    ghost = ed.wait_ghost()
    ed.shot("ghost-text")
    assert not ghost.endswith("]"), f"the ghost text repeats the bracket VS Code closed: {ghost!r} + {ed.line()!r}"
    # The suggest widget never repeats the ghost text.
    ed.press("Control+Space")
    ed.page.wait_for_timeout(800)
    rows = ed.suggest_rows()
    ed.shot("suggest-widget")
    assert not any(ghost.strip() in r for r in rows), (ghost, rows)
    ed.press("Escape")
    ed.page.wait_for_timeout(200)
    ghost = ed.wait_ghost()
    # Alt+] shows another draft of the same request, Alt+[ the first again.
    ed.press("Alt+BracketRight")
    other = ed.wait_ghost(timeout=15, unlike=ghost)
    ed.shot("next-draft")
    ed.press("Alt+BracketLeft")
    assert ed.wait_ghost(timeout=15, unlike=other) == ghost
    # Ctrl+Right accepts one word; the rest stays suggested.
    before = ed.line()
    ed.press("Control+ArrowRight")
    deadline = time.monotonic() + 10
    while ed.line() == before and time.monotonic() < deadline:
        ed.page.wait_for_timeout(50)
    word = ed.line()[len(before) - 1 :].removesuffix("]")  # the word lands before the closing bracket
    rest = ed.wait_ghost(timeout=15)
    ed.shot("accept-word")
    assert word.strip() and ghost.startswith(word) and len(word) < len(ghost), (ghost, word)
    assert rest == ghost[len(word) :], (ghost, word, rest)
    # Tab inserts the rest, and the bracket VS Code closed is not doubled.
    ed.press("Tab")
    ed.page.wait_for_timeout(300)
    ed.shot("accepted")
    line = saved(work, ed).splitlines()[-1]
    assert line == "    chunks = [c for c " + ghost + "]", (line, ghost)
    assert "]]" not in line and line.count("[") == line.count("]"), f"the auto-closed bracket doubled: {line!r}"
    return ghost, line


def type_over_a_suggestion(ed: Editor) -> None:
    """A typed character that does not follow the suggestion clears it."""
    ed.press("End")
    ed.press("Enter")
    ed.type("return ")
    shown = ed.wait_ghost()
    ed.type("#" if not shown.startswith("#") else "@")
    ed.page.wait_for_timeout(100)
    now = ed.ghost()
    ed.shot("mismatch")
    assert now != shown and not (now and shown.startswith(now)), (shown, now)


def turn_off_for_python(ed: Editor) -> None:
    """`Ghostline: Turn Suggestions On/Off for This Language`: the status bar says off, and typing shows nothing."""
    ed.press("F1")
    ed.page.wait_for_selector(".quick-input-widget input", timeout=10_000)
    ed.type("Ghostline: Turn Suggestions On/Off for This Language")
    ed.page.wait_for_selector(".quick-input-list .monaco-list-row", timeout=10_000)
    ed.press("Enter")
    assert "off" in ed.wait_status("off", timeout=10)
    ed.press("End")
    ed.press("Enter")
    ed.type("return ")
    ed.page.wait_for_timeout(2000)
    ed.shot("turned-off")
    assert not ed.ghost().strip(), ed.ghost()


def server_log(ed: Editor) -> list[str]:
    """The output channel's lines, opened by a click on the status bar item."""
    ed.page.locator(".statusbar-item[aria-label^='Ghostline ']").click()
    ed.page.wait_for_selector(".panel .monaco-editor .view-line", timeout=15_000)
    ed.page.wait_for_timeout(500)
    log = ed.page.evaluate("""() => [...document.querySelectorAll('.panel .monaco-editor .view-line')]
        .map(e => e.textContent.replace(/\\u00a0/g, ' '))""")
    ed.shot("server-log")
    return log


def test_ghost_text_in_vscode(code_server):
    from playwright.sync_api import sync_playwright

    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    accepted, rejected = outcomes(code_server)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        ed = Editor(browser.new_page(viewport={"width": 1280, "height": 720}), SHOTS)
        try:
            ready = open_file(ed, code_server.url)
            ghost, line = complete_a_line(ed, code_server.work)
            type_over_a_suggestion(ed)
            # The extension reported both: the accepted suggestion and the one typed over.
            deadline = time.monotonic() + 10
            while outcomes(code_server)[1] == rejected and time.monotonic() < deadline:
                ed.page.wait_for_timeout(100)
            now = outcomes(code_server)
            assert now[0] == accepted + 1 and now[1] > rejected, (now, accepted, rejected)
            turn_off_for_python(ed)
            # The server's log: each line once, INFO lines not as errors.
            log = server_log(ed)
            assert any("ready in" in entry for entry in log), log
            assert not [e for e in log if "[error]" in e and " INFO " in e], log
            bodies = [LOG_PREFIX.sub("", e) for e in log if e.strip()]
            assert len(bodies) == len(set(bodies)), f"lines repeated in the server log: {log}"
        except BaseException:
            ed.shot("failure")
            raise
        finally:
            browser.close()
    print(f"status: {ready!r}; ghost text {ghost!r}; accepted line {line!r}; screenshots in {SHOTS}")
