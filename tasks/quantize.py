"""int8 ONNX models, gated on agreement with the float model before they ship.

ONNX Runtime's static quantization (``onnxruntime.quantization``): the float graph is
pre-processed (shape inference, graph optimisation), calibrated on training images (MinMax
ranges of every activation) and rewritten in the QDQ format with unsigned 8-bit activations
and signed 8-bit per-channel weights. ``reduce_range`` (7-bit weights) is on: the model is
shipped to CPUs we do not know, and on CPUs without VNNI full-range weights can saturate
(ONNX Runtime's advice for x86). The preprocessing stays inside the graph, so the int8
model takes the same raw pixels as the float one.

A quantized model is only as good as its check: :func:`check_int8` measures its top-1
agreement with the float model and the accuracy drop on the test split, and
:func:`speedup` its throughput against the float model on a fixed batch.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CALIBRATION_BATCH = 16
SPEED_BATCH = 32
SPEED_REPEATS = 7


@dataclass(frozen=True)
class Int8Check:
    """How the int8 model compares with the float model on the test split."""

    images: int
    top1_agreement: float
    accuracy: float
    float_accuracy: float
    accuracy_drop: float

    def to_json(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


def quantize_int8(float_model: Path, out: Path, calibration: np.ndarray, input_name: str) -> None:
    """Write the static int8 quantization of ``float_model`` to ``out``.

    Args:
        float_model: the float ONNX model (raw pixels in).
        out: where the int8 model goes (the caller makes it atomic).
        calibration: float32 training images, (N, H, W, 3) in [0, 255].
        input_name: the graph input's name.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(calibration), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            start = next(self.starts, None)
            if start is None:
                return None
            batch = calibration[start : start + CALIBRATION_BATCH]
            return {input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="tlp-int8-") as work:
        prepared = Path(work) / "preprocessed.onnx"
        # Symbolic shape inference serves transformers (and needs sympy); CNNs need ONNX's own.
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _run(session, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    name = session.get_inputs()[0].name
    outputs = [
        session.run(None, {name: images[start : start + batch_size].astype(np.float32)})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(outputs)


def check_int8(float_session, int8_session, images: np.ndarray, labels: np.ndarray) -> Int8Check:
    """Top-1 agreement and accuracy of the int8 model against the float one (pure but for ORT)."""
    expected = _run(float_session, images).argmax(axis=1)
    got = _run(int8_session, images).argmax(axis=1)
    float_accuracy = float((expected == labels).mean())
    accuracy = float((got == labels).mean())
    return Int8Check(
        images=len(images),
        top1_agreement=float((expected == got).mean()),
        accuracy=accuracy,
        float_accuracy=float_accuracy,
        accuracy_drop=float_accuracy - accuracy,
    )


def speedup(float_session, int8_session, images: np.ndarray) -> float:
    """Throughput of the int8 model over the float one on one fixed batch (median of runs)."""
    batch = np.resize(images, (SPEED_BATCH, *images.shape[1:])).astype(np.float32)

    def median_seconds(session) -> float:
        name = session.get_inputs()[0].name
        session.run(None, {name: batch})  # warm-up: first-run allocations
        times = []
        for _ in range(SPEED_REPEATS):
            started = time.perf_counter()
            session.run(None, {name: batch})
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    return median_seconds(float_session) / median_seconds(int8_session)
