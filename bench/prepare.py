"""Benchmark 3: the prepare stage against the naive loop, on 2,000 JPEGs of 400x300.

Both resize to 224x224 (the MobileNetV2 benchmarks' size), each run is its own process and
the figures are for the whole process (start-up and imports included: what ``dvc repro``
pays). Peak memory is the kernel's high-water mark for that process (``wait4``'s
``ru_maxrss``). Runs alternate (naive, stage, naive, stage...) and medians are reported.

* ``prepare_speedup`` = naive seconds / stage seconds.
* ``prepare_memory_ratio`` = stage peak RSS / naive peak RSS, with the stage's default
  ``prepare.shard_size``.

The details add both sides at 32x32 (``params.yaml``'s
default size, where the stage decodes JPEGs at reduced size: ``Image.draft``).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from bench.common import (
    ROOT,
    ProcessRun,
    Result,
    env_with_venv,
    load_average,
    median,
    run_process,
    synthetic_images,
)

SOURCE_SIZE = (400, 300)  # width, height of the JPEGs
TARGET = (224, 224)  # height, width after prepare
SMALL_TARGET = (32, 32)  # params.yaml's default size
IMAGES = 2000


def _params_file(work: Path, size: tuple[int, int], **prepare: object) -> Path:
    with (ROOT / "params.yaml").open(encoding="utf-8") as handle:
        params = yaml.safe_load(handle)
    params["prepare"].update({"image_size": list(size), **prepare})
    extra = "".join(f"-{k}{v}" for k, v in sorted(prepare.items()))
    path = work / f"params-{size[0]}x{size[1]}{extra}.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def _stage(
    raw: Path, out: Path, params: Path, expected: int, prefix: Sequence[str] = ()
) -> ProcessRun:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        *prefix,
        sys.executable,
        "-m",
        "tasks.prepare",
        "--params",
        params,
        "--raw",
        raw,
        "--out",
        out,
    ]
    run = run_process(command, ROOT, env_with_venv()).check("tasks.prepare")
    report = json.loads((out / "report.json").read_text())
    if report["images"] != expected:
        raise RuntimeError(f"prepare kept {report['images']} images, expected {expected}")
    return run


def _naive(raw: Path, size: tuple[int, int], prefix: Sequence[str] = ()) -> ProcessRun:
    command = [*prefix, sys.executable, "-m", "bench.naive_prepare", raw, *map(str, size)]
    return run_process(command, ROOT, env_with_venv()).check("naive loop")


def run(work: Path, quick: bool) -> list[Result]:
    """Time both loaders, ``repeats`` times each, alternating."""
    count = 200 if quick else IMAGES
    repeats = 1 if quick else 3
    work.mkdir(parents=True, exist_ok=True)
    raw = synthetic_images(work / f"jpegs-{count}", count, SOURCE_SIZE, quality=90)
    variants: dict[str, Callable[[], ProcessRun]] = {
        "naive": lambda: _naive(raw, TARGET),
        "stage": lambda: _stage(raw, work / "out", _params_file(work, TARGET), count),
        "naive_32": lambda: _naive(raw, SMALL_TARGET),
        "stage_32": lambda: _stage(raw, work / "out", _params_file(work, SMALL_TARGET), count),
    }
    load_before = load_average()
    variants["naive"]()  # warm the page cache, so neither side pays for the first read
    runs: dict[str, list[ProcessRun]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            runs[name].append(function())
    load_after = load_average()
    seconds = {name: median([r.seconds for r in values]) for name, values in runs.items()}
    peak = {name: median([r.peak_rss_bytes for r in values]) for name, values in runs.items()}
    details = {
        "summary": f"{count / seconds['stage']:.0f} vs {count / seconds['naive']:.0f} images/s; "
        f"peak {peak['stage'] / 2**20:.0f} vs {peak['naive'] / 2**20:.0f} MiB",
        "images": count,
        "source": f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG, quality 90",
        "target": f"{TARGET[0]}x{TARGET[1]}",
        "repeats": repeats,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "images_per_s": {k: round(count / v, 1) for k, v in seconds.items()},
        "naive_loop_only_s": round(
            median([json.loads(r.stdout)["seconds"] for r in runs["naive"]]), 2
        ),
        "peak_rss_mib": {k: round(v / 2**20) for k, v in peak.items()},
        "naive_array_mib": round(count * TARGET[0] * TARGET[1] * 3 * 8 / 2**20),
        "speedup_at_32x32": round(seconds["naive_32"] / seconds["stage_32"], 2),
        "memory_ratio_at_32x32": round(peak["stage_32"] / peak["naive_32"], 3),
        "load_average": [load_before, load_after],
    }
    return [
        Result(
            "prepare_speedup",
            round(seconds["naive"] / seconds["stage"], 2),
            ">= 3",
            "x",
            details=details,
        ),
        Result(
            "prepare_memory_ratio",
            round(peak["stage"] / peak["naive"], 3),
            "<= 0.1",
            "ratio",
            details=details,
        ),
    ]
