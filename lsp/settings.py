"""Server settings: a defaulted dataclass, parsed from `initializationOptions` or
`workspace/didChangeConfiguration` (flat, or under the key "ghostline")."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass

from ghostline.engine.completion import check_option

log = logging.getLogger("ghostline.settings")


class SettingsError(ValueError):
    pass


@dataclass
class Settings:
    model: str | None = None  # gemma3-270m (default), smollm2-135m, a .gguf file or a HF folder
    multiline: str = "auto"  # auto: multi-line at the start of a block, single-line elsewhere
    max_tokens: int = 48  # per single-line suggestion
    max_tokens_multiline: int = 96
    debounce_ms: int = 25  # wait before decoding; grows while the user types fast (see Debounce)
    time_cap_ms: int | None = 1500  # return what is there once a suggestion takes longer
    drafts: int = 3  # suggestions per request (superposed decoding: about the cost of one)
    decoder: str = "greedy"  # one-line: greedy | lookup, self, lookup+self (speculation: the same text, faster)
    decoder_multiline: str = "greedy"  # multi-line: those or adadec (pause and re-rank)
    halt: bool = False  # end a suggestion before a token the early-exit controller expects to be wrong
    halt_threshold: float | None = None  # P(stop) cut-off in 0..1; null: the model's calibrated one
    exit: bool = False  # read confident tokens from an early layer (greedy decoder, drafts 1)
    exit_threshold: float | None = None  # P(exit) cut-off in 0..1; null: the model's calibrated one
    gate: bool = True  # withhold a suggestion the user would likely keep nothing of (the show gate)
    gate_strength: float = 1.0  # 0: show everything, 1: the calibrated threshold, up to 4: stricter
    memory_budget_mb: float = 2048.0
    precision: str = "int8"  # int8 layer weights (2x faster completions, EM as fp32's on 200 tasks) | fp32
    head: str = "code"  # code (LM head over the code vocabulary + the documents' tokens) | full
    idle_refresh_ms: int = 600  # re-encode stale tokens after this much quiet
    # where the engine runs: "daemon" (the shared local daemon, started if none runs), "in-process"
    # (this server loads its own model), or "tcp://HOST:PORT" (a team server; token below or $GHOSTLINE_TOKEN)
    engine: str = "daemon"
    engine_token_file: str | None = None
    completion_items: bool = False  # also answer textDocument/completion (suggest-widget items); read at start
    # context beyond the prefix: chunks of other files chosen for the cursor, cached in front of the
    # document ahead of the request (off: more exact matches, but more wrong suggestions shown on a
    # held-out history with the gate calibrated without it, bench/RESULTS.md)
    context: bool = False
    context_budget: int = 1536  # tokens of context cached in front of a document (estimated at 3.5 characters a token)
    context_workspace: bool = True  # the workspace folders' files (read from disk, .gitignore respected)
    context_open_files: bool = True  # the other open documents
    context_edits: bool = True  # prefer the regions edited last
    fim: bool = True  # fill in the middle (the text after the cursor in the prompt) where the model has FIM tokens

    def merged(self, raw) -> "Settings":
        """These settings updated by a client's dict; unknown keys are warned about, bad values raise."""
        if raw is None:
            return self
        if not isinstance(raw, dict):
            raise SettingsError(f"settings must be an object, got {type(raw).__name__}")
        if isinstance(raw.get("ghostline"), dict):
            raw = raw["ghostline"]
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            name = "".join("_" + c.lower() if c.isupper() else c for c in name)  # camelCase -> snake_case
            if name not in fields:
                log.warning("unknown setting %r ignored (known: %s)", key, ", ".join(fields))
                continue
            values[name] = check_setting(name, value)
        return dataclasses.replace(self, **values)


# settings that are completion options (engine.completion checks them), and the option each sets
OPTIONS = {"max_tokens": "max_tokens", "max_tokens_multiline": "max_tokens", "drafts": "drafts",
           "time_cap_ms": "time_cap_ms", "decoder": "decoder", "decoder_multiline": "decoder", "halt": "halt",
           "halt_threshold": "halt_threshold", "exit": "exit", "exit_threshold": "exit_threshold", "gate": "gate",
           "gate_strength": "gate_strength"}


def check_setting(name: str, value):
    if name in OPTIONS:
        if name == "decoder" and value == "adadec":
            raise SettingsError("setting decoder: adadec pauses at uncertain tokens, for multi-line suggestions "
                                "(decoder_multiline) only")
        try:
            return check_option(OPTIONS[name], value, label=f"setting {name}")
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    ints = {"debounce_ms": (0, 5000), "idle_refresh_ms": (50, 600000), "context_budget": (0, 8192)}
    if name in ints:
        lo, hi = ints[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise SettingsError(f"setting {name} must be an integer in {lo}..{hi}, got {value!r}")
        return value
    if name == "memory_budget_mb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SettingsError(f"setting memory_budget_mb must be a positive number, got {value!r}")
        return float(value)
    if name in ("precision", "head"):
        allowed = {"precision": ("fp32", "int8"), "head": ("code", "full")}[name]
        if value not in allowed:
            raise SettingsError(f"setting {name} must be one of {', '.join(allowed)}, got {value!r}")
        return value
    if name in ("completion_items", "context", "context_workspace", "context_open_files", "context_edits", "fim"):
        if not isinstance(value, bool):
            raise SettingsError(f"setting {name} must be true or false, got {value!r}")
        return value
    if name == "multiline":
        if value not in ("auto", "always", "never"):
            raise SettingsError(f"setting multiline must be auto, always or never, got {value!r}")
        return value
    if name in ("model", "engine_token_file"):
        if value is not None and not isinstance(value, str):
            raise SettingsError(f"setting {name} must be a string, got {value!r}")
        return value
    if name == "engine":
        m = re.fullmatch(r"tcp://([^\s/]*):(\d{1,5})", value) if isinstance(value, str) else None
        if value not in ("daemon", "in-process") and (m is None or not 0 < int(m.group(2)) < 65536):
            raise SettingsError(f"setting engine must be daemon, in-process or tcp://HOST:PORT, got {value!r}")
        return value
    return value
