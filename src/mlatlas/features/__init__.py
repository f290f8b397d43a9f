"""Data formats and feature engineering: TFRecord, tf.train.Example, feature columns (no TensorFlow needed).

Every name has one home; import it from its module:

- :mod:`~mlatlas.features.tfrecord`: ``TFRecordWriter``, ``read_records``,
  ``CorruptRecordError``
- :mod:`~mlatlas.features.tfrecord_index`: ``RecordIndex``, ``read_record_at``
- :mod:`~mlatlas.features.example`: ``encode_example``, ``decode_example``,
  ``FixedLenFeature``, ``VarLenFeature``, ``(en|de)code_sequence_example``
- :mod:`~mlatlas.features.dataset`: ``TFRecordDataset``, ``collate_examples``
- :mod:`~mlatlas.features.feature_columns`: the ``*_column`` constructors, ``FeatureLayer``,
  ``make_parse_schema``
- :mod:`~mlatlas.features.tensorflow_reference`: ``load_tensorflow`` (the optional reference
  the experiments compare with), ``TensorFlowUnavailable``
"""
