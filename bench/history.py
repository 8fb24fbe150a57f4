"""Edit-then-complete tasks and their workspaces from any git repository's history, in the format of
../shared/EVAL.md, so every benchmark also runs on code nobody tuned on.

For each commit (newest first, no merges) and each Python file it modified: the file at the parent is
`before`; the commit's hunks above a cursor line are the edit (`changes`, line-based, bottom to top)
and `after` is `before` with them applied; the cursor is the first non-blank character of the first
line at most `--gap` lines below the last of those hunks that the commit left as it was and that
holds at least 8 characters after its indentation; `target` is the rest of that line. Both texts are
cut 20 lines below the cursor. The workspace is every other `.py` file at the parent (at most
`--max-files`, each at most 256 KB). One task per (commit, file).

    python -m bench.history --repo /path/to/repo.git --name click --out tasks.jsonl \
        --workspace workspace.json.gz [--limit 200] [--gap 6]
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import subprocess
from pathlib import Path

TRUNCATE = 20


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", repo, *args], check=True, capture_output=True).stdout.decode(
        "utf-8", errors="replace")


def blob(repo: str, rev: str, path: str) -> str | None:
    try:
        raw = subprocess.run(["git", "--git-dir", repo, "show", f"{rev}:{path}"], check=True,
                             capture_output=True).stdout
        return raw.decode("utf-8")
    except (subprocess.CalledProcessError, UnicodeDecodeError):
        return None


def task_of(before: str, new: str, gap: int) -> dict | None:
    """The task one file's change makes (None: no usable cursor)."""
    a, b = before.split("\n"), new.split("\n")
    ops = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()]
    hunks = [op for op in ops if op[0] != "equal"]
    for k, (tag, i1, i2, j1, j2) in enumerate(hunks):
        nxt = hunks[k + 1][1] if k + 1 < len(hunks) else len(a)
        for line in range(i2, min(i2 + gap, nxt)):  # lines the commit left as they were, below this hunk
            text = a[line]
            body = text.strip()
            if len(body) < 8 or body.startswith("#"):
                continue
            applied = hunks[: k + 1]
            after = list(a)
            for _, h1, h2, g1, g2 in reversed(applied):
                after[h1:h2] = b[g1:g2]
            shift = sum((g2 - g1) - (h2 - h1) for _, h1, h2, g1, g2 in applied)
            cursor_line = line + shift
            indent = len(text) - len(text.lstrip())
            changes = []
            for _, h1, h2, g1, g2 in reversed(applied):  # bottom to top: ranges in `before`'s lines
                changes.append({"range": {"start": {"line": h1, "character": 0}, "end": {"line": h2, "character": 0}},
                                "text": "".join(x + "\n" for x in b[g1:g2])})
            kinds = {t for t, *_ in applied}
            kind = "multi" if len(applied) > 1 else {"insert": "insert", "delete": "delete"}.get(kinds.pop(), "replace")
            cut_a, cut_b = line + TRUNCATE, cursor_line + TRUNCATE
            return {"edit_kind": kind, "before": "\n".join(a[:cut_a]), "changes": changes,
                    "after": "\n".join(after[:cut_b]), "cursor": {"line": cursor_line, "character": indent},
                    "target": text[indent:]}
    return None


def build(repo: str, name: str, limit: int, gap: int, max_files: int) -> tuple[list[dict], dict]:
    tasks, ws = [], {"repo": name, "parents": {}, "commits": {}, "blobs": {}}
    for line in git(repo, "log", "--no-merges", "--format=%H %P", "--", "*.py").splitlines():
        commit, *parents = line.split()
        if len(parents) != 1:
            continue
        parent = parents[0]
        changed = git(repo, "diff", "--name-only", "--diff-filter=M", parent, commit, "--", "*.py").split()
        for path in changed:
            before, new = blob(repo, parent, path), blob(repo, commit, path)
            if before is None or new is None or before.count("\n") > 3000:
                continue
            t = task_of(before, new, gap)
            if t is None:
                continue
            short = commit[:10]
            tasks.append({"id": f"{name}-{short}-{len(tasks)}", "source": f"{name}@{short}:{path}", **t})
            ws["parents"][short] = parent[:10]
            if parent[:10] not in ws["commits"]:
                files = {}
                for entry in git(repo, "ls-tree", "-r", "-l", parent).splitlines():
                    meta, p = entry.split("\t", 1)
                    _, kind, sha, size = meta.split()
                    if kind == "blob" and p.endswith(".py") and size != "-" and int(size) <= 256 * 1024:
                        files[p] = sha
                for p, sha in sorted(files.items())[:max_files]:
                    if sha not in ws["blobs"]:
                        text = blob(repo, parent, p)
                        if text is None:
                            continue
                        ws["blobs"][sha] = text
                    ws["commits"].setdefault(parent[:10], {})[p] = sha
            if len(tasks) >= limit:
                return tasks, ws
    return tasks, ws


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repo", required=True, help="a git directory (a clone's .git or a bare repository)")
    p.add_argument("--name", required=True, help="the tasks' repository name")
    p.add_argument("--out", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--gap", type=int, default=6)
    p.add_argument("--max-files", type=int, default=400)
    args = p.parse_args(argv)
    tasks, ws = build(args.repo, args.name, args.limit, args.gap, args.max_files)
    Path(args.out).write_text("".join(json.dumps(t) + "\n" for t in tasks))
    with gzip.open(args.workspace, "wt") as f:
        json.dump(ws, f)
    print(json.dumps({"tasks": len(tasks), "commits": len(ws["commits"]), "blobs": len(ws["blobs"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
