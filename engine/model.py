"""A compact decoder forward for the Llama and Gemma 3 families, built from a Hugging Face config.

Module and parameter names mirror Hugging Face's, so a HF state dict loads as it is (less its
`model.` prefix). The forward runs on any cache that implements `update(layer, k, v, pos)`
(see `engine.cache`), can stop after any layer, and can take input embeddings instead of ids.

Devices: the RoPE tables follow the weights (`model.to(device)`); ids and positions may be given on
the host, and are best given there: ids are copied to the model's device, positions too (for the
RoPE tables) while caches and attention read the host copy, so that a step on CUDA needs no device
sync to learn where it writes. Attention goes through `kernels.segment_attention.attend` (the Triton
kernel on CUDA for decode/verify steps, the torch reference elsewhere). The static-shape CUDA-graph
decode path built on this model lives in `engine.cuda`; on the CPU, an int8 model's blocks run decode
and verify steps in C (`Block.fused`, set by `engine.quant.fuse`): over a scratch area all layers in
one call (`Transformer.fused_step`), elsewhere two calls a layer.

Shapes: B batch, T new tokens, S keys, H query heads, KV key/value heads, D model width, hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ghostline.kernels.rope_shift import apply_rope, rope_cos_sin
from ghostline.kernels.segment_attention import attend

LLAMA_TYPES = {"llama", "mistral", "qwen2", "smollm", "smollm3"}
GEMMA_TYPES = {"gemma3_text", "gemma3"}
SHIFTABLE_ROPE = {"default", "linear", "llama3"}


class UnsupportedModel(ValueError):
    """The checkpoint's architecture or RoPE scaling is one Ghostline cannot serve exactly."""


@dataclass
class ModelArgs:
    family: str  # "llama" | "gemma3"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    attn_scale: float
    inv_freq: torch.Tensor  # [L, hd/2] per-layer RoPE inverse frequencies
    windows: list[int | None] = field(default_factory=list)  # per layer: sliding window or None
    qkv_bias: bool = False
    tie_embeddings: bool = True
    embed_scale: float = 1.0
    final_softcap: float | None = None
    attn_softcap: float | None = None
    act: str = "silu"

    @classmethod
    def from_hf(cls, cfg) -> "ModelArgs":
        mtype = getattr(cfg, "model_type", "?")
        if getattr(cfg, "text_config", None) is not None and mtype == "gemma3":
            cfg, mtype = cfg.text_config, cfg.text_config.model_type
        if mtype not in LLAMA_TYPES | GEMMA_TYPES:
            raise UnsupportedModel(
                f"model_type {mtype!r} is not supported; Ghostline serves the Llama family "
                f"({', '.join(sorted(LLAMA_TYPES))}) and Gemma 3"
            )
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_layers = cfg.num_hidden_layers
        layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
        gemma = mtype in GEMMA_TYPES
        windows: list[int | None] = []
        for lt in layer_types:
            sliding = lt == "sliding_attention" or (mtype == "mistral" and cfg.sliding_window)
            windows.append(cfg.sliding_window if sliding else None)
        inv_freq = torch.stack([_inv_freq(cfg, lt if gemma else None, head_dim) for lt in layer_types])
        return cls(
            family="gemma3" if gemma else "llama",
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=n_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            hidden_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            attn_scale=(cfg.query_pre_attn_scalar if gemma else head_dim) ** -0.5,
            inv_freq=inv_freq,
            windows=windows,
            qkv_bias=mtype == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            embed_scale=cfg.hidden_size**0.5 if gemma else 1.0,
            final_softcap=getattr(cfg, "final_logit_softcapping", None),
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
            act="gelu_tanh" if gemma else "silu",
        )


def _inv_freq(cfg, layer_type: str | None, head_dim: int) -> torch.Tensor:
    """RoPE inverse frequencies for one layer; only scalings that a fixed rotation can shift exactly."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SHIFTABLE_ROPE:
        why = "its frequencies depend on the sequence length" if rope_type == "dynamic" else "it is not supported"
        raise UnsupportedModel(
            f"RoPE scaling {rope_type!r} cannot be used: PIE shifts cached keys by a fixed rotation and {why} "
            f"(supported: {', '.join(sorted(SHIFTABLE_ROPE))})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModel("partial rotary embeddings are not supported")
    base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        inv = inv / params["factor"]
    elif rope_type == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_ctx = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


class RMSNorm(nn.Module):
    """RMSNorm in fp32; Gemma scales by (1 + w), Llama by w."""

    def __init__(self, dim: int, eps: float, *, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        self.a, self.layer = a, layer
        self.bf16_prefill = False  # prefill attention may use bf16 products (engine.quant: the int8 path)
        self.q_proj = nn.Linear(a.dim, a.n_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.dim, a.n_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        if a.family == "gemma3":
            self.q_norm = RMSNorm(a.head_dim, a.norm_eps, offset=1.0)
            self.k_norm = RMSNorm(a.head_dim, a.norm_eps, offset=1.0)

    def kv(self, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values [B, KV, T, hd] of the normed input x [B, T, D]."""
        a, (B, T, _) = self.a, x.shape
        k = self.k_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if a.family == "gemma3":
            k = self.k_norm(k)
        return apply_rope(k, *cos_sin), v

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cos_sin, cache) -> torch.Tensor:
        a, (B, T, _) = self.a, x.shape
        q = self.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # [B, H, T, hd]
        if a.family == "gemma3":
            q = self.q_norm(q)
        q = apply_rope(q, *cos_sin)
        k, v = self.kv(x, cos_sin)
        segments = cache.update(self.layer, k, v, pos)
        o = attend(
            q, segments, pos, scale=a.attn_scale, window=a.windows[self.layer], softcap=a.attn_softcap,
            bf16=self.bf16_prefill,
        )  # [B, H, T, hd]
        return self.o_proj(o.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.up_proj = nn.Linear(a.dim, a.hidden_dim, bias=False)
        self.down_proj = nn.Linear(a.hidden_dim, a.dim, bias=False)
        self.act = a.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        g = F.gelu(g, approximate="tanh") if self.act == "gelu_tanh" else F.silu(g)
        return self.down_proj(g * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int):
        super().__init__()
        offset = 1.0 if a.family == "gemma3" else 0.0
        self.gemma = a.family == "gemma3"
        self.fused = None  # a kernels.step.FusedLayer once engine.quant.fuse ran (int8, CPU)
        self.self_attn = Attention(a, layer)
        self.mlp = MLP(a)
        self.input_layernorm = RMSNorm(a.dim, a.norm_eps, offset=offset)
        self.post_attention_layernorm = RMSNorm(a.dim, a.norm_eps, offset=offset)
        if self.gemma:
            self.pre_feedforward_layernorm = RMSNorm(a.dim, a.norm_eps, offset=offset)
            self.post_feedforward_layernorm = RMSNorm(a.dim, a.norm_eps, offset=offset)

    def forward(self, x, pos, cos_sin, cache):
        if self.fused is not None and self.fused.serves(x):  # the C step (engine.quant.fuse)
            q, k, v = self.fused.qkv(x, *cos_sin)
            return self.fused.attn_mlp(x, q, pos, cache.update(self.self_attn.layer, k, v, pos))
        h = self.self_attn(self.input_layernorm(x), pos, cos_sin, cache)
        if self.gemma:  # sandwich norms
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.embed_tokens = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps, offset=1.0 if a.family == "gemma3" else 0.0)
        self.lm_head = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.fused_step = None  # a kernels.step.ScratchStep once engine.quant.fuse fused every block
        self.set_rope(a.inv_freq)

    def set_rope(self, inv_freq: torch.Tensor) -> None:
        """Per-layer RoPE frequencies [L, hd/2], grouped so layers sharing a base share cos/sin tables."""
        self.rope_freqs, group = torch.unique(inv_freq.float(), dim=0, return_inverse=True)  # [G, hd/2]
        self.rope_group = group.tolist()

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, ...: the RoPE tables (plain fp32 attributes, never cast) follow the weights."""
        super()._apply(fn, recurse)
        device = self.embed_tokens.weight.device
        if device.type != "meta":
            self.rope_freqs = self.rope_freqs.to(device)
            self.args.inv_freq = self.args.inv_freq.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> scaled input embeddings [B, T, D]."""
        x = self.embed_tokens(ids)
        if self.args.embed_scale != 1.0:
            x = x * torch.tensor(self.args.embed_scale, dtype=x.dtype)
        return x

    def forward(
        self,
        ids: torch.Tensor | None,
        pos: torch.Tensor,
        cache,
        *,
        embeds: torch.Tensor | None = None,
        exit_layer: int | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        states: list | None = None,
    ) -> torch.Tensor:
        """ids [B, T] (or embeds [B, T, D]) at positions pos [T] -> logits [B, T, V].

        `exit_layer=l` stops after l layers and reads logits through the final norm and LM head;
        `last_only` computes logits for the last position only; `return_hidden` skips the head;
        `states` (a list) receives the hidden state after each layer (early-exit calibration).
        ids and pos may live on the host (see the module's notes on devices).
        """
        device = self.embed_tokens.weight.device
        if ids is not None and ids.device != device:
            ids = ids.to(device, non_blocking=True)
        x = self.embed(ids) if embeds is None else embeds
        n = self.args.n_layers if exit_layer is None else exit_layer
        tables = self.rope_tables(pos, x.dtype)
        if states is None:
            x = self.run(x, pos, tables, cache, range(n))
        else:
            for i in range(n):
                x = self.layers[i](x, pos, tables[self.rope_group[i]], cache)
                states.append(x)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return x
        return self.head(x)

    def run(self, x: torch.Tensor, pos: torch.Tensor, tables: list, cache, layers: range) -> torch.Tensor:
        """The decoder layers `layers` (consecutive) of a step: x [B, T, D] -> [B, T, D], in one C call
        where it serves (`fused_step`: int8, batch 1, a scratch cache), else layer by layer."""
        if self.fused_step is not None and len(layers) and self.fused_step.serves(x, cache):
            return self.fused_step(x, pos, [tables[g] for g in self.rope_group], cache, layers=layers)
        for i in layers:
            x = self.layers[i](x, pos, tables[self.rope_group[i]], cache)
        return x

    def rope_tables(self, pos: torch.Tensor, dtype) -> list:
        """(cos, sin) per RoPE group for positions pos [T]; layer i uses `tables[self.rope_group[i]]`."""
        device = self.embed_tokens.weight.device
        pos_dev = pos if pos.device == device else pos.to(device, non_blocking=True)
        return [rope_cos_sin(pos_dev, f, dtype=dtype) for f in self.rope_freqs]

    def copy_state(self, x: torch.Tensor, pos: torch.Tensor, cache, *, start: int, tables=None) -> None:
        """SEC's state copying: after an exit at layer `start`, write the keys and values of layers
        start.. for positions pos from the exit hidden state x [B, T, D] (each layer's input norm,
        projections and RoPE), so later tokens attend to a full-depth cache. One C call (k|v rows
        only) where the fused step serves."""
        tables = tables or self.rope_tables(pos, x.dtype)
        if self.fused_step is not None and start < self.args.n_layers and self.fused_step.serves(x, cache):
            layers = range(start, self.args.n_layers)
            self.fused_step.copy_state(x, pos, [tables[g] for g in self.rope_group], cache, layers=layers)
            return
        for i in range(start, self.args.n_layers):
            layer = self.layers[i]
            k, v = layer.self_attn.kv(layer.input_layernorm(x), tables[self.rope_group[i]])
            cache.update(i, k, v, pos)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head (+ soft-capping): hidden [..., D] -> logits [..., V]."""
        logits, rows = self.head_columns(x)
        if rows is not None:  # a shortlist head (engine.quant): tokens outside it cannot be chosen
            full = logits.new_full((*logits.shape[:-1], self.args.vocab_size), float("-inf"))
            logits = full.index_copy_(-1, rows, logits)
        return logits

    def head_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`head` without widening a shortlist head's logits to the vocabulary: logits [..., R] and
        the token id of each column (None for the full head: R = V). Softmax and top-k over the R
        columns equal those over `head`'s row, whose other entries are -inf, at a fifth of the work."""
        logits = self.lm_head(self.norm(x))
        if self.args.final_softcap:
            c = self.args.final_softcap
            logits = torch.tanh(logits / c) * c
        return logits, getattr(self.lm_head, "rows", None)


def greedy_ids(model, x: torch.Tensor) -> torch.Tensor:
    """The argmax of `model.head(x)` for hidden x [..., D] -> token ids [...], read from the head's
    columns (a shortlist head's logits are never widened to the 262k vocabulary: ~0.1 ms a row).
    Ties go to the smallest token id, as argmax over head()'s row does."""
    return column_argmax(*model.head_columns(x), vocab_size=model.args.vocab_size)


def column_argmax(logits: torch.Tensor, rows: torch.Tensor | None, *, vocab_size: int) -> torch.Tensor:
    """`head_columns`' logits [..., R] and column ids -> the token id of the largest [...], ties to the
    smallest id (the argmax over the widened row)."""
    idx = logits.argmax(-1, keepdim=True)  # [..., 1]
    if rows is None:
        return idx.squeeze(-1)
    top = logits == logits.gather(-1, idx)  # [..., R]
    ids = rows[idx.squeeze(-1)]
    tied = top.sum(-1) > 1
    if bool(tied.any()):
        ids = torch.where(tied, torch.where(top, rows, vocab_size).min(-1).values, ids)
    return ids


def build(cfg, state_dict: dict[str, torch.Tensor], *, dtype=torch.float32) -> Transformer:
    """A Transformer from a HF config and a HF-named state dict (with or without the `model.` prefix)."""
    args = ModelArgs.from_hf(cfg)
    with torch.device("meta"):
        model = Transformer(args)
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UnsupportedModel(f"checkpoint lacks weights: {', '.join(missing[:5])}")
    model.set_rope(args.inv_freq)
    return model.to(dtype).eval().requires_grad_(False)
