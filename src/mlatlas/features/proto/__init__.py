"""``tf.train.Example`` / ``SequenceExample`` protobuf messages, without TensorFlow.

``feature.proto`` and ``example.proto`` restate TensorFlow's documented message definitions
(same field numbers and wire types, package ``mlatlas.features`` so that they can share a
process with TensorFlow's own descriptors); ``*_pb2.py`` are generated from them with the
``protoc`` bundled in grpcio-tools. Regenerate after editing a ``.proto``::

    python -c "from mlatlas.features.proto import generate; generate()"
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

__all__ = ["PROTO_FILES", "SOURCE_ROOT", "generate"]

#: The shipped ``.proto`` files, relative to :data:`SOURCE_ROOT`.
PROTO_FILES: tuple[str, ...] = (
    "mlatlas/features/proto/feature.proto",
    "mlatlas/features/proto/example.proto",
)
#: The import root of the ``.proto`` files (the folder that holds ``mlatlas/``).
SOURCE_ROOT: Path = Path(__file__).resolve().parents[3]


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Run grpcio-tools' ``protoc`` on the shipped ``.proto`` files.

    Args:
        out_dir: Where to write ``mlatlas/features/proto/*_pb2.py``; default
            :data:`SOURCE_ROOT` (regenerates the shipped modules in place).

    Returns:
        The paths of the generated ``*_pb2.py`` files.

    Raises:
        ImportError: grpcio-tools (a dev dependency) is not installed.
        RuntimeError: ``protoc`` failed.
    """
    if importlib.util.find_spec("grpc_tools") is None:
        raise ImportError("generating the _pb2 modules needs grpcio-tools "
                          "(pip install grpcio-tools)")
    out = Path(out_dir) if out_dir is not None else SOURCE_ROOT
    out.mkdir(parents=True, exist_ok=True)
    # A separate process: protoc's bundled C++ protobuf must not meet another one (e.g.
    # TensorFlow's) loaded in this interpreter.
    args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{SOURCE_ROOT}",
            f"--python_out={out}", *PROTO_FILES]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}): {done.stderr.strip()}")
    return [out / p.replace(".proto", "_pb2.py") for p in PROTO_FILES]
