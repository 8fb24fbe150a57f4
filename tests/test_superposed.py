"""Superposed decoding: k=1 and alpha=0 is greedy; drafts are distinct; the n-gram index stays
consistent under edits; the engine returns k drafts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostline.engine.cache import ScratchCache
from ghostline.engine.decoding.beam import beam_search
from ghostline.engine.decoding.greedy import greedy
from ghostline.engine.decoding.superposed import SuperposedParams, superposed
from ghostline.engine.decoders import keep
from ghostline.engine.engine import CompletionOptions
from ghostline.engine.model import greedy_ids
from ghostline.engine.ngram import NgramIndex, NgramTable
from ghostline.engine.quant import quantize


def last(gen):
    out = None
    for out in gen:
        pass
    return out


@pytest.mark.parametrize("rerank", [False, True])
def test_one_draft_without_ngrams_is_greedy(tiny_prefix, rerank):
    model, ids, cache = tiny_prefix
    mask = torch.zeros(300, dtype=torch.bool)
    mask[100:200] = True  # token healing: the first token restricted
    for first_mask in (None, mask):
        want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32, first_mask=first_mask))
        params = SuperposedParams(alpha=0.0, rerank=rerank)
        drafts = last(superposed(model, ScratchCache(cache, 39, 33), ids[-1], k=1, max_new=32, params=params,
                                 first_mask=first_mask))
        assert drafts[0].ids == want
        beams = last(beam_search(model, ScratchCache(cache, 39, 33), ids[-1], k=1, max_new=32, first_mask=first_mask))
        assert beams[0].ids == want


def test_shortlist_head_drafts_read_its_columns(tiny_prefix):
    """With a shortlist head the drafts rank its columns only (no widening to the vocabulary); k=1
    is still greedy over `head`'s full row, the first-token mask mapped onto the columns."""
    model, ids, cache = tiny_prefix
    short = quantize(copy.deepcopy(model), linear=False, rows=torch.arange(1, 300, 3), int8_head=False)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[100:200] = True
    for first_mask in (None, mask):
        want = list(greedy(short, ScratchCache(cache, 39, 33), ids[-1], max_new=32, first_mask=first_mask))
        drafts = last(superposed(short, ScratchCache(cache, 39, 33), ids[-1], k=1, max_new=32,
                                 params=SuperposedParams(alpha=0.0), first_mask=first_mask))
        assert drafts[0].ids == want and all(t % 3 == 1 for t in want)
        assert first_mask is None or 100 <= want[0] < 200


def test_greedy_ids_equal_argmax_over_the_widened_head_ties_included(tiny_prefix):
    """greedy_ids reads a shortlist head's columns; it picks what argmax over head()'s full row
    picks, the smallest token id on a tie (rows are stored in arrival order, not sorted)."""
    model, _, _ = tiny_prefix
    short = quantize(copy.deepcopy(model), linear=False, rows=torch.arange(299, 0, -2), int8_head=False)
    x = torch.randn(5, 7, model.args.dim, generator=torch.Generator().manual_seed(8))
    assert torch.equal(greedy_ids(short, x), short.head(x).argmax(-1))
    assert torch.equal(greedy_ids(model, x), model.head(x).argmax(-1))
    short.lm_head.include(torch.tensor([4]))  # token 4: a column after token 5's
    short.lm_head._bufs["weight"][len(short.lm_head.rows) - 1] = short.lm_head.weight[short.lm_head.rows.tolist().index(5)]
    w5 = short.lm_head.weight[short.lm_head.rows.tolist().index(5)]
    x = torch.cat([x[0], (w5 / short.norm.weight.add(1.0 if model.args.family == "gemma3" else 0.0))[None]])  # [8, D]
    tied, full = greedy_ids(short, x), short.head(x).argmax(-1)
    assert full[-1] == 4 and torch.equal(tied, full)  # 4 and 5 tie; argmax takes the smaller id


def test_anchored_drafts_lead_with_greedy(tiny_prefix):
    model, ids, cache = tiny_prefix
    want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32))
    index = NgramIndex()
    index.open("a.py", ids)
    ngram = lambda tails, cands: index.prob(tails, cands, uri="a.py")  # noqa: E731
    for k, rerank in ((1, False), (3, False), (3, True)):
        params = SuperposedParams(anchor=True, rerank=rerank, temperature=1.0)
        drafts = last(superposed(model, ScratchCache(cache, 39, 33, batch=2), ids[-1], k=k, max_new=32,
                                 context=ids[:-1], ngram=ngram, params=params))
        assert drafts[0].ids == want and len(drafts) == k
        assert len({tuple(d.ids) for d in drafts}) == k
    with pytest.raises(ValueError):
        next(superposed(model, ScratchCache(cache, 39, 33), ids[-1], k=3, max_new=4, params=SuperposedParams(anchor=True)))


def test_drafts_are_distinct_and_finished_ones_are_kept(tiny_prefix):
    model, ids, cache = tiny_prefix
    index = NgramIndex()
    index.open("a.py", ids)
    ngram = lambda tails, cands: index.prob(tails, cands, uri="a.py")  # noqa: E731
    for k in (2, 3, 5):
        drafts = last(superposed(model, ScratchCache(cache, 39, 17), ids[-1], k=k, max_new=16, context=ids[:-1],
                                 ngram=ngram, params=SuperposedParams(temperature=1.0)))
        assert len(drafts) == k and len({tuple(d.ids) for d in drafts}) == k
        assert [d.score for d in drafts] == sorted((d.score for d in drafts), reverse=True)
    ends = set(range(2, 300, 7))  # "stop rule": a draft ends at one of these ids; its text is its ids
    finish = lambda d: (str(d), "stop") if d[-1] in ends else None  # noqa: E731
    drafts = last(superposed(model, ScratchCache(cache, 39, 33), ids[-1], k=3, max_new=32, context=ids[:-1],
                             ngram=ngram, finish=finish, params=SuperposedParams(temperature=1.0)))
    assert len({d.text or str(d.ids) for d in drafts}) == 3
    assert any(d.finished and d.ids[-1] in ends for d in drafts)


def test_ngram_probabilities():
    index = NgramIndex()
    index.open("a.py", [1, 2, 3, 1, 2, 4, 9])
    index.open("b.txt", [1, 2, 3, 1, 2, 3])  # another language: left out for a.py
    w2, w3 = index.weights[:2]
    p = index.prob([[7, 1, 2]], [3, 4, 5], uri="a.py")[0]
    assert p == pytest.approx([w2 * 0.5 + w3 * 0.5, w2 * 0.5 + w3 * 0.5, 0.0])
    with index.without("a.py", 5, 6):  # the 4 and every n-gram touching it left out
        assert index.prob([[7, 1, 2]], [3, 4], uri="a.py")[0] == pytest.approx([w2 + w3, 0.0])
    assert index.prob([[7, 1, 2]], [3, 4, 5], uri="a.py")[0] == pytest.approx(p)


def test_ngram_evidence_stays_within_a_clients_scope():
    """The engine daemon names documents "c<client>|uri": one client's text never steers another's drafts."""
    index = NgramIndex()
    index.open("c1|a.py", [1, 2, 3])
    index.open("c2|b.py", [1, 2, 4, 1, 2, 4])
    assert index.prob([[1, 2]], [3, 4], uri="c1|a.py")[0][1] == 0.0
    assert index.prob([[1, 2]], [3, 4], uri="c2|b.py")[0][0] == 0.0
    index.open("c1|c.py", [1, 2, 4])
    assert index.prob([[1, 2]], [3, 4], uri="c1|a.py")[0][1] > 0.0


edits = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 8), st.lists(st.integers(0, 5), max_size=8)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 5), max_size=60), edits=edits, cut=st.tuples(st.floats(0, 1), st.integers(0, 9)))
def test_ngram_index_stays_consistent_under_random_edits(ids, edits, cut):
    index = NgramIndex()
    index.open("a.py", ids)
    index.prob([[0]], [1], uri="a.py")  # build the table; later edits update it
    for where, n_del, new in edits:
        i = int(where * len(ids))
        ids = ids[:i] + new + ids[i + n_del :]
        index.update("a.py", ids)
        table, fresh = index.docs["a.py"].table, NgramTable(np.asarray(ids, dtype=np.int64))
        assert table.grams == fresh.grams and table.ctx == fresh.ctx
    start = int(cut[0] * len(ids))
    before = {n: dict(d) for n, d in index.docs["a.py"].table.grams.items()}
    with index.without("a.py", start, start + cut[1]):
        pass
    assert index.docs["a.py"].table.grams == before


def test_index_memory_bound_drops_least_recently_used_tables():
    index = NgramIndex(max_entries=400)
    for n in range(4):
        index.open(f"{n}.py", list(range(n * 100, n * 100 + 40)))
        index.prob([[n * 100]], [n * 100 + 1], uri=f"{n}.py")
    assert index.entries <= 400 and index.docs["3.py"].table is not None and index.docs["0.py"].table is None
    assert index.prob([[1]], [2], uri="0.py")[0, 0] > 0  # rebuilt on demand


def test_keep_drops_blank_duplicate_and_repeated_below():
    below = "    return x\n\n    y = 2\n"
    assert keep(["a = 1", "a = 1  ", "", "return x", "  return x\n  y = 2", "b"], below) == ["a = 1", "b"]


def test_engine_returns_k_distinct_drafts(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    text = open(__file__.replace("test_superposed.py", "data/sessions_before.py")).read()[:1200]
    eng.open("file:///a.py", text)
    out = eng.complete("file:///a.py", 700, CompletionOptions(multiline=True, max_tokens=6, drafts=3))
    assert len(out.drafts) == 3 and len(set(out.drafts)) == 3 and out.text == out.drafts[0]
    anchored = CompletionOptions(multiline=True, max_tokens=6, drafts=3, superposed=SuperposedParams(anchor=True))
    assert eng.complete("file:///a.py", 700, anchored).drafts[0] == out_greedy(eng)
    for decoder in ("beam", "nucleus"):
        out = eng.complete("file:///a.py", 700, CompletionOptions(multiline=True, max_tokens=4, drafts=2, decoder=decoder))
        assert 1 <= len(out.drafts) <= 2 and out.text == out.drafts[0]
    one = eng.complete("file:///a.py", 700, CompletionOptions(multiline=True, max_tokens=6))
    assert one.drafts == [] and one.text == out_greedy(eng)


def out_greedy(eng):
    return eng.complete("file:///a.py", 700, CompletionOptions(multiline=True, max_tokens=6)).text
