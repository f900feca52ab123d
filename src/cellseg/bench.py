"""``make bench``: figures and ratios for the hot paths, printed as a table.

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def bench_conversion(source: Path) -> list[tuple[str, str]]:
    from cellseg.convert import convert_dataset

    rows = []
    timings = {}
    for workers in sorted({1, os.cpu_count() or 1}):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            manifest = convert_dataset(source, Path(tmp) / "ds", workers=workers)
            timings[workers] = time.perf_counter() - start
        n = sum(s["images"] for s in manifest["splits"].values())
        rows.append(
            (
                f"convert, {workers} worker(s)",
                f"{n} images in {timings[workers]:.1f} s = {n / timings[workers]:.1f} img/s",
            )
        )
    if len(timings) > 1:
        one, many = timings[1], timings[max(timings)]
        rows.append(("convert speed-up, all cores vs 1", f"{one / many:.2f}x (goal: < 60 s)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    args = parser.parse_args(argv)
    rows = bench_conversion(args.source)
    width = max(len(name) for name, _ in rows)
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
