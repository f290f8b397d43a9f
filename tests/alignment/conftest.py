"""Shared set-up of the alignment parity tests: a tiny Llama in both worlds, a word tokenizer.

* ``llama_pair(seed)`` → ``(ours, hf)``: our :class:`Llama` and a ``transformers``
  ``LlamaForCausalLM`` holding the same random weights, copied by the explicit key map
  :func:`mlatlas.llm.hf_format.hf_key_map` (asserting no missing or unexpected keys).
* ``word_tokenizer()`` → a ``PreTrainedTokenizerFast`` over the words ``t0 … t{V-1}`` built
  in memory (no download), ``t1`` = EOS, ``t2`` = pad; what trl's trainers need to start.
* ``grad_pairs(ours, hf)`` → pairs of gradients, ours and HF's, by the same key map.
"""

from __future__ import annotations

import pytest
import torch

from mlatlas.llm.hf_format import config_to_hf, hf_key_map
from mlatlas.llm.llama import Llama, LlamaConfig

VOCAB = 37  # not a power of two
TINY = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3,
            num_kv_heads=1, head_dim=8, max_position_embeddings=64)


@pytest.fixture
def llama_pair(reference):
    transformers = reference("transformers")

    def build(seed: int = 0):
        torch.manual_seed(seed)
        ours = Llama(LlamaConfig(**TINY))
        with torch.no_grad():  # gains away from 1 so that they matter
            for name, p in ours.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
        hf_cfg = transformers.LlamaConfig(**config_to_hf(ours.config))
        hf_cfg._attn_implementation = "eager"
        hf = transformers.LlamaForCausalLM(hf_cfg)
        key_map = hf_key_map(ours.config)
        state = ours.state_dict()
        assert set(key_map) == set(state), "key map must cover our whole state dict"
        assert set(key_map.values()) == set(hf.state_dict())
        missing, unexpected = hf.load_state_dict({key_map[k]: v for k, v in state.items()},
                                                 strict=False)
        assert missing == [] and unexpected == []
        return ours, hf

    return build


@pytest.fixture
def grad_pairs():
    def pairs(ours: Llama, hf) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(name, our grad, HF grad)`` for every parameter, through the key map."""
        key_map = hf_key_map(ours.config)
        hf_params = dict(hf.named_parameters())
        return [(n, p.grad, hf_params[key_map[n]].grad) for n, p in ours.named_parameters()]

    return pairs


@pytest.fixture
def word_tokenizer(reference):
    transformers = reference("transformers")
    tokenizers = reference("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tk = tokenizers.Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="t1",
                                                pad_token="t2", unk_token="t0")
