"""GRPO parity against trl (1.16): group advantages, the clipped-ratio + k3-KL loss of every
aggregation (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``), forward and backward, in fp32.

trl computes both inline in ``GRPOTrainer``: the advantages in
``_generate_and_score_completions`` and the loss in ``_compute_loss``. The tests build a real
``trl.GRPOTrainer`` on a tiny transformers Llama saved to a temporary folder (no download;
``bf16=False`` and the ``loss_type`` set explicitly, since trl defaults to bf16 and ``dapo``)
and drive those methods: with a reward function that returns given rewards, with the trainer's
log-prob method replaced by one returning given per-token log-probs (the loss alone), and
unpatched on the real model (log-probs + loss + gradients end to end).
"""

from __future__ import annotations

import math

import pytest
import torch

from mlatlas.alignment.grpo import group_advantages, grpo_loss, k3_kl
from mlatlas.alignment.logprobs import completion_logps

ATOL = RTOL = 1e-5  # fp32 CPU


def _trl_grpo(hf, word_tokenizer, tmp_path, **config):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "policy"
    if not folder.exists():
        hf.save_pretrained(folder)
    config = {"num_generations": 3, "per_device_train_batch_size": 6,
              "max_completion_length": 4, **config}
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True,
                          report_to="none", gradient_checkpointing=False, **config)
    ds = datasets.Dataset.from_dict({"prompt": ["t3 t4"] * 6, "r": [0.0] * 6})

    def given_reward(prompts, completions, r, **kwargs):
        return list(r)

    trainer = trl.GRPOTrainer(model=str(folder), reward_funcs=[given_reward], args=args,
                              train_dataset=ds, processing_class=word_tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


# 4 prompts × G = 3: spread rewards, an all-equal group, a group with an unscorable (None)
# reward, and a group of one value + two unscorable
REWARDS = [1.0, 2.0, 4.0, 3.0, 3.0, 3.0, 0.5, None, 1.5, -2.0, None, None]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(llama_pair, word_tokenizer, tmp_path, scale):
    _, hf = llama_pair()
    trainer = _trl_grpo(hf, word_tokenizer, tmp_path, scale_rewards=scale, beta=0.0,
                        loss_type="grpo", per_device_train_batch_size=12)
    inputs = [{"prompt": f"t{3 + i // 3} t9", "r": r} for i, r in enumerate(REWARDS)]
    want = trainer._generate_and_score_completions(inputs)["advantages"]
    rewards = torch.tensor([math.nan if r is None else r for r in REWARDS])
    got = group_advantages(rewards, 3, scale=scale)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert torch.equal(got[3:6], torch.zeros(3)), "all-equal rewards → advantage 0"
    assert got[7] == 0 and bool(torch.isfinite(got).all())


# (label, config): on-policy without KL; off-policy with KL and DAPO's clip-higher; off-policy
# with trl's default bias-corrected KL
SETTINGS = {
    "on-policy, beta=0": dict(beta=0.0, epsilon=0.2, epsilon_high=None,
                              use_bias_correction_kl=False, off_policy=False),
    "off-policy, beta=0.04, eps_high=0.28": dict(beta=0.04, epsilon=0.2, epsilon_high=0.28,
                                                 use_bias_correction_kl=False, off_policy=True),
    "off-policy, beta=0.3, corrected KL": dict(beta=0.3, epsilon=0.1, epsilon_high=None,
                                               use_bias_correction_kl=True, off_policy=True),
}


def _given_tokens(B: int, C: int, seed: int, off_policy: bool):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, C + 1, (B,), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).long()
    logps = -3 * torch.rand(B, C, generator=g)
    old = logps + 0.4 * torch.randn(B, C, generator=g) if off_policy else None
    ref = logps + 0.5 * torch.randn(B, C, generator=g)
    adv = torch.randn(B, generator=g)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_matches_trl_forward_and_backward(llama_pair, word_tokenizer, tmp_path, loss_type,
                                               setting):
    s = dict(SETTINGS[setting])
    off_policy = s.pop("off_policy")
    _, hf = llama_pair()
    max_len = 13  # dr_grpo's constant, deliberately not the batch's width
    trainer = _trl_grpo(hf, word_tokenizer, tmp_path, loss_type=loss_type,
                        max_completion_length=max_len, **s)
    B, C = 6, 7
    logps, old, ref, adv, mask = _given_tokens(B, C, seed=3, off_policy=off_policy)
    num_items = int(mask.sum()) + 9  # dapo: tokens of a larger generation batch

    theirs = logps.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = (
        lambda model, input_ids, attention_mask, logits_to_keep, **kw:
        (theirs, torch.zeros_like(logps), None))
    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, C, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "num_items_in_batch": torch.tensor(float(num_items))}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if s["beta"]:
        inputs["ref_per_token_logps"] = ref
    want = trainer.compute_loss(trainer.model, inputs)
    want.backward()

    ours = logps.clone().requires_grad_(True)
    out = grpo_loss(ours, adv, mask, old_logps=old, ref_logps=ref if s["beta"] else None,
                    beta=s["beta"], epsilon=s["epsilon"], epsilon_high=s["epsilon_high"],
                    loss_type=loss_type, max_completion_length=max_len,
                    num_items_in_batch=num_items,
                    kl_ratio_correction=s["use_bias_correction_kl"])
    out.loss.backward()
    torch.testing.assert_close(out.loss, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=ATOL, rtol=RTOL)
    assert ours.grad.abs().sum() > 0
    metrics = trainer._metrics["train"]
    torch.testing.assert_close(out.clip_fraction.item(), metrics["clip_ratio/region_mean"][-1],
                               atol=ATOL, rtol=RTOL)
    if off_policy:
        assert out.clip_fraction > 0, "the test must exercise clipping"
    if s["beta"]:
        torch.testing.assert_close(out.kl.item(), metrics["kl"][-1], atol=ATOL, rtol=RTOL)
    else:
        assert out.kl is None


def test_loss_on_the_model_matches_trl_end_to_end(llama_pair, grad_pairs, word_tokenizer,
                                                  tmp_path):
    """Left-padded prompts, completions of unequal length: trl's own log-prob pass on the
    transformers model and its loss vs :func:`completion_logps` on our Llama + grpo_loss."""
    ours, hf = llama_pair(seed=4)
    trainer = _trl_grpo(hf, word_tokenizer, tmp_path, loss_type="bnpo", beta=0.0,
                        use_bias_correction_kl=False)
    model = trainer.model  # trl's copy of the saved weights, with its fused LM head
    prompt_ids = torch.tensor([[2, 2, 5, 6], [7, 8, 9, 10], [2, 11, 12, 13]])
    prompt_mask = (torch.arange(4)[None] >= torch.tensor([[2], [0], [1]])).long()
    completion_ids = torch.tensor([[14, 15, 1, 2, 2], [16, 17, 18, 19, 20], [21, 1, 2, 2, 2]])
    completion_mask = (torch.arange(5)[None] < torch.tensor([[3], [5], [2]])).long()
    adv = torch.tensor([0.7, -1.2, 0.4])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": adv, "num_items_in_batch": completion_mask.sum()}
    want = trainer.compute_loss(model, inputs)
    want.backward()

    ids = torch.cat((prompt_ids, completion_ids), 1)
    attention = torch.cat((prompt_mask, completion_mask), 1)
    full_mask = torch.cat((torch.zeros_like(prompt_mask), completion_mask), 1)
    lp = completion_logps(ours, ids, full_mask, attention_mask=attention)
    got = grpo_loss(lp.logps[:, -5:], adv, lp.mask[:, -5:], loss_type="bnpo").loss
    got.backward()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for name, a, b in grad_pairs(ours, model):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def test_on_policy_gradient_is_the_policy_gradient():
    """ρ = 1 on policy: ∇L = -Â ∇ℓ / |o| per token (grpo aggregation, β = 0)."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    grpo_loss(logps, adv, mask).loss.backward()
    want = torch.tensor([[-2.0 / 2, -2.0 / 2, 0.0], [1 / 3, 1 / 3, 1 / 3]]) / 2
    torch.testing.assert_close(logps.grad, want)


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    a = torch.linspace(-5, 0, 11)
    assert torch.equal(k3_kl(a, a), torch.zeros(11))
    assert bool((k3_kl(a, a.flip(0)) >= 0).all())


def test_group_edge_cases():
    # one completion per prompt: no group spread → advantage 0 (trl: std := 0)
    assert torch.equal(group_advantages(torch.tensor([1.0, 5.0]), 1), torch.zeros(2))
    # a batch of one
    assert torch.equal(group_advantages(torch.tensor([3.0]), 1, scale="batch"), torch.zeros(1))
    # all rewards equal everywhere: no NaN, zeros
    assert torch.equal(group_advantages(torch.full((6,), 0.25), 3), torch.zeros(6))
    # integer rewards are accepted (0/1 exact match)
    got = group_advantages(torch.tensor([1, 0, 0, 1]), 2, scale="none")
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # advantages are standardised within each group (unbiased std, as trl/torch.std)
    r = torch.tensor([0.0, 1.0, 2.0, 10.0, 20.0, 60.0])
    a = group_advantages(r, 3)
    torch.testing.assert_close(a.view(2, 3).std(1), torch.ones(2) / (1 + 1e-4 / r.view(2, 3)
                                                                      .std(1)), atol=1e-6,
                               rtol=1e-6)


def test_bad_input():
    r = torch.arange(6.0)
    with pytest.raises(ValueError, match=r"group_size \(4\) must divide the number of rewards "
                                         r"\(6\)"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="group_size must be an int >= 1, got 0"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, 3, scale="global")
    with pytest.raises(ValueError, match=r"rewards must be a non-empty tensor \[N\]"):
        group_advantages(r.view(2, 3), 3)
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages(torch.tensor([1.0, math.inf]), 2)
    lp, mask, adv = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        grpo_loss(lp, adv, mask, ref_logps=lp, beta=-0.1)
    with pytest.raises(ValueError, match="ref_logps is required when beta > 0"):
        grpo_loss(lp, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(lp, adv, mask, loss_type="sapo")
    with pytest.raises(ValueError, match="need 0 <= epsilon < 1"):
        grpo_loss(lp, adv, mask, epsilon=1.0)
    with pytest.raises(ValueError, match=r"advantages must be \[B=2\] or \[B, T\]"):
        grpo_loss(lp, torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"old_logps must be a floating tensor of "
                                         r"completion_mask's shape \(2, 3\)"):
        grpo_loss(lp, adv, mask, old_logps=torch.zeros(2, 4))
