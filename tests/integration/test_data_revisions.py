"""Data by revision through DVC's own API: a local git data repository with a local DVC remote
and two revisions of the data, pulled by tag and by branch; what cannot be pulled is one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellseg.data.revision import pull
from cellseg.data.source import dvc_dir_md5, file_checksums
from cellseg.errors import DataError
from tests.conftest import synthetic_samples, write_voc

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def sh(*args, cwd: Path) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result.stdout.strip()


def pinned_md5(repo: Path, rev: str) -> str:
    return yaml.safe_load(sh("git", "show", f"{rev}:data.dvc", cwd=repo))["outs"][0]["md5"]


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    """v1: four images; main: one annotation changed and one image added. Pushed to a local
    remote, and the repository's own DVC cache emptied, so pulls come from the remote."""
    root = tmp_path_factory.mktemp("data-repo")
    repo, remote = root / "repo", root / "remote"
    repo.mkdir()
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(BIN / "dvc", "init", "-q", cwd=repo)
    sh(BIN / "dvc", "remote", "add", "-d", "store", remote, cwd=repo)
    samples = synthetic_samples(5)
    stems = sorted(samples)
    first = {s: samples[s] for s in stems[:4]}
    write_voc(repo / "data", first, {"train": stems[:2], "val": stems[2:3], "test": stems[3:4]})
    sh(BIN / "dvc", "add", "-q", "data", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh(*git, "commit", "-q", "-m", "v1", cwd=repo)
    sh("git", "tag", "v1", cwd=repo)
    sh(BIN / "dvc", "push", "-q", cwd=repo)
    shutil.rmtree(repo / "data")
    write_voc(repo / "data", samples, {"train": stems[:3], "val": stems[3:4], "test": stems[4:]})
    sh(BIN / "dvc", "add", "-q", "data", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh(*git, "commit", "-q", "-m", "v2", cwd=repo)
    sh(BIN / "dvc", "push", "-q", cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    return repo, remote


def test_each_revision_pulls_its_own_data_with_dvcs_md5(data_repo, tmp_path):
    repo, _ = data_repo
    v1 = pull(str(repo), "v1", tmp_path)
    head = pull(str(repo), "main", tmp_path)
    assert v1.dvc_md5 == pinned_md5(repo, "v1") and head.dvc_md5 == pinned_md5(repo, "main")
    assert v1.dvc_md5 != head.dvc_md5
    assert v1.commit == sh("git", "rev-parse", "v1", cwd=repo)
    assert head.commit == sh("git", "rev-parse", "main", cwd=repo)
    for pulled in (v1, head):
        files = file_checksums(Path(pulled.path))
        del files[".cellseg-source.json"]
        assert dvc_dir_md5(files) == pulled.dvc_md5  # dvc_data's digest, as data.dvc has it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        m.removesuffix(".dir") for m in (v1.dvc_md5, head.dvc_md5)
    )


def test_a_version_already_pulled_is_not_fetched_again(data_repo, tmp_path):
    repo, remote = data_repo
    first = pull(str(repo), "v1", tmp_path)
    moved = remote.with_name("remote-away")
    remote.rename(moved)  # the remote is gone: only the local copy can answer
    try:
        again = pull(str(repo), "v1", tmp_path)
    finally:
        moved.rename(remote)
    assert again.path == first.path and again.dvc_md5 == first.dvc_md5


def test_the_cli_prints_the_commit_and_the_md5_on_its_last_line(data_repo, tmp_path):
    repo, _ = data_repo
    out = sh(BIN / "cellseg", "data", "pull", "--repo", repo, "--rev", "v1", "--to", tmp_path,
             cwd=tmp_path)  # fmt: skip
    commit = sh("git", "rev-parse", "v1", cwd=repo)
    assert out.splitlines()[-1] == f"commit {commit} md5 {pinned_md5(repo, 'v1')}"


def test_a_missing_revision_is_one_line_naming_it(data_repo, tmp_path):
    repo, _ = data_repo
    with pytest.raises(DataError) as err:
        pull(str(repo), "no-such-tag", tmp_path)
    assert str(err.value).startswith(f"{repo}: cannot open revision 'no-such-tag' (")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_an_unreachable_remote_is_one_line_and_leaves_nothing(data_repo, tmp_path):
    repo, remote = data_repo
    moved = remote.with_name("remote-away")
    remote.rename(moved)
    try:
        with pytest.raises(DataError) as err:
            pull(str(repo), "v1", tmp_path)
    finally:
        moved.rename(remote)
    message = str(err.value)
    assert message.startswith(
        f"{repo}@v1: cannot fetch data ({pinned_md5(repo, 'v1')}) from its DVC remote {remote} ("
    )
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_an_object_missing_from_the_remote_is_one_line(data_repo, tmp_path):
    repo, remote = data_repo
    tree = pinned_md5(repo, "main").removesuffix(".dir")
    store = remote / "files" / "md5"
    listing = json.loads((store / tree[:2] / f"{tree[2:]}.dir").read_text())
    victim = store / listing[0]["md5"][:2] / listing[0]["md5"][2:]
    kept = victim.read_bytes()
    victim.unlink()
    try:
        with pytest.raises(DataError) as err:
            pull(str(repo), "main", tmp_path)
    finally:
        victim.write_bytes(kept)
    message = str(err.value)
    assert message.startswith(f"{repo}@main: cannot fetch data ({pinned_md5(repo, 'main')}) from")
    assert "\n" not in message and not list(tmp_path.iterdir())


def test_a_token_in_the_repository_url_is_never_shown():
    from cellseg.data.revision import shown

    url = "https://ci-bot:glpat-SECRET@git.example.com/lab/bccd-data.git"
    assert shown(url) == "https://git.example.com/lab/bccd-data.git"
    assert shown("/srv/data-repo") == "/srv/data-repo"
    with pytest.raises(DataError) as err:
        pull(url.replace("git.example.com", "127.0.0.1:9"), "v1", Path("/nonexistent"))
    assert "SECRET" not in str(err.value)


def test_the_data_version_step_pulls_a_revision_for_the_pipeline(data_repo, tmp_path):
    """What the pipeline's data-version step does with `data_repo`/`data_rev`: the data on the
    volume (here `pulls`), the md5 conversion is keyed on, and the commit the run is tagged with."""
    from cellseg.data.source import voc_md5
    from cellseg.steps.data_version import data_version_step

    repo, _ = data_repo
    found = data_version_step("", data_repo=str(repo), data_rev="v1", pulls=str(tmp_path))
    assert Path(found.source).parent == tmp_path
    assert found.md5 == voc_md5(Path(found.source)) == pinned_md5(repo, "v1")
    assert found.commit == sh("git", "rev-parse", "v1", cwd=repo)
    with pytest.raises(DataError, match="the pipeline asked for"):
        data_version_step("", "0" * 32 + ".dir", str(repo), "main", str(tmp_path))


def test_the_splits_of_pulled_data_name_the_revision_as_their_mlflow_source(data_repo, tmp_path):
    from cellseg.data.convert import convert_dataset
    from cellseg.registry.tracking import split_dataset

    repo, _ = data_repo
    pulled = pull(str(repo), "v1", tmp_path / "pulls")
    convert_dataset(Path(pulled.path), tmp_path / "dataset", workers=1)
    test = split_dataset(tmp_path / "dataset", "test")
    assert test.name == "bccd-test" and test.digest == pinned_md5(repo, "v1")
    assert test.source.to_dict() == {"uri": f"{repo}@{pulled.commit}"}
