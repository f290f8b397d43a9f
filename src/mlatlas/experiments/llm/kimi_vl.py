"""Kimi-VL: a tiny MoonViT + projector + MoE decoder learns synthetic visual QA.

``run`` renders scenes of many sizes and aspect ratios (:mod:`mlatlas.datasets.visual_qa`:
colour, shape, count and left/right questions), packs each batch's images at their native
resolution into one encoder sequence and the prompts into one decoder row (``cu_seqlens``
both), and trains three models the same number of steps on the answer token's cross-entropy:

* the VLM with the auxiliary-loss-free bias balancing of DeepSeek-V3 (sigmoid router);
* the same VLM without any balancing;
* the text-only baseline: the same decoder shown the questions alone.

It reports held-out accuracy (the claim: the VLM far above the text-only baseline, which can
only learn the answer priors), counts with forward hooks on every routed expert how many
expert FFNs ran per token (the claim: ``k`` of ``E``), and reports the expert loads with and
without balancing as ``MaxVio = max_i c_i / c̄ − 1`` on the held-out set.

The tiny model starts at ``N(0, 1/fan_in)`` weights (:func:`fan_in_init_`) rather than Hugging
Face's ``initializer_range = 0.02``, a width-64 design choice measured in the run notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.datasets.visual_qa import ANSWERS, KINDS, VOCAB, VQASample, make_visual_qa, token_id
from mlatlas.llm.kimi_vl import KimiVL, KimiVLConfig
from mlatlas.llm.llama_config import LlamaConfig
from mlatlas.llm.moe import MoEConfig, max_violation
from mlatlas.llm.moonvit import MoonViTConfig, patchify
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress

IMG, ANS = token_id("<img>"), token_id("<ans>")
#: Kimi-VL's image processor normalises pixels with mean = std = 0.5 per channel (transformers'
#: ``IMAGENET_STANDARD_MEAN/STD``): ``[0, 1]`` → ``[−1, 1]``. Without it the mostly dark
#: background makes the patch embeddings nearly one vector (the tower collapsed in training).
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores.

    Targets fixed before running: the VLM's held-out accuracy exceeds the text-only
    baseline's by at least ``min_margin = 0.25`` (absolute; the baseline can do no better than
    the answer priors, ≈ 0.35 averaged over the four kinds); routed-expert FFN calls per token
    (hooks) ``<= top_k``.
    """

    seed: int = 0  # seeds the data, the weights and the batch order
    threads: int = 1  # torch threads: these tiny models are op-overhead bound; more threads spin
    n_train: int = 600  # training scenes
    n_test: int = 200  # held-out scenes
    steps: int = 100  # optimizer steps of every model (≈ 19 s CPU for all three)
    batch: int = 16  # scenes per step
    lr: float = 1e-3  # AdamW peak learning rate (cosine to 10 %); 3e-3 trained worse
    patch_size: int = 4  # MoonViT patch side p
    image_sizes: tuple[int, ...] = (16, 24, 32)  # heights and widths of the scenes (px)
    vision_width: int = 48  # MoonViT width
    vision_layers: int = 2  # MoonViT blocks
    text_width: int = 64  # decoder width
    text_layers: int = 2  # decoder layers (all MoE)
    num_experts: int = 8  # routed experts E
    top_k: int = 2  # experts per token k
    expert_width: int = 48  # hidden width of every routed (and the shared) expert
    bias_update_rate: float = 0.01  # γ of the bias balancing (DeepSeek-V3: 0.001 at full scale)
    min_margin: float = 0.25  # claim: VLM accuracy − text-only accuracy ≥ this
    compare_balancing: bool = True  # also train the VLM without balancing (load comparison)
    fan_in_init: bool = True  # weights ~ N(0, 1/fan_in) (False: PyTorch's defaults, emb 0.02)

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests."""
        return cls(n_train=48, n_test=24, steps=3, batch=8, vision_width=24, text_width=32,
                   expert_width=16, num_experts=4)

    @classmethod
    def full(cls) -> Config:
        """More data and steps, scenes up to 40 px (the accuracy gap needs far more than the
        default's 100 steps; see the run notes)."""
        return cls(n_train=4000, n_test=1000, steps=1500, batch=32,
                   image_sizes=(16, 24, 32, 40))


def build_model(cfg: Config, balancing: bool) -> KimiVL:
    """The tiny Kimi-VL of ``cfg`` (sigmoid router; bias balancing on or off)."""
    heads = max(1, cfg.vision_width // 12)
    grid = max(cfg.image_sizes) // cfg.patch_size  # the learned table covers the largest scene
    vision = MoonViTConfig(patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                           num_layers=cfg.vision_layers, num_heads=heads,
                           intermediate_size=2 * cfg.vision_width, pos_emb_height=grid,
                           pos_emb_width=grid)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=cfg.text_width,
                       intermediate_size=2 * cfg.text_width, num_layers=cfg.text_layers,
                       num_heads=4, num_kv_heads=2, max_position_embeddings=256,
                       initializer_range=cfg.text_width ** -0.5 if cfg.fan_in_init else 0.02)
    moe = MoEConfig(hidden_size=cfg.text_width, moe_intermediate_size=cfg.expert_width,
                    num_experts=cfg.num_experts, top_k=cfg.top_k, num_shared_experts=1,
                    scoring="sigmoid", bias_balancing=balancing,
                    bias_update_rate=cfg.bias_update_rate)
    model = KimiVL(KimiVLConfig(vision, text, moe, first_k_dense=0, image_token_id=IMG))
    if cfg.fan_in_init:
        fan_in_init_(model)
    return model


@torch.no_grad()
def fan_in_init_(model: nn.Module) -> None:
    """Every linear and convolution weight ~ ``N(0, 1/fan_in)``, biases 0 (in place).

    The tiny model's own design choice: Hugging Face's ``initializer_range = 0.02`` is the
    fan-in scale of a ~2500-wide model, and PyTorch's default ``U(±1/√fan_in)`` is 0.58 of it;
    at widths 48-64 both start the attention logits and the image/text embeddings small. The
    router keeps its ``1/√d`` init and the position table its ``N(0, 1)`` (both unchanged).
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)  # fan_in = in · kernel
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pack_batch(samples: list[VQASample], patch: int, with_images: bool) -> dict:
    """One packed decoder row (``question + [<img>]·M + <ans> + answer`` per scene) and its
    images: the image tokens follow the question, so each can attend to what is asked."""
    ids, cu, targets, where = [], [0], [], []
    for s in samples:
        H, W = s.image.shape[1:]
        n_img = (H // patch // 2) * (W // patch // 2) if with_images else 0
        seq = s.question + [IMG] * n_img + [ANS, s.answer]  # question, image, answer marker
        ids += seq
        cu.append(len(ids))
        where.append(len(ids) - 2)  # the logits that predict the answer
        targets.append(s.answer)
    return {"input_ids": torch.tensor([ids]), "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "images": patchify([(s.image - PIXEL_MEAN) / PIXEL_STD for s in samples], patch)
            if with_images else None,
            "where": torch.tensor(where), "targets": torch.tensor(targets)}


def answer_logits(model: KimiVL, b: dict) -> torch.Tensor:
    """``[n, V]`` logits at the position before each answer."""
    logits = model(b["input_ids"], b["images"], cu_seqlens=b["cu_seqlens"])[0]
    return logits[b["where"]]


def train(model: KimiVL, data: list[VQASample], cfg: Config, with_images: bool,
          label: str) -> list[float]:
    """AdamW on the answer cross-entropy; a bias-balancing step after every optimizer step."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warm = max(1, cfg.steps // 10)  # linear warm-up, then cosine from lr to lr / 10

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    losses = []
    for _ in progress(range(cfg.steps), cfg.steps, label):
        idx = torch.randint(len(data), (cfg.batch,), generator=gen).tolist()
        b = pack_batch([data[i] for i in idx], cfg.patch_size, with_images)
        loss = F.cross_entropy(answer_logits(model, b), b["targets"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.update_router_biases()  # b_i ← b_i + γ sign(c̄ − c_i) (no-op when off)
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: KimiVL, data: list[VQASample], cfg: Config, with_images: bool) -> dict:
    """Accuracy (overall and per kind), expert loads and hook-counted expert calls."""
    model.eval()
    rows = [0]
    hooks = [ex.register_forward_pre_hook(lambda m, a: rows.__setitem__(0, rows[0] +
                                                                          a[0].shape[0]))
             for moe in model.moe_layers() for ex in moe.experts]
    loads = torch.zeros(len(model.moe_layers()), cfg.num_experts)
    correct, tokens = [], 0
    for i in range(0, len(data), 100):
        b = pack_batch(data[i:i + 100], cfg.patch_size, with_images)
        pred = answer_logits(model, b).argmax(-1)
        correct += (pred == b["targets"]).tolist()
        tokens += b["input_ids"].numel()
        loads += torch.stack([m.last_counts.float() for m in model.moe_layers()])
    for h in hooks:
        h.remove()
    acc = {k: sum(c for c, s in zip(correct, data) if s.kind == k) /
           max(1, sum(s.kind == k for s in data)) for k in KINDS}
    return {"accuracy": sum(correct) / len(correct), "per_kind": acc, "loads": loads,
            "calls_per_token": rows[0] / (tokens * len(model.moe_layers())),
            "max_vio": sum(max_violation(c) for c in loads) / len(loads)}


def run(cfg: Config, out: Path) -> Report:
    """Train the VLM (with and without balancing) and the text-only baseline; compare."""
    rep = Report()
    train_set = make_visual_qa(cfg.n_train, seed=cfg.seed, sizes=cfg.image_sizes)
    test_set = make_visual_qa(cfg.n_test, seed=cfg.seed + 10_000, sizes=cfg.image_sizes)
    results, curves_ = {}, {}
    variants = [("VLM, bias balancing", True, True), ("text only", False, True)]
    if cfg.compare_balancing:
        variants.insert(1, ("VLM, no balancing", True, False))
    for label, images, balancing in variants:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, balancing)
        curves_[label] = train(model, train_set, cfg, images, label)
        results[label] = evaluate(model, test_set, cfg, images)
    vlm, text = results["VLM, bias balancing"], results["text only"]
    rep.claim("held-out accuracy: VLM − text-only baseline", vlm["accuracy"] - text["accuracy"],
              cfg.min_margin, ">=", detail=f"VLM {vlm['accuracy']:.3f}, text only "
              f"{text['accuracy']:.3f} on {cfg.n_test} scenes", target_source="min_margin")
    rep.claim("routed-expert FFN calls per token (forward hooks on every expert)",
              vlm["calls_per_token"], cfg.top_k, "<=",
              detail=f"E = {cfg.num_experts} routed experts + 1 shared, k = {cfg.top_k}, "
                     f"{len(vlm['loads'])} MoE layers; a dense MoE would run {cfg.num_experts}",
              target_source="top_k")
    for label, r in results.items():
        rep.metric(f"accuracy, {label}", r["accuracy"])
        for k in KINDS:
            rep.metric(f"accuracy, {label}, {k}", r["per_kind"][k])
    rep.metric("chance accuracy (answer priors)", sum(1 / len(ANSWERS[k]) for k in KINDS) / 4)
    for label in [v[0] for v in variants if v[1]]:
        rep.metric(f"MaxVio on held-out tokens, {label}", results[label]["max_vio"])
    total = cfg.num_experts + 1
    rep.metric("expert parameters active per token", (cfg.top_k + 1) / total)
    with figure(out / "kimi_vl", ncols=2) as (_, axes):
        curves(axes[0, 0], curves_, xlabel="step", ylabel="answer cross-entropy", logy=True)
        width = 0.4
        for j, label in enumerate(v[0] for v in variants if v[1]):
            share = results[label]["loads"].sum(0) / results[label]["loads"].sum()
            axes[0, 1].bar(torch.arange(cfg.num_experts) + j * width, share.tolist(), width,
                           label=label)
        axes[0, 1].axhline(1 / cfg.num_experts, color="k", lw=0.8, ls="--")
        axes[0, 1].set_xlabel("routed expert")
        axes[0, 1].set_ylabel("share of held-out tokens")
        axes[0, 1].legend(fontsize=7)
    rep.figure(out / "kimi_vl.png")
    rep.note("Init (measured on the shared 2-core VM, 2026-11-30, seed 0; one-object scenes, so "
             "that no question needs to find an object by its shape; 200 held-out scenes per kind):"
             " with PyTorch's default Linear init, embeddings and lm_head at N(0, 0.02) and the "
             "position table at N(0, 0.02), left/right stayed at chance after 1000 steps (0.48; "
             "shape 0.48). The table was 4 % of the patch embedding (rms 0.017 vs 0.41): "
             "transformers' Kimi_K25 starts it at truncated N(0, 1), and so does MoonViT now. With "
             "that table and every weight at N(0, 1/fan_in) (``fan_in_init``; 0.02 is the fan-in "
             "scale of a ~2500-wide model) left/right reached 0.82 after 400 steps, 0.98 after 600 "
             "and 1000. Both halves are needed (600 steps): the N(0, 1) table alone 0.65; plus "
             "fan-in vision tower and projector 0.54; fan-in decoder with the 0.02 table 0.54; N(0,"
             " 1) table + fan-in decoder (PyTorch-default tower) 0.99. Shape did not move (0.48 "
             "after 600 steps, 0.52 after 1000, 0.48 with a third vision layer): triangles are "
             "recognised, circles and squares are not told apart (600 steps: circle → 25 circle / "
             "27 square, square → 28 / 32). The init is why position was not learned, not why shape"
             " is not. With two or three objects the colour and left/right questions name the "
             "object by its shape, so they stay near guessing among the objects present.")
    rep.note("Decoder attention is Llama GQA (Moonlight uses MLA); MoE = DeepSeek-V3 routing "
             "(sigmoid scores, normalised top-k gates, bias used only for the choice).")
    return rep
