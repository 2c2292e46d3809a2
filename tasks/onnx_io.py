"""Keras -> ONNX conversion and ONNX Runtime sessions, shared by the train and export stages.

The train stage converts its frozen feature extractor to fill the feature cache faster; the
export stage converts the whole classifier to ship it. Both go through :func:`keras_to_onnx`
(tf2onnx from a ``tf.function``, batch axis dynamic) and run it on :func:`cpu_session`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def keras_to_onnx(
    model, input_shape: tuple[int, ...], opset: int, input_name: str, output_name: str
):
    """Convert a Keras model to an ONNX ``ModelProto`` whose batch dimension is dynamic.

    Args:
        model: any Keras model taking one float32 input.
        input_shape: the input's shape without the batch dimension.
        opset: the ONNX opset.
        input_name: the graph input's name.
        output_name: the graph output's name.

    Returns:
        The ``onnx.ModelProto``; its input and output have the batch dimension ``"batch"``.
    """
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *input_shape), tf.float32, name=input_name),)

    @tf.function(input_signature=spec)
    def serve(tensor):
        return {output_name: model(tensor, training=False)}

    with native_stderr_hidden():
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    return proto


@contextlib.contextmanager
def native_stderr_hidden() -> Iterator[None]:
    """Keep what is written to file descriptor 2 during the block, and show it only if the
    block fails (or with ``TLP_VERBOSE=1``).

    tf2onnx runs TensorFlow's graph optimiser, whose native log lines ("I0000 ...
    devices.cc:76] Number of eligible GPUs", absl's "All log messages before
    absl::InitializeLog()") ignore ``TF_CPP_MIN_LOG_LEVEL``.
    """
    if os.environ.get("TLP_VERBOSE") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            kept.seek(0)
            sys.stderr.write(kept.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def cpu_session(model):
    """An ONNX Runtime session on the CPU for a ``ModelProto`` or an ``.onnx`` file.

    Args:
        model: an ``onnx.ModelProto`` (kept in memory) or the path of an ``.onnx`` file.

    Returns:
        The ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    source = str(model) if isinstance(model, str | Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])
