"""Benchmarks 1 and 2: a frozen MobileNetV2 at 224x224, naive ``fit`` against the feature cache.

Both sides are the project's own ``tasks.training.train`` on the same prepared data and the
same saved backbone, each in its own process: ``train.feature_cache: true`` (the cache
starts empty, so the extraction pass is paid) and ``train.feature_cache: false`` (the
backbone runs on every image in every epoch). Per-epoch times come from a timing callback
appended after the stage's own callbacks (see :mod:`bench.train_worker`).

* ``head_epoch_speedup`` = median naive epoch / median cached head epoch, epoch 1 (graph
  tracing) excluded on both sides.
* ``head_total_speedup`` = naive 10-epoch ``train()`` time / cached 10-epoch ``train()``
  time (extraction included). The naive side runs 3 epochs and is extrapolated:
  its measured ``train()`` time plus 7 more median epochs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import (
    ROOT,
    Result,
    env_with_venv,
    load_average,
    median,
    prepared_dataset,
    run_process,
)
from bench.models import backbone_file

IMAGE_SIZE = (224, 224)
TRAIN_IMAGES = 2000
VAL_FRACTION, TEST_FRACTION = 0.1, 0.05


def _train(work: Path, prepared: Path, backbone: Path, info: Path, mode: str, epochs: int) -> dict:
    out = work / f"{mode}.json"
    command = [
        sys.executable,
        "-m",
        "bench.train_worker",
        "--prepared",
        prepared,
        "--backbone",
        backbone,
    ]
    command += [
        "--info",
        info,
        "--mode",
        mode,
        "--epochs",
        str(epochs),
        "--work",
        work / mode,
        "--out",
        out,
    ]
    (work / mode).mkdir(parents=True, exist_ok=True)
    process = run_process(command, ROOT, env_with_venv()).check(f"{mode} training")
    report = json.loads(out.read_text())
    report["process_s"] = round(process.seconds, 2)
    report["peak_rss_mib"] = round(process.peak_rss_bytes / 2**20)
    return report


def run(work: Path, quick: bool) -> list[Result]:
    """Run both trainings and return the two results."""
    train_images = 240 if quick else TRAIN_IMAGES
    total = round(train_images / (1 - VAL_FRACTION - TEST_FRACTION))
    naive_epochs, cached_epochs = (2, 4) if quick else (3, 10)
    prepared = prepared_dataset(
        work, total, IMAGE_SIZE, val_fraction=VAL_FRACTION, test_fraction=TEST_FRACTION
    )
    backbone, info = backbone_file("mobilenet_v2", IMAGE_SIZE, work / "models")
    load_before = load_average()
    cached = _train(work, prepared.root, backbone, info, "cached", cached_epochs)
    naive = _train(work, prepared.root, backbone, info, "naive", naive_epochs)
    load_after = load_average()
    if not cached["used_feature_cache"] or naive["used_feature_cache"]:
        raise RuntimeError("the stage did not take the expected path (feature cache on/off)")

    cached_epoch = median([e["total_s"] for e in cached["epochs"][1:]])
    naive_epoch = median([e["total_s"] for e in naive["epochs"][1:]])
    naive_total = naive["train_call_s"] + (cached_epochs - naive_epochs) * naive_epoch
    cached_total = cached["train_call_s"]
    extracted = prepared.count("train") + prepared.count("val")
    common = {
        "images": {s: prepared.count(s) for s in ("train", "val", "test")},
        "image_size": list(IMAGE_SIZE),
        "backbone": "mobilenet_v2, random init, frozen (flagged pretrained)",
        "train_params": cached["train_params"],
        "load_average": [load_before, load_after],
    }
    naive_phases = {
        key: median([e[key] for e in naive["epochs"][1:]])
        for key in (
            "iterator_startup_s",
            "train_steps_s",
            "before_validation_s",
            "validation_s",
            "callbacks_s",
            "idle_after_s",
        )
    }
    epoch_result = Result(
        "head_epoch_speedup",
        round(naive_epoch / cached_epoch, 1),
        ">= 50",
        "x",
        details={
            **common,
            "naive_epoch_s": round(naive_epoch, 3),
            "cached_epoch_s": round(cached_epoch, 4),
            "naive_epoch_phases_s": naive_phases,
            "cached_epoch_phases_s": {
                key: median([e[key] for e in cached["epochs"][1:]]) for key in naive_phases
            },
            "naive_epochs": naive["epochs"],
            "cached_epochs": cached["epochs"],
        },
    )
    total_result = Result(
        "head_total_speedup",
        round(naive_total / cached_total, 2),
        ">= 8",
        "x",
        details={
            **common,
            "epochs": cached_epochs,
            "naive_total_s": round(naive_total, 1),
            "naive_measured": f"{naive_epochs} epochs in {naive['train_call_s']:.1f}s, "
            f"+{cached_epochs - naive_epochs} x median epoch {naive_epoch:.2f}s (extrapolated)",
            "cached_total_s": round(cached_total, 1),
            "cached_extraction_s": cached["before_fit_s"],
            "extraction_images_per_s": round(extracted / cached["before_fit_s"], 1),
            "cached_after_fit_s": cached["after_fit_s"],
            "peak_rss_mib": {"naive": naive["peak_rss_mib"], "cached": cached["peak_rss_mib"]},
        },
    )
    return [epoch_result, total_result]
