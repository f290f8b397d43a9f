"""Feature columns vs tf.compat.v1.feature_column.input_layer: outputs, gradients, hashing."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import mlatlas.features.feature_columns as F
from mlatlas.features.example import FixedLenFeature, VarLenFeature
from mlatlas.features.fingerprint import cross_hash, fingerprint64, hash_bucket

ATOL = RTOL = 1e-6  # fp32; embedding means/sqrtn divide after summing, as TF does


@pytest.fixture(scope="module")
def tf():
    """TensorFlow, imported once per module (a missing TF fails under CI, see conftest)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


WORDS = ["apple", "banana", "cherry", "dátil", "", "fig", "🍋"]


def _raw(seed: int = 0, n: int = 7) -> dict:
    """A batch of n = 7 examples: ragged text/int lists (with empty rows), dense numbers."""
    rng = np.random.default_rng(seed)
    words = [[WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(0, 4))]
             for _ in range(n)]
    words[2] = []
    ints = [[int(v) for v in rng.integers(0, 9, rng.integers(0, 3))] for _ in range(n)]
    ints[0] = [4, 4, 1]  # duplicates count twice
    age = rng.normal(40, 12, (n, 1)).astype(np.float32)
    age[1, 0], age[3, 0] = 30.0, 52.5  # exactly on a boundary: goes to the upper bucket
    return {"s": words, "i": ints, "age": age,
            "xy": rng.normal(size=(n, 2, 3)).astype(np.float32),
            "pair": rng.normal(size=(n, 2)).astype(np.float32),
            "n": rng.integers(-3, 60, (n, 1)).astype(np.int64)}


def _tf_features(tf, raw: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, list):  # ragged → SparseTensor, as parse_example's VarLen
            text = any(isinstance(v, str) for row in value for v in row)
            idx = [[b, j] for b, row in enumerate(value) for j in range(len(row))]
            vals = [v for row in value for v in row]
            width = max([len(r) for r in value] + [1])
            out[key] = tf.sparse.SparseTensor(
                np.array(idx, np.int64).reshape(-1, 2),
                tf.constant(vals, dtype=tf.string if text else tf.int64), [len(value), width])
        else:
            out[key] = tf.constant(value)
    return out


def _columns(m, tf, vocab_file: str) -> dict[str, list]:
    """The same column sets built with ``tf.feature_column`` (m) or ours."""
    ours = m is F
    dtype = "int64" if ours else tf.int64

    def emb(cat, dim, combiner, max_norm=None):
        return m.embedding_column(cat, dim, combiner, max_norm=max_norm)

    age = m.numeric_column("age", normalizer_fn=lambda x: (x - 40.0) / 12.0)
    raw_age = m.numeric_column("age")
    n = m.numeric_column("n", dtype=dtype)
    xy = m.numeric_column("xy", shape=(2, 3), default_value=0.0)
    pair = m.numeric_column("pair", shape=(2,))
    bucket = m.bucketized_column(raw_age, [18.0, 30.0, 41.5, 52.5, 65.0])
    pair_b = m.bucketized_column(pair, [-1.0, 0.0, 0.7])
    vocab = m.categorical_column_with_vocabulary_list("s", ["apple", "banana", "cherry", "🍋"],
                                                      num_oov_buckets=3)
    vocab_default = m.categorical_column_with_vocabulary_list("i", [4, 1, 7], default_value=0)
    vfile = m.categorical_column_with_vocabulary_file("s", vocab_file, num_oov_buckets=2)
    hashed = m.categorical_column_with_hash_bucket("s", 11)
    hashed_int = m.categorical_column_with_hash_bucket("i", 5, dtype=dtype)
    ident = m.categorical_column_with_identity("i", 9)
    ident_def = m.categorical_column_with_identity("i", 6, default_value=5)
    cross = m.crossed_column(["s", bucket], 13)
    cross_ids = m.crossed_column([vocab, ident], 17, hash_key=12345)
    nested = m.crossed_column([m.crossed_column(["s", "i"], 23), pair_b], 29)
    return {
        "numeric": [age, n, xy],
        "bucketized": [bucket, pair_b],
        "identity": [m.indicator_column(ident), emb(ident_def, 3, "sum")],
        "vocabulary_list": [m.indicator_column(vocab), emb(vocab, 4, "mean"),
                            m.indicator_column(vocab_default)],
        "vocabulary_file": [m.indicator_column(vfile), emb(vfile, 2, "sqrtn")],
        "hash_bucket": [m.indicator_column(hashed), emb(hashed_int, 3, "mean", max_norm=0.5)],
        "crossed": [m.indicator_column(cross), m.indicator_column(cross_ids),
                    m.indicator_column(nested), emb(nested, 3, "sqrtn")],
        "bucketized_categorical": [m.indicator_column(pair_b), emb(bucket, 2, "sum")],
        "all": [age, xy, bucket, m.indicator_column(vocab), emb(ident, 3, "mean"),
                m.indicator_column(cross), emb(hashed, 2, "sqrtn")],
    }


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("fig\ncherry\ndátil\napple \napple\n", encoding="utf-8")  # "apple " ≠ "apple"
    return str(path)


def _tf_run(tf, cols, feats, weights_out):
    """input_layer forward + gradients of sum(out * R) w.r.t. embeddings and numeric inputs."""
    with tf.GradientTape(persistent=True) as tape:
        for key in ("age", "xy"):
            tape.watch(feats[key])
        out = tf.compat.v1.feature_column.input_layer(feats, cols)
        r = tf.constant(np.random.default_rng(1).normal(size=out.shape).astype(np.float32))
        loss = tf.reduce_sum(out * r)
    variables = tape.watched_variables()
    grads = tape.gradient(loss, list(variables) + [feats["age"], feats["xy"]])
    names = [re.sub(r"^input_layer(_\d+)?/", "", v.name) for v in variables]
    weights_out.update({n: v.numpy() for n, v in zip(names, variables)})
    emb_grads = {n: tf.convert_to_tensor(g).numpy() for n, g in zip(names, grads)}
    return out.numpy(), r.numpy(), emb_grads, [None if g is None else g.numpy()
                                               for g in grads[len(variables):]]


CASES = ["numeric", "bucketized", "identity", "vocabulary_list", "vocabulary_file",
         "hash_bucket", "crossed", "bucketized_categorical", "all"]


@pytest.mark.parametrize("case", CASES)
def test_matches_tf_input_layer(tf, vocab_file, case):
    raw = _raw()
    tf.random.set_seed(0)
    tf_cols = _columns(tf.feature_column, tf, vocab_file)[case]
    weights: dict = {}
    feats_tf = _tf_features(tf, raw)
    out_tf, r, grads_tf, input_grads_tf = _tf_run(tf, tf_cols, feats_tf, weights)

    torch.manual_seed(0)
    layer = F.FeatureLayer(_columns(F, tf, vocab_file)[case])
    assert [c.name for c in layer.columns] == sorted(c.name for c in tf_cols)
    # Copy TF's (random) embedding tables by an explicit key map.
    key_map = {f"embeddings.{c.name}": f"{c.name}/embedding_weights:0"
               for c in layer.columns if isinstance(c, F.EmbeddingColumn)}
    assert set(key_map) == set(layer.state_dict()), "unexpected/missing parameters"
    assert set(key_map.values()) == set(weights), "TF variables not mapped"
    layer.load_state_dict({k: torch.from_numpy(weights[v]) for k, v in key_map.items()},
                          strict=True)

    ours_in = {k: torch.tensor(v, requires_grad=k in ("age", "xy"))
               if isinstance(v, np.ndarray) else v for k, v in raw.items()}
    out = layer(ours_in)
    torch.testing.assert_close(out, torch.from_numpy(out_tf), atol=ATOL, rtol=RTOL)
    assert layer.output_dim == out_tf.shape[1]

    if not out.requires_grad:  # no parameter and no differentiable input in this case
        assert not key_map and all(g is None for g in input_grads_tf)
        return
    (out * torch.from_numpy(r)).sum().backward()
    for ours_key, tf_key in key_map.items():
        torch.testing.assert_close(layer.get_parameter(ours_key).grad,
                                   torch.from_numpy(grads_tf[tf_key]), atol=ATOL, rtol=RTOL)
    for key, g_tf in zip(("age", "xy"), input_grads_tf):
        g = ours_in[key].grad
        if g_tf is None:  # the feature is unused or used only through a bucketizer
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, torch.from_numpy(g_tf), atol=ATOL, rtol=RTOL)


def test_dense_inputs_with_missing_markers(tf):
    """Dense [B, k] input: '' and -1 cells are missing for categorical columns (TF's rule),
    but a raw key of a cross uses every cell, as sparse_cross does."""
    s = np.array([["apple", ""], ["", ""], ["fig", "apple"]])
    i = np.array([[3, -1], [-1, -1], [0, 8]], np.int64)

    def cols(m):
        v = m.categorical_column_with_vocabulary_list("s", ["apple", "fig"])
        ident = m.categorical_column_with_identity("i", 9)
        return [m.indicator_column(v), m.indicator_column(ident),
                m.indicator_column(m.crossed_column(["s", "i"], 7)),
                m.embedding_column(ident, 2, "mean", initializer=None)]

    feats = {"s": s, "i": i}
    tf.random.set_seed(1)
    with tf.GradientTape() as tape:
        out_tf = tf.compat.v1.feature_column.input_layer(
            {k: tf.constant(v) for k, v in feats.items()}, cols(tf.feature_column))
        r = tf.constant(np.random.default_rng(3).normal(size=out_tf.shape).astype(np.float32))
        loss = tf.reduce_sum(out_tf * r)
    (w,) = tape.watched_variables()
    g_tf = tf.convert_to_tensor(tape.gradient(loss, w)).numpy()
    layer = F.FeatureLayer(cols(F))
    # explicit key map: ours -> TF variable
    assert re.sub(r"^input_layer(_\d+)?/", "", w.name) == "i_embedding/embedding_weights:0"
    layer.load_state_dict({"embeddings.i_embedding": torch.from_numpy(w.numpy())}, strict=True)
    out = layer(feats)
    torch.testing.assert_close(out, torch.from_numpy(out_tf.numpy()), atol=ATOL, rtol=RTOL)
    # backward: example 1 has no id left (-1 cells dropped) and gets no gradient, as in TF
    (out * torch.from_numpy(r.numpy())).sum().backward()
    torch.testing.assert_close(layer.embeddings["i_embedding"].grad, torch.from_numpy(g_tf),
                               atol=ATOL, rtol=RTOL)
    # features no column uses are ignored
    torch.testing.assert_close(layer(feats | {"unused": torch.zeros(0)}), out.detach(),
                               atol=0, rtol=0)


def test_int_vocabulary_oov_buckets_and_bucket_edges_match_tf(tf):
    """Not in CASES: int ids hashed into OOV buckets (as their decimal text), crossed; and
    bucketize on +-inf, NaN and values exactly on a boundary."""
    ints = [[4, 100, -7], [], [1, 7, 123456789012], [2**40], [7]]
    j = [["a"], ["b", "c"], [], ["d"], ["a", "a"]]
    x = np.array([[np.inf], [-np.inf], [2.5], [-1.0], [np.nan]], np.float32)

    def cols(m, dtype):
        v = m.categorical_column_with_vocabulary_list("i", [4, 1, 7], dtype=dtype,
                                                      num_oov_buckets=5)
        return [m.indicator_column(v), m.indicator_column(m.crossed_column([v, "j"], 11)),
                m.bucketized_column(m.numeric_column("x"), [-1.0, 0.0, 2.5])]

    def sparse(rows, dtype):
        idx = np.array([[b, k] for b, r in enumerate(rows) for k in range(len(r))], np.int64)
        return tf.sparse.SparseTensor(idx, tf.constant([v for r in rows for v in r], dtype),
                                      [len(rows), max(len(r) for r in rows)])

    out_tf = tf.compat.v1.feature_column.input_layer(
        {"i": sparse(ints, tf.int64), "j": sparse(j, tf.string), "x": tf.constant(x)},
        cols(tf.feature_column, tf.int64))
    out = F.FeatureLayer(cols(F, "int64"))({"i": ints, "j": j, "x": x})
    assert out.shape == (5, 8 + 11 + 4)
    torch.testing.assert_close(out, torch.from_numpy(out_tf.numpy()), atol=0, rtol=0)


def test_fingerprint64_matches_tf(tf):
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 -_\t\n") + ["é", "ß", "中", "文", "🍋", "\x00", "ÿ"]
    strings = ["", " ", "a", "\x00", "🍋" * 40, "x" * 1000]
    for _ in range(1200):
        length = int(rng.choice([rng.integers(0, 8), rng.integers(8, 70), rng.integers(70, 300)]))
        strings.append("".join(rng.choice(alphabet, length)))
    big = 2**63 - 1  # to_hash_bucket_fast takes an int64 bucket count: fp mod (2**63 - 1)
    theirs = tf.strings.to_hash_bucket_fast(strings, big).numpy()
    ours = fingerprint64(strings)
    np.testing.assert_array_equal((ours % np.uint64(big)).astype(np.int64), theirs)
    for n in (1, 2, 7, 1000003):
        np.testing.assert_array_equal(hash_bucket(strings, n),
                                      tf.strings.to_hash_bucket_fast(strings, n).numpy())
    # single-feature crosses expose all 64 bits of fp through FingerprintCat64
    sp = tf.sparse.SparseTensor([[0, j] for j in range(200)], strings[:200], [1, 200])
    np.testing.assert_array_equal(cross_hash([fingerprint64(strings[:200])], 0),
                                  tf.sparse.cross_hashed([sp], num_buckets=0).values.numpy())


def test_cross_hash_matches_sparse_cross_hashed(tf):
    rng = np.random.default_rng(2)
    a = ["".join(rng.choice(list("pqrsé🍋"), rng.integers(0, 6))) for _ in range(5)]
    b = rng.integers(-(2**62), 2**62, 4).tolist() + [-1, 0]
    c = ["z", "ü"]
    sa, sb, sc = (tf.sparse.SparseTensor([[0, j] for j in range(len(x))], x, [1, len(x)])
                  for x in (a, b, c))
    for buckets, key in [(0, None), (97, None), (2**40, 7), (5, 2**63 - 1)]:
        theirs = tf.sparse.cross_hashed([sa, sb, sc], num_buckets=buckets, hash_key=key)
        grid = np.array(np.meshgrid(np.arange(5), np.arange(6), np.arange(2), indexing="ij"))
        ia, ib, ic = (g.ravel() for g in grid)  # first feature outermost, last fastest
        parts = [fingerprint64([a[k] for k in ia]),
                 np.array(b, np.int64).view(np.uint64)[ib], fingerprint64([c[k] for k in ic])]
        ours = cross_hash(parts, buckets, key if key is not None else 0xDECAFCAFFE)
        np.testing.assert_array_equal(ours, theirs.values.numpy())


def test_parse_schema_matches_tf(tf, vocab_file):
    tf_spec = tf.feature_column.make_parse_example_spec(
        _columns(tf.feature_column, tf, vocab_file)["all"])
    ours = F.make_parse_schema(_columns(F, tf, vocab_file)["all"])
    assert set(ours) == set(tf_spec)
    names = {tf.string: "bytes", tf.int64: "int64", tf.float32: "float32"}
    for key, spec in tf_spec.items():
        if isinstance(spec, tf.io.FixedLenFeature):
            assert ours[key] == FixedLenFeature(tuple(spec.shape), names[spec.dtype],
                                                spec.default_value)
        else:
            assert ours[key] == VarLenFeature(names[spec.dtype])


def test_missing_values_in_lists_and_defaults():
    layer = F.FeatureLayer([F.numeric_column("x", shape=(2,), default_value=[7.0, -1.0]),
                            F.indicator_column(F.categorical_column_with_identity("k", 3))])
    out = layer({"x": [[1.0, 2.0], None, np.array([3.0, 4.0])], "k": [None, [2], 1]})
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 1, 7, -1], [0, 1, 0, 3, 4]],
                            dtype=torch.float32)
    torch.testing.assert_close(out, expected)
    prepared = layer.prepare({"x": np.ones((3, 2), np.float32), "k": [[0, 0], [], [1]]})
    torch.testing.assert_close(layer(prepared)[:, :3], torch.tensor(
        [[2.0, 0, 0], [0, 0, 0], [0, 1, 0]]))


def test_bad_input_names_the_column(tmp_path):
    age = F.numeric_column("age")
    words = F.categorical_column_with_vocabulary_list("word", ["a", "b"])
    layer = F.FeatureLayer([age, F.indicator_column(words)])
    good = {"age": np.ones((2, 1), np.float32), "word": [["a"], ["b"]]}
    with pytest.raises(ValueError, match="column 'word'.*needs feature 'word'"):
        layer({"age": good["age"], "wrod": good["word"]})
    with pytest.raises(TypeError, match="column 'word': expected str input, got int"):
        layer({**good, "word": [[1], [2]]})
    with pytest.raises(TypeError, match="column 'age': expected numbers"):
        layer({**good, "age": np.array([["x"], ["y"]])})
    with pytest.raises(TypeError, match="column 'k': expected int input, got float"):
        F.FeatureLayer([F.indicator_column(F.categorical_column_with_identity("k", 3))])(
            {"k": np.array([[0.5]])})
    with pytest.raises(ValueError, match="column 'k': id 4 outside"):
        F.FeatureLayer([F.indicator_column(F.categorical_column_with_identity("k", 3))])(
            {"k": [[4]]})
    with pytest.raises(ValueError, match="column 'age': example 1 is missing"):
        layer({**good, "age": [[1.0], None]})
    with pytest.raises(FileNotFoundError, match="column 'city': vocabulary_file"):
        F.categorical_column_with_vocabulary_file("city", tmp_path / "none.txt")
    with pytest.raises(ValueError, match="column 'age_bucketized': boundaries must be"):
        F.bucketized_column(age, [1.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="column 'h': hash_bucket_size must be >= 1, got -4"):
        F.categorical_column_with_hash_bucket("h", -4)
    with pytest.raises(ValueError, match="column 'a_X_b': hash_bucket_size"):
        F.crossed_column(["a", "b"], 0)
    with pytest.raises(TypeError, match="non-hashed"):
        F.crossed_column(["a", F.categorical_column_with_hash_bucket("h", 3)], 10)
    with pytest.raises(TypeError, match="column 'word'.*wrap a categorical column"):
        F.FeatureLayer([words])
    with pytest.raises(ValueError, match="duplicate column names"):
        F.FeatureLayer([age, F.numeric_column("age")])
    with pytest.raises(ValueError, match="column 'word': vocabulary_list has duplicate"):
        F.categorical_column_with_vocabulary_list("word", ["a", "a"])
    with pytest.raises(ValueError, match="combiner must be"):
        F.embedding_column(words, 2, combiner="max")
    with pytest.raises(ValueError, match="column 'x': shape must be positive"):
        F.numeric_column("x", shape=(0,))
