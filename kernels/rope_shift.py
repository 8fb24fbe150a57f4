"""RoPE tables, and the PIE shift: move a run of cached keys and rotate them by `delta` positions.

RoPE composes: R(p + delta) = R(delta) R(p), so keys stored rotated at position p become keys at
p + delta by one more rotation, without the pre-RoPE keys. Reference first, then the Triton kernel
and its launcher; `rope_shift` picks the kernel on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch


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


try:  # Triton is optional at run time: the reference serves every device without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


if triton is not None:

    @triton.jit
    def _rope_shift_kernel(
        k_ptr, v_ptr, cos_ptr, sin_ptr, tmpk_ptr, tmpv_ptr,
        src, dst, n, n_heads, stride_l, stride_h, stride_s,
        HALF: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (layer*head, block of rows): read moved rows from the staged copy, rotate, write."""
        lh = tl.program_id(0)
        layer = lh // n_heads
        head = lh % n_heads
        rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        cols = tl.arange(0, HALF)
        mask = rows[:, None] < n
        base = layer * stride_l + head * stride_h
        tbase = lh * n * (2 * HALF)
        t_off = tbase + rows[:, None] * (2 * HALF) + cols[None, :]
        x1 = tl.load(tmpk_ptr + t_off, mask=mask, other=0.0)
        x2 = tl.load(tmpk_ptr + t_off + HALF, mask=mask, other=0.0)
        c = tl.load(cos_ptr + layer * 2 * HALF + cols)[None, :]
        s = tl.load(sin_ptr + layer * 2 * HALF + cols)[None, :]
        out1 = x1 * c - x2 * s
        out2 = x2 * c + x1 * s
        d_off = base + (dst + rows[:, None]) * stride_s + cols[None, :]
        tl.store(k_ptr + d_off, out1.to(k_ptr.dtype.element_ty), mask=mask)
        tl.store(k_ptr + d_off + HALF, out2.to(k_ptr.dtype.element_ty), mask=mask)
        v1 = tl.load(tmpv_ptr + t_off, mask=mask, other=0.0)
        v2 = tl.load(tmpv_ptr + t_off + HALF, mask=mask, other=0.0)
        tl.store(v_ptr + d_off, v1, mask=mask)
        tl.store(v_ptr + d_off + HALF, v2, mask=mask)


def rope_shift_triton(
    k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor, *, block: int = 16
) -> None:
    """Launcher: all layers and heads in one launch. The moved rows are staged first, so overlapping
    source and destination ranges (any sign of delta) are safe."""
    n = end - src
    if n <= 0:
        return
    L, KV, _, hd = k.shape
    assert k.stride(-1) == 1 and v.stride() == k.stride(), "k and v must share a contiguous layout"
    cos, sin = delta_cos_sin(dst - src, inv_freq, dtype=torch.float32)
    cos, sin = cos.to(k.device).contiguous(), sin.to(k.device).contiguous()
    tmpk = k[:, :, src:end].contiguous()  # [L, KV, n, hd] staged copy
    tmpv = v[:, :, src:end].contiguous()
    grid = (L * KV, triton.cdiv(n, block))
    _rope_shift_kernel[grid](
        k, v, cos, sin, tmpk, tmpv, src, dst, n, KV, k.stride(0), k.stride(1), k.stride(2),
        HALF=hd // 2, BLOCK_S=block,
    )


def rope_shift(k: torch.Tensor, v: torch.Tensor, src: int, end: int, dst: int, inv_freq: torch.Tensor) -> None:
    """Move cached rows src..end to dst and rotate their keys by dst - src (in place, all layers)."""
    if k.is_cuda and triton is not None:
        rope_shift_triton(k, v, src, end, dst, inv_freq)
    else:
        rope_shift_reference(k, v, src, end, dst, inv_freq)
