"""One import namespace: from the repository root, `kernels`, `engine` and `lsp` stay whatever the
environment has (Hugging Face's `kernels` for transformers), and the language server imports without
torch (a server on the engine daemon is a small process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root, where the current folder comes first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_design_folders_are_not_top_level_packages():
    for folder in ("lsp", "engine", "kernels"):
        assert (ROOT / folder).is_dir() and not (ROOT / folder / "__init__.py").exists(), folder
    code = ("import transformers, ghostline.kernels.step, ghostline.engine.engine, ghostline.lsp.server\n"
            "from transformers import AutoModelForCausalLM\n"
            "import importlib.util as u\n"
            "for name in ('lsp', 'engine', 'kernels'):\n"
            "    spec = u.find_spec(name)\n"
            "    print(name, spec.origin if spec is not None else None)\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.splitlines():
        name, origin = line.split(" ", 1)
        # None (nothing), a namespace portion (no origin), or another distribution's package: never ours.
        assert origin == "None" or not origin.startswith(str(ROOT / name)), line


def test_language_server_imports_without_torch():
    code = ("import builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in ('torch', 'transformers', 'triton'):\n"
            "        raise ImportError(f'{name} is not importable in this test')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import ghostline.lsp.server, ghostline.lsp.cli, ghostline.lsp.remote\n"
            "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
