"""Benchmark 5: VGG16 feature extraction as a fraction of this machine's measured peak.

In a worker process, alternately: a large float32 matmul (the machine's practical FMA
peak, the best of TensorFlow and NumPy/OpenBLAS), then the project's own feature
extraction of VGG16 at 224x224: ``tasks.features.cached_features`` into an empty folder
(train and val splits, the stage's default engine and batch), after
``tasks.common.set_determinism`` as ``train`` calls it. VGG16's FLOPs are counted from its
convolution layers (2 x K x K x C_in x C_out x H_out x W_out each; pooling and ReLU are
negligible).

* ``extract_peak_fraction`` = median extraction FLOP/s / median matmul FLOP/s, where the
  extraction time is the whole ``cached_features`` call less the one-off tf2onnx
  conversion of the backbone (timed separately; it does not grow with the data).

The details add the fraction with the conversion counted, and the same extraction on the
Keras engine (``train.feature_engine: keras``, one run in a second worker).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    PARAMS,
    ROOT,
    Result,
    env_with_venv,
    load_average,
    prepared_dataset,
    run_process,
)
from tasks.params import with_changes

IMAGE_SIZE = (224, 224)
MATMUL_N = 3072


def conv_flops(model) -> int:
    """FLOPs of one image through every Conv2D of ``model`` (nested models included)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += conv_flops(layer)
        elif isinstance(layer, keras.layers.Conv2D) and not isinstance(
            layer, keras.layers.DepthwiseConv2D
        ):
            _, height, width, out_channels = layer.output.shape
            in_channels = layer.input.shape[-1]
            kernel_h, kernel_w = layer.kernel_size
            total += 2 * kernel_h * kernel_w * in_channels * out_channels * height * width
    return total


def matmul_rates(repeats: int = 3) -> dict[str, float]:
    """FLOP/s of a large float32 matmul in TensorFlow and in NumPy (best of ``repeats``)."""
    import numpy as np
    import tensorflow as tf

    n = MATMUL_N
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    rates = {}
    for name, multiply in (
        ("tensorflow", lambda: tf.linalg.matmul(ta, tb).numpy()),
        ("numpy", lambda: a @ b),
    ):
        multiply()
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            multiply()
            best = min(best, time.perf_counter() - started)
        rates[name] = 2 * n**3 / best
    return rates


def worker(prepared_root: Path, repeats: int, engine: str) -> dict:
    """Alternate matmul and extraction ``repeats`` times; return the raw figures."""
    import tasks.features
    from tasks.backbone import build_backbone
    from tasks.common import set_determinism
    from tasks.dataset import Prepared
    from tasks.features import cached_features

    set_determinism(42)
    prepared = Prepared.open(prepared_root)
    backbone, _ = build_backbone(
        with_changes(PARAMS.backbone, arch="vgg16", weights="none"), IMAGE_SIZE
    )
    flops = conv_flops(backbone)
    images = prepared.count("train") + prepared.count("val")
    scratch = Path(tempfile.mkdtemp(prefix="peak-features-"))
    conversions: list[float] = []
    original = tasks.features.keras_to_onnx

    def timed_conversion(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            conversions.append(time.perf_counter() - started)

    tasks.features.keras_to_onnx = timed_conversion
    rows = []
    for _ in range(repeats):
        peak = matmul_rates()
        conversions.clear()
        started = time.perf_counter()
        features = cached_features(scratch / "features", "bench", backbone, prepared, "avg", engine)
        seconds = time.perf_counter() - started
        shutil.rmtree(scratch / "features")
        converting = sum(conversions)
        rows.append(
            {
                "matmul_flops": peak,
                "total_s": seconds,
                "conversion_s": converting,
                "extract_s": seconds - converting,
                "extract_images_per_s": images / (seconds - converting),
                "total_images_per_s": images / seconds,
                "features": {split: list(array.shape) for split, array in features.items()},
            }
        )
    return {"flops_per_image": flops, "images": images, "engine": engine, "rows": rows}


def _run_worker(prepared: Path, repeats: int, engine: str, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.peak", "--worker", prepared, str(repeats), engine, out]
    run_process(command, ROOT, env_with_venv()).check("peak worker")
    return json.loads(out.read_text())


def _fraction(row: dict, flops: float, key: str) -> float:
    return row[key] * flops / max(row["matmul_flops"].values())


def run(work: Path, quick: bool) -> list[Result]:
    """Measure the peak and VGG16's extraction rate, interleaved."""
    count = 24 if quick else 320  # 80% land in the train split, 10% in val
    repeats = 1 if quick else 3
    prepared = prepared_dataset(work, count, IMAGE_SIZE, val_fraction=0.1, test_fraction=0.1)
    load_before = load_average()
    data = _run_worker(prepared.root, repeats, "onnxruntime", work / "worker.json")
    keras_run = _run_worker(prepared.root, 1, "keras", work / "worker-keras.json")
    load_after = load_average()
    flops = data["flops_per_image"]
    peaks = [max(r["matmul_flops"].values()) for r in data["rows"]]
    rates = [r["extract_images_per_s"] * flops for r in data["rows"]]
    peak = statistics.median(peaks)
    fraction = statistics.median(rates) / peak
    details = {
        "vgg16_gflop_per_image": round(flops / 1e9, 2),
        "images_per_run": data["images"],
        "engine": data["engine"],
        "repeats": repeats,
        "peak_gflop_s": round(peak / 1e9, 1),
        "peak_by_library_gflop_s": {
            k: round(v / 1e9, 1) for k, v in data["rows"][-1]["matmul_flops"].items()
        },
        "matmul": f"{MATMUL_N}x{MATMUL_N} float32, best of 3 per library, best library",
        "extract_gflop_s": round(statistics.median(rates) / 1e9, 1),
        "extract_images_per_s": round(
            statistics.median(r["extract_images_per_s"] for r in data["rows"]), 2
        ),
        "conversion_s": round(statistics.median(r["conversion_s"] for r in data["rows"]), 1),
        "fraction_with_conversion": round(
            statistics.median(_fraction(r, flops, "total_images_per_s") for r in data["rows"]), 3
        ),
        "keras_engine_fraction": round(
            _fraction(keras_run["rows"][0], flops, "extract_images_per_s"), 3
        ),
        "keras_engine_images_per_s": round(keras_run["rows"][0]["extract_images_per_s"], 2),
        "per_repeat": data["rows"],
        "load_average": [load_before, load_after],
    }
    return [
        Result("extract_peak_fraction", round(fraction, 3), ">= 0.85", "fraction", details=details)
    ]


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (``--worker PREPARED REPEATS ENGINE OUT``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("repeats", type=int)
    parser.add_argument("engine", choices=["onnxruntime", "keras"])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(worker(args.worker, args.repeats, args.engine), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
