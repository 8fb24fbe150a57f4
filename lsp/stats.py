"""Accept/reject counts, kept locally (never sent anywhere) in the cache folder: `shown`,
`accepted` (taken, whole or in part), `typed` (not taken, but the user typed at least a word of it
themselves) and `rejected`. Each completion carries the record of its language and kind of document
(`Stats.record`); the show gate learns from it: where the user keeps fewer suggestions than its
calibration expected it gets stricter, where they keep more it shows more (bounded,
`engine.gate.Gate.strength`)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ghostline.engine.paths import cache_dir

if TYPE_CHECKING:
    from ghostline.engine.gate import Gate

_TEST = re.compile(r"(^|/)(tests?/|test_[^/]*$|[^/]*_test\.\w+$|conftest\.py$)")


def stats_path() -> Path:
    return cache_dir() / "stats.json"


def document_kind(uri: str) -> str:
    """`test` for test files (tests/ folders, test_*.py, *_test.*), else `source`."""
    return "test" if _TEST.search(uri) else "source"


class Stats:
    def __init__(self, path: Path | None = None):
        self.path = path or stats_path()
        self._lock = threading.Lock()
        self._data: dict | None = None

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def count(self, event: str, language: str | None = None, kind: str | None = None) -> None:
        with self._lock:
            data = self.load()
            data[event] = data.get(event, 0) + 1
            if language:
                per = data.setdefault("by_language", {}).setdefault(language, {})
                per[event] = per.get(event, 0) + 1
                if kind:
                    per = data.setdefault("by_kind", {}).setdefault(f"{language}:{kind}", {})
                    per[event] = per.get(event, 0) + 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self.path)
            self._data = data

    def record(self, language: str | None, kind: str) -> tuple[int, int]:
        """The record (`kept`) of this language and kind of document (`document_kind`)."""
        with self._lock:
            if self._data is None:
                self._data = self.load()
            return kept(self._data.get("by_kind", {}).get(f"{language}:{kind}", {}))


def kept(counts: dict) -> tuple[int, int]:
    """(kept, rejected) of a set of counts: kept are those taken and those typed, as the gate's
    calibration counts them (EVAL.md's accept model)."""
    return counts.get("accepted", 0) + counts.get("typed", 0), counts.get("rejected", 0)


def report(data: dict, gate: Gate | None = None) -> str:
    """The counts as a table: all, per language, per language and kind of document; with `gate`, the
    strength factor each kind's record gives it (1: the calibrated threshold)."""

    def line(name, d, strength=""):
        (keep, rej), acc, typed, shown = kept(d), d.get("accepted", 0), d.get("typed", 0), d.get("shown", 0)
        rate = f"{100 * keep / (keep + rej):.1f}%" if keep + rej else "n/a"
        return f"{name:<14} shown {shown:>6}  accepted {acc:>6}  typed {typed:>6}  rejected {rej:>6}  kept {rate:>6}{strength}"

    lines = [line("all", data)]
    for lang, d in sorted(data.get("by_language", {}).items()):
        lines.append(line(lang, d))
    for key, d in sorted(data.get("by_kind", {}).items()):
        lines.append(line(key, d, f"  gate x{gate.strength(1.0, kept(d)):.2f}" if gate else ""))
    return "\n".join(lines)
