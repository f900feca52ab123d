"""``make pipeline-run`` without KFP_HOST: the whole pipeline on this machine through kfp.local,
then a summary. ``--runner subprocess`` (default) runs each step in the project's environment;
``--runner container`` runs each step inside the project image (``--image``), as uid 1000, with
the data and the MLflow store bind-mounted at their own paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from cellseg.registry.gate import decision_rows, verdict
from cellseg.registry.tracking import default_tracking_uri
from cellseg.runtime import portable_cpu_kernels
from cellseg.settings import LOCAL_PROFILE, TRAINING_JOB
from cellseg.steps.data_version import data_version_step
from pipelines.cellseg_pipeline import cellseg_pipeline
from pipelines.local_containers import docker_api


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def run_local(
    source: Path,
    pipeline_root: Path,
    profile: str = LOCAL_PROFILE,
    overrides: list[str] = (),
    mlflow_uri: str | None = None,
    gpus_per_node: int = TRAINING_JOB.gpus_per_node,
    force_promote: bool = False,
    image: str | None = None,
    data_md5: str | None = None,
) -> Path:
    """Run the pipeline; returns the run's output folder under ``pipeline_root``.

    Args:
        image: run every step inside this image (kfp.local's DockerRunner) instead of here.
        data_md5: the revision the run insists on; None = the one at ``source`` now, "" = none
            (as a scheduled run: the data-version step finds it, conversion is keyed on it).
    """
    from kfp import local

    source, pipeline_root = Path(source).resolve(), Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    md5 = data_version_step(str(source)).md5 if data_md5 is None else data_md5
    uri = mlflow_uri or default_tracking_uri()
    pipeline, runner = cellseg_pipeline, local.SubprocessRunner(use_venv=False)
    if image:
        pipeline, runner = in_containers(image, source, uri, pipeline_root)
    local.init(runner=runner, pipeline_root=str(pipeline_root))
    # In containers the steps run as the image's uid 1000 and write below the folders this
    # process creates for them: create those writable for everyone, for this run only.
    with umask(0o000) if image else contextlib.nullcontext():
        run_pipeline(
            pipeline, source, md5, profile, overrides, gpus_per_node, uri, force_promote, image
        )
    (run_dir,) = set(pipeline_root.iterdir()) - before
    return run_dir


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def run_pipeline(
    pipeline, source, md5, profile, overrides, gpus_per_node, uri, force_promote, image
):
    pipeline(
        source=str(source),
        data_md5=md5,
        profile=profile,
        overrides=list(overrides),
        gpus_per_node=gpus_per_node,
        mlflow_uri=uri,
        force_promote=force_promote,
        run_tags={
            "cellseg.git_commit": git_commit(),
            "cellseg.data_md5": md5,  # "" (dropped): the register step tags what it found
            "cellseg.image": image or "local",
            "cellseg.profile": profile,
        },
    )


def in_containers(image: str, source: Path, mlflow_uri: str, pipeline_root: Path):
    """The compiled pipeline with every step in ``image``, and a DockerRunner that mounts the
    raw data (read-only) and a file-based MLflow store at their own paths."""
    import tempfile

    from kfp import components

    from pipelines.compile import compile_pipeline
    from pipelines.local_containers import docker_runner

    binds = {source: True}
    if mlflow_uri.startswith("sqlite:///"):
        store = Path(mlflow_uri.removeprefix("sqlite:///")).parent
        store.mkdir(parents=True, exist_ok=True)
        binds[store] = False
        share_with_image_user(store)
    share_with_image_user(pipeline_root)
    spec = compile_pipeline(Path(tempfile.mkdtemp()) / "cellseg_pipeline.yaml", image)
    return components.load_component_from_file(str(spec)), docker_runner(binds)


def share_with_image_user(folder: Path) -> None:
    """Let the image's user (uid 1000) write in ``folder``, its files and subfolders."""
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o777 if path.is_dir() else path.stat().st_mode | 0o666)


def executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def summary(run_dir: Path, mlflow_uri: str) -> str:
    metrics = json.loads((run_dir / "evaluate" / "report_files" / "metrics.json").read_text())
    reg = executor_output(run_dir, "register")["artifacts"]["registered"]["artifacts"][0][
        "metadata"
    ]
    lines = ["", f"Test split ({metrics['images']} images):", ""]
    if "chosen_phase" in metrics:
        lines[1] += f" Phase {metrics['chosen_phase']}'s model, the better on val"
    lines.append(f"  {'':<10} {'box mAP50':>9} {'mask mAP50':>10} {'PQ':>6} {'F1':>6}")
    lines.append(
        f"  {'all':<10} {metrics['box_map50']:>9.3f} {metrics['mask_map50']:>10.3f} "
        f"{metrics['pq']:>6.3f} {metrics['f1']:>6.3f}"
    )
    for name, pc in metrics["per_class"].items():
        ap = f"{pc['box_ap50']:>9.3f} {pc['mask_ap50']:>10.3f}"
        lines.append(f"  {name:<10} {ap} {pc['pq']:>6.3f} {pc['f1']:>6.3f}")
    va = metrics["void_aware"]
    lines.append(
        f"  void-aware: PQ {va['pq']:.3f}, F1 {va['f1']:.3f}, box mAP50 {va['box_map50']:.3f}"
    )
    lines += ["", f"Registry: cellseg version {reg['version']} {verdict(reg)}: "
              f"{'; '.join(reg['reasons'])}", ""]  # fmt: skip
    lines.append(f"  {'':<28} {'challenger':>12} {'champion':>20}")
    lines += [f"  {what:<28} {new:>12} {old:>20}" for what, new, old in decision_rows(reg)]
    lines += [
        "",
        f"Report:   {run_dir / 'evaluate' / 'report_files' / 'report.md'}",
        f"Overlays: {run_dir / 'evaluate' / 'report_files' / 'overlays'}",
        f"Dataset:  {run_dir / 'convert' / 'dataset'} (preview/*.png)",
        f"MLflow:   {mlflow_uri}  (make mlflow-ui)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    parser.add_argument("--pipeline-root", type=Path, default=Path("out/kfp"))
    parser.add_argument("--profile", default=LOCAL_PROFILE)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpus-per-node", type=int, default=TRAINING_JOB.gpus_per_node,
                        help="DDP processes per phase (CPU processes here)")  # fmt: skip
    parser.add_argument("--force-promote", action="store_true")
    parser.add_argument("--runner", choices=("subprocess", "container"), default="subprocess")
    parser.add_argument("--image", default="", help="the project image (--runner container)")
    parser.add_argument(
        "--portable-kernels",
        action="store_true",
        help="AVX2 CPU kernels in every step (docs/reproducibility.md)",
    )
    args = parser.parse_args(argv)
    if args.runner == "container" and not args.image:
        parser.error("--runner container needs --image (make images builds one)")
    if args.portable_kernels and args.runner == "container":
        parser.error("--portable-kernels reaches subprocess steps only, not containers")
    if args.portable_kernels:
        portable_cpu_kernels()  # the steps' subprocesses inherit it
    uri = default_tracking_uri()
    start = time.perf_counter()
    with docker_api() if args.runner == "container" else contextlib.nullcontext():
        run_dir = run_local(
            args.source, args.pipeline_root, args.profile, args.set, uri, args.gpus_per_node,
            args.force_promote, args.image if args.runner == "container" else None,
        )  # fmt: skip
    print(summary(run_dir, uri))
    print(f"\nWall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
