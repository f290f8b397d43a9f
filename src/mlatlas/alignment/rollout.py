"""Rollouts: sample ``G`` completions per prompt from a causal LM, in one padded batch.

On-policy alignment (PPO, GRPO) alternates between *sampling* completions from the current
policy and *scoring* them; the sampled tokens, their masks and the rows' prompts are what the
losses need. Prompts of unequal length are left-padded (so every completion starts in the
same column), each prompt is repeated ``G`` times (rows ``i·G … i·G + G - 1`` answer prompt
``i``: GRPO's group), and decoding stops a row at its end-of-sequence token. Ouyang et al.
2022 (InstructGPT, arXiv:2203.02155) §3.5; Shao et al. 2024 (GRPO, arXiv:2402.03300) §4.1.

=========  ==============================================================
``N``      rows = prompts · ``G``
``P``      width of the left-padded prompt block
``C``      completion columns (≤ ``max_new_tokens``)
=========  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlatlas.llm.generation import generate

__all__ = ["Rollout", "left_pad", "sample_completions"]


@dataclass
class Rollout:
    """Sampled completions, one row per sample (``[N, P + C]`` tensors).

    Attributes:
        input_ids: Left-padded prompt, then the completion (filled with EOS after it ends).
        attention_mask: 1 on real prompt tokens and on completion tokens, 0 on padding.
        completion_mask: 1 on completion tokens up to and including the first EOS.
        prompt_index: int64 ``[N]``: which prompt each row answers.
        prompt_len: ``P``: the completion starts at column ``P``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_index: Tensor
    prompt_len: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def prompts(self) -> list[list[int]]:
        """Each row's prompt tokens (padding removed)."""
        block = zip(self.input_ids[:, :self.prompt_len], self.attention_mask[:, :self.prompt_len])
        return [ids[mask.bool()].tolist() for ids, mask in block]

    def completions(self, eos_token_id: int | None = None) -> list[list[int]]:
        """Each row's completion tokens (the final EOS dropped when ``eos_token_id`` is given)."""
        out = []
        for ids, mask in zip(self.input_ids[:, self.prompt_len:],
                             self.completion_mask[:, self.prompt_len:]):
            toks = ids[mask.bool()].tolist()
            if eos_token_id is not None and toks and toks[-1] == eos_token_id:
                toks = toks[:-1]
            out.append(toks)
        return out


def left_pad(prompts: list[list[int]], pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token lists → left-padded int64 ``[n, P]`` ids and their 0/1 attention mask."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of non-empty token lists, got "
                         f"lengths {[len(p) for p in prompts]}")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids, mask


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], *, num_samples: int = 1,
                       max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, eos_token_id: int | None = None,
                       generator: torch.Generator | None = None) -> Rollout:
    """Sample ``num_samples`` completions of every prompt (KV-cached decoding).

    Args:
        model: A :class:`~mlatlas.llm.llama.Llama` (see :func:`mlatlas.llm.generation.generate`).
        prompts: Token lists, one per prompt.
        num_samples: ``G`` completions per prompt (rows grouped by prompt).
        max_new_tokens: Longest completion ``≥ 1``.
        temperature: Sampling temperature (``0``: greedy).
        top_k: Optional top-k filter.
        eos_token_id: Ends a completion (the EOS is part of it, as the policy chose it).
        generator: Random source of the sampler.

    Returns:
        :class:`Rollout` with ``N = len(prompts) · num_samples`` rows.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    pad = 0 if eos_token_id is None else eos_token_id
    ids, mask = left_pad(prompts, pad)
    ids, mask = ids.repeat_interleave(num_samples, 0), mask.repeat_interleave(num_samples, 0)
    was_training = model.training
    model.eval()
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   eos_token_id=eos_token_id, generator=generator, attention_mask=mask)
    model.train(was_training)
    P = ids.shape[1]
    completion = out[:, P:]
    keep = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None:  # keep up to and including the first EOS
        seen = (completion == eos_token_id).long().cumsum(-1)
        keep = (seen - (completion == eos_token_id).long()) == 0
    completion_mask = torch.cat((torch.zeros_like(mask), keep.long()), dim=1)
    attention_mask = torch.cat((mask, keep.long()), dim=1)
    index = torch.arange(len(prompts)).repeat_interleave(num_samples)
    return Rollout(input_ids=out, attention_mask=attention_mask,
                   completion_mask=completion_mask, prompt_index=index, prompt_len=P)
