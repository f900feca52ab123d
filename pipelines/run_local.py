"""``make pipeline-run`` without KFP_HOST: the whole pipeline on this machine through
``kfp.local.SubprocessRunner`` (the project's environment, CPU), then a summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from cellseg.ops.steps import data_version_step
from cellseg.ops.tracking import default_tracking_uri
from pipelines.cellseg_pipeline import cellseg_pipeline


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def run_local(
    source: Path,
    pipeline_root: Path,
    profile: str = "local",
    overrides: list[str] = (),
    mlflow_uri: str | None = None,
    processes: int = 1,
    force_promote: bool = False,
) -> Path:
    """Run the pipeline; returns the run's output folder under ``pipeline_root``."""
    from kfp import local

    source, pipeline_root = Path(source).resolve(), Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = set(pipeline_root.iterdir())
    md5 = data_version_step(str(source))
    uri = mlflow_uri or default_tracking_uri()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    cellseg_pipeline(
        source=str(source),
        data_md5=md5,
        profile=profile,
        overrides=list(overrides),
        gpus_per_node=processes,
        checkpoint_root="",
        mlflow_uri=uri,
        force_promote=force_promote,
        run_tags={
            "cellseg.git_commit": git_commit(),
            "cellseg.data_md5": md5,
            "cellseg.image": "local",
            "cellseg.profile": profile,
        },
    )
    (run_dir,) = set(pipeline_root.iterdir()) - before
    return run_dir


def executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def summary(run_dir: Path, mlflow_uri: str) -> str:
    metrics = json.loads((run_dir / "evaluate" / "report_files" / "metrics.json").read_text())
    reg = executor_output(run_dir, "register")["artifacts"]["registered"]["artifacts"][0][
        "metadata"
    ]
    lines = ["", f"Test split ({metrics['images']} images):", ""]
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
    verdict = "promoted to champion" if reg["promote"] else "kept as challenger"
    lines += [
        "",
        f"Registry: cellseg version {reg['version']} {verdict}: {'; '.join(reg['reasons'])}",
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
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--processes", type=int, default=1, help="DDP processes per phase")
    parser.add_argument("--force-promote", action="store_true")
    args = parser.parse_args(argv)
    uri = default_tracking_uri()
    start = time.perf_counter()
    run_dir = run_local(
        args.source,
        args.pipeline_root,
        args.profile,
        args.set,
        uri,
        args.processes,
        args.force_promote,
    )
    print(summary(run_dir, uri))
    print(f"\nWall time: {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
