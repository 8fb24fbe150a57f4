"""Attention of a few query tokens over several key segments (a document prefix view, a scratch area).

Each segment is `(K, V, start)`: keys/values [B|1, KV, S, hd] at contiguous positions start..start+S-1.
Scores of all segments are normalised together, which equals merging per-segment results by
log-sum-exp. Causal, optional sliding window (a key is seen when qpos - window < kpos <= qpos), GQA
without repeating keys.

Reference first (`segment_attention`, also the path for CPU decode steps and several segments),
torch's fused attention for CPU prefill chunks over one segment (`flash_attention`), then the Triton
kernel for decode/verify steps (a split-K partial pass and a log-sum-exp combine) and its launcher;
`attend` picks the kernel on CUDA for up to MAX_QUERY_TOKENS query tokens, `flash_attention` for
longer CPU chunks, the reference elsewhere.
Last, the static-shape variant for captured CUDA graphs (`static_attention`, used by `engine.cuda`):
batch 1, a prefix segment and a scratch segment whose lengths and positions are read on the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ghostline.kernels import step


def _key_range(n: int, start: int, q_lo: int, q_hi: int, window: int | None) -> tuple[int, int]:
    """Rows [lo, hi) of a segment of n keys at positions start.. that queries at q_lo..q_hi may see."""
    lo = max(0, q_lo - window + 1 - start) if window else 0
    return lo, min(n, q_hi - start + 1)


def _allowed(kpos: torch.Tensor, qp: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Q, S]: whether the query at position qp[i] sees the key at kpos[j] (causal, optional window)."""
    allowed = kpos[None, :] <= qp[:, None]
    if window:
        allowed &= kpos[None, :] > qp[:, None] - window
    return allowed


def segment_attention(
    q: torch.Tensor,
    segments: list[tuple[torch.Tensor, torch.Tensor, int]],
    qpos: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [B, H, T, hd] at positions qpos [T] -> [B, H, T, hd]."""
    B, H, T, hd = q.shape
    KV = segments[0][0].shape[1]
    G = H // KV
    qg = q.reshape(B, KV, G * T, hd)  # head h = kv * G + g
    q_lo, q_hi = int(qpos.min()), int(qpos.max())  # host positions: no device sync
    qp = qpos.to(q.device, non_blocking=True).repeat(G) if q_lo != q_hi else None  # [G*T] each query row's position
    scores, values = [], []
    for K, V, start in segments:
        lo, hi = _key_range(K.shape[2], start, q_lo, q_hi, window)
        if hi <= lo:
            continue
        Ks, Vs = K[:, :, lo:hi], V[:, :, lo:hi]
        s = torch.matmul(qg, Ks.transpose(-1, -2)) * scale  # [B, KV, G*T, S]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if q_lo == q_hi:  # one query position (a decode step): lo..hi already holds exactly the keys it sees
            scores.append(s)
        else:
            kpos = torch.arange(start + lo, start + hi, device=q.device)
            scores.append(s.masked_fill(~_allowed(kpos, qp, window), float("-inf")))
        values.append(Vs)
    p = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out, off = None, 0
    for Vs in values:
        n = Vs.shape[2]
        part = torch.matmul(p[..., off : off + n], Vs)
        out = part if out is None else out + part
        off += n
    return out.reshape(B, KV, G, T, hd).reshape(B, H, T, hd)


try:  # Triton is optional at run time: the reference serves every device without it.
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

MAX_QUERY_TOKENS = 16  # `attend` uses the kernel for decode/verify steps up to this many tokens


if triton is not None:

    @triton.jit
    def _tanh(x):
        """tanh from core ops (Triton has no tl.tanh, and libdevice does not run in the interpreter):
        an odd Taylor polynomial near 0, where (1 - e) / (1 + e) would cancel, that form elsewhere.
        Within 3e-7 relative in fp32."""
        a = tl.abs(x)
        e = tl.exp(-2.0 * a)
        x2 = a * a
        poly = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
        t = tl.where(a < 0.25, poly, (1.0 - e) / (1.0 + e))
        return tl.where(x < 0, -t, t)

    @triton.jit(do_not_specialize=["T", "n_rows", "start", "lo", "hi", "blocks_per_split", "split_off", "n_splits", "window"])
    def _segment_partial_kernel(
        q_ptr, k_ptr, v_ptr, qpos_ptr, m_ptr, l_ptr, acc_ptr,
        T, n_rows, start, lo, hi, blocks_per_split, split_off, n_splits, scale, softcap, window,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
        HD: tl.constexpr, G: tl.constexpr, H: tl.constexpr, ROWS_PER_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One program per (batch group * row block, kv head, split): the query rows that share kv head
        `kvh` (all G heads x T tokens, and all batches when the keys are shared) against keys
        lo + [split * blocks_per_split * BLOCK_N, ...) of one segment, online softmax in the log2
        domain. Writes the split's row max m, sum l and unnormalised output acc, for the combine.
        UPCAST feeds tl.dot fp32 copies of the operands (exact for bf16): the interpreter cannot
        compute in bf16."""
        pid_r, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_mblocks = tl.cdiv(n_rows, BLOCK_M)
        bgrp, mblk = pid_r // n_mblocks, pid_r % n_mblocks
        r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] row within the group: (b_local, g, t)
        row_ok = r < n_rows
        b = bgrp * ROWS_PER_B + r // (G * T)
        g = (r // T) % G
        t = r % T
        h = kvh * G + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        q_off = b.to(tl.int64) * sq_b + h * sq_h + t * sq_t
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qp = tl.load(qpos_ptr + t, mask=row_ok, other=0)  # [BLOCK_M] query positions
        k_base = k_ptr + bgrp.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h
        v_base = v_ptr + bgrp.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        first = lo + split * blocks_per_split * BLOCK_N
        for i in range(blocks_per_split):
            n = first + i * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows of the segment
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_base + n.to(tl.int64)[:, None] * sk_s + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale  # [BLOCK_M, BLOCK_N]
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            s = s * 1.4426950408889634  # log2(e): exp2 below
            kpos = start + n
            ok = n_ok[None, :] & row_ok[:, None] & (kpos[None, :] <= qp[:, None])
            if HAS_WINDOW:
                ok = ok & (kpos[None, :] > qp[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            vt = tl.load(v_base + n.to(tl.int64)[:, None] * sv_s + d[None, :], mask=kv_mask, other=0.0)
            pv = p.to(vt.dtype)  # the same rounding as the reference's p @ V
            if UPCAST:
                pv, vt = pv.to(tl.float32), vt.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision=PREC)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out_row = (b.to(tl.int64) * H + h) * T + t  # row of the flattened [B, H, T] output
        ws = out_row * n_splits + split_off + split
        tl.store(m_ptr + ws, m_i, mask=row_ok)
        tl.store(l_ptr + ws, l_i, mask=row_ok)
        tl.store(acc_ptr + ws[:, None] * HD + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _segment_combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, H, T, so_b, so_h, so_t,
        HD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per output row (b, h, t): merge the splits' partial softmaxes by log-sum-exp."""
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        m_all = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            m_all = tl.maximum(m_all, tl.load(m_ptr + row * n_splits + sp, mask=sp < n_splits, other=float("-inf")))
        m = tl.max(m_all, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            sp_ok = sp < n_splits
            w = tl.exp2(tl.load(m_ptr + row * n_splits + sp, mask=sp_ok, other=float("-inf")) - m_safe)  # [BLOCK_S]
            l_sum += w * tl.load(l_ptr + row * n_splits + sp, mask=sp_ok, other=0.0)
            a = tl.load(acc_ptr + (row * n_splits + sp)[:, None] * HD + d[None, :], mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(a * w[:, None], 0)
        out = acc / tl.sum(l_sum, 0)
        b, h, t = row // (H * T), (row // T) % H, row % T
        tl.store(out_ptr + b * so_b + h * so_h + t * so_t + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


    @triton.jit(do_not_specialize=["T", "n_rows", "cap_a", "cap_b", "n_split_a", "n_split_b", "window"])
    def _static_partial_kernel(
        q_ptr, ka_ptr, va_ptr, kb_ptr, vb_ptr, meta_ptr, m_ptr, l_ptr, acc_ptr,
        T, n_rows, cap_a, cap_b, n_split_a, n_split_b, scale, softcap, window,
        sq_t, sq_h, ska_h, ska_s, skb_h, skb_s,
        HD: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """The static-shape decode/verify attention (batch 1): one program per (row block, kv head,
        split). Splits [0, n_split_a) cover segment A (rows [0, meta[0]) of a prefix cache at
        positions 0..), the rest segment B (rows [0, meta[2] + T) of a scratch area, or of the
        document cache itself when encoding, at positions meta[1]..). Lengths, positions and the
        window's lower bound are read on the device, and each segment's live blocks are spread over
        its splits at run time, so the grid and every argument stay fixed across steps (CUDA
        graphs) while only the live rows are read. Keys and values of A and B share a layout."""
        pid_r, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        len_a = tl.load(meta_ptr).to(tl.int32)
        pos_b0 = tl.load(meta_ptr + 1).to(tl.int32)
        row0 = tl.load(meta_ptr + 2).to(tl.int32)
        q_lo = pos_b0 + row0  # position of query token 0; token t is at q_lo + t
        r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)  # rows (g, t)
        row_ok = r < n_rows
        g = r // T
        t = r % T
        h = kvh * G + g
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HD
        q_off = t.to(tl.int64) * sq_t + h * sq_h
        q = tl.load(q_ptr + q_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qp = q_lo + t
        w_lo = q_lo - window + 1  # lowest position the first query sees (HAS_WINDOW only)
        if split < n_split_a:
            k_base = ka_ptr + kvh.to(tl.int64) * ska_h
            v_base = va_ptr + kvh.to(tl.int64) * ska_h
            s_s = ska_s
            start = len_a * 0
            lo = len_a * 0
            if HAS_WINDOW:
                lo = tl.maximum(w_lo, 0)
            hi = tl.minimum(len_a, cap_a)
            s_idx = split
            n_split = n_split_a
        else:
            k_base = kb_ptr + kvh.to(tl.int64) * skb_h
            v_base = vb_ptr + kvh.to(tl.int64) * skb_h
            s_s = skb_s
            start = pos_b0
            lo = len_a * 0
            if HAS_WINDOW:
                lo = tl.maximum(w_lo - pos_b0, 0)
            hi = tl.minimum(row0 + T, cap_b)
            s_idx = split - n_split_a
            n_split = n_split_b
        blocks = tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 0)
        per = tl.cdiv(blocks, n_split)
        b_first = s_idx * per
        b_last = tl.minimum(b_first + per, blocks)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for i in range(b_first, b_last):
            n = lo + i * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_base + n.to(tl.int64)[:, None] * s_s + d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
            if HAS_SOFTCAP:
                s = softcap * _tanh(s / softcap)
            s = s * 1.4426950408889634
            kpos = start + n
            ok = n_ok[None, :] & row_ok[:, None] & (kpos[None, :] <= qp[:, None])
            if HAS_WINDOW:
                ok = ok & (kpos[None, :] > qp[:, None] - window)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            vt = tl.load(v_base + n.to(tl.int64)[:, None] * s_s + d[None, :], mask=kv_mask, other=0.0)
            pv = p.to(vt.dtype)
            if UPCAST:
                pv, vt = pv.to(tl.float32), vt.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision=PREC)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        n_splits = n_split_a + n_split_b
        out_row = h * T + t  # row of the flattened [H, T] output
        ws = out_row * n_splits + split
        tl.store(m_ptr + ws, m_i, mask=row_ok)
        tl.store(l_ptr + ws, l_i, mask=row_ok)
        tl.store(acc_ptr + ws[:, None] * HD + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _static_combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr, n_splits, so_h, so_t, T,
        HD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DC: tl.constexpr,
    ):
        """Merge the splits' partial softmaxes (log-sum-exp) for one output row (h, t) and one chunk
        of BLOCK_DC dims: the static path's many splits are read in wide tiles by several programs
        per row, not in a long serial loop by one."""
        row = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_DC + tl.arange(0, BLOCK_DC)
        d_ok = d < HD
        m = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            m = tl.maximum(m, tl.load(m_ptr + row * n_splits + sp, mask=sp < n_splits, other=float("-inf")))
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        l_sum = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([BLOCK_DC], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            sp = s0 + tl.arange(0, BLOCK_S)
            sp_ok = sp < n_splits
            w = tl.exp2(tl.load(m_ptr + row * n_splits + sp, mask=sp_ok, other=float("-inf")) - m_safe)
            l_sum += w * tl.load(l_ptr + row * n_splits + sp, mask=sp_ok, other=0.0)
            a = tl.load(acc_ptr + (row * n_splits + sp)[:, None] * HD + d[None, :], mask=sp_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(a * w[:, None], 0)
        out = acc / tl.sum(l_sum, 0)
        h, t = row // T, row % T
        tl.store(out_ptr + h * so_h + t * so_t + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)

def _workspace(rows: int, n_splits: int, *, hd: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial results m, l [rows, n_splits] and acc [rows, n_splits, hd] (fp32); every entry is written."""
    m = torch.empty(rows, n_splits, dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty(rows, n_splits, hd, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    """About how many programs keep the device busy: a few per SM on CUDA, a handful elsewhere."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def segment_attention_triton(
    q: torch.Tensor,
    segments: list[tuple[torch.Tensor, torch.Tensor, int]],
    qpos: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    max_rows: int = 64,
    programs: int | None = None,
) -> torch.Tensor:
    """Launcher, same contract as `segment_attention`: q [B, H, T, hd] at qpos [T] -> [B, H, T, hd].

    Per segment, one partial launch over (batch group * row block, kv head, split of keys), then one
    combine. A segment with batch 1 is shared: all B batches' rows go to the same program, so its
    keys are read once. `block_n`, `max_rows` (rows per program) and `programs` (target grid size)
    are tuning knobs; `out` may be given to write in place.
    """
    B, H, T, hd = q.shape
    KV = segments[0][0].shape[1]
    G = H // KV
    assert G * KV == H, "query heads must be a multiple of kv heads"
    assert q.stride(-1) == 1, "q needs a unit last stride"
    q_lo, q_hi = int(qpos.min()), int(qpos.max())  # free when qpos is on the host, as the model passes it
    qpos_dev = qpos.to(device=q.device, dtype=torch.int32, non_blocking=True)
    if out is None:
        out = torch.empty(B, H, T, hd, dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(hd))
    block_n = block_n or (64 if block_d <= 128 else 32)
    target = programs or _target_programs(q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # no TF32 rounding of fp32 inputs
    upcast = isinstance(_segment_partial_kernel, InterpretedFunction)  # TRITON_INTERPRET=1 at import
    plans = []
    for K, V, start in segments:
        assert K.stride(-1) == 1 and V.stride(-1) == 1, "segments need a unit last stride"
        lo, hi = _key_range(K.shape[2], start, q_lo, q_hi, window)
        if hi <= lo:
            continue
        shared = K.shape[0] == 1 and B > 1 and G * T * B <= max_rows
        rows_per_b = B if shared else 1
        n_rows = rows_per_b * G * T
        block_m = max(16, triton.next_power_of_2(min(n_rows, max_rows)))
        n_rb = (B // rows_per_b) * triton.cdiv(n_rows, block_m)
        blocks = triton.cdiv(hi - lo, block_n)
        n_split = max(1, min(blocks, target // (n_rb * KV)))
        per_split = triton.cdiv(blocks, n_split)
        n_split = triton.cdiv(blocks, per_split)
        plans.append((K, V, start, lo, hi, rows_per_b, n_rows, block_m, n_rb, per_split, n_split))
    n_splits = sum(p[-1] for p in plans)
    m_ws, l_ws, acc_ws = _workspace(B * H * T, n_splits, hd=hd, device=q.device)
    split_off = 0
    for K, V, start, lo, hi, rows_per_b, n_rows, block_m, n_rb, per_split, n_split in plans:
        kb = 0 if K.shape[0] == 1 else K.stride(0)
        vb = 0 if V.shape[0] == 1 else V.stride(0)
        _segment_partial_kernel[(n_rb, KV, n_split)](
            q, K, V, qpos_dev, m_ws, l_ws, acc_ws,
            T, n_rows, start, lo, hi, per_split, split_off, n_splits,
            float(scale), float(softcap or 1.0), int(window or 0),
            q.stride(0), q.stride(1), q.stride(2), kb, K.stride(1), K.stride(2), vb, V.stride(1), V.stride(2),
            HD=hd, G=G, H=H, ROWS_PER_B=rows_per_b, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap), PREC=prec, UPCAST=upcast,
        )
        split_off += n_split
    _segment_combine_kernel[(B * H * T,)](
        m_ws, l_ws, acc_ws, out, n_splits, H, T, out.stride(0), out.stride(1), out.stride(2),
        HD=hd, BLOCK_S=16, BLOCK_D=block_d,
    )
    return out



def static_attention_reference(q, seg_a, seg_b, meta, *, scale: float, window=None, softcap=None) -> torch.Tensor:
    """The static step's attention through `segment_attention`: q [T, H, hd] over segment A (k, v
    [KV, capA, hd], rows [0, meta[0]) at positions 0..; None for none) and segment B (rows
    [0, meta[2] + T) at positions meta[1]..) -> [T, H, hd]. Reads `meta` on the host (not for capture)."""
    T = q.shape[0]
    len_a, pos_b0, row0 = (int(m) for m in meta[:3].tolist())
    segments = []
    if seg_a is not None and len_a > 0:
        segments.append((seg_a[0][:, :len_a][None], seg_a[1][:, :len_a][None], 0))
    hi = min(row0 + T, seg_b[0].shape[1])
    segments.append((seg_b[0][:, :hi][None], seg_b[1][:, :hi][None], pos_b0))
    qpos = torch.arange(pos_b0 + row0, pos_b0 + row0 + T, device=q.device)
    out = segment_attention(q.transpose(0, 1)[None], segments, qpos, scale=scale, window=window, softcap=softcap)
    return out[0].transpose(0, 1)


def static_plan(*, T: int, G: int, KV: int, hd: int, cap_a: int, cap_b: int, device) -> dict:
    """Fixed launch shapes for `static_attention_triton`: rows per program, key block, and each
    segment's number of splits (from its capacity; live blocks are spread over them at run time)."""
    n_rows = G * T
    block_d = max(16, triton.next_power_of_2(hd))
    block_n = 64 if block_d <= 128 else 32
    block_m = max(16, triton.next_power_of_2(min(n_rows, 64)))
    n_rb = triton.cdiv(n_rows, block_m)
    target = max(1, 2 * _target_programs(torch.device(device)) // 4 // (n_rb * KV))  # ~2 programs per SM
    min_keys = 4 * block_n  # a split reads at least this many keys when the segment is full

    def splits(cap: int) -> int:
        return 0 if cap <= 0 else max(1, min(triton.cdiv(cap, min_keys), target))

    return dict(n_rows=n_rows, block_d=block_d, block_n=block_n, block_m=block_m, n_rb=n_rb,
                n_split_a=splits(cap_a), n_split_b=splits(cap_b))


def static_attention_triton(q, seg_a, seg_b, meta, *, scale: float, window=None, softcap=None, plan=None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher of the static-shape attention: same contract as `static_attention_reference`, two
    launches (partial over both segments, combine), every shape fixed by the capacities."""
    T, H, hd = q.shape
    kb, vb = seg_b
    KV = kb.shape[0]
    G = H // KV
    assert G * KV == H and q.stride(-1) == 1 and kb.stride(-1) == 1 and vb.stride() == kb.stride()
    ka, va = seg_a if seg_a is not None else seg_b
    assert ka.stride() == va.stride() and ka.stride(-1) == 1
    cap_a = ka.shape[1] if seg_a is not None else 0
    p = plan or static_plan(T=T, G=G, KV=KV, hd=hd, cap_a=cap_a, cap_b=kb.shape[1], device=q.device)
    n_splits = p["n_split_a"] + p["n_split_b"]
    m_ws, l_ws, acc_ws = _workspace(H * T, n_splits, hd=hd, device=q.device)
    if out is None:
        out = torch.empty(T, H, hd, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    upcast = isinstance(_static_partial_kernel, InterpretedFunction)
    _static_partial_kernel[(p["n_rb"], KV, n_splits)](
        q, ka, va, kb, vb, meta, m_ws, l_ws, acc_ws,
        T, p["n_rows"], cap_a, kb.shape[1], p["n_split_a"], p["n_split_b"],
        float(scale), float(softcap or 1.0), int(window or 0),
        q.stride(0), q.stride(1), ka.stride(0), ka.stride(1), kb.stride(0), kb.stride(1),
        HD=hd, G=G, BLOCK_M=p["block_m"], BLOCK_N=p["block_n"], BLOCK_D=p["block_d"],
        HAS_WINDOW=bool(window), HAS_SOFTCAP=bool(softcap), PREC=prec, UPCAST=upcast,
    )
    block_s = min(128, max(16, triton.next_power_of_2(n_splits)))
    block_dc = min(p["block_d"], max(16, 8192 // block_s))  # a [BLOCK_S, BLOCK_DC] fp32 tile of at most 32 KB
    _static_combine_kernel[(H * T, triton.cdiv(hd, block_dc))](
        m_ws, l_ws, acc_ws, out, n_splits, out.stride(1), out.stride(0), T,
        HD=hd, BLOCK_S=block_s, BLOCK_DC=block_dc,
    )
    return out


def static_attention(q, seg_a, seg_b, meta, *, scale: float, window=None, softcap=None, plan=None,
                     kernel: bool | None = None) -> torch.Tensor:
    """The static-shape attention: the kernel on CUDA (or when `kernel` is True), the reference elsewhere."""
    if (q.is_cuda if kernel is None else kernel) and triton is not None:
        return static_attention_triton(q, seg_a, seg_b, meta, scale=scale, window=window, softcap=softcap, plan=plan)
    return static_attention_reference(q, seg_a, seg_b, meta, scale=scale, window=window, softcap=softcap)


def flash_attention(q: torch.Tensor, segment: tuple[torch.Tensor, torch.Tensor, int], qpos: torch.Tensor, *,
                    scale: float, window: int | None = None, bf16: bool = False) -> torch.Tensor:
    """`segment_attention` over one segment through torch's fused attention (on the CPU a blocked
    flash attention: no [T, S] score matrix, no mask over it, GQA without repeating keys). Equal to
    the reference within fp32 rounding and 1.2-1.7x faster on prefill chunks here, most on long
    documents; no softcap. `bf16` allows `kernels.step.prefill_attention` where it runs (products of
    bf16-rounded q, k, v and probabilities, fp32 sums: 2-2.8x faster again; the error of torch's
    attention over bf16-rounded inputs)."""
    K, V, start = segment
    if window and len(qpos) > 1:  # queries far apart (an edit's hunks): each run reads its own window
        cuts = (torch.nonzero(qpos[1:] - qpos[:-1] > window).flatten() + 1).tolist()
        if cuts:
            bounds = [0, *cuts, len(qpos)]
            return torch.cat([flash_attention(q[:, :, a:b], segment, qpos[a:b], scale=scale, window=window, bf16=bf16)
                              for a, b in zip(bounds, bounds[1:])], dim=2)
    lo, hi = _key_range(K.shape[2], start, int(qpos.min()), int(qpos.max()), window)
    if bf16:
        out = step.prefill_attention(q, K, V, start, lo, hi, qpos, scale=scale, window=window)
        if out is not None:
            return out
    kpos = torch.arange(start + lo, start + hi, device=q.device)  # [S]
    allowed = _allowed(kpos, qpos.to(q.device), window)  # [T, S]
    return F.scaled_dot_product_attention(q.to(K.dtype), K[:, :, lo:hi], V[:, :, lo:hi], attn_mask=allowed,
                                          scale=scale, enable_gqa=q.shape[1] != K.shape[1]).to(q.dtype)


def attend(
    q: torch.Tensor,
    segments: list[tuple[torch.Tensor, torch.Tensor, int]],
    qpos: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """`segment_attention` through the Triton kernel on CUDA for decode/verify steps (T <= 16 query
    tokens), `flash_attention` for CPU prefill chunks over one segment; the torch reference
    elsewhere. Pass qpos on the host (the model does): its bounds are then read without a device sync. On the CPU a verify step
    (1 < T <= 16) attends one query position at a time, each exactly as a decode step would (the
    same keys, the same shapes), so that speculative decoding's output equals greedy's bit for bit
    where the matrix products are row-independent (the int8 path). `bf16`: see `flash_attention`."""
    T = q.shape[2]
    if not q.is_cuda and T > MAX_QUERY_TOKENS and len(segments) == 1 and not softcap:
        return flash_attention(q, segments[0], qpos, scale=scale, window=window, bf16=bf16)
    if q.is_cuda and triton is not None and T <= MAX_QUERY_TOKENS:
        return segment_attention_triton(q, segments, qpos, scale=scale, window=window, softcap=softcap)
    if not q.is_cuda and 1 < T <= MAX_QUERY_TOKENS:
        return torch.cat([segment_attention(q[:, :, t : t + 1], segments, qpos[t : t + 1], scale=scale, window=window,
                                            softcap=softcap) for t in range(T)], dim=2)
    return segment_attention(q, segments, qpos, scale=scale, window=window, softcap=softcap)
