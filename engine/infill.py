"""Fill-in-the-middle: the special tokens of the models trained for it, found in the tokenizer.

The prompt is prefix-suffix-middle (PSM): `<PRE> prefix <SUF> suffix <MID>`, the model writing the
middle. Ghostline keeps the prefix in the document's cache: `<PRE>` is a context row before it, and
`<SUF> suffix` is encoded per request after it (engine.Engine.stream), so `<MID>` is the first token
a decoder feeds. Conventions, tried in order (the first whose three tokens all exist wins):
StarCoder/StarCoder2/SantaCoder (`<fim_prefix>`), Qwen2.5-Coder and CodeGemma (`<|fim_prefix|>`),
DeepSeek-Coder (`<｜fim▁begin｜>`, hole, end).
"""

from __future__ import annotations

from dataclasses import dataclass

CONVENTIONS = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<fim_pad>", "<|endoftext|>", "<file_sep>")),
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", ("<|fim_pad|>", "<|endoftext|>", "<|file_separator|>")),
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ("<|EOT|>", "<｜end▁of▁sentence｜>")),
)
SUFFIX_LINES = 12  # lines after the cursor's line the suffix holds at most (with the rest of that line)
SUFFIX_TOKENS = 160  # ... and tokens


@dataclass(frozen=True)
class Infill:
    prefix: int  # token ids
    suffix: int
    middle: int
    stops: frozenset[int]  # ids that end a middle besides the model's EOS


def detect(hf) -> Infill | None:
    """The tokenizer's FIM tokens (a Hugging Face fast tokenizer), or None when it has none."""
    vocab = hf.get_vocab()
    for pre, suf, mid, stops in CONVENTIONS:
        if pre in vocab and suf in vocab and mid in vocab:
            return Infill(vocab[pre], vocab[suf], vocab[mid], frozenset(vocab[s] for s in stops if s in vocab))
    return None


def suffix_text(text: str, offset: int) -> str:
    """What the prompt's suffix holds: the rest of the cursor's line and up to SUFFIX_LINES lines below."""
    end = offset
    for _ in range(SUFFIX_LINES + 1):
        nl = text.find("\n", end)
        if nl < 0:
            return text[offset:]
        end = nl + 1
    return text[offset:end]
