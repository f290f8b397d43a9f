"""The embedded corpus and its tokenizers: deterministic, lossless, no network."""

from __future__ import annotations

import math

import pytest
import torch

from mlatlas.datasets.corpus import (
    CorpusTokenizer,
    corpus_documents,
    load_corpus,
    sample_windows,
    unigram_entropy,
)


def test_documents_are_english_prose_from_the_stdlib():
    docs = corpus_documents()
    assert len(docs) > 1000 and sum(map(len, docs)) > 300_000
    assert docs[0].startswith("The Zen of Python, by Tim Peters\n\nBeautiful is better")
    assert len(set(docs)) == len(docs) and min(map(len, docs)) >= 40
    assert any("Return" in d for d in docs[:200])


def test_bpe_is_deterministic_and_lossless():
    a = load_corpus("bpe", 300)
    b = load_corpus("bpe", 300)
    assert a.tokenizer.vocab_size == 300 and a.tokenizer.eot_id == 299
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    # training itself is deterministic (load_corpus caches the tokenizer, so retrain here)
    from mlatlas.datasets.corpus import _train_bpe

    docs = corpus_documents()[:300]
    assert _train_bpe.__wrapped__(docs, 300).to_str() == _train_bpe.__wrapped__(docs, 300).to_str()
    assert a.train.dtype == torch.long and int(a.train.max()) < 300
    text = "Return the höchst naïve value of x → y, even if\n\tnot ASCII."
    ids = a.tokenizer.encode(text)
    assert a.tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges compress
    # the validation split holds every 10th document, each ending with end-of-text
    docs = corpus_documents()
    n_val = len(docs[9::10])
    assert int((a.val == a.tokenizer.eot_id).sum()) == n_val
    assert a.tokenizer.decode(a.val).split("\n\n")[0] == docs[9].split("\n\n")[0]


def test_bytes_tokenizer():
    tok = CorpusTokenizer("bytes")
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 105, 256, 33]) == "hi\n\n!"
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        tok.encode(b"x")


def test_unigram_entropy_and_windows():
    tokens = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    p = torch.tensor([0.25, 0.25, 0.5])
    assert unigram_entropy(tokens, 5) == pytest.approx(float(-(p * p.log()).sum()))
    assert unigram_entropy(torch.zeros(9, dtype=torch.long), 3) == 0
    assert unigram_entropy(torch.arange(16), 16) == pytest.approx(math.log(16))
    stream = torch.arange(100)
    x, y = sample_windows(stream, 5, 7, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 7) and torch.equal(y, x + 1)
    x2, _ = sample_windows(stream, 5, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_bad_input():
    with pytest.raises(ValueError, match="kind must be 'bytes' or 'bpe', got 'wordpiece'"):
        CorpusTokenizer("wordpiece")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 258 for BPE"):
        CorpusTokenizer("bpe", 100)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0.5\], got 0.9"):
        load_corpus(val_fraction=0.9)
    with pytest.raises(TypeError, match="tokens must be a 1-D int64 tensor"):
        unigram_entropy(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="longer than seq_len=10"):
        sample_windows(torch.arange(10), 2, 10, torch.Generator())
