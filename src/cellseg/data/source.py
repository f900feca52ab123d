"""Obtain raw BCCD (VOC) and verify it against the committed DVC pointer.

DVC identifies a directory by the md5 of its sorted file listing (``<md5>.dir``), computed here
with ``dvc_data`` so the check needs no DVC cache, and a per-file checksum list (``data.md5sums``,
``md5sum -c`` format) beside ``data.dvc`` lets a mismatch name the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from cellseg.errors import DataError

BCCD_COMMIT = "d272fb1"
BCCD_ARCHIVE_URL = f"https://github.com/Shenggan/BCCD_Dataset/archive/{BCCD_COMMIT}.tar.gz"
VOC_PARTS = ("Annotations", "JPEGImages", "ImageSets/Main")


@dataclass(frozen=True)
class DvcPointer:
    """The one output recorded in a ``.dvc`` file."""

    path: str
    md5: str
    nfiles: int


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every file under ``root``, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def file_checksums(root: Path) -> dict[str, str]:
    return {rel: file_md5(root / rel) for rel in list_files(root)}


def dvc_dir_md5(checksums: dict[str, str]) -> str:
    """DVC's digest of a directory from its files' md5s: ``dvc_data``'s own ``Tree.digest``,
    so it stays what ``data.dvc`` records whatever DVC changes."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for rel in sorted(checksums):
        tree.add(tuple(rel.split("/")), None, HashInfo("md5", checksums[rel]))
    tree.digest()
    return tree.hash_info.value


def voc_md5(root: Path) -> str:
    """The DVC md5 of the VOC parts under ``root`` (what ``data.dvc`` pins), ignoring the rest."""
    prefixes = tuple(f"{part}/" for part in VOC_PARTS)
    return dvc_dir_md5({r: m for r, m in file_checksums(root).items() if r.startswith(prefixes)})


def read_dvc_pointer(dvc_file: Path) -> DvcPointer:
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
        return DvcPointer(path=out["path"], md5=out["md5"], nfiles=int(out["nfiles"]))
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"{dvc_file}: not a readable DVC pointer ({err})") from err


def read_md5sums(path: Path, prefix: str) -> dict[str, str]:
    """Parse ``md5sum`` lines whose paths start with ``prefix/`` into {relpath: md5}."""
    sums = {}
    for line in path.read_text().splitlines():
        md5, name = line.split(maxsplit=1)
        sums[name.removeprefix(prefix.rstrip("/") + "/")] = md5
    return sums


def verify(
    root: Path, pointer: DvcPointer, expected: dict[str, str], shown_as: str | None = None
) -> None:
    """Raise :class:`DataError` naming every file that is missing, extra or changed.

    Args:
        shown_as: how to name ``root`` in messages (e.g. the mirror a staging copy came from).
    """
    if dvc_dir_md5(expected) != pointer.md5:
        raise DataError(
            "data.md5sums does not match data.dvc: regenerate it with "
            "`find data/BCCD -type f | sort | xargs md5sum > data.md5sums`"
        )
    if not root.is_dir():
        raise DataError(f"{root}: missing (run `make data`)")
    actual = file_checksums(root)
    if dvc_dir_md5(actual) == pointer.md5:
        return
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    changed = sorted(r for r in set(actual) & set(expected) if actual[r] != expected[r])
    name = shown_as or str(root)
    problems = [f"{name}/{r}: content differs from data.dvc" for r in changed]
    problems += [f"{name}/{r}: missing" for r in missing]
    problems += [f"{name}/{r}: not in data.dvc" for r in extra]
    raise DataError("; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))


def find_voc_root(tree: Path) -> Path:
    """The folder under ``tree`` that holds ``Annotations/`` and ``JPEGImages/``."""
    for candidate in [tree, *sorted(p.parent for p in tree.rglob("Annotations"))]:
        if (candidate / "Annotations").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{tree}: no VOC dataset (Annotations/ and JPEGImages/) found")


def unpack_archive(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")
    else:
        raise DataError(f"{archive}: neither a directory nor a tar/zip archive")


def copy_voc(voc_root: Path, dest: Path) -> None:
    for part in VOC_PARTS:
        src = voc_root / part
        if not src.is_dir():
            raise DataError(f"{src}: missing from the BCCD source")
        shutil.copytree(src, dest / part)


def obtain(dest: Path, mirror: str | None) -> None:
    """Fill ``dest`` (which must not exist) with the VOC parts of BCCD from a mirror or GitHub."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".bccd-") as work:
        work_dir = Path(work)
        if mirror and Path(mirror).is_dir():
            source = Path(mirror)
        else:
            archive = Path(mirror) if mirror else work_dir / "bccd.tar.gz"
            if not mirror:
                print(f"downloading {BCCD_ARCHIVE_URL}")
                urllib.request.urlretrieve(BCCD_ARCHIVE_URL, archive)
            if not archive.exists():
                raise DataError(f"{archive}: BCCD_MIRROR does not exist")
            unpack_archive(archive, work_dir / "unpacked")
            source = work_dir / "unpacked"
        staged = work_dir / "staged"
        copy_voc(find_voc_root(source), staged)
        os.replace(staged, dest)


def ensure_bccd(
    dvc_file: Path, md5sums: Path, mirror: str | None, repo_root: Path = Path(".")
) -> bool:
    """Make ``data/BCCD`` match ``data.dvc``. Returns True when it fetched, False when up to date.

    Existing data that fails verification is reported, never overwritten.
    """
    pointer = read_dvc_pointer(dvc_file)
    dest = repo_root / pointer.path
    expected = read_md5sums(md5sums, pointer.path)
    fetched = not dest.exists()
    if fetched:
        staging = dest.with_name(f".{dest.name}.incoming")
        shutil.rmtree(staging, ignore_errors=True)
        obtain(staging, mirror)
        try:
            verify(staging, pointer, expected, shown_as=mirror or BCCD_ARCHIVE_URL)
        except DataError:
            shutil.rmtree(staging)
            raise
        os.replace(staging, dest)
    else:
        verify(dest, pointer, expected)
    return fetched


def add_to_dvc_cache(dvc_file: Path) -> bool:
    """Put the verified data into the DVC cache of the repository holding ``dvc_file`` (as
    ``dvc commit`` does; the pointer is unchanged), so ``dvc status`` is clean and ``dvc push``
    has something to upload. False when ``dvc_file`` is not inside a DVC repository."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    dvc_file = Path(dvc_file).resolve()
    try:
        repo = Repo(str(dvc_file.parent))
    except NotDvcRepoError:
        return False
    with repo:
        repo.commit(str(dvc_file), force=True)
    return True
