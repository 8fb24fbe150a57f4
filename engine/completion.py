"""The completion contract: what a request asks (`CompletionOptions`, with its decoders, limits and
checks), what an update did (`UpdateStats`), what a completion returns (`Completion`) and what a
decode continues (`Prompt`). Plain dataclasses, no torch: the engine, its decoders, the language
server's settings, the remote client and the daemon all use these, and nothing repeats them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ghostline.engine.cache import Framed, KVCache
    from ghostline.engine.decoding.adadec import AdaDecParams
    from ghostline.engine.decoding.superposed import SuperposedParams
    from ghostline.engine.gate import Confidence


SPECULATIVE = ("lookup", "self", "lookup+self")  # decoders that verify drafts (same output as greedy)
DECODERS = ("greedy", "adadec") + SPECULATIVE
LIMITS = {"max_tokens": (1, 1024), "drafts": (1, 8), "gate_strength": (0, 4)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_option(name: str, value, *, label: str | None = None):
    """`value` for option `name` as the engine takes it; ValueError saying what is allowed (of `label`,
    by default the option's name)."""
    label = label or name
    if name in ("multiline", "halt", "exit", "gate", "infill"):
        if not isinstance(value, bool):
            raise ValueError(f"{label} must be true or false, got {value!r}")
        return value
    if name in ("max_tokens", "drafts"):
        lo, hi = LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{label} must be an integer in {lo}..{hi}, got {value!r}")
        return value
    if name == "gate_strength":
        lo, hi = LIMITS[name]
        if not _number(value) or not lo <= value <= hi:
            raise ValueError(f"{label} must be a number in {lo}..{hi}, got {value!r}")
        return float(value)
    if name == "gate_record":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value)):
            raise ValueError(f"{label} must be two non-negative integers (accepted, rejected), got {value!r}")
        return (value[0], value[1])
    if name == "time_cap_ms":
        if value is not None and (not _number(value) or value <= 0):
            raise ValueError(f"{label} must be a positive number or null, got {value!r}")
        return value
    if name in ("halt_threshold", "exit_threshold"):
        if value is not None and (not _number(value) or not 0 <= value <= 1):
            raise ValueError(f"{label} must be a number in 0..1 or null, got {value!r}")
        return None if value is None else float(value)
    if name == "decoder":
        if value not in DECODERS:
            raise ValueError(f"{label} must be one of {', '.join(DECODERS)}, got {value!r}")
        return value
    raise ValueError(f"unknown completion option {name!r}")


@dataclass
class CompletionOptions:
    multiline: bool = False
    max_tokens: int = 48
    time_cap_ms: float | None = None  # stop once past this and something is worth showing
    decoder: str = "greedy"  # greedy | adadec | lookup, self, lookup+self (speculative: same output as greedy)
    adadec: AdaDecParams | None = None  # None: the model's calibrated threshold (engine.calibration)
    draft_length: str = "match"  # speculative decoders' draft length rule (engine.decoding.speculative)
    drafts: int = 1  # > 1: k drafts (decoder superposed, the default, or beam | nucleus), see engine.decoders
    superposed: SuperposedParams | None = None  # None: the defaults
    halt: bool = False  # end the suggestion before a token the controller expects to be wrong (engine.exits)
    halt_threshold: float | None = None  # P(stop) cut-off; None: the model's calibrated one
    exit: bool = False  # read confident tokens from an early layer's exit head (greedy decoder only)
    exit_threshold: float | None = None  # P(exit) cut-off; None: the model's calibrated one
    gate: bool = False  # withhold a suggestion the user would likely keep nothing of (engine.gate; drafts > 1)
    gate_strength: float = 1.0  # 0: show everything, 1: the calibrated threshold, above: stricter
    gate_record: tuple[int, int] = (0, 0)  # (accepted, rejected) by this user here: moves the strength (Gate.strength)
    infill: bool = False  # fill in the middle: the text after the cursor in the prompt (models with FIM tokens)

    def to_wire(self) -> dict:
        """The options that travel to an engine server (plain values; parameters objects stay local)."""
        return {name: getattr(self, name) for name in WIRE_OPTIONS}

    @classmethod
    def from_wire(cls, raw) -> "CompletionOptions":
        """Options from a request's map, each checked (`check_option`); ValueError names the bad one."""
        if not isinstance(raw, dict):
            raise ValueError("options must be a map")
        values = {}
        for key, value in raw.items():
            if key not in WIRE_OPTIONS:
                raise ValueError(f"unknown completion option {str(key)[:40]!r}")
            values[key] = check_option(key, value)
        return cls(**values)


@dataclass
class UpdateStats:
    strategy: str
    hunks: int = 0
    encoded: int = 0  # tokens run through the model
    delta: int = 0  # change in the number of tokens
    stale: int = 0  # stale tokens left in the document
    ms: float = 0.0


@dataclass
class Completion:
    text: str
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""
    ctx_tokens: int = 0
    heal: str = ""
    ms: float = 0.0
    first_token_ms: float = 0.0
    drafts: list[str] = field(default_factory=list)  # with CompletionOptions.drafts > 1: best first
    confidence: float | None = None  # the show gate's P(the user keeps some of it), where it ran
    withheld: str = ""  # the best draft the gate withheld (stop_reason "gated"): for inspection only
    first_step: Confidence | None = None  # the first step's distribution at the cursor (k drafts)
    draft_scores: list[float] = field(default_factory=list)  # each draft's decoding score per token (k drafts)
    stats: object | None = None  # the decoder's statistics (ExitStats, AdaDecStats or SpecStats), where it keeps any
    context_tokens: int = 0  # rows of the context cached in front of the document it read (Engine.set_context)

    def to_wire(self) -> dict:
        """What an engine server sends back (all but what the show gate read, which stays in the engine)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v
                for f in fields(self) if f.name not in LOCAL}

    @classmethod
    def from_wire(cls, raw: dict) -> "Completion":
        """A completion from a server's answer (unknown keys ignored, missing ones defaulted)."""
        names = {f.name for f in fields(cls)} - LOCAL
        return cls(**{"text": "", **{k: v for k, v in raw.items() if k in names}})


@dataclass
class Prompt:
    """What a decode continues: the cache (or view) it attends to, and the token it feeds first,
    at position `start`."""

    prefix: KVCache | Framed
    start: int
    first: int


WIRE_OPTIONS = tuple(f.name for f in fields(CompletionOptions) if f.name not in ("adadec", "superposed", "draft_length"))
LOCAL = {"first_step", "draft_scores", "stats"}  # Completion fields that stay in the engine
