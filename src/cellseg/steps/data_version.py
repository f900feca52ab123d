"""The data-version step: which raw data this run trains on, never cached (conversion is keyed
on its DVC md5). Either the data a DVC data repository pins at a revision, pulled onto the
datasets volume (:mod:`cellseg.data.revision`), or whatever is at a folder there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellseg import settings
from cellseg.data.source import voc_md5
from cellseg.errors import DataError


@dataclass(frozen=True)
class DataVersion:
    md5: str
    source: str  # the folder conversion reads
    commit: str  # the data repository's commit ("" for a plain folder)


def data_version_step(
    source: str,
    expected_md5: str = "",
    data_repo: str = "",
    data_rev: str = "",
    pulls: str = settings.DVC_PULLS,
) -> DataVersion:
    """The data at ``data_repo``@``data_rev`` (pulled into ``pulls``) when a repository is
    given, else at ``source``; an error if its md5 is not ``expected_md5`` (when set)."""
    if data_repo:
        from cellseg.data.revision import pull

        pulled = pull(data_repo, data_rev, Path(pulls))
        # the md5 of the VOC parts, as conversion records it and its cache is keyed on (the
        # DVC md5 of the whole folder, when the folder holds more, would not match it)
        found, where, commit = voc_md5(Path(pulled.path)), pulled.path, pulled.commit
        print(f"data: {pulled.repo}@{data_rev or 'HEAD'} = commit {commit}, md5 {found}")
    else:
        found, where, commit = voc_md5(Path(source)), source, ""
    if expected_md5 and found != expected_md5:
        raise DataError(f"{where}: data md5 is {found}, the pipeline asked for {expected_md5}")
    return DataVersion(found, where, commit)
