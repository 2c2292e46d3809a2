"""Presets: partial ``params.yaml`` files in ``presets/``, written into the project's params.

``tlp preset NAME`` (or ``python -m flows.presets NAME``) validates the preset's values
against ``params.yaml`` and writes them in as ``tlp run -S`` does (comments and key order
kept), so ``git diff params.yaml`` shows exactly what the preset changed and ``dvc repro``
runs the pipeline with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flows.workspace import (
    NotAProjectError,
    dotted_keys,
    project_root,
    validate_overrides,
    write_overrides,
)
from tasks.params import ParamsError, read_yaml

PRESETS_DIR = Path("presets")


def available(presets_dir: Path = PRESETS_DIR) -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def apply_preset(name: str, root: Path, presets_dir: Path = PRESETS_DIR) -> dict[str, Any]:
    """Write a preset (its name, e.g. ``dogs-vgg16``, or a file) into ``root/params.yaml``.

    Returns:
        The values written, as dotted keys.

    Raises:
        ParamsError: no such preset (the message lists them), or the result is invalid
            (nothing is written then).
    """
    path = Path(name) if Path(name).suffix in (".yaml", ".yml") else presets_dir / f"{name}.yaml"
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ParamsError(
            f"unknown preset {name!r}; available: {', '.join(available(presets_dir))}"
        )
    changes = validate_overrides(root, dotted_keys(read_yaml(path)))
    write_overrides(root, changes)
    return changes


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.presets [NAME]``: list the presets, or apply one to params.yaml."""
    parser = argparse.ArgumentParser(description="Apply a preset from presets/ to params.yaml.")
    parser.add_argument("name", nargs="?", help=f"one of: {', '.join(available())}")
    args = parser.parse_args(argv)
    if not args.name:
        print("\n".join(available()))
        return 0
    try:
        changes = apply_preset(args.name, project_root())
    except (ParamsError, NotAProjectError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(f"applied preset {args.name} to params.yaml ({len(changes)} values); run `tlp run`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
