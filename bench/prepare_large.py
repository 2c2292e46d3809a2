"""Benchmark: the prepare stage against the naive loop on large photos (2000x1500 JPEGs).

Phone and camera photos are several megapixels; models take 224x224. The stage decodes such
JPEGs at a reduced DCT scale (``Image.draft``, keeping at least 1.5x the target size: see
:mod:`tasks.imaging`), area-averages, and decodes in a thread pool. The naive loop
(:mod:`bench.naive_prepare`) decodes every pixel, converts, resizes (bicubic) and stores
float64, in one thread.

* ``prepare_large_speedup`` = naive seconds / stage seconds, on 2,000 photo-like JPEGs of
  2000x1500 to 224x224: whole processes (start-up and imports included, as ``dvc repro``
  pays), 3 alternating runs, medians. Peak RSS of both (``wait4``'s ``ru_maxrss``) is in the
  details.

The photos are synthetic but built like photos: a smooth colour field, hard-edged shapes,
a finely striped patch and sensor-like grain (sigma 5), saved at quality 90: about 1.9 bits
a pixel, the density of a phone photo. The details add the same comparison on 200
noise-heavy images (``synthetic_images``: stripes under sigma-25 noise, about 4.6 bits a
pixel), where entropy decoding, which no DCT scaling avoids, takes most of the time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import ProcessRun, Result, load_average, median, synthetic_images
from bench.prepare import _naive, _params_file, _stage

SOURCE_SIZE = (2000, 1500)  # width, height
TARGET = (224, 224)  # height, width
IMAGES = 2000
NOISY_IMAGES = 200
ONE_CPU_IMAGES = 400  # the same photos as the first 400 of IMAGES
CLASSES = 4
GRAIN = 5.0


def _grain(size: tuple[int, int], seed: int):
    """Sensor-like RGB grain, a little larger than the photos: each photo crops its own part."""
    from PIL import Image

    width, height = size[0] + 64, size[1] + 64
    rng = np.random.default_rng(seed)
    noise = np.clip(rng.normal(128, GRAIN, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(noise)


_GRAIN_CACHE: dict = {}


def write_photo(path: Path, seed: int, size: tuple[int, int] = SOURCE_SIZE) -> int:
    """One photo-like JPEG (quality 90) at ``path``; returns its size in bytes."""
    from PIL import Image, ImageChops, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size
    field = rng.integers(30, 230, (6, 8, 3), dtype=np.uint8)  # smooth light and colour
    image = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(14):  # hard-edged objects
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        box = (x0, y0, x0 + rng.uniform(0.05, 0.4) * width, y0 + rng.uniform(0.05, 0.4) * height)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse(box, fill=fill)
        elif shape == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (5, 2)) * size], fill=fill)
    x0, y0 = int(rng.uniform(0, 0.6) * width), int(rng.uniform(0, 0.6) * height)
    step = int(rng.integers(3, 8))  # a finely striped patch: fabric, foliage, brickwork
    for x in range(x0, x0 + int(0.3 * width), step):
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line((x, y0, x + height // 13, y0 + int(0.3 * height)), fill=fill, width=step // 2)
    if size not in _GRAIN_CACHE:  # one per process
        _GRAIN_CACHE[size] = _grain(size, 0)
    grain = _GRAIN_CACHE[size]
    dx, dy = (int(v) for v in rng.integers(0, 64, 2))
    grain = grain.crop((dx, dy, dx + width, dy + height))
    image = ImageChops.add(image, grain, scale=1.0, offset=-128)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)
    return path.stat().st_size


def synthetic_photos(folder: Path, count: int) -> tuple[Path, float]:
    """``count`` photo-like JPEGs in ``CLASSES`` class folders (reused when complete).

    Returns:
        The folder and the JPEGs' mean density in bits per pixel.
    """
    stamp = folder / ".complete"
    wanted = f"{count} {SOURCE_SIZE} {CLASSES} {GRAIN} v1"
    if not (stamp.exists() and stamp.read_text().startswith(wanted + "\n")):
        paths = [folder / f"class_{i % CLASSES}" / f"{i:05d}.jpg" for i in range(count)]
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            sizes = list(pool.map(write_photo, paths, range(count), chunksize=16))
        bits = 8 * sum(sizes) / (count * SOURCE_SIZE[0] * SOURCE_SIZE[1])
        stamp.write_text(f"{wanted}\n{bits:.3f}")
    return folder, float(stamp.read_text().split("\n")[1])


def _compare(
    raw: Path, work: Path, count: int, repeats: int, prefix: Sequence[str] = ()
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and peak RSS (bytes) of both sides, runs alternating.

    ``prefix`` goes before both commands (``taskset -c 0``: both on one CPU).
    """
    params = _params_file(work, TARGET)
    variants: dict[str, Callable[[], ProcessRun]] = {
        "naive": lambda: _naive(raw, TARGET, prefix),
        "stage": lambda: _stage(raw, work / "out", params, count, prefix),
    }
    runs: dict[str, list[ProcessRun]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            runs[name].append(function())
    seconds = {name: median([r.seconds for r in values]) for name, values in runs.items()}
    peak = {name: median([r.peak_rss_bytes for r in values]) for name, values in runs.items()}
    return seconds, peak


def per_image_ms(folder: Path, count: int) -> dict[str, float]:
    """Single-thread milliseconds per photo, in one process, files already in memory.

    ``naive``: what the naive loop does to one photo; ``stage``: the stage's decode (DCT
    scaling to 1/4 here) and area average; ``entropy_floor``: a decode at 1/8 scale, almost
    only the entropy (Huffman) decoding that every decode of the file must do. The floor
    bounds the stage's speed-up: on n CPUs, at best naive / (floor / n).
    """
    import io
    import time

    from PIL import Image

    from tasks.imaging import DRAFT_MARGIN, resize

    files = [path.read_bytes() for path in sorted(folder.glob("*/*.jpg"))[:count]]
    height, width = TARGET

    def naive(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            np.asarray(image.convert("RGB").resize((width, height)), np.float64)

    def stage(data: bytes, scale: float = DRAFT_MARGIN) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (int(width * scale), int(height * scale)))
            resize(image.convert("RGB"), (width, height))

    def floor(data: bytes) -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()

    timings = {}
    for name, function in (("naive", naive), ("stage", stage), ("entropy_floor", floor)):
        runs = []
        for _ in range(3):
            started = time.perf_counter()
            for data in files:
                function(data)
            runs.append((time.perf_counter() - started) / len(files) * 1e3)
        timings[name] = round(median(runs), 2)
    return timings


def run(work: Path, quick: bool) -> list[Result]:
    """Generate (or reuse) the photos, warm the page cache, time both sides."""
    count = 100 if quick else IMAGES
    noisy_count = 40 if quick else NOISY_IMAGES
    repeats = 1 if quick else 3
    work.mkdir(parents=True, exist_ok=True)
    raw, bits_per_pixel = synthetic_photos(work / f"photos-{count}", count)
    noisy = synthetic_images(work / f"noisy-{noisy_count}", noisy_count, SOURCE_SIZE)
    one_count = 40 if quick else ONE_CPU_IMAGES
    one_raw, _ = synthetic_photos(work / f"photos-{one_count}", one_count)
    for folder in (raw, noisy, one_raw):  # into the page cache: neither side pays the first read
        for path in folder.glob("*/*"):
            path.read_bytes()
    load_before = load_average()
    seconds, peak = _compare(raw, work, count, repeats)
    noisy_seconds, _ = _compare(noisy, work, noisy_count, repeats)
    # Both on one CPU: what the stage gains per core. The naive loop uses one core whatever
    # the machine; the stage's threads use them all, so its speed-up grows with the cores.
    one_cpu = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]  # util-linux
    one_cpu_seconds, _ = _compare(one_raw, work, one_count, repeats, one_cpu)
    per_image = per_image_ms(raw, 20 if quick else 100)
    cpus = len(os.sched_getaffinity(0))
    load_after = load_average()
    speedup = round(seconds["naive"] / seconds["stage"], 2)
    details = {
        "summary": f"{count / seconds['stage']:.1f} vs {count / seconds['naive']:.1f} images/s; "
        f"peak {peak['stage'] / 2**20:.0f} vs {peak['naive'] / 2**20:.0f} MiB; "
        f"both on one CPU: {one_cpu_seconds['naive'] / one_cpu_seconds['stage']:.2f}x; "
        f"bound on {cpus} CPUs: {per_image['naive'] / (per_image['entropy_floor'] / cpus):.1f}x",
        "images": count,
        "source": f"{SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} photo-like JPEG, quality 90, "
        f"{bits_per_pixel:.2f} bits/pixel",
        "target": f"{TARGET[0]}x{TARGET[1]}",
        "repeats": repeats,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "images_per_s": {k: round(count / v, 1) for k, v in seconds.items()},
        "peak_rss_mib": {k: round(v / 2**20) for k, v in peak.items()},
        "noisy_images": noisy_count,
        "noisy_speedup": round(noisy_seconds["naive"] / noisy_seconds["stage"], 2),
        "noisy_seconds": {k: round(v, 2) for k, v in noisy_seconds.items()},
        "one_cpu_speedup": round(one_cpu_seconds["naive"] / one_cpu_seconds["stage"], 2),
        "one_cpu_seconds": {k: round(v, 2) for k, v in one_cpu_seconds.items()},
        "cpus": cpus,
        "per_image_ms_one_thread": per_image,
        "bound_on_these_cpus": round(per_image["naive"] / (per_image["entropy_floor"] / cpus), 1),
        "load_average": [load_before, load_after],
    }
    return [Result("prepare_large_speedup", speedup, ">= 8", "x", details=details)]
