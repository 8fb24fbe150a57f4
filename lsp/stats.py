"""Accept/reject counts, kept locally (never sent anywhere) in the cache folder, and what the show
gate learns from them: in a language and kind of document where the user keeps few suggestions, the
gate gets stricter; where they keep most, it shows more (bounded, see `Stats.gate_strength`)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from ghostline.engine.paths import cache_dir

LEARN_AFTER = 20  # decided suggestions (accepted + rejected) before the gate's strength moves
AIM = 0.5  # the acceptance rate at which the strength stays as set
BOUNDS = (0.5, 1.5)  # the learned factor on the strength setting
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

    def gate_strength(self, base: float, language: str | None, kind: str) -> float:
        """The gate's strength for a document: the setting times a factor in BOUNDS learned from the
        acceptance rate here (pulled towards AIM by ten pseudo-counts), once LEARN_AFTER were decided."""
        with self._lock:
            if self._data is None:
                self._data = self.load()
            per = self._data.get("by_kind", {}).get(f"{language}:{kind}", {})
        acc, rej = per.get("accepted", 0), per.get("rejected", 0)
        if acc + rej < LEARN_AFTER:
            return base
        rate = (acc + 10 * AIM) / (acc + rej + 10)
        return base * min(BOUNDS[1], max(BOUNDS[0], 1.0 + (AIM - rate) * 2))


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
