"""A training checkpoint of the llama experiment resumes to the uninterrupted run's end state."""

from __future__ import annotations

import torch

from mlatlas.datasets.corpus import load_corpus
from mlatlas.experiments.llm import llama as exp
from mlatlas.training_state import save_checkpoint


def _history() -> dict[str, list[float]]:
    return {"train_step": [], "train_loss": [], "val_step": [], "val_loss": []}


def test_resume_from_checkpoint_is_bit_exact(tmp_path):
    corpus = load_corpus("bytes")
    cfg = exp.Config(hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                     num_kv_heads=2, seq_len=16, batch=4, steps=6, warmup=2, eval_every=3,
                     eval_windows=2)
    V = corpus.tokenizer.vocab_size

    model, opt, gen = exp.build(cfg, V)
    straight = _history()
    exp.train(cfg, model, opt, gen, corpus, 0, cfg.steps, straight)

    first, opt1, gen1 = exp.build(cfg, V)
    interrupted = _history()
    exp.train(cfg, first, opt1, gen1, corpus, 0, 3, interrupted)
    path = save_checkpoint(tmp_path / "ckpt.safetensors", first, opt1, step=3,
                           generators={"data": gen1}, extra={"history": interrupted})
    del first, opt1, gen1
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG's state
    resumed, opt2, gen2, step, history = exp.resume(cfg, path, corpus)
    assert step == 3 and history == interrupted
    exp.train(cfg, resumed, opt2, gen2, corpus, step, cfg.steps, history)

    assert history == straight  # same losses at every step, same validation numbers
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        sa, sb = opt.state[p], opt2.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == cfg.steps
    assert torch.equal(gen.get_state(), gen2.get_state())


def test_lr_schedule():
    cfg = exp.Config(lr=1e-3, warmup=10, steps=110)
    assert exp.lr_at(cfg, 0) == 1e-4
    assert exp.lr_at(cfg, 9) == 1e-3
    assert abs(exp.lr_at(cfg, 60) - 0.55e-3) < 1e-12  # half-way down the cosine
    assert abs(exp.lr_at(cfg, 110) - 1e-4) < 1e-12
