"""Data formats and feature engineering: TFRecord, tf.train.Example, feature columns (no TensorFlow needed).

Names are exported lazily, so ``from mlatlas.features.tfrecord import read_records`` does not
import torch:

- :mod:`~mlatlas.features.tfrecord`: ``TFRecordWriter``, ``read_records``,
  ``CorruptRecordError``
- :mod:`~mlatlas.features.tfrecord_index`: ``RecordIndex``, ``read_record_at``
- :mod:`~mlatlas.features.example`: ``encode_example``, ``decode_example``,
  ``FixedLenFeature``, ``VarLenFeature``, ``(en|de)code_sequence_example``
- :mod:`~mlatlas.features.dataset`: ``TFRecordDataset``, ``collate_examples``
- :mod:`~mlatlas.features.feature_columns`: the ``*_column`` constructors, ``FeatureLayer``,
  ``make_parse_schema``
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "tfrecord": ("CorruptRecordError", "RecordReader", "TFRecordWriter", "masked_crc32c",
                 "read_records"),
    "tfrecord_index": ("RecordIndex", "read_record_at"),
    "example": ("ExampleDecodeError", "FixedLenFeature", "VarLenFeature", "decode_example",
                "decode_sequence_example", "encode_example", "encode_sequence_example"),
    "dataset": ("TFRecordDataset", "collate_examples"),
    "feature_columns": ("FeatureLayer", "bucketized_column",
                        "categorical_column_with_hash_bucket",
                        "categorical_column_with_identity",
                        "categorical_column_with_vocabulary_file",
                        "categorical_column_with_vocabulary_list", "crossed_column",
                        "embedding_column", "indicator_column", "make_parse_schema",
                        "numeric_column"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mlatlas.features' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mlatlas.features.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
