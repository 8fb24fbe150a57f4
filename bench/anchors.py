"""The two anchors Ghostline is measured against: what an editor plugin runs today, same model, same tasks.

- `hf`: HF transformers, re-encoding per request. Gemma 3 270M as `AutoModelForCausalLM` from the
  safetensors copy the loader de-quantised from the embedded GGUF (no hub access), fp32. Each request
  tokenizes the whole new text before the cursor with our tokenizer (BOS included, the ids Ghostline
  sees), then greedy `generate` (`use_cache=True` within the request, nothing kept across requests),
  48 new tokens at most, stopping at the first newline. Latency: from the edit arriving (the new text
  in hand) to the decoded first line.
- `llamacpp`: llama.cpp through llama-cpp-python on the embedded GGUF itself (Q4_K_M), with its prefix
  reuse: a call keeps the KV cache of the longest token prefix it shares with the previous evaluation
  (`Llama.generate`). Untimed, the document as it was before the edit is evaluated up to the cursor's
  character offset (the previous request, like Ghostline's didOpen warm-up); timed, `create_completion`
  on the text before the cursor after the edit, greedy, 48 tokens, `stop=["\\n"]`, so only the tokens
  from the first changed one on are evaluated again (rows record `reused` / `evaluated`). Latency:
  from the edit arriving to the completion's text.

Both are benchmark-only: neither package is a dependency of the product. llama-cpp-python is installed
by `make anchors` (a CPU build without AMX: the default native build dies with SIGILL on CPUs without AMX). A
missing package raises `Missing`, which the benchmark reports and skips.

Runners take the task list and yield one row per task: {"id", "ms", "em", "es", "pred"} (+ "error").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.tasks import cursor_offset, em, es, first_line

MAX_NEW = 48


class Missing(RuntimeError):
    """An anchor's package is not installed."""


def weights() -> tuple[Path, Path]:
    """The embedded Gemma GGUF and the safetensors folder the loader de-quantised it to (made on first use)."""
    from ghostline.engine.loader import load, resolve
    from ghostline.engine.paths import model_cache_dir

    gguf = resolve(None)

    def folder() -> Path | None:
        hits = [
            d for d in (model_cache_dir() / "models").glob(f"{gguf.stem}-*")
            if (d / "model.safetensors").exists() and (d / "ghostline.json").exists()
            and json.loads((d / "ghostline.json").read_text()).get("source") == str(gguf)
        ]
        return max(hits, key=lambda d: d.stat().st_mtime) if hits else None

    if folder() is None:
        load(None)  # writes the safetensors copy
    return gguf, folder()


def tokenizer():
    """Ghostline's tokenizer for the embedded model (engine.tokenizer over the cached HF tokenizer)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from ghostline.engine.tokenizer import Tokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(weights()[1]))


def _row(task: dict, ms: float, text: str, **extra) -> dict:
    pred = first_line(text)
    return {"id": task["id"], "ms": ms, "em": em(pred, task["target"]), "es": es(pred, task["target"]),
            "pred": pred, **extra}


def _failed(task: dict, exc: Exception, log: Callable) -> dict:
    log(f"  error: {exc!r}")
    return _row(task, float("nan"), "", error=repr(exc)[:300])


def hf(tasks: list[dict], log: Callable = print, *, threads: int | None = None) -> Iterator[dict]:
    """HF transformers, the whole prompt encoded again on every request."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
    except ImportError as exc:
        raise Missing(f"transformers / torch not importable: {exc}") from exc
    if threads:
        torch.set_num_threads(threads)
    tok = tokenizer()
    model = AutoModelForCausalLM.from_pretrained(weights()[1], dtype=torch.float32).eval()
    log(f"hf: transformers, {weights()[1].name}, {torch.get_num_threads()} threads", flush=True)

    class Newline(StoppingCriteria):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor(["\n" in tok.decode(input_ids[0, self.start :].tolist())])

    for task in tasks:
        try:
            t0 = time.perf_counter()
            ids = torch.tensor([tok.encode(task["after"][: cursor_offset(task)])[0]])
            with torch.inference_mode():
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                    use_cache=True, stopping_criteria=StoppingCriteriaList([Newline(ids.shape[1])]),
                    pad_token_id=tok.hf.pad_token_id if tok.hf.pad_token_id is not None else tok.bos_id,
                )
            text = tok.decode(out[0, ids.shape[1] :].tolist())
            yield _row(task, (time.perf_counter() - t0) * 1e3, text, prompt=ids.shape[1])
        except Exception as exc:  # counted, never fatal
            yield _failed(task, exc, log)


def llamacpp(tasks: list[dict], log: Callable = print, *, n_ctx: int = 12288,
             threads: int | None = None) -> Iterator[dict]:
    """llama.cpp with prefix reuse: the previous request's KV cache is kept up to the first changed token."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise Missing(f"llama-cpp-python is not installed (benchmark-only: `make anchors`): {exc}") from exc
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    gguf = weights()[0]
    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                verbose=False, logits_all=False)
    log(f"llamacpp: llama-cpp-python, {gguf.name}, n_ctx {n_ctx}, {threads} threads", flush=True)
    bos = [llm.token_bos()] if llm._model.add_bos_token() else []

    def tokens(text: str) -> list[int]:
        return bos + llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    for task in tasks:
        try:
            at = cursor_offset(task)
            prompt = task["after"][:at]
            llm.reset()
            llm.eval(tokens(task["before"][:at]))  # the previous request, before the edit
            want = tokens(prompt)
            reused = Llama.longest_token_prefix(llm._input_ids.tolist(), want)
            reused = reused - 1 if reused == len(want) else reused
            t0 = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=MAX_NEW, temperature=0.0, repeat_penalty=1.0,
                                        stop=["\n"])
            ms = (time.perf_counter() - t0) * 1e3
            yield _row(task, ms, out["choices"][0]["text"], prompt=len(want), reused=reused,
                       evaluated=len(want) - reused)
        except Exception as exc:  # counted, never fatal
            yield _failed(task, exc, log)


RUNNERS: dict[str, Callable[..., Iterator[dict]]] = {"hf": hf, "llamacpp": llamacpp}
