"""`make data` against the real BCCD copy (BCCD_MIRROR): fetch, no-op, tamper, archives."""

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.data


def run_data(cwd, mirror):
    return subprocess.run(
        [sys.executable, "-m", "cellseg.cli", "data", "--mirror", str(mirror)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_make_data_fetches_once_then_is_a_no_op_and_detects_tampering(
    tmp_path, repo_root, bccd_source
):
    for name in ("data.dvc", "data.md5sums"):
        shutil.copy(repo_root / name, tmp_path / name)
    first = run_data(tmp_path, bccd_source)
    assert first.returncode == 0, first.stderr
    assert "fetched and verified" in first.stdout
    xml = tmp_path / "data/BCCD/Annotations/BloodImage_00007.xml"
    mtime = xml.stat().st_mtime_ns
    second = run_data(tmp_path, bccd_source)
    assert second.returncode == 0 and "up to date" in second.stdout
    assert xml.stat().st_mtime_ns == mtime  # nothing rewritten

    data = bytearray(xml.read_bytes())
    data[100] ^= 1  # one byte changed
    xml.write_bytes(bytes(data))
    third = run_data(tmp_path, bccd_source)
    assert third.returncode == 2
    lines = third.stderr.strip().splitlines()
    assert len(lines) == 1 and "BloodImage_00007.xml: content differs" in lines[0]


def test_a_mirror_tarball_works_and_a_bad_mirror_leaves_nothing_behind(
    tmp_path, repo_root, bccd_source
):
    for name in ("data.dvc", "data.md5sums"):
        shutil.copy(repo_root / name, tmp_path / name)
    archive = shutil.make_archive(str(tmp_path / "bccd"), "gztar", bccd_source.parent, "BCCD")
    assert run_data(tmp_path, archive).returncode == 0
    assert (tmp_path / "data/BCCD/JPEGImages/BloodImage_00000.jpg").is_file()

    shutil.rmtree(tmp_path / "data")
    broken = tmp_path / "broken"
    shutil.copytree(bccd_source, broken)
    (broken / "Annotations/BloodImage_00001.xml").unlink()
    result = run_data(tmp_path, broken)
    assert result.returncode == 2 and "BloodImage_00001.xml: missing" in result.stderr
    assert not (tmp_path / "data/BCCD").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []
