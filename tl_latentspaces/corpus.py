"""Corpora: offline default text, tokenization into fixed-length sequences, residual streaming.

The default corpus is English prose that ships with Python itself (``pydoc_data.topics``, about
465,000 characters), so fitting and evaluation never need a download. Its documents are split
deterministically into a training part and a disjoint held-out part.

Example:
    >>> from tl_latentspaces.corpus import default_corpus, tokenize_corpus
    >>> texts = default_corpus("heldout")
    >>> seqs = tokenize_corpus(model, texts, seq_len=128)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from tl_latentspaces.checks import check_int
from tl_latentspaces.hooks import HookSession, ResidualCollector
from tl_latentspaces.model import ModelAccess

__all__ = ["default_corpus", "read_texts", "tokenize_corpus", "stream_residuals", "Corpus"]

Corpus = Union[str, Path, Sequence[str], Sequence[Path], torch.Tensor]

_HELDOUT_EVERY = 5  # every fifth document of the default corpus is held out


def default_corpus(split: str = "train") -> list[str]:
    """The offline default corpus: Python's own documentation prose (``pydoc_data.topics``).

    Args:
        split: ``"train"`` (4 of every 5 documents), ``"heldout"`` (the fifth) or ``"all"``.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    docs = [topics[k] for k in sorted(topics)]
    if split == "all":
        return docs
    held = split == "heldout"
    return [d for i, d in enumerate(docs) if (i % _HELDOUT_EVERY == 0) == held]


def read_texts(path: Union[str, Path]) -> list[str]:
    """Texts from a file: ``.jsonl`` (one object per line, its ``"text"`` field) or plain text.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded, a JSONL line lacks ``"text"``, or it holds no text.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"corpus file {str(p)!r} does not exist or is not a file.")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read corpus file {str(p)!r} as UTF-8 text: {err}") from err
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{p}:{n} is not valid JSON: {err}") from err
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{p}:{n} has no string field 'text'; each JSONL line needs one.")
            texts.append(obj["text"])
    else:
        texts = [raw]
    if not any(t.strip() for t in texts):
        raise ValueError(f"corpus file {str(p)!r} holds no text.")
    return texts


def _as_texts(corpus: Corpus) -> list[str]:
    if isinstance(corpus, Path):
        return read_texts(corpus)
    if isinstance(corpus, str):
        # A string naming an existing file is read; any other string is text.
        if "\n" not in corpus and len(corpus) < 4096 and Path(corpus).is_file():
            return read_texts(corpus)
        return [corpus]
    items = list(corpus)
    texts: list[str] = []
    for item in items:
        if isinstance(item, Path):
            texts += read_texts(item)
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise ValueError(
                f"a corpus must be text, a list of texts or file paths, or a [n, seq_len] token "
                f"tensor; got an item of type {type(item).__name__}."
            )
    return texts


def tokenize_corpus(
    model: Any,
    corpus: Corpus,
    *,
    seq_len: int = 128,
    prepend_bos: bool = True,
    max_tokens: Optional[int] = None,
    min_sequences: int = 1,
) -> torch.Tensor:
    """Pack a corpus into ``[n_seq, seq_len]`` token sequences.

    Documents are tokenized without special tokens, joined with the tokenizer's EOS token (when
    it has one) and cut into pieces of ``seq_len`` tokens (``seq_len - 1`` plus BOS when
    ``prepend_bos``). A token tensor is taken as it is, after checks.

    Args:
        model: The model whose tokenizer to use (or a :class:`ModelAccess`).
        corpus: Text, a list of texts, file paths (``.txt``/``.jsonl``) or a token tensor.
        seq_len: Tokens per sequence, BOS included.
        prepend_bos: Start each sequence with BOS (recommended: models expect it).
        max_tokens: Keep at most this many tokens (whole sequences).
        min_sequences: Fewer sequences than this is an error.
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    seq_len = check_int(seq_len, "seq_len", minimum=2, maximum=access.n_ctx, why=f" (the model's n_ctx={access.n_ctx})")
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2 or corpus.dtype not in (torch.int64, torch.int32) or corpus.shape[1] != seq_len:
            raise ValueError(
                f"a token corpus must be an integer tensor [n_seq, seq_len={seq_len}], got dtype "
                f"{corpus.dtype} and shape {tuple(corpus.shape)}."
            )
        seqs = corpus.long()
    else:
        texts = [t for t in _as_texts(corpus) if t.strip()]
        if not texts:
            raise ValueError("the corpus is empty: it holds no text. Pass texts, files or token ids.")
        tok = access._require_tokenizer("tokenizing a corpus")
        body = seq_len - 1 if prepend_bos else seq_len
        eos = getattr(tok, "eos_token_id", None)
        stream: list[int] = []
        budget = None if max_tokens is None else (max_tokens // seq_len + 1) * body
        for text in texts:
            stream += list(tok(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                stream.append(int(eos))
            if budget is not None and len(stream) >= budget:
                break
        n = len(stream) // body
        if n == 0:
            raise ValueError(
                f"the corpus tokenizes to {len(stream)} tokens, fewer than one sequence of "
                f"seq_len={seq_len}. Pass more text or a smaller seq_len."
            )
        body_ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
        if prepend_bos:
            bos = access.bos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False.")
            body_ids = torch.cat([torch.full((n, 1), bos, dtype=torch.long), body_ids], 1)
        seqs = body_ids
    if max_tokens is not None:
        seqs = seqs[: max(1, max_tokens // seq_len)]
    if seqs.shape[0] < min_sequences:
        raise ValueError(
            f"the corpus gives {seqs.shape[0]} sequences of {seq_len} tokens; at least "
            f"{min_sequences} are needed. Pass more text."
        )
    lo, hi = int(seqs.min()), int(seqs.max())
    if lo < 0 or hi >= access.d_vocab:
        raise ValueError(f"corpus token ids must lie in [0, {access.d_vocab}), got [{lo}, {hi}].")
    return seqs


def stream_residuals(
    model: Any,
    sequences: torch.Tensor,
    hook_names: dict[str, str],
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "residual stream",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``sequences`` through the model in batches and yield ``(ids, stack)`` per batch.

    ``stack`` is ``[entry, batch, seq_len, d_model]`` in ``hook_names`` order, captured by the
    plugin's hooks inside the model's own forward pass (so the user's hooks act on it). The
    capture hooks are removed, exactly, after every batch and on any exception.
    """
    from tqdm.auto import tqdm

    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    access.require_eval("streaming the residual stream")
    labels = list(hook_names)
    n = sequences.shape[0]
    bar = tqdm(total=n * sequences.shape[1], desc=desc, unit="tok", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            ids = sequences[start : start + batch_size]
            with HookSession(access) as session:
                collector = ResidualCollector(session, hook_names)
                with torch.no_grad():
                    access.forward(ids)
            yield ids, collector.stack(labels)
            bar.update(ids.numel())
    finally:
        bar.close()
