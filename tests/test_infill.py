"""Fill-in-the-middle on tiny random models whose tokenizers are given each convention's tokens: the
tokens found, and the prompt (`<PRE>` before the cached prefix, `<SUF>` + the text after the cursor
encoded per request, `<MID>` fed first) equal to a naive reference of the same layout."""

from __future__ import annotations

import copy

import pytest
import torch

from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.infill import CONVENTIONS, detect, suffix_text
from ghostline.engine.model import build
from ghostline.engine.tokenizer import Tokenizer
from tests.conftest import tiny_hf

DOC = "def area(width, height):\n    return width * \n\n\nprint(area(3, 4))\n"
CURSOR = DOC.index("* ") + 2


class Rows:
    """A cache of consecutive rows at positions x0.. (one segment), appended to by each forward."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, x0: int):
        self.k, self.v, self.x0 = k, v, x0  # [L, KV, n, hd]

    def update(self, layer, k, v, pos):
        i, end = int(pos[0]) - self.x0, int(pos[-1]) + 1 - self.x0
        if end > self.k.shape[2]:
            grow = end - self.k.shape[2]
            pad = torch.zeros(*self.k.shape[:2], grow, self.k.shape[3])
            self.k, self.v = torch.cat([self.k, pad], 2), torch.cat([self.v, pad.clone()], 2)
        self.k[layer, :, i:end], self.v[layer, :, i:end] = k[0], v[0]
        return [(self.k[layer, :, :end][None], self.v[layer, :, :end][None], self.x0)]


@torch.no_grad()
def encoded_at(model, ids: list[int], x0: int) -> Rows:
    a = model.args
    rows = Rows(torch.zeros(a.n_layers, a.n_kv_heads, 0, a.head_dim), torch.zeros(a.n_layers, a.n_kv_heads, 0, a.head_dim), x0)
    model(torch.tensor([ids]), torch.arange(x0, x0 + len(ids)), rows)
    return rows


def fim_tokenizer(smol, convention: int) -> Tokenizer:
    hf = copy.deepcopy(smol.tokenizer.hf)
    pre, suf, mid, stops = CONVENTIONS[convention]
    hf.add_special_tokens({"additional_special_tokens": [pre, suf, mid, stops[0]]})
    return Tokenizer(hf)


def engine_for(tok: Tokenizer) -> Engine:
    cfg, hf = tiny_hf("llama", tok.vocab_size, seed=5)
    return Engine(build(cfg, hf.state_dict()), tok, EngineOptions())


@pytest.mark.parametrize("convention", range(len(CONVENTIONS)))
def test_each_convention_is_found(smol, convention):
    tok = fim_tokenizer(smol, convention)
    found = detect(tok.hf)
    vocab = tok.hf.get_vocab()
    pre, suf, mid, stops = CONVENTIONS[convention]
    assert (found.prefix, found.suffix, found.middle) == (vocab[pre], vocab[suf], vocab[mid])
    assert vocab[stops[0]] in found.stops


def test_models_without_fim_tokens_have_none(smol):
    assert detect(smol.tokenizer.hf) is None


@torch.no_grad()
def naive(model, tok: Tokenizer, infill, doc_ids: list[int], P: int, suffix: list[int], n: int) -> list[int]:
    """Greedy ids after [BOS?] <PRE> (encoded alone), doc[skip:P] (encoded alone), then <SUF> suffix
    <MID> encoded over all of it."""
    skip = 1 if tok.adds_bos else 0
    pre = encoded_at(model, ([tok.bos_id] if skip else []) + [infill.prefix], -1)  # <PRE> ends at 0 or -1
    doc = encoded_at(model, doc_ids[:P], 0)
    rows = Rows(torch.cat([pre.k, doc.k[:, :, skip:]], 2), torch.cat([pre.v, doc.v[:, :, skip:]], 2), -1)
    tail = [infill.suffix] + suffix
    model(torch.tensor([tail]), torch.arange(P, P + len(tail)), rows)
    out, tid = [], infill.middle
    for pos in range(P + len(tail), P + len(tail) + n):
        tid = int(model(torch.tensor([[tid]]), torch.tensor([pos]), rows)[0, -1].argmax())
        out.append(tid)
    return out


def test_the_fim_prompt_equals_the_naive_reference(smol):
    tok = fim_tokenizer(smol, 0)
    eng = engine_for(tok)
    eng.open("a.py", DOC)
    opts = dict(multiline=True, max_tokens=8)
    out = eng.complete("a.py", CURSOR, CompletionOptions(**opts, infill=True))
    plain = eng.complete("a.py", CURSOR, CompletionOptions(**opts))
    doc = eng.docs["a.py"]
    P = doc.token_at(CURSOR)
    skip = 1 if tok.adds_bos else 0
    suffix = tok.encode(suffix_text(DOC, CURSOR))[0][skip:]
    assert suffix_text(DOC, CURSOR) == DOC[CURSOR:]
    want = naive(eng.model, tok, eng.infill, doc.ids, P, suffix, len(out.tokens))
    assert out.tokens == want and len(out.tokens) >= 3
    assert out.tokens != plain.tokens  # the suffix changed what the model wrote
    prompt = eng.prompt(doc, P, CURSOR, CompletionOptions(infill=True))
    assert prompt.first == eng.infill.middle and prompt.start == P + 1 + len(suffix)


def test_with_context_in_front_the_fim_prompt_reads_it_after_the_prefix_marker(smol):
    """The context cached in front of the document sits inside the prefix section: [BOS] <PRE>
    context + prefix <SUF> suffix <MID>, equal to the naive reference of that layout."""
    tok = fim_tokenizer(smol, 0)
    eng = engine_for(tok)
    eng.open("a.py", DOC)
    eng.set_context("a.py", "# geometry.py\ndef perimeter(width, height):\n    return 2 * (width + height)\n")
    eng.refresh("a.py")
    out = eng.complete("a.py", CURSOR, CompletionOptions(multiline=True, max_tokens=8, infill=True))
    doc = eng.docs["a.py"]
    P = doc.token_at(doc.local(CURSOR))
    skip = 1 if tok.adds_bos else 0
    suffix = tok.encode(suffix_text(DOC, CURSOR))[0][skip:]
    want = naive(eng.model, tok, eng.infill, doc.ids, P, suffix, len(out.tokens))
    assert out.tokens == want and len(out.tokens) >= 3 and out.context_tokens > 10


def test_infill_asked_of_a_model_without_fim_tokens_changes_nothing(smol):
    eng = engine_for(smol.tokenizer)
    eng.open("a.py", DOC)
    a = eng.complete("a.py", CURSOR, CompletionOptions(multiline=True, max_tokens=6, infill=True))
    b = eng.complete("a.py", CURSOR, CompletionOptions(multiline=True, max_tokens=6))
    assert a.tokens == b.tokens and eng.infill is None


def test_the_suffix_is_bounded():
    text = "x = 1\n" * 100
    assert suffix_text(text, 2).count("\n") == 13
