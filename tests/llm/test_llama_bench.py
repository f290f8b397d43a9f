"""bench() of the llama experiment at tiny sizes: it runs, copies the weights exactly and makes
its three claims (no timing is asserted: speed is reported by ``mlatlas bench llama``)."""

from __future__ import annotations

from mlatlas.experiments.llm.llama import BENCH_TARGET, Config, bench


def test_bench_runs_at_tiny_sizes(reference, tmp_path):
    reference("transformers")
    rep = bench(Config.smoke(), tmp_path)  # a 2-layer, 24-wide model; one timing round
    assert rep.metrics["max |logits ours - transformers|"] < 1e-5  # the same weights
    assert len(rep.claims) == 3
    for claim in rep.claims:
        assert claim.measured is not None and claim.measured > 0
        assert claim.target == BENCH_TARGET and claim.op == "<="
        assert "ours / transformers LlamaForCausalLM time" in claim.name
