"""``make bench-gpu``: the whole GPU check in one run, figures as JSON beside a printed table.

1. convert BCCD;
2. whole Phase 1 and Phase 2 training steps (decoder, losses, real loader) of the profile's
   backbone (``uni-gpu``: ViT-L/16, UNI's shape, random weights) at full resolution in bf16,
   eager and ``torch.compile``d: img/s, MFU (FLOPs from ``FlopCounterMode`` / time / the chip's
   dense bf16 peak), peak memory, the real loader against pre-loaded tensors, and the share of
   an epoch (the train split at that speed) that its checkpoints hold training up;
3. a real ``cellseg train`` run of the profile on a subset, killed after its first checkpoint and
   started again (it must resume), Phase 2 from it, then ``cellseg evaluate`` on the device:
   the code paths only a GPU runs (bf16 autocast, NCCL-ready set-up, pinned memory, workers).

``--quick`` checks the same path on a CPU in minutes (the test ViT at 64x96, eager only), which
is how it is verified on machines without a GPU; MFU is then not reported (no peak to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.training_steps import Row, step_figures
from cellseg.settings import CLUSTER_PROFILE

QUICK = ["backbone=test_vit", "decoder_width=0", "image_size=64,96", "train_crop=48",
         "batch_size=2", "num_workers=0", "device=cpu", "amp=none"]  # fmt: skip


def cellseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "cellseg.cli", *map(str, args)]


def kill_after_first_checkpoint(cmd: list[str], latest: Path, timeout: float) -> float:
    """Start ``cmd``, kill it as soon as ``latest`` exists (a preempted pod); seconds it ran."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        while not latest.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"training ended (code {proc.returncode}) before a checkpoint")
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"no checkpoint after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - start


def training_run(data: Path, out: Path, overrides: list[str], epochs: int, subset: int) -> dict:
    """Phase 1 killed and resumed, Phase 2 from it, evaluation: all on the profile's device."""
    sets = [a for o in ["weights=null", f"epochs={epochs}", f"limit_train_images={subset}",
                        f"limit_val_images={max(subset // 4, 2)}", *overrides]
            for a in ("--set", o)]  # fmt: skip
    phase1 = cellseg("train", "--phase", 1, "--data", data, "--out", out,
                     "--profile", CLUSTER_PROFILE, *sets)  # fmt: skip
    killed_after = kill_after_first_checkpoint(phase1, out / "latest_phase1.pt", 1800)
    start = time.monotonic()
    resumed = subprocess.run(phase1, capture_output=True, text=True)
    if resumed.returncode != 0 or "resuming from" not in resumed.stderr:
        raise RuntimeError(f"Phase 1 did not resume:\n{resumed.stderr[-2000:]}")
    phase1_s = time.monotonic() - start
    phase2 = list(phase1)
    phase2[phase2.index("--phase") + 1] = "2"
    start = time.monotonic()
    subprocess.run(phase2, check=True)
    phase2_s = time.monotonic() - start
    device = next((o.split("=", 1)[1] for o in overrides if o.startswith("device=")), "cuda")
    start = time.monotonic()
    subprocess.run(cellseg("evaluate", "--data", data, "--model", out, "--out", out / "eval",
                           "--device", device, "--limit", 8), check=True)  # fmt: skip
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    return {
        "killed_after_s": killed_after,
        "resumed_phase1_s": phase1_s,
        "phase2_s": phase2_s,
        "evaluate_s": time.monotonic() - start,
        "evaluated_images": metrics["images"],
        "box_map50": metrics["box_map50"],
    }


def table(results: dict) -> list[Row]:
    rows: list[Row] = [("device", results["device"]), ("convert", f"{results['convert_s']:.1f} s")]
    for s in results["steps"]:
        mfu = f"MFU {s['mfu']:.2f}" if s["mfu"] is not None else "MFU n/a"
        mem = f", peak {s['peak_memory_gb']:.1f} GB" if s["peak_memory_gb"] else ""
        goal = 0.43 if s["phase"] == 1 else 0.35
        rows.append((
            f"phase {s['phase']} step, {'compiled' if s['compiled'] else 'eager'}",
            f"{s['img_per_s']:.1f} img/s, {mfu} (goal >= {goal}){mem}, "
            f"loader/pre-loaded {s['loader_ratio']:.2f}",
        ))  # fmt: skip
        if "checkpoint_share" in s:
            mb = s["checkpoint_mb"]
            rows.append((
                f"phase {s['phase']} checkpoints per epoch",
                f"{100 * s['checkpoint_share']:.1f} % of an epoch (goal <= 5 %): held "
                f"{s['checkpoint_held_s']:.2f} s, {s['checkpoint_write_s']:.2f} s written in the "
                f"background; latest {mb['latest']:.1f} MB + frozen {mb['frozen']:.1f} MB once, "
                f"best {mb['best']:.1f} MB",
            ))  # fmt: skip
    run = results.get("training_run")
    if run:
        rows.append(("train: killed after first checkpoint", f"{run['killed_after_s']:.0f} s"))
        rows.append(("train: resumed Phase 1, then Phase 2", f"{run['resumed_phase1_s']:.0f} s, "
                     f"{run['phase2_s']:.0f} s"))  # fmt: skip
        rows.append(("evaluate on the device", f"{run['evaluated_images']} images in "
                     f"{run['evaluate_s']:.0f} s, box mAP50 {run['box_map50']:.3f}"))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("data/BCCD"))
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--epochs", type=int, default=3, help="of the training run")
    parser.add_argument("--subset", type=int, default=64, help="training images of the run")
    parser.add_argument("--quick", action="store_true", help="CPU, test ViT, 64x96: a dry run")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from cellseg.data.convert import convert_dataset

    overrides = QUICK if args.quick else []
    if not args.quick and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device (use --quick for a CPU dry run)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    start = time.monotonic()
    data = args.out / "dataset"
    convert_dataset(args.source, data)
    results["convert_s"] = time.monotonic() - start
    variants = [False] if args.no_compile or args.quick else [False, True]  # compiling: GPU only
    results["steps"] = [
        step_figures(data, phase, compiled, overrides, args.steps, checkpoints)
        for phase in (1, 2)
        for compiled in variants
        for checkpoints in [None if compiled else args.out / f"checkpoints-phase{phase}"]
    ]
    results["training_run"] = training_run(
        data, args.out / "train", overrides, args.epochs, args.subset
    )
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    rows = table(results)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"\nfigures: {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
