"""Corpora: the offline default text and the tokenization of any corpus into fixed-length sequences.

Example:
    >>> seqs = tokenize_corpus(model, default_corpus("heldout"), seq_len=128)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from array import array
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from tl_latentspaces.checks import check_int
from tl_latentspaces.model import ModelAccess

__all__ = ["default_corpus", "read_texts", "iter_texts", "check_corpus_file", "tokenize_corpus", "Corpus"]

#: Text, a file path, a list of texts or paths, a ``datasets`` object, or a ``[n, seq_len]`` token tensor.
Corpus = Union[str, Path, Sequence[str], Sequence[Path], Iterable[Any], torch.Tensor]

_HELDOUT_EVERY = 5  # every fifth document of the default corpus is held out


def default_corpus(split: str = "train") -> list[str]:
    """The English prose that ships with Python (``pydoc_data.topics``, about 465,000 characters).

    ``split`` is ``"train"`` (4 of every 5 documents), ``"heldout"`` (the rest) or ``"all"``.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    docs = [topics[k] for k in sorted(topics)]
    if split == "all":
        return docs
    held = split == "heldout"
    return [d for i, d in enumerate(docs) if (i % _HELDOUT_EVERY == 0) == held]


#: Plain-text files are read in blocks of this many characters, each cut at its last newline; a
#: file shorter than a block is one document.
TEXT_BLOCK_CHARS = 4 << 20

#: Documents tokenized together in one call of the (fast) tokenizer.
_TOKENIZE_GROUP = 64


def read_texts(path: Union[str, Path]) -> list[str]:
    """Texts from a UTF-8 file: ``.jsonl`` (each line's ``"text"`` field) or plain text.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it cannot be decoded, a JSONL line lacks ``"text"``, or it holds no text.
    """
    return list(_iter_file(Path(path)))


def check_corpus_file(path: Union[str, Path]) -> Path:
    """Return the path after reading up to its first text; raises what :func:`read_texts` raises."""
    p = Path(path)
    for text in _iter_file(p):
        if text.strip():
            break
    return p


def _iter_file(p: Path) -> Iterator[str]:
    if not p.is_file():
        raise FileNotFoundError(f"corpus file {str(p)!r} does not exist or is not a file.")
    found = False
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is dropped, not read as part of the first text.
        with p.open(encoding="utf-8-sig") as fh:
            for text in _jsonl_texts(p, fh) if p.suffix == ".jsonl" else _text_blocks(fh):
                found = found or bool(text.strip())
                yield text
    except UnicodeDecodeError as err:
        raise ValueError(f"cannot read corpus file {str(p)!r} as UTF-8 text: {err}") from err
    except OSError as err:
        raise ValueError(f"cannot read corpus file {str(p)!r}: {err}") from err
    if not found:
        raise ValueError(f"corpus file {str(p)!r} holds no text.")


def _jsonl_texts(p: Path, fh: Any) -> Iterator[str]:
    for n, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{p}:{n} is not valid JSON: {err}") from err
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{p}:{n} has no string field 'text'; each JSONL line needs one.")
        yield obj["text"]


def _text_blocks(fh: Any) -> Iterator[str]:
    """Blocks of about :data:`TEXT_BLOCK_CHARS` characters, each but the last cut after a newline."""
    carry = ""
    while True:
        block = fh.read(TEXT_BLOCK_CHARS)
        if not block:
            break
        text = carry + block
        # A full block may be followed by more: hold back its last partial line (unless it has no newline).
        cut = (text.rfind("\n") + 1 or len(text)) if len(block) == TEXT_BLOCK_CHARS else len(text)
        carry = text[cut:]
        yield text[:cut]
    if carry:
        yield carry


def _iter_dataset(dataset: Any) -> Iterator[str]:
    columns = dataset.column_names
    if isinstance(columns, dict):  # a DatasetDict: splits
        raise ValueError(f"got a DatasetDict with splits {list(columns)}; pass one split, e.g. dataset['train'].")
    if "text" not in columns:
        raise ValueError(f"the dataset has columns {list(columns)} but no 'text' column to read.")
    if hasattr(dataset, "iter"):
        for batch in dataset.iter(batch_size=1024):
            yield from (t for t in batch["text"] if isinstance(t, str))
    else:
        yield from (row["text"] for row in dataset if isinstance(row.get("text"), str))


def _names_a_file(s: str) -> bool:
    """Whether the string ``s`` is a file path rather than text: one line naming an existing file, or a
    ``.txt``/``.jsonl`` name (then a missing file is an error, not a document of one word)."""
    if "\n" in s or len(s) >= 4096:
        return False
    try:
        if Path(s).is_file():
            return True
    except OSError:  # a name too long for the file system is text
        return False
    if s.strip().lower().endswith((".txt", ".jsonl")) and len(s.split()) == 1:
        raise FileNotFoundError(f"corpus file {s!r} does not exist. Fix the path; a text that is only a file "
                                "name is not read as a document.")
    return False


def iter_texts(corpus: Any) -> Iterator[str]:
    """The documents of a corpus, read lazily: nothing is read past what the caller consumes.

    ``corpus`` is a text; a file path (``.jsonl`` lines or plain-text blocks); a ``datasets`` object with a
    ``"text"`` column; or an iterable of texts, file paths and ``{"text": ...}`` rows (a string is a path when
    it is one line naming an existing file, or a ``.txt``/``.jsonl`` name). A corpus read twice
    (the report's) must be re-iterable: a list, a path, a dataset.
    """
    if isinstance(corpus, str) and not _names_a_file(corpus):
        yield corpus
    elif isinstance(corpus, (str, Path)):
        yield from _iter_file(Path(corpus))
    elif getattr(corpus, "column_names", None) is not None:
        yield from _iter_dataset(corpus)
    elif not hasattr(corpus, "__iter__"):
        raise ValueError(f"a corpus must be text, a file path, a datasets object, an iterable of texts, paths or "
                         f"{{'text': ...}} rows, or a [n, seq_len] token tensor; got {type(corpus).__name__}.")
    else:
        for item in corpus:
            if isinstance(item, Path) or (isinstance(item, str) and _names_a_file(item)):
                yield from _iter_file(Path(item))
            elif isinstance(item, str):
                yield item
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                yield item["text"]
            else:
                raise ValueError(f"a corpus must be text, a list of texts or file paths, or a [n, seq_len] "
                                 f"token tensor; got an item of type {type(item).__name__}.")


def _token_stream(tok: Any, texts: Iterator[str], budget: Optional[int]) -> tuple[array, bool]:
    """Token ids (int64) of the texts joined by EOS, read in groups until about ``budget`` ids; and whether any
    text was not blank."""
    eos = getattr(tok, "eos_token_id", None)
    stream = array("q")
    any_text = False
    group: list[str] = []

    def flush() -> None:
        for ids in tok(group, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(int(eos))
        group.clear()

    want, n_docs = 1, 0
    for text in texts:
        if not text.strip():
            continue
        any_text = True
        group.append(text)
        if len(group) >= want:
            n_docs += len(group)
            flush()
            if budget is not None and len(stream) >= budget:
                return stream, any_text
            # Next group: as many documents as the budget seems to need, so that reading stops soon after it.
            want = _TOKENIZE_GROUP
            if budget is not None:
                want = min(want, math.ceil((budget - len(stream)) * n_docs / max(len(stream), 1)))
    if group:
        flush()
    return stream, any_text


def tokenize_corpus(model: Any, corpus: Corpus, *, seq_len: int = 128, prepend_bos: bool = True,
                    max_tokens: Optional[int] = None, min_sequences: int = 1) -> torch.Tensor:
    """Pack a corpus into ``[n_seq, seq_len]`` token sequences.

    Documents are tokenized without special tokens, joined with EOS (when the tokenizer has one) and cut into
    ``seq_len`` tokens (``seq_len - 1`` plus BOS when ``prepend_bos``). A token tensor is taken as it is, after
    checks. Texts are read lazily (:func:`iter_texts`) until ``max_tokens`` (whole sequences) are in hand;
    fewer than ``min_sequences`` sequences is an error.
    """
    access = ModelAccess.of(model)
    seq_len = check_int(seq_len, "seq_len", minimum=2, maximum=access.n_ctx, why=f" (the model's n_ctx={access.n_ctx})")
    if isinstance(corpus, torch.Tensor):
        if corpus.ndim != 2 or corpus.dtype not in (torch.int64, torch.int32) or corpus.shape[1] != seq_len:
            raise ValueError(f"a token corpus must be an integer tensor [n_seq, seq_len={seq_len}], got dtype "
                             f"{corpus.dtype} and shape {tuple(corpus.shape)}.")
        seqs = corpus.long()
    else:
        tok = access.require_tokenizer("tokenizing a corpus")
        body = seq_len - 1 if prepend_bos else seq_len
        budget = None if max_tokens is None else (max_tokens // seq_len + 1) * body
        stream, any_text = _token_stream(tok, iter_texts(corpus), budget)
        if not any_text:
            raise ValueError("the corpus is empty: it holds no text. Pass texts, files or token ids.")
        n = len(stream) // body
        if n == 0:
            raise ValueError(f"the corpus tokenizes to {len(stream)} tokens, fewer than one sequence of "
                             f"seq_len={seq_len}. Pass more text or a smaller seq_len.")
        seqs = torch.frombuffer(stream, dtype=torch.int64, count=n * body).clone().view(n, body)
        if prepend_bos:
            bos = access.bos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False.")
            seqs = torch.cat([torch.full((n, 1), bos, dtype=torch.long), seqs], 1)
    if max_tokens is not None:
        seqs = seqs[: max(1, max_tokens // seq_len)]
    if seqs.shape[0] < min_sequences:
        raise ValueError(f"the corpus gives {seqs.shape[0]} sequences of {seq_len} tokens; at least "
                         f"{min_sequences} are needed. Pass more text.")
    lo, hi = int(seqs.min()), int(seqs.max())
    if lo < 0 or hi >= access.d_vocab:
        raise ValueError(f"corpus token ids must lie in [0, {access.d_vocab}), got [{lo}, {hi}].")
    return seqs
