"""TransNormer vs vanilla linear attention: gradient spikes and attention dilution.

Three small models that differ only in their token mixers are trained on the same synthetic
task, from the same initial embeddings and data order:

* ``linear``: every layer is vanilla linear attention (with its scaling denominator);
* ``norm``: every layer is NormAttention (no denominator, RMSNorm of the output);
* ``transnormer``: DiagAttention in the first half of the layers, NormAttention above.

Task (needs local context, so it rewards attention that concentrates near the token): tokens
``x_i`` uniform over a small vocabulary, target ``y_i = x_{i-1}`` (``y_0 = 0``): copy the left
neighbour, with bidirectional attention.

Measured, with targets fixed before running:

* **Unbounded vs bounded gradients** — the spike ratio ``max / median`` of the global gradient
  norm over the training steps (after the first 10 %). Claim: NormAttention's ratio is no
  larger than vanilla linear attention's (ratio of ratios ≤ 1).
* **Attention dilution** — the share of attention mass within ``|i − j| ≤ window`` in the lower
  half of the layers on held-out sequences. DiagAttention only sees its block of ``b`` keys,
  so its share is about ``N / b`` times the vanilla layer's by construction (uniform attention
  over the block vs over the sequence); that raw ratio is reported as a metric. The claim
  divides each share by the share of uniform attention over the keys the layer can see (its
  *concentration*): TransNormer's lower layers concentrate at least as much as the vanilla
  model's (ratio of concentrations ≥ 1), i.e. the trained blocks are local beyond what the
  block mask alone gives.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.attention.transnormer import TransNormer
from mlatlas.plots import curves, figure
from mlatlas.report import Report
from mlatlas.runtime import progress
from mlatlas.training_state import save_checkpoint

_MODELS = ("linear", "norm", "transnormer")


@dataclass
class Config:
    """Defaults are the embedded default run: ≤ 30 s on 2 CPU cores."""

    seed: int = 0  # seeds model init and the data stream
    steps: int = 150  # training steps per model
    batch: int = 16  # sequences per step
    seq_len: int = 64  # N (not a multiple of block_size is fine too)
    vocab: int = 16  # V of the synthetic task
    d_model: int = 32  # model width
    n_heads: int = 2  # heads per layer
    n_layers: int = 4  # layers; TransNormer uses DiagAttention in the first half
    block_size: int = 16  # DiagAttention block
    lr: float = 3e-3  # AdamW learning rate (no gradient clipping: we measure the raw norms)
    window: int = 2  # locality window |i - j| <= window
    warmup_frac: float = 0.1  # fraction of first steps left out of the spike ratio
    threads: int = 1  # torch intra-op threads (tiny tensors gain nothing from more); 0: default

    @classmethod
    def smoke(cls) -> Config:
        """A few steps, for tests."""
        return cls(steps=8)

    @classmethod
    def full(cls) -> Config:
        """Longer training (4x the steps, 2x the batch): about 8x the default run."""
        return cls(steps=600, batch=32)


class _Model(nn.Module):
    def __init__(self, cfg: Config, layer_types: list[str]):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, cfg.d_model) * 0.5)
        self.body = TransNormer(cfg.d_model, cfg.n_heads, cfg.n_layers, layer_types=layer_types,
                                block_size=cfg.block_size)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, x: Tensor, return_attention: bool = False):
        h = self.embed(x) + self.pos[: x.shape[1]]
        if return_attention:
            h, maps = self.body(h, return_attention=True)
            return self.head(h), maps
        return self.head(self.body(h))


def _layer_types(kind: str, n_layers: int) -> list[str]:
    if kind == "transnormer":
        return ["diag"] * (n_layers // 2) + ["norm"] * (n_layers - n_layers // 2)
    return [kind] * n_layers


def _batch(cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq_len), generator=gen)
    return x, F.pad(x, (1, 0))[:, :-1]  # y_i = x_{i-1}, y_0 = 0


def _local_share(p: Tensor, window: int) -> float:
    n = p.shape[-1]
    idx = torch.arange(n)
    near = (idx[:, None] - idx[None, :]).abs() <= window
    return (p * near).sum(-1).mean().item()


def _uniform_share(n: int, window: int, block: int | None = None) -> float:
    """Local share of uniform attention over all ``n`` keys, or over the ``block`` of each
    query (DiagAttention's blocks ``⌊i/b⌋``, the last one shorter)."""
    idx = torch.arange(n)
    allowed = (torch.ones(n, n, dtype=torch.bool) if block is None
               else idx[:, None] // block == idx[None, :] // block)
    return _local_share(allowed.double() / allowed.sum(-1, keepdim=True), window)


def _train(cfg: Config, kind: str) -> dict:
    torch.manual_seed(cfg.seed)  # same initial embeddings/head for every model
    model = _Model(cfg, _layer_types(kind, cfg.n_layers))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # same data order for every model
    norms, losses = [], []
    for _ in progress(range(cfg.steps), cfg.steps, f"train {kind}"):
        x, y = _batch(cfg, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())  # global ‖∇θ L‖₂
        losses.append(loss.item())
        opt.step()
    model.eval()
    test_gen = torch.Generator().manual_seed(cfg.seed + 2)
    with torch.no_grad():
        x, y = _batch(cfg, test_gen)
        logits, maps = model(x, return_attention=True)
    acc = (logits.argmax(-1) == y).float().mean().item()
    return {"model": model, "opt": opt, "norms": norms, "losses": losses, "acc": acc,
            "local": [_local_share(p, cfg.window) for p in maps]}


def _spike_ratio(norms: list[float], warmup_frac: float) -> float:
    tail = norms[int(len(norms) * warmup_frac):] or norms
    return max(tail) / statistics.median(tail)


def run(cfg: Config, out: Path) -> Report:
    """Train the three models; gradient spike ratios and attention locality."""
    rep = Report()
    res = {kind: _train(cfg, kind) for kind in _MODELS}
    half = cfg.n_layers // 2
    for kind, r in res.items():
        rep.metric(f"{kind}: test accuracy", r["acc"])
        rep.metric(f"{kind}: final train loss (mean of last 10)",
                   statistics.fmean(r["losses"][-10:]))
        rep.metric(f"{kind}: grad-norm spike ratio max/median",
                   _spike_ratio(r["norms"], cfg.warmup_frac))
        rep.metric(f"{kind}: median grad norm", statistics.median(r["norms"]))
        for i, share in enumerate(r["local"]):
            rep.metric(f"{kind}: local share layer {i}", share)
    rep.metric("uniform attention local share", min(2 * cfg.window + 1, cfg.seq_len) / cfg.seq_len)
    lin_ratio = _spike_ratio(res["linear"]["norms"], cfg.warmup_frac)
    norm_ratio = _spike_ratio(res["norm"]["norms"], cfg.warmup_frac)
    rep.claim("bounded gradients: spike ratio NormAttention / vanilla linear",
              norm_ratio / lin_ratio, 1.0, op="<=",
              detail=f"max/median global grad norm over steps ≥ {cfg.warmup_frac:.0%}: "
              f"norm {norm_ratio:.2f}, linear {lin_ratio:.2f}")
    tn_local = statistics.fmean(res["transnormer"]["local"][:half])
    lin_local = statistics.fmean(res["linear"]["local"][:half])
    u_block = _uniform_share(cfg.seq_len, cfg.window, min(cfg.block_size, cfg.seq_len))
    u_full = _uniform_share(cfg.seq_len, cfg.window)
    rep.metric("uniform-in-block attention local share", u_block)
    rep.metric("local share ratio TransNormer / vanilla linear (lower layers)",
               tn_local / max(lin_local, 1e-12))
    rep.metric("local share ratio of uniform attention, block / sequence (by construction)",
               u_block / u_full)
    tn_conc, lin_conc = tn_local / u_block, lin_local / u_full
    rep.metric("TransNormer: local concentration, lower layers (share / uniform-in-block)",
               tn_conc)
    rep.metric("linear: local concentration, lower layers (share / uniform)", lin_conc)
    rep.claim("less dilution beyond the block mask: local concentration TransNormer / vanilla "
              "linear (lower layers)", tn_conc / max(lin_conc, 1e-12), 1.0, op=">=",
              detail=f"share within |i−j| ≤ {cfg.window} ÷ that of uniform attention over the "
              f"keys a layer sees: TransNormer {tn_local:.3f} / {u_block:.3f}, linear "
              f"{lin_local:.3f} / {u_full:.3f}")
    save_checkpoint(out / "transnormer.safetensors", res["transnormer"]["model"],
                    res["transnormer"]["opt"], step=cfg.steps)
    with figure(out / "training.png", ncols=2) as (_, axes):
        ax_g, ax_l = axes.flat
        curves(ax_g, {k: r["norms"] for k, r in res.items()}, xlabel="step",
               ylabel="global grad norm", logy=True, title="gradient norms")
        curves(ax_l, {k: r["losses"] for k, r in res.items()}, xlabel="step",
               ylabel="train loss", title="loss")
    rep.figure(out / "training.png")
    with figure(out / "locality.png") as (_, ax):
        curves(ax, {k: r["local"] for k, r in res.items()}, x=list(range(cfg.n_layers)),
               xlabel="layer", ylabel=f"attention share within |i−j| ≤ {cfg.window}",
               title="attention dilution")
    rep.figure(out / "locality.png")
    rep.note("DiagAttention keeps all of its mass inside its block by construction, so its raw "
             "local share is about N / block times the vanilla layer's before any training (the "
             "'by construction' metric); the earlier claim on that raw ratio (≥ 2×) could not "
             "fail and is now a metric. The claim divides each share by what uniform attention "
             "over the visible keys gives, and asks whether the trained blocks are at least as "
             "concentrated as the vanilla layers.")
    rep.note("Gradient spikes are measured as max/median of the global gradient norm over "
             "training. The paper's boundedness argument concerns ∂O/∂s_ij before the output "
             "normalisation; the RMSNorm that follows makes the layer invariant to a common "
             "scale of the scores, so its gradient still grows as the scores shrink. Whether the "
             "spike ratio favours NormAttention is reported as measured.")
    rep.note("NormAttention's 'attention share' is φ(q_i)·φ(k_j) normalised per row for the "
             "measurement only (the layer itself does not divide).")
    return rep
