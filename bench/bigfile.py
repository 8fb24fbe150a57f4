"""The 4k-token-file scenario: edit-then-complete tasks (../shared/EVAL.md format) on real ~4,000-token files.

Files come from this Python's standard library (`os.path.dirname(os.__file__)`, no tests, no
site-packages, nothing whose path mentions requests), 3,500-4,500 tokens by Ghostline's tokenizer,
spread evenly over the qualifying files sorted by path. In each, `after` is the real file; `before`
lacks one non-blank line of its upper half (25-45% of the lines), and the change puts it back (an
insertion at that line's start); the cursor is after the indentation of a code line in the lower
half (60-90%), at least 8 characters, not a comment or a string, and `target` is the rest of that
line. As in the EVAL tasks, the target line stands in both texts at the cursor. Choices are seeded
by the file's path, so the task set is the same on every run.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tokenize
from collections.abc import Callable
from pathlib import Path

from bench.tasks import cursor_offset
from ghostline.engine.text import apply_changes

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _code_lines(text: str) -> set[int]:
    """0-based lines whose first token, at the indentation, is code (not a comment or a string)."""
    lines = text.split("\n")
    firsts: dict[int, int] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        row, col = tok.start
        if row - 1 in firsts or tok.type in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        indent = len(lines[row - 1]) - len(lines[row - 1].lstrip())
        firsts[row - 1] = tok.type if col == indent else -1
    return {i for i, kind in firsts.items() if kind in (tokenize.NAME, tokenize.OP, tokenize.NUMBER)}


def task_from(text: str, name: str) -> dict | None:
    """One task from a file's text, or None when the file has no fitting edit line or cursor line."""
    rng = random.Random(name)
    lines = text.split("\n")
    n = len(lines)
    try:
        code = _code_lines(text)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    edits = [i for i in range(int(0.25 * n), int(0.45 * n)) if lines[i].strip()]
    cursors = [
        i for i in range(int(0.60 * n), int(0.90 * n))
        if i in code and len(lines[i].strip()) >= 8
    ]
    if not edits or not cursors:
        return None
    e, c = rng.choice(edits), rng.choice(cursors)
    indent = len(lines[c]) - len(lines[c].lstrip())
    before = "\n".join(lines[:e] + lines[e + 1 :])
    task = {
        "id": "bigfile-" + name.removesuffix(".py").replace("/", "."),
        "source": f"cpython@{sys.version.split()[0]}:Lib/{name}",
        "edit_kind": "insert",
        "before": before,
        "changes": [{"range": {"start": {"line": e, "character": 0}, "end": {"line": e, "character": 0}},
                     "text": lines[e] + "\n"}],
        "after": text,
        "cursor": {"line": c, "character": indent},
        "target": lines[c][indent:],
    }
    check(task)
    return task


def check(task: dict) -> None:
    """The change turns `before` into `after`, and the target stands at the cursor."""
    if apply_changes(task["before"], task["changes"]) != task["after"]:
        raise AssertionError(f"{task['id']}: applying the changes to before does not give after")
    if not task["after"][cursor_offset(task) :].startswith(task["target"]):
        raise AssertionError(f"{task['id']}: the target is not at the cursor")


def tasks(n: int = 20, *, count: Callable[[str], int] | None = None, low: int = 3500, high: int = 4500,
          root: str | os.PathLike | None = None) -> list[dict]:
    """`n` tasks from stdlib files of `low`..`high` tokens (`count`: Ghostline's tokenizer by default)."""
    if count is None:
        from bench.anchors import tokenizer

        tok = tokenizer()
        count = lambda text: len(tok.encode(text)[0])  # noqa: E731
    root = Path(root or os.path.dirname(os.__file__))
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts) or "requests" in str(rel).lower():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not 2 * low <= len(text) <= 8 * high or not low <= count(text) <= high:
            continue  # the character bounds only skip tokenizing files that cannot fit
        task = task_from(text, str(rel))
        if task:
            found.append(task)
    if len(found) < n:
        return found
    return [found[i * len(found) // n] for i in range(n)]
