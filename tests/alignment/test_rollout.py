"""Completion log-probs and rollouts: exact against a hand computation, padding-invariant,
grouped as GRPO needs; bad input. Plus one step of each online trainer on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from mlatlas.alignment.logprobs import completion_logps, token_entropy, token_logps
from mlatlas.alignment.ppo import ValueModel
from mlatlas.alignment.rl_trainers import GRPOTrainer, PPOTrainer, SamplingConfig
from mlatlas.alignment.rollout import left_pad, sample_completions
from mlatlas.llm.llama import Llama, LlamaConfig

ATOL = RTOL = 1e-5


def _model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=29, hidden_size=16, intermediate_size=24, num_layers=2,
                             num_heads=2, max_position_embeddings=48))


def test_token_logps_and_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    p = logits.softmax(-1)
    want = torch.stack([p[b, t, ids[b, t + 1]].log() for b in range(2) for t in range(4)])
    torch.testing.assert_close(token_logps(logits, ids).flatten(), want)
    torch.testing.assert_close(token_entropy(logits), -(p * p.log()).sum(-1)[:, :-1])


def test_left_padding_leaves_completion_logps_unchanged():
    model = _model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    plain = completion_logps(model, ids, mask, with_entropy=True)
    padded_ids = torch.cat((torch.zeros(1, 4, dtype=torch.long), ids), 1)
    padded_mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), mask), 1)
    attention = (torch.arange(10) >= 4).long()[None]
    padded = completion_logps(model, padded_ids, padded_mask, attention_mask=attention,
                              with_entropy=True)
    torch.testing.assert_close(padded.logps[:, 4:], plain.logps, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(padded.entropy[:, 4:], plain.entropy, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(padded.sequence, plain.sequence, atol=ATOL, rtol=RTOL)
    assert torch.equal(plain.mask, mask[:, 1:].float())
    assert plain.logps[0, :2].abs().sum() == 0  # prompt columns are masked


def test_sample_completions_groups_and_eos():
    model = _model(1)
    prompts = [[3, 4, 5], [6], [7, 8]]
    g = torch.Generator().manual_seed(0)
    r = sample_completions(model, prompts, num_samples=4, max_new_tokens=6, eos_token_id=2,
                           generator=g, temperature=3.0)
    assert len(r) == 12 and r.prompt_len == 3
    assert r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    ids, mask = left_pad(prompts, 2)
    assert torch.equal(r.input_ids[:, :3], ids.repeat_interleave(4, 0))
    assert torch.equal(r.attention_mask[:, :3], mask.repeat_interleave(4, 0))
    for row, comp in zip(range(12), r.completions(eos_token_id=2)):
        c = r.input_ids[row, 3:]
        m = r.completion_mask[row, 3:]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any(), "completion mask is a prefix"
        if 2 in c.tolist():
            first = c.tolist().index(2)
            assert n == first + 1 and comp == c[:first].tolist()
        else:
            assert n == c.shape[0] and comp == c.tolist()
    assert any(2 in c.tolist() for c in r.input_ids[:, 3:]), "the test must hit EOS"
    again = sample_completions(model, prompts, num_samples=4, max_new_tokens=6, eos_token_id=2,
                               generator=torch.Generator().manual_seed(0), temperature=3.0)
    assert torch.equal(again.input_ids, r.input_ids), "seeded sampling is reproducible"


def test_bad_input():
    model = _model()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match=r"completion_mask\[:, 0\] must be 0"):
        completion_logps(model, ids, torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"completion_mask must be a tensor of input_ids' "
                                         r"shape \(1, 3\), got \(1, 2\)"):
        completion_logps(model, ids, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
        completion_logps(model, ids, torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match="completion_mask marks padding"):
        completion_logps(model, ids, torch.tensor([[0, 1, 1]]),
                         attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        completion_logps(model, ids.float(), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="prompts must be a non-empty list of non-empty"):
        sample_completions(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        sample_completions(model, [[1]], num_samples=0, max_new_tokens=2)


def _count_reward(rollout):
    """A checkable property: the fraction of completion tokens divisible by 3."""
    return torch.tensor([sum(t % 3 == 0 for t in c) / max(len(c), 1)
                         for c in rollout.completions()])


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_one_trainer_step(kind):
    policy = _model(2)
    ref = copy.deepcopy(policy)
    sampling = SamplingConfig(samples_per_prompt=4, max_new_tokens=5, temperature=1.5,
                              eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in policy.parameters()]
    if kind == "grpo":
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        trainer = GRPOTrainer(policy, opt, _count_reward, sampling, reference=ref, beta=0.1,
                              updates=2, generator=g)
    else:
        critic = ValueModel.from_policy(policy)
        opt = torch.optim.AdamW([*policy.parameters(), *critic.parameters()], lr=1e-2)
        trainer = PPOTrainer(policy, critic, opt, _count_reward, sampling, reference=ref,
                             updates=2, generator=g)
    stats = trainer.step([[3, 4], [6, 7, 8]])
    assert 0 < stats.reward < 1 and stats.kl == 0.0  # policy = reference before the step
    assert 1 <= stats.completion_tokens <= 5
    assert (stats.value_loss is None) == (kind == "grpo")
    assert any(not torch.equal(a, p) for a, p in zip(before, policy.parameters()))
    assert not any(p.requires_grad for p in ref.parameters())
    second = trainer.step([[3, 4], [6, 7, 8]])
    assert second.kl > 0  # the policy has moved


def test_trainer_bad_input():
    policy = _model()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs a reference model"):
        GRPOTrainer(policy, opt, _count_reward, SamplingConfig(), beta=0.1)
    with pytest.raises(ValueError, match="updates must be an int >= 1"):
        GRPOTrainer(policy, opt, _count_reward, SamplingConfig(), beta=0.0, updates=0)
    bad = GRPOTrainer(policy, opt, lambda r: torch.zeros(3), SamplingConfig(samples_per_prompt=2,
                                                                              max_new_tokens=2),
                      beta=0.0)
    with pytest.raises(ValueError, match=r"reward_fn must return one reward per row \[4\]"):
        bad.step([[1], [2]])
