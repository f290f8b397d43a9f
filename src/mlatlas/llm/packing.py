"""Sequence packing: several documents per row, no attention across documents, no padding.

A padded batch wastes compute on pad tokens: with a long-tailed length mix most of a batch
padded to its longest sequence is padding. Packing places whole documents one after another
into rows of ``max_tokens`` (bin packing, first-fit-decreasing), restarts the position ids at
every document and restricts attention to a block-diagonal causal mask, so every document is
computed exactly as if it were alone — the per-token losses and gradients equal the padded
batch's — while almost every token is real. Krell, Kosec, Perez, Fitzgibbon 2021, "Efficient
Sequence Packing without Cross-contamination", arXiv:2107.02027.

Document boundaries are given FlashAttention-varlen style as ``cu_seqlens``: cumulative
lengths over the flattened ``R·L`` token stream. Each row's unused tail is its own
(padding) segment, so segments never cross rows.

=================  =======================================================
``R, L``           rows, row length (``max_tokens``)
``cu_seqlens``     int32 ``[n_seg + 1]``: ``0 = c_0 < c_1 < … < c_n = R·L``
``seg(t)``         segment of flat position ``t``: ``c_s ≤ t < c_{s+1}``
``pos(t)``         ``t - c_{seg(t)}`` (position id, restarts per document)
``M[i, j]``        attend mask: ``seg(i) = seg(j) ∧ j ≤ i``
=================  =======================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mlatlas.attention.reference import QKVShape, check_cu_seqlens

__all__ = [
    "IGNORE_INDEX",
    "PackedBatch",
    "PaddedBatch",
    "first_fit_decreasing",
    "pack",
    "packed_causal_mask",
    "pad",
    "token_losses",
]

#: Label value of positions that predict nothing (document ends, padding).
IGNORE_INDEX = -100


def _as_sequences(sequences: Sequence[Sequence[int] | Tensor]) -> list[Tensor]:
    if not isinstance(sequences, (list, tuple)) or len(sequences) == 0:
        raise ValueError(f"sequences must be a non-empty list of token-id sequences, got "
                         f"{type(sequences).__name__} of length {len(sequences or ())}")
    out = []
    for i, seq in enumerate(sequences):
        t = seq if isinstance(seq, Tensor) else torch.as_tensor(seq)
        if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"sequences[{i}] must be a non-empty 1-D sequence of integer ids, "
                             f"got {t.dtype} shape {tuple(t.shape)}")
        out.append(t.long())
    return out


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing: take items longest first, put each in the first bin it fits.

    Args:
        lengths: Item sizes, each in ``[1, capacity]``.
        capacity: Bin size.

    Returns:
        Bins as lists of item indices (in placement order). FFD uses at most
        ``11/9 · OPT + 6/9`` bins (Dósa 2007).

    Raises:
        ValueError: if an item is longer than ``capacity``.
    """
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"max_tokens must be a positive int, got {capacity!r}")
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"sequence {i} has {n} tokens, longer than max_tokens={capacity}; "
                             "truncate or split it first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


@dataclass
class PackedBatch:
    """Documents packed into rows; consumed by ``Llama(input_ids, position_ids=…,
    cu_seqlens=…)``.

    Attributes:
        input_ids: int64 ``[R, L]`` (``pad_id`` in row tails).
        position_ids: int64 ``[R, L]``, restarting at 0 in every segment.
        cu_seqlens: int32 ``[n_seg + 1]`` segment boundaries in the flattened stream.
        labels: int64 ``[R, L]``: ``labels[r, t]`` is the token position ``t`` must predict
            (the next token of the same document), :data:`IGNORE_INDEX` at document ends and
            padding. Already shifted: use :func:`token_losses` without shifting.
        placement: For each input sequence, in input order, ``(row, start, length)``.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    labels: Tensor
    placement: list[tuple[int, int, int]]

    @property
    def num_tokens(self) -> int:
        """Real (document) tokens."""
        return sum(n for _, _, n in self.placement)

    @property
    def padding_fraction(self) -> float:
        """Fraction of the ``R·L`` slots that are padding."""
        return 1.0 - self.num_tokens / self.input_ids.numel()

    def split(self, rows: int) -> list[PackedBatch]:
        """Cut into micro-batches of ``rows`` rows (the last may be smaller), boundaries rebased.

        ``placement`` of a part lists only the sequences it holds, in input order.
        """
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        R, L = self.input_ids.shape
        cu = self.cu_seqlens.long()
        parts = []
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            keep = (cu >= r0 * L) & (cu <= r1 * L)
            parts.append(PackedBatch(
                self.input_ids[r0:r1], self.position_ids[r0:r1],
                (cu[keep] - r0 * L).to(torch.int32), self.labels[r0:r1],
                [(r - r0, s, n) for r, s, n in self.placement if r0 <= r < r1]))
        return parts

    def unpack(self, values: Tensor) -> list[Tensor]:
        """Split per-position ``values [R, L, ...]`` back into one tensor per input sequence."""
        if tuple(values.shape[:2]) != tuple(self.input_ids.shape):
            raise ValueError(f"values must start with [R, L] = {tuple(self.input_ids.shape)}, "
                             f"got {tuple(values.shape)}")
        return [values[r, s:s + n] for r, s, n in self.placement]


def pack(sequences: Sequence[Sequence[int] | Tensor], max_tokens: int,
         pad_id: int = 0) -> PackedBatch:
    """Pack token sequences into rows of ``max_tokens`` by first-fit-decreasing.

    Args:
        sequences: ``N`` non-empty 1-D integer sequences (lists or tensors).
        max_tokens: Row length ``L``; every sequence must fit.
        pad_id: Token id of the unused row tails.

    Returns:
        A :class:`PackedBatch` with ``R`` = number of FFD bins.

    Raises:
        ValueError: empty input, a non-integer or empty sequence, or a sequence longer than
            ``max_tokens``.
    """
    seqs = _as_sequences(sequences)
    bins = first_fit_decreasing([len(s) for s in seqs], max_tokens)
    R, L = len(bins), max_tokens
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    placement: list[tuple[int, int, int]] = [(0, 0, 0)] * len(seqs)
    bounds = [0]
    for r, items in enumerate(bins):
        start = 0
        for i in items:
            n = len(seqs[i])
            input_ids[r, start:start + n] = seqs[i]
            position_ids[r, start:start + n] = torch.arange(n)
            labels[r, start:start + n - 1] = seqs[i][1:]  # predict x_{t+1} within the document
            placement[i] = (r, start, n)
            start += n
            bounds.append(r * L + start)
        if start < L:  # the row's tail: one padding segment
            position_ids[r, start:] = torch.arange(L - start)
            bounds.append((r + 1) * L)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    return PackedBatch(input_ids, position_ids, cu_seqlens, labels, placement)


def packed_causal_mask(cu_seqlens: Tensor) -> Tensor:
    """Dense block-diagonal causal mask of a packed token stream (the reference of varlen).

    Args:
        cu_seqlens: Int ``[n_seg + 1]`` boundaries in the flattened ``N = R·L`` stream (the
            contract of :func:`mlatlas.attention.reference.check_cu_seqlens`).

    Returns:
        bool ``[1, 1, N, N]``: ``M[i, j] = seg(i) = seg(j) ∧ j ≤ i`` (True = attend).
    """
    n = int(cu_seqlens[-1]) if isinstance(cu_seqlens, Tensor) and cu_seqlens.numel() else 0
    check_cu_seqlens(cu_seqlens, None, QKVShape(1, 1, 1, n, n, 1))
    cu = cu_seqlens.long()
    flat = torch.arange(n, device=cu.device)
    seg = torch.searchsorted(cu[1:], flat, right=True)  # seg(t) = s with c_s ≤ t < c_{s+1}
    # M[i, j] = [seg(i) = seg(j)] ∧ [j ≤ i]
    return ((seg[:, None] == seg[None, :]) & (flat[None, :] <= flat[:, None]))[None, None]


@dataclass
class PaddedBatch:
    """The same documents right-padded to the longest: the baseline packing is checked against.

    Attributes:
        input_ids: int64 ``[N, T_max]``.
        attention_mask: int64 ``[N, T_max]``, 1 on real tokens.
        labels: int64 ``[N, T_max]``, shifted next-token targets as in :class:`PackedBatch`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @property
    def padding_fraction(self) -> float:
        """Fraction of the slots that are padding."""
        return 1.0 - float(self.attention_mask.sum()) / self.attention_mask.numel()


def pad(sequences: Sequence[Sequence[int] | Tensor], pad_id: int = 0) -> PaddedBatch:
    """Right-pad sequences into one ``[N, T_max]`` batch.

    With right padding, plain causal attention already keeps real tokens from seeing pads (pads
    come after them), so ``Llama(input_ids)`` is exact on the real positions.
    """
    seqs = _as_sequences(sequences)
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
        labels[i, :len(s) - 1] = s[1:]
    return PaddedBatch(input_ids, mask, labels)


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-position cross-entropy ``-log p(label | context)``, 0 where ``labels`` is ignored.

    Args:
        logits: ``[..., V]``.
        labels: int64 ``[...]`` (already aligned with ``logits``: no shift).

    Returns:
        float32 ``[...]``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits [..., V] must match labels [...], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    # ℓ_t = -log softmax(z_t)[y_t]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
