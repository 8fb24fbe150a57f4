"""One completion contract (`engine.completion`): what travels to an engine server comes back equal,
and the daemon and the language server's settings accept and refuse the same values."""

from __future__ import annotations

import pytest

from ghostline.engine.completion import LIMITS, WIRE_OPTIONS, Completion, CompletionOptions, check_option
from ghostline.lsp.settings import OPTIONS, SettingsError, check_setting

BAD = {"multiline": [1, "yes", None], "max_tokens": [0, 1025, 3.0, True, "8"], "drafts": [0, 9, 2.5],
       "time_cap_ms": [0, -1, "1", True], "decoder": ["beam", "", None], "halt": [0, None], "exit": ["no"],
       "halt_threshold": [-0.1, 1.5, "0.5"], "exit_threshold": [2, True], "gate": [1], "gate_strength": [-1, 4.5, None],
       "gate_record": [[1], [-1, 0], [1.5, 2], "1,2", [True, 0], None, [1, 2, 3]], "infill": ["true"]}


def test_options_travel_and_come_back_equal():
    opts = CompletionOptions(multiline=True, max_tokens=7, time_cap_ms=250.0, decoder="lookup", drafts=3, halt=True,
                             halt_threshold=0.25, exit=True, exit_threshold=0.5, gate=True, gate_strength=2.0,
                             gate_record=(3, 40), infill=True)
    wire = opts.to_wire()
    assert set(wire) == set(WIRE_OPTIONS)
    assert CompletionOptions.from_wire(wire) == opts
    assert CompletionOptions.from_wire({}) == CompletionOptions()


def test_a_completion_travels_without_what_stays_in_the_engine():
    out = Completion("x = 1", tokens=[1, 2], stop_reason="eos", drafts=["x = 1", "x = 2"], confidence=0.7,
                     context_tokens=12)
    wire = out.to_wire()
    assert "first_step" not in wire and Completion.from_wire(wire) == out
    assert Completion.from_wire({"stop_reason": "cancelled", "unknown": 1}) == Completion("", stop_reason="cancelled")


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_value_is_refused_by_name(name):
    for value in BAD[name]:
        with pytest.raises(ValueError, match=name):
            CompletionOptions.from_wire({name: value})
    with pytest.raises(ValueError, match="unknown"):
        CompletionOptions.from_wire({"adadec": {}})
    with pytest.raises(ValueError, match="map"):
        CompletionOptions.from_wire([name])


def test_settings_and_the_daemon_take_the_same_values():
    assert set(OPTIONS.values()) <= set(WIRE_OPTIONS)
    for setting, option in OPTIONS.items():
        for value in BAD.get(option, []):
            with pytest.raises(SettingsError, match=setting):
                check_setting(setting, value)
    for setting in ("max_tokens", "max_tokens_multiline"):
        lo, hi = LIMITS["max_tokens"]
        assert check_setting(setting, hi) == check_option("max_tokens", hi) == hi
        assert check_setting(setting, lo) == lo
    assert check_setting("decoder_multiline", "adadec") == "adadec"
    with pytest.raises(SettingsError, match="multi-line"):
        check_setting("decoder", "adadec")  # one-line suggestions never pause
