"""A tiny model with peaked predictions, shared by the speculative-decoding tests (MTP, Medusa).

Rows follow a fixed permutation ``x_{t+1} = π(x_t)`` over a vocabulary of 37 and jump to a
random token 10 % of the time: a task a 2-layer Llama learns in 80 steps, so that drafts get
accepted and tree verification is exercised beyond the first token.
"""

from __future__ import annotations

import torch

from mlatlas.llm.llama import Llama, next_token_loss

VOCAB = 37
PERM = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))


def chain_batch(gen: torch.Generator, batch: int = 32, length: int = 24) -> torch.Tensor:
    """``[batch, length]`` rows of the permutation chain with 10 % random jumps."""
    x = torch.empty(batch, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    jump = torch.rand(batch, length, generator=gen) < 0.1
    rnd = torch.randint(0, VOCAB, (batch, length), generator=gen)
    for t in range(1, length):
        x[:, t] = torch.where(jump[:, t], rnd[:, t], PERM[x[:, t - 1]])
    return x


def train_on_chains(model: Llama, seed: int = 11, steps: int = 80) -> Llama:
    """``model`` trained on :func:`chain_batch` rows, then frozen in eval mode."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = chain_batch(gen)
        loss = next_token_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
