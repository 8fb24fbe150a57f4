"""AdaDec: the fast decoder against greedy (infinite threshold) and against its re-encoding reference;
the batched rollout against separate greedy rollouts; the threshold fit on data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.decoding.adadec import AdaDecParams, AdaDecStats, adadec, entropy, fit_threshold, look_ahead, reference_adadec
from ghostline.engine.decoding.greedy import reference_greedy
from ghostline.engine.engine import CompletionOptions
from ghostline.engine.model import build
from tests.conftest import tiny_hf


def prefilled(model, ids: list[int], room: int) -> ScratchCache:
    """A cache holding ids[:-1] and a scratch whose first row takes ids[-1] (as the engine sets it up)."""
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(len(ids))
    cache.length = len(ids) - 1
    with torch.no_grad():
        model(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1), cache)
    return ScratchCache(cache, len(ids) - 1, room)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny(request):
    cfg, hf = tiny_hf(request.param, 300, seed=3)
    torch.manual_seed(1)
    return build(cfg, hf.state_dict()), torch.randint(2, 300, (24,)).tolist()


def test_infinite_threshold_is_greedy(tiny):
    model, ids = tiny
    stats = AdaDecStats()
    got = list(adadec(model, prefilled(model, ids, 20), ids[-1], max_new=16, params=AdaDecParams(), stats=stats))
    assert got == reference_greedy(model, ids, 16)
    assert stats.paused == 0 and stats.forwards == 16


@pytest.mark.parametrize("follow", [False, True])
@pytest.mark.parametrize("threshold", [0.0, "median"])
def test_fast_adadec_equals_the_reencoding_reference(tiny, threshold, follow):
    """Pausing at every step (threshold 0) or about half of them; a stop rule ends rollouts early;
    with `follow`, the winner's rollout is committed whole."""
    model, ids = tiny
    if threshold == "median":
        hs = []
        for i in range(8, len(ids)):
            logp = torch.log_softmax(model(torch.tensor([ids[:i]]), torch.arange(i), _cache(model, i), last_only=True)[0, -1], -1)
            hs.append(entropy(logp))
        threshold = float(np.median(hs))
    params = AdaDecParams(threshold=threshold, width=3, depth=3, follow=follow)
    finish = lambda seq: seq[-1] % 7 == 0  # noqa: E731 - a stand-in stop rule on ids
    stats = AdaDecStats()
    got = list(adadec(model, prefilled(model, ids, 16), ids[-1], max_new=8, params=params, finish=finish, stats=stats))
    assert got == reference_adadec(model, ids, 8, params=params, finish=finish)
    assert stats.paused > 0 and stats.steps == 8


def _cache(model, n):
    a = model.args
    c = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    c.reserve(n)
    c.length = n
    return c


def test_batched_rollout_equals_separate_greedy_rollouts(tiny):
    model, ids = tiny
    scratch = prefilled(model, ids, 8)
    with torch.no_grad():
        logits = model(torch.tensor([[ids[-1]]]), torch.tensor([len(ids) - 1]), scratch)[0, -1]
        ro = look_ahead(model, scratch, torch.log_softmax(logits.float(), -1), len(ids), [],
                        params=AdaDecParams(threshold=0.0, width=3, depth=5))
    assert len(ro.seqs) == 3 and scratch.length == 1  # the scratch itself is untouched
    for seq in ro.seqs:
        assert seq[1:] == reference_greedy(model, ids + seq[:1], 5)
    assert ro.best == max(range(3), key=lambda r: ro.scores[r])


def test_fit_threshold_finds_the_known_boundary():
    rng = np.random.default_rng(0)
    h = rng.uniform(0, 6, 20000)
    right = rng.uniform(size=h.size) < 1 / (1 + np.exp(2.0 * (h - 3.0)))  # P(right) = 1/2 at 3 nats
    fit = fit_threshold(h, right)
    assert abs(fit["threshold"] - 3.0) < 0.3 and fit["w1"] < 0
    assert fit["held_out_accuracy"] > fit["greedy_right_share"]
    flat = fit_threshold(h, rng.uniform(size=h.size) < 0.9)  # entropy says nothing: (almost) never pause
    assert flat["paused_share"] < 0.05 or math.isinf(flat["threshold"])


def test_engine_adadec_decoder(tiny_engine_factory):
    eng = tiny_engine_factory("gemma3")
    text = "def f(x):\n    return x + 1\n\ndef g(y):\n    return"
    eng.open("a", text)
    plain = eng.complete("a", len(text), CompletionOptions(multiline=True, max_tokens=8))
    same = eng.complete("a", len(text), CompletionOptions(multiline=True, max_tokens=8, decoder="adadec"))
    assert same.tokens == plain.tokens and same.stats.paused == 0  # not calibrated: inf threshold
    every = eng.complete("a", len(text), CompletionOptions(multiline=True, max_tokens=8, decoder="adadec",
                                                           adadec=AdaDecParams(threshold=0.0, follow=False)))
    assert every.stats.paused == every.stats.steps == len(every.tokens) > 0
    followed = eng.complete("a", len(text), CompletionOptions(multiline=True, max_tokens=8, decoder="adadec",
                                                              adadec=AdaDecParams(threshold=0.0, depth=3)))
    # what ships follows the winner's rollout: no pause inside the look-ahead a candidate was judged by
    assert followed.stats.paused == math.ceil(len(followed.tokens) / 4) and len(followed.tokens) > 4
    assert eng.docs["a"].cache.length == len(eng.docs["a"].ids)  # scratch rolled back, cache intact
