"""Attention of a few query tokens over several key segments (a document prefix view, a scratch area).

Each segment is `(K, V, start)`: keys/values [B|1, KV, S, hd] at contiguous positions start..start+S-1.
Scores of all segments are normalised together, which equals merging per-segment results by
log-sum-exp. Causal, optional sliding window (a key is seen when qpos - window < kpos <= qpos), GQA
without repeating keys.
"""

from __future__ import annotations

import torch


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
    qp = qpos.repeat(G)  # [G*T] position of each query row
    q_lo, q_hi = int(qpos.min()), int(qpos.max())
    scores, values = [], []
    for K, V, start in segments:
        lo = max(0, q_lo - window + 1 - start) if window else 0
        hi = min(K.shape[2], q_hi - start + 1)
        if hi <= lo:
            continue
        Ks, Vs = K[:, :, lo:hi], V[:, :, lo:hi]
        s = torch.matmul(qg, Ks.transpose(-1, -2)) * scale  # [B, KV, G*T, S]
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        kpos = torch.arange(start + lo, start + hi, device=q.device)
        allowed = kpos[None, :] <= qp[:, None]
        if window:
            allowed &= kpos[None, :] > qp[:, None] - window
        scores.append(s.masked_fill(~allowed, float("-inf")))
        values.append(Vs)
    p = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out, off = None, 0
    for Vs in values:
        n = Vs.shape[2]
        part = torch.matmul(p[..., off : off + n], Vs)
        out = part if out is None else out + part
        off += n
    return out.reshape(B, KV, G, T, hd).reshape(B, H, T, hd)
