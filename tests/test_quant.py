"""Fast weights (engine.quant) and the code vocabulary (engine.vocab): each fast part against its
fp32 reference, with the tolerance its rounding allows, and the engine's fast path against the naive
generator on the same (quantized) model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from ghostline.engine import vocab
from ghostline.engine.cache import KVCache
from ghostline.engine.decoding.greedy import reference_greedy
from ghostline.engine.engine import CompletionOptions, Engine, EngineOptions
from ghostline.engine.model import build
from ghostline.engine.quant import Int8Linear, ShortlistHead, dequantize, int8_matmul, quantize, quantize_rows
from ghostline.kernels import step
from tests.conftest import tiny_hf

SAMPLE = open(__file__.replace("test_quant.py", "data/sessions_before.py")).read()


def test_quantize_rows_error_is_half_a_step():
    w = torch.randn(96, 64) * torch.logspace(-2, 1, 96)[:, None]  # rows of very different ranges
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    err = (dequantize(q, scale) - w).abs()
    assert (err <= scale.float()[:, None] * 0.5 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_int8_matmul_equals_its_fp32_reference(rows):
    """Up to MAX_ROWS rows (decode and verify steps) the C kernel: activations as int16 codes over
    the dequantised rows, equal up to the codes' rounding. Past it torch's fused kernel: bf16-rounded activations,
    equal up to its bf16 output rounding. Both sit within int8 error of the fp32 layer."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 640), torch.randn(rows, 640)
    q, scale = quantize_rows(w)
    got = int8_matmul(x, q, scale)
    native = rows <= step.MAX_ROWS and step.available()
    ref = (x if native else x.bfloat16().float()) @ dequantize(q, scale).T
    exact = x.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    if native:  # int16 activation codes, step max|x| / A: off by step / 2 * sum |w| at most
        A = min(32767, (2**31 - 1) // (127 * 640))
        bound = x.abs().amax(1, keepdim=True) / A / 2 * dequantize(q, scale).abs().sum(1)
        assert ((got - ref).abs() <= bound + 1e-4).all()
    else:  # bf16 output rounding
        assert ((got - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()
    assert (got.double() - exact).norm() / exact.norm() < 0.02  # int8 weights, bf16 inputs


def test_int8_linear_keeps_the_bias_and_shape():
    lin = torch.nn.Linear(32, 16, bias=True)
    fast = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 32)
    assert fast(x).shape == (2, 3, 16)
    torch.testing.assert_close(fast(x), lin(x), atol=0.05, rtol=0.05)


def test_shortlist_head_equals_the_full_head_on_its_rows():
    cfg, hf = tiny_hf("llama", 400)
    model = build(cfg, hf.state_dict())
    full = copy.deepcopy(model)
    rows = torch.arange(0, 400, 3)
    quantize(model, linear=False, rows=rows, int8_head=False)
    h = torch.randn(2, 5, cfg.hidden_size)
    got, want = model.head(h), full.head(h)
    assert got.shape == want.shape == (2, 5, 400)
    torch.testing.assert_close(got[..., rows], want[..., rows], rtol=0, atol=1e-5)
    outside = torch.ones(400, dtype=torch.bool)
    outside[rows] = False
    assert torch.isneginf(got[..., outside]).all()
    assert model.lm_head.include(torch.tensor([1, 2, 3, 1])) == 2  # 3 was in already
    assert torch.isfinite(model.head(h)[..., [1, 2]]).all()


def test_engine_with_code_head_learns_document_tokens(tiny_engine_factory, smol):
    cfg, hf = tiny_hf("llama", smol.tokenizer.vocab_size)
    eng = Engine(build(cfg, hf.state_dict()), smol.tokenizer, EngineOptions(precision="int8", head="code"),
                 vocab_rows=np.arange(0, 200, dtype=np.int32))
    assert isinstance(eng.model.lm_head, ShortlistHead) and eng.model.lm_head.size == 200
    text = "def frobnicate_widget(x):\n    return x"
    eng.open("a", text)
    ids = eng.docs["a"].ids
    assert eng.model.lm_head.member[torch.tensor(ids)].all()
    eng.edit("a", [{"range": {"start": {"line": 1, "character": 12}, "end": {"line": 1, "character": 12}},
                    "text": " + quux_zebra"}])
    assert eng.model.lm_head.member[torch.tensor(eng.docs["a"].ids)].all()
    with pytest.raises(ValueError, match="vocab_rows"):
        Engine(build(cfg, hf.state_dict()), smol.tokenizer, EngineOptions(head="code"))
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precision="fp8")


@pytest.mark.slow
def test_fast_engine_equals_naive_greedy_on_the_same_weights(smol):
    """The int8 + shortlist model through the engine's cache gives the naive generator's tokens, and
    its logits stay close to the fp32 reference (stated tolerances: 5% relative, 90% argmax agreement;
    measured on this prompt: ~2% and ~97%)."""
    text = SAMPLE[: SAMPLE.rfind("\n", 0, 600) + 1]  # a line boundary: no token healing
    ids, _ = smol.tokenizer.encode(text)
    model = copy.deepcopy(smol.model)
    rows = np.unique(np.concatenate([np.arange(0, 20000), ids])).astype(np.int32)
    eng = Engine(model, smol.tokenizer, EngineOptions(precision="int8", head="code"), vocab_rows=rows)
    eng.open("s", text)
    out = eng.complete("s", len(text), CompletionOptions(multiline=True, max_tokens=6))
    ids_before = eng.docs["s"].ids
    assert out.heal == "" and out.tokens
    assert out.tokens == reference_greedy(model, ids_before[: out.ctx_tokens], len(out.tokens))

    def logits(m):
        a = m.args
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
        cache.reserve(len(ids))
        cache.length = len(ids)
        with torch.no_grad():
            return m(torch.tensor([ids]), torch.arange(len(ids)), cache)[0]

    fast, ref = logits(model), logits(smol.model)
    kept = torch.as_tensor(rows, dtype=torch.long)
    assert (fast[:, kept] - ref[:, kept]).norm() / ref[:, kept].norm() < 0.05
    in_rows = torch.isin(ref.argmax(-1), kept)
    assert (fast.argmax(-1) == ref.argmax(-1))[in_rows].float().mean() > 0.9


def test_corpus_files_hold_out_and_exclude(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 20)
    (tmp_path / "skipme").mkdir()
    (tmp_path / "skipme" / "a.py").write_text("import os\n" * 50)
    (tmp_path / "notes.bin").write_text("x" * 500)
    build = vocab.corpus_files([tmp_path], exclude=["skipme"])
    held = vocab.corpus_files([tmp_path], exclude=["skipme"], holdout=True)
    assert build and held and not set(build) & set(held) and len(build) + len(held) == 40
    assert all(p.suffix == ".py" and "skipme" not in str(p) for p in build + held)


def test_code_vocab_keeps_seen_special_and_short_tokens(smol):
    tok = smol.tokenizer
    counts = vocab.count_ids(tok, [Path(__file__)])
    ids = vocab.code_vocab(tok, counts)
    assert ids.dtype == np.int32 and (np.diff(ids) > 0).all()
    assert set(counts) <= set(ids.tolist()) and tok.eos_ids <= set(ids.tolist())
    short = {i for i, s in enumerate(tok.strings) if len(s) == 1 and s.isascii() and s.isprintable()}
    assert short and short <= set(ids.tolist())
    assert len(ids) < tok.vocab_size
