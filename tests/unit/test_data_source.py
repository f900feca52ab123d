import pytest

from cellseg.data.source import (
    DataError,
    dvc_dir_md5,
    file_checksums,
    read_dvc_pointer,
    read_md5sums,
    verify,
)


def test_committed_checksum_list_matches_the_committed_dvc_pointer(repo_root):
    pointer = read_dvc_pointer(repo_root / "data.dvc")
    sums = read_md5sums(repo_root / "data.md5sums", pointer.path)
    assert pointer.path == "data/BCCD" and pointer.nfiles == len(sums) == 364 * 2 + 4
    assert dvc_dir_md5(sums) == pointer.md5


def test_verify_names_changed_missing_and_extra_files(tmp_path):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    for name in ("a.xml", "sub/b.jpg", "sub/c.jpg"):
        (root / name).write_text(name)
    expected = file_checksums(root)
    pointer = read_dvc_pointer_from(tmp_path, dvc_dir_md5(expected), len(expected))
    verify(root, pointer, expected)  # untouched: passes
    (root / "a.xml").write_text("a.xmm")
    (root / "sub/c.jpg").unlink()
    (root / "new.txt").write_text("x")
    with pytest.raises(DataError) as err:
        verify(root, pointer, expected)
    message = str(err.value)
    assert f"{root}/a.xml: content differs" in message
    assert f"{root}/sub/c.jpg: missing" in message
    assert f"{root}/new.txt: not in data.dvc" in message
    assert "sub/b.jpg" not in message


def read_dvc_pointer_from(tmp_path, md5, nfiles):
    dvc = tmp_path / "x.dvc"
    dvc.write_text(f"outs:\n- md5: {md5}\n  nfiles: {nfiles}\n  hash: md5\n  path: d\n")
    return read_dvc_pointer(dvc)
