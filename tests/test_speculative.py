"""Speculative decoding equals greedy whatever the proposer says; rollback leaves no trace."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ghostline.engine.cache import ScratchCache
from ghostline.engine.decoding.greedy import greedy
from ghostline.engine.decoding.speculative import DraftLength, MatchGoodput, RejectionRule, SpecStats, speculative
from ghostline.engine.engine import CompletionOptions
from ghostline.engine.model import build
from ghostline.engine.ngram import Match, PromptLookup, longest_match
from tests.conftest import prefix_cache, tiny_hf


class Random:
    def __init__(self, vocab, seed):
        self.rng, self.vocab = random.Random(seed), vocab

    def propose(self, context, k):
        return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(0, k))]


class Wrong:
    """Always wrong: proposes the token the model will not choose (the greedy token + 1)."""

    def __init__(self, truth):
        self.truth = truth

    def propose(self, context, k):
        done = len(context) - self.start
        return [(t + 1) % 300 for t in self.truth[done : done + k]]


class Oracle(Wrong):
    match = Match(n=8, count=1, agree=True)  # what MatchGoodput reads: a copy

    def propose(self, context, k):
        done = len(context) - self.start
        return self.truth[done : done + k]


@pytest.mark.parametrize("kind,rule", [("gemma3", DraftLength), ("llama", DraftLength), ("gemma3", RejectionRule),
                                       ("gemma3", MatchGoodput), ("llama", MatchGoodput)])
def test_any_proposer_gives_greedy_output(kind, rule):
    cfg, hf = tiny_hf(kind, 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 300, (40,)).tolist()
    cache = prefix_cache(model, ids[:-1])
    want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32))
    proposers = [Random(300, s) for s in range(3)] + [Wrong(want), Oracle(want), PromptLookup(max_n=2, min_n=1)]
    for proposer in proposers:
        proposer.start = len(ids)
        stats = SpecStats()
        scratch = ScratchCache(cache, 39, 32 + 16)
        got = list(speculative(model, scratch, ids[-1], context=ids[:-1], proposer=proposer, max_new=32, stats=stats,
                               length=rule()))
        assert got == want, type(proposer).__name__
        if isinstance(proposer, Oracle):
            assert stats.mean_accepted > 1.5 and stats.steps < 32
        if type(proposer) is Wrong:
            assert stats.accepted == 0


def test_the_rejection_rule_drafts_longer_as_drafts_hold_and_shorter_as_they_fail():
    rule = RejectionRule(threshold=0.35, k_max=12)
    start = rule.k
    for _ in range(20):
        rule.update(rule.k, rule.k)  # every draft accepted whole
    assert rule.k == 12 > start
    for _ in range(20):
        rule.update(rule.k, 0)  # the first token always rejected
    assert rule.k == 1
    for _ in range(40):
        rule.update(rule.k, min(rule.k, 3))  # three tokens hold, the fourth never does
    assert 3 <= rule.k <= 4


def test_the_match_rule_drafts_by_the_odds_of_the_match_and_the_cost_of_a_row():
    copy, guess = Match(n=9, count=3, agree=True), Match(n=2, count=5, agree=False)
    rule = MatchGoodput()
    assert rule.keep(copy) == 3 and rule.keep(guess) == 1 and rule.keep(None) == 1
    assert rule.keep(Match(n=9, count=3, agree=False)) == 1  # earlier occurrences went different ways
    assert MatchGoodput(cost=(1.0, 1.5, 2.0)).keep(guess) == 0  # a second row costs more than a guess brings
    for _ in range(30):
        rule.keep(guess)
        rule.update(8, 8)  # guesses that keep holding
    assert rule.keep(guess) >= 3
    for _ in range(30):
        rule.keep(copy)
        rule.update(3, 0)  # copies that fail at once
    assert rule.keep(copy) <= 1


def test_longest_match_finds_the_latest_longest_suffix_and_whether_it_forks():
    a = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 4, 2, 3])
    match, i = longest_match(a, a, end=len(a) - 1, max_n=16)  # suffix [.., 2, 3]: "1 2 3" never ends it
    assert (match.n, match.count, match.agree, i) == (2, 2, False, 7)  # "2 3" at 2..3 (then 9) and 6..7 (then 7)
    match, i = longest_match(a, np.array([0, 1, 2]), end=len(a), max_n=16)
    assert (match.n, match.count, match.agree, i) == (2, 2, True, 6)  # "1 2" twice, followed by 3 both times
    assert longest_match(a, np.array([8]), end=len(a), max_n=16) is None
    lookup = PromptLookup()
    assert lookup.propose(np.array([5, 1, 2, 3, 9, 1, 2]), 4) == [3, 9, 1] and lookup.match.n == 2
    lookup.others = [np.array([7, 9, 1, 2, 8, 8])]
    assert lookup.propose(np.array([5, 1, 2, 3, 9, 1, 2]), 2) == [8, 8] and lookup.match.n == 3  # longer elsewhere


def test_rollback_leaves_the_scratch_as_if_it_never_saw_rejected_tokens():
    cfg, hf = tiny_hf("gemma3", 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 300, (30,)).tolist()
    cache = prefix_cache(model, ids[:-1])
    plain = ScratchCache(cache, 29, 40)
    want = list(greedy(model, plain, ids[-1], max_new=12))
    wrong = Wrong(want)
    wrong.start = len(ids)
    spec = ScratchCache(cache, 29, 40)
    got = list(speculative(model, spec, ids[-1], context=ids[:-1], proposer=wrong, max_new=12))
    assert got == want
    n = 12  # rows: the first token and the 11 generated tokens fed back
    assert spec.length == plain.length == n
    assert torch.allclose(spec.k[:, :, :, :n], plain.k[:, :, :, :n], atol=1e-5)
    assert torch.allclose(spec.v[:, :, :, :n], plain.v[:, :, :, :n], atol=1e-5)


def test_engine_lookup_decoder_equals_greedy(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    text = open(__file__.replace("test_speculative.py", "data/sessions_before.py")).read()[:1200]
    eng.open("a", text)
    for offset in (300, 800, 1200):
        g = eng.complete("a", offset, CompletionOptions(multiline=True, max_tokens=24))
        s = eng.complete("a", offset, CompletionOptions(multiline=True, max_tokens=24, decoder="lookup"))
        assert s.tokens == g.tokens and s.text == g.text


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_self_speculation_gives_greedy_output_and_falls_back(kind):
    from ghostline.engine.decoding.speculative import Chain, EarlyLayers
    from tests.test_exits import random_exits

    cfg, hf = tiny_hf(kind, 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 300, (40,)).tolist()
    cache = prefix_cache(model, ids[:-1])
    want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32))
    exits = random_exits(model, [1])
    for confident in (-1.0, 0.5):  # always draft / draft while the controller is sure
        scratch = ScratchCache(cache, 39, 32 + 16)
        early = EarlyLayers(model, scratch, exits, confident=confident)
        early.layer = 0  # force drafting from layer 1 whatever the cost model says
        early.choose = lambda: 0
        stats = SpecStats()
        for proposer in (early, Chain(PromptLookup(max_n=2, min_n=1), early)):
            scratch.trim(0)
            got = list(speculative(model, scratch, ids[-1], context=ids[:-1], proposer=proposer, max_new=32,
                                   stats=stats))
            assert got == want
        if confident < 0:
            assert stats.proposed > 0
    # the goodput rule: a shallow exit with high acceptance pays; near-zero acceptance falls back
    early = EarlyLayers(model, ScratchCache(cache, 39, 8), exits, head_cost=0.1)
    early.alpha = {0: 0.99}
    assert early.choose() == 0
    early.alpha = {0: 0.01}
    early.layer = early.choose()
    assert early.layer is None and early.propose(np.array(ids), 4) == []


def test_verify_step_attention_equals_decode_steps_bit_for_bit():
    """On the CPU a verify forward's attention is the decode steps' one, row for row (int8 speculation
    relies on it to stay identical to greedy)."""
    from ghostline.kernels.segment_attention import attend

    g = torch.Generator().manual_seed(0)
    K, V = torch.randn(1, 1, 50, 32, generator=g), torch.randn(1, 1, 50, 32, generator=g)
    q = torch.randn(1, 4, 5, 32, generator=g)
    segs = [(K[:, :, :45], V[:, :, :45], 0), (K[:, :, 45:], V[:, :, 45:], 45)]
    qpos = torch.arange(45, 50)
    both = attend(q, segs, qpos, scale=0.2, window=16)
    for t in range(5):
        seg_t = [(K[:, :, :45], V[:, :, :45], 0), (K[:, :, 45 : 46 + t], V[:, :, 45 : 46 + t], 45)]
        one = attend(q[:, :, t : t + 1], seg_t, qpos[t : t + 1], scale=0.2, window=16)
        assert torch.equal(both[:, :, t : t + 1], one)
