"""The code vocabulary: the tokens that occur in real code, rows of the shortlist head (engine.quant).

Most of Gemma 3's 262,144 tokens are words of natural languages that code rarely uses; the head over
all of them is 63% of a decode step's weight reads. We count a tokenizer's ids over source files at
hand (the stdlib, installed packages, editor runtimes, a workspace) and keep every id seen,
plus the special, whitespace and one- or two-character ASCII tokens, as a sorted int32 array. The
engine adds each open document's own ids on top, so a name the context uses can always be chosen.
How often the full head's argmax falls outside: `python -m bench.weights` (bench/RESULTS.md, "Fast weights").
"""

from __future__ import annotations

import collections
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

SUFFIXES = {".py", ".pyi", ".js", ".ts", ".tsx", ".jsx", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
            ".java", ".kt", ".rb", ".lua", ".vim", ".sh", ".sql", ".html", ".css", ".toml", ".yaml", ".md"}


def default_roots() -> list[Path]:
    """Code every install has: the Python stdlib and installed packages (and Neovim's runtime if present)."""
    import sysconfig

    roots = [Path(sysconfig.get_path("stdlib")), Path(sysconfig.get_path("purelib"))]
    for share in ("/usr/share/nvim", "/usr/local/share/nvim"):
        if os.path.isdir(share):
            roots.append(Path(share))
    return roots


def corpus_files(roots: Iterable[os.PathLike], *, exclude: Iterable[str] = (), per_suffix: int = 1500,
                 max_bytes: int = 200_000, holdout: bool = False) -> list[Path]:
    """Source files under `roots`, at most `per_suffix` of each kind (a fixed, hash-ordered choice, so
    one language cannot crowd out the rest). Paths containing any `exclude` word are skipped. Every
    tenth file (by path hash) is held out for measuring: `holdout=True` returns those instead."""
    exclude = [e.lower() for e in exclude]
    by_suffix: dict[str, list[tuple[str, Path]]] = collections.defaultdict(list)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and not any(e in d.lower() for e in exclude)]
            for name in filenames:
                path = Path(dirpath, name)
                if path.suffix not in SUFFIXES or any(e in str(path).lower() for e in exclude):
                    continue
                try:
                    if not 200 <= path.stat().st_size <= max_bytes:
                        continue
                except OSError:
                    continue
                key = hashlib.sha256(str(path).encode()).hexdigest()
                if (int(key[:8], 16) % 10 == 0) == holdout:
                    by_suffix[path.suffix].append((key, path))
    files = []
    for suffix in sorted(by_suffix):
        files += [p for _, p in sorted(by_suffix[suffix])[:per_suffix]]
    return files


def count_ids(tokenizer, files: list[Path], *, progress: Callable[[str], None] | None = None) -> collections.Counter:
    """How often each id occurs in the files (unreadable or non-UTF-8 files are skipped)."""
    counts: collections.Counter = collections.Counter()
    for n, path in enumerate(files, 1):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        counts.update(tokenizer.encode(text)[0])
        if progress and n % 500 == 0:
            progress(f"vocabulary: {n}/{len(files)} files, {len(counts)} distinct tokens")
    return counts


def code_vocab(tokenizer, counts: collections.Counter, *, min_count: int = 1) -> np.ndarray:
    """Sorted int32 ids: those seen at least `min_count` times, the special tokens (EOS!), and every
    token that is whitespace or one or two printable ASCII characters."""
    keep = {i for i, c in counts.items() if c >= min_count}
    keep |= set(tokenizer.eos_ids) | set(tokenizer.hf.all_special_ids)
    for i, s in enumerate(tokenizer.strings):
        if s and (s.isspace() or (len(s) <= 2 and s.isascii() and s.isprintable())):
            keep.add(i)
    return np.array(sorted(i for i in keep if 0 <= i < tokenizer.vocab_size), dtype=np.int32)
