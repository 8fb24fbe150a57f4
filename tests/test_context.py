"""Context blocks: other files' chunks, each encoded on its own and kept current with PIE, attended
over before a document's prefix without re-encoding either (`Engine.with_context`).

The reference is naive: every block encoded from scratch at its final positions (its BOS right
before it), laid out with the document's rows in one run of rows, and decoded greedily."""

from __future__ import annotations

import pytest
import torch

from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.model import build
from tests.conftest import tiny_hf

BLOCKS = {
    "ctx:a": "# lib/http.py\ndef fetch_json(session, url, timeout=10):\n    return session.get(url, timeout=timeout).json()\n",
    "ctx:b": "# lib/models.py\nclass Response:\n    def __init__(self, status, body):\n        self.status = status\n",
}
DOC = "import lib.http\n\ndef load(session):\n    data = fetch_json(session, "


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


@torch.no_grad()
def reference(model, tok, blocks: list[str], doc_ids: list[int], P: int, n: int, *, tail: int = 0) -> tuple[list[int], torch.Tensor]:
    """Greedy ids after [BOS?] + blocks + doc[skip:P], every block encoded alone at its final place
    (attending to a BOS right before it), the document encoded alone but for its last `tail` tokens
    before P - 1, encoded over everything before them; and the first step's logits."""
    skip = 1 if tok.adds_bos else 0
    ids = [tok.encode(b)[0] for b in blocks]
    C = skip + sum(len(i) - skip for i in ids)
    x, ks, vs = skip - C, [], []
    for j, b in enumerate(ids):
        keep = b if j == 0 or not skip else b[1:]
        at = x if j == 0 or not skip else x - 1
        r = encoded_at(model, b, at)
        ks.append(r.k[:, :, len(b) - len(keep):]), vs.append(r.v[:, :, len(b) - len(keep):])
        x += len(keep)
    assert x == skip
    doc = encoded_at(model, doc_ids[: P - 1], 0)
    at = max(skip, P - 1 - tail)
    k = torch.cat(ks + [doc.k[:, :, skip:at]], 2)
    v = torch.cat(vs + [doc.v[:, :, skip:at]], 2)
    rows, out, tok_id, first = Rows(k, v, skip - C), [], doc_ids[P - 1], None
    if at < P - 1:
        model(torch.tensor([doc_ids[at : P - 1]]), torch.arange(at, P - 1), rows)
    for pos in range(P - 1, P - 1 + n):
        logits = model(torch.tensor([[tok_id]]), torch.tensor([pos]), rows)[0, -1]
        first = logits if first is None else first
        tok_id = int(logits.argmax())
        out.append(tok_id)
    return out, first


def engine_for(tokenizer, kind: str = "gemma3") -> Engine:
    cfg, hf = tiny_hf(kind, tokenizer.vocab_size, seed=3)
    return Engine(build(cfg, hf.state_dict()), tokenizer, EngineOptions())


@pytest.fixture(scope="module", params=["no-bos", "bos"])
def tokenizer(request, smol):
    if request.param == "no-bos":
        return smol.tokenizer
    from ghostline.engine.loader import load

    return load("gemma3-270m").tokenizer


def _greedy(eng: Engine, context=(), tail: int = 0):
    return eng.complete("doc", len(DOC), CompletionOptions(multiline=True, max_tokens=8, context=tuple(context),
                                                           context_tail=tail))


def test_attending_over_blocks_equals_the_naive_reference(tokenizer):
    eng = engine_for(tokenizer)
    for uri, text in BLOCKS.items():
        eng.open(uri, text)
    eng.open("doc", DOC)
    out = _greedy(eng, BLOCKS)
    doc = eng.docs["doc"]
    P = doc.token_at(len(DOC))
    want, first = reference(eng.model, tokenizer, list(BLOCKS.values()), doc.ids, P, len(out.tokens))
    assert out.context == list(BLOCKS) and out.context_tokens > 20
    assert out.tokens == want[: len(out.tokens)] and len(out.tokens) >= 3
    # the same request's first-step logits through the engine's view equal the reference's
    from ghostline.engine.cache import ScratchCache

    prefix = eng.prompt(doc, P, len(DOC), CompletionOptions(context=tuple(BLOCKS))).prefix
    with torch.no_grad():
        got = eng.model(torch.tensor([[doc.ids[P - 1]]]), torch.tensor([P - 1]), ScratchCache(prefix, P - 1, 2))[0, -1]
        alone = eng.model(torch.tensor([[doc.ids[P - 1]]]), torch.tensor([P - 1]), ScratchCache(doc.cache, P - 1, 2))[0, -1]
    assert torch.allclose(got, first, atol=2e-4), (got - first).abs().max()
    assert not torch.allclose(alone, first, atol=1e-2)  # the context does change what the model sees


@pytest.mark.parametrize("tail", [5, 1000])
def test_a_tail_encoded_over_the_context_equals_the_naive_reference(tokenizer, tail):
    eng = engine_for(tokenizer, "llama")  # every layer global: the tail's keys read the context
    for uri, text in BLOCKS.items():
        eng.open(uri, text)
    eng.open("doc", DOC)
    out = _greedy(eng, BLOCKS, tail=tail)
    plain = _greedy(eng, BLOCKS)
    doc = eng.docs["doc"]
    P = doc.token_at(len(DOC))
    want, _ = reference(eng.model, tokenizer, list(BLOCKS.values()), doc.ids, P, len(out.tokens), tail=tail)
    assert out.tokens == want[: len(out.tokens)] and len(out.tokens) >= 3
    other, _ = reference(eng.model, tokenizer, list(BLOCKS.values()), doc.ids, P, len(plain.tokens))
    assert plain.tokens == other[: len(plain.tokens)]
    assert eng.docs["doc"].cache.length == len(doc.ids)  # the document's own cache is untouched
    from ghostline.engine.cache import ScratchCache

    view = eng.prompt(doc, P, len(DOC), CompletionOptions(context=tuple(BLOCKS), context_tail=tail)).prefix
    bare = eng.prompt(doc, P, len(DOC), CompletionOptions(context=tuple(BLOCKS))).prefix
    with torch.no_grad():
        a = eng.model(torch.tensor([[doc.ids[P - 1]]]), torch.tensor([P - 1]), ScratchCache(view, P - 1, 2))[0, -1]
        b = eng.model(torch.tensor([[doc.ids[P - 1]]]), torch.tensor([P - 1]), ScratchCache(bare, P - 1, 2))[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)  # the tail did read the context


def test_a_block_edited_then_refreshed_equals_the_reference_of_its_new_text(tokenizer):
    eng = engine_for(tokenizer)
    for uri, text in BLOCKS.items():
        eng.open(uri, text)
    eng.open("doc", DOC)
    _greedy(eng, BLOCKS)  # assembled once: the edit must not reuse it
    eng.edit("ctx:a", [{"range": {"start": {"line": 1, "character": 4}, "end": {"line": 1, "character": 14}},
                        "text": "get_json_body"}])
    eng.refresh("ctx:a")
    assert eng.docs["ctx:a"].stale_count == 0
    out = _greedy(eng, BLOCKS)
    doc = eng.docs["doc"]
    texts = [eng.text(u) for u in BLOCKS]
    assert "get_json_body" in texts[0]
    want, _ = reference(eng.model, tokenizer, texts, doc.ids, doc.token_at(len(DOC)), len(out.tokens))
    assert out.tokens == want[: len(out.tokens)]


def test_blocks_not_encoded_are_skipped_and_unknown_ones_ignored(smol):
    eng = engine_for(smol.tokenizer)
    eng.open("ctx:a", BLOCKS["ctx:a"])
    eng.open("doc", DOC)
    eng.docs["ctx:a"].cache = None  # evicted: not encoded again for a request
    plain = _greedy(eng)
    out = _greedy(eng, ["ctx:a", "ctx:missing", "doc"])
    assert out.context == [] and out.context_tokens == 0 and out.tokens == plain.tokens
    assert eng.docs["ctx:a"].cache is None


def test_k_drafts_read_the_context_too(smol):
    eng = engine_for(smol.tokenizer)
    for uri, text in BLOCKS.items():
        eng.open(uri, text)
    eng.open("doc", DOC)
    opts = dict(multiline=True, max_tokens=6, drafts=3)
    with_ctx = eng.complete("doc", len(DOC), CompletionOptions(**opts, context=tuple(BLOCKS)))
    alone = eng.complete("doc", len(DOC), CompletionOptions(**opts))
    greedy_ctx = _greedy(eng, BLOCKS)
    assert with_ctx.context == list(BLOCKS)
    assert with_ctx.first_step is not None and alone.first_step is not None
    assert with_ctx.first_step.first_p != pytest.approx(alone.first_step.first_p, abs=1e-6)
    assert greedy_ctx.tokens  # the greedy path over the same view decodes
