"""``tlp report``: one self-contained HTML file per run, readable offline.

``dvc plots show`` writes an HTML page that loads its charting library from a CDN, so it is
blank offline. This report needs nothing but the file: its charts are inline SVG (drawn by
matplotlib), its pictures data URIs, and there is no script. It shows the run's metrics
(every metrics file of ``dvc.yaml``), the training curves (the top-level ``plots:`` of
``dvc.yaml``), the confusion matrix and per-class scores (the ``evaluate`` stage's plots),
the pictures the stages drew, the params, and the lineage: the git commit and, from
``dvc.lock``, the hash and size of every data and model file the stages read and wrote.

The run is the workspace (what the last run left) or a saved one (``tlp runs`` names
them): its files are then read from the experiment's git commit.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from flows.workspace import PARAMS_FILE, dotted_keys
from tasks.params import parse_yaml

REPORTS_DIR = "reports"
LOCK_FILE = "dvc.lock"
CODE_DIRS = ("tasks/",)  # dependencies that are code, not data: left out of the lineage
Reader = Callable[[str], bytes | None]


@dataclass(frozen=True)
class RunFiles:
    """Where a run's files are read from.

    Attributes:
        name: the run (an experiment's name, or ``workspace``).
        rev: the git commit (for the workspace: HEAD).
        when: when the run was saved (the workspace: when its metrics were written).
        dirty: whether the workspace differs from ``rev`` (always False for a saved run).
        read: a project-relative path -> its bytes, or None if absent.
        listing: a project-relative folder -> the files under it (relative paths).
    """

    name: str
    rev: str
    when: datetime | None
    dirty: bool
    read: Reader
    listing: Callable[[str], list[str]]


def write_report(root: Path, name: str | None = None, out: Path | None = None) -> Path:
    """Write the report of the workspace (``name`` None) or of a saved run; return its path.

    Args:
        root: the project root.
        name: a saved run's name (``tlp runs``), or None for the workspace.
        out: the HTML file to write (default ``reports/<name>.html``).

    Raises:
        ValueError: there is no saved run of that name.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        files = _run_files(repo, root, name)
        stages = [s for s in repo.index.stages if getattr(s, "name", None)]
        outs = {stage.name: list(stage.outs) for stage in stages}
    dvc_yaml = parse_yaml((files.read("dvc.yaml") or b"").decode(), "dvc.yaml") or {}
    page = render(files, outs, dvc_yaml.get("plots") or [])
    out = out or root / REPORTS_DIR / f"{files.name}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _run_files(repo: Any, root: Path, name: str | None) -> RunFiles:
    head = repo.scm.get_rev()
    if name is None:
        metrics = [root / o.def_path for s in repo.index.stages for o in s.outs if o.metric]
        stamps = [p.stat().st_mtime for p in metrics if p.exists()]
        when = datetime.fromtimestamp(max(stamps)) if stamps else None

        def listing(folder: str) -> list[str]:
            return sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*")
                          if p.is_file())  # fmt: skip

        def read(path: str) -> bytes | None:
            return (root / path).read_bytes() if (root / path).is_file() else None

        return RunFiles("workspace", head, when, repo.scm.is_dirty(), read, listing)
    saved = repo.experiments.ls(all_commits=True).values()  # (name, rev) by baseline
    found = {exp_name: rev for runs in saved for exp_name, rev in runs}
    if name not in found:
        known = ", ".join(sorted(found)) or "none yet"
        raise ValueError(f"no saved run named {name!r} (saved runs: {known}); see `tlp runs`")
    rev, fs = found[name], repo.scm.get_fs(found[name])
    prefix = str(PurePosixPath(Path(root).relative_to(repo.scm.root_dir)))
    prefix = "" if prefix == "." else prefix + "/"
    when = datetime.fromtimestamp(repo.scm.resolve_commit(rev).commit_time)

    def read_rev(path: str) -> bytes | None:
        return fs.cat_file(prefix + path) if fs.isfile(prefix + path) else None

    def listing_rev(folder: str) -> list[str]:
        found_files = fs.find(prefix + folder) if fs.isdir(prefix + folder) else []
        return sorted(path.removeprefix(prefix) for path in found_files)

    return RunFiles(name, rev, when, False, read_rev, listing_rev)


def render(files: RunFiles, outs: Mapping[str, list[Any]], plots: Iterable[Any]) -> str:
    """The report's HTML: one page, no script, nothing loaded from anywhere."""
    sections = [
        _metrics_section(files, outs),
        _curves_section(files, plots),
        _confusion_section(files, outs.get("evaluate", [])),
        _pictures_section(files, outs),
        _params_section(files),
        _lineage_section(files),
    ]
    title = f"tlp run {files.name}"
    when = files.when.strftime("%Y-%m-%d %H:%M") if files.when else "unknown"
    commit = files.rev[:10] + (" with uncommitted changes" if files.dirty else "")
    body = "\n".join(section for section in sections if section)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{_e(title)}</h1><p class='meta'>{_e(when)} · git {_e(commit)}</p>\n"
        f"{_headline(files, outs.get('evaluate', []))}{body}\n</body></html>\n"
    )


def _headline(files: RunFiles, evaluate_outs: list[Any]) -> str:
    """The test accuracy and macro F1, first (from the evaluate stage's metrics file)."""
    for out in evaluate_outs:
        data = _json(files.read(out.def_path)) if out.metric else None
        if isinstance(data, dict) and "accuracy" in data:
            shown = [f"{label} <b>{_number(data[key])}</b>" for key, label in
                     (("accuracy", "test accuracy"), ("macro_f1", "macro F1")) if key in data]  # fmt: skip
            return f"<p class='headline'>{' · '.join(shown)}</p>\n"
    return ""


def _metrics_section(files: RunFiles, outs: Mapping[str, list[Any]]) -> str:
    rows = []
    for stage, stage_outs in outs.items():
        for out in stage_outs:
            data = _json(files.read(out.def_path)) if out.metric else None
            for key, value in dotted_keys(data if isinstance(data, dict) else {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    rows.append((stage, out.def_path, key, _number(value)))
    if not rows:
        return ""
    return "<h2>Metrics</h2>" + _table(["stage", "file", "metric", "value"], rows, "metrics")


def _curves_section(files: RunFiles, plots: Iterable[Any]) -> str:
    """One chart per metric; a series per folder (``train/loss.tsv``, ``eval/loss.tsv``)."""
    charts: dict[str, dict[str, tuple[list[float], list[float]]]] = defaultdict(dict)
    for entry in plots:
        path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
        x = (props or {}).get("x", "step")
        for file in files.listing(path) or [path]:
            if not file.endswith((".tsv", ".csv")) or (text := files.read(file)) is None:
                continue
            rows = list(csv.DictReader(io.StringIO(text.decode()), delimiter=_sep(file)))
            series = PurePosixPath(file).parent.name
            for column in [c for c in (rows[0] if rows else {}) if c != x]:
                points = [(float(r[x]), float(r[column])) for r in rows if r.get(column)]
                charts[column][series] = ([p[0] for p in points], [p[1] for p in points])
    if not charts:
        return ""
    svgs = [f"<figure>{_chart(name, series)}</figure>" for name, series in sorted(charts.items())]
    return "<h2>Training curves</h2><div class='charts'>" + "".join(svgs) + "</div>"


def _confusion_section(files: RunFiles, evaluate_outs: list[Any]) -> str:
    parts = []
    for out in evaluate_outs:
        props = out.plot if isinstance(out.plot, dict) else {}
        text = files.read(out.def_path) if props else None
        if text is None:
            continue
        rows = list(csv.DictReader(io.StringIO(text.decode())))
        if props.get("template") == "confusion":
            actual, predicted = props.get("x", "actual"), props.get("y", "predicted")
            parts.append(_matrix(Counter((r[actual], r[predicted]) for r in rows)))
        elif props.get("y") == "class" and rows:
            columns = list(rows[0])
            cells = [[_number(_float(row[c])) if c != "class" else row[c] for c in columns]
                     for row in rows]  # fmt: skip
            parts.append("<h3>Per class</h3>" + _table(columns, cells, "per-class"))
    return "<h2>Test split</h2>" + "".join(parts) if parts else ""


def _matrix(counts: Counter) -> str:
    names = sorted({name for pair in counts for name in pair}, key=_natural)
    top = max(counts.values(), default=1)
    correct, total = sum(counts[(n, n)] for n in names), sum(counts.values())
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    lines = [f"<h3>Confusion matrix</h3><p>Rows: the actual class; columns: the predicted "
             f"class. {correct} of {total} test images on the diagonal.</p>"
             f"<table class='confusion'><tr><th>actual \\ predicted</th>{head}</tr>"]  # fmt: skip
    for actual in names:
        cells = []
        for predicted in names:
            count = counts[(actual, predicted)]
            shade = 0.08 + 0.8 * count / top if count else 0
            hue = "40, 110, 200" if actual == predicted else "200, 60, 40"
            cells.append(f"<td style='background: rgba({hue}, {shade:.2f})'>{count}</td>")
        lines.append(f"<tr><th>{_e(actual)}</th>{''.join(cells)}</tr>")
    return "".join(lines) + "</table>"


def _pictures_section(files: RunFiles, outs: Mapping[str, list[Any]]) -> str:
    pictures = []
    for stage_outs in outs.values():
        for out in stage_outs:
            if out.plot and out.def_path.endswith(".png") and (data := files.read(out.def_path)):
                uri = "data:image/png;base64," + base64.b64encode(data).decode()
                pictures.append(f"<figure><img alt='{_e(out.def_path)}' src='{uri}'>"
                                f"<figcaption>{_e(out.def_path)}</figcaption></figure>")  # fmt: skip
    return "<h2>Pictures</h2>" + "".join(pictures) if pictures else ""


def _params_section(files: RunFiles) -> str:
    text = files.read(PARAMS_FILE)
    return f"<h2>Params</h2><pre>{_e(text.decode())}</pre>" if text else ""


def _lineage_section(files: RunFiles) -> str:
    lock = parse_yaml((files.read(LOCK_FILE) or b"").decode(), LOCK_FILE) or {}
    rows = []
    for stage, entry in (lock.get("stages") or {}).items():
        for kind in ("deps", "outs"):
            for item in entry.get(kind) or []:
                path = item.get("path", "")
                if kind == "deps" and path.startswith(CODE_DIRS):
                    continue
                rows.append((stage, "reads" if kind == "deps" else "writes", path,
                             item.get("md5") or item.get("etag") or "", _size(item.get("size"))))  # fmt: skip
    commit = f"<p>git commit <code>{_e(files.rev)}</code>" + (
        " with uncommitted changes</p>" if files.dirty else "</p>"
    )
    table = _table(["stage", "", "path", "hash (dvc.lock)", "size"], rows, "lineage")
    return "<h2>Lineage</h2>" + commit + (table if rows else "<p>no dvc.lock</p>")


def _chart(name: str, series: Mapping[str, tuple[list[float], list[float]]]) -> str:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    from matplotlib import pyplot

    pyplot.rcParams["svg.hashsalt"] = "tlp"  # the same ids in every report: stable diffs
    figure, axes = pyplot.subplots(figsize=(5, 3.2))
    for label, (xs, ys) in sorted(series.items()):
        axes.plot(xs, ys, marker="o", label=label)
    axes.set_title(name)
    axes.set_xlabel("epoch (step)")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    stream = io.StringIO()
    figure.savefig(stream, format="svg", bbox_inches="tight", metadata={"Date": None})
    pyplot.close(figure)
    svg = stream.getvalue()
    return svg[svg.index("<svg") :]


def _table(header: list[str], rows: Iterable[Iterable[Any]], kind: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{kind}'><tr>{head}</tr>{body}</table>"


def _json(data: bytes | None) -> Any:
    try:
        return json.loads(data) if data else None
    except ValueError:
        return None


def _sep(path: str) -> str:
    return "\t" if path.endswith(".tsv") else ","


def _float(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.3g}"
    return str(value)


def _size(size: Any) -> str:
    return f"{size:,} B" if isinstance(size, int) else ""


def _natural(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222;
       padding: 0 1em; }
h1 { margin-bottom: 0.1em; } .meta { color: #666; margin-top: 0; }
.headline { font-size: 1.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
td { text-align: right; } .lineage td, .metrics td { text-align: left; }
.confusion td { min-width: 2.5em; text-align: center; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0 0 1em; } img { max-width: 100%; } figcaption { color: #666; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 13px; }
code { font-size: 13px; }
"""
