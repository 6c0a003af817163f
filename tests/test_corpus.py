"""Corpus reading: lazy, stopped at the token budget, the same sequences from every form of corpus."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_llama_like
from tl_latentspaces import corpus as corpus_module
from tl_latentspaces.corpus import check_corpus_file, iter_texts, read_texts, tokenize_corpus


class CharTokenizer:
    """One id per character (2..91), BOS 0, EOS 1: simple enough to build the expected ids by hand."""

    bos_token_id = 0
    eos_token_id = 1

    @staticmethod
    def ids(text):
        return [2 + ord(c) % 90 for c in text]

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        single = isinstance(texts, str)
        ids = [self.ids(t) for t in ([texts] if single else texts)]
        return {"input_ids": ids[0] if single else ids}


@pytest.fixture
def model():
    m = build_llama_like()
    m.tokenizer = CharTokenizer()
    return m


TEXTS = [f"document {i}: " + "some words " * (i % 4 + 1) for i in range(40)]


def expected_sequences(texts, seq_len, max_tokens=None):
    """Documents joined by EOS, cut into seq_len - 1 token pieces, each after a BOS."""
    stream = []
    for t in texts:
        if t.strip():
            stream += CharTokenizer.ids(t) + [1]
    body = seq_len - 1
    n = len(stream) // body
    seqs = torch.tensor(stream[: n * body]).view(n, body)
    seqs = torch.cat([torch.zeros(n, 1, dtype=torch.long), seqs], 1)
    return seqs if max_tokens is None else seqs[: max_tokens // seq_len]


def test_texts_pack_into_bos_led_sequences(model):
    texts = TEXTS[:5] + ["   "] + TEXTS[5:]  # a blank document is skipped
    got = tokenize_corpus(model, texts, seq_len=16)
    assert torch.equal(got, expected_sequences(texts, 16))
    assert torch.equal(tokenize_corpus(model, texts, seq_len=16, max_tokens=64), expected_sequences(texts, 16, 64))


def test_reading_stops_at_the_token_budget(model):
    def texts():
        yield from TEXTS[:20]
        raise RuntimeError("read past the budget")

    got = tokenize_corpus(model, texts(), seq_len=16, max_tokens=48)
    assert torch.equal(got, expected_sequences(TEXTS[:20], 16, 48))
    with pytest.raises(RuntimeError, match="read past the budget"):
        tokenize_corpus(model, texts(), seq_len=16)


def test_plain_text_is_read_in_blocks_cut_at_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "TEXT_BLOCK_CHARS", 64)
    content = "".join(f"line {i} " + "x" * (i % 9) + "\n" for i in range(50)) + "y" * 150 + "\nlast line"
    path = tmp_path / "big.txt"
    path.write_text(content, encoding="utf-8")
    blocks = list(iter_texts(path))
    assert "".join(blocks) == content and len(blocks) > 10
    assert all(len(b) <= 64 + 63 for b in blocks)
    assert all(b.endswith("\n") for b in blocks[:-1] if "\n" in b)
    small = tmp_path / "small.txt"
    small.write_text("one short\ndocument\n", encoding="utf-8")
    assert read_texts(small) == ["one short\ndocument\n"] == list(iter_texts(str(small)))


def test_jsonl_errors_are_found_lazily_and_early_where_they_block(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n{oops\n")
    assert check_corpus_file(path) == path  # the first document is readable
    it = iter_texts([path])
    assert [next(it), next(it)] == ["first", "second"]
    with pytest.raises(ValueError, match=r"c\.jsonl:4 is not valid JSON"):
        next(it)
    (tmp_path / "e.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="holds no text"):
        check_corpus_file(tmp_path / "e.txt")
    (tmp_path / "n.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"n\.jsonl:1 has no string field 'text'"):
        check_corpus_file(tmp_path / "n.jsonl")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="cannot read corpus file .* as UTF-8"):
        check_corpus_file(tmp_path / "b.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_corpus_file(tmp_path / "missing.txt")


def test_datasets_objects_give_the_same_sequences(model):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    reference = tokenize_corpus(model, TEXTS, seq_len=16)
    assert torch.equal(tokenize_corpus(model, ds, seq_len=16), reference)
    assert torch.equal(tokenize_corpus(model, ds.to_iterable_dataset(), seq_len=16), reference)
    assert torch.equal(tokenize_corpus(model, ({"text": t} for t in TEXTS), seq_len=16), reference)
    with pytest.raises(ValueError, match="DatasetDict with splits \\['train'\\]"):
        tokenize_corpus(model, datasets.DatasetDict({"train": ds}), seq_len=16)
    with pytest.raises(ValueError, match="no 'text' column"):
        tokenize_corpus(model, ds.rename_column("text", "body"), seq_len=16)


def test_bad_corpus_items(model):
    with pytest.raises(ValueError, match="the corpus is empty"):
        tokenize_corpus(model, ["", "  "], seq_len=16)
    with pytest.raises(ValueError, match="an item of type int"):
        tokenize_corpus(model, ["text", 3], seq_len=16)
    with pytest.raises(ValueError, match="got int"):
        tokenize_corpus(model, 3, seq_len=16)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        tokenize_corpus(model, ["ab"], seq_len=16)


def test_file_paths_in_a_list_are_read_and_a_missing_corpus_file_is_an_error(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("first document\n")
    b.write_text('{"text": "second"}\n')
    assert list(iter_texts([str(a), "a text of its own", b])) == ["first document\n", "a text of its own", "second"]
    for corpus in (str(tmp_path / "corpsu.txt"), ["text", str(tmp_path / "missing.jsonl")]):
        with pytest.raises(FileNotFoundError, match=r"corpus file .*(corpsu.txt|missing.jsonl)' does not exist"):
            list(iter_texts(corpus))
    assert list(iter_texts(["see notes.txt for more"])) == ["see notes.txt for more"]  # text that names a file
    long_line = "word " * 600  # too long a name for the file system: text
    assert list(iter_texts([long_line])) == [long_line] == list(iter_texts(long_line))


def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path, monkeypatch):
    bom = "\ufeff".encode("utf-8")
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(bom + (json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n").encode())
    assert check_corpus_file(jsonl) == jsonl
    assert read_texts(jsonl) == ["first", "second"] == list(iter_texts(str(jsonl)))
    text = tmp_path / "bom.txt"
    text.write_bytes(bom + "first line\nsecond line\n".encode())
    assert read_texts(text) == ["first line\nsecond line\n"]
    # read in blocks, the mark is still dropped once, at the start of the file only
    monkeypatch.setattr(corpus_module, "TEXT_BLOCK_CHARS", 8)
    assert "".join(iter_texts(text)) == "first line\nsecond line\n"
