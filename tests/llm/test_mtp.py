"""Multi-token prediction: parity against transformers' MTP layer, loss, lossless decoding.

The pinned transformers (5.x) has DeepSeek-V3's MTP layer: ``DeepseekV3Config.num_mtp_layers``
and the generic ``transformers.modeling_layers.MtpModel`` / ``MtpLayer`` that
``generate(use_mtp=True)`` builds on any main model (``enorm``, ``hnorm``, ``eh_proj``,
``mtp_block``, ``post_norm``; shared embedding and head). We wrap it around a
``LlamaForCausalLM`` holding our main model's weights and compare every depth, forward and
backward.
"""

from __future__ import annotations

import pytest
import torch
from chain_model import chain_batch, train_on_chains

from mlatlas.llm.generation import generate
from mlatlas.llm.hf_format import hf_key_map
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.mtp import MTPModules, ParallelMTPHeads, mtp_generate, multi_token_loss

ATOL = RTOL = 1e-5  # fp32 CPU

# not powers of two: V = 37, d = 30, 5 query heads over ... 1 kv head, head_dim 6, f = 44
CFG = dict(vocab_size=37, hidden_size=30, intermediate_size=44, num_layers=2, num_heads=5,
           num_kv_heads=1, max_position_embeddings=96, rms_norm_eps=1e-5)


def _model(seed: int = 0, **over) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**CFG, **over})).eval()


@pytest.fixture(scope="module")
def trained():
    """A model trained on :func:`chain_model.chain_batch` rows (peaked predictions)."""
    return train_on_chains(_model(seed=11))


def _perturb_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():  # unit gains would hide a swapped enorm / hnorm
        for n, p in module.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))


def test_mtp_matches_transformers_mtp_layer(reference):
    transformers = reference("transformers")
    from transformers.modeling_layers import MtpModel

    model = _model()
    _perturb_norms(model)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=37, hidden_size=30, intermediate_size=44, num_hidden_layers=2,
        num_attention_heads=5, num_key_value_heads=1, max_position_embeddings=96,
        rms_norm_eps=1e-5)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.num_mtp_layers = 2
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    key_map = hf_key_map(model.config)
    missing, unexpected = hf.load_state_dict(
        {key_map[k]: v for k, v in model.state_dict().items()}, strict=False)
    assert missing == [] and unexpected == []

    mtp = MTPModules(model.config, depth=2)
    _perturb_norms(mtp)
    hf_mtp = MtpModel(hf, 2).eval()
    # explicit key map: ours layers.{k}.X ↔ transformers layers.{k}.X; embedding and head are
    # the main model's in both (transformers lists them as embed_tokens / shared_head)
    ours = mtp.state_dict()
    mtp_map = {k: k for k in ours}
    theirs = hf_mtp.state_dict()
    assert set(theirs) - set(mtp_map.values()) == {"embed_tokens.weight", "shared_head.weight"}
    assert set(mtp_map.values()) <= set(theirs)
    missing, unexpected = hf_mtp.load_state_dict({mtp_map[k]: v for k, v in ours.items()},
                                                 strict=False)
    assert unexpected == [] and set(missing) == {"embed_tokens.weight", "shared_head.weight"}
    assert hf_mtp.embed_tokens.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    B, T = 2, 11
    ids = torch.randint(0, 37, (B, T), generator=torch.Generator().manual_seed(1))
    h0 = torch.randn(B, T, 30, requires_grad=True)
    logits = mtp(model, h0, ids)
    ref, h = [], h0
    for k in range(2):  # depth k+1: h^k over T-k-1 positions, tokens and positions shifted
        pos = torch.arange(k + 1, T)[None].expand(B, -1)
        h = hf_mtp.forward_layer(k, h[:, :T - k - 1], pos, None, input_ids=ids[:, k + 1:])
        ref.append(hf_mtp._project_to_logits(h))
    for z, r in zip(logits, ref, strict=True):
        torch.testing.assert_close(z, r, atol=ATOL, rtol=RTOL)
    # backward: one random cotangent per depth, gradients of h^0 and of every weight
    gen = torch.Generator().manual_seed(2)
    cots = [torch.randn(z.shape, generator=gen) for z in logits]
    loss = sum((z * c).sum() for z, c in zip(logits, cots))
    loss_ref = sum((z * c).sum() for z, c in zip(ref, cots))
    ours_named = {"h0": h0, "embed": model.embed_tokens.weight, "head": model.lm_head.weight,
                  **dict(mtp.named_parameters())}
    ref_named = {"h0": h0, "embed": hf.model.embed_tokens.weight, "head": hf.lm_head.weight,
                 **{k: dict(hf_mtp.named_parameters())[mtp_map[k]]
                    for k, _ in mtp.named_parameters()}}
    got = torch.autograd.grad(loss, list(ours_named.values()))
    want = torch.autograd.grad(loss_ref, list(ref_named.values()))
    for name, a, b in zip(ours_named, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def test_multi_token_loss_is_the_papers_sum():
    model, gen = _model(), torch.Generator().manual_seed(3)
    ids = torch.randint(0, 37, (3, 9), generator=gen)
    for heads in (MTPModules(model.config, 3), ParallelMTPHeads(model.config, 3)):
        logits = heads(model, model.hidden_states(ids), ids)
        assert [tuple(z.shape) for z in logits] == [(3, 8, 37), (3, 7, 37), (3, 6, 37)]
        want = 0.0
        for k, z in enumerate(logits, start=1):  # L^k: row i predicts t_{i+k+1}
            logp = z.log_softmax(-1)
            rows = [-logp[b, i, ids[b, i + k + 1]] for b in range(3) for i in range(9 - k - 1)]
            want = want + torch.stack(rows).mean()
        torch.testing.assert_close(multi_token_loss(logits, ids, weight=0.3), 0.3 / 3 * want,
                                   atol=ATOL, rtol=RTOL)


def test_sequential_depths_chain_and_share_embedding_and_head():
    model = _model()
    mtp = MTPModules(model.config, 2)
    ids = torch.randint(0, 37, (1, 8), generator=torch.Generator().manual_seed(4))
    h0 = model.hidden_states(ids)
    base = mtp(model, h0, ids)
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % 37  # only depth 2's last input token changes
    other = mtp(model, h0, ids2)
    torch.testing.assert_close(other[0][:, :6], base[0][:, :6])  # causal: earlier rows same
    assert not torch.allclose(other[1][:, -1], base[1][:, -1])
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # the shared head is the main model's
    torch.testing.assert_close(mtp(model, h0, ids)[0], 2 * base[0], atol=ATOL, rtol=RTOL)
    assert not any(p is model.lm_head.weight for p in mtp.parameters())


def _reference_drafts(model: Llama, mtp: MTPModules, tokens: torch.Tensor) -> torch.Tensor:
    """The drafts recomputed from scratch (no cache) for committed ``tokens [N]``."""
    N, T = tokens.numel(), tokens.numel() - 1
    h = model.hidden_states(tokens[None, :T])  # h^0 over positions 0 … N-2
    seq = tokens
    for k, layer in enumerate(mtp.layers, start=1):
        pos = torch.arange(k, T + k)
        cos, sin = mtp._rope(pos, h.dtype)
        h = layer(h, model.embed_tokens(seq[pos])[None], cos, sin)
        seq = torch.cat((seq, model.lm_head(h[0, -1]).argmax(-1, keepdim=True)))
    return seq[N:]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cached_drafts_equal_drafts_from_scratch(depth, monkeypatch):
    model = _model(seed=depth)
    mtp = MTPModules(model.config, depth)
    _perturb_norms(mtp)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    draft = MTPModules.draft

    def spy(self, model, state, tokens, new_hidden):
        out = draft(self, model, state, tokens, new_hidden)
        seen.append((tokens.clone(), out))
        return out

    monkeypatch.setattr(MTPModules, "draft", spy)
    ids = torch.randint(0, 37, (1, 4), generator=torch.Generator().manual_seed(5))
    mtp_generate(model, mtp, ids, 25)
    assert len(seen) > 5
    for tokens, drafts in seen:
        torch.testing.assert_close(drafts, _reference_drafts(model, mtp, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("heads_cls", [MTPModules, ParallelMTPHeads])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_lossless_on_random_model_and_heads(heads_cls, depth, prompt_len):
    model = _model(seed=depth + prompt_len)
    heads = heads_cls(model.config, depth)
    ids = torch.randint(0, 37, (1, prompt_len),
                        generator=torch.Generator().manual_seed(prompt_len))
    out = mtp_generate(model, heads, ids, 30)
    assert torch.equal(out.tokens, generate(model, ids, 30))
    assert out.new_tokens == 30 and out.forwards == 1 + len(out.accepted)


@pytest.mark.parametrize("depth", [1, 3])
def test_perfect_drafts_are_all_accepted(depth, monkeypatch):
    """Drafts equal to greedy's own continuation: D + 1 tokens per verification forward."""
    model = _model(seed=7)
    ids = torch.randint(0, 37, (1, 5), generator=torch.Generator().manual_seed(8))
    want = generate(model, ids, 31)[0]

    def oracle(self, model, state, tokens, new_hidden):
        return want[tokens.numel():tokens.numel() + self.depth]

    monkeypatch.setattr(MTPModules, "draft", oracle)
    out = mtp_generate(model, MTPModules(model.config, depth), ids, 31)
    assert torch.equal(out.tokens[0], want)
    assert out.accepted[:-1] == [depth] * (len(out.accepted) - 1)
    assert out.forwards == 1 + -(-30 // (depth + 1))  # prefill, then D + 1 tokens a step
    assert out.acceptance_by_depth(depth)[0] == 1.0


def test_eos_and_zero_tokens():
    model = _model(seed=9)
    ids = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(9))
    full = generate(model, ids, 20)[0]
    eos = int(full[3 + 4])  # the fifth new token
    mtp = MTPModules(model.config, 2)
    out = mtp_generate(model, mtp, ids, 20, eos_token_id=eos)
    assert torch.equal(out.tokens, generate(model, ids, 20, eos_token_id=eos))
    assert torch.equal(mtp_generate(model, mtp, ids, 0).tokens, ids)


@pytest.mark.parametrize("heads_cls", [MTPModules, ParallelMTPHeads])
def test_lossless_on_trained_model_with_trained_heads(trained, heads_cls):
    torch.manual_seed(12)
    heads = heads_cls(trained.config, 2)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    for _ in range(60):  # main model frozen, targets: the corpus tokens
        x = chain_batch(gen)
        loss = multi_token_loss(heads(trained, trained.hidden_states(x), x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = chain_batch(torch.Generator().manual_seed(13), batch=1, length=5)
    out = mtp_generate(trained, heads.eval(), ids, 40)
    assert torch.equal(out.tokens, generate(trained, ids, 40))
    assert out.acceptance_by_depth(2)[0] > 0.5 and out.tokens_per_forward > 1.5


def test_bad_input():
    model = _model()
    mtp = MTPModules(model.config, 2)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch size 1.*got batch size 2"):
        mtp_generate(model, mtp, torch.zeros(2, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="exceeds the model's context.*max_position_embeddings"):
        mtp_generate(model, mtp, torch.zeros(1, 90, dtype=torch.long), 10)
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor"):
        mtp_generate(model, mtp, ids.float(), 5)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        mtp_generate(model, mtp, ids, -1)
    with pytest.raises(TypeError, match="mtp must be MTPModules or ParallelMTPHeads"):
        mtp_generate(model, torch.nn.Linear(2, 2), ids, 5)
    with pytest.raises(ValueError, match="does not match these heads"):
        mtp_generate(_model(vocab_size=41), mtp, ids, 5)
    with pytest.raises(ValueError, match="depth must be an int >= 1, got 0"):
        MTPModules(model.config, 0)
    with pytest.raises(TypeError, match="config must be a LlamaConfig"):
        ParallelMTPHeads({"hidden_size": 30})
    h = model.hidden_states(ids)
    with pytest.raises(ValueError, match="sequence length T=4 must exceed depth=4"):
        MTPModules(model.config, 4)(model, h, ids)
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, d=30\], got \(4, 30\)"):
        mtp(model, h[0], ids)
    with pytest.raises(ValueError, match=r"logits\[1\] must be \[B, T - 2, V\]"):
        multi_token_loss([torch.zeros(1, 3, 37), torch.zeros(1, 3, 37)], ids)
