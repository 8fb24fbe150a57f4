"""Accept/reject counts, kept locally (never sent anywhere) in the cache folder. Each completion
carries the record of its language and kind of document (`Stats.record`); the show gate learns from
it: where the user keeps fewer suggestions than its calibration expected it gets stricter, where they
keep more it shows more (bounded, `engine.gate.Gate.strength`)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from ghostline.engine.paths import cache_dir

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
        """(accepted, rejected) suggestions in this language and kind of document (`document_kind`)."""
        with self._lock:
            if self._data is None:
                self._data = self.load()
            per = self._data.get("by_kind", {}).get(f"{language}:{kind}", {})
        return per.get("accepted", 0), per.get("rejected", 0)

def report(data: dict) -> str:
    def line(name, d):
        acc, rej, shown = d.get("accepted", 0), d.get("rejected", 0), d.get("shown", 0)
        decided = acc + rej
        rate = f"{100 * acc / decided:.1f}%" if decided else "n/a"
        return f"{name:<12} shown {shown:>6}  accepted {acc:>6}  rejected {rej:>6}  acceptance {rate}"

    lines = [line("all", data)]
    for lang, d in sorted(data.get("by_language", {}).items()):
        lines.append(line(lang, d))
    for key, d in sorted(data.get("by_kind", {}).items()):
        lines.append(line(key, d))
    return "\n".join(lines)
