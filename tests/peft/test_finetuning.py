"""The instruction task and the fine-tuning loop the PEFT experiments share."""

from __future__ import annotations

import pytest
import torch
from llama_pairs import ours_llama
from torch import nn

from mlatlas.datasets.instructions import (
    OPERATIONS,
    Instruction,
    encode_instructions,
    instruction_split,
)
from mlatlas.peft.finetuning import (
    FineTuneSchedule,
    InstructionTask,
    exact_match,
    finetune,
    parameter_share,
    train_and_score,
    training_state_bytes,
)
from mlatlas.peft.lora import LoraConfig, apply_lora


class CharTokenizer:
    """One token per character of a small alphabet; id 0 is end-of-text (fast, no BPE)."""

    chars = " 0123456789:->abcdefghijklmnopqrstuvwxyz"
    eot_id = 0

    def encode(self, text):
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids):
        return "".join(self.chars[i - 1] for i in ids if i != self.eot_id)


def test_split_is_seeded_disjoint_and_correct():
    a = instruction_split(200, 50, seed=3, length=4)
    assert a == instruction_split(200, 50, seed=3, length=4)
    assert a != instruction_split(200, 50, seed=4, length=4)
    assert not {e.prompt for e in a["eval"]} & {e.prompt for e in a["train"]}
    assert {e.operation for e in a["train"]} == set(OPERATIONS)
    for ex in a["train"] + a["eval"]:
        op, digits = ex.prompt.removesuffix(" ->").split(": ")
        xs = [int(d) for d in digits.split()]
        assert len(xs) == len(set(xs)) == 4 and op == ex.operation
        assert ex.answer == str(OPERATIONS[op](xs))
    only = instruction_split(20, 5, operations=["last"])
    assert {e.operation for e in only["train"]} == {"last"}


@pytest.mark.parametrize("kw,match", [
    (dict(n_train=-1, n_eval=2), "n_train must be an int >= 0, got -1"),
    (dict(n_train=2, n_eval=2, length=11), r"length must be an int in \[2, 10\].*got 11"),
    (dict(n_train=2, n_eval=2, operations=["median"]), "operations must be a non-empty subset"),
])
def test_split_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        instruction_split(**kw)


def test_encoding_masks_everything_but_the_answer():
    tok = CharTokenizer()
    examples = [Instruction("last: 1 2 ->", "2", "last"), Instruction("first: 12 ->", "1", "first")]
    batch = encode_instructions(examples, tok)
    assert batch.input_ids.shape == (2, len("first: 12 ->") + 3)
    row = batch.input_ids[0].tolist()
    n = len("last: 1 2 ->")
    assert row[:n] == tok.encode("last: 1 2 ->") and row[n:n + 3] == tok.encode(" 2") + [0]
    assert batch.labels[0, :n].eq(-100).all() and batch.labels[0, n:n + 3].tolist() == row[n:n + 3]
    assert batch.labels[0, n + 3:].eq(-100).all(), "padding is not a target"
    with pytest.raises(ValueError, match="examples must be non-empty"):
        encode_instructions([], tok)


def test_parameter_share_and_state_bytes():
    model = ours_llama(tie_word_embeddings=True)
    n = sum(p.numel() for p in model.parameters())
    assert parameter_share(model).total == n  # the tied head counts once
    assert n < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    tok = CharTokenizer()
    split = instruction_split(32, 4, length=3)
    data = encode_instructions(split["train"], tok)
    run = finetune(model, data, FineTuneSchedule(steps=2, batch=4, lr=1e-3),
                   torch.Generator().manual_seed(0))
    tensors = len(list(model.parameters()))
    # fp32: one gradient and AdamW's two moments per element, plus a step counter per tensor
    assert training_state_bytes(model, run.optimizer) == {
        "gradients": 4 * n, "optimizer_state": 2 * 4 * n + 4 * tensors}
    lora = ours_llama()
    apply_lora(lora, LoraConfig(r=2, target_modules=["q_proj"]))
    share = parameter_share(lora)
    assert share.trainable == 2 * (2 * 30 + 30 * 2) and share.share < 0.02


def test_finetune_trains_only_what_requires_grad_and_learns():
    torch.manual_seed(0)
    tok = CharTokenizer()
    model = ours_llama(vocab_size=len(tok.chars) + 1)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "lm_head"]))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    split = instruction_split(64, 8, length=3, operations=["first"])
    data = encode_instructions(split["train"], tok)
    task = InstructionTask(data, split["eval"], tok)
    result = train_and_score("lora", model, task,
                             FineTuneSchedule(steps=30, batch=8, lr=3e-2, warmup=2), seed=0)
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert 0.0 <= result.accuracy <= 1.0 and result.trainable < result.total
    assert isinstance(result.step(), float)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        finetune(model.requires_grad_(False), data, FineTuneSchedule(1, 1, 1e-3),
                 torch.Generator())
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        FineTuneSchedule(steps=0, batch=1, lr=1e-3)


class Says(nn.Module):
    """A stub LM that continues any ``prompt_len``-token prompt with ``text``, end-of-text."""

    def __init__(self, tok, text, prompt_len):
        super().__init__()
        self.script = tok.encode(text) + [tok.eot_id]
        self.vocab, self.prompt_len = len(tok.chars) + 1, prompt_len

    def new_cache(self):
        return None

    def forward(self, ids, position_ids=None, cache=None, attention_mask=None):
        # the first new token is predicted at the prompt's last position
        step = min(int(position_ids[0, -1]) - (self.prompt_len - 1), len(self.script) - 1)
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, self.script[step]] = 1.0
        return logits


def test_exact_match_decodes_until_end_of_text():
    tok = CharTokenizer()
    examples = [Instruction("last: 1 7 ->", "7", "last"), Instruction("last: 3 4 ->", "4", "last"),
                Instruction("last: 3 7 ->", "7", "last")]
    n = len(examples[0].prompt)
    assert exact_match(Says(tok, " 7", n), tok, examples, max_new_tokens=4) == pytest.approx(2 / 3)
    assert exact_match(Says(tok, " 77", n), tok, examples, max_new_tokens=4) == 0.0
    assert exact_match(Says(tok, " 7", n), tok, examples, max_new_tokens=1) == 0.0  # cut short
    with pytest.raises(ValueError, match="examples must be non-empty"):
        exact_match(Says(tok, " 7", n), tok, [])
