"""Benchmark 4: ``tlp predict`` on one image, whole process, against the same through Keras.

The model is a MobileNetV2 (224x224) classifier exported by the export stage's own code.
Each run is a fresh process that classifies one 400x300 JPEG and exits: what a user waits
for. ``tlp predict`` is the console script when it is installed, else ``python -m
flows.cli predict`` (the same code); ``python -m tasks.predict`` is timed too. The baseline
(:mod:`bench.keras_predict`) loads the ``.keras`` model with TensorFlow and decodes with the
same function. One untimed warm-up run of each fills the page cache; then runs alternate.

* ``predict_cold_start_s``: median wall time of ``tlp predict`` (goal <= 1 s).
* ``predict_cold_start_speedup``: Keras median / ``tlp predict`` median (goal >= 3).
* the details also hold MobileNetV2's steady-state forward throughput in TensorFlow and in
  ONNX Runtime (batch 32), the figure behind the proposal to extract features with ONNX
  Runtime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import (
    BIN,
    ROOT,
    Result,
    env_with_venv,
    load_average,
    median,
    prepared_dataset,
    run_process,
    synthetic_images,
)
from bench.models import classifier_files

IMAGE_SIZE = (224, 224)


def _tlp_predict() -> tuple[list[str], str]:
    tlp = BIN / "tlp"
    if tlp.exists():
        return [str(tlp), "predict"], "tlp predict"
    command = [sys.executable, "-m", "flows.cli", "predict"]
    return command, "python -m flows.cli predict (no tlp script installed)"


def _throughput(runtime: str, model: Path, batches: int) -> float:
    command = [sys.executable, "-m", "bench.throughput", runtime, model, "32", str(batches)]
    run = run_process(command, ROOT, env_with_venv()).check(f"{runtime} throughput")
    return json.loads(run.stdout.strip().splitlines()[-1])["images_per_s"]


def run(work: Path, quick: bool) -> list[Result]:
    """Time the three commands and the two runtimes."""
    repeats, keras_repeats = (2, 1) if quick else (7, 3)
    prepared = prepared_dataset(work, 48, IMAGE_SIZE, val_fraction=0.1, test_fraction=0.5)
    keras_model, onnx_model = classifier_files(
        "mobilenet_v2", IMAGE_SIZE, 4, work / "model", prepared.root
    )
    image_folder = synthetic_images(work / "one-image", 1, (400, 300))
    image = next(image_folder.glob("*/*.jpg"))
    tlp, tlp_label = _tlp_predict()
    commands = {
        "tlp": [*tlp, "--model", onnx_model, image],
        "module": [sys.executable, "-m", "tasks.predict", "--model", onnx_model, image],
        "keras": [sys.executable, "-m", "bench.keras_predict", keras_model, image],
    }
    load_before = load_average()
    for command in commands.values():  # warm-up: page cache, .pyc files
        run_process(command, ROOT, env_with_venv()).check(" ".join(map(str, command)))
    times: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[int]] = {name: [] for name in commands}
    answers: dict[str, str] = {}
    for index in range(repeats):
        for name, command in commands.items():
            if name == "keras" and index >= keras_repeats:
                continue
            process = run_process(command, ROOT, env_with_venv()).check(name)
            times[name].append(process.seconds)
            peaks[name].append(process.peak_rss_bytes)
            answers[name] = process.stdout.strip().split(": ", 1)[-1]
    batches = 2 if quick else 8
    tf_rate, ort_rate = (
        _throughput("keras", keras_model, batches),
        _throughput("onnx", onnx_model, batches),
    )
    load_after = load_average()
    seconds = {name: median(values) for name, values in times.items()}
    details = {
        "command": tlp_label,
        "model": f"MobileNetV2 {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} + softmax head, {onnx_model.stat().st_size // 2**20} MiB ONNX",
        "repeats": {name: len(values) for name, values in times.items()},
        "median_s": {name: round(value, 3) for name, value in seconds.items()},
        "all_s": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "peak_rss_mib": {name: round(median(values) / 2**20) for name, values in peaks.items()},
        "answers": answers,
        "mobilenet_v2_images_per_s": {
            "tensorflow": round(tf_rate, 1),
            "onnxruntime": round(ort_rate, 1),
        },
        "load_average": [load_before, load_after],
    }
    return [
        Result("predict_cold_start_s", round(seconds["tlp"], 3), "<= 1.0", "s", details=details),
        Result(
            "predict_cold_start_speedup",
            round(seconds["keras"] / seconds["tlp"], 1),
            ">= 3",
            "x",
            details={
                "keras_median_s": round(seconds["keras"], 3),
                "tlp_median_s": round(seconds["tlp"], 3),
            },
        ),
    ]
