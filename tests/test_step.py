"""The C decode step (kernels/step.c) against its references: the int8 products against float64
over the dequantised weights, a fused layer against the torch layer over the same weights (tiny
Gemma 3 and Llama models, every cache kind a decode step meets), and a verify step of T tokens
against T decode steps, bit for bit."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ghostline.engine.cache import ForkCache, KVCache, ScratchCache
from ghostline.engine.model import build
from ghostline.engine.quant import Int8Linear, dequantize, fuse, quantize, quantize_rows
from ghostline.kernels import step
from tests.conftest import prefix_cache, tiny_config, tiny_hf

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the C step is not built and torch's layers run")


def test_the_kernel_builds_here():
    assert step.available(), "a C compiler is on PATH but kernels/step.c did not build (see the log)"


@pytest.mark.parametrize("shape", [(1, 48, 64), (5, 37, 640), (16, 256, 2048)])
def test_gemv_equals_float64_and_rows_are_independent(shape):
    M, N, K = shape
    torch.manual_seed(0)
    q, scale = quantize_rows(torch.randn(N, K))
    x = torch.randn(M, K)
    got = step.gemv_int8(x, q, scale.float())
    ref = step.gemv_reference(x, q, scale.float())
    # activations become int16 codes with a step of max|x_m| / A (A keeps int32 sums exact): each
    # output is off by at most step / 2 * sum_k |w[n, k]|, plus fp32 rounding
    A = min(32767, (2**31 - 1) // (127 * K))
    bound = x.abs().amax(1, keepdim=True).double() / A / 2 * (q.double().abs() @ torch.ones(K, dtype=torch.float64)
                                                              * scale.double())
    assert ((got.double() - ref).abs() <= bound + ref.abs() * 1e-6 + 1e-6).all()
    for m in range(M):  # a row's dot products do not depend on the other rows
        assert torch.equal(step.gemv_int8(x[m : m + 1], q, scale.float())[0], got[m])


def test_gemv_refuses_what_it_cannot_serve():
    q, scale = quantize_rows(torch.randn(8, 64))
    with pytest.raises(ValueError, match="cannot serve"):
        step.gemv_int8(torch.randn(step.MAX_ROWS + 1, 64), q, scale.float())
    with pytest.raises(ValueError, match="cannot serve"):
        step.gemv_int8(torch.randn(1, 64, dtype=torch.float64), q, scale.float())


@pytest.mark.parametrize("src, end, dst", [(5, 40, 9), (9, 44, 5), (0, 30, 31), (20, 21, 20)],
                         ids=["up-overlap", "down-overlap", "up-apart", "no-move"])
def test_shift_equals_the_torch_splice_bit_for_bit(src, end, dst):
    """PIE's move + rotation in C gives rope_shift_cpu's bits, rows moving up or down over themselves."""
    from ghostline.kernels.rope_shift import delta_cos_sin, rope_shift_cpu

    g = torch.Generator().manual_seed(src * 100 + dst)
    k, v = torch.randn(3, 2, 80, 64, generator=g), torch.randn(3, 2, 80, 64, generator=g)  # [L, KV, cap, hd]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)) * torch.tensor([[1.0], [0.5], [0.25]])
    k2, v2 = k.clone(), v.clone()
    assert step.shift(k, v, src, end, dst, *delta_cos_sin(dst - src, inv_freq))
    rope_shift_cpu(k2, v2, src, end, dst, inv_freq)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="cannot move"):
        step.shift(k, v, 0, 50, 40, *delta_cos_sin(40, inv_freq))
    assert not step.shift(k.double(), v.double(), src, end, dst, *delta_cos_sin(dst - src, inv_freq))


def _dequantized(model):
    """The fp32 reference of an int8 model: each Int8Linear back to nn.Linear over its dequantised rows."""
    ref = copy.deepcopy(model)
    ref.fused_step = None
    for block in ref.layers:
        block.fused = None
        for part in (block.self_attn, block.mlp):
            for name, mod in list(part.named_children()):
                if isinstance(mod, Int8Linear):
                    lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                    lin.weight.data = dequantize(mod.qweight, mod.scale)
                    if mod.bias is not None:
                        lin.bias.data = mod.bias.data.clone()
                    setattr(part, name, lin)
    return ref


def _tiny(kind: str):
    """tiny_hf, or (gemma3-hd80) a tiny Gemma with 80-dim heads: the attention's 64-wide vector loop
    and its 16-wide tail both run (the 32- and 16-dim heads of the other two take only the tail)."""
    if kind != "gemma3-hd80":
        return tiny_hf(kind, 300)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("gemma3", 300)
    cfg.head_dim = cfg.query_pre_attn_scalar = 80
    cfg._attn_implementation = "eager"
    return cfg, AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()


@pytest.fixture(scope="module", params=["gemma3", "llama", "gemma3-hd80"])
def fused_pair(request):
    """A tiny int8 model (layers and head) with the C step in every block, and the reference: the same
    model with fp32 layers over the dequantised rows and no C step."""
    cfg, hf = _tiny(request.param)
    model = quantize(build(cfg, hf.state_dict()), rows=torch.arange(300), native=False)  # int8 layers and head
    ref = _dequantized(model)
    assert fuse(model) == model.args.n_layers  # the C step in every block
    return model, ref


@torch.no_grad()
def test_fused_layers_equal_the_torch_layers(fused_pair):
    """Decode steps past the sliding window (Gemma's window is 16) over a KVCache prefix and a scratch:
    the same numbers up to the int16 rounding of the activations (1e-4 of a row's largest value)."""
    model, ref = fused_pair
    ids = torch.randint(2, 300, (41,), generator=torch.Generator().manual_seed(2)).tolist()
    cache = prefix_cache(ref, ids[:30])  # one prefix for both (a 30-token encode runs torch's int8 kernel)
    scratch = [ScratchCache(cache, 30, 16) for _ in range(2)]
    for i in range(30, 41):
        got, want = (m(torch.tensor([[ids[i]]]), torch.tensor([i]), s) for m, s in zip((model, ref), scratch))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scratch[0].k[:, :, :, :11], scratch[1].k[:, :, :, :11], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(scratch[0].v[:, :, :, :11], scratch[1].v[:, :, :, :11], rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_a_verify_step_equals_its_decode_steps_bit_for_bit(fused_pair):
    model, _ = fused_pair
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = prefix_cache(model, ids[:25])
    one, many = ScratchCache(cache, 25, 16), ScratchCache(cache, 25, 16)
    steps = torch.cat([model(torch.tensor([[t]]), torch.tensor([25 + i]), one) for i, t in enumerate(ids[25:37])], 1)
    verify = model(torch.tensor([ids[25:37]]), torch.arange(25, 37), many)
    assert torch.equal(steps, verify)
    assert torch.equal(one.k[:, :, :, :12], many.k[:, :, :, :12]) and torch.equal(one.v, many.v)


@torch.no_grad()
def test_one_call_over_all_layers_equals_the_per_layer_calls_bit_for_bit(fused_pair):
    """Transformer.fused_step (every layer in one C call over a ScratchCache) against the two C calls a
    layer with the cache's own bookkeeping: decode steps past the window, then a verify step."""
    model, _ = fused_pair
    assert model.fused_step is not None
    ids = torch.randint(2, 300, (45,), generator=torch.Generator().manual_seed(6)).tolist()
    cache = prefix_cache(model, ids[:25])
    outs, scratches = [], []
    for one_call in (True, False):
        step_all, model.fused_step = model.fused_step, model.fused_step if one_call else None
        try:
            s = ScratchCache(cache, 25, 24)
            steps = [model(torch.tensor([[t]]), torch.tensor([25 + i]), s) for i, t in enumerate(ids[25:33])]
            steps.append(model(torch.tensor([ids[33:45]]), torch.arange(33, 45), s))
        finally:
            model.fused_step = step_all
        outs.append(torch.cat(steps, 1))
        scratches.append(s)
    assert torch.equal(outs[0], outs[1])
    assert scratches[0].length == scratches[1].length == 20
    assert torch.equal(scratches[0].k[:, :, :, :20], scratches[1].k[:, :, :, :20])
    assert torch.equal(scratches[0].v[:, :, :, :20], scratches[1].v[:, :, :, :20])
    with pytest.raises(IndexError, match="full"):
        model(torch.tensor([ids[:8]]), torch.arange(45, 53), scratches[0])


@torch.no_grad()
def test_runs_of_layers_equal_one_call_bit_for_bit(fused_pair):
    """Early exit runs a step's layers in runs (`Transformer.run`: one C call over a slice of them,
    reading and writing that slice's cache planes): the same hidden state and cache as one call."""
    model, _ = fused_pair
    L = model.args.n_layers
    ids = torch.randint(2, 300, (36,), generator=torch.Generator().manual_seed(8)).tolist()
    cache = prefix_cache(model, ids[:25])
    whole, runs = ScratchCache(cache, 25, 16), ScratchCache(cache, 25, 16)
    cuts = sorted({0, 1, L // 2, L})
    for i, t in enumerate(ids[25:]):
        p = torch.tensor([25 + i])
        want = model(torch.tensor([[t]]), p, whole, return_hidden=True)
        x = model.embed(torch.tensor([[t]]))
        tables = model.rope_tables(p, x.dtype)
        for a, b in zip(cuts, cuts[1:]):
            x = model.run(x, p, tables, runs, range(a, b))
        assert torch.equal(x, want)
    assert torch.equal(whole.k[:, :, :, :11], runs.k[:, :, :, :11]) and torch.equal(whole.v, runs.v)
    tables = model.rope_tables(torch.tensor([40]), torch.float32)
    with pytest.raises(ValueError, match="not a run"):
        model.fused_step(x, torch.tensor([40]), [tables[g] for g in model.rope_group], runs, layers=range(1, L + 1))


@torch.no_grad()
def test_state_copying_in_c_equals_the_torch_layers(fused_pair):
    """SEC's state copying (keys and values of the skipped layers from the exit state) by step.c's
    k|v rows against the dequantised torch layers; the rows before and the layers below untouched."""
    model, ref = fused_pair
    ids = torch.randint(2, 300, (30,), generator=torch.Generator().manual_seed(9)).tolist()
    cache = prefix_cache(ref, ids[:25])
    got, want = ScratchCache(cache, 25, 8), ScratchCache(cache, 25, 8)
    x = torch.randn(1, 2, model.args.dim, generator=torch.Generator().manual_seed(1)) * 3
    p = torch.tensor([27, 28])
    got.k[:, :, :, :2] = want.k[:, :, :, :2] = 7.0  # rows of earlier tokens
    model.copy_state(x, p, got, start=1)
    ref.copy_state(x, p, want, start=1)
    assert got.length == want.length == 4
    torch.testing.assert_close(got.k, want.k, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got.v, want.v, rtol=1e-3, atol=1e-3)
    assert bool((got.k[1:, :, :, 2:4] != 0).all())  # every copied layer's rows written
    assert torch.equal(got.k[:, :, :, :2], torch.full_like(got.k[:, :, :, :2], 7.0))
    assert bool((got.k[0, :, :, 2:] == 0).all())


@torch.no_grad()
def test_encoding_a_few_tokens_and_fork_rows_use_the_same_numbers(fused_pair):
    """A short encode into a KVCache (one segment) and a one-row ForkCache (three segments) give the
    logits a scratch decode gives for the same tokens."""
    model, _ = fused_pair
    ids = torch.randint(2, 300, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    cache = prefix_cache(model, ids[:20])
    a = model.args
    grown = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    grown.reserve(30)
    grown.k[:, :, :20], grown.v[:, :, :20] = cache.k[:, :, :20], cache.v[:, :, :20]
    grown.length = 30
    encoded = model(torch.tensor([ids[20:30]]), torch.arange(20, 30), grown)
    scratch = ScratchCache(cache, 20, 16)
    decoded = model(torch.tensor([ids[20:25]]), torch.arange(20, 25), scratch)
    fork = ForkCache(scratch, 8, batch=1)
    forked = model(torch.tensor([ids[25:30]]), torch.arange(25, 30), fork)
    assert torch.equal(encoded, torch.cat([decoded, forked], 1))


@torch.no_grad()
def test_batches_and_long_encodes_fall_back_to_torch(fused_pair):
    """Two rows, or more new tokens than MAX_ROWS, run the torch layers (int8 with bf16 activations
    past MAX_ROWS rows: within int8 error of the reference)."""
    model, ref = fused_pair
    ids = torch.randint(2, 300, (2, 20), generator=torch.Generator().manual_seed(5))
    assert not model.layers[0].fused.serves(model.embed(ids[:, :3]))
    x = ids[:1, : step.MAX_ROWS + 1]
    assert not model.layers[0].fused.serves(model.embed(x))
    a, T = model.args, x.shape[1]
    outs = []
    for m in (model, ref):
        c = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
        c.reserve(T)
        c.length = T
        outs.append(m(x, torch.arange(T), c))
    torch.testing.assert_close(outs[0], outs[1], rtol=0.05, atol=0.05)


def test_the_c_step_can_be_turned_off():
    code = "from ghostline.kernels import step; print(step.available())"
    env = dict(os.environ, GHOSTLINE_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
