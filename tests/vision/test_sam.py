"""SAM: mask logits and IoU scores equal transformers' SamModel (tiny random config, no
download) for point, box, point+box and mask prompts, single- and multi-mask (≤ 1e-5), with
gradients of the image and every mapped weight; the same network loads Meta's
segment_anything state dict and matches its modules; the pieces (relative positions,
Fourier encoding) behave; prompts outside the image and bad shapes are refused."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from mlatlas.vision.sam import Sam, SamConfig
from mlatlas.vision.sam_image_encoder import relative_table
from mlatlas.vision.sam_weights import transformers_key_map

S, E = 40, 10  # input side, embedding side: 40 px, patch 4


def _hf_model(transformers, seed=0):
    vc = transformers.SamVisionConfig(
        hidden_size=24, output_channels=16, num_hidden_layers=3, num_attention_heads=2,
        image_size=S, patch_size=4, window_size=3, global_attn_indexes=[1], num_pos_feats=8,
        mlp_dim=36)
    pc = transformers.SamPromptEncoderConfig(hidden_size=16, image_size=S, patch_size=4,
                                             mask_input_channels=8)
    mc = transformers.SamMaskDecoderConfig(hidden_size=16, mlp_dim=24, num_hidden_layers=2,
                                           num_attention_heads=2, iou_head_hidden_dim=20)
    model = transformers.SamModel(transformers.SamConfig(
        vision_config=vc, prompt_encoder_config=pc, mask_decoder_config=mc)).eval()
    _randomise(model, seed)
    return model


def _randomise(model, seed, std=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _prompts(seed=1, batch=2, p=3):
    gen = torch.Generator().manual_seed(seed)
    points = torch.rand(batch, p, 2, 2, generator=gen) * (S - 1)
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])[:p].expand(batch, -1, -1).clone()
    xy = torch.rand(batch, p, 2, generator=gen) * 20
    boxes = torch.cat([xy, xy + 3 + torch.rand(batch, p, 2, generator=gen) * 15], -1)
    masks = torch.randn(batch, 1, 4 * E, 4 * E, generator=gen)
    image = torch.randn(batch, 3, S, S, generator=gen)
    return image, points, labels, boxes, masks


PROMPTS = {"point": ("points", "labels"), "box": ("boxes",), "point+box": ("points", "labels", "boxes"),
           "point+mask": ("points", "labels", "masks")}
HF_NAMES = {"points": "input_points", "labels": "input_labels", "boxes": "input_boxes",
            "masks": "input_masks"}


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_masks_and_iou_match_transformers(reference, kind, multimask):
    transformers = reference("transformers")
    ref = _hf_model(transformers)
    ours = Sam.from_transformers(ref).eval()
    image, points, labels, boxes, masks = _prompts()
    given = dict(points=points, labels=labels, boxes=boxes, masks=masks)
    kw = {k: given[k] for k in PROMPTS[kind]}
    with torch.no_grad():
        theirs = ref(pixel_values=image, multimask_output=multimask,
                     **{HF_NAMES[k]: v for k, v in kw.items()})
        out = ours(image, multimask=multimask, **kw)
    k = 3 if multimask else 1
    assert out.masks.shape == (2, 3, k, 4 * E, 4 * E) and out.iou_scores.shape == (2, 3, k)
    assert out.masks.std() > 0.01  # a comparison of real signal, not of zeros
    torch.testing.assert_close(out.masks, theirs.pred_masks, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iou_scores, theirs.iou_scores, atol=1e-5, rtol=1e-5)


def test_gradients_match_transformers(reference):
    ref = _hf_model(reference("transformers"), seed=3)
    ours = Sam.from_transformers(ref).eval()
    image, points, labels, boxes, _ = _prompts(seed=4)
    x1, x2 = image.clone().requires_grad_(), image.clone().requires_grad_()
    a = ours(x1, points=points, labels=labels, boxes=boxes)
    b = ref(pixel_values=x2, input_points=points, input_labels=labels, input_boxes=boxes)
    cot = torch.randn(a.masks.shape, generator=torch.Generator().manual_seed(5))
    (a.masks * cot).sum().add(a.iou_scores.sum()).backward()
    (b.pred_masks * cot).sum().add(b.iou_scores.sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    theirs = dict(ref.named_parameters())
    key_map = transformers_key_map(ours.config)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[key_map[name]].grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_segment_anything_layout(reference):
    sa = reference("segment_anything.modeling")
    ref = sa.Sam(
        sa.ImageEncoderViT(img_size=S, patch_size=4, embed_dim=24, depth=3, num_heads=2,
                           mlp_ratio=1.5, out_chans=16, qkv_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True,
                           use_rel_pos=True, window_size=3, global_attn_indexes=(1,)),
        sa.PromptEncoder(embed_dim=16, image_embedding_size=(E, E), input_image_size=(S, S),
                         mask_in_chans=8),
        sa.MaskDecoder(num_multimask_outputs=3, transformer=sa.TwoWayTransformer(
            depth=2, embedding_dim=16, mlp_dim=24, num_heads=2), transformer_dim=16,
            iou_head_depth=3, iou_head_hidden_dim=20)).eval()
    _randomise(ref, 6)
    cfg = SamConfig(image_size=S, patch_size=4, encoder_dim=24, encoder_depth=3, encoder_heads=2,
                    encoder_mlp_dim=36, window_size=3, global_attn_indexes=(1,), prompt_dim=16,
                    mask_in_chans=8, decoder_heads=2, decoder_mlp_dim=24,
                    iou_head_hidden_dim=20, decoder_eps=1e-5)
    ours = Sam.from_segment_anything(ref, cfg).eval()
    image, points, labels, boxes, masks = _prompts(seed=7, batch=1)
    with torch.no_grad():
        emb = ref.image_encoder(image)
        for prompt in ({"points": (points[0], labels[0])}, {"boxes": boxes[0]},
                       {"points": (points[0], labels[0]), "masks": masks}):
            sparse, dense = ref.prompt_encoder(points=prompt.get("points"),
                                               boxes=prompt.get("boxes"), masks=prompt.get("masks"))
            m, iou = ref.mask_decoder(image_embeddings=emb, image_pe=ref.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse,
                                      dense_prompt_embeddings=dense, multimask_output=True)
            kw = {"boxes": boxes} if "boxes" in prompt else {"points": points, "labels": labels}
            out = ours(image, masks=prompt.get("masks"), **kw)
            torch.testing.assert_close(out.masks[0], m, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.iou_scores[0], iou, atol=1e-5, rtol=1e-5)


def test_relative_table_and_image_embedding_reuse():
    table = torch.arange(5.0)[:, None].expand(5, 2)
    rel = relative_table(3, 3, table)  # offset i − j shifted by 2
    assert rel[:, :, 0].tolist() == [[2, 1, 0], [3, 2, 1], [4, 3, 2]]
    torch.manual_seed(0)
    model = Sam(SamConfig.tiny()).eval()
    image = torch.randn(1, 3, 64, 64)
    pts, lab = torch.tensor([[[[10.0, 20.0]]]]), torch.ones(1, 1, 1, dtype=torch.long)
    with torch.no_grad():
        a = model(image, points=pts, labels=lab)
        b = model(image_embeddings=model.embed_image(image), points=pts, labels=lab)
    torch.testing.assert_close(a.masks, b.masks)
    assert a.masks.shape == (1, 1, 3, 64, 64)


def test_bad_input():
    model = Sam(SamConfig.tiny())
    image = torch.zeros(1, 3, 64, 64)
    lab = torch.ones(1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"points must lie inside the 64×64 input image"):
        model(image, points=torch.tensor([[[[70.0, 3.0]]]]), labels=lab)
    with pytest.raises(ValueError, match="boxes must lie inside"):
        model(image, boxes=torch.tensor([[[-5.0, 0, 10, 10]]]))
    with pytest.raises(ValueError, match="x2 >= x1"):
        model(image, boxes=torch.tensor([[[20.0, 0, 10, 10]]]))
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 64, 64\].*got \(1, 3, 60, 64\)"):
        model(torch.zeros(1, 3, 60, 64), points=torch.ones(1, 1, 1, 2), labels=lab)
    with pytest.raises(ValueError, match="labels must be"):
        model(image, points=torch.ones(1, 1, 1, 2))
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeddings"):
        model(points=torch.ones(1, 1, 1, 2), labels=lab)
    with pytest.raises(ValueError, match=r"masks must be \[B, 1, 64, 64\]"):
        model(image, points=torch.ones(1, 1, 1, 2), labels=lab, masks=torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="same prompt count P"):
        model(image, points=torch.ones(1, 2, 1, 2), labels=torch.ones(1, 2, 1),
              boxes=torch.tensor([[[1.0, 1, 5, 5]]]))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        SamConfig(image_size=30, patch_size=4)
    with pytest.raises(TypeError, match="config must be a SamConfig"):
        Sam.from_segment_anything({}, config=None)
