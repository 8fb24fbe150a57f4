"""Oracles and the tolerance rule that the kernel tests and the GPU bench share.

The rule is flash-attention's: compare the kernel and the same-precision torch reference with an
fp64 oracle; the kernel may be off by at most twice the reference's error plus a rounding-sized eps.
"""

from __future__ import annotations

import torch


def rounding_eps(x: torch.Tensor) -> float:
    """Twice the rounding error of x's dtype at x's magnitude (flash-attention's fwd_atol)."""
    return 2 * (x + 0.3 - 0.3 - x).abs().max().item()


def three_way(out: torch.Tensor, ref: torch.Tensor, *, exact: torch.Tensor) -> tuple[bool, float, float, float]:
    """(ok, kernel error, reference error, eps): max abs errors against the fp64 `exact`; NaN or inf
    in `out` (e.g. a poisoned element the kernel never wrote) is never ok."""
    err = (out.double() - exact).abs().max().item()
    ref_err = (ref.double() - exact).abs().max().item()
    eps = rounding_eps(ref)
    ok = bool(torch.isfinite(out).all()) and err <= 2 * ref_err + eps
    return ok, err, ref_err, eps


def exact_attention(q, segments, qpos, *, scale, window=None, softcap=None) -> torch.Tensor:
    """fp64 oracle for `segment_attention`, written independently of it: one dense masked softmax
    over all segments' keys, K/V repeated per query head. q [B, H, T, hd] -> [B, H, T, hd] fp64."""
    B, H, T, hd = q.shape
    keys, vals, kpos = [], [], []
    for K, V, start in segments:
        keys.append(K.double().expand(B, -1, -1, -1))
        vals.append(V.double().expand(B, -1, -1, -1))
        kpos.append(torch.arange(start, start + K.shape[2], device=q.device))
    K, V, kpos = torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(kpos)  # [B, KV, S, hd], [S]
    G = H // K.shape[1]
    K, V = K.repeat_interleave(G, dim=1), V.repeat_interleave(G, dim=1)  # [B, H, S, hd]
    s = q.double() @ K.transpose(-1, -2) * scale  # [B, H, T, S]
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    qpos = qpos.to(q.device)
    allowed = kpos[None, :] <= qpos[:, None]
    if window:
        allowed &= kpos[None, :] > qpos[:, None] - window
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ V
