"""Benchmark 7: the whole pipeline on Fashion-MNIST (70,000 images), wall time and memory.

A fresh copy of the project with ``presets/fashion-mnist.yaml`` merged into its params, run
with ``dvc repro``
from an empty workspace: fetch (Debian's ``/usr/share/datasets/fashion-mnist``), prepare,
backbone, train, evaluate, export. Peak memory is sampled as the summed RSS of the whole
process tree (``dvc`` and the stage it runs) every 0.1 s; the largest single process's
high-water mark is in the details.

* ``fashion_mnist_e2e``: wall time (s) of the cold ``dvc repro``; reported, no goal.
* ``fashion_mnist_e2e_peak_memory``: peak memory (GiB), goal <= 4.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from bench.common import (
    ROOT,
    Result,
    copy_project,
    env_with_venv,
    load_average,
    run_process,
    skipped,
)

DATASET = Path("/usr/share/datasets/fashion-mnist")


def settings(quick: bool) -> tuple[dict, str]:
    """The params overrides and where they came from."""
    with (ROOT / "presets" / "fashion-mnist.yaml").open(encoding="utf-8") as handle:
        params, origin = yaml.safe_load(handle), "presets/fashion-mnist.yaml"
    if quick:
        params.setdefault("train", {})["epochs"] = 1
        origin += ", train.epochs=1 (--quick)"
    return params, origin


def stage_seconds(output: str) -> dict[str, float]:
    """Per-stage durations from the stages' own log lines, where they print them."""
    found = {}
    for stage, seconds in re.findall(r"\[tlp\] (\w+): .*?\((\d+(?:\.\d+)?)s\)", output):
        found[stage] = float(seconds)
    return found


def epoch_profile(work: Path, project: Path, train: dict, epochs: int = 3) -> dict:
    """Re-train the stage's model for a few epochs with the epoch timer (bench.train_worker).

    The Fashion-MNIST model trains from scratch through ``Prepared.tf_dataset`` (410 batches
    of 128 per epoch), the path where idle gaps at epoch boundaries were reported.
    """
    out = work / "profile.json"
    settings = {**train, "epochs": epochs, "early_stopping_patience": 0}
    command = [
        sys.executable,
        "-m",
        "bench.train_worker",
        "--prepared",
        project / "data" / "prepared",
    ]
    command += ["--backbone", project / "models" / "backbone.keras"]
    command += ["--info", project / "models" / "backbone.json", "--mode", "naive"]
    command += ["--epochs", str(epochs), "--work", work / "profile", "--out", out]
    command += ["--train", json.dumps(settings)]
    (work / "profile").mkdir(parents=True, exist_ok=True)
    run_process(command, ROOT, env_with_venv()).check("epoch profile")
    report = json.loads(out.read_text())
    epochs_seen = report["epochs"]
    return {
        "epochs": epochs_seen,
        "max_idle_between_epochs_s": max(e["idle_after_s"] for e in epochs_seen),
        "max_iterator_startup_s": max(e["iterator_startup_s"] for e in epochs_seen),
        "max_before_validation_s": max(e["before_validation_s"] for e in epochs_seen),
    }


def run(work: Path, quick: bool) -> list[Result]:
    """Run the pipeline once from scratch and measure it."""
    if not DATASET.is_dir():
        reason = f"{DATASET} is missing (apt-get install dataset-fashion-mnist)"
        return [
            skipped("fashion_mnist_e2e", None, "s", reason),
            skipped("fashion_mnist_e2e_peak_memory", "<= 4", "GiB", reason),
        ]
    params, origin = settings(quick)
    project = copy_project(work / "project", params)
    load_before = load_average()
    process = run_process(["dvc", "repro"], project, env_with_venv(cwd=project), sample_tree=True)
    process.check("dvc repro (fashion-mnist)")
    load_after = load_average()
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    model = json.loads((project / "models" / "model.json").read_text())
    report = json.loads((project / "data" / "prepared" / "report.json").read_text())
    details = {
        "params": origin,
        "images": report["images"],
        "test_accuracy": round(metrics["accuracy"], 4),
        "epochs_run": model.get("epochs_run"),
        "train_seconds": model.get("seconds"),
        "stage_seconds": stage_seconds(process.stderr + process.stdout),
        "peak_tree_rss_gib": round(process.peak_tree_rss_bytes / 2**30, 2),
        "peak_single_process_rss_gib": round(process.peak_rss_bytes / 2**30, 2),
        "load_average": [load_before, load_after],
    }
    if not quick:
        details["epoch_profile"] = epoch_profile(work, project, params.get("train", {}))
    peak = max(process.peak_tree_rss_bytes, process.peak_rss_bytes) / 2**30
    return [
        Result("fashion_mnist_e2e", round(process.seconds, 1), None, "s", details=details),
        Result("fashion_mnist_e2e_peak_memory", round(peak, 2), "<= 4", "GiB", details=details),
    ]
