"""``python -m bench [--only NAME[,NAME]] [--quick]``: run benchmarks, record their figures.

Each benchmark runs the project's path and a baseline side by side in the same run, and
returns :class:`bench.common.Result` entries. A full run updates ``bench/results.json``
(entries of the benchmarks that ran are replaced, others kept) and the table between the
``results`` markers of ``bench/README.md``. ``--quick`` shrinks every size for a smoke run
and writes ``bench/work/results-quick.json`` only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import ROOT, Result, machine_info

BENCH = ROOT / "bench"
RESULTS = BENCH / "results.json"
README = BENCH / "README.md"
HISTORY = BENCH / "history.jsonl"
WORK = BENCH / "work"

# benchmark group → (module, the result names it produces)
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "head": ("bench.head", ("head_epoch_speedup", "head_total_speedup")),
    "prepare": ("bench.prepare", ("prepare_speedup", "prepare_memory_ratio")),
    "prepare_large": ("bench.prepare_large", ("prepare_large_speedup",)),
    "predict": ("bench.predict", ("predict_cold_start_s", "predict_cold_start_speedup")),
    "peak": ("bench.peak", ("extract_peak_fraction",)),
    "noop": ("bench.noop", ("noop_rerun_ratio", "noop_rerun_ratio_embedded")),
    "fashion": ("bench.fashion", ("fashion_mnist_e2e", "fashion_mnist_e2e_peak_memory")),
    "int8": ("bench.int8", ("int8_speedup", "int8_speedup_batch1")),
    "sweep": ("bench.sweep", ("sweep_parallel_ratio",)),
}
ORDER = [name for names in (g[1] for g in GROUPS.values()) for name in names]


def select(only: str | None) -> list[str]:
    """Benchmark groups named by ``--only`` (group or result names), in the standard order.

    Raises:
        SystemExit: for an unknown name, listing the known ones.
    """
    if not only:
        return list(GROUPS)
    wanted = set()
    for name in (part.strip() for part in only.split(",") if part.strip()):
        group = (
            name if name in GROUPS else next((g for g, (_, r) in GROUPS.items() if name in r), None)
        )
        if group is None:
            known = ", ".join([*GROUPS, *ORDER])
            raise SystemExit(f"bench: unknown benchmark {name!r}; known: {known}")
        wanted.add(group)
    return [g for g in GROUPS if g in wanted]


def wait_for_quiet(load: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until the 1-minute load average is under ``load``.

    The machine is shared: someone else's test run halves every figure. Returns the load
    average when the wait ended.
    """
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run_group(group: str, work: Path, quick: bool) -> list[Result]:
    """Run one group; a crash becomes a ``skipped`` entry with the error, not a lost run."""
    module_name, names = GROUPS[group]
    started = time.perf_counter()
    print(f"bench: {group} ...", file=sys.stderr, flush=True)
    try:
        results = importlib.import_module(module_name).run(work / group, quick)
    except Exception as exc:  # noqa: BLE001  (recorded with its traceback, never swallowed)
        traceback.print_exc()
        reason = f"failed: {type(exc).__name__}: {str(exc)[:400]}"
        return [Result(name, None, None, "", skipped=reason) for name in names]
    for result in results:
        result.details.setdefault("bench_seconds", round(time.perf_counter() - started, 1))
        state = (
            "skipped"
            if result.skipped
            else {True: "met", False: "MISSED", None: "reported"}[result.met]
        )
        print(
            f"bench: {result.name} = {result.value} {result.unit} (goal {result.goal}): {state}",
            file=sys.stderr,
        )
    return results


def merge(previous: dict, machine: dict, results: list[Result], quick: bool) -> dict:
    """The new results document: fresh entries replace those of the same name."""
    fresh = {r.name: {**r.to_json(), "measured": machine["date"]} for r in results}
    kept = {e["name"]: e for e in previous.get("results", []) if e["name"] not in fresh}
    entries = {**kept, **fresh}
    ordered = sorted(
        entries.values(), key=lambda e: ORDER.index(e["name"]) if e["name"] in ORDER else 99
    )
    return {"machine": machine, "quick": quick, "results": ordered}


def _fmt(value, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "x":
        return f"{value:g}×"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:g} {unit}".strip()


def _s(value) -> str:
    return f"{value:.2f} s" if isinstance(value, int | float) else "?"


# One line of context per figure, from its details (older entries may lack some keys).
NOTES = {
    "head_epoch_speedup": lambda d: (
        f"naive epoch {_s(d.get('naive_epoch_s'))}, cached head "
        f"epoch {_s(d.get('cached_epoch_s'))} ({d.get('images', {}).get('train')} train images)"
    ),
    "head_total_speedup": lambda d: (
        f"naive 10 epochs {_s(d.get('naive_total_s'))} "
        f"(extrapolated from 3), cached {_s(d.get('cached_total_s'))} incl. extraction "
        f"{_s(d.get('cached_extraction_s'))}"
    ),
    "prepare_speedup": lambda d: (
        f"{d.get('images_per_s', {}).get('stage')} vs "
        f"{d.get('images_per_s', {}).get('naive')} images/s (whole processes); at 32x32: "
        f"{d.get('speedup_at_32x32')}x"
    ),
    "prepare_memory_ratio": lambda d: (
        f"peak {d.get('peak_rss_mib', {}).get('stage')} vs "
        f"{d.get('peak_rss_mib', {}).get('naive')} MiB (naive array alone: "
        f"{d.get('naive_array_mib')} MiB)"
    ),
    "prepare_large_speedup": lambda d: (
        f"{d.get('images_per_s', {}).get('stage')} vs {d.get('images_per_s', {}).get('naive')} "
        f"images/s, peak {d.get('peak_rss_mib', {}).get('stage')} vs "
        f"{d.get('peak_rss_mib', {}).get('naive')} MiB ({d.get('source')}); noise-heavy "
        f"JPEGs: {d.get('noisy_speedup')}x"
    ),
    "predict_cold_start_s": lambda d: (
        f"{d.get('command')}; python -m tasks.predict {_s(d.get('median_s', {}).get('module'))}"
    ),
    "predict_cold_start_speedup": lambda d: (
        f"Keras {_s(d.get('keras_median_s'))} vs {_s(d.get('tlp_median_s'))}"
    ),
    "extract_peak_fraction": lambda d: (
        f"{d.get('extract_gflop_s')} of {d.get('peak_gflop_s')} GFLOP/s on "
        f"{d.get('engine')}; with the one-off conversion ({d.get('conversion_s')} s): "
        f"{d.get('fraction_with_conversion')}; Keras engine: {d.get('keras_engine_fraction')}"
    ),
    "noop_rerun_ratio": lambda d: (
        f"tlp run {_s(d.get('tlp_run_server_s'))} vs dvc repro {_s(d.get('dvc_repro_s'))}"
    ),
    "noop_rerun_ratio_embedded": lambda d: (
        f"tlp run {_s(d.get('tlp_run_embedded_s'))} (temporary Prefect server started in the run)"
    ),
    "fashion_mnist_e2e": lambda d: (
        f"{d.get('images')} images, {d.get('epochs_run')} epochs, "
        f"test accuracy {d.get('test_accuracy')}"
    ),
    "fashion_mnist_e2e_peak_memory": lambda d: (
        f"largest single process {d.get('peak_single_process_rss_gib')} GiB"
    ),
    "int8_speedup": lambda d: (
        f"batch 32: float {d.get('median_ms', {}).get('batch_32', {}).get('float')} ms vs int8 "
        f"{d.get('median_ms', {}).get('batch_32', {}).get('int8')} ms"
        + "".join(
            f"; {k.replace('_', ' ')}: {v}x" for k, v in d.get("batch_32_speedup_if", {}).items()
        )
    ),
    "int8_speedup_batch1": lambda d: (
        f"batch 1: float {d.get('median_ms', {}).get('float')} ms vs int8 "
        f"{d.get('median_ms', {}).get('int8')} ms"
    ),
    "sweep_parallel_ratio": lambda d: (
        f"4 runs: --parallel 2 {_s(d.get('parallel_2_s'))} vs --parallel 1 "
        f"{_s(d.get('parallel_1_s'))}; served from the shared cache: "
        f"{d.get('served_from_cache', {}).get('parallel_2')}"
    ),
}


def table(document: dict) -> str:
    """The Markdown results table, with the machine it was measured on."""
    machine = document["machine"]
    lines = [
        f"Machine: {machine['cpu']} ({machine['simd']}), {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB RAM; Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + ". The machine is shared: *load* is the 1-minute load average at the start and end "
        "of each benchmark (2 cores: above 2, something else was competing).",
        "",
        "| benchmark | value | goal | met | measured, load | notes |",
        "|---|---|---|---|---|---|",
    ]
    for entry in document["results"]:
        details = entry.get("details", {})
        met = "—" if entry.get("met") is None else ("yes" if entry["met"] else "**no**")
        note = entry.get("skipped") or NOTES.get(entry["name"], lambda d: "")(details)
        load = details.get("load_average")
        when = entry.get("measured", "")
        if load:
            when += f", {load[0]}→{load[1]}"
        goal = entry["goal"] or "—"
        value = _fmt(entry["value"], entry["unit"])
        lines.append(f"| `{entry['name']}` | {value} | {goal} | {met} | {when} | {note} |")
    return "\n".join(lines)


def append_history(document: dict, results: list[Result], history: Path = HISTORY) -> None:
    """Add this run's figures as one line of ``bench/history.jsonl`` (never rewritten)."""
    machine = document["machine"]
    line = {
        "date": machine["date"],
        "machine": f"{machine['cpu']} ({machine['simd']}), {machine['cores']} cores",
        "figures": {
            r.name: {
                "value": r.value,
                "unit": r.unit,
                "met": r.met,
                "load_average": r.details.get("load_average"),
            }
            for r in results
            if not r.skipped
        },
    }
    with history.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def history_table(history: Path = HISTORY) -> str:
    """One row per recorded run, newest first: the figures it measured."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    lines = ["| run (UTC) | machine | figures (value, goal met) |", "|---|---|---|"]
    for row in reversed(rows):
        figures = ", ".join(
            f"`{name}` {_fmt(f['value'], f['unit'])}"
            + ("" if f.get("met") is None else (" ✓" if f["met"] else " ✗"))
            for name, f in row["figures"].items()
        )
        lines.append(f"| {row['date']} | {row['machine']} | {figures} |")
    return "\n".join(lines)


def _replace_between(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        text += f"\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def write_readme_table(document: dict, readme: Path = README) -> None:
    """Replace the results (and history) sections of ``bench/README.md``."""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = (
        readme.read_text(encoding="utf-8")
        if readme.exists()
        else f"# Benchmarks\n\n{start}\n{end}\n"
    )
    text = _replace_between(text, start, end, table(document))
    if HISTORY.exists():
        text = _replace_between(
            text, "<!-- history:start -->", "<!-- history:end -->", history_table()
        )
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and record their results."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", help=f"comma-separated groups or result names: {', '.join(GROUPS)}"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: a smoke run, not a measurement"
    )
    parser.add_argument("--out", type=Path, help="results file (default: bench/results.json, or "
                        "bench/work/results-quick.json with --quick)")  # fmt: skip
    parser.add_argument(
        "--work", type=Path, default=WORK, help="scratch folder (default: bench/work)"
    )
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=1.0,
        help="before each benchmark, wait for a 1-minute load average below this",
    )
    parser.add_argument("--max-wait", type=float, default=300,
                        help="...but at most this many seconds (default: 300; 0 = never wait)")  # fmt: skip
    args = parser.parse_args(argv)
    groups = select(args.only)
    out = args.out or (args.work / "results-quick.json" if args.quick else RESULTS)
    machine = machine_info()
    args.work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for group in groups:
        if not args.quick and args.max_wait > 0:
            load = wait_for_quiet(args.quiet_load, args.max_wait)
            print(f"bench: load average {load:.2f} before {group}", file=sys.stderr)
        results += run_group(group, args.work, args.quick)
    previous = json.loads(out.read_text()) if out.exists() else {}
    document = merge(previous, machine, results, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if not args.quick and out == RESULTS:
        append_history(document, results)
        write_readme_table(document)
    print(table(document))
    return 1 if any(r.skipped and r.skipped.startswith("failed") for r in results) else 0
