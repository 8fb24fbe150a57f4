"""The decode path on CUDA: static shapes, fused small ops, one CUDA graph per step shape.

A *static step* runs T tokens through the model with every shape and address fixed, so it can be
captured once in a CUDA graph and replayed for every later step:

- inputs live in preallocated buffers: `ids` [1, T] and `meta` (int64 on the device: prefix length,
  position of segment B's row 0, the first row written, how many rows are valid);
- attention covers two fixed-capacity segments, the document's cache (segment A, rows below
  meta[0]) and a scratch area (segment B, the rows written so far), masked by those device-side
  lengths (`kernels.segment_attention.static_attention`); when encoding an edit (PIE), segment B is
  the document cache itself and there is no segment A;
- between the matrix products, one fused kernel each for norm + residual, QK-norm + RoPE + cache
  write, and the activation (`kernels.fused`); q|k|v and gate|up are one product each (the module
  weights become views of the fused ones, so no memory is duplicated);
- the greedy token is written back into `ids` and meta's row advanced inside the step, so decoding
  needs no host work between steps but reading each token, and the next step is launched before
  the current token is read.

On the CPU (or with `graphs=False`) the same step runs eagerly through the torch references of the
fused ops: that is the path the tests compare with `engine.decoding.greedy` token for token. On
CUDA the Triton kernels run and the step is captured (`torch.cuda.CUDAGraph`) at its first use
for a given (mode, T, cache storage); a cache that grows (new storage) is captured again.

    runner = CudaRunner(model)                      # model already bf16 on CUDA
    scratch = runner.scratch(doc_cache, start, 48)  # the runner's fixed scratch rows
    for tok in runner.greedy(scratch, first, max_new=32): ...
    runner.encode(doc_cache, new_ids, start)        # PIE: encode the edited span over the prefix
    runner.verify(scratch, [tok] + draft, pos)      # one verify step of k+1 tokens
    runner.speculative(scratch, first, context=ids, proposer=PromptLookup(), max_new=32)
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.decoding.speculative import speculative
from ghostline.kernels.fused import act_mul, gemv_triton, qk_rope_write, residual_norm
from ghostline.kernels.segment_attention import static_attention, static_plan
from ghostline.kernels.segment_attention import triton as _triton

HAVE_TRITON = _triton is not None
# "auto" GEMV: H200, bench/gpu.py: the Triton kernel beat cuBLAS on Gemma 3 270M's products (at most
# 2.6M weights each: 3.7 us against 4.4 us a launch) and lost on the 1.3B Llama's (4.2M to 22.5M).
GEMV_MAX_ELEMENTS = 3_000_000


@dataclass
class LayerWeights:
    wqkv: torch.Tensor  # [(H + 2 KV) hd, D]
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    wgu: torch.Tensor  # [2 F, D]
    wdown: torch.Tensor
    in_norm: torch.Tensor
    post_attn: torch.Tensor  # Gemma: post-attention norm; Llama: the pre-MLP norm
    pre_ff: torch.Tensor | None  # Gemma only
    post_ff: torch.Tensor | None  # Gemma only
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    inv_freq: torch.Tensor  # [hd/2] fp32
    window: int | None


def fuse_weights(model) -> list[LayerWeights]:
    """Per-layer weights for the static step. q|k|v and gate|up are concatenated once and the
    model's own parameters re-pointed to views of them (same values, no second copy)."""
    cached = getattr(model, "_static_weights", None)
    if cached is not None:
        return cached
    a = model.args
    gemma = a.family == "gemma3"
    out = []
    for i, blk in enumerate(model.layers):
        at, mlp = blk.self_attn, blk.mlp
        lins = [at.q_proj, at.k_proj, at.v_proj]
        wqkv = torch.cat([m.weight for m in lins])
        bqkv = torch.cat([m.bias for m in lins]) if at.q_proj.bias is not None else None
        off = 0
        for m in lins:
            n = m.weight.shape[0]
            m.weight.data = wqkv[off : off + n]
            if bqkv is not None:
                m.bias.data = bqkv[off : off + n]
            off += n
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        f = mlp.gate_proj.weight.shape[0]
        mlp.gate_proj.weight.data, mlp.up_proj.weight.data = wgu[:f], wgu[f:]
        out.append(LayerWeights(
            wqkv=wqkv, bqkv=bqkv, wo=at.o_proj.weight, wgu=wgu, wdown=mlp.down_proj.weight,
            in_norm=blk.input_layernorm.weight, post_attn=blk.post_attention_layernorm.weight,
            pre_ff=blk.pre_feedforward_layernorm.weight if gemma else None,
            post_ff=blk.post_feedforward_layernorm.weight if gemma else None,
            q_norm=at.q_norm.weight if gemma else None, k_norm=at.k_norm.weight if gemma else None,
            inv_freq=a.inv_freq[i].float().contiguous().to(wqkv.device), window=a.windows[i],
        ))
    model._static_weights = out
    return out


def _storage_key(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


class StaticStep:
    """One forward of T tokens with fixed shapes and addresses (see the module's notes).

    mode "decode": T = 1, greedy token fed back into `ids`, meta's row advanced by one.
    mode "verify": greedy choices of all T positions into `choice`.
    mode "encode": no head; rows t < meta[VALID] written into segment B (the document cache).
    """

    def __init__(self, runner: "CudaRunner", mode: str, T: int, seg_a, seg_b):
        self.runner, self.mode, self.T = runner, mode, T
        self.seg_a, self.seg_b = seg_a, seg_b  # (k, v) [L, KV, cap, hd] or None
        device = runner.device
        self.ids = torch.zeros(1, T, dtype=torch.long, device=device)
        self.meta = torch.zeros(4, dtype=torch.long, device=device)
        self.choice = torch.zeros(T, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        a = runner.model.args
        cap_a = seg_a[0].shape[2] if seg_a is not None else 0
        self.plan = None
        if runner.kernels:
            self.plan = static_plan(T=T, G=a.n_heads // a.n_kv_heads, KV=a.n_kv_heads, hd=a.head_dim,
                                    cap_a=cap_a, cap_b=seg_b[0].shape[2], device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.no_grad()
    def body(self) -> None:
        """The step's work (captured by `capture`; call `run`, which replays the graph when there is one)."""
        r = self.runner
        m, a, T, kern = r.model, r.model.args, self.T, r.kernels
        H, KV, hd = a.n_heads, a.n_kv_heads, a.head_dim
        gemma = a.family == "gemma3"
        offset = 1.0 if gemma else 0.0
        eps = a.norm_eps
        kb, vb = self.seg_b
        x = m.embed(self.ids)[0]  # [T, D], a fresh tensor: updated in place below
        layers = r.layers
        use_gemv = r.gemv_for if (kern and T == 1) else (lambda w: False)

        def linear(x, w, b=None):
            return gemv_triton(x, w, b) if use_gemv(w) else F.linear(x, w, b)

        h = residual_norm(x, None, None, layers[0].in_norm, eps=eps, offset=offset, kernel=kern)
        for i, w in enumerate(layers):
            qkv = linear(h, w.wqkv, w.bqkv)
            q = qk_rope_write(qkv, self.meta, w.inv_freq, w.q_norm, w.k_norm, kb[i], vb[i],
                              n_heads=H, n_kv=KV, head_dim=hd, eps=eps, kernel=kern)
            seg_a = (self.seg_a[0][i], self.seg_a[1][i]) if self.seg_a is not None else None
            o = static_attention(q, seg_a, (kb[i], vb[i]), self.meta, scale=a.attn_scale, window=w.window,
                                 softcap=a.attn_softcap, plan=self.plan, kernel=kern)
            att = linear(o.reshape(T, H * hd), w.wo)
            h = residual_norm(x, att, w.post_attn if gemma else None, w.pre_ff if gemma else w.post_attn,
                              eps=eps, offset=offset, kernel=kern)
            if use_gemv(w.wdown):  # the activation is read on the fly by the down projection
                d = gemv_triton(linear(h, w.wgu), w.wdown, act=a.act)
            else:
                d = F.linear(act_mul(F.linear(h, w.wgu), act=a.act, kernel=kern), w.wdown)
            nxt = layers[i + 1].in_norm if i + 1 < len(layers) else m.norm.weight
            h = residual_norm(x, d, w.post_ff if gemma else None, nxt, eps=eps, offset=offset, kernel=kern)
        if self.mode == "encode":
            return
        hh = h[-1:] if self.mode == "decode" else h
        logits = F.linear(hh, m.lm_head.weight)
        if a.final_softcap:
            logits = torch.tanh(logits / a.final_softcap) * a.final_softcap
        self.logits = logits  # [1 or T, V]
        tok = logits.argmax(-1)
        if self.mode == "decode":
            self.ids.view(-1).copy_(tok)
            self.meta[2:3].add_(1)
        else:
            self.choice.copy_(tok)

    def capture(self) -> None:
        """Warm up (Triton compiles, cuBLAS picks kernels) with nothing valid to write, then capture."""
        self.meta.zero_()  # no valid rows: the warm-up writes no cache row
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(side):
            self.body()
            self.body()
        torch.cuda.current_stream(self.runner.device).wait_stream(side)
        self.meta.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body()
        self.graph = graph

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()


class CudaRunner:
    """Static-shape decode, verify and encode steps over one model (see the module's notes).

    `graphs` (default: model on CUDA) captures each step shape in a CUDA graph; `kernels` (default:
    model on CUDA) runs the Triton kernels instead of the torch references. `scratch_rows` is the
    fixed scratch capacity; `verify_tokens` the fixed T of a verify step (k + 1, drafts padded);
    `encode_buckets` the T of encode steps (an edit of m tokens runs in the smallest that holds it);
    `gemv` runs the decode step's matrix-vector products through `kernels.fused.gemv_triton`
    (with the activation fused into the down projection) instead of cuBLAS: True, False, or "auto"
    (the default: matrices of at most GEMV_MAX_ELEMENTS weights, where the Triton kernel measured
    faster on an H200; cuBLAS for larger ones, where it measured faster; see bench/RESULTS.md)."""

    def __init__(self, model, *, scratch_rows: int = 256, verify_tokens: int = 8,
                 encode_buckets=(8, 16, 32, 64), graphs: bool | None = None, kernels: bool | None = None,
                 gemv: bool | str = "auto", max_graphs: int = 8):
        self.model = model
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        on_cuda = w.is_cuda
        self.graphs = on_cuda if graphs is None else graphs
        self.kernels = (on_cuda if kernels is None else kernels) and HAVE_TRITON
        if self.graphs and not (on_cuda and self.kernels):
            raise ValueError("CUDA graphs need the model on a CUDA device and Triton (the references read meta on the host)")
        if gemv not in (True, False, "auto"):
            raise ValueError("gemv must be True, False or 'auto'")
        self.gemv = gemv
        self.layers = fuse_weights(model)
        a = model.args
        self.scratch_rows, self.verify_tokens = scratch_rows, verify_tokens
        self.encode_buckets = tuple(sorted(encode_buckets))
        shape = (a.n_layers, 1, a.n_kv_heads, scratch_rows, a.head_dim)
        self.scratch_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.scratch_v = torch.zeros_like(self.scratch_k)
        self.steps: OrderedDict = OrderedDict()
        self.max_graphs = max_graphs
        self.captures = 0
        self._tokens = torch.zeros(max(1024, scratch_rows), dtype=torch.long, pin_memory=on_cuda)  # D2H target

    # helpers -------------------------------------------------------------------------------------

    def gemv_for(self, w: torch.Tensor) -> bool:
        """Whether a one-token product with weights w goes through the Triton GEMV (else cuBLAS)."""
        if self.gemv == "auto":
            return w.numel() <= GEMV_MAX_ELEMENTS
        return bool(self.gemv)

    def scratch(self, prefix: KVCache, start: int, capacity: int) -> ScratchCache:
        """A ScratchCache over `prefix` at `start` that writes the runner's fixed scratch rows."""
        return ScratchCache(prefix, start, capacity, storage=(self.scratch_k, self.scratch_v))

    def step(self, mode: str, T: int, seg_a, seg_b) -> StaticStep:
        """The step for this shape and these cache storages, captured on first use (graphs)."""
        key = (mode, T, _storage_key(seg_a[0]) if seg_a else None, _storage_key(seg_a[1]) if seg_a else None,
               _storage_key(seg_b[0]), _storage_key(seg_b[1]))
        st = self.steps.get(key)
        if st is None:
            st = StaticStep(self, mode, T, seg_a, seg_b)
            if self.graphs:
                st.capture()
                self.captures += 1
            self.steps[key] = st
            while len(self.steps) > self.max_graphs:
                self.steps.popitem(last=False)
        self.steps.move_to_end(key)
        return st

    @staticmethod
    def _set_meta(st: StaticStep, len_a: int, pos_b0: int, row0: int, valid: int) -> None:
        """meta <- host values without a device sync: an asynchronous copy from pageable memory is
        staged by the driver before the call returns, so the host tensor may go at once."""
        st.meta.copy_(torch.tensor([len_a, pos_b0, row0, valid], dtype=torch.long), non_blocking=True)

    @staticmethod
    def _set_ids(st: StaticStep, ids: list[int]) -> None:
        pad = ids + [0] * (st.T - len(ids))
        st.ids.copy_(torch.tensor([pad], dtype=torch.long), non_blocking=True)

    @staticmethod
    def _segments(cache: ScratchCache):
        p = cache.prefix
        return (p.k, p.v), (cache.k[:, 0], cache.v[:, 0])

    def _check_scratch(self, cache: ScratchCache) -> None:
        if cache.k.shape[1] != 1:
            raise ValueError("the static path decodes one sequence (batch 1)")

    # decoding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def greedy(self, cache: ScratchCache, first: int, *, max_new: int,
               first_mask: torch.Tensor | None = None) -> Iterator[int]:
        """`engine.decoding.greedy` on static steps: same contract, same tokens."""
        if max_new <= 0:
            return
        self._check_scratch(cache)
        if max_new > cache.k.shape[3]:
            raise IndexError(f"scratch area full ({cache.k.shape[3]} rows)")
        seg_a, seg_b = self._segments(cache)
        st = self.step("decode", 1, seg_a, seg_b)
        mask = None if first_mask is None else first_mask.to(self.device, non_blocking=True)
        st.ids.fill_(first)
        self._set_meta(st, cache.start, cache.start, 0, 1)
        cuda = self.device.type == "cuda"
        toks = self._tokens if max_new <= len(self._tokens) else torch.zeros(max_new, dtype=torch.long, pin_memory=cuda)
        events = []

        def launch(i: int) -> None:
            st.run()
            if i == 0 and mask is not None:
                masked = st.logits[-1].masked_fill(~mask, float("-inf"))
                st.ids.view(-1).copy_(masked.argmax(-1, keepdim=True))
            toks[i : i + 1].copy_(st.ids.view(-1), non_blocking=cuda)
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                events.append(ev)

        launch(0)
        launched = 1
        for i in range(max_new):
            if launched < max_new:  # run ahead by one step: the device feeds its own token back
                launch(launched)
                launched += 1
            if cuda:
                events[i].synchronize()
            cache.length = max(cache.length, launched)
            yield int(toks[i])

    @torch.no_grad()
    def verify(self, cache: ScratchCache, tokens: list[int], pos: int, *,
               logits: bool = False) -> tuple[list[int], torch.Tensor | None]:
        """One verify step (`engine.decoding.speculative`'s verifier): tokens (the current token + a
        draft, at most `verify_tokens`) at positions pos..; the greedy choice after each (the draft
        is padded to the fixed T) and, with `logits`, a copy of their rows [T, V]."""
        T = self.verify_tokens
        if not 0 < len(tokens) <= T:
            raise ValueError(f"a verify step takes 1..{T} tokens")
        self._check_scratch(cache)
        row0 = pos - cache.start
        if row0 + len(tokens) > cache.k.shape[3]:
            raise IndexError(f"scratch area full ({cache.k.shape[3]} rows)")
        seg_a, seg_b = self._segments(cache)
        st = self.step("verify", T, seg_a, seg_b)
        self._set_ids(st, list(tokens))
        self._set_meta(st, cache.start, cache.start, row0, len(tokens))
        st.run()
        cache.length = max(cache.length, row0 + len(tokens))
        rows = st.logits[: len(tokens)].clone() if logits else None
        return st.choice[: len(tokens)].tolist(), rows

    def speculative(self, cache: ScratchCache, first: int, **kw) -> Iterator[int]:
        """`engine.decoding.speculative` with this runner's static verify steps (drafts of at most
        verify_tokens - 1): the same tokens as `greedy` whatever the proposer says."""
        return speculative(self.model, cache, first, verifier=self, **kw)

    # PIE -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, cache: KVCache, ids, start: int) -> None:
        """Encode ids into rows start.. of a document cache over its rows [0, start) (what
        `Engine._encode` does for an edited span), in static steps of the smallest bucket that
        holds the span (spans longer than the largest bucket go in several steps)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        end = start + len(ids)
        cache.reserve(max(cache.length, end))
        cache.length = max(cache.length, end)
        top = self.encode_buckets[-1]
        for s in range(start, end, top):
            chunk = ids[s - start : s - start + top]
            T = next(b for b in self.encode_buckets if b >= len(chunk))
            st = self.step("encode", T, None, (cache.k, cache.v))
            self._set_ids(st, chunk)
            self._set_meta(st, 0, 0, s, len(chunk))
            st.run()


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def runner_for(model, **kw) -> CudaRunner:
    """The model's shared runner (created on first use with `kw`)."""
    r = _RUNNERS.get(model)
    if r is None:
        r = _RUNNERS[model] = CudaRunner(model, **kw)
    return r


def cuda_greedy(model, cache: ScratchCache, first: int, *, max_new: int,
                first_mask: torch.Tensor | None = None) -> Iterator[int]:
    """Drop-in for `engine.decoding.greedy.greedy` (ids in, ids out) through the model's runner."""
    return runner_for(model).greedy(cache, first, max_new=max_new, first_mask=first_mask)
