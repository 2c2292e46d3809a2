"""Benchmark 8: the int8 ONNX model against the float one, in ONNX Runtime on this CPU.

The float model is a MobileNetV2 (224x224, random init: speed does not depend on the
weights' values) with a softmax head, exported by the export stage's own code. The int8
model is made by the stage's own :func:`tasks.quantize.quantize_int8`, calibrated on 200
synthetic photos through :func:`tasks.export.calibration_batches`, and timed by
:func:`tasks.quantize.time_models`: one fixed batch, the two models alternating in the same
process (default threads: all cores), median of the runs.

* ``int8_speedup``: float median / int8 median at batch 32 (goal >= 1.5): the figure.
* ``int8_speedup_batch1``: the same at batch 1 (reported).
* the details also hold what was tried around the stage's settings (QDQ vs QOperator,
  per-channel, reduce_range, graph optimisation level, one thread), each at batch 32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import Result, load_average, prepared_dataset
from bench.models import classifier_files

IMAGE_SIZE = (224, 224)
CALIBRATION_IMAGES = 200


def _quantize_variant(float_model: Path, out: Path, calibration: np.ndarray, **options) -> None:
    """``quantize_static`` with the stage's settings, some of them changed (the investigation)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([calibration[i : i + 16] for i in range(0, len(calibration), 16)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(batches, None)
            return None if batch is None else {"pixels": batch.astype(np.float32)}

    settings = {
        "quant_format": QuantFormat.QDQ,
        "per_channel": True,
        "reduce_range": True,
        "activation_type": QuantType.QUInt8,
        "weight_type": QuantType.QInt8,
        "calibrate_method": CalibrationMethod.MinMax,
    }
    settings.update(options)
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "pre.onnx"
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Reader(), **settings)


def _session(path: Path, threads: int = 0, extended: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if extended:  # no NCHWc layout rewrite (the float model's fastest path on x86)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _investigate(float_model: Path, work: Path, calibration: np.ndarray, images: np.ndarray,
                 stage_int8: Path, repeats: int) -> dict:  # fmt: skip
    """Speedup at batch 32 of each setting changed from the stage's, with the same timer."""
    from onnxruntime.quantization import QuantFormat

    from tasks.quantize import time_models

    variants = {
        "qoperator": {"quant_format": QuantFormat.QOperator},
        "per_tensor": {"per_channel": False},
        "full_range_weights": {"reduce_range": False},
    }
    found = {}
    for name, options in variants.items():
        path = work / f"variant-{name}.onnx"
        _quantize_variant(float_model, path, calibration, **options)
        speed = time_models(_session(float_model), _session(path), images, 32, repeats)
        found[name] = round(speed.speedup, 2)
    for name, kwargs in {"extended_optimisation": {"extended": True}, "one_thread": {"threads": 1}}.items():  # fmt: skip
        speed = time_models(
            _session(float_model, **kwargs), _session(stage_int8, **kwargs), images, 32, repeats
        )
        found[name] = round(speed.speedup, 2)
    return found


def run(work: Path, quick: bool) -> list[Result]:
    """Build both models, time them at batch 1 and 32, and try the alternatives."""
    from tasks.export import calibration_batches
    from tasks.quantize import quantize_int8, time_models

    work.mkdir(parents=True, exist_ok=True)
    count = 48 if quick else 2 * CALIBRATION_IMAGES  # about half become train images
    prepared = prepared_dataset(work, count, IMAGE_SIZE, val_fraction=0.1, test_fraction=0.3)
    _, float_model = classifier_files("mobilenet_v2", IMAGE_SIZE, 4, work / "model", prepared.root)
    int8_model = work / "int8.onnx"
    load_before = load_average()
    quantize_int8(
        float_model, int8_model, calibration_batches(prepared, CALIBRATION_IMAGES), "pixels"
    )
    images, _ = prepared.load("test", limit=32)
    float_session, int8_session = _session(float_model), _session(int8_model)
    repeats = {1: 5, 32: 3} if quick else {1: 60, 32: 21}
    speeds = {b: time_models(float_session, int8_session, images, b, repeats[b]) for b in (1, 32)}
    agreement = float(
        np.mean(
            float_session.run(None, {"pixels": images.astype(np.float32)})[0].argmax(1)
            == int8_session.run(None, {"pixels": images.astype(np.float32)})[0].argmax(1)
        )
    )
    details = {
        "model": f"MobileNetV2 {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} + softmax head (random init)",
        "calibration_images": min(CALIBRATION_IMAGES, prepared.count("train")),
        "repeats": repeats,
        "median_ms": {
            f"batch_{b}": {
                "float": round(s.float_seconds * 1e3, 2),
                "int8": round(s.int8_seconds * 1e3, 2),
            }
            for b, s in speeds.items()
        },  # fmt: skip
        "bytes": {"float": float_model.stat().st_size, "int8": int8_model.stat().st_size},
        "top1_agreement_on_synthetic_test_images": agreement,
    }
    if not quick:
        calibration = np.concatenate(list(calibration_batches(prepared, CALIBRATION_IMAGES)))
        details["batch_32_speedup_if"] = _investigate(
            float_model, work, calibration, images, int8_model, repeats[32]
        )
    details["load_average"] = [load_before, load_average()]
    return [
        Result("int8_speedup", round(speeds[32].speedup, 2), ">= 1.5", "x", details=details),
        Result(
            "int8_speedup_batch1",
            round(speeds[1].speedup, 2),
            None,
            "x",
            details={
                "median_ms": details["median_ms"]["batch_1"],
                "load_average": details["load_average"],
            },
        ),
    ]
