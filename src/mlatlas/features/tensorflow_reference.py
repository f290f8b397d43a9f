"""TensorFlow as an optional reference: imported lazily, quietly, with a reason when it is not.

mlatlas reads and writes TFRecord files, ``tf.train.Example`` protos and feature columns
without TensorFlow (Abadi et al. 2016, arXiv:1603.04467). TensorFlow is only the reference the
features experiments compare against side by side, so it is imported on demand here: its C++
and Python logging are quieted (the v1 feature-column API logs a deprecation warning per call),
and when it cannot be imported the caller gets :class:`TensorFlowUnavailable`, whose message is
the reason a claim was not measured.

=========================  ==============================================================
name                       meaning
=========================  ==============================================================
``load_tensorflow()``      the ``tensorflow`` module, or raises ``TensorFlowUnavailable``
``TensorFlowUnavailable``  ``ImportError`` reading "TensorFlow is not importable: <error>"
=========================  ==============================================================
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

__all__ = ["TensorFlowUnavailable", "load_tensorflow"]


class TensorFlowUnavailable(ImportError):
    """TensorFlow could not be imported; ``str(exc)`` says why (use it as a not-measured reason)."""


def load_tensorflow() -> ModuleType:
    """Import TensorFlow for a side-by-side comparison, with its logging quieted.

    Returns:
        The ``tensorflow`` module.

    Raises:
        TensorFlowUnavailable: TensorFlow is not installed or fails to import (a broken
            install raises other errors than ``ImportError``; they are reported the same way).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before the first import
    try:
        tf = importlib.import_module("tensorflow")
    except Exception as exc:  # noqa: BLE001 — any failure means "no reference here"
        raise TensorFlowUnavailable(
            f"TensorFlow is not importable: {type(exc).__name__}: {exc}") from exc
    tf.get_logger().setLevel(logging.ERROR)
    return tf
