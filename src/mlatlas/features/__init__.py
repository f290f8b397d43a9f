"""Data formats and feature engineering: TFRecord, tf.train.Example, feature columns (no TensorFlow needed)."""
