"""int8 ONNX models, gated on agreement with the float model before they ship.

ONNX Runtime's static quantization (``onnxruntime.quantization``): the float graph is
pre-processed (ONNX shape inference, graph optimisation), calibrated on training images
(MinMax ranges of every activation) and rewritten in the QDQ format with unsigned 8-bit
activations and signed 8-bit per-channel weights, which ONNX Runtime's CPU provider fuses
into QLinear kernels. ``reduce_range`` (7-bit weights) is on, as ONNX Runtime advises for
x86 CPUs without VNNI (``quantize_static``'s "Choosing parameters for CPU inference"): the
model ships to CPUs we do not know, and on those the u8s8 kernels can saturate. The final
Softmax stays float, so the probabilities are not rounded to steps of 1/256 (ties there
would flip the top-1 answer). The preprocessing stays inside the graph, so the int8 model
takes the same raw pixels as the float one, and it keeps the float model's metadata
(classes, image size), so ``tlp predict --model models/int8/model.onnx`` works unchanged.

A quantized model is only as good as its check: :func:`build_int8` measures its top-1
agreement with the float model and its accuracy drop on the test split, refuses it (and
writes nothing) when either gate fails, and times both models on one fixed batch.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.common import StageError, atomic_path, log
from tasks.onnx_io import cpu_session
from tasks.params import ExportParams

SPEED_BATCH = 32
SPEED_REPEATS = 7


@dataclass(frozen=True)
class Int8Check:
    """How the int8 model compares with the float model on the test split (counts)."""

    images: int
    agree: int
    float_right: int
    int8_right: int

    @property
    def top1_agreement(self) -> float:
        """Share of test images on which both models give the same top-1 class."""
        return self.agree / self.images

    @property
    def accuracy(self) -> float:
        """The int8 model's test accuracy."""
        return self.int8_right / self.images

    @property
    def float_accuracy(self) -> float:
        """The float model's test accuracy."""
        return self.float_right / self.images

    @property
    def accuracy_drop(self) -> float:
        """Float minus int8 accuracy (negative: int8 did better); one division, so a drop of
        one image in 100 is exactly the float ``0.01`` a gate is written with."""
        return (self.float_right - self.int8_right) / self.images


@dataclass(frozen=True)
class Speed:
    """Median seconds per batch of the float and the int8 model, timed alternately."""

    batch: int
    float_seconds: float
    int8_seconds: float

    @property
    def speedup(self) -> float:
        """Throughput of the int8 model over the float one."""
        return self.float_seconds / self.int8_seconds


def quantize_int8(
    float_model: Path, out: Path, calibration: Iterable[np.ndarray], input_name: str
) -> None:
    """Write the static int8 quantization of ``float_model`` to ``out``.

    Args:
        float_model: the float ONNX model (raw pixels in).
        out: where the int8 model goes (the caller makes it atomic).
        calibration: batches of training images, (B, H, W, 3) pixels in [0, 255], read one
            at a time. ONNX Runtime keeps every batch's per-tensor minima and maxima until
            the end (its ``CalibMaxIntermediateOutputs``, meant to bound that, drops the
            data in 1.32), a few kB per batch: ``export.calibration_images`` is capped at
            10,000.
        input_name: the graph input's name.

    Raises:
        StageError: ``calibration`` holds no image.
    """
    batches = iter(calibration)
    first = next(batches, None)
    if first is None or len(first) == 0:
        raise StageError("no training images to calibrate the int8 model on")
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pending = itertools.chain([first], batches)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            batch = next(pending, None)
            return None if batch is None else {input_name: batch.astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="tlp-int8-") as work:
        prepared = Path(work) / "preprocessed.onnx"
        # Symbolic shape inference serves transformers (and needs sympy); CNNs need ONNX's own.
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        softmax = [node.name for node in graph.node if node.op_type == "Softmax"]
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=softmax,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _outputs(session, images: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: images.astype(np.float32)})[0]


def check_int8(
    float_session, int8_session, batches: Iterable[tuple[np.ndarray, np.ndarray]]
) -> Int8Check:
    """Top-1 agreement and accuracy of the int8 model against the float one.

    Args:
        float_session: ONNX Runtime session of the float model.
        int8_session: ONNX Runtime session of the int8 model.
        batches: ``(images, labels)`` of the test split, one batch in memory at a time.
    """
    images = agree = float_right = int8_right = 0
    for pixels, labels in batches:
        expected = _outputs(float_session, pixels).argmax(axis=1)
        got = _outputs(int8_session, pixels).argmax(axis=1)
        images += len(labels)
        agree += int((expected == got).sum())
        float_right += int((expected == labels).sum())
        int8_right += int((got == labels).sum())
    if images == 0:
        raise StageError("no test images to check the int8 model on; raise prepare.test_fraction")
    return Int8Check(images, agree, float_right, int8_right)


def time_models(
    float_session,
    int8_session,
    images: np.ndarray,
    batch: int = SPEED_BATCH,
    repeats: int = SPEED_REPEATS,
) -> Speed:
    """Median time of one fixed batch through each model, the two alternating.

    Alternating (rather than timing one model, then the other) lets both see the same
    machine: on a shared CPU the load changes between the two halves of a run.

    Args:
        float_session: ONNX Runtime session of the float model.
        int8_session: ONNX Runtime session of the int8 model.
        images: (N, H, W, 3) pixels; repeated or cut to ``batch`` images.
        batch: images per call.
        repeats: timed calls per model (after one untimed warm-up each).
    """
    pixels = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
    name = float_session.get_inputs()[0].name
    times: dict[str, list[float]] = {"float": [], "int8": []}
    sessions = {"float": float_session, "int8": int8_session}
    for session in sessions.values():
        session.run(None, {name: pixels})  # warm-up: first-run allocations
    for _ in range(repeats):
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {name: pixels})
            times[key].append(time.perf_counter() - started)
    return Speed(batch, statistics.median(times["float"]), statistics.median(times["int8"]))


def build_int8(
    float_model: Path,
    out: Path,
    calibration: Iterator[np.ndarray],
    test_batches: Iterable[tuple[np.ndarray, np.ndarray]],
    speed_images: np.ndarray,
    params: ExportParams,
) -> dict:
    """Quantize, gate and time the int8 model; write ``out`` only if both gates pass.

    Args:
        float_model: the float ONNX model (already past its own parity gate).
        out: the int8 model's path; replaced atomically, and removed when a gate fails.
        calibration: batches of training images (see :func:`quantize_int8`).
        test_batches: ``(images, labels)`` batches of the test split.
        speed_images: images for the timed batch (see :func:`time_models`).
        params: the ``export`` section (``int8_min_agreement``, ``int8_max_accuracy_drop``).

    Returns:
        The ``int8`` section of ``metrics/export.json``: ``top1_agreement``, ``accuracy``,
        ``accuracy_drop``, ``size_bytes``, ``speedup``, and the ``images`` and
        ``float_accuracy`` they come from.

    Raises:
        StageError: a gate failed (the message names it, with the numbers); no file is left
            at ``out``.
    """
    out.unlink(missing_ok=True)  # an older int8 model must not outlive a failed gate
    started = time.perf_counter()
    float_session = cpu_session(float_model)
    with atomic_path(out) as tmp:
        quantize_int8(float_model, tmp, calibration, float_session.get_inputs()[0].name)
        int8_session = cpu_session(tmp)
        check = check_int8(float_session, int8_session, test_batches)
        failed = []
        if check.top1_agreement < params.int8_min_agreement:
            failed.append(
                f"top-1 agreement with the float model {check.top1_agreement:.4f} is under "
                f"export.int8_min_agreement {params.int8_min_agreement}"
            )
        if check.accuracy_drop > params.int8_max_accuracy_drop:
            failed.append(
                f"test accuracy dropped {check.accuracy_drop:.4f} ({check.float_accuracy:.4f} "
                f"-> {check.accuracy:.4f}), over export.int8_max_accuracy_drop "
                f"{params.int8_max_accuracy_drop}"
            )
        if failed:
            raise StageError(
                f"int8 gate failed on {check.images} test images: {'; '.join(failed)}. No "
                "int8 model was written. Calibrate on more images (export.calibration_images), "
                "loosen the gate, or ship the float model (export.quantize: none)"
            )
        speed = time_models(float_session, int8_session, speed_images)
        size = tmp.stat().st_size
    log.info(
        "export: int8 agreement %.4f, accuracy %.4f (float %.4f), %.2fx faster at batch %d, "
        "%d bytes (%.1fs)",
        check.top1_agreement, check.accuracy, check.float_accuracy, speed.speedup,
        speed.batch, size, time.perf_counter() - started,
    )  # fmt: skip
    return {
        "top1_agreement": check.top1_agreement,
        "accuracy": check.accuracy,
        "accuracy_drop": check.accuracy_drop,
        "size_bytes": size,
        "speedup": round(speed.speedup, 3),
        "images": check.images,
        "float_accuracy": check.float_accuracy,
    }
