"""Gradient checkpointing: grads equal to no checkpointing and to torch.utils.checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.llm.gradient_checkpointing import (
    checkpoint,
    checkpoint_sequential,
    disable_checkpointing,
    enable_checkpointing,
    segment_sizes,
)
from mlatlas.measure import PeakMemory


class Block(nn.Module):
    """A residual MLP block with dropout, called as ``block(x, scale=...)`` like a Llama layer."""

    def __init__(self, d: int, p: float = 0.25):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d, 3 * d), nn.Linear(3 * d, d), nn.Dropout(p)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc2(self.drop(F.gelu(self.fc1(x))))
        return x + (h if scale is None else h * scale)


def _stack(n: int = 7, d: int = 10, dtype=torch.float64) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(Block(d) for _ in range(n)).to(dtype)


def _grads(blocks, run, x, scale=None, seed=123):
    """Forward with ``run``, backward of a fixed loss; returns (out, grads, rng state after)."""
    blocks.zero_grad(set_to_none=True)
    if scale is not None:
        scale.grad = None
    torch.manual_seed(seed)  # dropout masks
    out = run(blocks, x, scale)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    grads = [p.grad.clone() for p in blocks.parameters()]
    if scale is not None:
        grads.append(scale.grad.clone())
    return out.detach(), grads, torch.get_rng_state()


def _plain(blocks, x, scale):
    for b in blocks:
        x = b(x, scale=scale)
    return x


def _torch_ckpt(segments):
    def run(blocks, x, scale):
        sizes = segment_sizes(len(blocks), "every_k", -(-len(blocks) // segments))
        start = 0
        for size in sizes:
            seg = blocks[start:start + size]
            start += size
            x = torch.utils.checkpoint.checkpoint(lambda h, seg=seg: _plain(seg, h, scale), x,
                                                  use_reentrant=False)
        return x
    return run


TIGHT = dict(atol=1e-12, rtol=1e-10)  # float64; only summation order of shared grads differs


@pytest.mark.parametrize("segments", [1, 3, 7])
def test_checkpoint_sequential_matches_plain_and_torch_checkpoint_with_dropout(segments):
    blocks = _stack()
    x = torch.randn(3, 5, 10, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(10, dtype=torch.float64, requires_grad=True)  # a kwarg shared by all blocks

    def ours(b, h, s):
        return checkpoint_sequential(b, segments, h, scale=s)

    out, grads, rng = _grads(blocks, _plain, x, scale)
    x_grad = x.grad.clone()
    for run in (ours, _torch_ckpt(segments)):
        x.grad = None
        out_c, grads_c, rng_c = _grads(blocks, run, x, scale)
        torch.testing.assert_close(out_c, out, atol=0, rtol=0)
        for g_c, g in zip(grads_c, grads, strict=True):
            torch.testing.assert_close(g_c, g, **TIGHT)
        torch.testing.assert_close(x.grad, x_grad, **TIGHT)
        assert torch.equal(rng_c, rng)  # the replay does not disturb the global RNG stream


def test_without_rng_preservation_dropout_masks_differ():
    blocks = _stack()
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    _, grads, _ = _grads(blocks, _plain, x)
    _, grads_c, _ = _grads(blocks, lambda b, h, s: checkpoint_sequential(
        b, 2, h, preserve_rng_state=False), x)
    assert max((a - b).abs().max() for a, b in zip(grads, grads_c)) > 1e-3


def test_first_segment_params_get_grads_when_input_needs_none_and_autograd_grad_works():
    blocks = _stack(4).eval()
    x = torch.randn(2, 10, dtype=torch.float64)  # no requires_grad: only parameters do
    params = list(blocks.parameters())
    out = checkpoint_sequential(blocks, 2, x)
    grads = torch.autograd.grad(out.square().sum(), params)
    ref = torch.autograd.grad(_plain(blocks, x, None).square().sum(), params)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, **TIGHT)
    with torch.no_grad():  # inference: no Function, plain run
        torch.testing.assert_close(checkpoint_sequential(blocks, 2, x), _plain(blocks, x, None))


def _saved_storages(fn, exclude):
    """Distinct non-parameter storages autograd saves for backward while ``fn()`` runs."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            found.setdefault(st.data_ptr(), st)  # kept alive: no pointer reuse
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(found.values())


def test_only_the_segment_inputs_are_saved_for_backward():
    blocks = _stack(9, d=12, dtype=torch.float32)
    x = torch.randn(4, 7, 12, requires_grad=True)
    _, plain = _saved_storages(lambda: _plain(blocks, x, None), blocks.parameters())
    x_bytes = x.numel() * x.element_size()
    assert sum(st.nbytes() for st in plain) > 5 * 9 * x_bytes  # > 5 x-sized tensors per block
    for segments in (1, 3, 9):
        out, saved = _saved_storages(lambda s=segments: checkpoint_sequential(blocks, s, x),
                                     blocks.parameters())
        assert len(saved) == segments  # the input of every segment, nothing else
        assert sum(st.nbytes() for st in saved) == segments * x_bytes
        out.sum().backward()  # the graph is still usable


def test_checkpointing_lowers_the_peak_of_a_training_step():
    blocks = _stack(9, d=12, dtype=torch.float32).eval()  # no dropout: same work both ways
    x = torch.randn(4, 7, 12, requires_grad=True)
    peaks = {}
    for segments in (None, 3):
        with PeakMemory("cpu") as mem:
            out = (_plain(blocks, x, None) if segments is None
                   else checkpoint_sequential(blocks, segments, x))
            out.sum().backward()
            del out
        peaks[segments] = mem.peak_bytes
        blocks.zero_grad(set_to_none=True)
    assert peaks[3] < 0.75 * peaks[None]


def test_segment_sizes():
    assert segment_sizes(12, "sqrt") == [3, 3, 3, 3]
    assert segment_sizes(16, "sqrt") == [4, 4, 4, 4]
    assert segment_sizes(10, "sqrt") == [3, 3, 2, 2]  # round(√10) = 3 → 4 segments
    assert segment_sizes(10, "every_k", 4) == [4, 4, 2]
    assert segment_sizes(1, "sqrt") == [1]
    for n in range(1, 40):
        sizes = segment_sizes(n, "sqrt")
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
        assert abs(len(sizes) - n ** 0.5) <= 1


def _tiny_llama(num_layers: int = 7):
    from mlatlas.llm.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=61, hidden_size=24, intermediate_size=40, num_layers=num_layers,
                      num_heads=6, num_kv_heads=2, max_position_embeddings=48)
    torch.manual_seed(0)
    return Llama(cfg)


@pytest.mark.parametrize("policy,k", [("sqrt", None), ("every_k", 2), ("every_k", 7)])
def test_llama_grads_identical_with_checkpointing(policy, k):
    from mlatlas.llm.llama import next_token_loss

    model = _tiny_llama()
    keys = set(model.state_dict())
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = next_token_loss(model(ids), ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, ref = grads()
    sizes = enable_checkpointing(model, policy, k)
    assert sum(sizes) == 7 and not isinstance(model.layer_runner, nn.Module)
    assert set(model.state_dict()) == keys
    loss_c, got = grads()
    torch.testing.assert_close(loss_c, loss, atol=0, rtol=0)
    for name in ref:  # fp32: same ops replayed in the same order
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    # torch.utils.checkpoint per segment as the runner: the same gradients
    def torch_runner(layers, hidden, **kw):
        start = 0
        for size in sizes:
            seg = layers[start:start + size]
            start += size
            hidden = torch.utils.checkpoint.checkpoint(
                lambda h, seg=seg: _plain_kw(seg, h, kw), hidden, use_reentrant=False)
        return hidden

    model.layer_runner = torch_runner
    _, got_ref = grads()
    for name in ref:
        torch.testing.assert_close(got[name], got_ref[name], atol=1e-6, rtol=1e-5, msg=name)
    disable_checkpointing(model)
    assert model.layer_runner is None


def _plain_kw(layers, h, kw):
    for layer in layers:
        h = layer(h, **kw)
    return h


def test_llama_packed_and_padded_batches_with_checkpointing():
    model = _tiny_llama(5)
    g = torch.Generator().manual_seed(3)
    packed = dict(input_ids=torch.randint(0, 61, (1, 20), generator=g),
                  cu_seqlens=torch.tensor([0, 7, 15, 20], dtype=torch.int32))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    padded = dict(input_ids=torch.randint(0, 61, (2, 11), generator=g), attention_mask=mask)
    for batch in (packed, padded):
        grads = []
        for enable in (False, True):
            disable_checkpointing(model)
            if enable:
                enable_checkpointing(model, "every_k", k=2)
            model.zero_grad(set_to_none=True)
            model(**batch).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_llama_inference_and_kv_cache_unaffected():
    model = _tiny_llama(4)
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids)
        enable_checkpointing(model, "every_k", k=3)
        torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
        cache = model.new_cache()
        step = torch.cat([model(ids[:, :5], cache=cache), model(ids[:, 5:], cache=cache)], 1)
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-5)
    model.layers.append(model.layers[0])
    with pytest.raises(ValueError, match="enabled for 4 layers, the model now has 5"):
        model(ids).sum().backward()


def test_bad_input():
    blocks = _stack(4)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"segments must be an int in \[1, 4\].*got 0"):
        checkpoint_sequential(blocks, 0, x)
    with pytest.raises(ValueError, match=r"segments must be an int in \[1, 4\].*got 5"):
        checkpoint_sequential(blocks, 5, x)
    with pytest.raises(ValueError, match="policy must be 'every_k' or 'sqrt', got 'log'"):
        segment_sizes(8, "log")
    with pytest.raises(ValueError, match="k must be a positive int for policy 'every_k', got None"):
        segment_sizes(8, "every_k")
    with pytest.raises(TypeError, match="model must have `layers` and a `layer_runner`"):
        enable_checkpointing(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        checkpoint(3, x)
    with pytest.raises(TypeError, match="must return one Tensor, got tuple"):
        checkpoint(lambda t: (t, t), x)
