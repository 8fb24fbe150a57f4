"""The VS Code extension: installs from its lock file, compiles with tsc, packages as a .vsix with its
runtime dependencies, and its client code (node's test runner, test/server.test.js) talks LSP to the
real server. The extension inside a real VS Code is tests/test_vscode_ui.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "editors" / "vscode"

pytestmark = pytest.mark.skipif(
    shutil.which("npm") is None or shutil.which("node") is None, reason="npm/node missing: cannot build the VS Code extension"
)


def npm(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["npm", *args], cwd=EXT, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"npm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def built() -> Path:
    """node_modules from package-lock.json, out/ from tsc, and the packaged ghostline.vsix."""
    npm("ci", "--no-audit", "--no-fund", "--prefer-offline")
    npm("run", "compile", timeout=120)
    vsix = EXT / "ghostline.vsix"
    vsix.unlink(missing_ok=True)
    npm("run", "package", timeout=120)
    return vsix


def test_extension_packages_with_its_runtime_dependencies(built):
    names = set(zipfile.ZipFile(built).namelist())
    for name in (
        "extension/package.json",
        "extension/out/extension.js",
        "extension/out/server.js",
        "extension/LICENSE.txt",
        "extension/node_modules/vscode-languageclient/package.json",
    ):
        assert name in names, f"{name} missing from the .vsix"
    assert not any(n.startswith(("extension/src/", "extension/test/", "extension/node_modules/typescript/")) for n in names)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_extension_client_code_against_the_server(built):
    env = dict(os.environ, GHOSTLINE_PYTHON=sys.executable)
    proc = subprocess.run(
        ["node", "--test", "test/"], cwd=EXT, capture_output=True, text=True, timeout=400, env=env, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "# fail 0" in proc.stdout and "# skipped 0" in proc.stdout, proc.stdout[-3000:]
    print(next(line for line in proc.stdout.splitlines() if "suggestion at" in line))
