"""Fast weights benchmark: what a decode step costs and what it agrees on, per variant.

  fp32/full  the reference: fp32 layers, the full 262k-row head
  fp32/code  fp32 layers, the head over the code vocabulary (engine.vocab) + the file's tokens
  int8/full  int8 layer weights (bf16 activations), the full head in int8
  int8/code  int8 layers, the code-vocabulary head in int8

For each: a decode step at a given context split into layers and head (medians over steps), and on
held-out code (files that built neither the vocabulary nor any threshold) teacher-forced: the share of
positions whose argmax equals the reference's, the reference's top-1 accuracy beside the variant's,
and for code heads the share of positions where the reference's argmax lies outside the head.

    python -m bench.weights [--model M] [--files 20] [--tokens 512] [--ctx 1500] [--steps 30]

A markdown table, then one JSON line keyed by variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.calibration import load_vocab
from ghostline.engine.loader import load
from ghostline.engine.quant import quantize
from ghostline.engine.vocab import corpus_files, default_roots

VARIANTS = ("fp32/full", "fp32/code", "int8/full", "int8/code")


def make(model, variant: str, rows: torch.Tensor | None):
    precision, head = variant.split("/")
    if variant == "fp32/full":
        return model
    m = copy.deepcopy(model)
    return quantize(m, linear=precision == "int8", rows=rows if head == "code" else
                    (torch.arange(model.args.vocab_size) if precision == "int8" else None),
                    int8_head=precision == "int8")


@torch.no_grad()
def step_times(model, ids: list[int], steps: int) -> dict:
    """Median ms of a decode step's layers and head at context len(ids)."""
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(len(ids))
    cache.length = len(ids)
    for s in range(0, len(ids), 256):
        model(torch.tensor([ids[s : s + 256]]), torch.arange(s, min(len(ids), s + 256)), cache, return_hidden=True)
    scratch = ScratchCache(cache, len(ids), steps + 1)
    layers, head, tok = [], [], ids[-1]
    for i in range(steps):
        t0 = time.perf_counter()
        h = model(torch.tensor([[tok]]), torch.tensor([len(ids) + i]), scratch, return_hidden=True)
        t1 = time.perf_counter()
        tok = int(model.head(h)[0, -1].argmax())
        t2 = time.perf_counter()
        layers.append((t1 - t0) * 1e3)
        head.append((t2 - t1) * 1e3)
    lm, hm = statistics.median(layers[2:]), statistics.median(head[2:])
    return {"layers_ms": round(lm, 2), "head_ms": round(hm, 2), "step_ms": round(lm + hm, 2)}


@torch.no_grad()
def argmaxes(model, ids: list[int]) -> torch.Tensor:
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(len(ids))
    cache.length = len(ids)
    hidden = torch.cat([model(torch.tensor([ids[s : s + 256]]), torch.arange(s, min(len(ids), s + 256)), cache,
                              return_hidden=True)[0] for s in range(0, len(ids), 256)])
    return torch.cat([model.head(hidden[s : s + 128]).argmax(-1) for s in range(0, len(ids), 128)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--tokens", type=int, default=512, help="tokens per held-out file")
    p.add_argument("--ctx", type=int, default=1500)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    loaded = load(args.model)
    tok, base = loaded.tokenizer, loaded.model
    vocab = load_vocab(loaded.source.stem)
    variants = [v for v in args.variants.split(",") if v]
    if vocab is None:
        variants = [v for v in variants if not v.endswith("/code")]
        print("no code vocabulary for this model: code-head variants skipped (run `ghostline calibrate`)")
    files = corpus_files(default_roots(), holdout=True, per_suffix=max(2, args.files // 4))
    files = [f for f in files if f.suffix in {".py", ".js", ".ts", ".c", ".h", ".lua"}]
    texts = []
    for f in sorted(files, key=lambda f: hash(f.name) % 997):
        try:
            ids = tok.encode(f.read_text(encoding="utf-8"))[0][: args.tokens]
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) >= 64:
            texts.append(ids)
        if len(texts) == args.files:
            break
    ctx_ids = [i for ids in texts for i in ids][: args.ctx]
    ref = [argmaxes(base, ids) for ids in texts]
    truth = torch.cat([torch.tensor(ids[1:]) for ids in texts])
    ref_all = torch.cat([r[:-1] for r in ref])
    results = {}
    for v in variants:
        rows = None
        if v.endswith("/code"):
            rows = torch.as_tensor(vocab, dtype=torch.long)
        m = make(base, v, rows)
        t0 = time.perf_counter()
        agree, outside = [], []
        for ids, r in zip(texts, ref):
            if rows is not None:  # as the engine does: the file's own tokens join the head
                m.lm_head.include(torch.tensor(ids))
            got = argmaxes(m, ids)
            agree.append((got == r)[:-1])
            if rows is not None:
                outside.append(~m.lm_head.member[r[:-1]])
        agree = torch.cat(agree)
        pred = torch.cat([argmaxes(m, ids)[:-1] for ids in texts]) if v == "fp32/full" else None
        res = step_times(m, ctx_ids, args.steps)
        res["agree"] = round(float(agree.float().mean()), 4)
        res["top1_acc_ref"] = round(float((ref_all == truth).float().mean()), 4)
        res["outside"] = round(float(torch.cat(outside).float().mean()), 5) if outside else 0.0
        res["positions"] = int(len(agree))
        res["bench_s"] = round(time.perf_counter() - t0, 1)
        if pred is not None:
            res["top1_acc"] = round(float((pred == truth).float().mean()), 4)
        results[v] = res
        print(f"{v}: {res}", flush=True)
        if m is not base:
            del m
    print(f"| variant | step ms | layers ms | head ms | argmax = fp32/full | ref outside head |\n|---|---|---|---|---|---|")
    for v, r in results.items():
        print(f"| {v} | {r['step_ms']:.1f} | {r['layers_ms']:.1f} | {r['head_ms']:.1f} | {100 * r['agree']:.2f}% | "
              f"{100 * r['outside']:.3f}% |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
