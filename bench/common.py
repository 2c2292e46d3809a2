"""Shared by the benchmarks: results, machine facts, timed subprocesses, synthetic data."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.params import with_changes
from tests.conftest import PARAMS, make_project  # the shipped params; the project copy
from tests.peakmemory import LAUNCHER

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@dataclass
class Result:
    """One figure in ``bench/results.json``.

    ``value`` compares against ``goal`` (a string such as ``">= 50"``); ``None`` with a
    ``skipped`` reason when the benchmark could not run here.
    """

    name: str
    value: float | None
    goal: str | None
    unit: str
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def __post_init__(self) -> None:
        if self.met is None and self.value is not None and self.goal:
            self.met = goal_met(self.value, self.goal)

    def to_json(self) -> dict[str, Any]:
        """The JSON entry (``skipped`` only when set)."""
        data = asdict(self)
        if data["skipped"] is None:
            del data["skipped"]
        return data


def goal_met(value: float, goal: str) -> bool:
    """Whether ``value`` satisfies a goal written as ``">= 8"`` or ``"<= 1.0"``."""
    operator, number = goal.split()
    return value >= float(number) if operator == ">=" else value <= float(number)


def skipped(name: str, goal: str | None, unit: str, reason: str) -> Result:
    """A result that records why the benchmark did not run."""
    return Result(name, None, goal, unit, skipped=f"skipped: {reason}")


# ---------------------------------------------------------------- the machine


def machine_info() -> dict[str, Any]:
    """Date, CPU model, cores, memory and load: what the figures were measured on."""
    cpu = "unknown"
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    memory_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "simd": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni") if f in flags),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(memory_kib / 1024**2, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": _versions(),
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    names = ("tensorflow-cpu", "keras", "onnxruntime", "onnx", "numpy", "pillow", "dvc", "prefect")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def load_average() -> float:
    """The 1-minute load average (to judge how noisy a figure is)."""
    return round(os.getloadavg()[0], 2)


# ---------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    """The median, rounded for the report."""
    return float(statistics.median(values))


@dataclass
class ProcessRun:
    """A finished subprocess: wall time, peak memory and output."""

    seconds: float
    peak_rss_bytes: int
    peak_tree_rss_bytes: int
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> ProcessRun:
        """Raise with the output tail when the process failed."""
        if self.returncode != 0:
            raise RuntimeError(
                f"{what} exited {self.returncode}\nstdout:\n{self.stdout[-3000:]}\n"
                f"stderr:\n{self.stderr[-5000:]}"
            )
        return self


def env_with_venv(extra: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, str]:
    """The environment for a child: venv tools first on PATH, the project importable."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = str(cwd or ROOT)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TLP_NO_PROGRESS", "1")
    env.update(extra or {})
    return env


def run_process(
    cmd: Sequence[str | Path],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    *,
    sample_tree: bool = False,
    timeout: float = 3600,
) -> ProcessRun:
    """Run a command to completion; measure its wall time and peak resident memory.

    ``seconds`` and ``peak_rss_bytes`` come from a tiny launcher process that forks and
    execs the command (``tests.peakmemory.LAUNCHER``): the wall time from fork to exit, and
    the kernel's high-water mark (``wait4``'s ``ru_maxrss``) of the command and the children
    it waited for, i.e. its largest single process. With ``sample_tree`` the summed RSS of the whole
    process tree is also sampled every 0.1 s (``psutil``): what a pipeline of several
    processes really holds at once.
    """
    import tempfile

    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.TemporaryDirectory() as scratch,
    ):
        report = Path(scratch) / "usage.json"
        launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report)]
        process = subprocess.Popen(
            [*launcher, *(str(c) for c in cmd)],
            cwd=cwd,
            env=env or env_with_venv(cwd=cwd),
            stdout=out,
            stderr=err,
            start_new_session=True,  # so a timeout can stop the command with its launcher
        )
        tree_peak = [0]
        stop = threading.Event()
        sampler = None
        if sample_tree:
            sampler = threading.Thread(
                target=_sample_tree, args=(process.pid, tree_peak, stop), daemon=True
            )
            sampler.start()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        stop.set()
        if sampler is not None:
            sampler.join()
        usage = (
            json.loads(report.read_text()) if report.exists() else {"seconds": 0.0, "maxrss_kib": 0}
        )
        out.seek(0)
        err.seek(0)
        return ProcessRun(
            usage["seconds"],
            usage["maxrss_kib"] * 1024,
            tree_peak[0],
            process.returncode,
            out.read(),
            err.read(),
        )


def _sample_tree(pid: int, peak: list[int], stop: threading.Event) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        peak[0] = max(peak[0], total)
        stop.wait(0.1)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """``(seconds, result)`` of one call."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


# ---------------------------------------------------------------- synthetic data


def synthetic_images(
    folder: Path,
    count: int,
    size: tuple[int, int],
    classes: int = 4,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ``count`` JPEGs of ``size`` (width, height) in ``classes`` class folders.

    Each class has its own colour and stripe direction, with noise, so the images are
    learnable and compress like photos rather than flat colour. Reuses a complete folder.
    """
    from PIL import Image

    stamp = folder / ".complete"
    wanted = f"{count} {size} {classes} {seed} {quality}"
    if stamp.exists() and stamp.read_text() == wanted:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    for index in range(count):
        label = index % classes
        base = np.array([60 + 50 * label, 200 - 40 * label, 90 + 30 * (label % 2)], np.float32)
        stripes = np.sin((xx if label % 2 else yy) / (4 + label) + rng.uniform(0, 6.28))[..., None]
        pixels = base + 40 * stripes + rng.normal(0, 25, (height, width, 3))
        target = folder / f"class_{label}" / f"{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=quality)
    stamp.write_text(wanted)
    return folder


def prepared_dataset(work: Path, count: int, image_size: tuple[int, int], **prepare_params: Any):
    """A prepared dataset of synthetic photos, made with the real prepare stage (reused)."""
    from tasks.dataset import Prepared
    from tasks.prepare import prepare

    height, width = image_size
    params = with_changes(PARAMS.prepare, image_size=image_size, **prepare_params)
    name = f"prepared-{count}-{height}x{width}-" + "-".join(
        f"{k}{v}" for k, v in sorted(prepare_params.items())
    )
    out = work / name
    if not (out / "report.json").exists():
        raw = synthetic_images(work / f"photos-{count}-{width}x{height}", count, (width, height))
        shutil.rmtree(out, ignore_errors=True)
        prepare(params, raw, out)
    return Prepared.open(out)


def copy_project(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """A fresh copy of the pipeline in ``dest``, as the tests make it (any older one goes)."""
    shutil.rmtree(dest, ignore_errors=True)
    return make_project(dest, params)
