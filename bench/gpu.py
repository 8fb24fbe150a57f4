"""One-call GPU session: check both Triton kernels against their references, then time the engine.

    python -m bench.gpu            # on a CUDA machine: checks, then timings (about 2-4 minutes)
    python -m bench.gpu --smoke    # anywhere: tiny shapes, few iterations (CPU: kernels interpreted)

Models (random weights, HF configs): Gemma 3 270M (18 layers, 1 KV head, 4 q heads, head_dim 256,
sliding window 512 on 5 of every 6 layers) and a DeepSeek-Coder-1.3B-shaped Llama (24 layers, 16
heads, 16 KV heads, head_dim 128). At each context length it times, with the torch references
("torch") and the Triton kernels ("triton") patched into the engine:
  shift    rope_shift of the suffix after a mid-file edit (delta = +20)
  pie      the PIE update: shift + encoding the 20 new tokens
  suggest  a 32-token greedy suggestion over a scratch area (cursor at the end of the document)
and HF transformers (eager attention) for the same work: re-encoding the suffix from the edit over
a cached prefix, and `generate` of 32 tokens over a cached context. Medians of CUDA-event timings.
Prints progress, then a markdown table, then one JSON line (also written to --out or $OUT).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations, to check the script runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--models", default="gemma3-270m,dscoder-1.3b")
    p.add_argument("--contexts", default=None, help="comma-separated context lengths (default 2048,8192)")
    p.add_argument("--new-tokens", type=int, default=None, help="suggestion length (32; 8 with --smoke)")
    p.add_argument("--edit-tokens", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=480.0, help="skip remaining timings past this wall time")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--checks-only", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_gpu.json and bench_gpu.md")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":  # Triton runs CPU tensors only in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of a kernel module

import engine.cache  # noqa: E402
import engine.model  # noqa: E402
import kernels.segment_attention  # noqa: E402
from engine.cache import KVCache, ScratchCache  # noqa: E402
from engine.model import build  # noqa: E402
from kernels.rope_shift import rope_shift_reference, rope_shift_triton  # noqa: E402
from kernels.segment_attention import (  # noqa: E402
    MAX_QUERY_TOKENS,
    segment_attention,
    segment_attention_triton,
)
from kernels.testing import exact_attention, three_way  # noqa: E402


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
    """A random-weight HF model (eager attention) and the engine's Transformer sharing its weights."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(name, smoke=smoke)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager").eval()
    model = build(cfg, hf.state_dict(), dtype=dtype)
    # The engine keeps RoPE tables on the CPU; the forward needs them beside the weights.
    model.rope_freqs = model.rope_freqs.to(device)
    model.args.inv_freq = model.args.inv_freq.to(device)
    return cfg, hf, model


# engine paths ------------------------------------------------------------------------------------


def kernel_attend(q, segments, qpos, *, scale, window=None, softcap=None):
    """`kernels.segment_attention.attend` without its CUDA test, so --smoke runs the kernel on CPU."""
    if q.shape[2] <= MAX_QUERY_TOKENS:
        return segment_attention_triton(q, segments, qpos, scale=scale, window=window, softcap=softcap)
    return segment_attention(q, segments, qpos, scale=scale, window=window, softcap=softcap)


PATHS = {
    "torch": (segment_attention, rope_shift_reference),
    "triton": (kernel_attend, rope_shift_triton),
}


@contextmanager
def engine_path(name: str):
    """Patch the engine's attention and PIE shift to one implementation for the duration."""
    saved = engine.model.segment_attention, engine.cache.rope_shift
    engine.model.segment_attention, engine.cache.rope_shift = PATHS[name]
    try:
        yield
    finally:
        engine.model.segment_attention, engine.cache.rope_shift = saved


@torch.no_grad()
def encode(model, cache: KVCache, *, ids: torch.Tensor, start: int, chunk: int) -> None:
    """ids [n] into rows start.. of the cache, in chunks (as `Engine._encode` does)."""
    end = start + ids.shape[0]
    cache.reserve(max(cache.length, end))
    cache.length = max(cache.length, end)
    for s in range(start, end, chunk):
        e = min(end, s + chunk)
        pos = torch.arange(s, e, device=ids.device)
        model(ids[None, s - start : e - start], pos, cache, return_hidden=True, last_only=True)


@torch.no_grad()
def suggest(model, cache: KVCache, first: int, *, n: int) -> list[int]:
    """`engine.decoding.greedy` over a scratch area at the end of the cache, with ids and positions
    on the model's device (the engine's loop builds them on the CPU)."""
    device = cache.k.device
    scratch = ScratchCache(cache, cache.length - 1, n + 1)
    tok, pos, out = first, cache.length - 1, []
    for _ in range(n):
        logits = model(torch.tensor([[tok]], device=device), torch.tensor([pos], device=device), scratch)[0, -1]
        tok = int(logits.argmax())
        pos += 1
        out.append(tok)
    return out


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
    return dict(L=cfg.num_hidden_layers, KV=KV, G=G, hd=hd), rope, attn


def nan_workspace(rows: int, n_splits: int, *, hd: int, device):
    """The launcher's partial buffers, poisoned: a split a program never writes turns the output NaN."""
    m = torch.full((rows, n_splits), float("nan"), device=device)
    return m, m.clone(), torch.full((rows, n_splits, hd), float("nan"), device=device)


def run_checks(cfg, name: str, *, smoke: bool, device: str, dtypes) -> list[dict]:
    """Each kernel against its reference on fresh random inputs, three-way against an fp64 oracle,
    with the destination / output poisoned with NaN first."""
    shape, rope_cases, attn_cases = check_cases(cfg, smoke=smoke)
    L, KV, G, hd = shape["L"], shape["KV"], shape["G"], shape["hd"]
    inv_freq = engine.model.ModelArgs.from_hf(cfg).inv_freq.to(device)  # [L, hd/2]
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        for cap, src, end, dst in rope_cases:
            k0 = torch.randn(L, KV, cap, hd, generator=gen, device=device).to(dtype)
            v0 = torch.randn(L, KV, cap, hd, generator=gen, device=device).to(dtype)
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
            ok = ok and torch.equal(v, v_ref)
            rows.append(dict(model=name, kernel="rope_shift", dtype=str(dtype).removeprefix("torch."),
                             case=f"rows {src}:{end} -> {dst}", ok=ok, err=err, ref_err=ref_err, eps=eps))
        for c in attn_cases:
            B, T, P, S, window, softcap = c["B"], c["T"], c["P"], c["S"], c["window"], c["softcap"]
            H = KV * G
            q = torch.randn(B, T, H, hd, generator=gen, device=device).to(dtype).transpose(1, 2)  # [B, H, T, hd]
            cache_k = torch.randn(KV, P + 64, hd, generator=gen, device=device).to(dtype)
            cache_v = torch.randn(KV, P + 64, hd, generator=gen, device=device).to(dtype)
            sk = torch.randn(B, KV, S + 8, hd, generator=gen, device=device).to(dtype)
            sv = torch.randn(B, KV, S + 8, hd, generator=gen, device=device).to(dtype)
            segments = [(cache_k[None, :, :P], cache_v[None, :, :P], 0), (sk[:, :, :S], sv[:, :, :S], P)]
            qpos = torch.arange(P + S - T, P + S, device=device)
            kw = dict(scale=hd**-0.5, window=window, softcap=softcap)
            out = torch.full((B, H, T, hd), float("nan"), dtype=dtype, device=device)
            with mock.patch.object(kernels.segment_attention, "_workspace", nan_workspace):
                segment_attention_triton(q, segments, qpos, **kw, out=out)
            ref = segment_attention(q, segments, qpos, **kw)
            ok, err, ref_err, eps = three_way(out, ref, exact=exact_attention(q, segments, qpos, **kw))
            rows.append(dict(model=name, kernel="segment_attention", dtype=str(dtype).removeprefix("torch."),
                             case=f"B{B} T{T} P{P}+{S} w{window} cap{softcap}", ok=ok, err=err, ref_err=ref_err, eps=eps))
    return rows


# timings -----------------------------------------------------------------------------------------


def run_timings(name: str, cfg, *, hf, model, ctx: int, a: argparse.Namespace, dtype) -> dict:
    """Times for one model at one context length; each part guarded so one failure keeps the rest."""
    device, smoke = a.device, a.smoke
    iters = dict(shift=2 if smoke else 50, pie=2 if smoke else 20, suggest=1 if smoke else 5, hf=1 if smoke else 3)
    warm = 1
    chunk = 32 if smoke else 1024
    E = a.edit_tokens
    gen = torch.Generator(device=device).manual_seed(ctx)
    ids = torch.randint(0, cfg.vocab_size, (ctx,), generator=gen, device=device)
    new = torch.randint(0, cfg.vocab_size, (E,), generator=gen, device=device)
    mid = ctx // 2
    res: dict = dict(model=name, ctx=ctx)
    margs = model.args
    cache = KVCache(margs.n_layers, margs.n_kv_heads, margs.head_dim, dtype=dtype, device=device)
    cache.reserve(ctx + E)
    t0 = time.perf_counter()
    with engine_path("torch"):
        encode(model, cache, ids=ids, start=0, chunk=chunk)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res["prefill_ms"] = (time.perf_counter() - t0) * 1e3
    f = margs.inv_freq
    tokens = {}
    for path in ("torch", "triton"):
        _, shift = PATHS[path]
        with engine_path(path):
            try:
                res[f"shift_{path}"] = timed(
                    lambda: shift(cache.k, cache.v, mid, ctx, mid + E, f),
                    after=lambda: shift(cache.k, cache.v, mid + E, ctx + E, mid, f),
                    iters=iters["shift"], warmup=warm, device=device)

                def pie():
                    cache.splice(mid, mid, E, inv_freq=f)
                    encode(model, cache, ids=new, start=mid, chunk=chunk)

                res[f"pie_{path}"] = timed(pie, after=lambda: cache.splice(mid, mid + E, 0, inv_freq=f),
                                           iters=iters["pie"], warmup=warm, device=device)
                encode(model, cache, ids=ids[mid:], start=mid, chunk=chunk)  # undo the round trips' rounding drift
                first = int(ids[-1])
                res[f"suggest_{path}"] = timed(lambda: tokens.__setitem__(path, suggest(model, cache, first, n=a.new_tokens)),
                                               iters=iters["suggest"], warmup=warm, device=device)
            except Exception as exc:  # keep the session's other numbers
                res[f"error_{path}"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
    if "torch" in tokens and "triton" in tokens:
        res["suggest_same_tokens"] = sum(x == y for x, y in zip(tokens["torch"], tokens["triton"]))
    if not a.skip_hf:
        try:
            res.update(hf_timings(hf, ids, new=new, mid=mid, a=a, iters=iters["hf"], warm=warm, engine_tokens=tokens.get("torch")))
        except Exception as exc:
            res["error_hf"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
    return res


@torch.no_grad()
def hf_timings(hf, ids, *, new, mid: int, a: argparse.Namespace, iters: int, warm: int, engine_tokens) -> dict:
    """HF eager: the suffix re-encoded over a cached prefix (what an engine without PIE does after
    the edit), and `generate` of new tokens over a cached context. Caches are copied untimed."""
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
    return "-" if x is None else f"{x:.2f}"


def table(rows: list[dict], checks: list[dict], *, a: argparse.Namespace) -> str:
    lines = [
        "| model | ctx | part | torch ms | triton ms | HF eager ms | torch/triton | HF/triton |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for part in ("shift", "pie", "suggest"):
            t, k, h = r.get(f"{part}_torch"), r.get(f"{part}_triton"), r.get(f"{part}_hf")
            speed = f"{t / k:.2f}x" if t and k else "-"
            vs_hf = f"{h / k:.2f}x" if h and k else "-"
            lines.append(f"| {r['model']} | {r['ctx']} | {part} | {fmt(t)} | {fmt(k)} | {fmt(h)} | {speed} | {vs_hf} |")
    bad = [c for c in checks if not c["ok"]]
    lines.append("")
    lines.append(f"checks: {len(checks) - len(bad)}/{len(checks)} ok" + "".join(
        f"\n  FAIL {c['model']} {c['kernel']} {c['dtype']} {c['case']}: err {c['err']:.3g} ref {c['ref_err']:.3g}" for c in bad))
    lines.append(f"shift: rope_shift of the suffix by +{a.edit_tokens}; pie: shift + encode {a.edit_tokens} tokens "
                 f"(HF: re-encode the suffix over a cached prefix); suggest: {a.new_tokens} greedy tokens "
                 "(HF: generate over a cached context)")
    return "\n".join(lines)


def main(a: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()
    a.new_tokens = a.new_tokens or (8 if a.smoke else 32)
    device = a.device
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    contexts = [int(c) for c in (a.contexts or ("48,96" if a.smoke else "2048,8192")).split(",")]
    dev_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu (triton interpreter)"
    print(f"device {dev_name}, dtype {dtype}, contexts {contexts}, smoke {a.smoke}", flush=True)
    checks, rows = [], []
    models = a.models.split(",")
    for name in models:
        cfg = hf_config(name, smoke=a.smoke)
        t0 = time.perf_counter()
        try:
            checks += run_checks(cfg, name, smoke=a.smoke, device=device, dtypes=(torch.float32, torch.bfloat16))
        except Exception as exc:
            checks.append(dict(model=name, kernel="?", dtype="?", case=f"{type(exc).__name__}: {exc}", ok=False,
                               err=float("nan"), ref_err=float("nan"), eps=float("nan")))
            traceback.print_exc()
        ok = sum(c["ok"] for c in checks if c["model"] == name)
        print(f"checks {name}: {ok}/{sum(c['model'] == name for c in checks)} ok ({time.perf_counter() - t0:.1f} s)", flush=True)
    for name in [] if a.checks_only else models:
        if time.perf_counter() - t_start > a.budget_s:
            print(f"budget spent: skipping {name}", flush=True)
            continue
        cfg, hf, model = make_models(name, smoke=a.smoke, device=device, dtype=dtype)
        for ctx in contexts:
            if time.perf_counter() - t_start > a.budget_s:
                print(f"budget spent: skipping {name} at {ctx}", flush=True)
                continue
            t0 = time.perf_counter()
            r = run_timings(name, cfg, hf=hf, model=model, ctx=ctx, a=a, dtype=dtype)
            rows.append(r)
            print(f"{name} ctx {ctx} ({time.perf_counter() - t0:.1f} s): {json.dumps(r)}", flush=True)
        del hf, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    md = table(rows, checks, a=a)
    summary = dict(device=dev_name, dtype=str(dtype), smoke=a.smoke, wall_s=round(time.perf_counter() - t_start, 1),
                   checks_ok=all(c["ok"] for c in checks), checks=checks, timings=rows)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_gpu.md").write_text(md + "\n")
        (Path(a.out) / "bench_gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(md)
    print(json.dumps(summary))
    return 0 if summary["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
