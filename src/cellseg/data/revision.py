"""Raw data by revision: the data a DVC data repository pins at a git revision, fetched with
DVC's own API (``dvc.api.DVCFileSystem``) into a content-addressed folder.

A data repository is a git repository holding ``data.dvc`` (the pointer to the data folder)
and a DVC remote in its ``.dvc/config`` (S3, MinIO, a local path, ...). ``pull`` resolves a
branch, tag or commit, reads ``data.dvc`` there, and fetches the data once into
``<to>/<md5>/``: a version already there is not fetched again. The remote's credentials come
from the environment DVC reads (``AWS_ACCESS_KEY_ID``, ... : a Kubernetes Secret on a cluster);
nothing here reads or prints them.

``<to>/<md5>/.cellseg-source.json`` marks a complete fetch and records the pull that made it;
each pull returns (and the pipeline tags its run with) the commit *it* resolved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from cellseg.data.source import dvc_dir_md5, file_checksums
from cellseg.errors import DataError

POINTER = "data.dvc"
SOURCE_RECORD = ".cellseg-source.json"
STALE_SECONDS = 24 * 3600


@dataclass(frozen=True)
class PulledData:
    repo: str
    rev: str
    commit: str
    dvc_md5: str
    path: str  # the local folder holding the data


def shown(repo: str) -> str:
    """``repo`` as it may be printed or tagged: a URL without its user and token."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(repo)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return repo


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_revision(repo: str, rev: str):
    """DVC's view of ``repo`` at ``rev`` and the commit ``rev`` resolves to."""
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(url=repo, rev=rev or "HEAD")  # never a local checkout's work tree
        return fs, fs.repo.get_rev()
    except Exception as err:  # an unknown revision, or no git repository there
        raise DataError(
            f"{shown(repo)}: cannot open revision {rev!r} ({_first_line(err)})"
        ) from None


def remote_url(fs) -> str:
    """The default remote's URL as the revision configures it (bucket and path: credentials
    never go in it)."""
    try:
        config = fs.repo.config
        return str(config["remote"][config["core"]["remote"]]["url"])
    except (KeyError, TypeError):
        return "(none configured)"


def read_pointer(fs, repo: str, rev: str) -> tuple[str, str]:
    """(the data's path in the repository, its DVC md5) from ``data.dvc`` at the revision."""
    try:
        out = yaml.safe_load(fs.read_text(POINTER))["outs"][0]
        return out["path"], out["md5"]
    except FileNotFoundError:
        raise DataError(f"{shown(repo)}@{rev}: no {POINTER} at that revision") from None
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"{shown(repo)}@{rev}: {POINTER} is not a DVC pointer ({err})") from None


def pull(repo: str, rev: str, to: Path) -> PulledData:
    """The data ``repo`` pins at ``rev``, in ``<to>/<md5>/`` (fetched unless already there).

    Raises:
        DataError: one line naming what is missing: the revision, the pointer, the remote, or
            the object the remote lacks.
    """
    to = Path(to)
    fs, commit = open_revision(repo, rev)
    data_path, md5 = read_pointer(fs, repo, rev)
    dest = to / md5.removesuffix(".dir")
    record = PulledData(shown(repo), rev, commit, md5, str(dest))
    if (dest / SOURCE_RECORD).is_file():  # fetched and verified before: content-addressed
        return record
    to.mkdir(parents=True, exist_ok=True)
    for stale in to.glob(f".{dest.name}.*"):  # what a pull killed mid-fetch left (a day on:
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:  # not a pull still running)
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=to))
    try:
        try:
            fs.get(data_path, str(staging / "data"), recursive=True)
        except Exception as err:  # unreachable remote, missing object, no credentials
            raise DataError(
                f"{shown(repo)}@{rev}: cannot fetch {data_path} ({md5}) from its DVC remote "
                f"{remote_url(fs)} ({_first_line(err)})"
            ) from None
        found = dvc_dir_md5(file_checksums(staging / "data"))
        if found != md5:
            raise DataError(f"{shown(repo)}@{rev}: fetched {data_path} has md5 {found}, not {md5}")
        (staging / "data" / SOURCE_RECORD).write_text(json.dumps(asdict(record), indent=2))
        if (dest / SOURCE_RECORD).is_file():  # another pull of the same data finished first
            return record
        if dest.exists():  # an incomplete folder (no record): nobody reads it
            shutil.rmtree(dest)
        os.replace(staging / "data", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def pulled_from(folder: Path) -> str:
    """``<repo>@<commit>`` of the pull that fetched the data in ``folder`` ("" for data put
    there otherwise). The folder is named by the data's md5, so any commit pinning the same
    md5 names the same data."""
    record = Path(folder) / SOURCE_RECORD
    if not record.is_file():
        return ""
    found = json.loads(record.read_text())
    return f"{found['repo']}@{found['commit']}"
