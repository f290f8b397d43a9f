"""Kimi-VL: MoonViT encoder + projector parity with transformers' Kimi-K2.5 vision tower and
projector (same MoonViT; images of different sizes packed with cu_seqlens; outputs and every
gradient, fp32 ≤ 1e-5), 2-D RoPE relativity, packing independence, the MoE decoder routing
k of E experts per token, and bad input."""

from __future__ import annotations

import pytest
import torch

from mlatlas.llm.kimi_vl import KimiVL, KimiVLConfig
from mlatlas.llm.llama_config import LlamaConfig
from mlatlas.llm.moe import MoEConfig
from mlatlas.llm.moonvit import (
    MoonViT,
    MoonViTConfig,
    MoonViTProjector,
    patchify,
    rope_2d_cos_sin,
)
from mlatlas.nn.rope import apply_rope

ATOL = RTOL = 1e-5  # fp32 CPU
P = 4
# vision width 24 (2 heads of 12), MLP 40, learned position table 6 x 6 (resampled per image)
VCFG = dict(patch_size=P, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=40,
            pos_emb_height=6, pos_emb_width=6)
TEXT = 30


def _images(gen: torch.Generator, sizes=((24, 40), (16, 16), (40, 8))) -> list[torch.Tensor]:
    return [torch.rand(3, h, w, generator=gen) for h, w in sizes]


def _hf_pair(tf):
    from transformers.models.kimi_k25.modeling_kimi_k25 import (
        Kimi_K25MultimodalProjection,
        Kimi_K25VisionModel,
    )

    vc = tf.Kimi_K25VisionConfig(patch_size=P, pos_emb_height=6, pos_emb_width=6,
                                 num_attention_heads=2, num_hidden_layers=2, hidden_size=24,
                                 intermediate_size=40,
                                 rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    cfg = tf.Kimi_K25Config(vision_config=vc.to_dict(),
                            text_config={"model_type": "deepseek_v3", "hidden_size": TEXT},
                            projection_hidden_size=24)
    torch.manual_seed(0)
    tower, proj = Kimi_K25VisionModel(vc), Kimi_K25MultimodalProjection(cfg)
    with torch.no_grad():
        for p in list(tower.parameters()) + list(proj.parameters()):
            p.normal_(0, 0.2)
    return tower.eval(), proj.eval()


def _key_map(n_layers: int) -> dict[str, str]:
    """Ours → transformers (``vision_tower.`` = Kimi_K25VisionModel, ``mm_projector.`` =
    Kimi_K25MultimodalProjection)."""
    m = {f"vision_tower.{k}": f"vision_tower.{k}" for k in
         ("patch_embed.proj.weight", "patch_embed.proj.bias",
          "patch_embed.pos_emb.position_embeddings", "final_layernorm.weight",
          "final_layernorm.bias")}
    for i in range(n_layers):
        for part in ("norm1", "norm2", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.proj",
                     "mlp.fc1", "mlp.fc2"):
            for leaf in ("weight", "bias"):
                key = f"vision_tower.layers.{i}.{part}.{leaf}"
                m[key] = key
    for part in ("pre_norm", "in_proj", "out_proj"):
        for leaf in ("weight", "bias"):
            m[f"mm_projector.{part}.{leaf}"] = f"mm_projector.{part}.{leaf}"
    return m


def test_moonvit_and_projector_match_transformers_kimi_k25(reference):
    tf = reference("transformers")
    tower, proj = _hf_pair(tf)
    ours = torch.nn.ModuleDict({"vision_tower": MoonViT(MoonViTConfig(**VCFG)),
                                "mm_projector": MoonViTProjector(24, 4, TEXT)})
    hf_state = {f"vision_tower.{k}": v for k, v in tower.state_dict().items()}
    hf_state |= {f"mm_projector.{k}": v for k, v in proj.state_dict().items()}
    key_map = _key_map(2)
    assert set(key_map) == set(ours.state_dict()), set(key_map) ^ set(ours.state_dict())
    assert set(key_map.values()) == set(hf_state), set(key_map.values()) ^ set(hf_state)
    ours.load_state_dict({k: hf_state[v].clone() for k, v in key_map.items()}, strict=True)

    packed = patchify(_images(torch.Generator().manual_seed(1)), P)
    grid_thw = torch.cat((torch.ones(len(packed.grid_hw), 1, dtype=torch.long),
                          packed.grid_hw), dim=1)
    x1 = packed.pixel_values.clone().requires_grad_()
    x2 = packed.pixel_values.clone().requires_grad_()
    y_ours = ours["mm_projector"](ours["vision_tower"](x1, packed.grid_hw))
    y_hf = proj(tower(x2, grid_thw=grid_thw).pooler_output).squeeze(1)
    assert y_ours.shape == (sum(packed.merged_counts((2, 2))), TEXT)
    torch.testing.assert_close(y_ours, y_hf, atol=ATOL, rtol=RTOL)
    w = torch.randn_like(y_ours) / y_ours.numel() ** 0.5
    (y_ours * w).sum().backward()
    (y_hf * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=ATOL, rtol=RTOL)
    hf_params = {f"vision_tower.{k}": p for k, p in tower.named_parameters()}
    hf_params |= {f"mm_projector.{k}": p for k, p in proj.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[key_map[name]].grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_rope_2d_is_relative_in_rows_and_columns():
    gen = torch.Generator().manual_seed(2)
    cos, sin = rope_2d_cos_sin(torch.tensor([[5, 7]]), head_dim=12)
    q = torch.randn(1, 1, 1, 12, generator=gen)
    k = torch.randn(1, 1, 1, 12, generator=gen)

    def score(a: int, b: int) -> float:  # patch a's query · patch b's key (raster indices)
        qa = apply_rope(q, cos[a:a + 1][None], sin[a:a + 1][None])
        kb = apply_rope(k, cos[b:b + 1][None], sin[b:b + 1][None])
        return float((qa * kb).sum())

    at = lambda r, c: r * 7 + c  # noqa: E731
    # same (Δrow, Δcol) → same score; a different offset → a different one
    assert score(at(0, 0), at(2, 3)) == pytest.approx(score(at(2, 1), at(4, 4)), abs=1e-5)
    assert score(at(0, 0), at(2, 3)) != pytest.approx(score(at(0, 0), at(3, 2)), abs=1e-3)


def test_packed_images_do_not_interact_and_match_one_by_one():
    torch.manual_seed(3)
    vit = MoonViT(MoonViTConfig(**VCFG)).eval()
    imgs = _images(torch.Generator().manual_seed(4))
    with torch.no_grad():
        packed = vit(*_args(patchify(imgs, P)))
        alone = torch.cat([vit(*_args(patchify([im], P))) for im in imgs])
        changed = [imgs[0], torch.rand(3, 16, 16), imgs[2]]
        other = vit(*_args(patchify(changed, P)))
    torch.testing.assert_close(packed, alone, atol=ATOL, rtol=RTOL)
    n0, n1 = 15, 15 + 4  # merged tokens of image 0 (6x10 patches) and 1 (4x4)
    torch.testing.assert_close(other[:n0], packed[:n0], atol=0, rtol=0)
    torch.testing.assert_close(other[n1:], packed[n1:], atol=0, rtol=0)
    assert not torch.allclose(other[n0:n1], packed[n0:n1])


def _args(p):
    return p.pixel_values, p.grid_hw


def _vlm(**moe) -> KimiVL:
    torch.manual_seed(5)
    text = LlamaConfig(vocab_size=23, hidden_size=TEXT, intermediate_size=44, num_layers=3,
                       num_heads=3, num_kv_heads=1, max_position_embeddings=256)
    moe_cfg = MoEConfig(**{**dict(hidden_size=TEXT, moe_intermediate_size=14, num_experts=7,
                                  top_k=2, num_shared_experts=1), **moe})
    return KimiVL(KimiVLConfig(MoonViTConfig(**VCFG), text, moe_cfg, first_k_dense=1,
                               image_token_id=1))


def _prompt(n_img: int, words: list[int]) -> torch.Tensor:
    return torch.tensor([1] * n_img + words)


def test_kimi_vl_packed_batch_equals_one_by_one_and_routes_k_experts():
    model = _vlm().eval()
    imgs = _images(torch.Generator().manual_seed(6), sizes=((16, 24), (8, 16)))
    p0, p1 = _prompt(6, [5, 6, 7]), _prompt(2, [8, 9, 10, 11])
    seen = [0] * 7
    hooks = [ex.register_forward_pre_hook(
        lambda m, a, e=e: seen.__setitem__(e, seen[e] + a[0].shape[0]))
        for layer in model.moe_layers() for e, ex in enumerate(layer.experts)]
    with torch.no_grad():
        ids = torch.cat((p0, p1))[None]
        cu = torch.tensor([0, len(p0), len(p0) + len(p1)], dtype=torch.int32)
        packed = model(ids, patchify(imgs, P), cu_seqlens=cu)
    for h in hooks:
        h.remove()
    # every token of every MoE layer went to exactly k = 2 routed experts
    assert sum(seen) == 2 * ids.shape[1] * len(model.moe_layers())
    with torch.no_grad():
        a = model(p0[None], patchify(imgs[:1], P))
        b = model(p1[None], patchify(imgs[1:], P))
    torch.testing.assert_close(packed[0], torch.cat((a[0], b[0])), atol=ATOL, rtol=RTOL)
    # the image changes the answer logits; the text-only path runs without images
    with torch.no_grad():
        text_only = model(torch.tensor([[5, 6, 7]]))
    assert text_only.shape == (1, 3, 23)
    assert not torch.allclose(a[0, -3:], text_only[0], atol=1e-4)


def test_kimi_vl_trains_end_to_end_with_aux_loss_and_bias_update():
    model = _vlm(aux_loss_coef=0.01, bias_balancing=True, bias_update_rate=0.01,
                 scoring="softmax").train()
    imgs = patchify(_images(torch.Generator().manual_seed(7), sizes=((8, 8),)), P)
    logits = model(_prompt(1, [3, 4])[None], imgs)
    loss = logits.square().mean() + model.aux_loss()
    loss.backward()
    assert model.vision_tower.patch_embed.proj.weight.grad.abs().sum() > 0
    loads = model.update_router_biases()
    assert loads.shape == (2, 7) and loads.sum() == 2 * 3 * 2
    assert model.moe_layers()[0].gate.e_score_correction_bias.abs().sum() > 0


@pytest.mark.parametrize("size,match", [
    ((3, 3, 10), "images\\[0\\] is smaller than one patch: patch_size=4 needs H, W >= 4, "
                 "got 3x10"),
    ((3, 12, 16), "images\\[0\\] must have H a multiple of 8 and W of 8"),
    ((1, 16, 16), "images\\[0\\] must be \\[3, H, W\\]"),
])
def test_bad_images(size, match):
    with pytest.raises(ValueError, match=match):
        patchify([torch.rand(*size)], P)
    with pytest.raises(TypeError, match="floating-point"):
        patchify([torch.ones(3, 8, 8, dtype=torch.long)], P)
    with pytest.raises(TypeError, match="non-empty list"):
        patchify([], P)


def test_bad_model_input():
    model = _vlm()
    imgs = patchify([torch.rand(3, 8, 8)], P)
    with pytest.raises(ValueError, match="hold 2 image placeholders .* give 1 merged tokens"):
        model(_prompt(2, [3])[None], imgs)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[3, 99]]))
    with pytest.raises(ValueError, match="moe.hidden_size must equal text.hidden_size"):
        KimiVLConfig(MoonViTConfig(**VCFG), model.config.text,
                     MoEConfig(hidden_size=8, moe_intermediate_size=4, num_experts=3, top_k=1))
    with pytest.raises(ValueError, match="divisible by 4"):
        MoonViTConfig(**{**VCFG, "num_heads": 4})


def test_visual_qa_scenes_have_native_sizes_and_are_deterministic():
    from mlatlas.datasets.visual_qa import KINDS, make_visual_qa

    a, b = make_visual_qa(12, seed=3), make_visual_qa(12, seed=3)
    assert all(torch.equal(x.image, y.image) and x.question == y.question for x, y in zip(a, b))
    sizes = {tuple(s.image.shape[1:]) for s in a}
    assert len(sizes) > 3 and any(h != w for h, w in sizes)  # many sizes and aspect ratios
    assert [s.kind for s in a[:4]] == list(KINDS)
    packed = patchify([s.image for s in a], P)  # every scene fits the patch grid as it is
    assert packed.pixel_values.shape[0] == sum(s.image.shape[1] * s.image.shape[2] // P ** 2
                                               for s in a)
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        make_visual_qa(-1)
    with pytest.raises(ValueError,
                       match=r"sizes must all be >= 2·min_side \+ 4 = 16.0, got \(8, 16\)"):
        make_visual_qa(2, sizes=(8, 16))


def test_experiment_normalises_pixels_like_kimi_image_processor(reference):
    """The kimi-vl experiment feeds MoonViT ``(x − mean) / std`` with the processor's constants
    (raw ``[0, 1]`` pixels of the dark scenes collapsed the tower's features in training)."""
    constants = reference("transformers.utils.constants")
    from transformers.models.kimi_k25.image_processing_kimi_k25 import Kimi_K25ImageProcessor

    from mlatlas.datasets.visual_qa import make_visual_qa
    from mlatlas.experiments.llm import kimi_vl as exp

    assert Kimi_K25ImageProcessor.image_mean == constants.IMAGENET_STANDARD_MEAN
    assert Kimi_K25ImageProcessor.image_std == constants.IMAGENET_STANDARD_STD
    assert [exp.PIXEL_MEAN] * 3 == constants.IMAGENET_STANDARD_MEAN
    assert [exp.PIXEL_STD] * 3 == constants.IMAGENET_STANDARD_STD
    scenes = make_visual_qa(5, seed=1, sizes=(16, 24))
    packed = exp.pack_batch(scenes, P, with_images=True)["images"]
    mean = torch.tensor(constants.IMAGENET_STANDARD_MEAN)[:, None, None]
    std = torch.tensor(constants.IMAGENET_STANDARD_STD)[:, None, None]
    want = patchify([(s.image - mean) / std for s in scenes], P)
    torch.testing.assert_close(packed.pixel_values, want.pixel_values, atol=1e-6, rtol=1e-6)
    assert packed.pixel_values.min() < 0  # centred, not the raw [0, 1] scenes


def test_position_table_init_matches_transformers_kimi_k25(reference):
    """The learned position table starts as transformers' ``Kimi_K25`` does: truncated N(0, 1)
    on [−2, 2] (std 0.88), not 0.02 — at width 48 a 0.02 table was 4 % of the patch embedding
    and a one-object left/right probe stayed at chance (see the kimi-vl run notes)."""
    tf = reference("transformers")
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25VisionModel

    vc = tf.Kimi_K25VisionConfig(patch_size=P, pos_emb_height=16, pos_emb_width=16,
                                 num_attention_heads=2, num_hidden_layers=1, hidden_size=24,
                                 intermediate_size=40)
    torch.manual_seed(0)
    theirs = Kimi_K25VisionModel(vc).patch_embed.pos_emb.position_embeddings
    ours = MoonViT(MoonViTConfig(**{**VCFG, "num_layers": 1, "pos_emb_height": 16,
                                    "pos_emb_width": 16})).patch_embed.pos_emb.position_embeddings
    assert theirs.shape == ours.shape
    for t in (theirs.detach(), ours.detach()):
        assert abs(float(t.std()) - 0.880) < 0.03 and float(t.abs().max()) <= 2.0


def test_experiment_model_uses_fan_in_init():
    """The tiny VLM's weights start at N(0, 1/fan_in) (``fan_in_init``), its embeddings at
    1/√d; ``fan_in_init=False`` keeps PyTorch's defaults and the 0.02 embeddings."""
    from mlatlas.experiments.llm import kimi_vl as exp

    cfg = exp.Config(vision_width=48, text_width=64, expert_width=48)
    torch.manual_seed(0)
    model = exp.build_model(cfg, balancing=True).requires_grad_(False)
    for w, fan_in in ((model.vision_tower.layers[0].attn.q_proj.weight, 48),
                      (model.vision_tower.patch_embed.proj.weight, 3 * P * P),
                      (model.mm_projector.in_proj.weight, 4 * 48),
                      (model.layers[0].self_attn.q_proj.weight, 64),
                      (model.layers[1].mlp.experts[0].down_proj.weight, 48),
                      (model.embed_tokens.weight, 64), (model.lm_head.weight, 64)):
        torch.testing.assert_close(float(w.std()), fan_in ** -0.5, atol=0, rtol=0.1)
    assert float(model.mm_projector.in_proj.bias.abs().max()) == 0.0
    old = exp.build_model(exp.Config(fan_in_init=False), balancing=True).requires_grad_(False)
    torch.testing.assert_close(float(old.embed_tokens.weight.std()), 0.02, atol=0, rtol=0.1)
