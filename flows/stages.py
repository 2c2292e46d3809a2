"""What DVC knows about the stages before a run: the graph, each stage's status and why.

:func:`read_pipeline` asks DVC's Python API once: the stages from its index, topologically
sorted with ties kept in ``dvc.yaml`` order, and ``Repo.status()`` for all of them, turned
into reasons a person can read ("params train.epochs 3 -> 5", "tasks/train.py modified").
:func:`run_reason` says which stages must run once others have run: ``tlp status`` predicts
with it, the flow decides with it. DVC stays the one source of truth for what is cached:
nothing here stores hashes. Importing this module imports neither DVC nor Prefect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.workspace import lookup

if TYPE_CHECKING:
    from dvc.repo import Repo

LOCK_FILE = "dvc.lock"
DVC_BUSY_MESSAGE = (
    "DVC's repo lock is held by another DVC process in this workspace (for example a "
    "`dvc repro` started by hand); two writers would corrupt each other's outputs. Wait "
    "for it to finish and run again."
)


class DvcBusyError(RuntimeError):
    """DVC's own repo lock (or a stage's output lock) is held by another DVC process."""


class StageFailedError(RuntimeError):
    """A stage's command failed; the message is the stage's own error."""

    def __init__(self, stage: str, error: str):
        super().__init__(f"stage {stage} failed: {error}")
        self.stage = stage
        self.error = error


class TransientStageError(StageFailedError):
    """A stage failed in a way a later attempt may fix (exit 75: a download kept failing)."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as DVC sees it before the run.

    Attributes:
        name: the stage name in ``dvc.yaml``.
        needs: the stages whose outputs it reads directly (the graph's edges).
        upstream: the stages whose outputs it depends on, directly or not.
        reason: why ``dvc status`` reports it changed ("" when it is up to date).
    """

    name: str
    needs: Sequence[str]
    upstream: Sequence[str]
    reason: str


@dataclass(frozen=True)
class Pipeline:
    """The pipeline as read from DVC's index and status: the project root, the stages
    (dependencies first), and each stage's metrics files (those listed at the top of
    ``dvc.yaml`` included) and plot files (paths relative to the root; a plot is its
    ``dvc.yaml`` properties with its ``path``)."""

    root: Path
    stages: Sequence[Stage]
    metrics: Mapping[str, Sequence[str]] = field(default_factory=dict)
    plots: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Stage names, dependencies first."""
        return [stage.name for stage in self.stages]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy (what the DVC worker sends to the flow)."""
        return {**asdict(self), "root": str(self.root)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pipeline:
        """The inverse of :meth:`to_json`."""
        stages = [Stage(**stage) for stage in data["stages"]]
        return cls(Path(data["root"]), stages, data["metrics"], data["plots"])


def run_reason(stage: Stage, changed: Iterable[str]) -> str:
    """Why ``stage`` must run, given the stages that ran before it; "" if it need not.

    Args:
        stage: the stage, as read before the run.
        changed: stages that ran (or will run) earlier in the same run.
    """
    if stage.reason:
        return stage.reason
    changed = set(changed)
    after = [name for name in stage.upstream if name in changed]
    return f"needs new outputs of {', '.join(after)}" if after else ""


def read_pipeline(repo: Repo) -> Pipeline:
    """Read the stage graph and every stage's status, once, with DVC's Python API.

    Args:
        repo: the open DVC repository (``Repo.status`` takes its lock if it is not held).

    Raises:
        dvc.lock.LockError: another DVC process holds the repo lock.
        tasks.params.ParamsError: DVC cannot parse a dependency, because of a param.
        tasks.common.StageError: a source folder holds what DVC cannot hash.
    """
    import networkx as nx
    from dvc.stage import PipelineStage

    root = Path(repo.root_dir)
    _check_inputs(repo)
    status = repo.status()
    stages = [s for s in repo.index.stages if isinstance(s, PipelineStage)]
    position = {stage: index for index, stage in enumerate(stages)}
    graph = repo.index.graph.subgraph(stages).reverse(copy=True)  # edges: needed -> needing
    ordered = list(nx.lexicographical_topological_sort(graph, key=lambda s: position[s]))
    locked = _load_yaml(root / LOCK_FILE).get("stages", {})
    top_level = top_level_metrics(root)
    result, metrics, plots = [], {}, {}
    for stage in ordered:
        name, outs = stage.name, stage.outs
        metrics[name] = [o.def_path for o in outs if o.metric or o.def_path in top_level]
        plots[name] = [{**(o.plot if isinstance(o.plot, dict) else {}), "path": o.def_path}
                       for o in outs if o.plot]  # fmt: skip
        direct, needed = set(graph.predecessors(stage)), nx.ancestors(graph, stage)
        entries = status.get(name)
        result.append(
            Stage(
                name,
                [s.name for s in ordered if s in direct],
                [s.name for s in ordered if s in needed],
                describe_status(name, entries, locked, root) if entries else "",
            )
        )
    return Pipeline(root, result, metrics, plots)


def _check_inputs(repo: Repo) -> None:
    """Refuse, with the stages' own errors, what DVC would trip on: a dependency it cannot
    parse (DVC's ``Invalid IPv6 URL`` names no key: the params check names it), and folders
    that stages read and no stage writes (``fetch.source``) holding entries DVC cannot hash
    (``Repo.status`` fails on a symlink loop with a traceback, and waits forever on a FIFO)."""
    from tasks.fetch import check_source_folder
    from tasks.params import load_params

    try:
        stages = repo.index.stages
    except ValueError:
        load_params(Path(repo.root_dir) / "params.yaml")  # ParamsError, naming the key
        raise
    outputs = {out.fs_path for stage in stages for out in stage.outs}
    for stage in stages:
        for dep in stage.deps:
            if (
                dep.fs.protocol == "local"
                and dep.fs_path not in outputs
                and dep.fs.isdir(dep.fs_path)
            ):
                check_source_folder(Path(dep.fs_path))


def top_level_metrics(root: Path) -> set[str]:
    """The metrics files listed at the top of ``dvc.yaml`` (outputs of stages that are shown
    after the stages' own metrics files; dvc.yaml says which and why)."""
    return set(_load_yaml(root / "dvc.yaml").get("metrics", []))


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
        diffs += _diff(key, before.get(key), lookup(now, key))
    shown = ", ".join(diffs[:6]) + (f" (+{len(diffs) - 6} more)" if len(diffs) > 6 else "")
    return f"params {shown}"


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += _diff(f"{prefix}.{key}", old.get(key), new.get(key))
        return out
    return [] if old == new else [f"{prefix} {old!r} -> {new!r}"]


def _load_yaml(path: Path) -> dict[str, Any]:
    """Read YAML as DVC does (ruamel, YAML 1.2: ``1e-05`` is a float, not a string)."""
    from dvc.utils.serialize import YAMLFileCorruptedError, load_yaml

    try:
        return load_yaml(path) or {}
    except (FileNotFoundError, YAMLFileCorruptedError):
        return {}
