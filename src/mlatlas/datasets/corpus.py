"""An embedded English text corpus and its tokenizer, for pretraining tiny language models.

The text is the docstrings of a fixed list of pure-Python standard-library modules, read from
their source files with :mod:`ast` (nothing is imported, nothing is downloaded), plus the Zen
of Python (``this.py``, decoded from its ROT13 source). It is real technical English — about
0.4 MB — and identical on every machine that has the same Python version.

Two tokenizers are offered: raw UTF-8 bytes (vocabulary 256 + an end-of-text token) and a
small byte-level BPE trained on the corpus itself with the Hugging Face ``tokenizers``
library (Sennrich, Haddow, Birch 2016, arXiv:1508.07909; GPT-2's byte-level variant). Both
append ``<|endoftext|>`` after every document.

=================  =========================================================
``docs``           the documents (one docstring each), in a fixed order
``V``              vocabulary size (``tokenizer.vocab_size``)
``eot``            id of ``<|endoftext|>`` (separates documents)
``H_unigram``      ``-Σ p(v) ln p(v)`` over a token stream: the cross-entropy of the best
                   context-free predictor, in nats per token
=================  =========================================================
"""

from __future__ import annotations

import ast
import codecs
import functools
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "EOT",
    "STDLIB_SOURCES",
    "Corpus",
    "CorpusTokenizer",
    "corpus_documents",
    "load_corpus",
    "sample_windows",
    "unigram_entropy",
]

#: The end-of-text token appended after every document.
EOT = "<|endoftext|>"

#: Standard-library source files (relative to the stdlib folder) whose docstrings form the
#: corpus, in this order.
STDLIB_SOURCES: tuple[str, ...] = (
    "argparse.py", "ast.py", "calendar.py", "cmd.py", "codecs.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "gettext.py", "glob.py", "heapq.py",
    "inspect.py", "ipaddress.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "optparse.py", "pathlib.py", "pprint.py", "queue.py", "random.py",
    "sched.py", "shlex.py", "shutil.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "tokenize.py",
    "traceback.py", "typing.py", "urllib/parse.py", "uuid.py", "warnings.py", "weakref.py",
    "zipfile.py",
)


@functools.lru_cache(maxsize=1)
def corpus_documents() -> tuple[str, ...]:
    """The corpus: the Zen of Python, then every docstring of :data:`STDLIB_SOURCES`.

    Docstrings are cleaned (common indentation removed, as :func:`inspect.cleandoc` does),
    exact duplicates and docstrings shorter than 40 characters are dropped.

    Returns:
        The documents, in a fixed order.

    Raises:
        FileNotFoundError: if the standard library's source files are not installed.
        ValueError: if no docstrings were found (Python run with ``-OO`` does not matter here,
            the sources are parsed, but a stripped install would).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = [_zen_of_python(stdlib)]
    seen = set(docs)
    for rel in STDLIB_SOURCES:
        path = stdlib / rel
        if not path.is_file():
            raise FileNotFoundError(f"standard-library source {path} is missing; the embedded "
                                    "corpus is read from the stdlib sources")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _statements(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 40 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    if len(docs) < 100:
        raise ValueError(f"expected hundreds of docstrings in the stdlib sources, found "
                         f"{len(docs)}")
    return tuple(docs)


def _statements(tree: ast.Module) -> list[ast.AST]:
    # the module and every statement in source order (docstrings live only on modules,
    # classes and functions, so expressions need not be visited — much faster than ast.walk)
    out: list[ast.AST] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.stmt, ast.excepthandler))]
        stack.extend(reversed(children))
    return out


def _zen_of_python(stdlib: Path) -> str:
    # this.py holds the Zen as a ROT13 string literal assigned to ``s``
    tree = ast.parse((stdlib / "this.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "s" for t in node.targets)):
            return codecs.decode(node.value.value, "rot13").strip()
    raise ValueError(f"{stdlib / 'this.py'} does not hold the Zen of Python")


class CorpusTokenizer:
    """Bytes or byte-level BPE, with ``<|endoftext|>`` as the last id.

    Args:
        kind: ``"bytes"`` (ids 0–255 are the UTF-8 bytes, 256 is end-of-text) or ``"bpe"``.
        vocab_size: BPE vocabulary size including the 256 byte symbols and end-of-text
            (ignored for bytes).
        documents: The training text for BPE (default: :func:`corpus_documents`).

    Raises:
        ValueError: for an unknown ``kind`` or a BPE ``vocab_size`` below 258.
    """

    def __init__(self, kind: str = "bpe", vocab_size: int = 512,
                 documents: tuple[str, ...] | None = None):
        if kind not in ("bytes", "bpe"):
            raise ValueError(f"kind must be 'bytes' or 'bpe', got {kind!r}")
        self.kind = kind
        self._bpe = None
        if kind == "bytes":
            self.vocab_size = 257
            self.eot_id = 256
            return
        if not isinstance(vocab_size, int) or vocab_size < 258:
            raise ValueError(f"vocab_size must be an int >= 258 for BPE (256 bytes + merges + "
                             f"end-of-text), got {vocab_size!r}")
        self._bpe = _train_bpe(documents or corpus_documents(), vocab_size)
        self.vocab_size = self._bpe.get_vocab_size()
        self.eot_id = self._bpe.token_to_id(EOT)

    def save(self, path: str | Path) -> Path:
        """Write the BPE as a Hugging Face ``tokenizer.json`` (``tokenizers`` format).

        Raises:
            ValueError: for the bytes tokenizer (it has nothing to save).
        """
        if self._bpe is None:
            raise ValueError("the bytes tokenizer has nothing to save (kind='bytes')")
        path = Path(path)
        self._bpe.save(str(path))
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> CorpusTokenizer:
        """Load a BPE saved by :meth:`save` (no retraining).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file's vocabulary has no ``<|endoftext|>`` token.
        """
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        tok = cls.__new__(cls)
        tok.kind = "bpe"
        tok._bpe = Tokenizer.from_file(str(path))
        tok.vocab_size = tok._bpe.get_vocab_size()
        tok.eot_id = tok._bpe.token_to_id(EOT)
        if tok.eot_id is None:
            raise ValueError(f"{path} has no {EOT!r} token: not a corpus tokenizer")
        return tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text appended)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self._bpe is None:
            return list(text.encode("utf-8"))
        return self._bpe.encode(text).ids

    def decode(self, ids: list[int] | Tensor) -> str:
        """Text of ``ids``; end-of-text becomes a blank line, broken UTF-8 is replaced."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        out: list[str] = []
        run: list[int] = []
        for i in [*ids, self.eot_id]:
            if i == self.eot_id:
                if run:
                    out.append(bytes(run).decode("utf-8", "replace") if self._bpe is None
                               else self._bpe.decode(run))
                run = []
            else:
                run.append(int(i))
        return "\n\n".join(out)

    def encode_documents(self, docs: tuple[str, ...] | list[str]) -> Tensor:
        """All documents as one int64 stream, each followed by end-of-text."""
        ids: list[int] = []
        for doc in docs:
            ids.extend(self.encode(doc))
            ids.append(self.eot_id)
        return torch.tensor(ids, dtype=torch.long)


@functools.lru_cache(maxsize=4)
def _train_bpe(documents: tuple[str, ...], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # vocab_size - 1 symbols from training (256 bytes + merges), then end-of-text as the last id
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(documents), trainer)
    tok.add_special_tokens([EOT])
    return tok


@dataclass
class Corpus:
    """A tokenized corpus split into train and validation streams.

    Attributes:
        train: int64 token stream ``[N_train]``.
        val: int64 token stream ``[N_val]``.
        tokenizer: The :class:`CorpusTokenizer` that produced them.
    """

    train: Tensor
    val: Tensor
    tokenizer: CorpusTokenizer


def load_corpus(tokenizer: str = "bpe", vocab_size: int = 512,
                val_fraction: float = 0.1) -> Corpus:
    """Tokenize the embedded corpus and split it by documents.

    Every ``round(1 / val_fraction)``-th document goes to validation, so both splits cover
    every source module (a contiguous split would put whole modules in validation only).

    Args:
        tokenizer: ``"bpe"`` or ``"bytes"``.
        vocab_size: BPE vocabulary size (trained on the *training* documents only).
        val_fraction: Fraction of documents held out, in ``(0, 0.5]``.

    Returns:
        A :class:`Corpus`.
    """
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction <= 0.5):
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction!r}")
    docs = corpus_documents()
    every = max(2, round(1 / val_fraction))
    train_docs = tuple(d for i, d in enumerate(docs) if i % every != every - 1)
    val_docs = tuple(d for i, d in enumerate(docs) if i % every == every - 1)
    tok = CorpusTokenizer(tokenizer, vocab_size, documents=train_docs)
    return Corpus(tok.encode_documents(train_docs), tok.encode_documents(val_docs), tok)


def unigram_entropy(tokens: Tensor, vocab_size: int) -> float:
    """Empirical unigram entropy ``H = -Σ_v p(v) ln p(v)`` of a token stream, in nats.

    It is the cross-entropy that the best *context-free* predictor — one fitted to these very
    tokens — reaches on them, so a language model whose loss is below it must use context.

    Args:
        tokens: int64 ``[N]`` with values in ``[0, vocab_size)``.
        vocab_size: ``V``.
    """
    if not isinstance(tokens, Tensor) or tokens.dtype != torch.long or tokens.dim() != 1:
        raise TypeError("tokens must be a 1-D int64 tensor, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)} "
                        f"{tuple(getattr(tokens, 'shape', ()))}")
    counts = torch.bincount(tokens, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())  # H = -Σ p ln p


def sample_windows(tokens: Tensor, batch: int, seq_len: int, generator: torch.Generator,
                   starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Random windows of a token stream for next-token training.

    Args:
        tokens: int64 stream ``[N]`` with ``N > seq_len``.
        batch: Number of windows ``B``.
        seq_len: Window length ``T``.
        generator: The only source of randomness (seed it for reproducibility).
        starts: int64 ``[S]`` the positions a window may start at (e.g. document starts, so
            that no window cuts a document's beginning off); default every position.

    Returns:
        ``(inputs [B, T], targets [B, T])`` with ``targets[:, t] = inputs[:, t + 1]``.
    """
    if tokens.dim() != 1 or tokens.numel() <= seq_len:
        raise ValueError(f"tokens must be 1-D and longer than seq_len={seq_len}, got shape "
                         f"{tuple(tokens.shape)}")
    if starts is None:
        first = torch.randint(0, tokens.numel() - seq_len, (batch,), generator=generator)
    else:
        if starts.dim() != 1 or starts.numel() == 0 or starts.dtype != torch.long or \
                int(starts.min()) < 0 or int(starts.max()) >= tokens.numel() - seq_len:
            raise ValueError(f"starts must be a non-empty 1-D int64 tensor in [0, "
                             f"{tokens.numel() - seq_len}) (len(tokens) - seq_len), got "
                             f"{starts.dtype} {tuple(starts.shape)}"
                             + (f" in [{int(starts.min())}, {int(starts.max())}]"
                                if starts.numel() else ""))
        first = starts[torch.randint(0, starts.numel(), (batch,), generator=generator)]
    idx = first[:, None] + torch.arange(seq_len + 1)
    win = tokens[idx]
    return win[:, :-1], win[:, 1:]

