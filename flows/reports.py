"""The content of the Prefect artifacts, built from the files the stages wrote.

Pure functions from files to tables and Markdown: the flow decides when to publish them,
these decide what they say. Nothing here imports Prefect.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage in one flow run.

    Attributes:
        stage: the stage name.
        outcome: ``ran`` | ``cached`` (up to date, nothing done) | ``restored`` (DVC took
            the outputs from its run cache) | ``failed`` | ``not run`` (an upstream failed).
        seconds: wall time spent on it.
        why: why it ran (from ``dvc status`` before the run), or why it did not.
    """

    stage: str
    outcome: str
    seconds: float
    why: str

    def to_row(self) -> dict[str, Any]:
        """One row of the stages table."""
        return {
            "stage": self.stage,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 1),
            "why": self.why,
        }


def stages_table(outcomes: list[StageOutcome]) -> list[dict[str, Any]]:
    """The per-stage table: outcome, time and reason, in pipeline order."""
    return [outcome.to_row() for outcome in outcomes]


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The scalar metrics of a metrics file (``metrics/eval.json``) as metric/value rows."""
    return [
        {"metric": key, "value": _round(value)}
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def confusion_counts(
    path: Path, actual: str = "actual", predicted: str = "predicted"
) -> dict[tuple[str, str], int]:
    """Count (actual, predicted) pairs in a confusion CSV (DVC's ``confusion`` plot data)."""
    with path.open(newline="", encoding="utf-8") as handle:
        return dict(Counter((row[actual], row[predicted]) for row in csv.DictReader(handle)))


def confusion_markdown(
    counts: dict[tuple[str, str], int], classes: list[str], per_class: dict[str, Any] | None = None
) -> str:
    """The confusion matrix (rows actual, columns predicted) and per-class scores as Markdown.

    Args:
        counts: (actual, predicted) -> count, from :func:`confusion_counts`.
        classes: class names in display order; classes seen only in ``counts`` are appended.
        per_class: ``metrics/eval.json``'s ``per_class`` mapping, if any.

    Returns:
        Markdown with one table for the matrix (diagonal in bold) and one for the scores.
    """
    names = list(classes) + sorted({c for pair in counts for c in pair} - set(classes))
    total = sum(counts.values())
    correct = sum(counts.get((name, name), 0) for name in names)
    lines = [
        f"**Confusion matrix**: rows are the actual class, columns the predicted class; "
        f"{correct} of {total} test images on the diagonal.",
        "",
        "| actual \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for actual in names:
        cells = []
        for predicted in names:
            count = counts.get((actual, predicted), 0)
            cells.append(f"**{count}**" if actual == predicted else str(count))
        lines.append(f"| **{actual}** | " + " | ".join(cells) + " |")
    if per_class:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        for name in names:
            scores = per_class.get(name, {})
            lines.append(
                f"| {name} | {_fmt(scores.get('precision'))} | {_fmt(scores.get('recall'))} | "
                f"{_fmt(scores.get('f1'))} | {scores.get('support', '')} |"
            )
    return "\n".join(lines) + "\n"


def parity_table(
    export: dict[str, Any], atol: float, min_top1_agreement: float
) -> list[dict[str, Any]]:
    """The ONNX export's parity result (``metrics/export.json``) against its gates.

    Args:
        export: the export metrics.
        atol: ``export.atol``, the largest allowed |ONNX - Keras| probability difference.
        min_top1_agreement: ``export.min_top1_agreement``.

    Returns:
        check/value/limit/passed rows.
    """
    agreement = export.get("top1_agreement")
    diff = export.get("max_abs_diff")
    rows = [
        {
            "check": "top-1 agreement, ONNX vs Keras",
            "value": _round(agreement),
            "limit": f">= {min_top1_agreement}",
            "passed": agreement is not None and agreement >= min_top1_agreement,
        },
        {
            "check": "max |ONNX - Keras| probability",
            "value": diff,
            "limit": f"<= {atol}",
            "passed": diff is not None and diff <= atol,
        },
    ]
    for key in ("parity_images", "opset", "onnx_bytes"):
        if key in export:
            rows.append({"check": key, "value": export[key], "limit": "", "passed": ""})
    return rows


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
