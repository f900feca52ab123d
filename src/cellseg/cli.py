"""``cellseg`` command line: one sub-command per pipeline step.

Each handler parses arguments and calls one library function; heavy imports happen inside the
handler so ``cellseg --help`` stays fast and the training image needs no orchestration packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UserError(RuntimeError):
    """An error the user can fix; printed as one line, exit code 2."""


def cmd_data(args: argparse.Namespace) -> None:
    from cellseg.data_source import DataError, ensure_bccd

    mirror = args.mirror or os.environ.get("BCCD_MIRROR") or None
    try:
        fetched = ensure_bccd(args.dvc_file, args.md5sums, mirror)
    except DataError as err:
        raise UserError(str(err)) from err
    print("BCCD fetched and verified" if fetched else "BCCD up to date (verified against data.dvc)")


def cmd_convert(args: argparse.Namespace) -> None:
    from cellseg.convert import ConversionError, convert_dataset

    try:
        manifest = convert_dataset(
            args.source, args.out, preview=args.preview, skip_bad=args.skip_bad
        )
    except ConversionError as err:
        raise UserError(str(err)) from err
    counts = ", ".join(f"{s} {v['images']}" for s, v in manifest["splits"].items())
    print(f"converted {args.source} -> {args.out} ({counts} images)")


def cmd_train(args: argparse.Namespace) -> None:
    from cellseg.checkpoint import CheckpointError
    from cellseg.config import ConfigError, load_config
    from cellseg.train import TrainingError, train

    try:
        config = load_config(args.profile, args.phase, args.set)
        state = train(args.phase, args.data, args.out, config, init=args.init)
    except (ConfigError, TrainingError, CheckpointError) as err:
        raise UserError(str(err)) from err
    if state.history:
        best = min(h["val_total"] for h in state.history)
        print(f"phase {args.phase}: {state.epoch} epoch(s), best val loss {best:.4f} -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="obtain raw BCCD into data/BCCD and verify it (data.dvc)")
    data.add_argument("--mirror", help="local directory or archive (default: $BCCD_MIRROR)")
    data.add_argument("--dvc-file", type=Path, default=Path("data.dvc"))
    data.add_argument("--md5sums", type=Path, default=Path("data.md5sums"))
    data.set_defaults(handler=cmd_data)

    convert = sub.add_parser("convert", help="BCCD boxes -> instance-segmentation dataset")
    convert.add_argument("--source", type=Path, required=True, help="VOC folder (data/BCCD)")
    convert.add_argument("--out", type=Path, required=True, help="output dataset directory")
    convert.add_argument("--preview", type=int, default=0, metavar="N", help="write N overlays")
    convert.add_argument("--skip-bad", action="store_true", help="skip bad files, count them")
    convert.set_defaults(handler=cmd_convert)

    train = sub.add_parser("train", help="train Phase 1 (decoder) or Phase 2 (LoRA)")
    train.add_argument("--phase", type=int, choices=(1, 2), required=True)
    train.add_argument("--data", type=Path, required=True, help="converted dataset directory")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory")
    train.add_argument("--profile", default="local", help="local | uni-gpu | a YAML file")
    train.add_argument("--init", type=Path, help="Phase 2: Phase 1 checkpoint (file or folder)")
    train.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    train.set_defaults(handler=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as err:
        print(f"cellseg {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
