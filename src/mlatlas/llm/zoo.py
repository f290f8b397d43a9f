"""Shared tiny pretrained language models: built once, cached, checked.

LoRA, prefix tuning, adapters, DPO, GRPO, MTP and Medusa all start from a *pretrained* base,
as their papers do; training one from scratch inside every 30-second experiment would measure
the pretraining, not the method. :func:`tiny_llama` returns such a base: a Llama 3-style
decoder (GQA, RoPE, SwiGLU, RMSNorm; :mod:`mlatlas.llm.llama`) pretrained with
:func:`mlatlas.llm.pretraining.pretrain` on the embedded corpus
(:mod:`mlatlas.datasets.corpus`: the Python standard library's docstrings, 512-token BPE).

Where it comes from, in this order:

1. the copy shipped inside the package (``llm/zoo_models/<key>/``, ≈ 4 MB, built on Python
   3.11 whose standard library gives the corpus);
2. the user cache (``$MLATLAS_CACHE`` or ``~/.cache/mlatlas``, ``zoo/<key>/``);
3. otherwise it is pretrained now (a few minutes on 2 cores, with a progress bar) and cached.

``<key>`` addresses the content: a hash of the recipe (architecture, data, optimisation,
seed), the corpus text and :data:`ZOO_FORMAT` (bumped whenever the model or training code
changes what a recipe produces). Every folder carries ``zoo.json`` with the SHA-256 of its
files; a folder whose key or checksums do not match — stale or corrupt — is never used: it is
reported with a warning and rebuilt. The folders are Hugging Face folders (``config.json``,
``model.safetensors``, ``tokenizer.json``) that ``transformers.LlamaForCausalLM`` loads too.

Example::

    from mlatlas.llm.zoo import tiny_llama
    lm = tiny_llama()                      # PretrainedLM
    ids = torch.tensor([lm.tokenizer.encode("Return the")])
    print(lm.tokenizer.decode(lm.model.generate(ids, 20)[0]))
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mlatlas.datasets.corpus import CorpusTokenizer, corpus_documents, load_corpus
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.pretraining import PretrainSchedule, adamw_for, evaluate_loss, pretrain

__all__ = ["ZOO_FORMAT", "PretrainedLM", "TinyLlamaRecipe", "build_tiny_llama", "cache_root",
           "tiny_llama"]

#: Version of what a recipe means; bump it when the model or the training code changes the
#: weights a recipe produces (every cached model then rebuilds).
ZOO_FORMAT = 1

#: Models shipped inside the package.
SHIPPED = Path(__file__).with_name("zoo_models")

_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class TinyLlamaRecipe:
    """Everything that determines the weights of a shared tiny Llama.

    Attributes:
        vocab_size: BPE vocabulary of the corpus tokenizer.
        hidden_size: Model width ``d``.
        intermediate_size: SwiGLU hidden width.
        num_layers: Decoder layers.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (GQA).
        max_position_embeddings: Longest sequence the model accepts.
        steps: Pretraining optimizer steps.
        batch: Windows per step.
        seq_len: Training window length.
        lr: Peak AdamW learning rate (linear warm-up, cosine to a tenth).
        warmup: Warm-up steps.
        weight_decay: AdamW decoupled weight decay.
        seed: Seeds the initial weights and the data order.
    """

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 1024
    steps: int = 600
    batch: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0

    def model_config(self) -> LlamaConfig:
        """The :class:`LlamaConfig` of the model (tied embeddings, RoPE θ = 10⁴)."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size,
                           num_layers=self.num_layers, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, rope_theta=10000.0,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=True)

    def schedule(self) -> PretrainSchedule:
        """The :class:`PretrainSchedule` of the pretraining run."""
        return PretrainSchedule(steps=self.steps, batch=self.batch, seq_len=self.seq_len,
                                lr=self.lr, warmup=self.warmup,
                                weight_decay=self.weight_decay)

    def key(self) -> str:
        """Content address: recipe + corpus text + :data:`ZOO_FORMAT` → 16 hex digits."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": ZOO_FORMAT, "recipe": asdict(self)},
                            sort_keys=True).encode())
        h.update(_corpus_sha256().encode())
        return f"tiny-llama-{h.hexdigest()[:16]}"


@dataclass
class PretrainedLM:
    """A pretrained model from the zoo, ready to fine-tune.

    Attributes:
        model: A fresh :class:`~mlatlas.llm.llama.Llama` (fp32, eval mode) — every call of
            :func:`tiny_llama` returns a new copy, so fine-tuning it changes nothing shared.
        tokenizer: The corpus BPE it was trained with (``encode``, ``decode``, ``eot_id``).
        recipe: The :class:`TinyLlamaRecipe` it was built from.
        folder: The Hugging Face folder it was loaded from.
        val_loss: Its validation loss on the corpus's held-out documents (nats/token).
    """

    model: Llama
    tokenizer: CorpusTokenizer
    recipe: TinyLlamaRecipe
    folder: Path
    val_loss: float

    @property
    def config(self) -> LlamaConfig:
        """The model's :class:`LlamaConfig`."""
        return self.model.config


def cache_root() -> Path:
    """``$MLATLAS_CACHE`` or ``~/.cache/mlatlas``."""
    return Path(os.environ.get("MLATLAS_CACHE") or Path.home() / ".cache" / "mlatlas")


def tiny_llama(recipe: TinyLlamaRecipe | None = None) -> PretrainedLM:
    """The shared tiny pretrained Llama: shipped, cached, or pretrained now and cached.

    Args:
        recipe: Default :class:`TinyLlamaRecipe` when ``None``.

    Returns:
        A :class:`PretrainedLM` with a fresh model.
    """
    recipe = recipe or TinyLlamaRecipe()
    if not isinstance(recipe, TinyLlamaRecipe):
        raise TypeError(f"recipe must be a TinyLlamaRecipe, got {type(recipe).__name__}")
    key = recipe.key()
    for folder in (SHIPPED / key, cache_root() / "zoo" / key):
        if folder.exists() and _verify(folder, key):
            return _load(folder, recipe)
    target = cache_root() / "zoo" / key
    with _lock(target.with_suffix(".lock")):  # one builder; the others wait and then load
        if not (target.exists() and _verify(target, key, warn=False)):
            if target.exists():
                shutil.rmtree(target)
            build_tiny_llama(recipe, target)
    return _load(target, recipe)


def build_tiny_llama(recipe: TinyLlamaRecipe, folder: str | Path) -> Path:
    """Pretrain the recipe's model and write its folder with a ``zoo.json`` manifest.

    Deterministic on the CPU for a given machine; the folder appears atomically (written
    beside it, then renamed).

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    corpus = load_corpus("bpe", recipe.vocab_size)
    torch.manual_seed(recipe.seed)
    model = Llama(recipe.model_config())
    schedule = recipe.schedule()
    optimizer = adamw_for(model, schedule)
    curve: list[tuple[int, float]] = []
    every = max(1, recipe.steps // 10)

    def record(step: int, _loss: float) -> None:  # the validation curve, kept in zoo.json
        if step % every == 0 and step < recipe.steps:
            curve.append((step, evaluate_loss(model, corpus.val, recipe.seq_len, 32)))

    losses = pretrain(model, optimizer, corpus.train, schedule,
                      torch.Generator().manual_seed(recipe.seed), description="pretrain zoo",
                      on_step=record)
    val_loss = evaluate_loss(model, corpus.val, recipe.seq_len)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    model.eval().save_pretrained(tmp)
    corpus.tokenizer.save(tmp / "tokenizer.json")
    manifest = {
        "key": recipe.key(), "format": ZOO_FORMAT, "recipe": asdict(recipe),
        "corpus_sha256": _corpus_sha256(), "val_loss": val_loss,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "val_curve_first_32_windows": curve,
        "build_seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
        "sha256": {name: _sha256(tmp / name) for name in _FILES},
    }
    (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder)
    return folder


def _verify(folder: Path, key: str, warn: bool = True) -> bool:
    """True when ``folder`` holds the model of ``key`` with intact files."""
    problem = None
    try:
        manifest = json.loads((folder / "zoo.json").read_text())
        if manifest.get("key") != key:
            problem = f"it holds {manifest.get('key')!r}, expected {key!r} (stale)"
        else:
            bad = [n for n in _FILES if _sha256(folder / n) != manifest["sha256"].get(n)]
            if bad:
                problem = f"checksum mismatch in {bad} (corrupt)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"unreadable manifest or files ({type(exc).__name__}: {exc})"
    if problem and warn:
        warnings.warn(f"zoo model folder {folder} not used: {problem}; rebuilding",
                      stacklevel=3)
    return problem is None


def _load(folder: Path, recipe: TinyLlamaRecipe) -> PretrainedLM:
    manifest = json.loads((folder / "zoo.json").read_text())
    model = Llama.from_pretrained(folder).eval()
    return PretrainedLM(model, _tokenizer(str(folder / "tokenizer.json")), recipe, folder,
                        float(manifest["val_loss"]))


_TOKENIZERS: dict[str, CorpusTokenizer] = {}


def _tokenizer(path: str) -> CorpusTokenizer:
    if path not in _TOKENIZERS:  # immutable, so one instance per file is shared
        _TOKENIZERS[path] = CorpusTokenizer.from_file(path)
    return _TOKENIZERS[path]


def _corpus_sha256() -> str:
    h = hashlib.sha256()
    for doc in corpus_documents():
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield fh
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
