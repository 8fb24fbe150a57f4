"""Where text and token ids meet: encoding with character offsets, decoding, token healing tables."""

from __future__ import annotations

import torch


class Tokenizer:
    def __init__(self, hf):
        if not getattr(hf, "is_fast", False):
            raise ValueError("Ghostline needs a fast (Rust) tokenizer for character offsets")
        self.hf = hf
        self.vocab_size = len(hf)
        self.bos_id = hf.bos_token_id
        probe = hf("a", add_special_tokens=True).input_ids
        self.adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        eos = {hf.eos_token_id} if hf.eos_token_id is not None else set()
        for name in ("<end_of_turn>", "<|endoftext|>", "<|im_end|>", "<eos>"):
            tid = hf.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid != hf.unk_token_id and tid >= 0:
                eos.add(tid)
        self.eos_ids = eos
        self._strings: list[str] | None = None

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Text -> ids (with BOS when the model wants it) and each id's (start, end) code-point span."""
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
        if self.adds_bos:
            ids, offsets = [self.bos_id] + ids, [(0, 0)] + offsets
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def strings(self) -> list[str]:
        """Each token's text on its own (computed once, ~1 s for a 262k vocabulary)."""
        if self._strings is None:
            self._strings = self.hf.batch_decode(
                [[i] for i in range(self.vocab_size)], clean_up_tokenization_spaces=False
            )
        return self._strings

    def starting_with(self, prefix: str, size: int) -> torch.Tensor:
        """Bool mask [size] of tokens whose text starts with `prefix` (token healing)."""
        mask = torch.zeros(size, dtype=torch.bool)
        hits = [i for i, s in enumerate(self.strings) if s.startswith(prefix) and i not in self.eos_ids]
        mask[torch.tensor(hits, dtype=torch.long)] = True
        return mask
