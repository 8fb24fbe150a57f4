"""CPU prefill attention: torch's fused attention (`flash_attention`) against the fp64 oracle, with the
same tolerance rule as the kernels (at most twice the reference's error plus a rounding-sized eps)."""

from __future__ import annotations

import pytest
import torch

import ghostline.kernels.segment_attention as sa
from ghostline.kernels import step
from ghostline.kernels.testing import exact_attention, three_way

CASES = [  # KV x G heads, T query tokens at the segment's end, S keys from `start`, window
    dict(KV=1, G=4, T=40, S=300, start=0, window=None),  # Gemma 3 270M's heads, a global layer
    dict(KV=1, G=4, T=40, S=300, start=0, window=64),  # a sliding-window layer: keys before the window skipped
    dict(KV=2, G=2, T=17, S=90, start=25, window=None),  # a segment that starts past position 0
    dict(KV=3, G=1, T=64, S=64, start=0, window=20),  # the whole segment new (a first chunk), no GQA
    dict(KV=1, G=4, T=40, S=300, start=0, window=64, runs=(100, 20)),  # an edit's two hunks, far apart
    dict(KV=1, G=4, T=40, S=300, start=0, window=None, runs=(100, 20)),
]


def query_positions(case) -> torch.Tensor:
    """The last T positions of the segment, or (runs=(gap, n)) n of them `gap` rows before the rest."""
    start, S, T = case["start"], case["S"], case["T"]
    qpos = torch.arange(start + S - T, start + S)
    if "runs" in case:
        gap, n = case["runs"]
        qpos[:n] -= gap
    return qpos


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['KV']}x{c['G']}-T{c['T']}-S{c['S']}-w{c['window']}"
                         + ("-runs" if "runs" in c else ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flash_attention_matches_oracle(case, dtype):
    g = torch.Generator().manual_seed(case["S"] + case["T"])
    KV, G, T, S, start, hd = case["KV"], case["G"], case["T"], case["S"], case["start"], 32
    q = torch.randn(1, KV * G, T, hd, generator=g).to(dtype)
    seg = [(torch.randn(1, KV, S, hd, generator=g).to(dtype), torch.randn(1, KV, S, hd, generator=g).to(dtype), start)]
    qpos = query_positions(case)
    kw = dict(scale=hd**-0.5, window=case["window"])
    out = sa.flash_attention(q, seg[0], qpos, **kw)
    ref = sa.segment_attention(q, seg, qpos, **kw)
    assert out.shape == ref.shape and out.dtype == dtype
    ok, err, ref_err, eps = three_way(out, ref, exact=exact_attention(q, seg, qpos, **kw))
    assert ok, f"flash error {err:.3g} > 2 x reference {ref_err:.3g} + {eps:.3g}"


needs_bf16 = pytest.mark.skipif(not (step.available() and step._load().ghostline_prefill_bf16()),
                                reason="the C prefill attention needs AVX512-BF16 and a C compiler")


@needs_bf16
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"kv{c['KV']}x{c['G']}-T{c['T']}-S{c['S']}-w{c['window']}"
                         + ("-runs" if "runs" in c else ""))
def test_bf16_prefill_attention_matches_oracle(case):
    """The C kernel rounds q, k, v and the probabilities to bf16: against the fp64 oracle it may be
    off by twice what torch's attention over the bf16-rounded inputs is off (the reference)."""
    g = torch.Generator().manual_seed(case["S"] + case["T"] + 1)
    KV, G, T, S, start, hd = case["KV"], case["G"], case["T"], case["S"], case["start"], 64
    q = 2 * torch.randn(1, KV * G, T, hd, generator=g)
    K = torch.full((1, KV, S + 8, hd), float("nan"))  # rows past the segment are never read
    K[:, :, :S] = torch.randn(1, KV, S, hd, generator=g)
    V = torch.randn(1, KV, S + 8, hd, generator=g)
    K, V = K[:, :, :S], V[:, :, :S]
    qpos = query_positions(case)
    kw = dict(scale=hd**-0.5, window=case["window"])
    lo, hi = sa._key_range(S, start, int(qpos[0]), int(qpos[-1]), kw["window"])
    out = step.prefill_attention(q, K, V, start, lo, hi, qpos, **kw)
    assert step.prefill_attention(q, K, V, start, lo, hi, qpos.flip(0), **kw) is None  # positions must increase
    rounded = [t.bfloat16().float() for t in (q, K, V)]
    ref = sa.flash_attention(rounded[0], (rounded[1], rounded[2], start), qpos, **kw)
    ok, err, ref_err, eps = three_way(out, ref, exact=exact_attention(q, [(K, V, start)], qpos, **kw))
    assert ok, f"bf16 kernel error {err:.3g} > 2 x reference {ref_err:.3g} + {eps:.3g}"


def test_attend_routes_prefill_chunks():
    """More than MAX_QUERY_TOKENS over one segment: the fused path; a softcap or several segments
    (a scratch area over a prefix) keep the reference, whose numbers they then equal exactly."""
    T = sa.MAX_QUERY_TOKENS + 4
    q = torch.randn(1, 4, T, 16)
    K, V = torch.randn(1, 1, 50, 16), torch.randn(1, 1, 50, 16)
    qpos = torch.arange(50 - T, 50)
    one = [(K, V, 0)]
    assert torch.equal(sa.attend(q, one, qpos, scale=0.25), sa.flash_attention(q, one[0], qpos, scale=0.25))
    assert torch.equal(sa.attend(q, one, qpos, scale=0.25, softcap=30.0),
                       sa.segment_attention(q, one, qpos, scale=0.25, softcap=30.0))
    two = [(K[:, :, :20], V[:, :, :20], 0), (K[:, :, 20:], V[:, :, 20:], 20)]
    assert torch.equal(sa.attend(q, two, qpos, scale=0.25), sa.segment_attention(q, two, qpos, scale=0.25))
