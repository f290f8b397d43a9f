"""Sequence packing: FFD, boundaries, parity with the padded batch, no cross-document attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlatlas.llm.llama import AttentionMask, Llama, LlamaConfig
from mlatlas.llm.packing import (
    IGNORE_INDEX,
    first_fit_decreasing,
    pack,
    packed_causal_mask,
    pad,
    token_losses,
)
from mlatlas.nn.rope import packed_position_ids, rope_cos_sin

ATOL = RTOL = 1e-5  # fp32 CPU


def _docs(n: int, seed: int = 0, max_len: int = 41, vocab: int = 97) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = (math.log(9) + torch.randn(n, generator=g, dtype=torch.float64)).exp()
    lens = lens.round().clamp(1, max_len).long().tolist()  # long-tailed, includes length 1
    return [torch.randint(0, vocab, (m,), generator=g) for m in lens]


def _model(**kw) -> Llama:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_layers=3, num_heads=6,
               num_kv_heads=2, head_dim=10, max_position_embeddings=64)
    return Llama(LlamaConfig(**{**cfg, **kw}))


def test_first_fit_decreasing():
    assert first_fit_decreasing([5, 7, 3, 2, 4, 6], 10) == [[1, 2], [5, 4], [0, 3]]
    lengths = [int(x) for x in torch.randint(1, 50, (200,), generator=torch.Generator()
                                             .manual_seed(1))]
    bins = first_fit_decreasing(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))  # each item exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # FFD ≤ 11/9 OPT + 6/9 and OPT ≥ ⌈Σ/C⌉; in practice it is close to the lower bound
    assert len(bins) <= math.ceil(11 / 9 * math.ceil(sum(lengths) / 64) + 6 / 9) + 1
    # no two bins could be merged
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert loads[0] + loads[1] > 64


def test_pack_layout():
    docs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8]), torch.tensor([9]),
            torch.tensor([10, 11])]
    pb = pack(docs, 6, pad_id=0)
    # FFD: [5] → row 0, [3] → row 1, [2] → row 1, [1] → row 0
    assert pb.input_ids.tolist() == [[4, 5, 6, 7, 8, 9], [1, 2, 3, 10, 11, 0]]
    assert pb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 0]]
    assert pb.cu_seqlens.tolist() == [0, 5, 6, 9, 11, 12]
    assert pb.cu_seqlens.dtype == torch.int32
    I = IGNORE_INDEX
    assert pb.labels.tolist() == [[5, 6, 7, 8, I, I], [2, 3, I, 11, I, I]]
    assert pb.placement == [(1, 0, 3), (0, 0, 5), (0, 5, 1), (1, 3, 2)]
    assert pb.num_tokens == 11 and pb.padding_fraction == pytest.approx(1 / 12)
    assert [t.tolist() for t in pb.unpack(pb.input_ids)] == [d.tolist() for d in docs]
    assert torch.equal(packed_position_ids(pb.cu_seqlens).view(2, 6), pb.position_ids)
    mask = packed_causal_mask(pb.cu_seqlens)
    assert mask.shape == (1, 1, 12, 12)
    assert mask[0, 0, :6, :6].long().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                                  [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                                  [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert not mask[0, 0, 6:, :6].any()  # rows never see each other
    # micro-batches of rows keep consistent boundaries
    parts = pb.split(1)
    assert [p.cu_seqlens.tolist() for p in parts] == [[0, 5, 6], [0, 3, 5, 6]]
    assert [p.placement for p in parts] == [[(0, 0, 5), (0, 5, 1)], [(0, 0, 3), (0, 3, 2)]]


@pytest.mark.parametrize("max_tokens", [41, 60])
def test_packed_losses_and_grads_equal_padded(max_tokens):
    model = _model()
    docs = _docs(23)
    packed, padded = pack(docs, max_tokens), pad(docs)
    assert packed.input_ids.numel() < padded.input_ids.numel()
    n = sum(len(d) - 1 for d in docs)
    params = list(model.parameters())
    lp = token_losses(model(packed.input_ids, packed.position_ids,
                            cu_seqlens=packed.cu_seqlens), packed.labels)
    gp = torch.autograd.grad(lp.sum() / n, params)
    ld = token_losses(model(padded.input_ids), padded.labels)
    gd = torch.autograd.grad(ld.sum() / n, params)
    for i, (got, doc) in enumerate(zip(packed.unpack(lp), docs)):
        torch.testing.assert_close(got, ld[i, :len(doc)], atol=ATOL, rtol=RTOL)
    assert float(ld.detach()[padded.labels == IGNORE_INDEX].abs().max()) == 0  # ignored: 0
    for (name, _), a, b in zip(model.named_parameters(), gp, gd):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, k=name: f"{k}: {m}")
    # also equal to each document run alone, and position ids are derived when omitted
    alone = token_losses(model(docs[3][None]), F.pad(docs[3][1:], (0, 1),
                                                     value=IGNORE_INDEX)[None])[0]
    torch.testing.assert_close(packed.unpack(lp)[3], alone, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(model(packed.input_ids, cu_seqlens=packed.cu_seqlens),
                               model(packed.input_ids, packed.position_ids,
                                     cu_seqlens=packed.cu_seqlens), atol=0, rtol=0)


def test_varlen_attention_equals_dense_block_diagonal_mask():
    model = _model(max_position_embeddings=200)  # the dense check runs 160 tokens in one row
    packed = pack(_docs(11, seed=2), 40)
    layer = model.layers[0]
    n = packed.input_ids.numel()  # the layers see the packed rows as one stream
    x = torch.randn(1, n, 48, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_cos_sin(packed.position_ids.view(1, n), model.inv_freq)
    varlen = layer(x, cos=cos, sin=sin, mask=AttentionMask(cu_seqlens=packed.cu_seqlens))
    dense = layer(x, cos=cos, sin=sin, mask=AttentionMask(
        causal=False, attn_mask=packed_causal_mask(packed.cu_seqlens)))
    torch.testing.assert_close(varlen, dense, atol=ATOL, rtol=RTOL)
    # and through the whole model: Llama(attn_mask=dense block-diagonal mask) on one row
    ids, pos = packed.input_ids.view(1, n), packed.position_ids.view(1, n)
    torch.testing.assert_close(
        model(packed.input_ids, cu_seqlens=packed.cu_seqlens).view(1, n, -1),
        model(ids, pos, attn_mask=packed_causal_mask(packed.cu_seqlens)), atol=ATOL, rtol=RTOL)


def test_a_document_may_span_rows():
    # one contract (attention.reference.check_cu_seqlens): boundaries of the flattened stream,
    # so a document may continue on the next row; positions restart only at boundaries
    model = _model()
    doc = torch.randint(0, 97, (7,), generator=torch.Generator().manual_seed(6))
    other = torch.randint(0, 97, (3,), generator=torch.Generator().manual_seed(7))
    ids = torch.cat([other, doc]).view(2, 5)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty segment is allowed too
    got = model(ids, cu_seqlens=cu).view(10, -1)
    torch.testing.assert_close(got[3:], model(doc[None])[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got[:3], model(other[None])[0], atol=ATOL, rtol=RTOL)


def test_no_attention_across_documents():
    model = _model()
    docs = _docs(9, seed=4)
    packed = pack(docs, 41)
    base = model(packed.input_ids, packed.position_ids, cu_seqlens=packed.cu_seqlens)
    r, s, n = max(packed.placement, key=lambda p: p[2])  # the longest document
    ids = packed.input_ids.clone()
    ids[r, s:s + n] = (ids[r, s:s + n] + 1) % 97
    moved = model(ids, packed.position_ids, cu_seqlens=packed.cu_seqlens)
    others = torch.ones(ids.shape, dtype=torch.bool)
    others[r, s:s + n] = False
    torch.testing.assert_close(moved[others], base[others], atol=1e-6, rtol=0)
    assert (moved[r, s:s + n] - base[r, s:s + n]).abs().max() > 1e-3


def test_bad_input():
    with pytest.raises(ValueError, match="sequence 1 has 7 tokens, longer than max_tokens=6"):
        pack([[1, 2], [1] * 7], 6)
    with pytest.raises(ValueError, match="non-empty list of token-id sequences"):
        pack([], 6)
    with pytest.raises(ValueError, match=r"sequences\[0\] must be a non-empty 1-D sequence of "
                                         r"integer ids, got torch.float32"):
        pack([torch.ones(3)], 6)
    with pytest.raises(ValueError, match=r"sequences\[1\] must be a non-empty"):
        pad([[1, 2], []])
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got 0"):
        pack([[1]], 0)
    with pytest.raises(ValueError, match=r"cu_seqlens must start at 0, be non-decreasing"):
        packed_causal_mask(torch.tensor([0, 6, 5, 10]))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32/int64 tensor"):
        packed_causal_mask(torch.tensor([0.0, 10.0]))
    model = _model()
    with pytest.raises(ValueError, match=r"end at the packed length 10, got \[0, 7, 9\]"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 7, 9]))
    with pytest.raises(ValueError, match="cannot be combined with cache, attention_mask or "
                                         "attn_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 10]),
              attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"logits \[..., V\] must match labels"):
        token_losses(torch.zeros(2, 5, 97), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must start with \[R, L\] = \(1, 6\)"):
        pack([[1, 2]], 6).unpack(torch.zeros(2, 6))
