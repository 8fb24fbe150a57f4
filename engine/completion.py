"""The completion contract: what a request asks (`CompletionOptions`), what an update did
(`UpdateStats`), what a completion returns (`Completion`) and what a decode continues (`Prompt`).
Plain dataclasses, no torch: the engine, its decoders and the servers share them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ghostline.engine.cache import KVCache, WithContext
    from ghostline.engine.decoding.adadec import AdaDecParams
    from ghostline.engine.decoding.superposed import SuperposedParams
    from ghostline.engine.gate import Confidence


@dataclass
class CompletionOptions:
    multiline: bool = False
    max_tokens: int = 48
    time_cap_ms: float | None = None  # stop once past this and something is worth showing
    decoder: str = "greedy"  # greedy | adadec | lookup, self, lookup+self (speculative: same output as greedy)
    adadec: AdaDecParams | None = None  # None: the model's calibrated threshold (engine.calibration)
    draft_length: str = "match"  # speculative decoders' draft length rule (engine.decoding.speculative)
    drafts: int = 1  # > 1: k drafts (decoder superposed, the default, or beam | nucleus), see engine.drafts
    superposed: SuperposedParams | None = None  # None: the defaults
    halt: bool = False  # end the suggestion before a token the controller expects to be wrong (engine.exits)
    halt_threshold: float | None = None  # P(stop) cut-off; None: the model's calibrated one
    exit: bool = False  # read confident tokens from an early layer's exit head (greedy decoder only)
    exit_threshold: float | None = None  # P(exit) cut-off; None: the model's calibrated one
    gate: bool = False  # withhold a suggestion the user would likely keep nothing of (engine.gate; drafts > 1)
    gate_strength: float = 1.0  # 0: show everything, 1: the calibrated threshold, above: stricter
    context: tuple[str, ...] = ()  # open documents (other files' chunks) attended over before the prefix, in order
    context_tail: int = 0  # with context: the last tokens before the cursor encoded again over it, per request
    infill: bool = False  # fill in the middle: the text after the cursor in the prompt (models with FIM tokens)


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
    context: list[str] = field(default_factory=list)  # the context documents attended over (encoded ones)
    context_tokens: int = 0


@dataclass
class Prompt:
    """What a decode continues: the cache (or view) it attends to, and the token it feeds first,
    at position `start`; the context documents the view holds."""

    prefix: KVCache | WithContext
    start: int
    first: int
    used: list[str] = field(default_factory=list)
