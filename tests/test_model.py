"""Our forward's logits equal HF transformers' (fp32, eager attention), on a prompt and on decode steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from ghostline.engine.cache import KVCache, ScratchCache
from ghostline.engine.model import build
from tests.conftest import tiny_hf

ATOL = 1e-4  # fp32: same maths, different operation order


def ours_prompt_and_steps(model, ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    """Logits for ids [1, T]: the first n_prompt as one prompt, the rest one decode step at a time."""
    a = model.args
    cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    cache.reserve(n_prompt)
    cache.length = n_prompt
    with torch.no_grad():
        out = [model(ids[:, :n_prompt], torch.arange(n_prompt), cache)]
        scratch = ScratchCache(cache, n_prompt, ids.shape[1] - n_prompt)
        for t in range(n_prompt, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], torch.tensor([t]), scratch))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3", "gemma3"])
def test_tiny_models_match_hf(kind):
    if kind == "qwen2":
        from transformers import Qwen2Config

        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
    else:
        cfg, hf = tiny_hf(kind, 500)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(0, 500, (1, 60))  # longer than the tiny Gemma's 16-token window
    with torch.no_grad():
        ref = hf(ids).logits
    ours = ours_prompt_and_steps(model, ids, 48)
    assert ref.abs().max() > 0.1
    assert (ours - ref).abs().max().item() < ATOL


def test_llama3_scaling_changes_frequencies():
    plain, _ = tiny_hf("llama", 100)
    scaled, _ = tiny_hf("llama3", 100)
    from ghostline.engine.model import ModelArgs

    assert not torch.allclose(ModelArgs.from_hf(plain).inv_freq, ModelArgs.from_hf(scaled).inv_freq)


def test_exit_layer_and_embeddings_input():
    cfg, hf = tiny_hf("gemma3", 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(0, 300, (1, 12))
    a = model.args

    def run(**kw):
        c = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
        c.reserve(12)
        c.length = 12
        with torch.no_grad():
            return model(ids if "embeds" not in kw else None, torch.arange(12), c, **kw)

    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        ref3 = hf.lm_head(hf.model.norm(hidden[3]))
    assert (run(exit_layer=3) - ref3).abs().max().item() < ATOL
    assert torch.equal(run(embeds=model.embed(ids)), run())


@pytest.mark.slow
@pytest.mark.parametrize("name, n_tokens", [("gemma", 600), ("smol", 300)])
def test_embedded_models_match_hf(request, name, n_tokens):
    """Both embedded models, prompt + 10 decode steps; Gemma's 600 tokens pass its 512-token window.
    The prompt goes through a fused attention here as in HF's "sdpa" (HF's own eager and sdpa differ
    by 1.3e-4 on Gemma's logits: fp32 sums in another order)."""
    loaded = request.getfixturevalue(name)
    ids, _ = loaded.tokenizer.encode(open(__file__.replace("test_model.py", "data/sessions_before.py")).read())
    ids = torch.tensor([ids[:n_tokens]])
    hf = AutoModelForCausalLM.from_pretrained(
        str(loaded.source.parent), gguf_file=loaded.source.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = ours_prompt_and_steps(loaded.model, ids, n_tokens - 10)
    assert (ours - ref).abs().max().item() < ATOL
