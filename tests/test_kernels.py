"""Triton kernels against their references, under the Triton interpreter on CPU tensors.

Tolerance as in flash-attention's tests: the kernel and the same-precision torch reference are both
compared with an fp64 oracle, and the kernel's error may be at most twice the reference's plus a
rounding-sized eps. Output buffers start as NaN, so an element the kernel never writes fails.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when a kernel is decorated, i.e. when its module is imported

import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import ghostline.kernels.rope_shift as rs  # noqa: E402
import ghostline.kernels.segment_attention as sa  # noqa: E402
from ghostline.kernels.testing import exact_attention, three_way  # noqa: E402

# When conftest (through engine) imported triton before this module set TRITON_INTERPRET, the
# kernels and triton.language's own jit functions were built for compilation, and reloading the
# kernels alone is not enough. The checks then run in a child pytest with the variable set first.
INTERPRETED = isinstance(rs._rope_shift_kernel, InterpretedFunction)
interpreted = pytest.mark.skipif(not INTERPRETED, reason="checked by test_kernels_in_subprocess (TRITON_INTERPRET=1 child)")


@pytest.mark.skipif(INTERPRETED, reason="the kernel checks run in this process")
@pytest.mark.timeout(1000)
def test_kernels_in_subprocess():
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0 and " passed" in summary, res.stdout[-8000:] + res.stderr[-2000:]
    print("TRITON_INTERPRET=1 child:", summary)


DTYPES = [torch.float32, torch.bfloat16]


def assert_three_way(out: torch.Tensor, ref: torch.Tensor, *, exact: torch.Tensor) -> None:
    ok, err, ref_err, eps = three_way(out, ref, exact=exact)
    assert torch.isfinite(out).all(), "kernel left unwritten (NaN) or non-finite elements"
    assert ok, f"kernel error {err:.3g} > 2 * reference error {ref_err:.3g} + {eps:.3g}"


# rope_shift -------------------------------------------------------------------------------------

ROPE_CASES = [  # (cap, src, end, dst)
    (48, 5, 20, 30),  # delta > 0, disjoint
    (48, 30, 44, 2),  # delta < 0, disjoint
    (48, 10, 30, 17),  # delta > 0, overlapping
    (48, 12, 40, 5),  # delta < 0, overlapping
    (48, 20, 47, 21),  # delta = +1 (one token typed), overlapping
    (48, 5, 45, 4),  # delta = -1 (one token deleted), rows not a multiple of the block
    (48, 7, 7, 3),  # nothing to move
]


@interpreted
@pytest.mark.parametrize("mode", ["sequential", "staged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=[f"{s}-{e}->{d}" for _, s, e, d in ROPE_CASES])
def test_rope_shift(case, dtype, mode):
    cap, src, end, dst = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    L, KV, hd = 3, 2, 32
    k0 = torch.randn(L, KV, cap, hd, generator=gen).to(dtype)  # [L, KV, cap, hd]
    v0 = torch.randn(L, KV, cap, hd, generator=gen).to(dtype)
    base = torch.tensor([10000.0, 500.0, 1e6])[:, None]
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2).float() / hd)  # [L, hd/2]: per-layer frequencies
    poison = torch.zeros(cap, dtype=torch.bool)
    poison[dst : dst + end - src] = True
    poison[src:end] = False  # destination rows that are not also source rows
    k0[:, :, poison], v0[:, :, poison] = float("nan"), float("nan")

    k, v = k0.clone(), v0.clone()
    # overlapping ranges: walked in order by each program (blocks of 4 rows here), or staged
    rs.rope_shift_triton(k, v, src, end, dst, inv_freq, block=8, sequential=mode == "sequential", seq_rows=4)
    k_ref, v_ref = k0.clone(), v0.clone()
    rs.rope_shift_reference(k_ref, v_ref, src, end, dst, inv_freq)
    k_hi, v_hi = k0.double(), v0.double()
    rs.rope_shift_reference(k_hi, v_hi, src, end, dst, inv_freq)

    assert_three_way(k, k_ref, exact=k_hi)  # every poisoned row is a destination row
    assert torch.equal(v, v_ref)  # values are moved, not computed


# segment attention --------------------------------------------------------------------------------


ATTN_CASES = [  # B, KV, G, T, hd, prefix, scratch, window, softcap, kernel knobs
    dict(B=1, KV=1, G=4, T=1, hd=64, P=70, S=1, window=None, softcap=None),  # Gemma-like decode step
    dict(B=1, KV=1, G=4, T=1, hd=64, P=70, S=3, window=24, softcap=None),  # sliding-window layer
    dict(B=2, KV=2, G=2, T=3, hd=32, P=45, S=5, window=16, softcap=None),  # GQA, shared prefix, B > 1
    dict(B=3, KV=1, G=4, T=4, hd=24, P=50, S=6, window=None, softcap=5.0),  # softcap, odd head dim
    dict(B=2, KV=2, G=1, T=16, hd=32, P=60, S=16, window=6, softcap=2.0),  # verify 16 tokens, window < T
    dict(B=2, KV=1, G=2, T=2, hd=32, P=40, S=3, window=None, softcap=50.0),  # Gemma 2's cap: tanh near 0
    dict(B=4, KV=1, G=4, T=2, hd=32, P=40, S=4, window=None, softcap=None, max_rows=16),  # prefix not shared
    dict(B=1, KV=2, G=2, T=2, hd=32, P=90, S=0, window=None, softcap=None, programs=64),  # one segment, many splits
    dict(B=1, KV=2, G=2, T=5, hd=32, P=80, S=8, window=33, softcap=None, qpos=[80, 82, 83, 86, 87]),  # gaps
]


def _attn_id(c: dict) -> str:
    return f"B{c['B']}-kv{c['KV']}x{c['G']}-T{c['T']}-w{c['window']}-cap{c['softcap']}"


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=[_attn_id(c) for c in ATTN_CASES])
def test_segment_attention(case, dtype, monkeypatch):
    c = dict(case)
    B, KV, G, T, hd, P, S = (c.pop(n) for n in ("B", "KV", "G", "T", "hd", "P", "S"))
    window, softcap, qpos = c.pop("window"), c.pop("softcap"), c.pop("qpos", None)
    H, L, cap = KV * G, 2, P + S + 7
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    # Strided views like the engine's: prefix rows of a [L, KV, cap, hd] cache, scratch rows of an
    # [L, B, KV, cap, hd] area, q transposed from [B, T, H, hd].
    prefix_k, prefix_v = rand(L, KV, cap, hd), rand(L, KV, cap, hd)
    scratch_k, scratch_v = rand(L, B, KV, cap, hd), rand(L, B, KV, cap, hd)
    segments = [(prefix_k[1, :, :P][None], prefix_v[1, :, :P][None], 0)]
    if S:
        segments.append((scratch_k[1, :, :, :S], scratch_v[1, :, :, :S], P))
    q = rand(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
    qpos = torch.tensor(qpos) if qpos else torch.arange(P + S - T, P + S)
    kw = dict(scale=hd**-0.5, window=window, softcap=softcap)

    def nan_workspace(rows, n_splits, *, hd, device):
        m = torch.full((rows, n_splits), float("nan"), device=device)
        return m, m.clone(), torch.full((rows, n_splits, hd), float("nan"), device=device)

    monkeypatch.setattr(sa, "_workspace", nan_workspace)
    out = torch.full((B, H, T, hd), float("nan"), dtype=dtype)
    got = sa.segment_attention_triton(q, segments, qpos, **kw, out=out, block_n=16, **c)
    assert got is out
    ref = sa.segment_attention(q, segments, qpos, **kw)
    exact = exact_attention(q, segments, qpos, **kw)
    assert_three_way(out, ref, exact=exact)


def test_attend_uses_reference_on_cpu():
    q = torch.randn(1, 2, 1, 16)
    segs = [(torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), 0)]
    qpos = torch.tensor([4])
    assert torch.equal(sa.attend(q, segs, qpos, scale=0.25), sa.segment_attention(q, segs, qpos, scale=0.25))


# static-shape attention (engine.cuda's decode/verify/encode steps) ---------------------------------

STATIC_CASES = [  # KV x G heads, T tokens, segment A: P live rows of cap_a; segment B: rows row0..row0+T of cap_b
    dict(KV=1, G=4, T=1, hd=64, P=70, cap_a=90, row0=5, cap_b=16, window=None, softcap=None, splits=(3, 2)),  # decode
    dict(KV=1, G=4, T=1, hd=64, P=70, cap_a=90, row0=5, cap_b=16, window=24, softcap=None, splits=(4, 1)),  # window
    dict(KV=2, G=2, T=6, hd=32, P=45, cap_a=64, row0=3, cap_b=16, window=16, softcap=5.0, splits=(2, 2)),  # verify
    dict(KV=2, G=2, T=2, hd=24, P=33, cap_a=40, row0=0, cap_b=8, window=None, softcap=None, splits=(5, 1)),  # odd hd
    dict(KV=2, G=1, T=8, hd=32, P=0, cap_a=0, row0=30, cap_b=60, window=None, softcap=None, splits=(0, 3)),  # encode
    dict(KV=1, G=2, T=8, hd=32, P=0, cap_a=0, row0=50, cap_b=55, window=12, softcap=None, splits=(0, 4)),  # past cap
]


def _static_id(c: dict) -> str:
    return f"kv{c['KV']}x{c['G']}-T{c['T']}-A{c['P']}-B{c['row0']}-w{c['window']}-cap{c['softcap']}"


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", STATIC_CASES, ids=[_static_id(c) for c in STATIC_CASES])
def test_static_attention(case, dtype, monkeypatch):
    c = case
    KV, G, T, hd, P, row0 = c["KV"], c["G"], c["T"], c["hd"], c["P"], c["row0"]
    H, enc = KV * G, c["cap_a"] == 0
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    L = 2  # layer views of [L, KV, cap, hd] caches, as the engine passes them
    kb_all, vb_all = rand(L, KV, c["cap_b"], hd), rand(L, KV, c["cap_b"], hd)
    seg_b = (kb_all[1], vb_all[1])
    seg_a = None if enc else (rand(L, KV, c["cap_a"], hd)[1], rand(L, KV, c["cap_a"], hd)[1])
    pos_b0 = 0 if enc else P
    meta = torch.tensor([P, pos_b0, row0, T])
    q = rand(T, H, hd)
    kw = dict(scale=hd**-0.5, window=c["window"], softcap=c["softcap"])

    def nan_workspace(rows, n_splits, *, hd, device):
        m = torch.full((rows, n_splits), float("nan"), device=device)
        return m, m.clone(), torch.full((rows, n_splits, hd), float("nan"), device=device)

    monkeypatch.setattr(sa, "_workspace", nan_workspace)
    plan = sa.static_plan(T=T, G=G, KV=KV, hd=hd, cap_a=c["cap_a"], cap_b=c["cap_b"], device="cpu")
    plan.update(n_split_a=c["splits"][0], n_split_b=c["splits"][1], block_n=16)
    out = torch.full((T, H, hd), float("nan"), dtype=dtype)
    assert sa.static_attention_triton(q, seg_a, seg_b, meta, **kw, plan=plan, out=out) is out
    ref = sa.static_attention_reference(q, seg_a, seg_b, meta, **kw)
    hi = min(row0 + T, c["cap_b"])
    segs = [] if enc else [(seg_a[0][None, :, :P], seg_a[1][None, :, :P], 0)]
    segs.append((seg_b[0][None, :, :hi], seg_b[1][None, :, :hi], pos_b0))
    qpos = torch.arange(pos_b0 + row0, pos_b0 + row0 + T)
    exact = exact_attention(q.transpose(0, 1)[None], segs, qpos, **kw)[0].transpose(0, 1)
    assert_three_way(out, ref, exact=exact)


# fused decode-step ops ------------------------------------------------------------------------------

import ghostline.kernels.fused as fu  # noqa: E402


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("offset,post,with_y", [(1.0, True, True), (1.0, False, True), (0.0, False, True), (0.0, False, False)])
def test_residual_norm(offset, post, with_y, dtype):
    gen = torch.Generator().manual_seed(7)
    T, D = 3, 80  # not a power of two
    x0 = torch.randn(T, D, generator=gen).to(dtype)
    y = torch.randn(T, D, generator=gen).to(dtype) if with_y else None
    wp = (0.1 * torch.randn(D, generator=gen)).to(dtype) if post else None
    wn = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    x_k, x_r, x_hi = x0.clone(), x0.clone(), x0.double()
    h_k = fu.residual_norm_triton(x_k, y, wp, wn, eps=1e-6, offset=offset)
    h_r = fu.residual_norm_reference(x_r, y, wp, wn, eps=1e-6, offset=offset)
    h_hi = fu.residual_norm_reference(x_hi, None if y is None else y.double(), None if wp is None else wp.double(),
                                      wn.double(), eps=1e-6, offset=offset)
    assert_three_way(h_k, h_r, exact=h_hi)
    # the residual: one rounding of x + norm(y), whose normalisation may differ by an ulp in order
    _, err, ref_err, eps = three_way(x_k, x_r, exact=x_hi)
    assert err <= 2 * ref_err + 2 * eps, f"residual error {err:.3g} > 2 * {ref_err:.3g} + 2 * {eps:.3g}"


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm,row0,valid", [(True, 3, 4), (False, 10, 2), (True, 12, 4)])  # the last runs past cap
def test_qk_rope_write(norm, row0, valid, dtype):
    gen = torch.Generator().manual_seed(row0)
    T, H, KV, hd, cap = 4, 4, 2, 32, 14
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=gen).to(dtype)
    qn = (0.1 * torch.randn(hd, generator=gen)).to(dtype) if norm else None
    kn = (0.1 * torch.randn(hd, generator=gen)).to(dtype) if norm else None
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    meta = torch.tensor([50, 50, row0, valid])
    dk0, dv0 = torch.randn(KV, cap, hd, generator=gen).to(dtype), torch.randn(KV, cap, hd, generator=gen).to(dtype)
    dk, dv, rk, rv, hk, hv = dk0.clone(), dv0.clone(), dk0.clone(), dv0.clone(), dk0.double(), dv0.double()
    kw = dict(n_heads=H, n_kv=KV, head_dim=hd, eps=1e-6)
    q_k = fu.qk_rope_write_triton(qkv, meta, inv, qn, kn, dk, dv, **kw)
    q_r = fu.qk_rope_write_reference(qkv, meta, inv, qn, kn, rk, rv, **kw)
    q_hi = fu.qk_rope_write_reference(qkv.double(), meta, inv, None if qn is None else qn.double(),
                                      None if kn is None else kn.double(), hk, hv, **kw)
    assert_three_way(q_k, q_r, exact=q_hi)
    assert_three_way(dk, rk, exact=hk)
    assert torch.equal(dv, rv)
    written = torch.zeros(cap, dtype=torch.bool)
    written[row0 : min(row0 + valid, cap)] = True
    assert not torch.equal(dk[:, written], dk0[:, written]) and torch.equal(dk[:, ~written], dk0[:, ~written])
    assert torch.equal(dv[:, ~written], dv0[:, ~written])


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
def test_act_mul(act, dtype):
    gu = torch.randn(3, 2 * 200, generator=torch.Generator().manual_seed(3)).to(dtype) * 3
    out = fu.act_mul_triton(gu, act=act, block=64)
    assert_three_way(out, fu.act_mul_reference(gu, act=act), exact=fu.act_mul_reference(gu.double(), act=act))


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act,bias", [(None, False), (None, True), ("gelu_tanh", False), ("silu", False)])
def test_gemv(act, bias, dtype):
    gen = torch.Generator().manual_seed(11)
    N, K = 37, 80  # neither a multiple of the tile
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    x = torch.randn(1, 2 * K if act else K, generator=gen).to(dtype)
    out = torch.full((1, N), float("nan"), dtype=dtype)
    assert fu.gemv_triton(x, w, b, act=act, out=out, plan=(4, 32)) is out

    def ref(x, w, b):
        return torch.nn.functional.linear(fu.act_mul_reference(x, act=act) if act else x, w, b)

    exact = ref(x.double(), w.double(), None if b is None else b.double())
    assert_three_way(out, ref(x, w, b), exact=exact)


@interpreted
@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_static_steps_with_kernels_equal_greedy(kind):
    """engine.cuda's steps with every Triton kernel (interpreted) give greedy's tokens and encode
    the model's rows."""
    from ghostline.engine.cache import KVCache, ScratchCache
    from ghostline.engine.cuda import CudaRunner
    from ghostline.engine.decoding.greedy import greedy
    from ghostline.engine.model import build
    from tests.conftest import tiny_hf

    cfg, hf = tiny_hf(kind, 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(40)
    cache.length = 40
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(40), cache)
    P = 30
    want = list(greedy(model, ScratchCache(cache, P, 19), ids[P], max_new=18))  # past the tiny Gemma's window
    r = CudaRunner(model, scratch_rows=24, verify_tokens=4, encode_buckets=(8,), kernels=True)
    assert r.kernels and not r.graphs
    assert list(r.greedy(r.scratch(cache, P, 19), ids[P], max_new=18)) == want
    g = CudaRunner(model, scratch_rows=24, kernels=True, gemv=True)  # decode products through gemv_triton
    assert list(g.greedy(g.scratch(cache, P, 19), ids[P], max_new=6)) == want[:6]
    assert r.verify(r.scratch(cache, P, 19), [ids[P]] + want[:3], P)[0][:3] == want[:3]
    new = [5, 6, 7, 8, 9]
    got, ref = cache.clone(), cache.clone()
    r.encode(got, new, 12)
    with torch.no_grad():
        model(torch.tensor([new]), torch.arange(12, 17), ref)
    assert torch.allclose(got.k[:, :, :17], ref.k[:, :, :17], atol=1e-5) and torch.equal(got.k[:, :, 17:40], cache.k[:, :, 17:40])
