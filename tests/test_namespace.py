"""One import namespace: from the repository root, `kernels`, `engine` and `lsp` stay whatever the
environment has (Hugging Face's `kernels` for transformers); every module of the language server
(`lsp/`) imports without torch (a server on the engine daemon is a small process); calls go down
only (lsp -> engine -> kernels); and no module imports itself back through another (no import
circles, deferred imports included)."""

from __future__ import annotations

import ast
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
            "import importlib, pathlib\n"
            "for path in sorted(pathlib.Path('lsp').glob('*.py')):\n"
            "    importlib.import_module('ghostline.lsp.' + path.stem)\n"
            "import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


PACKAGES = {"ghostline": ROOT / "ghostline", "ghostline.engine": ROOT / "engine", "ghostline.lsp": ROOT / "lsp",
            "ghostline.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Every module of the product by its import name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The product's modules `path` imports anywhere (deferred imports inside functions too; not the
    ones under `if TYPE_CHECKING:`, which never run)."""
    out = set()

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("ghostline"):
                for alias in child.names:
                    sub = f"{child.module}.{alias.name}"
                    out.add(sub if sub in known else child.module)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.startswith("ghostline"))
            walk(child)

    walk(ast.parse(path.read_text()))
    return {m for m in out if m in known}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    known = modules()
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    assert len(graph) > 40 and graph["ghostline.engine.engine"], "the import graph was not read"
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles(graph) == []


def test_calls_go_down_only():
    """lsp -> engine -> kernels: the engine (its serving included) never imports the language server,
    the kernels import neither."""
    known = modules()
    below = {"ghostline.engine": ("ghostline.lsp",), "ghostline.kernels": ("ghostline.lsp", "ghostline.engine")}
    upward = [(name, m) for name, path in known.items() for layer, above in below.items()
              if name.startswith(layer + ".") for m in imported(path, known) if m.startswith(above)]
    assert any(name.startswith("ghostline.engine.serving.") for name in known), "the serving modules were not found"
    assert upward == []
