"""engine.cuda, the static-shape decode path: it gives `greedy`'s tokens, token for token.

On the CPU these run its uncaptured steps through the torch references (the Triton kernels inside
the same steps are checked under the interpreter in test_kernels.py). The captured CUDA graphs need
a GPU: those tests are skipped here and `python -m bench.gpu` checks them on a machine with one.
"""

from __future__ import annotations

import random

import pytest
import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.cuda import CudaRunner, cuda_greedy
from ghostline.engine.decoding.greedy import greedy
from ghostline.engine.decoding.speculative import SpecStats
from ghostline.engine.model import build
from ghostline.engine.ngram import PromptLookup
from tests.conftest import tiny_hf

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU here: the captured-graph path runs only on one "
                                                 "(bench.gpu checks it on a GPU machine)")
KINDS = ["gemma3", "llama", "llama3"]
VOCAB = 300


def setup(kind: str, n: int = 50, *, device="cpu", dtype=torch.float32, seed: int = 0):
    cfg, hf = tiny_hf(kind, VOCAB)
    model = build(cfg, hf.state_dict(), dtype=dtype).to(device)
    ids = random.Random(seed).choices(range(2, VOCAB), k=n)
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, dtype=dtype, device=device)
    cache.reserve(n)
    cache.length = n
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(n), cache)
    return model, ids, cache


@pytest.mark.parametrize("kind", KINDS)
def test_static_greedy_equals_greedy(kind):
    model, ids, cache = setup(kind)
    P = 35  # the cursor inside the document: cached rows past it exist and must stay unseen
    want = list(greedy(model, ScratchCache(cache, P, 25), ids[P], max_new=24))  # 24 > the tiny Gemma's window
    r = CudaRunner(model, scratch_rows=32)
    assert not r.graphs and not r.kernels  # CPU: uncaptured steps, torch references
    assert list(r.greedy(r.scratch(cache, P, 25), ids[P], max_new=24)) == want
    assert list(r.greedy(ScratchCache(cache, P, 25), ids[P], max_new=24)) == want  # the engine's own scratch
    assert list(cuda_greedy(model, ScratchCache(cache, P, 25), ids[P], max_new=24)) == want


def test_first_mask_and_abandoned_stream():
    model, ids, cache = setup("gemma3")
    P = 30
    plain = list(greedy(model, ScratchCache(cache, P, 13), ids[P], max_new=12))
    mask = torch.ones(VOCAB, dtype=torch.bool)
    mask[plain[0]] = False  # forbid greedy's first choice (token healing's constraint)
    want = list(greedy(model, ScratchCache(cache, P, 13), ids[P], max_new=12, first_mask=mask))
    assert want[0] != plain[0]
    r = CudaRunner(model, scratch_rows=16)
    assert list(r.greedy(r.scratch(cache, P, 13), ids[P], max_new=12, first_mask=mask)) == want
    scratch = r.scratch(cache, P, 13)
    gen = r.greedy(scratch, ids[P], max_new=12)
    assert [next(gen) for _ in range(3)] == plain[:3]
    gen.close()
    assert scratch.length <= 4  # at most one step ran ahead
    scratch.trim(0)
    assert list(r.greedy(r.scratch(cache, P, 13), ids[P], max_new=12)) == plain
    with pytest.raises(IndexError):
        next(r.greedy(ScratchCache(cache, P, 4), ids[P], max_new=5))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_equals_the_model_forward(kind):
    """The PIE encode step (edited span over the prefix, written into the document cache)."""
    model, ids, base = setup(kind, n=120)
    r = CudaRunner(model, encode_buckets=(8, 16, 32))
    for start, m in [(40, 5), (60, 20), (10, 70)]:  # one bucket exactly, padding, several steps
        new = random.Random(m).choices(range(2, VOCAB), k=m)
        want, got = base.clone(), base.clone()
        with torch.no_grad():
            model(torch.tensor([new]), torch.arange(start, start + m), want)
        r.encode(got, new, start)
        assert got.length == base.length
        end = start + m
        assert torch.allclose(got.k[:, :, :end], want.k[:, :, :end], atol=1e-5, rtol=1e-5)
        assert torch.allclose(got.v[:, :, :end], want.v[:, :, :end], atol=1e-5, rtol=1e-5)
        assert torch.equal(got.k[:, :, end : base.length], base.k[:, :, end : base.length])  # padding wrote nothing


class RandomDraft:
    def __init__(self, seed):
        self.rng = random.Random(seed)

    def propose(self, context, k):
        return [self.rng.randrange(VOCAB) for _ in range(self.rng.randint(0, k))]


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_verify_and_speculative_equal_greedy(kind):
    model, ids, cache = setup(kind)
    P = 40
    want = list(greedy(model, ScratchCache(cache, P, 31), ids[P], max_new=30))
    r = CudaRunner(model, scratch_rows=48, verify_tokens=6)
    scratch = r.scratch(cache, P, 40)
    assert r.verify(scratch, [ids[P]] + want[:5], P)[0][:5] == want[:5]  # a right draft is accepted whole
    scratch.trim(0)
    for proposer in (PromptLookup(), RandomDraft(1)):
        stats = SpecStats()
        got = list(r.speculative(r.scratch(cache, P, 40), ids[P], context=ids[:P], proposer=proposer,
                                 max_new=30, stats=stats))
        assert got == want
        assert stats.steps <= 30
    mask = torch.ones(VOCAB, dtype=torch.bool)
    mask[want[0]] = False  # token healing forbids greedy's first choice
    healed = list(greedy(model, ScratchCache(cache, P, 31), ids[P], max_new=30, first_mask=mask))
    got = list(r.speculative(r.scratch(cache, P, 40), ids[P], context=ids[:P], proposer=RandomDraft(2),
                             max_new=30, first_mask=mask))
    assert got == healed and got[0] != want[0]
    cut = want[7]  # a halt rule that flags the row choosing this token ends the decode just before it
    halted = list(r.speculative(r.scratch(cache, P, 40), ids[P], context=ids[:P], proposer=PromptLookup(),
                                max_new=30, halt=lambda rows: rows.argmax(-1) == cut))
    assert halted == want[: want.index(cut)]


def test_rope_tables_follow_the_model_and_stay_fp32():
    cfg, hf = tiny_hf("gemma3", VOCAB)
    model = build(cfg, hf.state_dict(), dtype=torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32 and model.args.inv_freq.dtype == torch.float32
    model = model.to(torch.float32)
    assert model.rope_freqs.dtype == torch.float32 and model.device.type == "cpu"


@needs_cuda
@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_cuda_graphs_equal_the_uncaptured_steps(kind):
    model, ids, cache = setup(kind, device="cuda", dtype=torch.bfloat16)
    P = 35
    graph = CudaRunner(model, scratch_rows=32)
    plain = CudaRunner(model, scratch_rows=32, graphs=False)
    assert graph.graphs and graph.kernels
    want = list(plain.greedy(plain.scratch(cache, P, 25), ids[P], max_new=24))
    assert list(graph.greedy(graph.scratch(cache, P, 25), ids[P], max_new=24)) == want
    assert list(graph.greedy(graph.scratch(cache, P, 25), ids[P], max_new=24)) == want  # replayed
    eager = list(greedy(model, ScratchCache(cache, P, 25), ids[P], max_new=24))
    assert sum(a == b for a, b in zip(eager, want)) >= 20  # bf16: the fused step rounds like the eager one


@needs_cuda
def test_cuda_model_moves_rope_tables():
    cfg, hf = tiny_hf("llama", VOCAB)
    model = build(cfg, hf.state_dict()).to("cuda")
    assert model.rope_freqs.is_cuda and model.args.inv_freq.is_cuda
    model, ids, cache = setup("llama", device="cuda")
    want = list(greedy(model.cpu(), ScratchCache(cache_to(cache, "cpu"), 35, 9), ids[35], max_new=8))
    model.cuda()
    assert list(greedy(model, ScratchCache(cache, 35, 9), ids[35], max_new=8)) == want


def cache_to(cache: KVCache, device) -> KVCache:
    c = KVCache(*cache.shape, dtype=cache.dtype, device=device)
    c.reserve(cache.length)
    c.k[:, :, : cache.length], c.v[:, :, : cache.length] = (t.to(device) for t in cache.state)
    c.length = cache.length
    return c
