"""Hallucination: DoLa against the paper's equations (the pinned transformers ships none),
early exits against a layer-by-layer forward, JSD against scipy, AUROC against scikit-learn,
SelfCheck, FActScore decomposition and precision, a contradictory fact base, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlatlas.datasets.corpus import sample_windows
from mlatlas.datasets.facts import RELATIONS, FactTokenizer, make_fact_world
from mlatlas.llm.dola import dola_generate, dola_logits, early_exit_logits, js_divergence
from mlatlas.llm.hallucination import (
    Fact,
    FactBase,
    auroc,
    decompose,
    fact_precision,
    selfcheck_score,
)
from mlatlas.llm.llama import AttentionMask, Llama, LlamaConfig
from mlatlas.nn.rope import rope_cos_sin

ATOL = RTOL = 1e-5
TEMPLATES = {r: phrase for r, (phrase, _) in RELATIONS.items()}


def test_pinned_transformers_routes_dola_to_the_hub(reference):
    """What we checked: ``generate(dola_layers=...)`` is DoLa mode, but its implementation is a
    Hub ``custom_generate`` repo (not installable offline) — hence parity with the paper."""
    tf = reference("transformers")
    from transformers.generation.utils import GENERATION_MODES_MAPPING

    mode = tf.GenerationConfig(dola_layers="high").get_generation_mode()
    assert mode.name == "DOLA_GENERATION"
    assert GENERATION_MODES_MAPPING[mode] == "transformers-community/dola"


def _paper_dola(final: np.ndarray, prem: np.ndarray, alpha: float) -> tuple[np.ndarray, list]:
    """Chuang et al. 2024, eqs. (2)-(4), row by row in float64."""
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def kl(p, q):
        return float(np.sum(p * np.log(p / q)))

    out, picks = np.empty_like(final), []
    for b in range(final.shape[0]):
        qn = softmax(final[b])
        jsd = []
        for j in range(prem.shape[0]):
            qj = softmax(prem[j, b])
            a = 0.5 * (qn + qj)
            jsd.append(0.5 * kl(qn, a) + 0.5 * kl(qj, a))
        m = int(np.argmax(jsd))
        picks.append(m)
        qm = softmax(prem[m, b])
        head = qn >= alpha * qn.max()
        out[b] = np.where(head, np.log(qn) - np.log(qm), -np.inf)
    return out, picks


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dola_logits_match_paper_equations(alpha):
    gen = torch.Generator().manual_seed(0)
    final = torch.randn(5, 29, generator=gen) * 2
    prem = torch.randn(3, 5, 29, generator=gen) * 2
    layers = [0, 2, 4]
    step = dola_logits(final, prem, layers, alpha)
    ref, picks = _paper_dola(final.double().numpy(), prem.double().numpy(), alpha)
    assert step.premature.tolist() == [layers[m] for m in picks]
    finite = np.isfinite(ref)
    assert torch.equal(torch.isfinite(step.scores), torch.from_numpy(finite))
    torch.testing.assert_close(step.scores[torch.from_numpy(finite)],
                               torch.from_numpy(ref[finite]).float(), atol=ATOL, rtol=RTOL)
    if alpha == 1.0:  # only the final layer's argmax survives
        assert (torch.isfinite(step.scores).sum(-1) == 1).all()


def test_js_divergence_matches_scipy(reference):
    spd = reference("scipy.spatial.distance")
    gen = torch.Generator().manual_seed(1)
    p, q = torch.randn(4, 13, generator=gen), torch.randn(4, 13, generator=gen)
    ours = js_divergence(p, q)
    ref = [spd.jensenshannon(a.softmax(-1).double().numpy(), b.softmax(-1).double().numpy())
           ** 2 for a, b in zip(p, q)]  # scipy returns the distance √JSD (natural log)
    torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float32), atol=ATOL,
                               rtol=RTOL)
    assert js_divergence(p, p).abs().max() < 1e-6
    assert js_divergence(p, q).max() <= math.log(2) + 1e-6


def _llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=31, hidden_size=24, intermediate_size=40, num_layers=3,
                             num_heads=3, num_kv_heads=1, max_position_embeddings=64)).eval()


def test_early_exits_equal_a_layer_by_layer_forward():
    model = _llama()
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(2))
    final, early = early_exit_logits(model, ids, [0, 1, 2])
    with torch.no_grad():
        x = model.embed_tokens(ids)
        manual = [model.lm_head(model.norm(x))[:, -1]]
        cos, sin = rope_cos_sin(torch.arange(7)[None], model.inv_freq)
        for layer in model.layers:
            x = layer(x, cos, sin, AttentionMask())
            manual.append(model.lm_head(model.norm(x))[:, -1])
    torch.testing.assert_close(early, torch.stack(manual[:3]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(final, manual[3], atol=ATOL, rtol=RTOL)
    raw = early_exit_logits(model, ids, [1], norm_premature=False)[1]
    assert not torch.allclose(raw, early[1:2])


def test_dola_generate_takes_the_contrast_argmax_and_stops_at_eos():
    model = _llama(3)
    ids = torch.randint(0, 31, (3, 5), generator=torch.Generator().manual_seed(4))
    out = dola_generate(model, ids, 4, [0, 1])
    final, early = early_exit_logits(model, ids, [0, 1])
    assert torch.equal(out[:, 5], dola_logits(final, early, [0, 1]).scores.argmax(-1))
    first = int(out[0, 5])
    stopped = dola_generate(model, ids[:1], 4, [0, 1], eos_token_id=first)
    assert stopped.shape == (1, 6)
    penal = dola_generate(model, ids, 4, [0, 1], repetition_penalty=1.3)
    assert penal.shape == out.shape


def test_auroc_matches_scikit_learn_with_ties(reference):
    metrics = reference("sklearn.metrics")
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 57)
    s = np.round(rng.normal(size=57) + y, 1)  # rounded: many ties
    assert auroc(s, y) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)
    assert auroc([0.1, 0.9], [0, 1]) == 1.0 and auroc([0.5, 0.5], [0, 1]) == 0.5


def test_selfcheck_score():
    answer = torch.tensor([3, 4])
    samples = torch.tensor([[3, 3, 3, 3], [4, 1, 2, 1]])
    torch.testing.assert_close(selfcheck_score(answer, samples), torch.tensor([0.0, 0.75]))
    with pytest.raises(ValueError, match="samples must be"):
        selfcheck_score(answer, samples[0])


def test_decompose_and_fact_precision():
    base = FactBase.from_facts([Fact("karan", "lives_in", "rome"),
                                Fact("karan", "likes", "tea")], TEMPLATES)
    text = "karan lives in rome . karan likes figs . gibberish here . lotek works as poet ."
    assert decompose(text, TEMPLATES) == [Fact("karan", "lives_in", "rome"),
                                          Fact("karan", "likes", "figs"),
                                          Fact("lotek", "works_as", "poet")]
    score = fact_precision([text, "nothing at all", "karan likes tea ."], base)
    assert score.facts == 4 and score.supported == 2
    assert score.precision == pytest.approx((1 / 3 + 1) / 2)
    assert score.answer_rate == pytest.approx(2 / 3)
    assert [f.value for f in base.retrieve("tell me about karan")] == ["tea", "rome"]
    assert base.retrieve("who is lotek") == []


def test_contradictory_fact_base_is_reported_not_crashed():
    base = FactBase.from_facts([Fact("karan", "lives_in", "rome"),
                                Fact("karan", "lives_in", "oslo"),
                                Fact("karan", "lives_in", "rome"),
                                Fact("karan", "likes", "tea")], TEMPLATES)
    assert base.contradictions == {("karan", "lives_in"): ("oslo", "rome")}
    assert not base.supports(Fact("karan", "lives_in", "rome"))  # contested: unsupported
    assert base.supports(Fact("karan", "likes", "tea"))
    assert base.retrieve("karan") == [Fact("karan", "likes", "tea")]
    assert "karan" in base


def test_fact_world_and_tokenizer():
    world = make_fact_world(5, 3, 2, seed=1)
    assert len(world.facts) == 8 and not set(world.unknown) & set(world.facts)
    tok = world.tokenizer
    stream = world.training_stream(2, 3, seed=0)
    assert stream.count(tok.eos_id) == 5 * 2 + 3
    text = tok.decode(stream[1:stream.index(tok.eos_id, 1)])
    assert tok.encode(text) == stream[1:stream.index(tok.eos_id, 1)]


def test_training_windows_start_at_documents():
    """The fact LM's windows start at an <eos>, so a reading exercise (33 tokens) always sits in
    one 40-token window with its context; windows drawn from a given start list only."""
    world = make_fact_world(5, 3, 2, seed=1)
    tok = world.tokenizer
    stream = torch.tensor(world.training_stream(4, 30, seed=0))
    starts = (stream == tok.eos_id).nonzero().flatten()
    starts = starts[starts < stream.numel() - 40]
    x, y = sample_windows(stream, 64, 40, torch.Generator().manual_seed(0), starts)
    assert (x[:, 0] == tok.eos_id).all() and torch.equal(x[:, 1:], y[:, :-1])
    context, answer = tok.encode("context")[0], tok.encode("answer")[0]
    for row in x.tolist():
        if row[1] == context:  # a whole exercise: context, answer and its three values
            assert answer in row and row.index(tok.eos_id, 1) == 33
    with pytest.raises(ValueError, match="starts must be a non-empty 1-D int64 tensor in "
                                         "\\[0, 10\\) \\(len\\(tokens\\) - seq_len\\), got "
                                         "torch.int64 \\(1,\\) in \\[10, 10\\]"):
        sample_windows(torch.arange(12), 2, 2, torch.Generator(), torch.tensor([10]))
    with pytest.raises(ValueError, match="starts must be a non-empty"):
        sample_windows(torch.arange(12), 2, 2, torch.Generator(), torch.tensor([], dtype=torch.long))


def test_bad_input():
    with pytest.raises(ValueError, match="labels must hold both classes, got 2 positives"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="same length"):
        auroc([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auroc([0.1, 0.2], [2, 0])
    with pytest.raises(ValueError, match="relative_top must lie in"):
        dola_logits(torch.zeros(1, 4), torch.zeros(1, 1, 4), [0], relative_top=0.0)
    with pytest.raises(ValueError, match="premature must be"):
        dola_logits(torch.zeros(1, 4), torch.zeros(2, 1, 4), [0])
    with pytest.raises(ValueError, match="layers must be a non-empty list in \\[0, 3\\)"):
        early_exit_logits(_llama(), torch.zeros(1, 2, dtype=torch.long), [3])
    with pytest.raises(ValueError, match="no template"):
        FactBase.from_facts([Fact("a", "eats", "b")], TEMPLATES)
    with pytest.raises(TypeError, match="Fact items"):
        FactBase.from_facts([("a", "likes", "b")], TEMPLATES)
    with pytest.raises(ValueError, match="outside the vocabulary: 'zzz'"):
        FactTokenizer().encode("karan zzz")
    with pytest.raises(ValueError, match="sum to <= 144"):
        make_fact_world(100, 40, 10)
    with pytest.raises(ValueError, match="generations must not be empty"):
        fact_precision([], FactBase.from_facts([], TEMPLATES))
