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
    """What happened to one stage in one flow run: ``outcome`` is ``ran``, ``cached`` (up
    to date), ``restored`` (from DVC's run cache), ``failed`` or ``not run`` (an upstream
    failed); ``seconds`` the wall time (0.1 s); ``why`` the reason it ran, or did not."""

    stage: str
    outcome: str
    seconds: float
    why: str


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


def per_class_scores(path: Path) -> dict[str, dict[str, Any]]:
    """Per-class precision, recall, F1 and support from the evaluate stage's CSV, by class."""
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row["class"]: {key: float(value) if key != "support" else int(value)
                           for key, value in row.items() if key != "class"}
            for row in csv.DictReader(handle)
        }  # fmt: skip


def confusion_markdown(
    counts: dict[tuple[str, str], int], classes: list[str], per_class: dict[str, Any] | None = None
) -> str:
    """The confusion matrix (rows actual, columns predicted) and per-class scores as Markdown.

    Args:
        counts: (actual, predicted) -> count, from :func:`confusion_counts`.
        classes: class names in display order; classes seen only in ``counts`` are appended.
        per_class: per-class scores from :func:`per_class_scores`, if any.

    Returns:
        Markdown with one table for the matrix (diagonal in bold) and one for the scores.
    """
    names = list(classes) + sorted({c for pair in counts for c in pair} - set(classes))
    correct = sum(counts.get((name, name), 0) for name in names)
    lines = [
        f"**Confusion matrix**: rows are the actual class, columns the predicted class; "
        f"{correct} of {sum(counts.values())} test images on the diagonal.",
        "",
        "| actual \\ predicted | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for actual in names:
        cells = [str(counts.get((actual, predicted), 0)) for predicted in names]
        cells[names.index(actual)] = f"**{cells[names.index(actual)]}**"  # the diagonal
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


def parity_table(export: dict[str, Any], atol: float, min_agreement: float) -> list[dict]:
    """The ONNX export's parity (``metrics/export.json``) against its gates: check, value,
    limit, passed rows (``atol`` and ``min_agreement`` are ``export.atol`` and
    ``export.min_top1_agreement``)."""
    agreement, diff = export.get("top1_agreement"), export.get("max_abs_diff")
    rows = [
        ("top-1 agreement, ONNX vs Keras", _round(agreement), f">= {min_agreement}",
         agreement is not None and agreement >= min_agreement),
        ("max |ONNX - Keras| probability", diff, f"<= {atol}", diff is not None and diff <= atol),
        *((key, export[key], "", "") for key in ("parity_images", "opset", "onnx_bytes")
          if key in export),
    ]  # fmt: skip
    return [dict(zip(("check", "value", "limit", "passed"), row, strict=True)) for row in rows]


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))
