"""Tokenized batches (:class:`Tokens`, :class:`TokenDecoder`), prompt checks and right-padding.

The entry point is :meth:`~tl_latentspaces.model.ModelAccess.to_tokens`; this module knows no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from jaxtyping import Int

__all__ = ["Tokens", "TokenDecoder", "token_tensor", "prompt_texts", "padded_batch"]


@dataclass(frozen=True)
class Tokens:
    """A tokenized batch: ``[batch, pos]`` right-padded ``ids``, the ``[batch, pos]`` bool ``mask`` of
    real (non-pad) positions, and whether a BOS token was prepended."""

    ids: Int[torch.Tensor, "batch pos"]
    mask: torch.Tensor
    prepend_bos: bool


class TokenDecoder:
    """Token id -> text, cached, for result objects; ``tokenizer`` (or None) is kept for views
    that show what a byte-level token holds when it is only part of a UTF-8 character."""

    def __init__(self, tokenizer: Any, decode_token: Callable[[int], str]):
        self.tokenizer = tokenizer
        self._decode_token = decode_token
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        i = int(token_id)
        if i not in self._cache:
            self._cache[i] = self._decode_token(i)
        return self._cache[i]


def token_tensor(input: torch.Tensor, d_vocab: int) -> Tokens:
    ids = input.unsqueeze(0) if input.ndim == 1 else input
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"token input must be an integer tensor of shape [batch, pos], got dtype "
                         f"{ids.dtype} and shape {tuple(input.shape)}. Fix: pass token ids, e.g. "
                         "model.to_tokens(text), as a [batch, pos] (or [pos]) int64 tensor.")
    if ids.numel() == 0:
        raise ValueError(f"token input is empty (shape {tuple(input.shape)}); pass at least one token.")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= d_vocab:
        raise ValueError(f"token ids must lie in [0, {d_vocab}), got values in [{lo}, {hi}].")
    ids = ids.long()
    return Tokens(ids=ids, mask=torch.ones_like(ids, dtype=torch.bool), prepend_bos=False)


def prompt_texts(input: Any) -> list[str]:
    if not isinstance(input, (str, list, tuple)):
        if isinstance(input, (Mapping, Set)):
            hint = "A mapping or a set has no fixed order of prompts: pass list(...) of the texts."
        else:
            hint = "Wrap a single prompt in a string, or token ids in torch.tensor([[...]])."
        raise ValueError(f"input must be a string, a list or tuple of strings, or a [batch, pos] token "
                         f"tensor; got {type(input).__name__} {input!r:.80}. " + hint)
    texts = [input] if isinstance(input, str) else list(input)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"input must be a non-empty string, a non-empty list of strings or a token "
                         f"tensor; got {type(input).__name__} {input!r:.80}.")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"prompt(s) at index {empty} are empty or whitespace only: there is nothing "
                         "to read. Pass text.")
    return texts


def padded_batch(tok: Any, texts: list[str], bos: Optional[int], prepend_bos: bool) -> Tokens:
    prefix = [bos] if prepend_bos else []
    rows = [prefix + list(tok(text, add_special_tokens=False)["input_ids"]) for text in texts]
    length = max(len(r) for r in rows)
    pad = getattr(tok, "pad_token_id", None)
    pad = int(pad) if pad is not None else (bos if bos is not None else 0)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return Tokens(ids=ids, mask=mask, prepend_bos=prepend_bos)
