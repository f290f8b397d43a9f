"""Activations in practice: vanishing gradients, dead ReLUs, and SwiGLU vs ReLU FFNs.

**(a) A deep MLP at initialisation.** ``depth`` linear layers of width ``width``, He-normal
weights (std ``√(2 / fan_in)``, zero biases, the init designed for ReLU), a batch of Gaussian
inputs and a cross-entropy loss on random labels. The Frobenius norm of ``∂L/∂W_l`` per layer
shows how the gradient reaching the first layer shrinks with the activation's derivative:
``σ'(x) ≤ ¼`` shrinks it at every layer, ReLU's derivative ``1{x > 0}`` and GELU's do not.
Dead ReLU units — zero output for every input of the batch, hence no gradient from it — are
counted per layer at this init and at PyTorch's default ``nn.Linear`` init (smaller weights,
uniform biases: deep pre-activations shrink onto the bias, whose sign then decides).

**(b) A tiny LM, ReLU FFN vs SwiGLU FFN at equal parameters.** The Llama of
:mod:`mlatlas.llm.llama` trained on the embedded corpus (bytes), once with its SwiGLU FFN
(hidden ``⅔ h``, three matrices) and once with a ReLU FFN (hidden ``h``, two matrices) — the
same number of weights — same seed, data order, optimizer (our AdamW) and schedule, nothing
tuned per variant. The validation losses are reported as they come.

Claims (targets fixed before running):

* sigmoid gradients vanish: ``‖∇W₁‖ / ‖∇W_L‖ ≤ 1e-3``;
* ReLU and GELU gradients do not: that ratio ``≥ 0.1`` for each;
* GLU variants improve the Transformer FFN (Shazeer 2020): validation loss of the SwiGLU
  model ``<`` that of the ReLU model (measured as ``loss_ReLU − loss_SwiGLU > 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.datasets.corpus import load_corpus, sample_windows
from mlatlas.llm.llama import Llama, LlamaConfig, next_token_loss
from mlatlas.nn.activations import get_activation
from mlatlas.nn.feedforward import FeedForward, GatedFeedForward
from mlatlas.optim import AdamW
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds inits, inputs, labels and the LM's data order
    depth: int = 20  # (a) linear layers of the deep MLP
    width: int = 100  # (a) hidden width
    batch: int = 256  # (a) inputs per gradient measurement
    activations: tuple[str, ...] = ("sigmoid", "tanh", "relu", "gelu")  # (a) compared
    lm_hidden: int = 64  # (b) model width d
    lm_layers: int = 2  # (b) decoder layers
    lm_heads: int = 4  # (b) attention heads
    relu_ffn: int = 192  # (b) ReLU FFN hidden h; SwiGLU gets 2h/3 (equal parameters)
    seq_len: int = 64  # (b) training window
    lm_batch: int = 16  # (b) windows per step
    lm_steps: int = 200  # (b) AdamW steps
    lm_lr: float = 3e-3  # (b) peak learning rate (linear warm-up 20 steps, cosine to 10%)
    eval_windows: int = 64  # (b) validation windows of seq_len tokens

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests: an 8-layer MLP, 3 LM steps on 4 validation windows."""
        return cls(depth=8, lm_steps=3, eval_windows=4)

    @classmethod
    def full(cls) -> Config:
        """A longer LM comparison (5× the steps, wider and deeper model)."""
        return cls(lm_hidden=96, lm_layers=3, relu_ffn=384, lm_steps=1000, eval_windows=512)


# ---------------------------------------------------------------------- (a) deep MLP
def _mlp(cfg: Config, init: str, gen: torch.Generator) -> nn.ModuleList:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    dims = [cfg.width] * cfg.depth + [10]
    layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(cfg.depth))
    if init == "he":
        for layer in layers:  # W ~ N(0, 2 / fan_in), b = 0   (He et al. 2015, eq. (10))
            nn.init.normal_(layer.weight, std=math.sqrt(2.0 / layer.in_features))
            nn.init.zeros_(layer.bias)
    return layers  # "default": nn.Linear's U(-1/√fan_in, 1/√fan_in) for weights and biases


def _forward(layers: nn.ModuleList, act: str, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    f, hidden = get_activation(act), []
    for layer in layers[:-1]:
        x = f(layer(x))
        hidden.append(x)
    return layers[-1](x), hidden


def _dead_fraction(hidden: list[torch.Tensor]) -> list[float]:
    # a unit is dead when its output is 0 for every input of the batch
    return [float((h == 0).all(0).float().mean()) for h in hidden]


def deep_mlp(cfg: Config) -> dict[str, dict[str, list[float]]]:
    """Per-layer gradient norms and dead-unit fractions (see the module docstring)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.width, generator=gen)
    y = torch.randint(0, 10, (cfg.batch,), generator=gen)
    res: dict[str, dict[str, list[float]]] = {"grad_norm": {}, "dead": {}}
    for act in cfg.activations:
        layers = _mlp(cfg, "he", torch.Generator().manual_seed(cfg.seed))  # same weights each
        logits, hidden = _forward(layers, act, x)
        F.cross_entropy(logits, y).backward()
        res["grad_norm"][act] = [layer.weight.grad.norm().item() for layer in layers]
        if act == "relu":
            res["dead"]["he init"] = _dead_fraction(hidden)
    layers = _mlp(cfg, "default", torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        res["dead"]["default init"] = _dead_fraction(_forward(layers, "relu", x)[1])
    return res


# ---------------------------------------------------------------------- (b) tiny LM
def _lm(cfg: Config, ffn: str, vocab: int) -> Llama:
    torch.manual_seed(cfg.seed)
    d, h = cfg.lm_hidden, cfg.relu_ffn
    model = Llama(LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * h // 3,
                              num_layers=cfg.lm_layers, num_heads=cfg.lm_heads,
                              max_position_embeddings=cfg.seq_len, tie_word_embeddings=True))
    for layer in model.layers:
        if ffn == "relu":  # same calling convention: x [..., d] → [..., d]
            layer.mlp = FeedForward(d, h, activation="relu")
        else:
            assert isinstance(layer.mlp, GatedFeedForward) and layer.mlp.kind == "swiglu"
    model.reset_parameters()  # the same N(0, 0.02) init for every linear layer
    return model


def _lr(cfg: Config, step: int) -> float:
    if step < 20:
        return cfg.lm_lr * (step + 1) / 20
    t = (step - 20) / max(1, cfg.lm_steps - 20)
    return cfg.lm_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def _val_loss(model: Llama, val: torch.Tensor, cfg: Config, windows: int) -> float:
    n = min(windows, (val.numel() - 1) // cfg.seq_len)
    ids = val[:n * cfg.seq_len + 1]
    x, y = ids[:-1].view(n, cfg.seq_len), ids[1:].view(n, cfg.seq_len)
    model.eval()
    loss = sum(F.cross_entropy(model(x[i:i + 64]).flatten(0, 1), y[i:i + 64].flatten(),
                               reduction="sum").item() for i in range(0, n, 64))
    model.train()
    return loss / (n * cfg.seq_len)


def tiny_lm(cfg: Config) -> dict[str, dict[str, float | list]]:
    """Train the ReLU-FFN and SwiGLU-FFN models; losses and parameter counts."""
    corpus = load_corpus("bytes")
    vocab = corpus.tokenizer.vocab_size
    res: dict[str, dict[str, float | list]] = {}
    for ffn in ("relu", "swiglu"):
        model = _lm(cfg, ffn, vocab)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        opt = AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest,
                     "weight_decay": 0.0}], lr=cfg.lm_lr, betas=(0.9, 0.95), foreach=True)
        gen = torch.Generator().manual_seed(cfg.seed)  # same windows for both variants
        curve = []
        for step in progress(range(cfg.lm_steps), cfg.lm_steps, f"tiny LM ({ffn})"):
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            x, _ = sample_windows(corpus.train, cfg.lm_batch, cfg.seq_len, gen)
            loss = next_token_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        ffn_params = sum(p.numel() for layer in model.layers for p in layer.mlp.parameters())
        res[ffn] = {"val": _val_loss(model, corpus.val, cfg, cfg.eval_windows), "curve": curve,
                    "ffn_params": ffn_params,
                    "params": sum(p.numel() for p in model.parameters())}
    return res


# ---------------------------------------------------------------------- run
def run(cfg: Config, out: Path) -> Report:
    """(a) gradient norms and dead units in a deep MLP; (b) ReLU vs SwiGLU FFN tiny LM."""
    rep = Report()
    mlp = deep_mlp(cfg)
    norms = mlp["grad_norm"]
    for act, g in norms.items():
        rep.metric(f"(a) {act}: ‖∇W₁‖/‖∇W_L‖", g[0] / g[-1])
    depth = len(next(iter(norms.values())))
    rep.claim("(a) sigmoid: ‖∇W₁‖/‖∇W_L‖ (vanishing)", norms["sigmoid"][0] / norms["sigmoid"][-1],
              1e-3, "<=", detail=f"{depth} layers, width {cfg.width}, He init")
    for act in ("relu", "gelu"):
        rep.claim(f"(a) {act}: ‖∇W₁‖/‖∇W_L‖", norms[act][0] / norms[act][-1], 0.1, ">=",
                  detail=f"{depth} layers, width {cfg.width}, He init")
    for name, frac in mlp["dead"].items():
        rep.metric(f"(a) dead ReLU units, {name} (fraction of all hidden units)",
                   sum(frac) / len(frac))
        rep.metric(f"(a) dead ReLU units, {name} (deepest hidden layer)", frac[-1])

    lm_steps = cfg.lm_steps
    lm = tiny_lm(cfg)
    for ffn, r in lm.items():
        rep.metric(f"(b) {ffn}: validation loss (nats/byte)", r["val"])
        rep.metric(f"(b) {ffn}: FFN parameters", r["ffn_params"])
        rep.metric(f"(b) {ffn}: model parameters", r["params"])
    if lm["relu"]["ffn_params"] != lm["swiglu"]["ffn_params"]:
        rep.note("FFN parameter counts differ: relu_ffn is not a multiple of 3.")
    gap = lm["relu"]["val"] - lm["swiglu"]["val"]
    rep.claim("(b) val loss ReLU FFN − SwiGLU FFN (equal parameters)", gap, 0.0, ">",
              unit="nats", detail=f"{cfg.lm_layers}-layer d={cfg.lm_hidden} Llama, "
                                  f"{lm_steps} steps, one seed")
    fifth = max(1, len(lm["relu"]["curve"]) // 5)
    for part, sl in (("first", slice(0, fifth)), ("last", slice(-fifth, None))):
        rep.metric(f"(b) train loss ReLU − SwiGLU, {part} 20% of steps",
                   sum(lm["relu"]["curve"][sl]) / fifth - sum(lm["swiglu"]["curve"][sl]) / fifth)
    rep.note("(b) is one seed of a small byte-level model trained for a few hundred steps "
             "(Shazeer 2020 trained T5 for tens of thousands); at this scale the GLU advantage "
             "need not show, and the losses are reported as measured, untuned. A possible cause "
             "(not tested here): at the N(0, 0.02) init the gated FFN's output is second order "
             "in the weights, the ReLU FFN's first order. The 'train loss … first/last 20%' "
             "metrics show how the gap evolves during training.")

    path = out / "grad_norms.png"
    with figure(path, ncols=2, title="deep MLP") as (fig, axes):
        ax1, ax2 = axes.flat
        for act, g in norms.items():
            ax1.semilogy(range(1, len(g) + 1), g, marker=".", label=act)
        ax1.set_xlabel("layer")
        ax1.set_ylabel("‖∂L/∂W‖")
        ax1.legend(fontsize=8)
        for name, frac in mlp["dead"].items():
            ax2.plot(range(1, len(frac) + 1), frac, marker=".", label=name)
        ax2.set_xlabel("hidden layer")
        ax2.set_ylabel("dead ReLU fraction")
        ax2.legend(fontsize=8)
    rep.figure(path)
    path = out / "tiny_lm.png"
    with figure(path) as (fig, ax):
        curves(ax, {f"{k} FFN": v["curve"] for k, v in lm.items()}, xlabel="step",
               ylabel="train loss", title="ReLU vs SwiGLU FFN (equal parameters)")
        ax.legend()
    rep.figure(path)
    return rep
