"""Benchmark 5: VGG16 feature extraction as a fraction of this machine's measured peak.

In a worker process, alternately: a large float32 matmul (the machine's practical FMA
peak, the best of TensorFlow and NumPy/OpenBLAS), then the project's own feature
extraction of VGG16 at 224x224: ``tasks.train.cached_features`` into an empty folder
(train and val splits; whatever engine, batching and conversion the stage uses), after
``tasks.common.set_determinism`` as ``train`` calls it. VGG16's FLOPs are counted from its
convolution layers (2 x K x K x C_in x C_out x H_out x W_out each; pooling and ReLU are
negligible).

* ``extract_peak_fraction`` = median extraction FLOP/s / median matmul FLOP/s.

The details add the Keras steady-state fraction (batches after the first, without
tracing; only when the stage extracts with Keras) and one extraction without op
determinism (a second worker: determinism cannot be switched off once on).
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

from bench.common import ROOT, Result, env_with_venv, load_average, prepared_dataset, run_process

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


def worker(prepared_root: Path, repeats: int, determinism: bool) -> dict:
    """Alternate matmul and extraction ``repeats`` times; return the raw figures."""
    import keras

    from tasks.backbone import build_backbone
    from tasks.common import set_determinism
    from tasks.dataset import Prepared
    from tasks.params import BackboneParams
    from tasks.train import cached_features

    if determinism:
        set_determinism(42)
    else:
        keras.utils.set_random_seed(42)
    prepared = Prepared.open(prepared_root)
    backbone, _ = build_backbone(BackboneParams(arch="vgg16", weights="none"), IMAGE_SIZE)
    flops = conv_flops(backbone)
    images = prepared.count("train") + prepared.count("val")
    scratch = Path(tempfile.mkdtemp(prefix="peak-features-"))
    rows = []
    for _ in range(repeats):
        peak = matmul_rates()
        batch_times: list[tuple[int, float]] = []  # (rows, seconds) of each Keras call
        original = keras.Model.predict_on_batch

        def timed_batch(self, x, _times=batch_times, _original=original):
            started = time.perf_counter()
            result = _original(self, x)
            _times.append((len(x), time.perf_counter() - started))
            return result

        keras.Model.predict_on_batch = timed_batch
        started = time.perf_counter()
        features = cached_features(scratch / "features", "bench", backbone, prepared, "avg", 64)
        shutil.rmtree(scratch / "features")
        seconds = time.perf_counter() - started
        keras.Model.predict_on_batch = original
        # Full Keras batches after the first call (no tracing); none when the stage used
        # ONNX Runtime. A short batch may have been traced anew, so it is left out too.
        full = [seconds for rows, seconds in batch_times[1:] if rows == 64]
        steady = 64 * len(full) / sum(full) if full else None
        rows.append(
            {
                "matmul_flops": peak,
                "extract_s": seconds,
                "extract_images_per_s": images / seconds,
                "steady_images_per_s": steady,
                "features": {split: list(array.shape) for split, array in features.items()},
            }
        )
    return {"flops_per_image": flops, "images": images, "rows": rows}


def _run_worker(prepared: Path, repeats: int, determinism: bool, out: Path) -> dict:
    command = [sys.executable, "-m", "bench.peak", "--worker", prepared, str(repeats), out]
    if not determinism:
        command.append("--no-determinism")
    run_process(command, ROOT, env_with_venv()).check("peak worker")
    return json.loads(out.read_text())


def run(work: Path, quick: bool) -> list[Result]:
    """Measure the peak and VGG16's extraction rate, interleaved."""
    count = 24 if quick else 160  # 80% land in the train split
    repeats = 1 if quick else 3
    prepared = prepared_dataset(work, count, IMAGE_SIZE, val_fraction=0.1, test_fraction=0.1)
    load_before = load_average()
    data = _run_worker(prepared.root, repeats, True, work / "worker.json")
    plain = _run_worker(prepared.root, 1, False, work / "worker-plain.json")
    load_after = load_average()
    flops = data["flops_per_image"]
    peaks = [max(r["matmul_flops"].values()) for r in data["rows"]]
    rates = [r["extract_images_per_s"] * flops for r in data["rows"]]
    steady = [r["steady_images_per_s"] * flops for r in data["rows"] if r["steady_images_per_s"]]
    peak = statistics.median(peaks)
    fraction = statistics.median(rates) / peak
    details = {
        "vgg16_gflop_per_image": round(flops / 1e9, 2),
        "images_per_run": data["images"],
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
        "keras_steady_state_fraction": round(statistics.median(steady) / peak, 3)
        if steady
        else None,
        "without_op_determinism_fraction": round(
            plain["rows"][0]["extract_images_per_s"]
            * flops
            / max(plain["rows"][0]["matmul_flops"].values()),
            3,
        ),
        "per_repeat": data["rows"],
        "load_average": [load_before, load_after],
    }
    return [
        Result("extract_peak_fraction", round(fraction, 3), ">= 0.85", "fraction", details=details)
    ]


def main(argv: list[str] | None = None) -> int:
    """Worker entry point (``--worker PREPARED REPEATS OUT [--no-determinism]``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("repeats", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-determinism", action="store_true")
    args = parser.parse_args(argv)
    args.out.write_text(
        json.dumps(worker(args.worker, args.repeats, not args.no_determinism), indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
