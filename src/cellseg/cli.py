"""``cellseg`` command line: one sub-command per pipeline step.

Each handler parses arguments and calls one library function; heavy imports happen inside the
handler so ``cellseg --help`` stays fast and the training image needs no orchestration packages.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cellseg import settings
from cellseg.errors import CellsegError
from cellseg.model.reference import is_mlflow_reference
from cellseg.runtime import match_torch_threads


def cmd_data(args: argparse.Namespace) -> None:
    from cellseg.data.source import add_to_dvc_cache, ensure_bccd

    mirror = args.mirror or os.environ.get("BCCD_MIRROR") or None
    fetched = ensure_bccd(args.dvc_file, args.md5sums, mirror)
    print("BCCD fetched and verified" if fetched else "BCCD up to date (verified against data.dvc)")
    if add_to_dvc_cache(args.dvc_file):
        print("in the DVC cache: `dvc push` shares it, `dvc status` is clean")


def cmd_data_pull(args: argparse.Namespace) -> None:
    from cellseg.data.revision import pull

    pulled = pull(args.repo, args.rev, args.to)
    print(f"data -> {pulled.path}")
    print(f"commit {pulled.commit} md5 {pulled.dvc_md5}")  # the last line: what scripts read


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
        from cellseg.registry.tracking import Tracker, configure

        configure()
        tracker = Tracker(args.mlflow_run)
    state = train(args.phase, args.data, args.out, config, init=args.init, tracker=tracker)
    if state.history:
        best = min(h["val_total"] for h in state.history)
        print(f"phase {args.phase}: {state.epoch} epoch(s), best val loss {best:.4f} -> {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from cellseg.evaluation.evaluate import evaluate
    from cellseg.evaluation.inference import load_predictor
    from cellseg.model.postprocess_params import with_overrides

    match_torch_threads()  # the cgroup's CPU quota, not the host's core count
    predictor = load_predictor(args.model, args.device)
    predictor.params = with_overrides(predictor.params, args.set)  # checked before the work
    metrics = evaluate(
        args.data, predictor, args.out, args.split, args.limit, model_name=args.model
    )
    keys = ("box_map50", "mask_map50", "mask_map", "pq", "f1", "aji")
    print(" ".join(f"{k}={metrics[k]:.3f}" for k in keys) + f" -> {args.out}/report.md")


def cmd_tune(args: argparse.Namespace) -> None:
    from cellseg.evaluation.tune import tune

    match_torch_threads()
    budget = {"budget_seconds": args.budget_seconds} if args.budget_seconds else {}
    tuning = tune(args.model, args.data, args.out, args.device, limit=args.limit, **budget)
    changed = ", ".join(f"{k}={v}" for k, v in tuning.changed().items()) or "nothing changed"
    print(f"{tuning.start_score:.4f} -> {tuning.best_score:.4f} on val ({changed}) -> {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    from cellseg.evaluation.inference import load_predictor
    from cellseg.evaluation.predict import predict
    from cellseg.runtime import set_inference_threads

    set_inference_threads(args.threads)
    failures = predict(args.inputs, load_predictor(args.model, args.device), args.out)
    if failures:
        raise CellsegError(f"{failures} file(s) failed (see above); the others are in {args.out}")
    print(f"predictions -> {args.out} (results.json, counts.csv, overlays/)")


def cmd_register(args: argparse.Namespace) -> None:
    import json
    import tempfile
    from pathlib import Path

    from cellseg.registry.promotion import promote
    from cellseg.steps.register import register_step
    from cellseg.steps.score_champion import score_champion_step

    with tempfile.TemporaryDirectory() as champion:  # the champion on the same test split
        score_champion_step(args.data, Path(champion), args.pipeline_run, {}, None)
        result = register_step(
            model=args.model, metrics_path=args.metrics, data=args.data,
            pipeline_run_id=args.pipeline_run, tags={}, mlflow_uri=None,
            tolerance=args.tolerance, force=args.force, champion_dir=Path(champion),
        )  # fmt: skip
    if result["promote"]:
        moved = promote(result["version"], result["champion_version"], force=result["forced"])
        result |= {"promote": moved.promote, "reasons": result["reasons"] + moved.reasons}
    print(json.dumps(result))


def cmd_rollout(args: argparse.Namespace) -> None:
    import json

    from cellseg.registry.champion import storage_uri_of
    from cellseg.registry.tracking import configure
    from cellseg.serving.rollout import roll_inference_service, rollout_patch

    configure()
    uri = storage_uri_of(args.model_name, args.version, args.artifacts_root)
    if args.dry_run:
        print(json.dumps(rollout_patch(uri, args.canary)))
        return
    from cellseg.cluster.client import api_client

    roll_inference_service(args.service, args.namespace, uri, args.canary, api_client())
    share = f"{args.canary}% of the traffic" if 0 < args.canary < 100 else "all traffic"
    print(f"inferenceservice/{args.service} -> {uri} ({share})")


def cmd_compare(args: argparse.Namespace) -> None:
    from cellseg.registry.compare import compare

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
    from cellseg.steps.train import TrainRequest, train_args

    placement = {}  # without flags: the GPU nodes, as the pipeline targets them
    if args.node_selector:
        placement["node_selector"] = dict(kv.split("=", 1) for kv in args.node_selector)
    if args.toleration:
        placement["tolerations"] = tolerations_from(args.toleration)
    job = settings.TrainingJobSettings(
        training_engine=args.training_engine,
        image=args.image,
        num_nodes=args.num_nodes,
        gpus_per_node=args.gpus_per_node,
        **placement,
        queue_name=args.queue_name,
        train_cpu_per_node=args.train_cpu_per_node,
        train_memory_per_node=args.train_memory_per_node,
        train_shm_per_node=args.train_shm_per_node,
        train_timeout_hours=args.train_timeout_hours,
        queue_timeout_hours=args.queue_timeout_hours,
        pending_timeout_minutes=args.pending_timeout_minutes,
    )
    request = TrainRequest(
        phase=args.phase, profile=args.profile, overrides=tuple(args.set), job=job
    )
    spec = JobSpec(
        name=args.name or job_name(args.pipeline_run, args.phase),
        train_args=tuple(train_args(request, args.data, args.out, args.init, None)),
        job=job,
        namespace=args.namespace,
        mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI", ""),
    )
    if args.dry_run:
        print(yaml.safe_dump(build_job(spec), sort_keys=False), end="")
        return
    run_job(spec)


def cmd_doctor(args: argparse.Namespace) -> None:
    from cellseg.cluster.client import api_client
    from cellseg.cluster.doctor import DoctorOptions, blockers, run_checks

    options = DoctorOptions(
        namespace=args.namespace,
        engine=args.training_engine,
        queue_name=args.queue_name,
        mlflow_uri=args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or settings.MLFLOW_URI,
        kfp_host=os.environ.get("KFP_HOST", ""),
        kfp_token=os.environ.get("KFP_TOKEN", ""),
        account=args.as_account,
        inference_service=args.inference_service,
    )
    results = run_checks(api_client(), options)
    for result in results:
        print(result.line())
    if failed := blockers(results):
        raise CellsegError(f"{len(failed)} requirement(s) failed: " + "; ".join(
            r.requirement for r in failed
        ))  # fmt: skip


def cmd_mlflow_user(args: argparse.Namespace) -> None:
    from cellseg.cluster.client import api_client
    from cellseg.registry import users

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise CellsegError(
            "no MLflow address: kubectl -n cellseg port-forward svc/mlflow 5000, then "
            "MLFLOW_TRACKING_URI=http://localhost:5000"
        )
    api = api_client()
    admin = users.secret_login(api, args.namespace, users.ADMIN_SECRET, users.ADMIN_KEYS)
    user = users.secret_login(
        api, args.namespace, settings.MLFLOW_AUTH_SECRET, settings.MLFLOW_AUTH_KEYS
    )
    if admin is None or user is None:
        raise CellsegError("both Secrets must hold a login (their values are empty)")
    for line in users.ensure_pipeline_user(uri, admin, user):
        print(line)


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="obtain raw BCCD into data/BCCD and verify it (data.dvc)")
    data.add_argument("--mirror", help="local directory or archive (default: $BCCD_MIRROR)")
    data.add_argument("--dvc-file", type=Path, default=Path("data.dvc"))
    data.add_argument("--md5sums", type=Path, default=Path("data.md5sums"))
    data.set_defaults(handler=cmd_data)
    actions = data.add_subparsers(dest="action")
    pull = actions.add_parser(
        "pull", help="the data a DVC data repository pins at a revision, into DIR/<md5>/"
    )
    pull.add_argument("--repo", required=True, help="git URL or path of the data repository")
    pull.add_argument("--rev", default="", help="branch, tag or commit (default: HEAD)")
    pull.add_argument("--to", type=Path, required=True, metavar="DIR",
                      help="where versions are kept, one folder per DVC md5")  # fmt: skip
    pull.set_defaults(handler=cmd_data_pull)

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
    train.add_argument("--profile", default=settings.LOCAL_PROFILE,
                       help="a named profile (local, uni-gpu, ...) or a YAML file")  # fmt: skip
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
    evaluate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="post-processing setting instead of the checkpoint's (e.g. border_score=0.8)",
    )  # fmt: skip

    evaluate.set_defaults(handler=cmd_evaluate)

    tune = sub.add_parser("tune", help="choose the post-processing on the val split")
    tune.add_argument("--data", type=Path, required=True, help="converted dataset directory")
    tune.add_argument("--model", type=Path, required=True, help="checkpoint or training folder")
    tune.add_argument("--out", type=Path, required=True, help="the tuned checkpoint and table")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--budget-seconds", type=float, default=None,
                      help="search time budget (default 600)")  # fmt: skip
    tune.add_argument("--limit", type=int, default=0, help="first N val images only (0 = all)")
    tune.set_defaults(handler=cmd_tune)

    predict = sub.add_parser("predict", help="instances, counts and overlays for images")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="images or folders")
    predict.add_argument("--model", required=True, help="checkpoint, folder or MLflow URI")
    predict.add_argument("--out", type=Path, required=True)
    predict.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    predict.add_argument("--threads", type=int, default=0, help="0: the CPUs it may use")
    predict.set_defaults(handler=cmd_predict)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The training job's shape: one flag per :class:`cellseg.settings.TrainingJobSettings`
    field, named as the pipeline parameter, with its default."""
    job = settings.TRAINING_JOB
    parser.add_argument(
        "--training-engine",
        choices=settings.TRAINING_ENGINES,
        default=job.training_engine,
        help="Training Operator v1 PyTorchJob, or Kubeflow Trainer v2 TrainJob",
    )
    parser.add_argument("--image", default=job.image)
    parser.add_argument("--num-nodes", type=int, default=job.num_nodes)
    parser.add_argument("--gpus-per-node", type=int, default=job.gpus_per_node)
    parser.add_argument(
        "--node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="repeatable (default: the GPU nodes' label)",
    )
    parser.add_argument(
        "--toleration",
        action="append",
        default=[],
        metavar="KEY[:EFFECT]",
        help="repeatable (default: the GPU taint)",
    )
    parser.add_argument(
        "--queue-name", default=job.queue_name, help="Kueue LocalQueue (default: none)"
    )
    parser.add_argument("--train-cpu-per-node", default=job.train_cpu_per_node)
    parser.add_argument("--train-memory-per-node", default=job.train_memory_per_node)
    parser.add_argument("--train-shm-per-node", default=job.train_shm_per_node)
    parser.add_argument(
        "--train-timeout-hours", type=float, default=job.train_timeout_hours, help="after admission"
    )
    parser.add_argument(
        "--queue-timeout-hours", type=float, default=job.queue_timeout_hours, help="while queued"
    )
    parser.add_argument("--pending-timeout-minutes", type=float,
                        default=job.pending_timeout_minutes,
                        help="a pod no node can take fails the job after this")  # fmt: skip


def add_ops_commands(sub) -> None:
    register = sub.add_parser("register", help="register a model in MLflow (challenger + gate)")
    register.add_argument("--model", type=Path, required=True, help="checkpoint or folder")
    register.add_argument("--metrics", type=Path, required=True, help="metrics.json of evaluate")
    register.add_argument("--data", type=Path, required=True, help="converted dataset")
    register.add_argument("--pipeline-run", default="manual", help="groups the MLflow runs")
    register.add_argument(
        "--tolerance",
        type=float,
        default=settings.PROMOTION_TOLERANCE,
        help="the largest per-class PQ drop a better model may bring",
    )
    register.add_argument("--force", action="store_true", help="promote regardless (recorded)")
    register.set_defaults(handler=cmd_register)

    launch = sub.add_parser("launch", help="train as a cluster job (--dry-run prints its YAML)")
    launch.add_argument("--dry-run", action="store_true", help="print the manifest, submit nothing")
    launch.add_argument("--phase", type=int, choices=(1, 2), default=1)
    launch.add_argument("--data", default=f"{settings.CHECKPOINTS_MOUNT}/manual/dataset")
    launch.add_argument("--out", default=f"{settings.CHECKPOINTS_MOUNT}/manual/phase1")
    launch.add_argument("--init", help="Phase 2: Phase 1's checkpoint on the volume")
    launch.add_argument("--profile", default=settings.CLUSTER_PROFILE)
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--namespace", default=settings.NAMESPACE)
    launch.add_argument("--name", help="job name (default: from --pipeline-run and --phase)")
    launch.add_argument("--pipeline-run", default="manual")
    add_job_arguments(launch)
    launch.set_defaults(handler=cmd_launch)

    doctor = sub.add_parser("doctor", help="check the cluster: one line per requirement")
    doctor.add_argument("--namespace", default=settings.NAMESPACE)
    doctor.add_argument("--training-engine", choices=settings.TRAINING_ENGINES,
                        default=settings.TRAINING_JOB.training_engine)  # fmt: skip
    doctor.add_argument("--queue-name", default=settings.TRAINING_JOB.queue_name,
                        help="the Kueue LocalQueue runs will use")  # fmt: skip
    doctor.add_argument(
        "--mlflow-uri", default="", help="default: $MLFLOW_TRACKING_URI, else in-cluster"
    )
    doctor.add_argument(
        "--inference-service",
        default="",
        help="the pipeline's inference_service: check the right to roll it",
    )
    doctor.add_argument(
        "--as", dest="as_account", default=None, metavar="USER",
        help="whose rights to check (default: the pipeline's account; '' = yours)",
    )  # fmt: skip
    doctor.set_defaults(handler=cmd_doctor)

    user = sub.add_parser(
        "mlflow-user",
        help="MLflow with basic-auth (mlflow-team): create the pipeline's user, as the admin",
    )
    user.add_argument("--namespace", default=settings.NAMESPACE, help="where both Secrets are")
    user.add_argument("--mlflow-uri", default="", help="default: $MLFLOW_TRACKING_URI")
    user.set_defaults(handler=cmd_mlflow_user)

    rollout = sub.add_parser(
        "rollout", help="point a KServe InferenceService at a registered version (the champion)"
    )
    rollout.add_argument("--service", default=settings.INFERENCE_SERVICE,
                         help="InferenceService name")  # fmt: skip
    rollout.add_argument("--namespace", default=settings.NAMESPACE)
    rollout.add_argument("--model-name", default=settings.REGISTERED_MODEL,
                         help="registered model")  # fmt: skip
    from cellseg.registry.champion import CHAMPION  # a constant; mlflow loads at call time

    rollout.add_argument("--version", default=CHAMPION, help="an alias or a version number")
    rollout.add_argument(
        "--canary", type=int, default=0, metavar="PERCENT", help="1..99: a canary share; 0: all"
    )
    rollout.add_argument(
        "--artifacts-root", default="",
        help="where KServe reads MLflow's proxied artifacts (e.g. s3://bucket/mlflow)",
    )  # fmt: skip
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
        if is_mlflow_reference(getattr(args, "model", None) or ""):
            # the store `make pipeline-run` writes, unless MLFLOW_TRACKING_URI names another
            from cellseg.registry.tracking import use_store

            use_store()
        args.handler(args)
    except CellsegError as err:  # the user's to fix: one line each, no traceback
        for line in str(err).splitlines() or [type(err).__name__]:
            print(f"cellseg {args.command}: error: {line}", file=sys.stderr)
        return getattr(err, "exit_code", 2)  # 143: stopped by SIGTERM, resumable
    return 0


if __name__ == "__main__":
    sys.exit(main())
