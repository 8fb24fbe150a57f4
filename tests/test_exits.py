"""Early exit and halting: thresholds that never fire give greedy; state copying fills a full-depth
cache; halting composes with speculative decoding; the fits recover what they should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.decoding.early_exit import ExitStats, early_exit
from ghostline.engine.decoding.greedy import greedy
from ghostline.engine.decoding.speculative import SpecStats, speculative
from ghostline.engine.decoding.superposed import halt_cuts
from ghostline.engine.engine import CompletionOptions
from ghostline.engine.exits import Exits, RowHead, States, default_layers, distill, fit, logistic, lowest_threshold, normalise, ridge
from ghostline.engine.ngram import PromptLookup


def random_exits(model, layers, *, exit=math.inf, halt=math.inf, seed=0) -> Exits:
    g = torch.Generator().manual_seed(seed)
    D, C = model.args.dim, len(layers)
    return Exits(layers, torch.eye(D).repeat(C, 1, 1) + 0.1 * torch.randn(C, D, D, generator=g),
                 torch.zeros(C, D), torch.randn(C, D + 1, generator=g), torch.randn(4, generator=g),
                 exit_threshold=exit, halt_threshold=halt)


def test_thresholds_that_never_fire_give_greedy(tiny_prefix):
    model, ids, cache = tiny_prefix
    want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32))
    exits = random_exits(model, [1])
    stats = ExitStats()
    got = list(early_exit(model, ScratchCache(cache, 39, 33), ids[-1], exits=exits, max_new=32, stats=stats))
    assert got == want
    assert stats.exited == 0 and not stats.halted and stats.layers == 32 * model.args.n_layers


def test_state_copying_fills_the_cache_like_a_full_depth_step(tiny_prefix):
    model, ids, cache = tiny_prefix
    full, early = ScratchCache(cache, 39, 9), ScratchCache(cache, 39, 9)
    list(greedy(model, full, ids[-1], max_new=8))
    exits = random_exits(model, [1], exit=-math.inf)  # always exit after layer 1
    stats = ExitStats()
    toks = list(early_exit(model, early, ids[-1], exits=exits, max_new=8, stats=stats))
    assert len(toks) == 8 and stats.exited == 8 and stats.layers == 8
    assert early.length == full.length == 8 and early.k.shape == full.k.shape
    for layer in range(model.args.n_layers):
        assert early.k[layer, :, :, :8].abs().sum(-1).min() > 0  # every layer's row written
    # the skipped layers' keys are the ones computed from the exit state: redo the first step by hand
    check = ScratchCache(cache, 39, 2)
    pos = torch.tensor([39])
    x = model(torch.tensor([[ids[-1]]]), pos, check, exit_layer=1, return_hidden=True)
    model.copy_state(x, pos, check, start=1)
    assert torch.equal(check.k[:, :, :, :1], early.k[:, :, :, :1])
    assert torch.equal(check.v[:, :, :, :1], early.v[:, :, :, :1])
    # layer 1's input is the exit state itself (equal to full depth); deeper layers' inputs differ
    assert torch.equal(check.k[1, :, :, :1], full.k[1, :, :, :1])
    if model.args.n_layers > 2:
        assert not torch.equal(check.k[2:, :, :, :1], full.k[2:, :, :, :1])


def test_halt_ends_before_the_flagged_token_and_composes_with_speculation(tiny_prefix):
    model, ids, cache = tiny_prefix
    stats = ExitStats()
    assert list(early_exit(model, ScratchCache(cache, 39, 9), ids[-1], max_new=8, stats=stats,
                           exits=random_exits(model, [1], halt=-math.inf))) == []
    assert stats.halted
    # a threshold between the steps' P(stop): greedy and speculative (any proposer) halt at the same token
    exits = random_exits(model, [1])
    want = list(greedy(model, ScratchCache(cache, 39, 33), ids[-1], max_new=32))
    probs = []
    scratch = ScratchCache(cache, 39, 33)
    tok, pos = ids[-1], 39
    for t in want:
        probs.append(float(exits.p_stop(model(torch.tensor([[tok]]), torch.tensor([pos]), scratch)[0, -1])))
        tok, pos = t, pos + 1
    exits = exits.with_thresholds(halt=float(np.quantile(probs, 0.8)))
    cut = next(i for i, p in enumerate(probs) if p >= exits.halt_threshold)
    halted = list(early_exit(model, ScratchCache(cache, 39, 33), ids[-1], exits=exits, max_new=32))
    assert halted == want[:cut]
    rule = lambda logits: exits.p_stop(logits) >= exits.halt_threshold  # noqa: E731
    assert halt_cuts(model, cache, 39, ids[-1], drafts=[want, want[:2], []], rule=rule) == [cut, min(cut, 2), 0]
    for proposer in (PromptLookup(max_n=2, min_n=1), OracleAll(want)):
        spec_stats = SpecStats()
        got = list(speculative(model, ScratchCache(cache, 39, 50), ids[-1], context=ids[:-1], proposer=proposer,
                               max_new=32, stats=spec_stats,
                               halt=lambda rows: exits.p_stop(rows) >= exits.halt_threshold))
        assert got == halted and spec_stats.halted


class OracleAll:
    """Proposes the whole greedy continuation: the halt must cut inside an accepted draft."""

    def __init__(self, truth):
        self.truth, self.start = truth, 40

    def propose(self, context, k):
        done = len(context) - self.start
        return self.truth[done : done + k]


def test_fits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g)
    a_true, b_true = torch.randn(16, 8, generator=g), torch.randn(8, generator=g)
    a, b = ridge(x, x @ a_true + b_true, lam=1e-8)
    assert torch.allclose(a, a_true, atol=1e-3) and torch.allclose(b, b_true, atol=1e-3)
    y = (x[:, 0] * 3 - x[:, 1] + 0.5 > 0).float()
    w = logistic(x, y, l2=0.0)
    assert ((x @ w[:-1] + w[-1] > 0).float() == y).float().mean() > 0.98  # separable: near perfect
    prob, good = np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 1, 1, 0, 0])
    assert lowest_threshold(prob, good, target=1.0, min_count=1) == 0.7
    assert lowest_threshold(prob, good, target=1.0, min_count=4) == math.inf
    assert default_layers(18) == [12, 13, 14, 15, 16, 17]


def tiny_states(model, *, files: int = 12, length: int = 48) -> States:
    """Teacher-forced states of random ids, a file index per sequence (what `collect` gives)."""
    g = torch.Generator().manual_seed(4)
    hs, ts, fs = [], [], []
    a = model.args
    with torch.no_grad():
        for f in range(files):
            ids = torch.randint(2, a.vocab_size, (length,), generator=g)
            cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
            cache.reserve(length)
            cache.length = length
            states = []
            model(ids[None], torch.arange(length), cache, return_hidden=True, states=states)
            hs.append(torch.stack([normalise(x[0, :-1]) for x in states], 1))
            ts.append(ids[1:])
            fs.append(torch.full((length - 1,), f))
    return States(torch.cat(hs), torch.cat(ts), torch.cat(fs))


def test_distilling_a_lens_brings_it_closer_to_the_full_model(tiny_prefix):
    """KL(full || lens) over the head's rows falls from the logit lens's; the folded
    mini head gives the head's own logits of those rows."""
    model = tiny_prefix[0]
    st = tiny_states(model)
    L = model.args.n_layers
    head = RowHead(model, torch.arange(model.args.vocab_size))
    x, final = st.hidden[:, 0].float(), st.hidden[:, L - 1].float()

    def kl(a, b):
        want = torch.log_softmax(head.logits(final), -1)
        got = torch.log_softmax(head.logits(x @ a + b), -1)
        return float(torch.nn.functional.kl_div(got, want, log_target=True, reduction="batchmean"))

    a, b = torch.eye(x.shape[1]), torch.zeros(x.shape[1])  # the logit lens
    a2, b2 = distill(x, final, head, a, b, epochs=20, batch=64, lr=1e-3)
    assert kl(a2, b2) < 0.75 * kl(a, b)
    rows = torch.tensor([5, 17, 3])
    torch.testing.assert_close(normalise(final) @ head.folded(rows).T, head.logits(final)[:, rows], rtol=1e-4, atol=1e-4)


def test_fit_keeps_the_best_layer_and_its_exits_serve_decoding(tmp_path, tiny_prefix):
    model, ids, cache = tiny_prefix
    L = model.args.n_layers
    offered = list(range(1, L))
    exits = fit(tiny_states(model), RowHead(model, torch.arange(model.args.vocab_size)), layers=offered, keep=1,
                epochs=1, mini_rows=16, exit_agreement=0.5, report_layers=offered, progress=lambda _: None)
    D = model.args.dim
    assert len(exits.layers) == 1 and exits.mini.shape == (16, D) and exits.exit_w.shape == (1, D + 3 + 1)
    saves = {int(k): v["alone_saves"] for k, v in exits.meta["per_layer"].items()}
    assert saves[exits.layers[0]] == max(saves.values())
    assert "distilled_agree" in exits.meta["per_layer"][str(exits.layers[0])]
    back = Exits.load(exits.save(tmp_path))
    assert torch.allclose(back.mini, exits.mini, atol=1e-2) and back.layers == exits.layers
    # never firing gives greedy; always exiting writes a full cache and counts the layers it ran
    want = list(greedy(model, ScratchCache(cache, 39, 13), ids[-1], max_new=12))
    off = back.with_thresholds(exit=math.inf, halt=math.inf)
    assert list(early_exit(model, ScratchCache(cache, 39, 13), ids[-1], exits=off, max_new=12)) == want
    stats, scratch = ExitStats(), ScratchCache(cache, 39, 13)
    toks = list(early_exit(model, scratch, ids[-1], exits=back.with_thresholds(exit=-math.inf), max_new=12, stats=stats))
    assert len(toks) == 12 and stats.exited == 12 and stats.layers == 12 * exits.layers[0]
    assert scratch.length == 12 and scratch.k[:, :, :, :12].abs().sum(-1).min() > 0


def test_the_fast_exit_decision_equals_judge():
    """`decide` (one step, int8 lens and mini head) exits where `judge`'s P(exit) clears the threshold
    (away from it by more than the int8 rows' error), with judge's lens output; with and without a
    mini head."""
    g = torch.Generator().manual_seed(5)
    D, M = 32, 64
    x = torch.randn(2000, D, generator=g) * 3
    for mini in (torch.randn(M, D, generator=g), None):
        exits = Exits([3], torch.randn(1, D, D, generator=g) / D**0.5, torch.randn(1, D, generator=g),
                      torch.randn(1, D + (4 if mini is not None else 1), generator=g), torch.zeros(4), mini=mini)
        for thr in (0.3, 0.7, 0.95):
            e = exits.with_thresholds(exit=thr)
            p, y = e.judge(0, x)
            clear = (p - thr).abs() > 0.02
            got = [e.decide(0, row) for row in x]
            fired = torch.tensor([g is not None for g in got])
            assert torch.equal(fired[clear], (p >= thr)[clear])
            assert 0 < int(fired.sum()) < len(x)
            for i in torch.nonzero(fired & clear)[:20, 0].tolist():
                torch.testing.assert_close(got[i], y[i], rtol=0.02, atol=0.02)


def test_save_load_roundtrip(tmp_path, tiny_prefix):
    model = tiny_prefix[0]
    e = random_exits(model, [1], exit=0.9, halt=0.7)
    e.meta = {"tokens": 5}
    back = Exits.load(e.save(tmp_path))
    assert back.layers == [1] and back.exit_threshold == 0.9 and back.halt_threshold == 0.7
    assert torch.allclose(back.maps, e.maps, atol=1e-2) and torch.equal(back.stop_w, e.stop_w)
    assert back.meta == {"tokens": 5}


def test_engine_halt_and_exit_options(tiny_engine_factory):
    eng = tiny_engine_factory("llama")
    eng.open("a", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return")
    end = len(eng.text("a"))
    with pytest.raises(ValueError, match="calibrate"):
        eng.complete("a", end, CompletionOptions(halt=True))
    plain = eng.complete("a", end, CompletionOptions(multiline=True, max_tokens=12))
    eng.exits = random_exits(eng.model, [1])
    same = eng.complete("a", end, CompletionOptions(multiline=True, max_tokens=12, halt=True, exit=True))
    assert same.tokens == plain.tokens and same.stop_reason == plain.stop_reason
    stopped = eng.complete("a", end, CompletionOptions(halt=True, halt_threshold=-math.inf))
    assert stopped.text == "" and stopped.stop_reason == "halt"
    looked = eng.complete("a", end, CompletionOptions(halt=True, halt_threshold=-math.inf, decoder="lookup"))
    assert looked.text == "" and looked.stop_reason == "halt"
    # superposed drafts: a halt that never fires changes nothing; one that always fires leaves nothing
    drafts = eng.complete("a", end, CompletionOptions(multiline=True, max_tokens=12, drafts=3))
    same = eng.complete("a", end, CompletionOptions(multiline=True, max_tokens=12, drafts=3, halt=True))
    assert same.drafts == drafts.drafts
    none = eng.complete("a", end, CompletionOptions(multiline=True, max_tokens=12, drafts=3, halt=True,
                                                    halt_threshold=-math.inf))
    assert none.text == "" and none.drafts == [] and none.stop_reason == "halt"
