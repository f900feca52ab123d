"""``cellseg`` command line: one sub-command per pipeline step.

Each handler parses arguments and calls one library function; heavy imports happen inside the
handler so ``cellseg --help`` stays fast and the training image needs no orchestration packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cellseg.errors import CellsegError
from cellseg.threads import match_torch_threads


def cmd_data(args: argparse.Namespace) -> None:
    from cellseg.data.source import add_to_dvc_cache, ensure_bccd

    mirror = args.mirror or os.environ.get("BCCD_MIRROR") or None
    fetched = ensure_bccd(args.dvc_file, args.md5sums, mirror)
    print("BCCD fetched and verified" if fetched else "BCCD up to date (verified against data.dvc)")
    if add_to_dvc_cache(args.dvc_file):
        print("in the DVC cache: `dvc push` shares it, `dvc status` is clean")


def cmd_convert(args: argparse.Namespace) -> None:
    from cellseg.data.convert import convert_dataset

    manifest = convert_dataset(args.source, args.out, preview=args.preview, skip_bad=args.skip_bad)
    counts = ", ".join(f"{s} {v['images']}" for s, v in manifest["splits"].items())
    print(f"converted {args.source} -> {args.out} ({counts} images)")


def cmd_train(args: argparse.Namespace) -> None:
    from cellseg.training.config import load_config
    from cellseg.training.loop import train

    match_torch_threads()  # the cgroup's CPU quota, not the host's core count
    config = load_config(args.profile, args.phase, args.set)
    tracker = None
    if args.mlflow_run and os.environ.get("RANK", "0") == "0":  # rank 0 alone logs
        from cellseg.ops.tracking import Tracker, configure

        configure()
        tracker = Tracker(args.mlflow_run)
    state = train(args.phase, args.data, args.out, config, init=args.init, tracker=tracker)
    if state.history:
        best = min(h["val_total"] for h in state.history)
        print(f"phase {args.phase}: {state.epoch} epoch(s), best val loss {best:.4f} -> {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.ops.model_ref import load_predictor

    match_torch_threads()  # the cgroup's CPU quota, not the host's core count
    predictor = load_predictor(args.model, args.device)
    metrics = evaluate(
        args.data, predictor, args.out, args.split, args.limit, model_name=args.model
    )
    keys = ("box_map50", "mask_map50", "mask_map", "pq", "f1", "aji")
    print(" ".join(f"{k}={metrics[k]:.3f}" for k in keys) + f" -> {args.out}/report.md")


def cmd_predict(args: argparse.Namespace) -> None:
    from cellseg.evaluation.inference import set_inference_threads
    from cellseg.evaluation.predict import predict
    from cellseg.ops.model_ref import load_predictor

    set_inference_threads(args.threads)
    failures = predict(args.inputs, load_predictor(args.model, args.device), args.out)
    if failures:
        raise CellsegError(f"{failures} file(s) failed (see above); the others are in {args.out}")
    print(f"predictions -> {args.out} (results.json, counts.csv, overlays/)")


def cmd_register(args: argparse.Namespace) -> None:
    import json
    import tempfile
    from pathlib import Path

    from cellseg.ops.registry import promote
    from cellseg.ops.steps import register_step, score_champion_step

    with tempfile.TemporaryDirectory() as champion:  # the champion on the same test split
        score_champion_step(args.data, Path(champion), args.pipeline_run, {}, None)
        result = register_step(
            args.model, args.metrics, args.data, args.pipeline_run, {}, None, args.tolerance,
            args.force, Path(champion),
        )  # fmt: skip
    if result["promote"]:
        moved = promote(result["version"], result["champion_version"], force=result["forced"])
        result |= {"promote": moved.promote, "reasons": result["reasons"] + moved.reasons}
    print(json.dumps(result))


def cmd_rollout(args: argparse.Namespace) -> None:
    import json

    from cellseg.ops.tracking import configure
    from cellseg.serving.rollout import champion_storage_uri, roll_inference_service, rollout_patch

    configure()
    uri = champion_storage_uri(args.model_name, args.version)
    if args.dry_run:
        print(json.dumps(rollout_patch(uri, args.canary)))
        return
    from kubernetes import config

    config.load_kube_config()
    roll_inference_service(args.service, args.namespace, uri, args.canary)
    share = f"{args.canary}% of the traffic" if 0 < args.canary < 100 else "all traffic"
    print(f"inferenceservice/{args.service} -> {uri} ({share})")


def cmd_compare(args: argparse.Namespace) -> None:
    from cellseg.ops.compare import compare

    runs = args.runs.split(",") if args.runs else None
    if runs is not None and len(runs) != 2:
        raise CellsegError("--runs takes two runs: A,B")
    print(compare(args.last, runs, args.png))
    if not runs:
        print(f"\nhistory plot: {args.png}")


def tolerations_from(specs: list[str]) -> tuple[dict, ...]:
    """``KEY[:EFFECT]`` -> tolerations that accept any value of the taint ``KEY``."""
    return tuple(
        {"key": key, "operator": "Exists", "effect": effect or "NoSchedule"}
        for key, _, effect in (t.partition(":") for t in specs)
    )


def cmd_launch(args: argparse.Namespace) -> None:
    import yaml

    from cellseg.cluster.jobs import JobSpec, build_job, job_name
    from cellseg.cluster.launch import run_job
    from cellseg.ops.steps import TrainRequest, train_args

    request = TrainRequest(phase=args.phase, profile=args.profile, overrides=tuple(args.set))
    spec = JobSpec(
        name=args.name or job_name(args.pipeline_run, args.phase),
        image=args.image,
        train_args=tuple(train_args(request, args.data, args.out, args.init, None)),
        namespace=args.namespace,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        node_selector=dict(kv.split("=", 1) for kv in args.node_selector),
        tolerations=tolerations_from(args.toleration),
        mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI", ""),
        queue_name=args.queue,
        timeout_seconds=int(args.timeout_hours * 3600),
    )
    if args.dry_run:
        print(yaml.safe_dump(build_job(args.engine, spec), sort_keys=False), end="")
        return
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    run_job(args.engine, spec, client.ApiClient(), args.queue_timeout_hours * 3600)


def cmd_doctor(args: argparse.Namespace) -> None:
    from kubernetes import client, config

    from cellseg.cluster.doctor import Settings, blockers, run_checks

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    settings = Settings(
        namespace=args.namespace,
        engine=args.engine,
        queue_name=args.queue,
        mlflow_uri=args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or Settings.mlflow_uri,
        kfp_host=os.environ.get("KFP_HOST", ""),
        kfp_token=os.environ.get("KFP_TOKEN", ""),
        account=args.as_account,
    )
    results = run_checks(client.ApiClient(), settings)
    for result in results:
        print(result.line())
    if failed := blockers(results):
        raise CellsegError(f"{len(failed)} requirement(s) failed: " + "; ".join(
            r.requirement for r in failed
        ))  # fmt: skip


def add_data_commands(sub) -> None:
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


def add_model_commands(sub) -> None:
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
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    evaluate.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = sub.add_parser("predict", help="instances, counts and overlays for images")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images or folders")
    predict.add_argument("--model", required=True, help="checkpoint, folder or MLflow URI")
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    predict.add_argument("--threads", type=int, default=0, help="0: the CPUs it may use")
    predict.set_defaults(handler=cmd_predict)


def add_ops_commands(sub) -> None:
    from cellseg.cluster import names as cluster  # constants only

    register = sub.add_parser("register", help="register a model in MLflow (challenger + gate)")
    register.add_argument("--model", type=Path, required=True, help="checkpoint or folder")
    register.add_argument("--metrics", type=Path, required=True, help="metrics.json of evaluate")
    register.add_argument("--data", type=Path, required=True, help="converted dataset")
    register.add_argument("--pipeline-run", default="manual", help="groups the MLflow runs")
    register.add_argument("--tolerance", type=float, default=0.02, help="per-class PQ drop")
    register.add_argument("--force", action="store_true", help="promote regardless (recorded)")
    register.set_defaults(handler=cmd_register)

    launch = sub.add_parser("launch", help="train as a cluster job (--dry-run prints its YAML)")
    launch.add_argument("--dry-run", action="store_true", help="print the manifest, submit nothing")
    launch.add_argument(
        "--engine",
        choices=("pytorchjob", "trainjob"),
        default="pytorchjob",
        help="Training Operator v1 PyTorchJob, or Kubeflow Trainer v2 TrainJob",
    )
    launch.add_argument("--queue", default="", help="Kueue LocalQueue (default: none)")
    launch.add_argument("--phase", type=int, choices=(1, 2), default=1)
    launch.add_argument("--data", default=f"{cluster.CHECKPOINTS_MOUNT}/manual/dataset")
    launch.add_argument("--out", default=f"{cluster.CHECKPOINTS_MOUNT}/manual/phase1")
    launch.add_argument("--init", help="Phase 2: Phase 1's checkpoint on the volume")
    launch.add_argument("--profile", default="uni-gpu")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--nodes", type=int, default=1)
    launch.add_argument("--gpus-per-node", type=int, default=1)
    launch.add_argument("--image", default=cluster.IMAGE)
    launch.add_argument("--namespace", default=cluster.NAMESPACE)
    launch.add_argument("--name", help="job name (default: from --pipeline-run and --phase)")
    launch.add_argument("--pipeline-run", default="manual")
    launch.add_argument(
        "--node-selector", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    launch.add_argument(
        "--toleration", action="append", default=[], metavar="KEY[:EFFECT]", help="repeatable"
    )
    launch.add_argument("--timeout-hours", type=float, default=72.0, help="after admission")
    launch.add_argument("--queue-timeout-hours", type=float, default=168.0, help="while queued")
    launch.set_defaults(handler=cmd_launch)

    doctor = sub.add_parser("doctor", help="check the cluster: one line per requirement")
    doctor.add_argument("--namespace", default=cluster.NAMESPACE)
    doctor.add_argument("--engine", choices=("pytorchjob", "trainjob"), default="pytorchjob")
    doctor.add_argument("--queue", default="", help="the Kueue LocalQueue runs will use")
    doctor.add_argument(
        "--mlflow-uri", default="", help="default: $MLFLOW_TRACKING_URI, else in-cluster"
    )
    doctor.add_argument(
        "--as", dest="as_account", default=None, metavar="USER",
        help="whose rights to check (default: the pipeline's account; '' = yours)",
    )  # fmt: skip
    doctor.set_defaults(handler=cmd_doctor)

    rollout = sub.add_parser(
        "rollout", help="point a KServe InferenceService at a registered version (the champion)"
    )
    rollout.add_argument("--service", default="cellseg", help="InferenceService name")
    rollout.add_argument("--namespace", default=cluster.NAMESPACE)
    rollout.add_argument("--model-name", default="cellseg", help="registered model")
    rollout.add_argument("--version", default="champion", help="an alias or a version number")
    rollout.add_argument(
        "--canary", type=int, default=0, metavar="PERCENT", help="1..99: a canary share; 0: all"
    )
    rollout.add_argument("--dry-run", action="store_true", help="print the patch, apply nothing")
    rollout.set_defaults(handler=cmd_rollout)

    compare = sub.add_parser("compare", help="compare pipeline runs and registry versions")
    compare.add_argument("--last", type=int, default=10, help="the last N pipeline runs")
    compare.add_argument("--runs", help="two pipeline runs side by side: A,B")
    compare.add_argument("--png", type=Path, default=Path("out/compare.png"))
    compare.set_defaults(handler=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellseg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    add_model_commands(sub)
    add_ops_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except CellsegError as err:  # the user's to fix: one line each, no traceback
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"cellseg {args.command}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
