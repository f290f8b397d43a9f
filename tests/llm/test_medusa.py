"""Medusa: heads and loss from the paper's equations, tree attention, acceptance, lossless decoding.

No production library ships Medusa (the authors' reference is a research repository, not a
package the atlas can pin), so the parity tests are written from the paper's equations
(arXiv:2401.10774 §2): the heads and Medusa-1 loss formula by formula, the tree-attention
forward against the plain causal forward of every root-to-node path, typical acceptance
against its threshold written out, and decoding against ``generate``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from chain_model import chain_batch, train_on_chains

from mlatlas.llm.generation import generate
from mlatlas.llm.llama import Llama, LlamaConfig
from mlatlas.llm.medusa import (
    DEFAULT_TREE,
    NOMINAL_ACCURACY,
    MedusaHeads,
    head_accuracy,
    medusa_generate,
    medusa_loss,
    sparse_tree,
)
from mlatlas.llm.speculative import (
    DraftTree,
    accept_greedy,
    accept_typical,
    commit_path,
    verify_tree,
)

ATOL = RTOL = 1e-5  # fp32 CPU

CFG = dict(vocab_size=37, hidden_size=30, intermediate_size=44, num_layers=2, num_heads=5,
           num_kv_heads=1, max_position_embeddings=96)
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0), (0, 0, 0, 0)]


def _model(seed: int = 0, **over) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**CFG, **over})).eval()


@pytest.fixture(scope="module")
def trained():
    """A model trained on :func:`chain_model.chain_batch` rows (peaked predictions)."""
    return train_on_chains(_model(seed=11))


def test_heads_follow_the_papers_equation_forward_and_backward():
    model = _model()
    heads = MedusaHeads.for_model(model, num_heads=3)
    # the paper's init: W_1 = 0 and W_2 = the LM head
    for head in heads.heads:
        assert torch.count_nonzero(head[0].linear.weight) == 0
        assert torch.equal(head[-1].weight, model.lm_head.weight)
        assert head[-1].weight.data_ptr() != model.lm_head.weight.data_ptr()  # a copy
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    h = torch.randn(2, 7, 30, requires_grad=True)
    out = heads(h)
    assert out.shape == (3, 2, 7, 37)
    # p^(k) = softmax(W_2^(k) (SiLU(W_1^(k) h + b_1^(k)) + h)), written out
    ref = torch.stack([F.linear(F.silu(F.linear(h, hd[0].linear.weight, hd[0].linear.bias)) + h,
                                hd[-1].weight) for hd in heads.heads])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [h, *heads.parameters()]
    got = torch.autograd.grad((out * cot).sum(), params)
    want = torch.autograd.grad((ref * cot).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_medusa1_loss_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(3, 2, 9, 37, generator=gen, requires_grad=True)
    y = torch.randint(0, 37, (2, 9), generator=gen)
    want = 0.0
    for k in range(1, 4):  # head k at t predicts y_{t+k+1}, weight 0.8^k
        logp = z[k - 1].log_softmax(-1)
        nll = [-logp[b, t, y[b, t + k + 1]] for b in range(2) for t in range(9 - k - 1)]
        want = want + 0.8 ** k * torch.stack(nll).mean()
    got = medusa_loss(z, y)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(torch.autograd.grad(got, z)[0], torch.autograd.grad(want, z)[0],
                               atol=ATOL, rtol=RTOL)
    acc = head_accuracy(z.detach(), y, top=2)
    top1 = z[0, :, :7].argmax(-1) == y[:, 2:]
    assert acc.shape == (3, 2) and acc[0, 0] == top1.float().mean()


def test_tree_buffers():
    tree = DraftTree([(1, 0), (0,), (1,), (0, 0, 0), (0, 0)])
    assert tree.paths == [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]
    assert tree.parent.tolist() == [-1, 0, 0, 1, 2, 3]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.rank.tolist() == [0, 0, 1, 0, 0, 0]
    assert tree.top_k() == [2, 1, 1]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 0, 1, 0, 0, 0],
                         [1, 1, 0, 1, 0, 0],
                         [1, 0, 1, 0, 1, 0],
                         [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(tree.mask, want)
    assert tree.truncate(1).paths == [(0,), (1,)] and tree.truncate(5) is tree
    assert DraftTree.chain(3).parent.tolist() == [-1, 0, 1, 2]


def test_tree_attention_equals_the_plain_forward_of_every_path():
    model = _model(seed=3)
    tree = DraftTree(TREE)
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 37, (1, 6), generator=gen)
    tokens = torch.randint(0, 37, (len(tree),), generator=gen)
    cache = model.new_cache()
    model(prefix, cache=cache)
    hidden, logits = verify_tree(model, cache, tokens, tree)
    assert cache.seq_len == 6 + len(tree)
    for i in range(len(tree)):  # node i = the last token of its root-to-node path
        path = tree.mask[i].nonzero()[:, 0]
        plain = model(torch.cat((prefix[0], tokens[path]))[None])
        torch.testing.assert_close(logits[i], plain[0, -1], atol=ATOL, rtol=RTOL)


def test_commit_path_leaves_the_cache_of_the_accepted_tokens():
    model = _model(seed=4)
    tree = DraftTree(TREE)
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 37, (1, 5), generator=gen)
    tokens = torch.randint(0, 37, (len(tree),), generator=gen)
    cache = model.new_cache()
    model(prefix, cache=cache)
    verify_tree(model, cache, tokens, tree)
    path = tree.mask[7].nonzero()[:, 0]  # root → (1,) → (1, 0) → (1, 0, 0): a side branch
    commit_path(cache, 5, path)
    fresh = model.new_cache()
    model(torch.cat((prefix[0], tokens[path]))[None], cache=fresh)
    assert cache.seq_len == fresh.seq_len == 9
    for a, b in zip(cache.keys + cache.values, fresh.keys + fresh.values, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def test_greedy_and_typical_acceptance():
    tree = DraftTree([(0,), (1,), (0, 0), (1, 0)])  # nodes: root, a, b, a→c, b→d
    tokens = torch.tensor([5, 1, 2, 3, 4])
    logits = torch.full((5, 8), -4.0)
    logits[0, 2] = 4.0  # after the root the target wants 2 (node b), not 1 (node a)
    logits[2, 4] = 4.0  # after b it wants 4 (node d)
    assert accept_greedy(tokens, logits, tree).tolist() == [0, 2, 4]
    logits[2, 4], logits[2, 6] = -4.0, 4.0
    assert accept_greedy(tokens, logits, tree).tolist() == [0, 2]
    # typical: accept x when p(x) > min(ε, δ exp(-H(p))), written out
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(5))
    eps, delta, tau = 0.2, 0.5, 0.8
    p = (z / tau).softmax(-1)
    thresh = torch.minimum(torch.tensor(eps), delta * torch.exp((p * p.log()).sum(-1)))
    ok = [True] + [bool(p[tree.parent[i], tokens[i]] > thresh[tree.parent[i]])
                   for i in range(1, 5)]
    path = accept_typical(tokens, z, tree, tau, eps, delta).tolist()
    assert all(ok[i] for i in path)
    reach = [i for i in range(5) if all(ok[j] for j in tree.mask[i].nonzero()[:, 0].tolist())]
    assert tree.depth[path[-1]] == max(int(tree.depth[i]) for i in reach)
    # everything typical (ε, δ tiny) → the deepest, most likely path
    z2 = torch.zeros(5, 8)
    z2[0, 2] = 1.0
    assert accept_typical(tokens, z2, tree, 1.0, 1e-6, 1e-6).tolist() == [0, 2, 4]


def test_sparse_tree_is_the_greedy_expected_acceptance_tree():
    acc = torch.tensor(NOMINAL_ACCURACY)
    assert tuple(sparse_tree(acc, 24).paths) == DEFAULT_TREE

    def expected(tree: DraftTree) -> float:  # Σ over nodes of Π a_k^(i_k) along the path
        return sum(float(torch.tensor([acc[k, i] for k, i in enumerate(p)]).prod())
                   for p in tree.paths)

    best = expected(sparse_tree(acc, 8))
    gen = torch.Generator().manual_seed(6)
    for _ in range(200):  # random prefix-closed trees of the same size never do better
        paths: set[tuple[int, ...]] = set()
        while len(paths) < 8:
            frontier = [(i,) for i in range(5)] + [p + (i,) for p in paths if len(p) < 4
                                                   for i in range(5)]
            paths.add(frontier[int(torch.randint(len(frontier), (1,), generator=gen))])
        assert expected(DraftTree(sorted(paths))) <= best + 1e-12


@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("prompt_len", [1, 7])
def test_lossless_on_random_model_and_untrained_heads(num_heads, prompt_len):
    model = _model(seed=num_heads + prompt_len)
    heads = MedusaHeads(model.config, num_heads)  # random W_2: acceptance low, output exact
    ids = torch.randint(0, 37, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    out = medusa_generate(model, heads, ids, 30)
    assert torch.equal(out.tokens, generate(model, ids, 30))
    assert out.new_tokens == 30 and out.forwards == 1 + len(out.accepted)


def test_heads_that_know_the_answer_on_a_side_branch(monkeypatch):
    """Heads rank the true token second: every accepted path leaves the first branch."""
    model = _model(seed=8)
    ids = torch.randint(0, 37, (1, 4), generator=torch.Generator().manual_seed(8))
    want = generate(model, ids, 33)[0]
    heads = MedusaHeads(model.config, 3)
    root = {"index": 4}  # position of the current root in ``want``: the cache length

    def oracle(hidden):
        z = torch.zeros(3, 37)
        for k in range(3):  # head k guesses the token k + 1 after the root
            j = root["index"] + k + 1
            true = int(want[j]) if j < want.numel() else 0
            z[k, true] = 1.0
            z[k, (true + 1) % 37] = 2.0  # a wrong token ranked first
        return z

    def commit(cache, past, path):
        commit_path(cache, past, path)
        root["index"] = cache.seq_len

    monkeypatch.setattr(heads, "forward", oracle)
    monkeypatch.setattr("mlatlas.llm.medusa.commit_path", commit)
    tree = [(0,), (1,), (1, 0), (1, 1), (1, 1, 0), (1, 1, 1)]
    out = medusa_generate(model, heads, ids, 33, tree=tree)
    assert torch.equal(out.tokens[0], want)
    assert out.accepted[:-1] == [3] * (len(out.accepted) - 1)
    assert out.forwards == 1 + 8  # prefill, then 4 tokens a step for 32 tokens


def test_typical_acceptance_is_seeded_and_valid():
    model = _model(seed=9)
    heads = MedusaHeads.for_model(model, 2)
    ids = torch.randint(0, 37, (1, 3), generator=torch.Generator().manual_seed(9))
    runs = [medusa_generate(model, heads, ids, 25, acceptance="typical", temperature=0.7,
                            generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert runs[0].new_tokens == 25


def test_lossless_on_trained_model_with_trained_heads(trained):
    torch.manual_seed(12)
    heads = MedusaHeads.for_model(trained, 3)
    opt = torch.optim.AdamW(heads.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(12)
    for _ in range(60):  # Medusa-1: base frozen
        x = chain_batch(gen)
        loss = medusa_loss(heads(trained.hidden_states(x)), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = chain_batch(torch.Generator().manual_seed(13), batch=1, length=5)
    untrained = medusa_generate(trained, MedusaHeads(trained.config, 3), ids, 40)
    out = medusa_generate(trained, heads.eval(), ids, 40, tree=TREE[:-1])
    want = generate(trained, ids, 40)
    assert torch.equal(out.tokens, want) and torch.equal(untrained.tokens, want)
    assert out.mean_accepted_length > 2.0


def test_bad_input():
    model = _model()
    heads = MedusaHeads(model.config, 2)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="tree depth 3 exceeds num_heads=2"):
        medusa_generate(model, heads, ids, 5, tree=[(0,), (0, 0), (0, 0, 0)])
    with pytest.raises(ValueError, match="top-40 candidates.*vocab_size=37"):
        medusa_generate(model, heads, ids, 5, tree=[(i,) for i in range(40)])
    with pytest.raises(ValueError, match="batch size 1.*got batch size 3"):
        medusa_generate(model, heads, torch.zeros(3, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="prompt length 95 \\+ max_new_tokens 5 exceeds"):
        medusa_generate(model, heads, torch.zeros(1, 95, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="acceptance must be 'greedy' or 'typical', got 'x'"):
        medusa_generate(model, heads, ids, 5, acceptance="x")
    with pytest.raises(ValueError, match="temperature > 0, epsilon in \\(0, 1\\)"):
        medusa_generate(model, heads, ids, 5, acceptance="typical", temperature=0.0)
    with pytest.raises(ValueError, match="needs its parent path \\(0,\\)"):
        DraftTree([(0, 1)])
    with pytest.raises(ValueError, match="paths must be non-empty tuples of ints >= 0"):
        DraftTree([(0,), (-1,)])
    with pytest.raises(ValueError, match="do not fit the model"):
        medusa_generate(_model(vocab_size=41), heads, ids, 5)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        MedusaHeads(model.config, 0)
    with pytest.raises(ValueError, match=r"hidden must be \[..., d=30\]"):
        heads(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="window length T=3 must exceed num_heads \\+ 1 = 3"):
        medusa_loss(torch.zeros(2, 1, 3, 37), torch.zeros(1, 3, dtype=torch.long))
