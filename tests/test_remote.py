"""DVC remotes: every output of dvc.yaml travels with ``dvc push``/``dvc pull`` (or git).

A cached output goes to the remote; an uncached one (metrics, plots) must be committable to
git; nothing a user needs is left behind. Tested with a local remote (a folder): the same
code path as S3, GCS or Azure in DVC, without the network (docs/scale-out.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_project, run


def outputs(project: Path) -> dict[str, bool]:
    """Every output of the pipeline's stages -> whether DVC caches it."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return {out.def_path: out.use_cache for stage in repo.index.stages for out in stage.outs}


def test_every_uncached_output_can_be_committed_to_git(tmp_path):
    project = make_project(tmp_path / "project")
    found = outputs(project)
    uncached = sorted(path for path, cached in found.items() if not cached)
    assert uncached and len(uncached) < len(found)  # metrics and plots; the rest is cached
    ignored = run(["git", "check-ignore", "--no-index", *uncached], project, check=False)
    assert ignored.stdout.split() == [], "git ignores outputs that DVC does not push"
    # The train stage's feature cache is a cache (.tlp/), not an output to push.
    assert not any(path.startswith("data/features") for path in found)


def digests(project: Path, names: list[str]) -> dict[str, str]:
    paths = [project / name for name in names]
    files = [p for path in paths for p in sorted([path, *path.rglob("*")]) if p.is_file()]
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow
def test_a_fresh_clone_gets_every_output_with_dvc_pull_and_reproduces_nothing(
    built_project, tmp_path
):
    project = tmp_path / "project"
    shutil.copytree(built_project, project, symlinks=True)
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "--default", "store", str(remote)], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a built pipeline, its remote"], project)
    run(["dvc", "push"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models" / "model.onnx").exists()
    run(["dvc", "pull"], clone)

    everything = ["data", "models", "metrics", "plots", "dvclive"]
    assert digests(clone, everything) == digests(project, everything)
    assert json.loads(run(["dvc", "status", "--json"], clone).stdout) == {}
    before = digests(clone, [*everything, "dvc.lock"])
    run(["dvc", "repro"], clone)
    assert digests(clone, [*everything, "dvc.lock"]) == before  # it ran nothing, wrote nothing
