"""Completion at a cursor: greedy equals HF generate, token healing, stop rules, cancellation."""

from __future__ import annotations

import pytest
import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.decoding.greedy import greedy, reference_greedy
from ghostline.engine.engine import CompletionOptions, Engine
from ghostline.engine.model import build
from ghostline.engine.stops import StopRules
from tests.conftest import tiny_hf

SAMPLE = open(__file__.replace("test_complete.py", "data/sessions_before.py")).read()


def cached_greedy(model, ids: list[int], n: int) -> list[int]:
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(len(ids))
    cache.length = len(ids) - 1
    with torch.no_grad():
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1), cache)
    scratch = ScratchCache(cache, len(ids) - 1, n + 1)
    return list(greedy(model, scratch, ids[-1], max_new=n))


def test_tiny_gemma_greedy_equals_hf_generate():
    cfg, hf = tiny_hf("gemma3", 400)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 400, (30,)).tolist()  # prompt + 20 new > the 16-token window
    want = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 30:].tolist()
    assert cached_greedy(model, ids, 20) == want
    assert reference_greedy(model, ids, 20) == want


@pytest.mark.slow
def test_smollm_greedy_equals_hf_generate(smol):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(smol.source.parent), gguf_file=smol.source.name, dtype=torch.float32).eval()
    ids, _ = smol.tokenizer.encode(SAMPLE[:700])
    want = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24)[0, len(ids):].tolist()
    assert cached_greedy(smol.model, ids, 24) == want


@pytest.mark.slow
def test_engine_complete_matches_plain_greedy_at_cursor(smol):
    eng = Engine(smol.model, smol.tokenizer)
    text = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a *"
    eng.open("m", text)
    out = eng.complete("m", len(text), CompletionOptions(multiline=True, max_tokens=12))
    ids, _ = smol.tokenizer.encode(text)
    plain = reference_greedy(smol.model, ids, 12)
    assert out.tokens == plain[: len(out.tokens)] and out.tokens
    assert smol.tokenizer.decode(plain).startswith(out.text)


def test_token_healing_constrains_the_first_token(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    text = "import numpy as np\nx = np.zeros(3)\n"
    eng.open("h", text)
    cursor = text.index("zeros") + 3  # inside the token "zeros"
    out = eng.complete("h", cursor, CompletionOptions(max_tokens=3))
    assert out.heal and "zer".endswith(out.heal)
    assert eng.tok.strings[out.tokens[0]].startswith(out.heal)
    assert out.ctx_tokens < len(eng.tok.encode(text[:cursor])[0]) + 1


def test_the_healing_mask_is_every_token_that_starts_with_the_text(tiny_engine_factory):
    """starting_with bisects the sorted token strings; it must equal a scan of all of them."""
    tok = tiny_engine_factory("llama").tok
    tok.warm().join()
    for prefix in ("Sess", "s", " ", "se", "ion", "", "\n", "zzzzq", "\U0010ffff"):
        want = [i for i, s in enumerate(tok.strings) if s.startswith(prefix) and i not in tok.eos_ids]
        assert tok.starting_with(prefix, tok.vocab_size).nonzero().flatten().tolist() == want, prefix


def test_a_word_typed_up_to_the_cursor_is_healed(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    text = "class Session(object):\n    pass\n\nx = Sess"
    eng.open("w", text)
    out = eng.complete("w", len(text), CompletionOptions(max_tokens=3))
    assert out.heal and "Sess".endswith(out.heal)  # the last token is re-chosen, not continued
    assert eng.tok.strings[out.tokens[0]].startswith(out.heal)
    at_indent = eng.complete("w", text.index("pass"), CompletionOptions(max_tokens=2))
    assert at_indent.heal.strip() == ""  # after indentation no word is backed off


def test_cancel_between_steps_and_time_cap(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("c", SAMPLE[:500])
    calls = []
    out = eng.complete("c", 400, CompletionOptions(multiline=True, max_tokens=30), should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert out.stop_reason in ("cancelled", "end_of_block", "eos", "repeat_below") and len(out.tokens) <= 3
    again = eng.complete("c", 400, CompletionOptions(multiline=True, max_tokens=30))
    first = eng.complete("c", 400, CompletionOptions(multiline=True, max_tokens=30))
    assert again.tokens == first.tokens  # the scratch was rolled back: no trace of earlier requests
    capped = eng.complete("c", 400, CompletionOptions(multiline=True, max_tokens=30, time_cap_ms=1e-6))
    assert first.text.strip() and len(first.tokens) > 1
    shown = next(i for i in range(1, len(first.tokens) + 1) if eng.tok.decode(first.tokens[:i]).strip())
    assert capped.stop_reason == "time_cap" and capped.tokens == first.tokens[:shown]  # past the cap: stop at the first text


def test_stream_can_be_abandoned(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("s", SAMPLE[:300])
    stream = eng.stream("s", 200, CompletionOptions(multiline=True, max_tokens=20))
    next(stream)
    stream.close()  # the finally rolls the scratch back
    assert eng.complete("s", 200, CompletionOptions(max_tokens=5)).ctx_tokens > 0


def test_offset_outside_document(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("o", "abc")
    with pytest.raises(ValueError):
        eng.complete("o", 10)


@pytest.mark.parametrize("multiline, before, below, text, want, reason", [
    (False, "    ", "", "return x\n    y", "return x", "end_of_line"),
    (False, "    ", "", "return x", "return x", None),
    (True, "    ", "", "a = 1\n    b = 2\nc = 3", "a = 1\n    b = 2", "end_of_block"),
    (True, "def f(x):", "", "\n    return x\n\ndef g", "\n    return x", "end_of_block"),
    (True, "    ", "return y", "a = 1\n    return y\n", "a = 1", "repeat_below"),
    (True, "    ", "", "a = 1\n        b", "a = 1\n        b", None),
    (False, "x = ", "", "\"a-z|:" + "':" * 8, "\"a-z|:", "repetition"),  # a model stuck in a loop
    (False, "x = ", "", "\"a-z|:" + "':" * 7, "\"a-z|:" + "':" * 7, None),  # not yet
    (True, "    ", "", "a = 1\n    s = '" + "ab" * 9, "a = 1\n    s = '", "repetition"),
    (False, "    ", "", "# " + "=" * 40, "# " + "=" * 40, None),  # a ruler is code
])
def test_stop_rules(multiline, before, below, text, want, reason):
    assert StopRules(multiline, before, below).apply(text) == (want, reason)
