"""DPO parity against trl (1.16): per-pair losses of every loss type, forward and backward,
trl's completion log-probs on a tiny transformers Llama, and trl's whole DPO step.

trl computes the DPO loss inline in ``DPOTrainer._compute_loss``; the tests build a real
``trl.DPOTrainer`` on a tiny model (fp32, ``bf16=False``, no download) and drive that method:
with a stand-in model that returns given per-token log-probs (the loss alone), and with the
real model and reference (log-probs + loss + gradients end to end).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from mlatlas.alignment.dpo import (
    DPOTrainer,
    PreferenceBatch,
    dpo_loss,
    precompute_reference,
    sequence_logps,
)

ATOL = RTOL = 1e-5  # fp32 CPU

# (prompt, chosen, rejected) token lists of unequal lengths (right padding in the batch)
PAIRS = [([3, 4, 5], [6, 7], [8, 9, 10, 11]),
         ([12, 13], [14, 15, 16, 17, 18], [19]),
         ([20, 21, 22, 23, 24], [25], [26, 27]),
         ([28], [29, 30, 31], [32, 33, 34])]


def _batch(pairs=PAIRS) -> PreferenceBatch:
    def rows(which: int):
        T = max(len(p) + len(c[which - 1]) for p, *c in pairs)
        ids = torch.zeros(len(pairs), T, dtype=torch.long)
        mask = torch.zeros(len(pairs), T, dtype=torch.long)
        for i, (p, *c) in enumerate(pairs):
            seq = p + c[which - 1]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, len(p):len(seq)] = 1
        return ids, mask

    (cw, mw), (cl, ml) = rows(1), rows(2)
    return PreferenceBatch(cw, mw, cl, ml)


def _trl_dpo(word_tokenizer, tmp_path, hf_policy, hf_ref=None, **config):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none",
                         gradient_checkpointing=False, **config)
    ds = datasets.Dataset.from_dict({"prompt": ["t3"], "chosen": [" t4"], "rejected": [" t5"]})
    trainer = trl.DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=ds,
                             processing_class=word_tokenizer)
    trainer.model.train()
    return trainer


class _GivenLogps(torch.nn.Module):
    """Stands in for trl's fused-head model: returns the given per-token log-probs."""

    def __init__(self, per_token: torch.Tensor):
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs):
        z = torch.zeros_like(self.per_token.detach())
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z,
                               is_top1=z.bool(), log_sum_sq_probs=None, aux_loss=None)


def _given_inputs(B: int, T: int, seed: int):
    """Random per-token log-probs of [chosen; rejected] rows with random completion masks."""
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        start = int(torch.randint(1, T - 1, (1,), generator=g))
        stop = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        completion_mask[i, start:stop] = 1
    per_token = (-3 * torch.rand(2 * B, T - 1, generator=g)) * completion_mask[:, 1:]
    ref = -10 * torch.rand(2, B, generator=g)
    return per_token, completion_mask, ref


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 2.5), ("ipo", 0.1),
                                            ("ipo", 0.7), ("hinge", 0.1), ("hinge", 1.3)])
def test_loss_matches_trl_forward_and_backward(llama_pair, word_tokenizer, tmp_path, loss_type,
                                               beta):
    _, hf = llama_pair()
    trainer = _trl_dpo(word_tokenizer, tmp_path, hf, copy.deepcopy(hf), loss_type=[loss_type],
                       beta=beta, precompute_ref_log_probs=True)
    B, T = 5, 11
    per_token, completion_mask, ref = _given_inputs(B, T, seed=7)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long),
              "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
    theirs_leaf = per_token.clone().requires_grad_(True)
    want = trainer.compute_loss(_GivenLogps(theirs_leaf), inputs)
    want.backward()

    ours_leaf = per_token.clone().requires_grad_(True)
    chosen, rejected = ours_leaf.sum(1).chunk(2)
    lengths = completion_mask.sum(1).chunk(2) if loss_type == "ipo" else (None, None)
    out = dpo_loss(chosen, rejected, ref[0], ref[1], beta=beta, loss_type=loss_type,
                   chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    got = out.losses.mean()
    got.backward()
    assert out.losses.shape == (B,)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours_leaf.grad, theirs_leaf.grad, atol=ATOL, rtol=RTOL)
    assert ours_leaf.grad.abs().sum() > 0
    # the rewards trl logs: β (log π - log π_ref), their means and accuracy
    metrics = trainer._metrics["train"]
    torch.testing.assert_close(out.chosen_rewards.mean().item(), metrics["rewards/chosen"][-1],
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.margins.mean().item(), metrics["rewards/margins"][-1],
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close((out.margins > 0).float().mean().item(),
                               metrics["rewards/accuracies"][-1])


def test_label_smoothing_is_conservative_dpo_as_trl_computes_it(llama_pair, word_tokenizer,
                                                                tmp_path):
    """trl 1.16's ``sigmoid`` ignores label_smoothing; its ``aot`` loss is exactly conservative
    DPO ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` once its sort is the identity (one pair)."""
    _, hf = llama_pair()
    eps, beta = 0.2, 0.4
    trainer = _trl_dpo(word_tokenizer, tmp_path, hf, copy.deepcopy(hf), loss_type=["aot"],
                       beta=beta, label_smoothing=eps, precompute_ref_log_probs=True)
    for seed in range(3):
        per_token, completion_mask, ref = _given_inputs(1, 9, seed)
        inputs = {"input_ids": torch.ones(2, 9, dtype=torch.long),
                  "attention_mask": torch.ones(2, 9, dtype=torch.long),
                  "completion_mask": completion_mask,
                  "ref_chosen_logps": ref[0], "ref_rejected_logps": ref[1]}
        theirs = per_token.clone().requires_grad_(True)
        want = trainer.compute_loss(_GivenLogps(theirs), inputs)
        want.backward()
        ours = per_token.clone().requires_grad_(True)
        chosen, rejected = ours.sum(1).chunk(2)
        got = dpo_loss(chosen, rejected, ref[0], ref[1], beta=beta,
                       label_smoothing=eps).losses.mean()
        got.backward()
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(ours.grad, theirs.grad, atol=ATOL, rtol=RTOL)


def test_sequence_logps_match_trl_fused_head(llama_pair, grad_pairs):
    """trl's completion log-probs (``add_fused_lm_head`` → ``log_probs``, summed) on a tiny
    transformers Llama, forward and every parameter's gradient."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    ours, hf = llama_pair(seed=3)
    trl_utils.add_fused_lm_head(hf)
    ids, mask = _batch().stacked()
    attention = torch.zeros_like(ids)
    for i, row in enumerate(mask):  # real tokens: up to the last completion token
        attention[i, :int(row.nonzero().max()) + 1] = 1
    labels = ids.masked_fill(mask == 0, -100)
    want = hf(input_ids=ids, attention_mask=attention, labels=labels,
              fused_lm_head=True).log_probs.sum(1)
    got = sequence_logps(ours, ids, mask)
    got_masked = sequence_logps(ours, ids, mask, attention_mask=attention)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_masked, want, atol=ATOL, rtol=RTOL)
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(0))
    (got * cot).sum().backward()
    (want * cot).sum().backward()
    for name, a, b in grad_pairs(ours, hf):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_trainer_loss_matches_trl_dpo_step(llama_pair, grad_pairs, word_tokenizer, tmp_path,
                                           loss_type):
    """Our DPOTrainer with a frozen reference vs trl's DPOTrainer with ``ref_model``: same
    loss and same gradient on every parameter (log-probs and loss together)."""
    ours, hf = llama_pair(seed=5)
    ours_ref, hf_ref = copy.deepcopy(ours), copy.deepcopy(hf)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in ours_ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    hf_ref.load_state_dict(_hf_state_from(ours_ref, hf_ref))
    trainer = _trl_dpo(word_tokenizer, tmp_path, hf, hf_ref, loss_type=[loss_type], beta=0.3)
    inputs = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                    for p, c, r in PAIRS])
    want = trainer.compute_loss(hf, inputs)
    want.backward()
    ours_trainer = DPOTrainer(ours, torch.optim.SGD(ours.parameters(), lr=0.0),
                              reference=ours_ref, beta=0.3, loss_type=loss_type)
    got = ours_trainer.loss(_batch()).losses.mean()
    got.backward()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for name, a, b in grad_pairs(ours, hf):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    assert not any(p.requires_grad for p in ours_ref.parameters()), "reference must be frozen"


def _hf_state_from(ours, hf):
    from mlatlas.llm.hf_format import hf_key_map

    key_map = hf_key_map(ours.config)
    state = {key_map[k]: v for k, v in ours.state_dict().items()}
    assert set(state) == set(hf.state_dict())
    return state


def test_precomputed_reference_equals_live_reference(llama_pair):
    ours, _ = llama_pair(seed=1)
    ref = copy.deepcopy(ours)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(1.05)
    batch = _batch()
    live = DPOTrainer(ours, torch.optim.SGD(ours.parameters(), lr=0.0), reference=ref)
    pre = DPOTrainer(ours, torch.optim.SGD(ours.parameters(), lr=0.0))
    a = live.loss(batch)
    b = pre.loss(precompute_reference(ref, batch))
    torch.testing.assert_close(a.losses, b.losses, atol=0, rtol=0)
    torch.testing.assert_close(a.chosen_rewards, b.chosen_rewards, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no precomputed reference"):
        pre.loss(batch)


def test_identical_policy_and_reference_give_log2_and_half_accuracy():
    lp = torch.tensor([-3.0, -7.5, -1.25])
    out = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.5)
    torch.testing.assert_close(out.losses, torch.full((3,), 0.6931471805599453))
    assert out.accuracy == 0.5 and torch.equal(out.margins, torch.zeros(3))
    # hinge at zero margin is 1, IPO is (1/(2β))²
    torch.testing.assert_close(dpo_loss(lp, lp, lp, lp, beta=0.5, loss_type="hinge").losses,
                               torch.ones(3))
    torch.testing.assert_close(dpo_loss(lp, lp, lp, lp, beta=0.5, loss_type="ipo").losses,
                               torch.ones(3))


def test_trainer_step_raises_the_margin(llama_pair):
    ours, _ = llama_pair(seed=2)
    ref = copy.deepcopy(ours)
    trainer = DPOTrainer(ours, torch.optim.AdamW(ours.parameters(), lr=1e-2), reference=ref,
                         beta=0.5)
    batch = _batch()
    first = trainer.step(batch)
    for _ in range(5):
        trainer.step(batch)
    last = trainer.evaluate(batch)
    assert first.margins.abs().max() == 0
    assert last.margins.mean() > 0.1 and last.accuracy == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=-0.1), "beta must be > 0"),
    (dict(loss_type="kto"), "loss_type must be one of"),
    (dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
    (dict(label_smoothing=0.1, loss_type="ipo"), "label_smoothing applies to loss_type='sigmoid'"),
    (dict(chosen_lengths=torch.ones(3)), "apply to loss_type='ipo' only"),
    (dict(loss_type="ipo", chosen_lengths=torch.ones(3)), "give both"),
])
def test_bad_settings(kwargs, match):
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match=match):
        dpo_loss(lp, lp, lp, lp, **kwargs)


def test_bad_logps():
    a, b = torch.zeros(3), torch.zeros(4)
    with pytest.raises(ValueError, match=r"same number of pairs B.*'policy_rejected_logps': 4"):
        dpo_loss(a, b, a, a)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a floating tensor \[B\]"):
        dpo_loss(a, a, torch.zeros(3, 2), a)
    with pytest.raises(ValueError, match="policy_chosen_logps must be a floating tensor"):
        dpo_loss(torch.zeros(3, dtype=torch.long), a, a, a)
    with pytest.raises(ValueError, match="ref_rejected_logps contains NaN"):
        dpo_loss(a, a, a, torch.tensor([0.0, float("nan"), 0.0]))
    batch = _batch()
    with pytest.raises(ValueError, match="same number of pairs, got 4 and 3"):
        PreferenceBatch(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids[:3],
                        batch.rejected_mask[:3])
    with pytest.raises(ValueError, match="rejected_mask must have its ids' shape"):
        PreferenceBatch(batch.chosen_ids, batch.chosen_mask, batch.rejected_ids,
                        batch.rejected_mask[:, :-1])
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOTrainer(torch.nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)], lr=0.1), beta=0)
