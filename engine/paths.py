"""Where Ghostline keeps its files. No torch here: the language server imports it without the model.

Two folders: the cache (`$GHOSTLINE_CACHE`, else `$XDG_CACHE_HOME/ghostline`) holds what belongs to one
user (acceptance counts, calibration, compiled kernels); the model cache (`$GHOSTLINE_MODEL_CACHE`, else
`models/` and `gguf/` inside the cache) holds the reassembled GGUF and its de-quantised copy, which are
the same for everyone and may be shared read-only (the test suite shares one between its runs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("GHOSTLINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ghostline"
    )
    return Path(base)


def model_cache_dir() -> Path:
    """The folder holding `gguf/` and `models/` (model files derived from the installed wheels)."""
    return Path(os.environ.get("GHOSTLINE_MODEL_CACHE") or cache_dir())
