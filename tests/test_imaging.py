"""``tasks.imaging``: fast on real photos, bounded on hostile files.

* JPEG photos several times the target size are decoded at a reduced DCT scale
  (``Image.draft``); the pixels stay within a stated tolerance of the full decode.
* Only regular files are read, within a size cap; a FIFO or ``/dev/zero`` never hangs.
* Memory is bounded per image, not only per count of images: 16-bit 10,000 x 10,000 PNGs
  go through ``prepare`` and ``tlp predict`` in under 1 GiB (measured by the kernel, in
  the command's own process, ``tests/peakmemory.py``).
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from tasks import imaging
from tasks.imaging import Item, decode
from tasks.params import with_changes
from tests.conftest import PARAMS, ROOT
from tests.peakmemory import run_measured
from tests.test_predict import color_model, save
from tests.test_prepare import png_chunk

GIB = 2**30


def synthetic_photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: gradients, hard-edged shapes, fine stripes, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        pixels[..., channel] = (
            rng.uniform(40, 200)
            + rng.uniform(-60, 60) * xx / width
            + rng.uniform(-60, 60) * yy / height
        )
    for _ in range(12):  # discs
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.03, 0.2) * min(width, height)
        pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = rng.uniform(0, 255, 3)
    for _ in range(6):  # rectangles
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(5, width // 3), y0 + rng.integers(5, height // 3)
        pixels[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    stripes = 20 * np.sin(xx / rng.uniform(1.5, 6)) * (yy > height / 2)  # fine texture
    pixels += stripes[..., None] + rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, path: Path, orientation: int = 1) -> Path:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    image.save(path, "JPEG", quality=90, exif=exif)
    return path


def full_decode(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """The reference: decode every pixel, apply EXIF orientation, then the same resize."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image.convert("RGB"))
    height, width = image_size
    return np.asarray(imaging.resize(upright, (width, height)))


class RecordingBudget(imaging.MemoryBudget):
    """The real budget, remembering what each decode reserved."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.reserved: list[int] = []

    @contextmanager
    def reserve(self, nbytes: int):
        self.reserved.append(nbytes)
        with super().reserve(nbytes):
            yield


@pytest.fixture
def budget(monkeypatch) -> RecordingBudget:
    recording = RecordingBudget(imaging.DECODE_BUDGET.limit)
    monkeypatch.setattr(imaging, "DECODE_BUDGET", recording)
    return recording


# ---------------------------------------------------------------- A: photos decode fast


# (source width, height), EXIF orientation, target (height, width), DCT scale expected
PHOTOS = [
    ((4000, 3000), 1, (224, 224), 8),
    ((2000, 1500), 1, (224, 224), 4),
    ((2000, 1500), 1, (32, 32), 8),
    ((3000, 2000), 6, (100, 200), 4),  # portrait photo stored landscape, non-square target
    ((1600, 1200), 3, (299, 299), 2),
    ((1200, 900), 8, (224, 224), 2),
    ((900, 700), 1, (224, 224), 2),
    ((600, 450), 1, (224, 224), 1),  # under 3x: decoded in full
]


@pytest.mark.parametrize(("source", "orientation", "target", "scale"), PHOTOS)
def test_large_jpegs_decode_at_reduced_scale_within_the_stated_tolerance(
    tmp_path, budget, source, orientation, target, scale
):
    """The stated tolerance (README, prepare row): against the full decode and the same
    resize, the mean absolute difference is under 3 grey levels (of 255), the 99th
    percentile at most 20 and the largest difference at most 96 (at hard edges and fine
    stripes, where the scaled IDCT rings). Measured over 26 such photos: at most 2.51, 18
    and 81; the worst cases keep 1.5-2x the target after the reduced decode."""
    path = jpeg(synthetic_photo(*source, seed=sum(source)), tmp_path / "photo.jpg", orientation)
    result = decode(Item("photo.jpg", "", path), with_changes(PARAMS.prepare, image_size=target))
    assert result.reason == "" and result.pixels.shape == (*target, 3)
    assert (result.width, result.height) == source  # the file's size, not the decoded one

    # Decoded at 1/scale: the budget was asked for that many pixels (4 bytes each), not more.
    stored_pixels = -(-source[0] // scale) * -(-source[1] // scale)
    assert stored_pixels * 4 <= budget.reserved[0] < stored_pixels * 4 + 4 * 2**20

    difference = np.abs(result.pixels.astype(int) - full_decode(path, target))
    if scale == 1:
        assert difference.max() == 0
    assert difference.mean() < 3.0, difference.mean()
    assert np.percentile(difference, 99) <= 20, np.percentile(difference, 99)
    assert difference.max() <= 96, difference.max()


def test_exif_orientation_is_applied_after_the_reduced_decode(tmp_path):
    """A landscape-stored JPEG tagged 'rotate 90' comes out portrait, the right way up."""
    stored = np.zeros((1200, 1600, 3), np.uint8)
    stored[:, :800] = (255, 0, 0)  # left half red in the stored pixels
    path = jpeg(Image.fromarray(stored), tmp_path / "r.jpg", orientation=6)  # 90 clockwise
    result = decode(Item("r", "", path), with_changes(PARAMS.prepare, image_size=(64, 32)))
    top, bottom = result.pixels[:24].mean(axis=(0, 1)), result.pixels[-24:].mean(axis=(0, 1))
    assert top[0] > 240 and bottom[0] < 15  # upright: the stored left half is on top


# ---------------------------------------------------------------- C: only regular files


def _decode_with_hang_guard(item: Item, **changes) -> imaging.Decoded:
    """Decode in a daemon thread; a decode that blocks (today's FIFO case) fails the test."""
    results: list[imaging.Decoded] = []
    worker = threading.Thread(
        target=lambda: results.append(decode(item, with_changes(PARAMS.prepare, **changes))),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=60)
    assert results, f"decode({item.file}) did not return: it blocked on the file"
    return results[0]


def test_fifos_devices_and_oversized_files_are_refused_unread(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jpg"
    zero.symlink_to("/dev/zero")
    sparse = tmp_path / "sparse.png"
    with sparse.open("wb") as handle:
        handle.truncate(imaging.max_file_bytes(10_000) + 1)  # no disk used: a hole

    reasons = {
        path.name: _decode_with_hang_guard(Item(path.name, "", path), max_pixels=10_000).reason
        for path in (fifo, zero, sparse)
    }
    assert reasons["pipe.jpg"] == "not a regular file: a FIFO (named pipe)"
    assert reasons["zero.jpg"] == "not a regular file: a device"
    assert reasons["sparse.png"].startswith("file too large: ")
    assert "prepare.max_pixels" in reasons["sparse.png"]

    real = tmp_path / "real.png"
    Image.new("RGB", (20, 20), (9, 8, 7)).save(real)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    assert decode(Item("l", "", link), PARAMS.prepare).reason == ""  # DVC may link its cache
    refused = decode(Item("l", "", link, follow_symlinks=False), PARAMS.prepare)
    assert refused.reason == "not a regular file: a symbolic link"  # as predict reads folders


# ---------------------------------------------------------------- B: memory per image


def test_budget_serves_in_order_and_an_oversized_reservation_runs_alone():
    budget = imaging.MemoryBudget(100)
    entered: list[tuple[str, int]] = []
    release = {name: threading.Event() for name in "abc"}

    def hold(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            entered.append((name, budget.used))
            release[name].wait(timeout=60)

    def start(name: str, nbytes: int, queued: int) -> threading.Thread:
        thread = threading.Thread(target=hold, args=(name, nbytes), daemon=True)
        thread.start()
        for _ in range(6000):  # bounded wait for the thread to hold or queue its reservation
            with budget._changed:
                if len(entered) + len(budget._queue) >= queued:
                    break
            threading.Event().wait(0.01)
        return thread

    threads = [start("a", 60, 1), start("b", 500, 2), start("c", 10, 3)]
    # c would fit beside a (60 + 10 <= 100) but queues behind b: first come, first served
    assert entered == [("a", 60)]
    release["a"].set()
    release["b"].set()
    release["c"].set()
    for thread in threads:
        thread.join(timeout=60)
    assert entered == [("a", 60), ("b", 100), ("c", 10)]  # b alone, capped at the budget
    assert budget.used == 0


def gray16_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit greyscale PNG (a horizontal ramp 0..65535), streamed: a few MiB to write.

    Pillow cannot write 16-bit PNGs this large itself; every row is the same, so zlib
    squeezes 200 MB of pixels into about 1.5 MB.
    """
    ramp = np.arange(width, dtype=np.uint32) * 65535 // (width - 1)
    row = b"\x00" + ramp.astype(">u2").tobytes()
    compressor = zlib.compressobj(9)
    with path.open("wb") as handle:
        header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
        handle.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header))
        data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
        handle.write(png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_16bit_pngs(tmp_path_factory) -> Path:
    """raw/a: three 10,000 x 10,000 16-bit PNGs (200 MB of pixels each) and 5 small images."""
    raw = tmp_path_factory.mktemp("huge") / "raw"
    for name in "ab":
        (raw / name).mkdir(parents=True)
        for index in range(5):
            value = (index * 40, 100, 200 if name == "a" else 0)
            Image.new("RGB", (24, 24), value).save(raw / name / f"small{index}.png")
    first = gray16_png(raw / "a" / "huge0.png", 10_000, 10_000)
    for index in (1, 2):
        (raw / "a" / f"huge{index}.png").write_bytes(first.read_bytes())
    return raw


def test_prepare_decodes_16bit_10000x10000_pngs_in_under_1_gib(tmp_path, huge_16bit_pngs):
    out = tmp_path / "prepared"
    run = run_measured(
        [sys.executable, "-m", "tasks.prepare", "--raw", huge_16bit_pngs, "--out", out], ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 13 and report["rejected"] == 0  # accepted, not refused
    assert run.peak_bytes < GIB, f"prepare peaked at {run.peak_bytes / 2**20:.0f} MiB"

    manifest = pd.read_parquet(out / "manifest.parquet")
    row = manifest[manifest.path == "raw/a/huge0.png"].iloc[0]
    shard = np.load(out / "shards" / row.shard, mmap_mode="r")[row.offset]
    assert (row.width, row.height) == (10_000, 10_000)
    assert shard[:, 0].max() <= 8 and shard[:, -1].min() >= 247  # the ramp, black to white
    assert (np.diff(shard[0, :, 0].astype(int)) >= 0).all()


def test_predict_decodes_16bit_10000x10000_pngs_in_under_1_gib(tmp_path, huge_16bit_pngs):
    model = save(color_model(), tmp_path / "model.onnx")
    command = [sys.executable, "-m", "flows.cli", "predict", "--model", model, "--jsonl"]
    run = run_measured([*command, huge_16bit_pngs / "a"], ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(answers) == 8 and all("label" in answer for answer in answers)
    assert run.peak_bytes < GIB, f"tlp predict peaked at {run.peak_bytes / 2**20:.0f} MiB"


def test_decoding_16bit_greyscale_uses_no_float_copy(tmp_path, budget):
    """A 16-bit image is shrunk as 16-bit and scaled with integers: the reservation is the
    decoded image (2 bytes a pixel) and the resize's intermediate, nothing 8 bytes a pixel."""
    path = gray16_png(tmp_path / "g.png", 1000, 800)
    result = decode(Item("g", "", path), with_changes(PARAMS.prepare, image_size=(16, 16)))
    assert result.reason == "" and result.pixels[:, 0].max() <= 8
    assert result.pixels[:, -1].min() >= 247
    assert budget.reserved == [1000 * 800 * 2 + 16 * 800 * 4]
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10), 32896, np.uint16)).save(buffer, "PNG")
    (tmp_path / "mid.png").write_bytes(buffer.getvalue())
    mid = decode(Item("m", "", tmp_path / "mid.png"), with_changes(PARAMS.prepare, image_size=(8, 8)))  # fmt: skip
    assert (mid.pixels == 128).all()  # 32896 / 257 exactly, as 255/65535 scaling gives
