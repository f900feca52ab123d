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

    tracker = None
    if args.mlflow_run and os.environ.get("RANK", "0") == "0":  # rank 0 alone logs
        from cellseg.tracking import Tracker, configure

        configure()
        tracker = Tracker(args.mlflow_run)
    try:
        config = load_config(args.profile, args.phase, args.set)
        state = train(args.phase, args.data, args.out, config, init=args.init, tracker=tracker)
    except (ConfigError, TrainingError, CheckpointError) as err:
        raise UserError(str(err)) from err
    if state.history:
        best = min(h["val_total"] for h in state.history)
        print(f"phase {args.phase}: {state.epoch} epoch(s), best val loss {best:.4f} -> {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cellseg.checkpoint import CheckpointError
    from cellseg.evaluate import evaluate

    try:
        metrics = evaluate(args.data, args.model, args.out, args.split, args.device, args.limit)
    except (CheckpointError, FileNotFoundError) as err:
        raise UserError(str(err)) from err
    keys = ("box_map50", "mask_map50", "mask_map", "pq", "f1", "aji")
    print(" ".join(f"{k}={metrics[k]:.3f}" for k in keys) + f" -> {args.out}/report.md")


def cmd_predict(args: argparse.Namespace) -> None:
    from cellseg.checkpoint import CheckpointError
    from cellseg.predict import predict

    try:
        failures = predict(args.inputs, args.model, args.out, args.device)
    except (CheckpointError, FileNotFoundError) as err:
        raise UserError(str(err)) from err
    if failures:
        raise UserError(f"{failures} file(s) failed (see above); the others are in {args.out}")
    print(f"predictions -> {args.out} (results.json, counts.csv, overlays/)")


def cmd_register(args: argparse.Namespace) -> None:
    import json

    from cellseg.registry import promote
    from cellseg.steps import register_step

    result = register_step(
        args.model, args.metrics, args.data, args.pipeline_run, {}, None, args.tolerance, args.force
    )
    if result["promote"]:
        promote(result["version"])
    print(json.dumps(result))


def cmd_compare(args: argparse.Namespace) -> None:
    from cellseg.compare import compare

    runs = args.runs.split(",") if args.runs else None
    if runs is not None and len(runs) != 2:
        raise UserError("--runs takes two runs: A,B")
    try:
        print(compare(args.last, runs, args.png))
    except ValueError as err:
        raise UserError(str(err)) from err
    if not runs:
        print(f"\nhistory plot: {args.png}")


def cmd_launch(args: argparse.Namespace) -> None:
    import yaml

    from cellseg.launch import JobSpec, build_pytorchjob, job_name, run_pytorchjob

    train_args = ["--phase", str(args.phase), "--data", args.data, "--out", args.out]
    train_args += ["--profile", args.profile] + [a for o in args.set for a in ("--set", o)]
    tolerations = [
        {
            "key": t.partition(":")[0],
            "operator": "Exists",
            "effect": t.partition(":")[2] or "NoSchedule",
        }
        for t in args.toleration
    ]
    selector = dict(kv.split("=", 1) for kv in args.node_selector)
    spec = JobSpec(
        name=args.name or job_name(args.pipeline_run, args.phase),
        image=args.image,
        train_args=tuple(train_args),
        namespace=args.namespace,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        node_selector=selector,
        tolerations=tuple(tolerations),
        mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI", ""),
    )
    if args.dry_run:
        print(yaml.safe_dump(build_pytorchjob(spec), sort_keys=False), end="")
        return
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    run_pytorchjob(spec, args.timeout_hours * 3600, client.ApiClient())


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
    train.add_argument("--mlflow-run", help="log into this existing MLflow run (rank 0)")
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser("evaluate", help="metrics and report of a model on a split")
    evaluate.add_argument("--data", type=Path, required=True, help="converted dataset directory")
    evaluate.add_argument("--model", required=True, help="checkpoint, folder or MLflow URI")
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = sub.add_parser("predict", help="instances, counts and overlays for images")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images or folders")
    predict.add_argument("--model", required=True, help="checkpoint, folder or MLflow URI")
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(handler=cmd_predict)

    register = sub.add_parser("register", help="register a model in MLflow (challenger + gate)")
    register.add_argument("--model", type=Path, required=True, help="checkpoint or folder")
    register.add_argument("--metrics", type=Path, required=True, help="metrics.json of evaluate")
    register.add_argument("--data", type=Path, required=True, help="converted dataset")
    register.add_argument("--pipeline-run", default="manual", help="groups the MLflow runs")
    register.add_argument("--tolerance", type=float, default=0.02, help="per-class PQ drop")
    register.add_argument("--force", action="store_true", help="promote regardless (recorded)")
    register.set_defaults(handler=cmd_register)

    launch = sub.add_parser("launch", help="train as a PyTorchJob (--dry-run prints its YAML)")
    launch.add_argument("--dry-run", action="store_true", help="print the manifest, submit nothing")
    launch.add_argument("--phase", type=int, choices=(1, 2), default=1)
    launch.add_argument("--data", default="/mnt/checkpoints/manual/dataset")
    launch.add_argument("--out", default="/mnt/checkpoints/manual/phase1")
    launch.add_argument("--profile", default="uni-gpu")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--nodes", type=int, default=1)
    launch.add_argument("--gpus-per-node", type=int, default=1)
    launch.add_argument("--image", default="cellseg-kfp:0.1.0")
    launch.add_argument("--namespace", default="cellseg")
    launch.add_argument("--name", help="job name (default: from --pipeline-run and --phase)")
    launch.add_argument("--pipeline-run", default="manual")
    launch.add_argument(
        "--node-selector", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    launch.add_argument(
        "--toleration", action="append", default=[], metavar="KEY[:EFFECT]", help="repeatable"
    )
    launch.add_argument("--timeout-hours", type=float, default=72.0)
    launch.set_defaults(handler=cmd_launch)

    compare = sub.add_parser("compare", help="compare pipeline runs and registry versions")
    compare.add_argument("--last", type=int, default=10, help="the last N pipeline runs")
    compare.add_argument("--runs", help="two pipeline runs side by side: A,B")
    compare.add_argument("--png", type=Path, default=Path("out/compare.png"))
    compare.set_defaults(handler=cmd_compare)
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
