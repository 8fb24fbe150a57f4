"""Fused element-wise kernels for the static decode step (`engine.cuda`): the few small ops between
the matrix products of a layer, one launch each instead of ten.

- `residual_norm`: x += branch (optionally RMS-normed first: Gemma's sandwich norms), h = RMSNorm(x).
- `qk_rope_write`: split a fused q|k|v projection, QK-norm (Gemma), RoPE at device-side positions,
  write the new k/v rows into a cache at a device-side row, return q.
- `act_mul`: act(gate) * up from a fused gate|up projection (SiLU or tanh-GELU).
- `gemv_triton`: the one-token matrix-vector products, optionally reading act(gate) * up on the fly.

Each op rounds where the eager forward (`engine.model`) rounds, so in bf16 the fused step follows
the eager one closely (in fp32 the roundings are no-ops). Positions and rows come from a small
device tensor `meta` (int64: prefix length, position of the scratch's row 0, first row, valid rows),
so one captured CUDA graph serves every step. Reference first, then the kernels and launchers;
the public functions pick the kernel on CUDA and the reference elsewhere (or when `kernel` says).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ghostline.kernels.rope_shift import apply_rope, rope_cos_sin

META_LEN_A, META_POS_B0, META_ROW0, META_VALID = range(4)


# references ---------------------------------------------------------------------------------------


def _norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """`engine.model.RMSNorm` exactly: fp32 statistics; Gemma scales by (1 + w) in fp32, Llama by w.
    (float64 inputs stay float64, so the same function is the tests' oracle.)"""
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (h * (offset + w.to(acc))).type_as(x)
    return w * h.type_as(x)


def residual_norm_reference(x, y, w_post, w_next, *, eps: float, offset: float) -> torch.Tensor:
    """In place on x [T, D]: x += norm(y; w_post) (or y when w_post is None; nothing when y is None).
    Returns h = norm(x; w_next) [T, D]."""
    if y is not None:
        x.copy_(x + (_norm_ref(y, w_post, eps, offset) if w_post is not None else y))
    return _norm_ref(x, w_next, eps, offset)


def qk_rope_write_reference(qkv, meta, inv_freq, q_norm, k_norm, dest_k, dest_v, *, n_heads: int, n_kv: int,
                            head_dim: int, eps: float) -> torch.Tensor:
    """qkv [T, (H + 2 KV) hd] -> q [T, H, hd] (normed, rotated); k (normed, rotated) and v rows go to
    dest_k/dest_v [KV, cap, hd] at rows meta[ROW0] + t for t < meta[VALID] (and inside the capacity).
    The reference reads `meta` on the host (free on the CPU); the kernel reads it on the device."""
    T = qkv.shape[0]
    H, KV, hd = n_heads, n_kv, head_dim
    q = qkv[:, : H * hd].view(T, H, hd).transpose(0, 1)  # [H, T, hd], as the eager forward's layout
    k = qkv[:, H * hd : (H + KV) * hd].view(T, KV, hd).transpose(0, 1)
    v = qkv[:, (H + KV) * hd :].view(T, KV, hd).transpose(0, 1)
    if q_norm is not None:
        q, k = _norm_ref(q, q_norm, eps, 1.0), _norm_ref(k, k_norm, eps, 1.0)
    _, pos_b0, row0, valid = (int(m) for m in meta.tolist())
    pos = torch.arange(pos_b0 + row0, pos_b0 + row0 + T, device=qkv.device)
    cos, sin = rope_cos_sin(pos, inv_freq, dtype=qkv.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n = max(0, min(valid, T, dest_k.shape[1] - row0))
    dest_k[:, row0 : row0 + n] = k[:, :n]
    dest_v[:, row0 : row0 + n] = v[:, :n]
    return q.transpose(0, 1).contiguous()


def act_mul_reference(gu: torch.Tensor, *, act: str) -> torch.Tensor:
    """gu [T, 2F] (gate | up) -> act(gate) * up [T, F], as `engine.model.MLP`."""
    g, u = gu.chunk(2, dim=-1)
    g = F.gelu(g, approximate="tanh") if act == "gelu_tanh" else F.silu(g)
    return g * u


try:  # Triton is optional at run time: the references serve every device without it.
    import triton
    import triton.language as tl

    from ghostline.kernels.segment_attention import _target_programs, _tanh
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def _rnd(x, DT: tl.constexpr):
        """fp32 x rounded to DT (and back), to nearest even. bf16 by bit arithmetic: the interpreter
        truncates in `.to(bfloat16)`, compiled code rounds; this is the same in both."""
        if DT == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
            return b.to(tl.float32, bitcast=True)
        elif DT == tl.float32:
            return x
        else:
            return x.to(DT).to(tl.float32)

    @triton.jit
    def _rms(x, w, eps, D: tl.constexpr, OFFSET: tl.constexpr, DT: tl.constexpr):
        """RMSNorm of a masked row x (fp32, zeros past D) with weights w (fp32), rounded like the eager
        module: Gemma (OFFSET) rounds once, Llama rounds h before the product and after it."""
        r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        h = x * r
        if OFFSET:
            return _rnd(h * (1.0 + w), DT)
        return _rnd(w * _rnd(h, DT), DT)

    @triton.jit
    def _residual_norm_kernel(
        x_ptr, y_ptr, wp_ptr, wn_ptr, h_ptr, eps, sx, sy, sh,
        D: tl.constexpr, BLOCK: tl.constexpr, HAS_Y: tl.constexpr, HAS_POST: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """One program per row: x += [norm](y); h = norm(x)."""
        t = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK)
        ok = d < D
        DT = h_ptr.dtype.element_ty
        x = tl.load(x_ptr + t * sx + d, mask=ok, other=0.0).to(tl.float32)
        if HAS_Y:
            y = tl.load(y_ptr + t * sy + d, mask=ok, other=0.0).to(tl.float32)
            if HAS_POST:
                wp = tl.load(wp_ptr + d, mask=ok, other=0.0).to(tl.float32)
                y = _rms(y, wp, eps, D, OFFSET, DT)
            x = _rnd(x + y, DT)
            tl.store(x_ptr + t * sx + d, x.to(DT), mask=ok)
        wn = tl.load(wn_ptr + d, mask=ok, other=0.0).to(tl.float32)
        h = _rms(x, wn, eps, D, OFFSET, DT)
        tl.store(h_ptr + t * sh + d, h.to(DT), mask=ok)  # h is already rounded

    @triton.jit
    def _qk_rope_write_kernel(
        qkv_ptr, meta_ptr, inv_ptr, qn_ptr, kn_ptr, q_ptr, k_ptr, v_ptr, eps, cap,
        s_qkv, s_qt, s_qh, s_kh, s_ks,
        H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr, HAS_NORM: tl.constexpr,
    ):
        """One program per (token, head of q|k|v): norm + rotate q/k heads, write q out and k/v rows
        into the cache at meta[ROW0] + t (rows t >= meta[VALID] or past the capacity are skipped)."""
        t = tl.program_id(0)
        j = tl.program_id(1)
        c = tl.arange(0, HALF)
        DT = q_ptr.dtype.element_ty
        base = qkv_ptr + t.to(tl.int64) * s_qkv + j * (2 * HALF)
        x1 = tl.load(base + c).to(tl.float32)
        x2 = tl.load(base + HALF + c).to(tl.float32)
        row = tl.load(meta_ptr + 2) + t
        write = (t < tl.load(meta_ptr + 3)) & (row < cap)
        wmask = c < tl.where(write, HALF, 0)  # a vector mask (the interpreter mishandles scalar & vector)
        if j < H + KV:
            if HAS_NORM:
                if j < H:
                    w1 = tl.load(qn_ptr + c).to(tl.float32)
                    w2 = tl.load(qn_ptr + HALF + c).to(tl.float32)
                else:
                    w1 = tl.load(kn_ptr + c).to(tl.float32)
                    w2 = tl.load(kn_ptr + HALF + c).to(tl.float32)
                r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
                x1 = _rnd(x1 * r * (1.0 + w1), DT)
                x2 = _rnd(x2 * r * (1.0 + w2), DT)
            pos = (tl.load(meta_ptr + 1) + row).to(tl.float32)
            ang = pos * tl.load(inv_ptr + c)
            cs = _rnd(tl.cos(ang), DT)
            sn = _rnd(tl.sin(ang), DT)
            o1 = _rnd(_rnd(x1 * cs, DT) + _rnd(-x2 * sn, DT), DT).to(DT)
            o2 = _rnd(_rnd(x2 * cs, DT) + _rnd(x1 * sn, DT), DT).to(DT)
            if j < H:
                qo = q_ptr + t.to(tl.int64) * s_qt + j * s_qh
                tl.store(qo + c, o1)
                tl.store(qo + HALF + c, o2)
            else:
                ko = k_ptr + (j - H).to(tl.int64) * s_kh + row.to(tl.int64) * s_ks
                tl.store(ko + c, o1, mask=wmask)
                tl.store(ko + HALF + c, o2, mask=wmask)
        else:
            vo = v_ptr + (j - H - KV).to(tl.int64) * s_kh + row.to(tl.int64) * s_ks
            tl.store(vo + c, x1.to(DT), mask=wmask)
            tl.store(vo + HALF + c, x2.to(DT), mask=wmask)

    @triton.jit
    def _act_mul_kernel(gu_ptr, out_ptr, F_DIM, s_gu, s_out, BLOCK: tl.constexpr, GELU: tl.constexpr):
        """One program per (token, block of the hidden width): act(gate) * up."""
        t = tl.program_id(0).to(tl.int64)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = f < F_DIM
        DT = out_ptr.dtype.element_ty
        g = tl.load(gu_ptr + t * s_gu + f, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + t * s_gu + F_DIM + f, mask=ok, other=0.0).to(tl.float32)
        if GELU:
            a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
        else:
            a = g / (1.0 + tl.exp(-g))
        a = _rnd(a, DT)
        tl.store(out_ptr + t * s_out + f, _rnd(a * u, DT).to(DT), mask=ok)


    @triton.jit  # K specialised (divisible by 16 in practice): the masked loads of W stay 16-byte wide
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, N, K, s_wn,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    ):
        """y [N] = x [K] @ W[N, K]^T (+ b) for one token, fp32 accumulation; one program per BLOCK_N
        outputs, streaming its rows of W in [BLOCK_N, BLOCK_K] tiles. ACT (1 tanh-GELU, 2 SiLU)
        reads x as a gate|up row [2K] and feeds act(gate) * up, rounded as `act_mul` rounds."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        DT = y_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            if ACT == 0:
                xk = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            else:
                g = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
                u = tl.load(x_ptr + K + k, mask=k_ok, other=0.0).to(tl.float32)
                if ACT == 1:
                    a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
                else:
                    a = g / (1.0 + tl.exp(-g))
                xk = _rnd(_rnd(a, DT) * u, DT)
            w = tl.load(w_ptr + n.to(tl.int64)[:, None] * s_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xk[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, _rnd(acc, DT).to(DT), mask=n_ok)


# launchers ----------------------------------------------------------------------------------------


def residual_norm_triton(x, y, w_post, w_next, *, eps: float, offset: float, out: torch.Tensor | None = None):
    T, D = x.shape
    assert x.stride(-1) == 1 and (y is None or y.stride(-1) == 1)
    h = out if out is not None else torch.empty_like(x)
    _residual_norm_kernel[(T,)](
        x, y if y is not None else x, w_post if w_post is not None else w_next, w_next, h, float(eps),
        x.stride(0), y.stride(0) if y is not None else 0, h.stride(0),
        D=D, BLOCK=triton.next_power_of_2(D), HAS_Y=y is not None, HAS_POST=w_post is not None, OFFSET=bool(offset),
        num_warps=4 if D <= 2048 else 8,
    )
    return h


def qk_rope_write_triton(qkv, meta, inv_freq, q_norm, k_norm, dest_k, dest_v, *, n_heads: int, n_kv: int,
                         head_dim: int, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    T = qkv.shape[0]
    half = head_dim // 2
    assert half & (half - 1) == 0, "head_dim/2 must be a power of two"
    assert qkv.stride(-1) == 1 and dest_k.stride() == dest_v.stride() and dest_k.stride(-1) == 1
    q = out if out is not None else torch.empty(T, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _qk_rope_write_kernel[(T, n_heads + 2 * n_kv)](
        qkv, meta, inv_freq, q_norm if q_norm is not None else inv_freq, k_norm if k_norm is not None else inv_freq,
        q, dest_k, dest_v, float(eps), dest_k.shape[1],
        qkv.stride(0), q.stride(0), q.stride(1), dest_k.stride(0), dest_k.stride(1),
        H=n_heads, KV=n_kv, HALF=half, HAS_NORM=q_norm is not None, num_warps=1 if half <= 64 else 2,
    )
    return q


def act_mul_triton(gu: torch.Tensor, *, act: str, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    T, F2 = gu.shape
    f = F2 // 2
    o = out if out is not None else torch.empty(T, f, dtype=gu.dtype, device=gu.device)
    _act_mul_kernel[(T, triton.cdiv(f, block))](gu, o, f, gu.stride(0), o.stride(0), BLOCK=block, GELU=act == "gelu_tanh")
    return o


def gemv_plan(N: int, K: int, *, programs: int = 264, tile: int = 8192) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): enough programs to cover the device (~2 per SM), tiles of ~`tile` weights."""
    block_n = 1
    while block_n < 64 and N // (2 * block_n) >= programs:
        block_n *= 2
    block_k = max(64, min(triton.next_power_of_2(K), tile // block_n))
    return block_n, block_k


def gemv_triton(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, act: str | None = None,
                out: torch.Tensor | None = None, plan: tuple[int, int] | None = None) -> torch.Tensor:
    """x [1, K] (or a gate|up row [1, 2K] with `act`) @ w [N, K]^T (+ b) -> [1, N]: the decode step's
    matrix-vector products (cuBLAS spends several microseconds on each small one)."""
    N, K = w.shape
    assert x.shape[0] == 1 and x.stride(-1) == 1 and w.stride(-1) == 1
    assert x.shape[-1] == (2 * K if act else K)
    y = out if out is not None else torch.empty(1, N, dtype=x.dtype, device=x.device)
    if plan is None:
        programs = _target_programs(x.device) // 2  # ~2 per SM on CUDA (cached), a few elsewhere
        plan = gemv_plan(N, K, programs=programs)
    block_n, block_k = plan
    ACT = {None: 0, "gelu_tanh": 1, "silu": 2}[act]
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x, w, b if b is not None else w, y, N, K, w.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=b is not None, ACT=ACT, num_warps=4,
    )
    return y


# dispatch -----------------------------------------------------------------------------------------


def use_kernel(t: torch.Tensor, kernel: bool | None) -> bool:
    """The kernel on CUDA (or when `kernel` is True, e.g. under TRITON_INTERPRET=1), else the reference."""
    if kernel is None:
        kernel = t.is_cuda
    return bool(kernel) and triton is not None


def residual_norm(x, y, w_post, w_next, *, eps: float, offset: float, kernel: bool | None = None):
    if use_kernel(x, kernel):
        return residual_norm_triton(x, y, w_post, w_next, eps=eps, offset=offset)
    return residual_norm_reference(x, y, w_post, w_next, eps=eps, offset=offset)


def qk_rope_write(qkv, meta, inv_freq, q_norm, k_norm, dest_k, dest_v, *, n_heads, n_kv, head_dim, eps,
                  kernel: bool | None = None):
    fn = qk_rope_write_triton if use_kernel(qkv, kernel) else qk_rope_write_reference
    return fn(qkv, meta, inv_freq, q_norm, k_norm, dest_k, dest_v, n_heads=n_heads, n_kv=n_kv, head_dim=head_dim, eps=eps)


def act_mul(gu: torch.Tensor, *, act: str, kernel: bool | None = None) -> torch.Tensor:
    if use_kernel(gu, kernel):
        return act_mul_triton(gu, act=act)
    return act_mul_reference(gu, act=act)
