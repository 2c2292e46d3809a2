"""Presets: partial ``params.yaml`` files in ``presets/`` merged into the project's params.

``tlp preset NAME`` (or ``python -m flows.presets NAME``) validates the merged result and
writes ``params.yaml`` atomically; ``dvc repro`` then runs the pipeline with it and
``git diff params.yaml`` shows exactly what the preset changed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from tasks.common import atomic_path
from tasks.params import ParamsError, parse_params, read_yaml

PRESETS_DIR = Path("presets")
HEADER = (
    "# One section per stage (stage name = module name = section). Validated by tasks/params.py.\n"
    "# Written by `tlp preset {name}`; see presets/ and the README.\n"
)


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def resolve(name: str, presets_dir: Path = PRESETS_DIR) -> Path:
    """A preset's file from its name (``dogs-vgg16``) or path.

    Raises:
        ParamsError: no such preset; the message lists the available ones.
    """
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = presets_dir / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise ParamsError(f"unknown preset {name!r}; available: {', '.join(available(presets_dir))}")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (sections merge, values replace)."""
    result = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = value
    return result


def apply_preset(
    name: str, params_path: Path = Path("params.yaml"), presets_dir: Path = PRESETS_DIR
) -> dict:
    """Merge a preset into ``params_path`` after validating the result.

    Returns:
        The merged params mapping that was written.
    """
    preset_path = resolve(name, presets_dir)
    merged = merge(read_yaml(params_path), read_yaml(preset_path))
    parse_params(merged)  # refuse before writing anything
    with atomic_path(params_path) as tmp:
        tmp.write_text(
            HEADER.format(name=preset_path.stem) + yaml.safe_dump(merged, sort_keys=False),
            encoding="utf-8",
        )
    return merged


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.presets NAME``: apply a preset to params.yaml."""
    parser = argparse.ArgumentParser(description="Apply a preset from presets/ to params.yaml.")
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(available())}")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    if not args.name:
        print("\n".join(available()))
        return 0
    try:
        apply_preset(args.name, args.params)
    except ParamsError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"applied preset {args.name} to {args.params}; run `dvc repro` or `tlp run`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
