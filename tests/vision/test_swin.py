"""Swin: Swin-T logits equal timm's swin_tiny_patch4_window7_224 and torchvision's swin_t on
random weights (≤ 1e-4); a tiny config matches timm in values and gradients (input and every
parameter, by the key map) at image sizes the windows do not divide (timm's padding) and
torchvision at sizes they do; the shifted-window mask equals timm's; bad input is refused."""

from __future__ import annotations

import pytest
import torch

from mlatlas.vision.swin import (
    SwinConfig,
    SwinTransformer,
    relative_position_index,
    shifted_window_mask,
)
from mlatlas.vision.swin_weights import swin_key_map


def _randomise(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _timm_toy(timm, hw, **kw):
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    return TimmSwin(img_size=hw, patch_size=2, window_size=3, embed_dim=12, depths=(2, 2),
                    num_heads=(2, 3), num_classes=10, **kw).eval()


def _check_grads(ours, theirs, layout, x_ours, x_theirs, out_ours, out_theirs, atol=1e-5):
    cot = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(9))
    out_ours.backward(cot)
    out_theirs.backward(cot)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=atol, rtol=1e-4)
    theirs_params = dict(theirs.named_parameters())
    key_map = swin_key_map(ours.config.depths, layout)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[key_map[name]].grad, atol=atol,
                                   rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_swin_t_logits_match_timm(reference):
    timm = reference("timm")
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    ours = SwinTransformer.from_timm(ref).eval()
    assert ours.config == SwinConfig.swin_t()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_swin_t_logits_match_torchvision(reference):
    tvm = reference("torchvision.models")
    torch.manual_seed(0)
    ref = tvm.swin_t(weights=None).eval()
    ours = SwinTransformer.from_torchvision(ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("hw", [(18, 18), (20, 26), (14, 10), (18, 30)])
def test_tiny_config_values_and_grads_match_timm(reference, hw):
    timm_ref = _timm_toy(reference("timm"), hw)
    _randomise(timm_ref, seed=hw[0] * hw[1])
    ours = SwinTransformer.from_timm(timm_ref).eval()
    assert ours.config == SwinConfig.toy()
    x = torch.randn(3, 3, *hw, generator=torch.Generator().manual_seed(3))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(x1), timm_ref(x2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _check_grads(ours, timm_ref, "timm", x1, x2, a, b)


@pytest.mark.parametrize("hw", [(12, 12), (12, 24)])
def test_tiny_config_values_and_grads_match_torchvision(reference, hw):
    tvs = reference("torchvision.models.swin_transformer")
    ref = tvs.SwinTransformer(patch_size=[2, 2], embed_dim=12, depths=[2, 2], num_heads=[2, 3],
                              window_size=[3, 3], num_classes=10).eval()
    _randomise(ref, seed=7)
    ours = SwinTransformer.from_torchvision(ref).eval()
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(4))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(x1), ref(x2)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    _check_grads(ours, ref, "torchvision", x1, x2, a, b)


def test_mask_and_relative_index_equal_timm(reference):
    timm = reference("timm")
    from timm.models.swin_transformer import get_relative_position_index

    torch.testing.assert_close(relative_position_index(7, 7, 7), get_relative_position_index(7, 7))
    block = _timm_toy(timm, (26, 22)).layers[0].blocks[1]  # 13×11 map, shift 1, padded to 15×12
    ref = block.get_attn_mask() == 0
    ours = shifted_window_mask(15, 12, 3, 3, 1, 1)
    torch.testing.assert_close(ours, ref)
    assert ours.diagonal(dim1=1, dim2=2).all()  # every token may attend to itself


def test_small_map_uses_one_clipped_window_and_the_table_block():
    model = SwinTransformer(SwinConfig.toy(depths=(2,), num_heads=(2,))).eval()
    x = torch.randn(2, 3, 4, 6)  # a 2×3 map: smaller than the 3×3 window in height
    assert model(x).shape == (2, 10)
    idx = relative_position_index(2, 3, 3)
    assert idx.shape == (6, 6) and idx.max() < 25 and idx[0, 0] == 12  # Δ = 0: table centre


def test_key_maps_are_one_to_one():
    for layout in ("timm", "torchvision"):
        m = swin_key_map((2, 2, 6, 2), layout)
        assert len(set(m.values())) == len(m)


def test_configs():
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in SwinTransformer(getattr(SwinConfig, name)())
                           .parameters()) for name in ("swin_t", "swin_s", "swin_b")}
    # the paper's 28M, 50M, 88M
    assert 28.0e6 < sizes["swin_t"] < 28.7e6 and 49e6 < sizes["swin_s"] < 50.5e6
    assert 87e6 < sizes["swin_b"] < 88.5e6
    assert SwinConfig.swin_b().embed_dim == 128 and SwinConfig.swin_s().depths == (2, 2, 18, 2)


def test_bad_input(reference):
    model = SwinTransformer(SwinConfig.toy())
    with pytest.raises(ValueError, match=r"divisible by the patch size 2.*got 9×12"):
        model(torch.randn(1, 3, 9, 12))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, H, W\], got \(1, 4, 8, 8\)"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*torch.int64"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by its num_heads 5"):
        SwinConfig(embed_dim=12, depths=(2,), num_heads=(5,))
    with pytest.raises(ValueError, match="missing.*unexpected"):
        SwinTransformer.from_timm({**_timm_toy(reference("timm"), (12, 12)).state_dict(),
                                   "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="smaller than the window"):
        SwinTransformer.from_timm(_timm_toy(reference("timm"), (6, 10)))
    with pytest.raises(TypeError, match="model_or_state_dict must be"):
        SwinTransformer.from_timm([1, 2])
    with pytest.raises(ValueError, match="layout must be one of"):
        swin_key_map((2,), "keras")
