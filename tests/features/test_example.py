"""tf.train.Example / SequenceExample: our bytes parse in TF, TF's parse in ours; schema."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mlatlas.features import proto
from mlatlas.features.example import (
    ExampleDecodeError,
    FixedLenFeature,
    VarLenFeature,
    decode_example,
    decode_sequence_example,
    encode_example,
    encode_sequence_example,
)


@pytest.fixture(scope="module")
def tf():
    """TensorFlow, imported once per module (a missing TF fails under CI, see conftest)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _features(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "age": np.array([37], np.int64),
        "big": np.array([2**62, -(2**63), 0, -1], np.int64),
        "pixels": rng.normal(size=(3, 5)).astype(np.float32),
        "weights": torch.linspace(-1, 1, 7),
        "words": ["héllo", b"\x00\xff", ""],
        "label": 1,
        "score": 0.25,
        "name": "ünïcødé ✓",
        "flags": np.array([True, False, True]),
        "none": np.zeros(0, np.int64),
    }


SCHEMA = {
    "age": FixedLenFeature((), "int64"),
    "big": VarLenFeature("int64"),
    "pixels": FixedLenFeature((3, 5), "float32"),
    "weights": VarLenFeature("float32"),
    "words": VarLenFeature("bytes"),
    "name": FixedLenFeature((), "bytes"),
    "flags": FixedLenFeature((3,), "int64"),
    "none": VarLenFeature("int64"),
    "missing": FixedLenFeature((2,), "float32", default_value=[1.5, -2.0]),
}


def test_roundtrip_numpy_and_torch():
    feats = _features()
    data = encode_example(feats)
    got = decode_example(data, SCHEMA)
    assert got["age"].shape == () and got["age"] == 37
    np.testing.assert_array_equal(got["big"], feats["big"])
    np.testing.assert_array_equal(got["pixels"], feats["pixels"])
    np.testing.assert_array_equal(got["weights"], feats["weights"].numpy())
    assert list(got["words"]) == ["héllo".encode(), b"\x00\xff", b""]
    assert got["name"] == "ünïcødé ✓".encode()
    np.testing.assert_array_equal(got["flags"], [1, 0, 1])
    assert got["none"].dtype == np.int64 and got["none"].size == 0
    np.testing.assert_array_equal(got["missing"], np.array([1.5, -2.0], np.float32))
    loose = decode_example(data)  # no schema: everything, flat
    assert set(loose) == set(feats) and loose["pixels"].shape == (15,)
    as_torch = decode_example(data, SCHEMA, backend="torch")
    assert isinstance(as_torch["pixels"], torch.Tensor) and as_torch["pixels"].shape == (3, 5)
    assert as_torch["pixels"].dtype == torch.float32
    assert encode_example(feats) == data  # deterministic bytes


def test_our_bytes_parse_in_tf(tf):
    feats = _features(1)
    data = encode_example(feats)
    msg = tf.train.Example.FromString(data)
    f = msg.features.feature
    assert list(f["big"].int64_list.value) == feats["big"].tolist()
    np.testing.assert_array_equal(np.array(f["pixels"].float_list.value, np.float32),
                                  feats["pixels"].ravel())
    assert list(f["words"].bytes_list.value) == ["héllo".encode(), b"\x00\xff", b""]
    assert f["none"].WhichOneof("kind") == "int64_list" and not f["none"].int64_list.value
    spec = {
        "age": tf.io.FixedLenFeature([], tf.int64),
        "big": tf.io.VarLenFeature(tf.int64),
        "pixels": tf.io.FixedLenFeature([3, 5], tf.float32),
        "weights": tf.io.VarLenFeature(tf.float32),
        "words": tf.io.VarLenFeature(tf.string),
        "name": tf.io.FixedLenFeature([], tf.string),
        "flags": tf.io.FixedLenFeature([3], tf.int64),
        "none": tf.io.VarLenFeature(tf.int64),
        "missing": tf.io.FixedLenFeature([2], tf.float32, default_value=[1.5, -2.0]),
    }
    theirs = tf.io.parse_single_example(data, spec)
    ours = decode_example(data, SCHEMA)
    assert set(theirs) == set(ours) == set(SCHEMA)  # every schema entry compared with TF
    for key, value in theirs.items():
        value = value.values if isinstance(value, tf.SparseTensor) else value
        np.testing.assert_array_equal(value.numpy(), ours[key], err_msg=key)


def test_tf_bytes_parse_in_ours(tf):
    ex = tf.train.Example(features=tf.train.Features(feature={
        "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[3, -4, 2**40])),
        "f": tf.train.Feature(float_list=tf.train.FloatList(value=[0.1, 1e30, -0.0])),
        "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x", "ÿ".encode()])),
        "unset": tf.train.Feature(),
    }))
    got = decode_example(ex.SerializeToString(), {
        "i": VarLenFeature("int64"), "f": FixedLenFeature((3,), "float32"),
        "b": VarLenFeature("bytes"), "unset": FixedLenFeature((), "int64", default_value=9)})
    np.testing.assert_array_equal(got["i"], [3, -4, 2**40])
    np.testing.assert_array_equal(got["f"], np.array([0.1, 1e30, -0.0], np.float32))
    assert list(got["b"]) == [b"x", "ÿ".encode()]
    assert got["unset"] == 9  # a Feature with no list set counts as absent, as in TF


def test_sequence_example_both_ways(tf):
    steps = [np.array([1.0, 2.0], np.float32), np.array([3.0, 4.0], np.float32),
             np.array([5.0, 6.0], np.float32)]
    tokens = [[b"a"], [b"b", b"c"], []]
    data = encode_sequence_example({"id": 7}, {
        "xy": steps, "tok": [np.array(t, dtype=object) if t else np.array([], "S1")
                             for t in tokens]})
    ctx, seq = tf.io.parse_single_sequence_example(
        data, context_features={"id": tf.io.FixedLenFeature([], tf.int64)},
        sequence_features={"xy": tf.io.FixedLenSequenceFeature([2], tf.float32),
                           "tok": tf.io.VarLenFeature(tf.string)})
    c2, s2 = decode_sequence_example(data, {"id": FixedLenFeature((), "int64")},
                                     {"xy": FixedLenFeature((2,), "float32"),
                                      "tok": VarLenFeature("bytes")})
    assert int(ctx["id"]) == int(c2["id"]) == 7
    np.testing.assert_array_equal(seq["xy"].numpy(), s2["xy"])
    assert s2["xy"].shape == (3, 2)
    assert [list(t) for t in s2["tok"]] == tokens
    assert list(seq["tok"].values.numpy()) == [b"a", b"b", b"c"]
    theirs = tf.train.SequenceExample.FromString(data).SerializeToString(deterministic=True)
    c3, s3 = decode_sequence_example(theirs)
    assert c3["id"].tolist() == [7] and len(s3["xy"]) == 3


def test_schema_errors_name_the_feature():
    data = encode_example({"x": [1.0, 2.0], "n": [1, 2, 3]})
    with pytest.raises(ExampleDecodeError, match="'x'.*2 values, expected 3"):
        decode_example(data, {"x": FixedLenFeature((3,), "float32")})
    with pytest.raises(ExampleDecodeError, match="'n'.*schema says float32.*int64"):
        decode_example(data, {"n": VarLenFeature("float32")})
    with pytest.raises(ExampleDecodeError, match="'gone' is required"):
        decode_example(data, {"gone": FixedLenFeature((), "int64")})
    with pytest.raises(ExampleDecodeError, match="not a valid Example"):
        decode_example(b"\xff\xff\xff", None)
    with pytest.raises(ValueError, match="dtype must be one of"):
        VarLenFeature("complex64")
    with pytest.raises(ValueError, match="empty list"):
        encode_example({"e": []})
    with pytest.raises(TypeError, match="'m': mixes text and numbers"):
        encode_example({"m": [1, "a"]})
    with pytest.raises(TypeError, match="data must be bytes"):
        decode_example("text")
    with pytest.raises(ValueError, match="backend must be"):
        decode_example(data, backend="jax")
    with pytest.raises(ValueError, match="'big': 9223372036854775808 is outside the int64"):
        encode_example({"big": 2**63})
    with pytest.raises(ValueError, match="'u': unsigned value exceeds the int64 range"):
        encode_example({"u": np.array([2**63], np.uint64)})
    with pytest.raises(TypeError, match="feature names must be str, got 3"):
        encode_example({3: [1]})
    with pytest.raises(TypeError, match="features must be a mapping"):
        encode_example([("x", 1)])
    with pytest.raises(ValueError, match=r"shape must be non-negative, got \(2, -1\)"):
        FixedLenFeature((2, -1), "int64")
    with pytest.raises(ValueError, match=r"'d': default_value of shape \(3,\) does not fit "
                       r"shape \(2,\)"):
        decode_example(data, {"d": FixedLenFeature((2,), "float32", default_value=[1, 2, 3])})
    with pytest.raises(TypeError, match=r"schema\['x'\] must be a FixedLenFeature or "
                       "VarLenFeature, got dict"):
        decode_example(data, {"x": {"dtype": "float32"}})
    with pytest.raises(ExampleDecodeError, match=r"'x\[0\]': 2 values, expected 3"):
        decode_sequence_example(encode_sequence_example({}, {"x": [[1.0, 2.0]]}), None,
                                {"x": FixedLenFeature((3,), "float32")})


def test_generated_module_is_current(tmp_path):
    pytest.importorskip("grpc_tools")
    fresh = proto.generate(tmp_path)
    for path in fresh:
        shipped = proto.SOURCE_ROOT / path.relative_to(tmp_path)
        assert path.read_text() == shipped.read_text(), f"{shipped} is stale: regenerate it"


def test_generated_code_fits_the_protobuf_runtime():
    from google.protobuf import runtime_version

    text = (proto.SOURCE_ROOT / "mlatlas/features/proto/example_pb2.py").read_text()
    gen = text.split("ValidateProtobufRuntimeVersion(")[1].split(")")[0].split(",")
    major, minor, patch = (int(x) for x in gen[1:4])
    assert (runtime_version.MAJOR, runtime_version.MINOR, runtime_version.PATCH) >= (
        major, minor, patch), "protobuf runtime older than the gencode: raise the pin"
