"""Fast weights for CPU decoding: int8 weight-only linear layers and a shortlist LM head.

A decode step on a CPU is bound by reading weights: Gemma 3 270M in fp32 reads 1.08 GB a step, 63% of
it the 262,144-row head. Two cuts, each measured against the fp32 reference in bench/RESULTS.md:

- `Int8Linear`: each weight row stored as int8 with one bf16 scale (4x fewer bytes than fp32). Decode
  and verify steps (up to 16 rows) run them through the C step (`kernels.step`, see `fuse`); more
  rows through bf16 copies (CPUs with AVX512-BF16) or `torch.ops.aten._weight_int8pack_mm` with bf16
  activations. The residual stream, norms, RoPE, attention and the KV cache stay fp32.
- `ShortlistHead`: the LM head over the tokens that occur in real code (`engine.vocab`) plus every token
  of the open documents. Logits outside it are -inf, so every decoder still sees a full-vocabulary
  distribution and the model's `head()` keeps its shape.

The fp32 model stays the reference: `quantize` turns a copy-free fp32 model into the fast one in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ghostline.kernels import step


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [N, K] -> int8 rows [N, K] and bf16 scales [N] with weight ~= q * scale (symmetric)."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16)  # round the scale first ...
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # ... so q fits it
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weights an int8 layer stands for (the reference for tests)."""
    return q.float() * scale.float()[:, None]


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q * scale)^T -> [..., N] in x's dtype. Up to `step.MAX_ROWS` rows on the CPU go
    through the C kernel (int16 activation codes, exact sums: the C decode step's numbers);
    otherwise activations are rounded to bf16 for torch's int8 kernel."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.device.type == "cpu" and flat.shape[0] <= step.MAX_ROWS and step.serves_gemv(flat):
        return step.gemv_int8(flat.float(), q, scale.float()).to(x.dtype).view(*x.shape[:-1], q.shape[0])
    flat = flat.to(torch.bfloat16)
    if flat.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(flat, q, scale)
    else:  # no fused kernel assumed off the CPU: same numbers, slower
        y = F.linear(flat, q.to(torch.bfloat16) * scale[:, None])
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    """A drop-in for `nn.Linear` (weights [out, in], optional fp32 bias) with int8 rows.

    `prefill=True` also keeps the weights in bf16 (2 bytes a weight more) for products of many rows
    (encoding): on a CPU with AVX512-BF16, oneDNN's bf16 matrix product runs ~3x faster there than
    `_weight_int8pack_mm`, while decode steps keep reading the int8 rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prefill: bool = False):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("qweight", q)  # [N, K] int8
        self.register_buffer("scale", scale)  # [N] bf16
        self.prefill = weight.detach().to(torch.bfloat16).contiguous() if prefill else None  # [N, K] bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_linear(cls, layer: nn.Linear, *, prefill: bool = False) -> "Int8Linear":
        return cls(layer.weight, layer.bias, prefill=prefill)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefill is not None and x.device.type == "cpu" and x[..., 0].numel() > step.MAX_ROWS:
            y = F.linear(x.to(torch.bfloat16), self.prefill).to(x.dtype)
        else:
            y = int8_matmul(x, self.qweight, self.scale)
        return y if self.bias is None else y + self.bias


class ShortlistHead(nn.Module):
    """An LM head restricted to `rows` of the full head weight [V, D], int8 or fp32.

    `forward` gives logits for the shortlist only, [..., R], in the order of `rows`; the model's
    `head()` scatters them into a full [..., V] row of -inf. `include(ids)` adds tokens (those of a
    newly opened document) so that a token the context already uses can always be chosen.
    `include(ids, scope=name)` adds them for one scope only (a client of the engine daemon): its rows
    follow the shared ones and count only while `scope` is the active one, so one client's documents
    never change another client's logits.
    """

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor, *, int8: bool = True):
        super().__init__()
        self.source, self.int8 = weight, int8  # the full head (tied embeddings: shared, not copied)
        self.member = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)  # the shared rows
        self._rows = torch.empty(0, dtype=torch.long, device=weight.device)
        self._bufs: dict[str, torch.Tensor] = {}  # row storage with spare capacity: `include` appends in place
        self._scopes: dict[str, _ScopeRows] = {}
        self.scope = ""  # whose own rows join the shared ones in `forward` and `rows`
        self.include(rows)

    @property
    def rows(self) -> torch.Tensor:
        """The token id of each column: the shared rows, then the active scope's own."""
        own = self._scopes.get(self.scope)
        if own is None or not len(own.ids):
            return self._rows
        if own.columns is None:
            own.columns = torch.cat([self._rows, own.ids])
        return own.columns

    @property
    def size(self) -> int:
        return len(self.rows)

    def _rows_of(self, name: str) -> torch.Tensor | None:
        buf = self._bufs.get(name)
        return None if buf is None else buf[: len(self._rows)]

    qweight = property(lambda self: self._rows_of("qweight"))  # int8 [R, D], the shared rows
    scale = property(lambda self: self._rows_of("scale"))  # [R]
    weight = property(lambda self: self._rows_of("weight"))  # fp32 [R, D]

    def include(self, ids: torch.Tensor, *, scope: str = "") -> int:
        """Add the tokens of `ids` not yet in the shortlist (of `scope`: its own rows, past the shared
        ones; "" the shared rows); returns how many were added."""
        ids = ids.to(self.member.device, torch.long).flatten()
        new = torch.unique(ids[~self.member[ids]])
        if scope:
            own = self._scopes.setdefault(scope, _ScopeRows(self.member.device))
            new = new[[t not in own.members for t in new.tolist()]] if len(new) else new
            if len(new):
                own.add(new, self.source.detach()[new].float(), self.int8)
            return len(new)
        if len(new) == 0:
            return 0
        _store(self._bufs, self.source.detach()[new].float(), len(self._rows), self.int8)
        self.member[new] = True
        self._rows = torch.cat([self._rows, new])
        for own in self._scopes.values():
            own.drop(self.member)
        return len(new)

    def drop(self, scope: str) -> None:
        """Forget a scope's own rows (its last document closed)."""
        self._scopes.pop(scope, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _logits(x, self._bufs, len(self._rows), self.int8)
        own = self._scopes.get(self.scope)
        if own is not None and len(own.ids):
            y = torch.cat([y, _logits(x, own.bufs, len(own.ids), self.int8)], -1)
        return y


class _ScopeRows:
    """One scope's own head rows: token ids, their weights, and the ids as a set."""

    def __init__(self, device):
        self.ids = torch.empty(0, dtype=torch.long, device=device)
        self.bufs: dict[str, torch.Tensor] = {}
        self.members: set[int] = set()
        self.columns: torch.Tensor | None = None  # the shared rows and these, made once per change

    def add(self, ids: torch.Tensor, weights: torch.Tensor, int8: bool) -> None:
        _store(self.bufs, weights, len(self.ids), int8)
        self.ids = torch.cat([self.ids, ids])
        self.members.update(ids.tolist())
        self.columns = None

    def drop(self, shared: torch.Tensor) -> None:
        """Leave out the rows the shared ones now hold (`shared`: the shared membership mask)."""
        self.columns = None
        keep = ~shared[self.ids]
        if bool(keep.all()):
            return
        n = len(self.ids)
        self.bufs = {name: buf[:n][keep].clone() for name, buf in self.bufs.items()}
        self.ids = self.ids[keep]
        self.members = set(self.ids.tolist())


def _store(bufs: dict[str, torch.Tensor], weights: torch.Tensor, n: int, int8: bool) -> None:
    """Write fp32 head rows `weights` at rows n.. of `bufs` (int8 codes and scales, or fp32)."""
    if int8:
        q, s = quantize_rows(weights)
        _append(bufs, "qweight", q, n)
        _append(bufs, "scale", s, n)
    else:
        _append(bufs, "weight", weights, n)


def _append(bufs: dict[str, torch.Tensor], name: str, values: torch.Tensor, n: int) -> None:
    """Write `values` at rows n.. of a buffer, growing it by a quarter when full (an editor opening
    files adds a few new tokens at a time; copying the whole head for each would cost ~15 ms)."""
    buf = bufs.get(name)
    need = n + len(values)
    if buf is None or len(buf) < need:
        grown = values.new_empty((max(need, need + need // 4), *values.shape[1:]))
        if buf is not None:
            grown[:n] = buf[:n]
        bufs[name] = buf = grown
    buf[n:need] = values


def _logits(x: torch.Tensor, bufs: dict[str, torch.Tensor], n: int, int8: bool) -> torch.Tensor:
    if int8:
        return int8_matmul(x, bufs["qweight"][:n], bufs["scale"][:n])
    return F.linear(x, bufs["weight"][:n].to(x.dtype))


def fast_bf16() -> bool:
    """Whether the CPU we run on multiplies bf16 matrices natively (AVX512-BF16 or AMX): only then do bf16
    prefill weights beat `_weight_int8pack_mm` (elsewhere bf16 products are emulated and slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fuse(model) -> int:
    """Give each int8 block a `kernels.step.FusedLayer` (decode and verify steps in C on the CPU); the
    block's Int8Linear modules keep serving prefill, over views of the same stacked int8 rows (no
    copy). Returns how many blocks were fused (0 where the C step cannot be built)."""
    if not step.available():
        return 0
    a, fused = model.args, 0
    lanes = step.lanes()
    if a.dim % lanes or a.hidden_dim % lanes or (a.n_heads * a.head_dim) % lanes:
        return 0
    for block in model.layers:
        att, mlp = block.self_attn, block.mlp
        parts = [att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(isinstance(p, Int8Linear) for p in parts) or att.o_proj.bias is not None:
            return fused
        qkv = _stack(att.q_proj, att.k_proj, att.v_proj)
        gu = _stack(mlp.gate_proj, mlp.up_proj)
        o = (att.o_proj.qweight, att.o_proj.scale.float().contiguous())
        down = (mlp.down_proj.qweight, mlp.down_proj.scale.float().contiguous())
        bias = None
        if att.q_proj.bias is not None:
            bias = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]).float().contiguous()
        off = 1.0 if block.gemma else 0.0
        norm = lambda n: (n.weight.float() + off).contiguous()  # noqa: E731
        norms = {"in": norm(block.input_layernorm), "post_attn": norm(block.post_attention_layernorm)}
        if block.gemma:
            norms |= {"pre_ff": norm(block.pre_feedforward_layernorm), "post_ff": norm(block.post_feedforward_layernorm),
                      "q": norm(att.q_norm), "k": norm(att.k_norm)}
        block.fused = step.FusedLayer(
            dim=a.dim, heads=a.n_heads, kv_heads=a.n_kv_heads, head_dim=a.head_dim, hidden=a.hidden_dim,
            window=a.windows[att.layer], gemma=block.gemma, eps=a.norm_eps, scale=a.attn_scale,
            softcap=a.attn_softcap, qkv=qkv, o=o, gu=gu, down=down, qkv_bias=bias, norms=norms)
        fused += 1
    model.fused_step = step.ScratchStep([b.fused for b in model.layers])
    return fused


def _stack(*layers: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 rows of `layers` stacked [sum N, K] (and fp32 scales); each layer's `qweight` becomes
    a view of its rows, so the stacked matrix costs no memory of its own."""
    q = torch.cat([m.qweight for m in layers])
    n = 0
    for m in layers:
        m.qweight = q[n : n + m.out_features]
        n += m.out_features
    return q, torch.cat([m.scale for m in layers]).float().contiguous()


LINEARS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def quantize(model, *, linear: bool = True, rows: torch.Tensor | None = None, int8_head: bool = True,
             native: bool = True, prefill: bool = True):
    """Make a fp32 model fast in place: int8 layer matrices (`linear`, with the C decode step where
    `native` and it builds: `fuse`; bf16 copies for encoding, and bf16 products in its attention,
    where `prefill` and the CPU has AVX512-BF16) and a shortlist head over `rows` (None keeps the
    full head). Embeddings, norms and the cached keys and values stay fp32."""
    if linear:
        prefill = prefill and fast_bf16()
        for block in model.layers:
            for part, name in LINEARS:
                owner = getattr(block, part)
                setattr(owner, name, Int8Linear.from_linear(getattr(owner, name), prefill=prefill))
            block.self_attn.bf16_prefill = prefill  # bf16 products in prefill attention too
        if native:
            fuse(model)
    if rows is not None:
        model.lm_head = ShortlistHead(model.embed_tokens.weight if model.args.tie_embeddings
                                      else model.lm_head.weight, rows, int8=int8_head)
    return model
