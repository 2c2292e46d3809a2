"""Keras -> ONNX conversion and ONNX Runtime sessions, shared by the train and export stages.

The train stage converts its frozen feature extractor to fill the feature cache faster; the
export stages convert a whole classifier to ship it. Both go through :func:`keras_to_onnx`
(tf2onnx from a ``tf.function``, batch axis dynamic) and run it on :func:`cpu_session`.

A classifier is shipped by :func:`export` (``export`` and ``export_other`` both call it):
raw pixels in, probabilities out, its classes, image size and preprocessing in the ONNX
metadata; ``onnx.checker`` with the full check, then ONNX Runtime must agree with Keras
within ``export.atol`` and ``export.min_top1_agreement``, or no file is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path, log
from tasks.params import ExportParams


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


INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"


@dataclass
class Parity:
    """How closely ONNX Runtime matches Keras."""

    images: int
    top1_agreement: float
    max_abs_diff: float
    passed: bool


def to_onnx(model, info: dict, opset: int):
    """Convert a Keras model (raw pixels → probabilities) to an ONNX ``ModelProto``.

    Args:
        model: the trained Keras model.
        info: ``models/model.json`` (classes, image size, preprocessing, backbone).
        opset: the ONNX opset.
    """
    import onnx

    height, width = info["image_size"]
    proto = keras_to_onnx(model, (height, width, 3), opset, INPUT_NAME, OUTPUT_NAME)
    metadata = {
        "classes": json.dumps(info["classes"]),
        "image_size": json.dumps(info["image_size"]),
        "preprocessing": f"inside the graph ({info['preprocessing']}); feed RGB float32 0..255",
        "input": f"{INPUT_NAME}: float32 (batch, {height}, {width}, 3) RGB pixels in [0, 255]",
        "arch": info["backbone"]["arch"],
        "producer": "tlp",
    }
    if info.get("specialist_of"):  # the other class's specialist: the main class it refines
        metadata["specialist_of"] = info["specialist_of"]
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "tlp transfer-learning classifier"
    return proto


def check_parity(model, session, images: np.ndarray, params: ExportParams) -> Parity:
    """Compare Keras and ONNX Runtime on the same images."""
    if len(images) == 0:
        raise StageError("no test images to check ONNX parity on; raise prepare.test_fraction")
    keras_out, onnx_out = [], []
    for start in range(0, len(images), 128):
        batch = images[start : start + 128].astype(np.float32)
        keras_out.append(np.asarray(model.predict_on_batch(batch)))
        onnx_out.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    k, o = np.concatenate(keras_out), np.concatenate(onnx_out)
    agreement = float((k.argmax(1) == o.argmax(1)).mean())
    diff = float(np.abs(k - o).max())
    passed = diff <= params.atol and agreement >= params.min_top1_agreement
    return Parity(len(images), agreement, diff, passed)


def export(model, info: dict, test_images: np.ndarray, params: ExportParams, out: Path) -> Parity:
    """Convert, check, verify parity and write ``out`` atomically (only if parity holds).

    Raises:
        StageError: the parity gate failed; ``out`` is not written.
    """
    with atomic_path(out) as tmp:
        return write_checked(model, info, test_images, params, tmp)


def write_checked(
    model, info: dict, test_images: np.ndarray, params: ExportParams, path: Path
) -> Parity:
    """Convert and save to ``path``, run the checker, and raise unless parity holds.

    Raises:
        StageError: the parity gate failed (``path`` is the caller's to remove).
    """
    import onnx

    started = time.perf_counter()
    proto = to_onnx(model, info, params.opset)
    onnx.save(proto, path)
    onnx.checker.check_model(str(path), full_check=True)
    parity = check_parity(model, cpu_session(path), test_images, params)
    log.info(
        "export: %d images, top-1 agreement %.4f, max |diff| %.2e (%.1fs)",
        parity.images, parity.top1_agreement, parity.max_abs_diff, time.perf_counter() - started,
    )  # fmt: skip
    if not parity.passed:
        raise StageError(
            f"ONNX parity failed: top-1 agreement {parity.top1_agreement:.4f} (need >= "
            f"{params.min_top1_agreement}), max |diff| {parity.max_abs_diff:.2e} (need <= "
            f"{params.atol}). No ONNX file was written; check the model for ops tf2onnx "
            "converts differently, or loosen export.atol / export.min_top1_agreement"
        )
    return parity
