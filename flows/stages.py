"""What DVC knows about the stages, asked once per run, and how one stage is run through DVC.

* :func:`read_pipeline` reads the graph from ``dvc.yaml`` (DVC's own index, topologically sorted,
  ties kept in ``dvc.yaml`` order) and ``dvc status`` for every stage, in this process and
  in one go, and turns each stale stage's status into a reason a person can read
  ("params train.epochs 3 -> 5", "tasks/train.py modified").
* :func:`repro` runs one stage with ``dvc repro --single-item`` in a subprocess (which keeps
  TensorFlow out of the orchestrating process) and streams its output line by line.
* :func:`save_experiment` records the workspace as a DVC experiment (``dvc exp save``), so
  ``dvc exp show`` compares runs side by side.

DVC stays the one source of truth for what is cached: nothing here stores hashes.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCK_FILE = "dvc.lock"
DVC_LOCKED = "Unable to acquire lock"
TRANSIENT_MARKERS = ("could not download",)  # tasks.fetch, after its own retries ran out

Emit = Callable[[int, str], None]


class StageFailedError(RuntimeError):
    """A stage's command failed; the message is the stage's own error line."""

    def __init__(self, stage: str, error: str):
        super().__init__(f"stage {stage} failed: {error}")
        self.stage = stage
        self.error = error


class TransientStageError(StageFailedError):
    """A stage failed in a way a later attempt may fix (a download that kept failing)."""


class DvcBusyError(RuntimeError):
    """DVC's own repo lock is held by another DVC process."""


DVC_BUSY_MESSAGE = (
    "DVC's repo lock is held by another DVC process in this workspace (for example a "
    "`dvc repro` started by hand); two writers would corrupt each other's outputs. Wait "
    "for it to finish and run again."
)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as DVC sees it before the run.

    Attributes:
        name: the stage name in ``dvc.yaml``.
        needs: the stages whose outputs it reads directly (the graph's edges).
        upstream: the stages whose outputs it depends on, directly or not.
        stale: whether ``dvc status`` reports it changed.
        reason: why it is stale ("" when it is up to date).
        force: run the stage with ``-f`` (``read_pipeline`` never sets it: DVC itself
            tracks the outside sources, see ``dvc.yaml``).
    """

    name: str
    needs: tuple[str, ...]
    upstream: tuple[str, ...]
    stale: bool
    reason: str
    force: bool = False


@dataclass(frozen=True)
class PlotFile:
    """A plot output of a stage and its ``dvc.yaml`` properties (template, x, y)."""

    path: str
    props: Mapping[str, Any]


@dataclass(frozen=True)
class Pipeline:
    """The pipeline as read from ``dvc.yaml`` and ``dvc status``.

    Attributes:
        root: the project root.
        stages: the stages, dependencies first.
        metrics: each stage's metrics files (paths relative to ``root``).
        plots: each stage's plot files.
        uncached_outputs: metrics and plots not in the DVC cache (git-tracked results),
            which an experiment must include to be comparable.
        scm: whether the project is a git repo with a commit (needed by ``dvc exp save``).
    """

    root: Path
    stages: tuple[Stage, ...]
    metrics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    plots: Mapping[str, tuple[PlotFile, ...]] = field(default_factory=dict)
    uncached_outputs: tuple[str, ...] = ()
    scm: bool = True

    @property
    def names(self) -> list[str]:
        """Stage names, dependencies first."""
        return [stage.name for stage in self.stages]


@dataclass(frozen=True)
class StageRun:
    """What ``dvc repro --single-item`` did with one stage."""

    stage: str
    ran: bool
    restored: bool
    seconds: float


def read_pipeline(root: Path) -> Pipeline:
    """Read the stage graph and every stage's status, once, with DVC's Python API.

    Raises:
        DvcBusyError: another DVC process holds the repo lock.
    """
    import networkx as nx
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.scm import NoSCM
    from dvc.stage import PipelineStage

    try:
        with Repo(str(root)) as repo:
            status = repo.status()
            graph = repo.index.graph  # edges point from a stage to the stages it needs
            stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
            position = {stage: index for index, stage in enumerate(stages)}
            pipeline_graph = graph.subgraph(stages).reverse(copy=True)
            ordered = list(
                nx.lexicographical_topological_sort(pipeline_graph, key=lambda s: position[s])
            )
            metrics: dict[str, tuple[str, ...]] = {}
            plots: dict[str, tuple[PlotFile, ...]] = {}
            uncached: list[str] = []
            for stage in ordered:
                metrics[stage.name] = tuple(o.def_path for o in stage.outs if o.metric)
                plots[stage.name] = tuple(
                    PlotFile(o.def_path, dict(o.plot) if isinstance(o.plot, dict) else {})
                    for o in stage.outs
                    if o.plot
                )
                uncached += [
                    o.def_path for o in stage.outs if (o.metric or o.plot) and not o.use_cache
                ]
            needs, upstream = {}, {}
            for stage in ordered:
                direct = set(pipeline_graph.predecessors(stage))
                needed = nx.ancestors(pipeline_graph, stage)
                needs[stage.name] = tuple(s.name for s in ordered if s in direct)
                upstream[stage.name] = tuple(s.name for s in ordered if s in needed)
            scm = not isinstance(repo.scm, NoSCM) and not repo.scm.no_commits
    except LockError:
        raise DvcBusyError(DVC_BUSY_MESSAGE) from None

    locked = _read_lock(root)
    result = []
    for stage in ordered:
        name = stage.name
        entries = status.get(name)
        reason = describe_status(name, entries, locked, root) if entries else ""
        result.append(Stage(name, needs[name], upstream[name], bool(entries), reason))
    return Pipeline(root, tuple(result), metrics, plots, tuple(uncached), scm)


def describe_status(name: str, entries: list[Any], locked: Mapping[str, Any], root: Path) -> str:
    """Turn one stage's ``dvc status`` entries into a short reason.

    Args:
        name: the stage name.
        entries: its entries from ``dvc status`` (``{"changed deps": {...}}``, ...).
        locked: the ``stages`` mapping of ``dvc.lock``.
        root: the project root (params files are read from it).

    Returns:
        e.g. ``"params train.epochs 3 -> 5; tasks/train.py modified"``.
    """
    if name not in locked:
        return "never ran here (no entry in dvc.lock)"
    reasons: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            reasons.append(
                {"changed checksum": "its dvc.yaml definition changed"}.get(entry, entry)
            )
            continue
        for kind, changes in entry.items():
            noun = "output" if kind == "changed outs" else ""
            for path, change in changes.items():
                if isinstance(change, dict):  # a params file: {"train": "modified", ...}
                    reasons.append(_params_reason(name, path, change, locked, root))
                else:
                    reasons.append(" ".join(filter(None, (noun, path, change))))
    return "; ".join(reasons)


def _params_reason(
    name: str, path: str, change: Mapping[str, str], locked: Mapping[str, Any], root: Path
) -> str:
    before = locked.get(name, {}).get("params", {}).get(path, {})
    now = _load_yaml(root / path)
    diffs: list[str] = []
    for key, kind in change.items():
        if kind != "modified":
            diffs.append(f"{key} {kind}")
            continue
        new = _lookup(now, key)
        diffs += _diff(key, before.get(key), new)
    shown = ", ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
    return f"params {shown}"


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += _diff(f"{prefix}.{key}", old.get(key), new.get(key))
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _read_lock(root: Path) -> dict[str, Any]:
    return _load_yaml(root / LOCK_FILE).get("stages", {})


def _load_yaml(path: Path) -> dict[str, Any]:
    """Read YAML as DVC does (ruamel, YAML 1.2: ``1e-05`` is a float, not a string)."""
    from dvc.utils.serialize import YAMLFileCorruptedError, load_yaml

    try:
        return load_yaml(path) or {}
    except (FileNotFoundError, YAMLFileCorruptedError):
        return {}


def dvc_command(*args: str) -> list[str]:
    """``dvc <args>`` run with this interpreter, so the same environment runs the stages."""
    return [sys.executable, "-m", "dvc", *args]


def subprocess_env() -> dict[str, str]:
    """The environment for DVC subprocesses: this venv first on PATH, unbuffered output."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }


def repro(root: Path, stage: str, emit: Emit, force: bool = False) -> StageRun:
    """Run one stage with ``dvc repro --single-item``; DVC decides whether it must run.

    Args:
        root: the project root.
        stage: the stage name.
        emit: called with (logging level, line) for every line the stage prints.
        force: run it even if DVC thinks it is up to date (``-f``): its source changed.

    Returns:
        Whether DVC ran the command or restored the outputs from its run cache.

    Raises:
        DvcBusyError: another DVC process holds the repo lock.
        TransientStageError: the stage failed on the network; a retry may help.
        StageFailedError: the stage failed; the message is its own error line.
    """
    started = time.perf_counter()
    tail: collections.deque[str] = collections.deque(maxlen=200)
    ran = restored = False
    with subprocess.Popen(
        dvc_command("repro", "--single-item", *(["-f"] if force else []), stage),
        cwd=root,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,  # universal newlines: tqdm's "\r" updates arrive as lines too
        errors="replace",
        bufsize=1,
        start_new_session=True,  # its own process group: DVC and the stage stop together
    ) as process:
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                tail.append(line)
                ran |= line.startswith(f"Running stage '{stage}'")
                restored |= line.startswith(f"Stage '{stage}' is cached")
                emit(line_level(line), line)
            code = process.wait()
        except BaseException:  # cancelled or interrupted: leave no stage running behind us
            _stop_group(process)
            raise
    if code != 0:
        raise classify_failure(stage, list(tail))
    return StageRun(stage, ran, restored and not ran, time.perf_counter() - started)


def _stop_group(process: subprocess.Popen) -> None:
    """Stop DVC and the stage command it started, gently first.

    SIGINT is a KeyboardInterrupt in both, so the stage's ``atomic_path`` blocks remove
    their temporary files; SIGTERM and SIGKILL follow if they do not stop in time.
    """
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def line_level(line: str) -> int:
    """The logging level a stage's output line deserves (ERROR/WARNING lines stand out)."""
    head = line[:80]
    if head.startswith("ERROR") or " ERROR " in head:
        return logging.ERROR
    if head.startswith("WARNING") or " WARNING " in head:
        return logging.WARNING
    return logging.INFO


def classify_failure(stage: str, lines: list[str]) -> Exception:
    """The error to raise for a failed ``dvc repro``, from the last lines it printed.

    The stage's own ``ERROR: <stage>: ...`` line (written by ``tasks.common.run_stage``) is
    preferred to DVC's generic "failed to reproduce"; DVC's lock error and a download that
    kept failing get their own types, so callers can react (fail clearly, or retry).
    """
    text = "\n".join(lines)
    if DVC_LOCKED in text:
        return DvcBusyError(DVC_BUSY_MESSAGE)
    own = [line for line in lines if line.startswith(f"ERROR: {stage}: ")]
    errors = [line for line in lines if line.startswith("ERROR")]
    if own:
        error = own[-1].removeprefix(f"ERROR: {stage}: ")
    elif errors:
        error = errors[0].removeprefix("ERROR: ")
    else:
        error = lines[-1] if lines else "no output"
    kind = TransientStageError if any(m in error for m in TRANSIENT_MARKERS) else StageFailedError
    return kind(stage, error)


def restore_outputs(root: Path, stage: str, emit: Emit) -> None:
    """Put a failed stage's outputs back as ``dvc.lock`` records them (``dvc checkout``).

    ``dvc repro`` deletes a stage's outputs before running it; after a failure this brings
    the previous, complete outputs back from the DVC cache. Best effort: a stage that never
    succeeded has nothing to restore.
    """
    result = _dvc_quietly(root, "checkout", "--force", stage)
    if result.returncode == 0:
        emit(logging.INFO, f"restored the previous outputs of {stage} from the DVC cache")
    else:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        emit(logging.WARNING, f"could not restore the outputs of {stage}: {last[0]}")


def _dvc_quietly(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a short DVC command, capturing its output; the caller reads the exit code."""
    return subprocess.run(
        dvc_command(*args),
        cwd=root,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def save_experiment(root: Path, name: str | None, include: list[str]) -> str:
    """Record the workspace as a DVC experiment, for ``dvc exp show``.

    Args:
        root: the project root.
        name: the experiment name (e.g. the Prefect flow run's name); when it is taken or
            not a valid name, DVC picks one.
        include: untracked result files (metrics, plots) to commit with it.

    Returns:
        The experiment's name.

    Raises:
        RuntimeError: ``dvc exp save`` failed; the message is DVC's.
    """
    include_args = [arg for path in include if (root / path).exists() for arg in ("-I", path)]
    attempts = [["-n", name], []] if name and re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) else [[]]
    error = ""
    for naming in attempts:
        result = _dvc_quietly(root, "exp", "save", *naming, *include_args)
        if result.returncode == 0:
            saved = re.search(r"saved as: (\S+)", result.stdout + result.stderr)
            return saved.group(1) if saved else (name or "?")
        error = (result.stderr or result.stdout).strip()
    raise RuntimeError(f"dvc exp save failed: {error}")
