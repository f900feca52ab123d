"""``make quality``: train a profile from scratch on BCCD and print what it reaches.

Converts BCCD once (``<out>/dataset``), trains Phase 1 and Phase 2 with the profile and any
``--set`` overrides, evaluates on **val** (where settings are chosen) and **test** (reported
only), prints box AP@0.5 per class and the minutes taken, and appends one JSON line per run to
``<out>/results.jsonl``: the raw material of docs/ablations.md. With ``--tune`` the
post-processing is first searched on val, as the pipeline's tune step does
(:mod:`cellseg.evaluation.tune`), and both splits are scored with the tuned settings; the row
keeps the untuned val score beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cellseg.classes import CLASS_NAMES
from cellseg.settings import LOCAL_PROFILE


def train_and_evaluate(
    source: Path, out: Path, profile: str, overrides: list[str], name: str, tune: bool = False
):
    from cellseg.data.convert import convert_dataset
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.evaluation.inference import Predictor
    from cellseg.model.checkpoint import find_checkpoint
    from cellseg.training.config import load_config
    from cellseg.training.loop import train

    data = out / "dataset"
    if not (data / "manifest.json").is_file():
        convert_dataset(source, data)
    run = out / "runs" / name
    start = time.perf_counter()
    for phase in (1, 2):
        train(phase, data, run, load_config(profile, phase, overrides))
    minutes = (time.perf_counter() - start) / 60
    checkpoint = find_checkpoint(run)
    tuning = None
    if tune:
        from cellseg.evaluation.tune import tune as tune_on_val

        tuning = tune_on_val(checkpoint, data, run / "tuned")
        checkpoint = run / "tuned" / checkpoint.name
    predictor = Predictor.from_checkpoint(checkpoint)
    scores = {
        split: evaluate(data, predictor, run / f"eval-{split}", split, overlays=2)
        for split in ("val", "test")
    }
    return minutes, scores, tuning


def summary_row(name: str, overrides: list[str], minutes: float, scores: dict, tuning=None) -> dict:
    row = {"name": name, "overrides": overrides, "train_minutes": round(minutes, 2)}
    if tuning is not None:
        row["val_box_map50_untuned"] = tuning.start_score
        row["tuned"] = {k: v for k, v in tuning.as_dict().items() if k != "trials"}
    for split, m in scores.items():
        row[f"{split}_box_map50"] = m["box_map50"]
        row[f"{split}_void_box_map50"] = m["void_aware"]["box_map50"]
        for c in CLASS_NAMES:
            row[f"{split}_box_ap50_{c}"] = m["per_class"][c]["box_ap50"]
    return row


def print_row(row: dict) -> None:
    print(
        f"\n{row['name']}: trained in {row['train_minutes']:.1f} min ({' '.join(row['overrides'])})"
    )
    if "tuned" in row:
        print(f"  post-processing tuned on val: {row['val_box_map50_untuned']:.3f} before")
    print(
        f"  {'split':<6} {'box mAP50':>9} {'void-aware':>10} "
        + " ".join(f"{c:>9}" for c in CLASS_NAMES)
    )
    for split in ("val", "test"):
        per_class = " ".join(f"{row[f'{split}_box_ap50_{c}']:>9.3f}" for c in CLASS_NAMES)
        print(f"  {split:<6} {row[f'{split}_box_map50']:>9.3f} "
              f"{row[f'{split}_void_box_map50']:>10.3f} {per_class}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    parser.add_argument("--out", type=Path, default=Path("out/quality"))
    parser.add_argument("--profile", default=LOCAL_PROFILE)
    parser.add_argument("--name", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--tune", action="store_true", help="search post-processing on val first (the tune step)"
    )
    parser.add_argument(
        "--portable-kernels", action="store_true", help="AVX2 CPU kernels (docs/reproducibility.md)"
    )
    args = parser.parse_args(argv)
    if args.portable_kernels:
        from cellseg.runtime import portable_cpu_kernels

        portable_cpu_kernels()  # before torch computes anything
    name = args.name or (args.profile + "".join(f"+{o}" for o in args.set))
    minutes, scores, tuning = train_and_evaluate(
        args.source, args.out, args.profile, args.set, name, args.tune
    )
    row = summary_row(name, args.set, minutes, scores, tuning)
    with (args.out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
