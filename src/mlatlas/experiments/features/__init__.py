"""Experiments of the features field."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType


def load_tensorflow() -> ModuleType | None:
    """TensorFlow when importable, else None — only for the side-by-side comparisons.

    mlatlas itself never needs TensorFlow; the experiments import it lazily and quiet its C++
    and Python logging (the v1 feature-column API prints a deprecation warning per call).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        tf = importlib.import_module("tensorflow")
    except ImportError:
        return None
    tf.get_logger().setLevel(logging.ERROR)
    return tf
