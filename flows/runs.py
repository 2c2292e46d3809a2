"""``tlp runs``: the recorded runs side by side, one line each, read from DVC's experiments.

Every ``tlp run`` that did work is saved as a DVC experiment (``dvc exp save``) named after
its Prefect flow run, and its commit message ends with a git trailer saying how long the
run took (:func:`run_message`). :func:`recorded_runs` reads them back with DVC's Python API
(``Repo.experiments``): when, which params differ from the commit the run started from,
the test accuracy and macro F1 of the ``evaluate`` stage's metrics file, and the duration.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from flows.workspace import PARAMS_FILE, dotted_keys

SECONDS_TRAILER = "Tlp-Run-Seconds"  # a git trailer in the experiment's commit message
METRICS_STAGE = "evaluate"  # whose metrics file holds the test accuracy and macro F1
WIDTH = 120


@dataclass(frozen=True)
class RecordedRun:
    """One saved run.

    Attributes:
        name: the experiment's name (the Prefect flow run's).
        rev: its git commit.
        when: when it was saved.
        changed: params that differ from the commit it started from: ``key -> (then, now)``.
        accuracy: the test accuracy, if the run has it.
        macro_f1: the test macro F1, if the run has it.
        seconds: how long the run took, if ``tlp run`` recorded it.
    """

    name: str
    rev: str
    when: datetime | None
    changed: Mapping[str, tuple[Any, Any]]
    accuracy: float | None
    macro_f1: float | None
    seconds: float | None


def run_message(name: str, seconds: float, ran: Sequence[str]) -> str:
    """The commit message of a saved run, with its duration as a git trailer."""
    return f"tlp run {name}: ran {', '.join(ran)}\n\n{SECONDS_TRAILER}: {seconds:.1f}\n"


def recorded_runs(root: Path) -> list[RecordedRun]:
    """Every run saved as a DVC experiment in the project, newest first."""
    from dvc.repo import Repo

    runs: list[RecordedRun] = []
    with Repo(str(root)) as repo:
        baselines = list(repo.experiments.ls(all_commits=True))
        if not baselines:
            return []
        metrics_files = [out.def_path for stage in repo.index.stages
                         if getattr(stage, "name", None) == METRICS_STAGE
                         for out in stage.outs if out.metric]  # fmt: skip
        states = repo.experiments.show(
            revs=baselines, hide_queued=True, hide_failed=True, hide_workspace=True
        )
        for baseline in states:
            before = _params(baseline)
            for experiment in baseline.experiments or []:
                head = experiment.revs[0]
                if head.data is None:
                    continue
                message = repo.scm.resolve_commit(head.rev).message
                metrics = _metrics(head, metrics_files)
                runs.append(
                    RecordedRun(
                        name=experiment.name or head.name or head.rev[:7],
                        rev=head.rev,
                        when=head.data.timestamp,
                        changed=_changed(before, _params(head)),
                        accuracy=metrics.get("accuracy"),
                        macro_f1=metrics.get("macro_f1"),
                        seconds=_seconds(message),
                    )
                )
    return sorted(runs, key=lambda run: run.when or datetime.min, reverse=True)


def table(runs: Sequence[RecordedRun], width: int = WIDTH) -> str:
    """The runs as a text table no wider than ``width``; what changed is cut to fit."""
    name_width = min(24, max([len("run"), *(len(run.name) for run in runs)]))
    header = f"{'run':<{name_width}}  {'when':<16}  accuracy  macro F1  {'time':>7}  changed"
    lines = [header]
    for run in runs:
        name = run.name if len(run.name) <= name_width else run.name[: name_width - 1] + "…"
        when = run.when.strftime("%Y-%m-%d %H:%M") if run.when else "?"
        left = (f"{name:<{name_width}}  {when:<16}  {_number(run.accuracy):>8}  "
                f"{_number(run.macro_f1):>8}  {_duration(run.seconds):>7}  ")  # fmt: skip
        lines.append(left + _fit(_changes(run.changed), width - len(left)))
    return "\n".join(lines)


def to_csv(runs: Sequence[RecordedRun]) -> str:
    """The runs as CSV, nothing cut: name, rev, when (ISO 8601), accuracy, macro_f1,
    seconds, changed (``key: then -> now`` joined by ``; ``)."""
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["name", "rev", "when", "accuracy", "macro_f1", "seconds", "changed"])
    for run in runs:
        writer.writerow([
            run.name, run.rev, run.when.isoformat() if run.when else "",
            "" if run.accuracy is None else run.accuracy,
            "" if run.macro_f1 is None else run.macro_f1,
            "" if run.seconds is None else run.seconds, _changes(run.changed),
        ])  # fmt: skip
    return stream.getvalue()


def _params(state: Any) -> dict[str, Any]:
    result = (state.data.params if state.data else {}).get(PARAMS_FILE, {})
    return dotted_keys(result.get("data") or {})


def _metrics(state: Any, files: Sequence[str]) -> dict[str, Any]:
    for path in files:
        data = state.data.metrics.get(path, {}).get("data")
        if isinstance(data, dict):
            return data
    return {}


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = [*after, *(key for key in before if key not in after)]
    return {key: (before.get(key), after.get(key)) for key in keys
            if before.get(key) != after.get(key)}  # fmt: skip


def _seconds(message: str) -> float | None:
    found = re.search(rf"^{SECONDS_TRAILER}: *([0-9.]+) *$", message, re.MULTILINE)
    return float(found.group(1)) if found else None


def _changes(changed: Mapping[str, tuple[Any, Any]]) -> str:
    if not changed:
        return "-"
    return "; ".join(f"{key}: {json.dumps(then)} -> {json.dumps(now)}"
                     for key, (then, now) in changed.items())  # fmt: skip


def _fit(text: str, room: int) -> str:
    if len(text) <= room:
        return text
    cut = text[: max(0, room - 12)]
    shown = cut.rsplit("; ", 1)[0] if "; " in cut else cut[:-1] + "…"
    return f"{shown} (+{text.count('; ') - shown.count('; ')} more)"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"
