"""Tests of the shared denoiser networks."""

from __future__ import annotations

import pytest
import torch

from mlatlas.generative.networks import MLPDenoiser, SinusoidalTimeEmbedding, SmallUNet


def test_time_embedding_matches_diffusers(reference):
    emb_mod = reference("diffusers.models.embeddings")
    timesteps = torch.tensor([0, 1, 17, 250, 999])
    ours = SinusoidalTimeEmbedding(64)(timesteps.float() / 1000)
    ref = emb_mod.get_timestep_embedding(timesteps, 64, flip_sin_to_cos=False,
                                         downscale_freq_shift=0)
    # fp32: our argument is 1000·(t/1000), which can differ from t by one ulp (6e-5 at
    # t≈1000 rad), so sin/cos agree to ~1e-4 rather than 1e-6
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)


@pytest.mark.parametrize("num_classes", [None, 5])
def test_mlp_shapes_grads_and_conditioning(num_classes):
    torch.manual_seed(0)
    net = MLPDenoiser(dim=3, hidden=48, depth=2, time_dim=18, num_classes=num_classes)
    x = torch.randn(7, 3, requires_grad=True)
    t = torch.rand(7)
    y = torch.arange(7) % 5 if num_classes else None
    out = net(x, t, y)
    assert out.shape == (7, 3)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())
    torch.testing.assert_close(net(x, 0.3, y), net(x, torch.full((7,), 0.3), y), atol=0, rtol=0)
    if num_classes:  # None means the null label; labels change the output
        torch.testing.assert_close(net(x, t), net(x, t, torch.full((7,), 5)), atol=0, rtol=0)
        assert not torch.allclose(net(x, t, y), net(x, t))


@pytest.mark.parametrize("num_classes", [None, 10])
def test_unet_shapes_grads_and_conditioning(num_classes):
    torch.manual_seed(0)
    net = SmallUNet(channels=1, base=8, time_dim=16, num_classes=num_classes)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    t = torch.tensor([0.0, 0.5, 0.999])
    y = torch.tensor([0, 3, 9]) if num_classes else None
    out = net(x, t, y)
    assert out.shape == (3, 1, 8, 8)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())
    # other even sizes and channel counts work too
    assert SmallUNet(channels=3, base=8)(torch.randn(2, 3, 6, 10), torch.rand(2)).shape == (
        2, 3, 6, 10)
    if num_classes:
        assert not torch.allclose(net(x, t, y), net(x, t))


def test_bad_input():
    net = MLPDenoiser(dim=2, hidden=16, num_classes=3)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\], got \(4, 3\)"):
        net(torch.randn(4, 3), torch.rand(4))
    with pytest.raises(ValueError, match=r"t must have shape \[4\]"):
        net(x, torch.rand(5))
    with pytest.raises(TypeError, match="t must be a float tensor"):
        net(x, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 3\]"):
        net(x, torch.rand(4), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(TypeError, match="y must be an int64 tensor"):
        net(x, torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="unconditional"):
        MLPDenoiser(hidden=16)(x, torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="even height and width"):
        SmallUNet(base=8)(torch.randn(2, 1, 7, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 8, 8\]"):
        SmallUNet(base=8)(torch.randn(2, 2, 8, 8), torch.rand(2))
