"""RoPE tables, and the PIE shift: move a run of cached keys and rotate them by `delta` positions.

RoPE composes: R(p + delta) = R(delta) R(p), so keys stored rotated at position p become keys at
p + delta by one more rotation, without the pre-RoPE keys. Reference first, then the Triton kernel
and its launcher; `rope_shift` picks the kernel on CUDA and, on the CPU, the compiled one-pass
`kernels.step.shift` or, without it, `rope_shift_cpu`: the reference's arithmetic one layer at a
time in reused buffers (both bit-identical to it; the whole-cache temporaries of the reference cost
~20x more here, mostly in page faults).
"""

from __future__ import annotations

import torch

from ghostline.kernels import step


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, *, dtype=torch.float32):
    """Positions [T], inverse frequencies [hd/2] -> cos, sin [T, hd] (HF's rotate-half layout)."""
    freqs = pos.float()[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, hd] rotated by per-position cos/sin [T, hd]."""
    return x * cos + rotate_half(x) * sin


def delta_cos_sin(delta: int, inv_freq: torch.Tensor, *, dtype=torch.float32):
    """cos, sin [L, hd] of the rotation by `delta` positions for each layer's frequencies [L, hd/2].

    Angles are computed in float64 so the extra rotation adds no more error than the stored keys hold.
    """
    ang = float(delta) * inv_freq.double()
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_shift_reference(
    k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor
) -> None:
    """In place: k/v [L, KV, cap, hd]; rows src..end move to dst.., keys rotated by delta = dst - src."""
    n = end - src
    if n <= 0:
        return
    cos, sin = delta_cos_sin(dst - src, inv_freq, dtype=k.dtype)  # [L, hd]
    moved = k[:, :, src:end].clone()  # [L, KV, n, hd]
    k[:, :, dst : dst + n] = moved * cos[:, None, None] + rotate_half(moved) * sin[:, None, None]
    v[:, :, dst : dst + n] = v[:, :, src:end].clone()


def rope_shift_cpu(k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor) -> None:
    """As `rope_shift_reference` (same operations, same rounding), layer by layer: the temporaries are
    one layer's rows [KV, n, hd] and stay in cache instead of whole-cache copies."""
    n = end - src
    if n <= 0:
        return
    cos, sin = delta_cos_sin(dst - src, inv_freq, dtype=k.dtype)  # [L, hd]
    h = k.shape[-1] // 2
    buf = torch.empty(k.shape[1], n, k.shape[-1], dtype=k.dtype, device=k.device)  # [KV, n, hd]
    tmp = torch.empty(k.shape[1], n, h, dtype=k.dtype, device=k.device)
    x1, x2 = buf[..., :h], buf[..., h:]
    for layer in range(k.shape[0]):
        c, s = cos[layer], sin[layer]
        buf.copy_(k[layer, :, src:end])
        out = k[layer, :, dst : dst + n]
        o1, o2 = out[..., :h], out[..., h:]
        torch.mul(x1, c[:h], out=o1)  # x1 cos - x2 sin: the reference's x1 cos + (-x2) sin
        torch.mul(x2, s[:h], out=tmp)
        o1.sub_(tmp)
        torch.mul(x2, c[h:], out=o2)  # x2 cos + x1 sin
        torch.mul(x1, s[h:], out=tmp)
        o2.add_(tmp)
        buf.copy_(v[layer, :, src:end])
        v[layer, :, dst : dst + n] = buf


try:  # Triton is optional at run time: the reference serves every device without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


if triton is not None:

    @triton.jit(do_not_specialize=["src_row", "dst", "n"])
    def _rope_shift_kernel(
        k_ptr, v_ptr, ks_ptr, vs_ptr, cos_ptr, sin_ptr,
        src_row, dst, n, n_heads,
        stride_l, stride_h, stride_s,
        sstride_l, sstride_h, sstride_s,
        HALF: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (layer * head, block of rows): load rows src_row.. of the source (k/v itself,
        or a staged copy when the ranges overlap), rotate the keys by the layer's angles, store at dst.."""
        lh = tl.program_id(0)
        layer = (lh // n_heads).to(tl.int64)
        head = (lh % n_heads).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        cols = tl.arange(0, HALF)  # [HALF]
        mask = rows[:, None] < n
        s_off = layer * sstride_l + head * sstride_h + (src_row + rows[:, None]).to(tl.int64) * sstride_s + cols[None, :]
        d_off = layer * stride_l + head * stride_h + (dst + rows[:, None]).to(tl.int64) * stride_s + cols[None, :]
        x1 = tl.load(ks_ptr + s_off, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_S, HALF]
        x2 = tl.load(ks_ptr + s_off + HALF, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + layer * 2 * HALF + cols)[None, :]  # [1, HALF], fp32
        s = tl.load(sin_ptr + layer * 2 * HALF + cols)[None, :]
        v1 = tl.load(vs_ptr + s_off, mask=mask, other=0.0)
        v2 = tl.load(vs_ptr + s_off + HALF, mask=mask, other=0.0)
        tl.store(k_ptr + d_off, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_ptr + d_off + HALF, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + d_off, v1, mask=mask)
        tl.store(v_ptr + d_off + HALF, v2, mask=mask)


    @triton.jit(do_not_specialize=["src", "dst", "n", "n_blocks"])
    def _rope_shift_seq_kernel(
        k_ptr, v_ptr, cos_ptr, sin_ptr, src, dst, n, n_heads, n_blocks,
        stride_l, stride_h, stride_s,
        HALF: tl.constexpr, HC: tl.constexpr, BLOCK_S: tl.constexpr, DOWN: tl.constexpr,
    ):
        """Overlapping ranges in place, without a staged copy: one program per (layer * head, chunk of
        HC dims of each half) walks the rows in the safe order (from the end when moving up, DOWN,
        from the start when moving down) and, per block, loads every row before a barrier and stores
        after it. A block's destination then never holds rows a later block still has to read."""
        lh = tl.program_id(0)
        layer = (lh // n_heads).to(tl.int64)
        head = (lh % n_heads).to(tl.int64)
        cols = tl.program_id(1) * HC + tl.arange(0, HC)  # [HC] dims of the first half
        c = tl.load(cos_ptr + layer * 2 * HALF + cols)[None, :]  # [1, HC], fp32
        s = tl.load(sin_ptr + layer * 2 * HALF + cols)[None, :]
        base = layer * stride_l + head * stride_h
        for i in range(n_blocks):
            if DOWN:
                blk = n_blocks - 1 - i
            else:
                blk = i
            rows = blk * BLOCK_S + tl.arange(0, BLOCK_S)
            mask = rows[:, None] < n
            s_off = base + (src + rows[:, None]).to(tl.int64) * stride_s + cols[None, :]
            d_off = base + (dst + rows[:, None]).to(tl.int64) * stride_s + cols[None, :]
            x1 = tl.load(k_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(k_ptr + s_off + HALF, mask=mask, other=0.0).to(tl.float32)
            v1 = tl.load(v_ptr + s_off, mask=mask, other=0.0)
            v2 = tl.load(v_ptr + s_off + HALF, mask=mask, other=0.0)
            tl.debug_barrier()  # every row of the block is read before any is overwritten
            tl.store(k_ptr + d_off, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(k_ptr + d_off + HALF, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(v_ptr + d_off, v1, mask=mask)
            tl.store(v_ptr + d_off + HALF, v2, mask=mask)
            tl.debug_barrier()

def rope_shift_triton(
    k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor, *, block: int = 16,
    sequential: bool = True, programs: int = 264, seq_rows: int | None = None,
) -> None:
    """Launcher: all layers and heads in one launch. Disjoint ranges are moved in place by
    independent programs; overlapping ones (either sign of delta) by programs that each walk their
    rows in the safe order (`sequential`), or else read from a staged copy of the moved rows."""
    n = end - src
    if n <= 0 or dst == src:  # nothing to move; delta 0 rotates by the identity
        return
    L, KV, cap, hd = k.shape
    assert hd % 2 == 0 and (hd // 2) & (hd // 2 - 1) == 0, "head_dim/2 must be a power of two"
    assert k.stride(-1) == 1 and v.stride() == k.stride(), "k and v must share a layout with unit last stride"
    assert 0 <= src and end <= cap and 0 <= dst and dst + n <= cap, "rows out of range"
    cos, sin = delta_cos_sin(dst - src, inv_freq, dtype=torch.float32)  # [L, hd]
    cos, sin = cos.to(k.device).contiguous(), sin.to(k.device).contiguous()
    if abs(dst - src) < n and sequential:
        half = hd // 2
        hc = half  # dims per program: narrower until the grid has a few programs per SM
        while hc > 16 and L * KV * (half // hc) < programs:
            hc //= 2
        rows = seq_rows or max(16, 4096 // hc)
        _rope_shift_seq_kernel[(L * KV, half // hc)](
            k, v, cos, sin, src, dst, n, KV, triton.cdiv(n, rows), k.stride(0), k.stride(1), k.stride(2),
            HALF=half, HC=hc, BLOCK_S=rows, DOWN=dst > src, num_stages=1,
        )
        return
    if abs(dst - src) >= n:
        ks, vs, src_row = k, v, src
    else:
        ks, vs, src_row = k[:, :, src:end].contiguous(), v[:, :, src:end].contiguous(), 0  # [L, KV, n, hd]
    grid = (L * KV, triton.cdiv(n, block))
    _rope_shift_kernel[grid](
        k, v, ks, vs, cos, sin, src_row, dst, n, KV,
        k.stride(0), k.stride(1), k.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        HALF=hd // 2, BLOCK_S=block,
    )


def rope_shift(k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor) -> None:
    """Move cached rows src..end to dst and rotate their keys by dst - src (in place, all layers)."""
    if k.is_cuda and triton is not None:
        rope_shift_triton(k, v, src, end, dst, inv_freq)
    elif k.is_cuda:
        rope_shift_reference(k, v, src, end, dst, inv_freq)
    elif not step.shift(k, v, src, end, dst, *delta_cos_sin(dst - src, inv_freq, dtype=k.dtype)):
        rope_shift_cpu(k, v, src, end, dst, inv_freq)
