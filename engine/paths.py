"""Where Ghostline keeps its files. No torch here: the language server imports it without the model."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("GHOSTLINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ghostline"
    )
    return Path(base)
