"""Real DVC: the committed pointer and remote config round-trip BCCD through `dvc push/pull`."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.data.source import file_checksums, read_dvc_pointer, read_md5sums, verify

pytestmark = [pytest.mark.integration, pytest.mark.data]


def sh(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout


def test_dvc_push_then_pull_restores_identical_bccd(tmp_path, repo_root, bccd_source):
    bin_dir = Path(sys.executable).parent
    dvc, cellseg = str(bin_dir / "dvc"), str(bin_dir / "cellseg")
    repo = tmp_path / "clone"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo)
    shutil.copytree(
        repo_root / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp")
    )
    for name in ("data.dvc", "data.md5sums", ".dvcignore"):
        shutil.copy(repo_root / name, repo / name)
    sh(cellseg, "data", "--mirror", str(bccd_source), cwd=repo)
    pointer = read_dvc_pointer(repo / "data.dvc")
    before = file_checksums(repo / "data/BCCD")

    # `cellseg data` (what `make data` runs) leaves the data cached: nothing for DVC to report
    status = sh(dvc, "status", "data.dvc", cwd=repo)
    assert "not in cache" not in status and "changed" not in status, status
    sh(dvc, "push", "-q", "data.dvc", cwd=repo)
    assert (repo / ".dvc-remote" / "files" / "md5").is_dir()  # the offline default remote
    shutil.rmtree(repo / "data/BCCD")
    shutil.rmtree(repo / ".dvc" / "cache")  # force the pull to come from the remote
    sh(dvc, "pull", "-q", "data.dvc", cwd=repo)

    assert file_checksums(repo / "data/BCCD") == before
    verify(repo / "data/BCCD", pointer, read_md5sums(repo / "data.md5sums", pointer.path))
