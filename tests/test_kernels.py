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

import kernels.rope_shift as rs  # noqa: E402
import kernels.segment_attention as sa  # noqa: E402
from kernels.testing import exact_attention, three_way  # noqa: E402

# When conftest (through engine) imported triton before this module set TRITON_INTERPRET, the
# kernels and triton.language's own jit functions were built for compilation, and reloading the
# kernels alone is not enough. The checks then run in a child pytest with the variable set first.
INTERPRETED = isinstance(rs._rope_shift_kernel, InterpretedFunction)
interpreted = pytest.mark.skipif(not INTERPRETED, reason="checked by test_kernels_in_subprocess (TRITON_INTERPRET=1 child)")


@pytest.mark.skipif(INTERPRETED, reason="the kernel checks run in this process")
def test_kernels_in_subprocess():
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
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
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ROPE_CASES, ids=[f"{s}-{e}->{d}" for _, s, e, d in ROPE_CASES])
def test_rope_shift(case, dtype):
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
    rs.rope_shift_triton(k, v, src, end, dst, inv_freq, block=8)
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
