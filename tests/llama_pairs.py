"""Shared test set-up: a tiny transformers ``LlamaForCausalLM`` and our ``Llama``, same weights.

Test files import it as ``from llama_pairs import llama_pair`` (``tests/`` is on the pytest
path). Sizes are not powers of two; GQA (3 query heads share 1 key/value head); untied head.
"""

from __future__ import annotations

import torch

from mlatlas.llm.hf_format import hf_key_map
from mlatlas.llm.llama import Llama, LlamaConfig

VOCAB = 61
OURS = dict(vocab_size=VOCAB, hidden_size=30, intermediate_size=44, num_layers=2, num_heads=3,
            num_kv_heads=1, head_dim=10, rms_norm_eps=1e-6, max_position_embeddings=48)
HF = dict(vocab_size=VOCAB, hidden_size=30, intermediate_size=44, num_hidden_layers=2,
          num_attention_heads=3, num_key_value_heads=1, head_dim=10, rms_norm_eps=1e-6,
          max_position_embeddings=48, tie_word_embeddings=False)


def ours_llama(seed: int = 0, **changes) -> Llama:
    """Our tiny Llama with seeded weights (RMSNorm gains perturbed so they matter)."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**OURS, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_llama(transformers, ours: Llama, **changes):
    """A transformers ``LlamaForCausalLM`` holding ``ours``'s weights (explicit key map)."""
    cfg = transformers.LlamaConfig(**{**HF, **changes})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    key_map = hf_key_map(ours.config)
    state = ours.state_dict()
    assert set(key_map) == set(state), "key map must cover our whole state dict"
    assert set(key_map.values()) == set(hf.state_dict()), "and the whole HF state dict"
    hf.load_state_dict({key_map[k]: state[k].clone() for k in key_map}, strict=True)
    return hf


def llama_pair(transformers, seed: int = 0) -> tuple[Llama, object]:
    """``(ours, hf)``: our Llama and a transformers one with the same weights."""
    ours = ours_llama(seed)
    return ours, hf_llama(transformers, ours)


def token_batch(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Seeded token ids ``[batch, length]``."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
