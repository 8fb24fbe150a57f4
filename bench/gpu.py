"""One GPU run: check the Triton kernels against their references, then time the engine.

    python -m bench.gpu            # on a CUDA machine: checks, then timings (about 3-5 minutes)
    python -m bench.gpu --smoke    # anywhere: tiny shapes, few iterations (CPU: kernels interpreted)

Models (random weights, HF configs): Gemma 3 270M (18 layers, 1 KV head, 4 q heads, head_dim 256,
sliding window 512 on 5 of every 6 layers) and a DeepSeek-Coder-1.3B-shaped Llama (24 layers, 16
heads, 16 KV heads, head_dim 128). At each context length it times three ways of doing the work:
  eager    the engine's own forward (`engine.model`, attention through `attend`: the Triton kernel
           for decode steps on CUDA) and `engine.decoding.greedy`
  cuda     the engine's CUDA path (`engine.cuda.CudaRunner`): static shapes, fused kernels, one CUDA
           graph per step shape (on the CPU with --smoke: the same steps, eager, kernels interpreted)
  HF       transformers with eager attention
the parts
  shift    rope_shift of the suffix after a mid-file edit (delta = +20): torch reference (eager
           column) against the Triton kernel (cuda column)
  pie      the PIE update: splice (shift) + encoding the 20 new tokens over the prefix (HF: the
           suffix re-encoded over a cached prefix, what an engine without PIE does)
  suggest  a 32-token greedy suggestion over a scratch area, cursor at the end (HF: `generate`)
  step     one decode step (cuda: one graph replay); verify: one verify step of 8 tokens
and a floor: the bytes a part must read (weights, LM head, live KV rows) over the measured copy
bandwidth. Medians of CUDA-event timings. A torch-profiler breakdown of the CUDA path's kernels
goes to profile.txt. Prints progress, then one JSON line, then a markdown table last (also written
to --out or $OUT: bench_gpu.md, bench_gpu.json, profile.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, to check the script runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--models", default="gemma3-270m,dscoder-1.3b")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default 8192,2048)")
    p.add_argument("--new-tokens", type=int, default=None, help="suggestion length (32; 8 with --smoke)")
    p.add_argument("--edit-tokens", type=int, default=20)
    p.add_argument("--verify-tokens", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=330.0, help="skip remaining timings past this wall time")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--checks-only", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_gpu.json, bench_gpu.md, profile.txt")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":  # Triton runs CPU tensors only in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a kernel module

import ghostline.engine.model as engine_model  # noqa: E402
import ghostline.kernels.segment_attention as segment_attention_mod  # noqa: E402
from ghostline.engine.cache import KVCache  # noqa: E402
from ghostline.engine.cuda import CudaRunner, StaticStep  # noqa: E402
from ghostline.engine.decoding.greedy import greedy  # noqa: E402
from ghostline.engine.model import build  # noqa: E402
from ghostline.kernels import fused  # noqa: E402
from ghostline.kernels.rope_shift import rope_shift_reference, rope_shift_triton  # noqa: E402
from ghostline.kernels.segment_attention import (  # noqa: E402
    segment_attention,
    segment_attention_triton,
    static_attention_reference,
    static_attention_triton,
    static_plan,
)
from ghostline.kernels.testing import exact_attention, three_way  # noqa: E402

TARGETS_MS = {("gemma3-270m", 8192, "suggest"): 15.0, ("dscoder-1.3b", 8192, "suggest"): 25.0,
              ("gemma3-270m", 8192, "pie"): 2.0, ("dscoder-1.3b", 8192, "pie"): 2.0}


# models ------------------------------------------------------------------------------------------


def hf_config(name: str, *, smoke: bool):
    """The HF config of a benchmark model; `smoke` keeps its structure at toy width."""
    from transformers import Gemma3TextConfig, LlamaConfig

    if name == "gemma3-270m":
        dims = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                    head_dim=256, query_pre_attn_scalar=256, sliding_window=512)
        if smoke:
            dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                        head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
        layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(dims["num_hidden_layers"])]
        return Gemma3TextConfig(**dims, num_attention_heads=4, num_key_value_heads=1, layer_types=layer_types,
                                max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1,
                                pad_token_id=0)
    if name == "dscoder-1.3b":
        dims = dict(vocab_size=32256, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=16)
        if smoke:
            dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4)
        return LlamaConfig(**dims, max_position_embeddings=16384, rms_norm_eps=1e-6, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                           bos_token_id=32013, eos_token_id=32014, pad_token_id=None)
    raise ValueError(f"unknown model {name!r}")


def make_models(name: str, *, smoke: bool, device: str, dtype: torch.dtype):
    """A random-weight HF model (eager attention) and the engine's Transformer sharing its weights
    (`build` then `.to(device)`: the RoPE tables follow the weights)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name, smoke=smoke)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()
    model = build(cfg, hf.state_dict(), dtype=dtype).to(device)
    return cfg, hf, model


# engine paths ------------------------------------------------------------------------------------


@torch.no_grad()
def encode(model, cache: KVCache, *, ids: torch.Tensor, start: int, chunk: int) -> None:
    """ids [n] into rows start.. of the cache, in chunks (as `Engine._encode` does: host positions)."""
    end = start + ids.shape[0]
    cache.reserve(max(cache.length, end))
    cache.length = max(cache.length, end)
    for s in range(start, end, chunk):
        e = min(end, s + chunk)
        model(ids[None, s - start : e - start], torch.arange(s, e), cache, return_hidden=True, last_only=True)


def eager_suggest(model, cache: KVCache, first: int, *, n: int) -> list[int]:
    """`engine.decoding.greedy` over a fresh scratch area at the end of the cache."""
    from ghostline.engine.cache import ScratchCache

    return list(greedy(model, ScratchCache(cache, cache.length - 1, n + 1), first, max_new=n))


def cuda_suggest(runner: CudaRunner, cache: KVCache, first: int, *, n: int) -> list[int]:
    """The CUDA path: the runner's static decode step over its fixed scratch rows."""
    return list(runner.greedy(runner.scratch(cache, cache.length - 1, n + 1), first, max_new=n))


# timing ------------------------------------------------------------------------------------------


def timed(fn, *, iters: int, warmup: int, device: str, before=None, after=None) -> float:
    """Median milliseconds of fn() over `iters` runs (CUDA events on GPU); before/after are untimed."""
    for _ in range(warmup):
        if before:
            before()
        fn()
        if after:
            after()
    times = []
    for _ in range(iters):
        if before:
            before()
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if after:
            after()
    return statistics.median(times)


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written (METHOD.md's ceiling)."""
    if not device.startswith("cuda"):
        return None
    n = 1 << 28  # 256 Mi floats: 1 GiB each way
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), iters=10, warmup=2, device=device)
    del a, b
    return 2 * n * 4 / (ms / 1e3)


# checks ------------------------------------------------------------------------------------------


def check_cases(cfg, *, smoke: bool):
    """(rope cases, attention cases) at the model's shapes: deltas of both signs, overlapping or not;
    decode/verify token counts, batches with a shared prefix, its windows, a softcap."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    KV, G = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "layer_types", None) else None
    cap = 96 if smoke else 3000
    rope = [(cap, 10, cap - 30, 30), (cap, 40, cap - 5, 20), (cap, 2, cap // 3, cap // 2)]
    P = 70 if smoke else 2000
    attn = [dict(B=1, T=1, P=P, S=3, window=None, softcap=None), dict(B=1, T=16, P=P, S=18, window=None, softcap=None),
            dict(B=2, T=2, P=P, S=4, window=None, softcap=50.0)]
    if window:
        attn += [dict(B=1, T=1, P=P, S=3, window=window, softcap=None), dict(B=2, T=4, P=P, S=6, window=window, softcap=None)]
    # static attention: (T, prefix length, prefix capacity, scratch row0, scratch capacity, window, softcap, encode)
    static = [(1, P, P + 300, 5, 64, None, None, False), (8, P - 7, P + 50, 9, 64, None, 30.0, False),
              (32, 0, 0, P // 2, P + 100, None, None, True)]
    if window:
        static += [(1, P, P + 300, 5, 64, window, None, False), (8, P, P + 40, 3, 64, window, None, False),
                   (32, 0, 0, P - 40, P + 100, window, None, True)]
    return dict(L=cfg.num_hidden_layers, KV=KV, G=G, hd=hd, D=cfg.hidden_size, F=cfg.intermediate_size), rope, attn, static


def nan_workspace(rows: int, n_splits: int, *, hd: int, device):
    """The launcher's partial buffers, poisoned: a split a program never writes turns the output NaN."""
    m = torch.full((rows, n_splits), float("nan"), device=device)
    return m, m.clone(), torch.full((rows, n_splits, hd), float("nan"), device=device)


def _row(name, kernel, dtype, case, ok, err=float("nan"), ref_err=float("nan"), eps=float("nan")) -> dict:
    return dict(model=name, kernel=kernel, dtype=str(dtype).removeprefix("torch."), case=case, ok=bool(ok),
                err=err, ref_err=ref_err, eps=eps)


def run_checks(cfg, name: str, *, smoke: bool, device: str, dtypes) -> list[dict]:
    """Each kernel against its reference on fresh random inputs, three-way against an fp64 oracle,
    with the destination / output poisoned with NaN first."""
    shape, rope_cases, attn_cases, static_cases = check_cases(cfg, smoke=smoke)
    L, KV, G, hd, D, Fd = (shape[k] for k in ("L", "KV", "G", "hd", "D", "F"))
    H = KV * G
    margs = engine_model.ModelArgs.from_hf(cfg)
    inv_freq = margs.inv_freq.to(device)  # [L, hd/2]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape_, dtype=torch.float32):
        return torch.randn(*shape_, generator=gen, device=device).to(dtype)

    for dtype in dtypes:
        for cap, src, end, dst in rope_cases:
            k0, v0 = rand(L, KV, cap, hd, dtype=dtype), rand(L, KV, cap, hd, dtype=dtype)
            n = end - src
            dst_only = torch.zeros(cap, dtype=torch.bool, device=device)
            dst_only[dst : dst + n] = True
            dst_only[src:end] = False
            k0[:, :, dst_only], v0[:, :, dst_only] = float("nan"), float("nan")
            k, v, k_ref, v_ref, k_hi, v_hi = k0.clone(), v0.clone(), k0.clone(), v0.clone(), k0.double(), v0.double()
            rope_shift_triton(k, v, src, end, dst, inv_freq)
            rope_shift_reference(k_ref, v_ref, src, end, dst, inv_freq)
            rope_shift_reference(k_hi, v_hi, src, end, dst, inv_freq)
            ok, err, ref_err, eps = three_way(k, k_ref, exact=k_hi)
            rows.append(_row(name, "rope_shift", dtype, f"rows {src}:{end} -> {dst}", ok and torch.equal(v, v_ref), err, ref_err, eps))
        for c in attn_cases:
            B, T, P, S, window, softcap = c["B"], c["T"], c["P"], c["S"], c["window"], c["softcap"]
            q = rand(B, T, H, hd, dtype=dtype).transpose(1, 2)  # [B, H, T, hd]
            cache_k, cache_v = rand(KV, P + 64, hd, dtype=dtype), rand(KV, P + 64, hd, dtype=dtype)
            sk, sv = rand(B, KV, S + 8, hd, dtype=dtype), rand(B, KV, S + 8, hd, dtype=dtype)
            segments = [(cache_k[None, :, :P], cache_v[None, :, :P], 0), (sk[:, :, :S], sv[:, :, :S], P)]
            qpos = torch.arange(P + S - T, P + S)  # host positions, as the model passes them
            kw = dict(scale=hd**-0.5, window=window, softcap=softcap)
            out = torch.full((B, H, T, hd), float("nan"), dtype=dtype, device=device)
            with mock.patch.object(segment_attention_mod, "_workspace", nan_workspace):
                segment_attention_triton(q, segments, qpos, **kw, out=out)
            ref = segment_attention(q, segments, qpos, **kw)
            ok, err, ref_err, eps = three_way(out, ref, exact=exact_attention(q, segments, qpos.to(device), **kw))
            rows.append(_row(name, "segment_attention", dtype, f"B{B} T{T} P{P}+{S} w{window} cap{softcap}", ok, err, ref_err, eps))
        for T, P, cap_a, row0, cap_b, window, softcap, enc in static_cases:
            q = rand(T, H, hd, dtype=dtype)
            kb, vb = rand(KV, cap_b, hd, dtype=dtype), rand(KV, cap_b, hd, dtype=dtype)
            seg_a = None if enc else (rand(KV, cap_a, hd, dtype=dtype), rand(KV, cap_a, hd, dtype=dtype))
            pos_b0 = 0 if enc else P
            meta = torch.tensor([P, pos_b0, row0, T], device=device)
            kw = dict(scale=hd**-0.5, window=window, softcap=softcap)
            plan = static_plan(T=T, G=G, KV=KV, hd=hd, cap_a=0 if enc else cap_a, cap_b=cap_b, device=device)
            if smoke:  # several splits per segment even at toy sizes
                plan.update(n_split_a=0 if enc else 3, n_split_b=2)
            out = torch.full((T, H, hd), float("nan"), dtype=dtype, device=device)
            with mock.patch.object(segment_attention_mod, "_workspace", nan_workspace):
                static_attention_triton(q, seg_a, (kb, vb), meta, **kw, plan=plan, out=out)
            ref = static_attention_reference(q, seg_a, (kb, vb), meta, **kw)
            segs = ([] if enc else [(seg_a[0][None, :, :P], seg_a[1][None, :, :P], 0)])
            segs.append((kb[None, :, : row0 + T], vb[None, :, : row0 + T], pos_b0))
            qpos = torch.arange(pos_b0 + row0, pos_b0 + row0 + T, device=device)
            exact = exact_attention(q.transpose(0, 1)[None], segs, qpos, **kw)[0].transpose(0, 1)
            ok, err, ref_err, eps = three_way(out, ref, exact=exact)
            rows.append(_row(name, "static_attention", dtype, f"T{T} A{P}/{cap_a} B{row0}+{T}/{cap_b} w{window} cap{softcap}"
                             + (" encode" if enc else ""), ok, err, ref_err, eps))
        rows += fused_checks(name, margs, dtype=dtype, device=device, rand=rand, L=L, KV=KV, H=H, hd=hd, D=D, Fd=Fd)
    return rows


def fused_checks(name, margs, *, dtype, device, rand, L, KV, H, hd, D, Fd) -> list[dict]:
    """The fused decode-step kernels against their references; the fp64 oracle is the reference on
    float64 copies (the reference rounds where the eager forward does, so it is the one to match)."""
    rows = []
    gemma = margs.family == "gemma3"
    offset, eps = (1.0 if gemma else 0.0), margs.norm_eps
    T = 3
    # residual + norm
    x0, y = rand(T, D, dtype=dtype), rand(T, D, dtype=dtype)
    wp, wn = (0.1 * rand(D)).to(dtype), (1.0 + 0.1 * rand(D)).to(dtype)
    for post in ([None, wp] if gemma else [None]):
        x_k, x_r, x_hi = x0.clone(), x0.clone(), x0.double()
        h_k = fused.residual_norm_triton(x_k, y, post, wn, eps=eps, offset=offset)
        h_r = fused.residual_norm_reference(x_r, y, post, wn, eps=eps, offset=offset)
        h_hi = fused.residual_norm_reference(x_hi, y.double(), None if post is None else post.double(), wn.double(), eps=eps, offset=offset)
        ok1, err, ref_err, e = three_way(h_k, h_r, exact=h_hi)
        ok2 = three_way(x_k, x_r, exact=x_hi)[0]
        rows.append(_row(name, "residual_norm", dtype, f"T{T} D{D} post={post is not None}", ok1 and ok2, err, ref_err, e))
    # q/k norm + rope + cache write
    cap, row0, valid = 40, 30, 2
    qkv = rand(T, (H + 2 * KV) * hd, dtype=dtype)
    qn, kn = ((0.1 * rand(hd)).to(dtype), (0.1 * rand(hd)).to(dtype)) if gemma else (None, None)
    inv = margs.inv_freq[-1].float().contiguous().to(device)
    meta = torch.tensor([100, 100, row0, valid], device=device)
    dk0, dv0 = rand(KV, cap, hd, dtype=dtype), rand(KV, cap, hd, dtype=dtype)
    dk, dv, rk, rv = dk0.clone(), dv0.clone(), dk0.clone(), dv0.clone()
    hk, hv = dk0.double(), dv0.double()
    kw = dict(n_heads=H, n_kv=KV, head_dim=hd, eps=eps)
    q_k = fused.qk_rope_write_triton(qkv, meta, inv, qn, kn, dk, dv, **kw)
    q_r = fused.qk_rope_write_reference(qkv, meta, inv, qn, kn, rk, rv, **kw)
    q_hi = fused.qk_rope_write_reference(qkv.double(), meta, inv, None if qn is None else qn.double(),
                                         None if kn is None else kn.double(), hk, hv, **kw)
    ok1, err, ref_err, e = three_way(q_k, q_r, exact=q_hi)
    ok2 = three_way(dk, rk, exact=hk)[0] and torch.equal(dv, rv)
    untouched = torch.ones(cap, dtype=torch.bool, device=device)
    untouched[row0 : row0 + valid] = False
    ok3 = torch.equal(dk[:, untouched], dk0[:, untouched]) and torch.equal(dv[:, untouched], dv0[:, untouched])
    rows.append(_row(name, "qk_rope_write", dtype, f"T{T} rows {row0}+{valid}/{cap} norm={gemma}", ok1 and ok2 and ok3, err, ref_err, e))
    # activation * up
    gu = rand(T, 2 * Fd, dtype=dtype)
    act = margs.act
    a_k = fused.act_mul_triton(gu, act=act)
    a_r = fused.act_mul_reference(gu, act=act)
    ok, err, ref_err, e = three_way(a_k, a_r, exact=fused.act_mul_reference(gu.double(), act=act))
    rows.append(_row(name, "act_mul", dtype, f"T{T} F{Fd} {act}", ok, err, ref_err, e))
    return rows


# timings -----------------------------------------------------------------------------------------


def model_bytes(model, ctx: int) -> dict:
    """Bytes one decode step must read: layer weights, the LM head, and the live KV rows at ctx."""
    a = model.args
    el = model.embed_tokens.weight.element_size()
    layers = sum(p.numel() for p in model.layers.parameters()) * el
    head = model.lm_head.weight.numel() * el
    kv = sum(min(ctx, w or ctx) for w in a.windows) * a.n_kv_heads * a.head_dim * 2 * el
    return dict(layers=layers, head=head, kv=kv, kv_row=a.n_layers * a.n_kv_heads * a.head_dim * 2 * el)


def run_timings(name: str, cfg, *, hf, model, runner, runner_ng, runner_gemv, ctx: int, a: argparse.Namespace,
                dtype, bw, profile_out) -> dict:
    """Times for one model at one context length; each part guarded so one failure keeps the rest."""
    device, smoke = a.device, a.smoke
    cuda = device.startswith("cuda")
    it = dict(shift=2 if smoke else 30, pie=2 if smoke else 20, suggest=1 if smoke else 10, eager=1 if smoke else 3,
              step=3 if smoke else 50, hf=1 if smoke else 3)
    warm = 1
    chunk = 32 if smoke else 1024
    E, n = a.edit_tokens, a.new_tokens
    gen = torch.Generator(device=device).manual_seed(ctx)
    ids = torch.randint(0, cfg.vocab_size, (ctx,), generator=gen, device=device)
    new = torch.randint(0, cfg.vocab_size, (E,), generator=gen, device=device)
    new_list = new.tolist()
    mid = ctx // 2
    res: dict = dict(model=name, ctx=ctx)
    margs = model.args
    cache = KVCache(margs.n_layers, margs.n_kv_heads, margs.head_dim, dtype=dtype, device=device)
    cache.reserve(ctx + E)
    t0 = time.perf_counter()
    encode(model, cache, ids=ids, start=0, chunk=chunk)
    if cuda:
        torch.cuda.synchronize()
    res["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    f = margs.inv_freq
    by = model_bytes(model, ctx)
    if bw:
        shift_bytes = 2 * (ctx - mid) * by["kv_row"]  # read + write the moved rows
        res["floor_shift"] = shift_bytes / bw * 1e3
        res["floor_pie"] = (shift_bytes + by["layers"] + mid * by["kv_row"]) / bw * 1e3
        res["floor_step"] = (by["layers"] + by["head"] + by["kv"]) / bw * 1e3
        res["floor_suggest"] = n * res["floor_step"]
    first = int(ids[-1])
    tokens = {}

    def part(key, fn):
        try:
            fn()
        except Exception as exc:  # keep the run's other numbers
            res[f"error_{key}"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()

    def undo():
        cache.splice(mid, mid + E, 0, inv_freq=f)

    def shifts():
        res["shift_eager"] = timed(lambda: rope_shift_reference(cache.k, cache.v, mid, ctx, mid + E, f),
                                   after=lambda: rope_shift_reference(cache.k, cache.v, mid + E, ctx + E, mid, f),
                                   iters=it["shift"], warmup=warm, device=device)
        res["shift_cuda"] = timed(lambda: rope_shift_triton(cache.k, cache.v, mid, ctx, mid + E, f),
                                  after=lambda: rope_shift_triton(cache.k, cache.v, mid + E, ctx + E, mid, f),
                                  iters=it["shift"], warmup=warm, device=device)

    def pie_eager():
        def go():
            cache.splice(mid, mid, E, inv_freq=f)
            encode(model, cache, ids=new, start=mid, chunk=chunk)
        res["pie_eager"] = timed(go, after=undo, iters=it["pie"], warmup=warm, device=device)

    def pie_nograph():
        def go():
            cache.splice(mid, mid, E, inv_freq=f)
            runner_ng.encode(cache, new_list, mid)
        res["pie_nograph"] = timed(go, after=undo, iters=it["pie"], warmup=warm, device=device)

    def pie_cuda():
        def go():
            cache.splice(mid, mid, E, inv_freq=f)
            runner.encode(cache, new_list, mid)
        t1 = time.perf_counter()
        go()
        if cuda:
            torch.cuda.synchronize()
        res["pie_cuda_first_ms"] = (time.perf_counter() - t1) * 1e3  # includes the encode graph's capture
        undo()
        res["pie_cuda"] = timed(go, after=undo, iters=it["pie"], warmup=warm, device=device)

    part("shift", shifts)
    part("pie_eager", pie_eager)
    if runner_ng is not None:
        part("pie_nograph", pie_nograph)
    part("pie_cuda", pie_cuda)
    part("reencode", lambda: encode(model, cache, ids=ids[mid:], start=mid, chunk=chunk))  # undo the round trips' drift

    def suggest_eager():
        res["suggest_eager"] = timed(lambda: tokens.__setitem__("eager", eager_suggest(model, cache, first, n=n)),
                                     iters=it["eager"], warmup=warm, device=device)

    def suggest_nograph():
        res["suggest_nograph"] = timed(lambda: tokens.__setitem__("nograph", cuda_suggest(runner_ng, cache, first, n=n)),
                                       iters=it["eager"], warmup=warm, device=device)

    def suggest_cuda():
        t1 = time.perf_counter()
        tokens["cuda"] = cuda_suggest(runner, cache, first, n=n)
        res["suggest_cuda_first_ms"] = (time.perf_counter() - t1) * 1e3  # includes the decode graph's capture
        res["suggest_cuda"] = timed(lambda: tokens.__setitem__("cuda", cuda_suggest(runner, cache, first, n=n)),
                                    iters=it["suggest"], warmup=warm, device=device)

    def suggest_gemv():
        t1 = time.perf_counter()
        tokens["gemv"] = cuda_suggest(runner_gemv, cache, first, n=n)
        res["suggest_gemv_first_ms"] = (time.perf_counter() - t1) * 1e3
        res["suggest_gemv"] = timed(lambda: tokens.__setitem__("gemv", cuda_suggest(runner_gemv, cache, first, n=n)),
                                    iters=it["suggest"], warmup=warm, device=device)
        scratch = runner_gemv.scratch(cache, cache.length - 1, n + 1)
        st = runner_gemv.step("decode", 1, *runner_gemv._segments(scratch))
        st.ids.fill_(first)
        runner_gemv._set_meta(st, scratch.start, scratch.start, 0, 1)
        res["step_gemv"] = timed(st.run, iters=it["step"], warmup=warm, device=device)

    def steps():
        scratch = runner.scratch(cache, cache.length - 1, n + 1)
        seg_a, seg_b = runner._segments(scratch)
        st = runner.step("decode", 1, seg_a, seg_b)
        st.ids.fill_(first)
        runner._set_meta(st, scratch.start, scratch.start, 0, 1)
        res["step_cuda"] = timed(st.run, iters=it["step"], warmup=warm, device=device)
        toks = [first] + tokens.get("cuda", [0] * n)[: a.verify_tokens - 1]
        res["verify_cuda"] = timed(lambda: runner.verify(scratch, toks, scratch.start), iters=it["step"], warmup=warm, device=device)
        res["verify_same"] = runner.verify(scratch, toks, scratch.start)[0][: len(toks) - 1] == toks[1:]

    part("suggest_eager", suggest_eager)
    if runner_ng is not None:
        part("suggest_nograph", suggest_nograph)
    part("suggest_cuda", suggest_cuda)
    part("steps", steps)
    if runner_gemv is not None:
        part("suggest_gemv", suggest_gemv)
    if "eager" in tokens and "cuda" in tokens:
        res["cuda_eager_same_tokens"] = sum(x == y for x, y in zip(tokens["eager"], tokens["cuda"]))
    if "nograph" in tokens and "cuda" in tokens:
        res["cuda_nograph_same_tokens"] = sum(x == y for x, y in zip(tokens["nograph"], tokens["cuda"]))
    if "gemv" in tokens and "cuda" in tokens:
        res["gemv_cuda_same_tokens"] = sum(x == y for x, y in zip(tokens["gemv"], tokens["cuda"]))
    if profile_out is not None:
        part("profile", lambda: profile_out.append(profile_cuda(runner, cache, first, n=n, name=name, ctx=ctx, res=res)))
        if runner_gemv is not None:
            part("profile_gemv", lambda: profile_out.append(
                profile_cuda(runner_gemv, cache, first, n=n, name=name + " (Triton GEMV)", ctx=ctx, res=res, key="gemv")))
    if not a.skip_hf:
        part("hf", lambda: res.update(hf_timings(hf, ids, new=new, mid=mid, a=a, iters=it["hf"], warm=warm,
                                                 engine_tokens=tokens.get("cuda"))))
    del cache
    return res


def _category(kernel: str) -> str:
    k = kernel.lower()
    if any(s in k for s in ("static_partial", "static_combine", "segment_combine", "segment_partial")):
        return "attention"
    if "residual_norm" in k or "qk_rope" in k or "act_mul" in k:
        return "fused norm/rope/act"
    if any(s in k for s in ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas", "splitk", "nvjet")):
        return "matmul"
    if "argmax" in k or "reduce" in k:
        return "argmax"
    if "memcpy" in k or "memset" in k:
        return "copy"
    return "other"


def profile_cuda(runner, cache, first, *, n: int, name: str, ctx: int, res: dict, steps: int = 8, key: str = "cuda") -> str:
    """Where a decode step's time goes: device time per kernel and per category (torch profiler over
    `steps` uncaptured runs of the same static step the graph replays: the same kernels, so their
    sum is the step's busy time; the replayed step's time minus it is launch gaps and idling)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    scratch = runner.scratch(cache, cache.length - 1, n + 1)
    st = StaticStep(runner, "decode", 1, *runner._segments(scratch))  # uncaptured, its own buffers
    st.ids.fill_(first)
    runner._set_meta(st, scratch.start, scratch.start, 0, 1)
    st.body()  # warm
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            st.body()
        if cuda:
            torch.cuda.synchronize()
    tot: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            k = tot.setdefault(e.name, [0.0, 0])
            k[0] += e.time_range.elapsed_us() / steps
            k[1] += 1 / steps
    cats: dict = {}
    for k, (us, cnt) in tot.items():
        c = cats.setdefault(_category(k), [0.0, 0.0])
        c[0] += us
        c[1] += cnt
    busy = sum(v[0] for v in tot.values())
    launches = sum(v[1] for v in tot.values())
    step_us = 1e3 * (res.get(f"step_{key}") or 0)
    lines = [f"## {name} ctx {ctx}: one decode step (kernels of {steps} uncaptured runs, per step)",
             f"kernel busy time {busy:.1f} us in {launches:.0f} launches; replayed graph step {step_us:.1f} us "
             f"(gaps {step_us - busy:.1f} us, {(step_us - busy) / max(launches, 1):.2f} us per launch); "
             f"per token in a {n}-token suggestion {1e3 * (res.get(f'suggest_{key}') or 0) / n:.1f} us; "
             f"bandwidth floor {1e3 * (res.get('floor_step') or 0):.1f} us", "",
             "| category | us per step | launches per step |", "|---|---:|---:|"]
    for c, (us, cnt) in sorted(cats.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {c} | {us:.1f} | {cnt:.0f} |")
    lines += ["", "| kernel | us per step | launches per step |", "|---|---:|---:|"]
    for k, (us, cnt) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:15]:
        lines.append(f"| {k[:100]} | {us:.1f} | {cnt:.0f} |")
    text = "\n".join(lines)
    res[f"profile_{key}_busy_us_per_step"] = round(busy, 1)
    res[f"profile_{key}_launches_per_step"] = round(launches, 1)
    res[f"profile_{key}_categories_us"] = {c: round(v[0], 2) for c, v in cats.items()}
    print(text, flush=True)
    return text


@torch.no_grad()
def hf_timings(hf, ids, *, new, mid: int, a: argparse.Namespace, iters: int, warm: int, engine_tokens) -> dict:
    """HF eager: the suffix re-encoded over a cached prefix (what an engine without PIE does after
    the edit), and `generate` of new tokens over a cached context. Caches are copied untimed."""
    import copy

    device, res, state = a.device, {}, {}
    prefix_cache = hf.model(ids[None, :mid], use_cache=True).past_key_values
    suffix = torch.cat([new, ids[mid:]])[None]  # [1, E + ctx - mid]

    def fresh(src):
        return lambda: state.__setitem__("cache", copy.deepcopy(src))

    res["pie_hf"] = timed(lambda: hf.model(suffix, past_key_values=state["cache"], use_cache=True),
                          before=fresh(prefix_cache), iters=iters, warmup=warm, device=device)
    del prefix_cache
    ctx_cache = hf(ids[None, :-1], use_cache=True, logits_to_keep=1).past_key_values
    ones = torch.ones(1, ids.shape[0], dtype=torch.long, device=device)

    def generate():
        out = hf.generate(ids[None], attention_mask=ones, past_key_values=state["cache"], max_new_tokens=a.new_tokens,
                          min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
        state["tokens"] = out[0, ids.shape[0]:].tolist()

    res["suggest_hf"] = timed(generate, before=fresh(ctx_cache), iters=iters, warmup=warm, device=device)
    if engine_tokens is not None:
        res["hf_same_tokens"] = sum(x == y for x, y in zip(engine_tokens, state["tokens"]))
    return res


# report ------------------------------------------------------------------------------------------


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def table(rows: list[dict], checks: list[dict], *, a: argparse.Namespace, device: str, bw) -> str:
    lines = [
        "| model | ctx | part | engine eager ms | CUDA path, no graph ms | CUDA path ms | CUDA path + Triton GEMV ms "
        "| HF eager ms | HF/CUDA best | floor ms | target ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for part in ("shift", "pie", "suggest", "step", "verify"):
            e, c, h, g = r.get(f"{part}_eager"), r.get(f"{part}_cuda"), r.get(f"{part}_hf"), r.get(f"{part}_gemv")
            if e is None and c is None and h is None:
                continue
            c_graph = c
            c = min(x for x in (c, g) if x is not None) if (c or g) else None
            vs_hf = f"{h / c:.1f}x" if h and c else "-"
            floor = r.get(f"floor_{part}")
            target = TARGETS_MS.get((r["model"], r["ctx"], part))
            mark = "" if target is None or c is None else (" (met)" if c <= target else " (missed)")
            label = f"verify {a.verify_tokens}" if part == "verify" else part
            lines.append(f"| {r['model']} | {r['ctx']} | {label} | {fmt(e)} | {fmt(r.get(f'{part}_nograph'))} | {fmt(c_graph)} | "
                         f"{fmt(g)} | {fmt(h)} | {vs_hf} | {fmt(floor)} | "
                         f"{'-' if target is None else f'{target:g}'}{mark} |")
    bad = [c for c in checks if not c["ok"]]
    lines.append("")
    lines.append(f"device: {device}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)" if bw else f"device: {device}")
    lines.append(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + "".join(
        f"\n  FAIL {c['model']} {c['kernel']} {c['dtype']} {c['case']}: err {c['err']:.3g} ref {c['ref_err']:.3g}" for c in bad))
    for r in rows:
        extra = [f"{k}={r[k]}" for k in ("cuda_eager_same_tokens", "cuda_nograph_same_tokens", "gemv_cuda_same_tokens",
                                          "hf_same_tokens", "verify_same") if k in r]
        extra += [f"{k}={r[k]:.1f}" for k in ("suggest_cuda_first_ms", "suggest_gemv_first_ms", "pie_cuda_first_ms",
                                              "prefill_ms") if k in r]
        extra += [f"{k}: {r[k]}" for k in r if k.startswith("error_")]
        lines.append(f"{r['model']} {r['ctx']}: " + ", ".join(extra))
    lines.append(f"shift: rope_shift of the suffix by +{a.edit_tokens} (eager column: torch reference; CUDA: Triton); "
                 f"pie: shift + encode {a.edit_tokens} tokens (HF: re-encode the suffix over a cached prefix); "
                 f"suggest: {a.new_tokens} greedy tokens (HF: generate over a cached context); step: one decode step; "
                 f"verify: one verify step of {a.verify_tokens} tokens; floor: bytes to read / copy bandwidth; "
                 "*_first_ms: first call, graph capture included; same_tokens: agreement of the CUDA path's tokens")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    a.new_tokens = a.new_tokens or (8 if a.smoke else 32)
    device = a.device
    cuda = device.startswith("cuda")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if cuda else torch.float32)
    contexts = [int(c) for c in (a.contexts or ("64" if a.smoke else "8192,2048")).split(",")]
    dev_name = torch.cuda.get_device_name(device) if cuda else "cpu (triton interpreter)"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    print(f"device {dev_name}, dtype {dtype}, contexts {contexts}, smoke {a.smoke}; {versions}", flush=True)
    bw = copy_bandwidth(device)
    if bw:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    checks, rows, profiles = [], [], []
    models = a.models.split(",")

    def save():
        md = table(rows, checks, a=a, device=dev_name, bw=bw)
        summary = dict(device=dev_name, versions=versions, dtype=str(dtype), smoke=a.smoke, bandwidth=bw,
                       wall_s=round(time.perf_counter() - t_start, 1), checks_ok=all(c["ok"] for c in checks),
                       checks=checks, timings=rows)
        if out:
            (out / "bench_gpu.md").write_text(md + "\n")
            (out / "bench_gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
            (out / "profile.txt").write_text("\n\n".join(profiles) + "\n")
        return md, summary

    for name in models:
        cfg = hf_config(name, smoke=a.smoke)
        t0 = time.perf_counter()
        try:
            checks += run_checks(cfg, name, smoke=a.smoke, device=device, dtypes=(torch.float32, torch.bfloat16))
        except Exception as exc:
            checks.append(_row(name, "?", "?", f"{type(exc).__name__}: {exc}", False))
            traceback.print_exc()
        ok = sum(c["ok"] for c in checks if c["model"] == name)
        print(f"checks {name}: {ok}/{sum(c['model'] == name for c in checks)} ok ({time.perf_counter() - t0:.1f} s)", flush=True)
        for c in checks:
            if c["model"] == name and not c["ok"]:
                print(f"  FAIL {c}", flush=True)
    save()
    for name in [] if a.checks_only else models:
        if time.perf_counter() - t_start > a.budget_s:
            print(f"budget spent: skipping {name}", flush=True)
            continue
        cfg, hf, model = make_models(name, smoke=a.smoke, device=device, dtype=dtype)
        # the fused static steps run eagerly first (no graph), so a failed capture still leaves numbers
        runner_ng = CudaRunner(model, graphs=False, kernels=True, gemv=False, verify_tokens=a.verify_tokens) if cuda else None
        runner = CudaRunner(model, graphs=cuda, kernels=True, gemv=False, verify_tokens=a.verify_tokens)  # cuBLAS
        runner_gemv = CudaRunner(model, graphs=cuda, kernels=True, gemv=True, verify_tokens=a.verify_tokens)
        for i, ctx in enumerate(contexts):
            if time.perf_counter() - t_start > a.budget_s:
                print(f"budget spent: skipping {name} at {ctx}", flush=True)
                continue
            t0 = time.perf_counter()
            r = run_timings(name, cfg, hf=hf, model=model, runner=runner, runner_ng=runner_ng, runner_gemv=runner_gemv,
                            ctx=ctx, a=a, dtype=dtype, bw=bw,
                            profile_out=profiles if (i == 0 and not a.no_profile) else None)
            rows.append(r)
            print(f"{name} ctx {ctx} ({time.perf_counter() - t0:.1f} s): {json.dumps(r)}", flush=True)
            save()
        del hf, model, runner, runner_ng, runner_gemv
        if cuda:
            torch.cuda.empty_cache()
    md, summary = save()
    print(json.dumps({k: v for k, v in summary.items() if k != "checks"}))  # the checks are in bench_gpu.json
    print(md)
    return 0 if summary["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
