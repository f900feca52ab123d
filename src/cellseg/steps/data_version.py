"""The data-version step: the DVC md5 of the raw data, never cached (conversion is keyed on it)."""

from __future__ import annotations

from pathlib import Path

from cellseg.data.source import voc_md5
from cellseg.errors import DataError


def data_version_step(source: str, expected_md5: str = "") -> str:
    """DVC md5 of the VOC parts at ``source``; an error if it is not ``expected_md5`` (when set)."""
    found = voc_md5(Path(source))
    if expected_md5 and found != expected_md5:
        raise DataError(f"{source}: data md5 is {found}, the pipeline asked for {expected_md5}")
    return found
