"""Accept/reject counts, kept locally (never sent anywhere) in the cache folder."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ghostline.engine.paths import cache_dir


def stats_path() -> Path:
    return cache_dir() / "stats.json"


class Stats:
    def __init__(self, path: Path | None = None):
        self.path = path or stats_path()
        self._lock = threading.Lock()

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def count(self, event: str, language: str | None = None) -> None:
        with self._lock:
            data = self.load()
            data[event] = data.get(event, 0) + 1
            if language:
                per = data.setdefault("by_language", {}).setdefault(language, {})
                per[event] = per.get(event, 0) + 1
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            tmp.replace(self.path)


def report(data: dict) -> str:
    def line(name, d):
        acc, rej, shown = d.get("accepted", 0), d.get("rejected", 0), d.get("shown", 0)
        decided = acc + rej
        rate = f"{100 * acc / decided:.1f}%" if decided else "n/a"
        return f"{name:<12} shown {shown:>6}  accepted {acc:>6}  rejected {rej:>6}  acceptance {rate}"

    lines = [line("all", data)]
    for lang, d in sorted(data.get("by_language", {}).items()):
        lines.append(line(lang, d))
    return "\n".join(lines)
