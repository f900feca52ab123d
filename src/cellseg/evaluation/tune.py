"""Post-processing chosen on val: the model runs once over the val split, its NP / HV / NC maps
are kept, and the post-processing settings (:class:`PostprocessParams`) are searched against
strict box mAP@0.5 on those maps. The test split is never read.

Objective: strict box mAP@0.5 on val, the figure the docs lead with and the one the settings
were chosen by by hand (docs/ablations.md); box rather than mask AP because BCCD's ground truth
is boxes (its masks are pseudo-masks drawn from them), and strict because the void-aware figure
forgives exactly the unboxed cells that ``border_score`` is meant to rank lower.

Search: coordinate descent from the model's own settings (the profile's, a starting point): each
key in turn over a small grid, keeping a value only when it scores higher (a tie keeps the
current one), up to three passes, until a pass changes nothing or the time budget is spent. It
is deterministic (same maps, same choice), and never ends below its starting point. Areas are
searched as multiples of the current value (the model's own at first), so the grid follows the
image scale the model works at.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellseg.errors import CheckpointError
from cellseg.model.postprocess_params import POSTPROCESS_KEYS, PostprocessParams

OBJECTIVE = "val strict box mAP@0.5"
SEARCH_KEYS = (
    "markers",
    "np_threshold",
    "min_marker_area",
    "min_instance_area",
    "merge_touching",
    "border_score",
    "keep_markerless",
)
AREA_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
BUDGET_SECONDS = 600.0


def grid(key: str, current: PostprocessParams) -> list:
    """The values tried for ``key``, the current value among them."""
    if key == "markers":
        return ["slope", "sobel"]
    if key == "np_threshold":
        return sorted({0.3, 0.4, 0.5, 0.6, current.np_threshold})
    if key in ("min_marker_area", "min_instance_area"):
        value = getattr(current, key)
        return sorted({max(1, round(value * f)) for f in AREA_FACTORS})
    if key == "merge_touching":
        return [(), ("WBC",)]
    if key == "border_score":
        return sorted({1.0, 0.85, 0.7, 0.5, current.border_score}, reverse=True)
    if key == "keep_markerless":
        return [False, True]
    raise KeyError(key)


@dataclass
class Tuning:
    """A search's outcome: the settings it started from and chose, and every trial."""

    start: PostprocessParams
    chosen: PostprocessParams
    start_score: float
    best_score: float
    trials: list[dict] = field(default_factory=list)  # {key, value, score, kept}
    seconds: float = 0.0
    complete: bool = True  # False: the budget ran out before a pass changed nothing

    def changed(self) -> dict:
        before, after = dataclasses.asdict(self.start), dataclasses.asdict(self.chosen)
        return {k: after[k] for k in POSTPROCESS_KEYS if after[k] != before[k]}

    def as_dict(self) -> dict:
        return {
            "objective": OBJECTIVE,
            "start": params_dict(self.start),
            "chosen": params_dict(self.chosen),
            "changed": {k: plain(v) for k, v in self.changed().items()},
            "start_score": self.start_score,
            "best_score": self.best_score,
            "seconds": round(self.seconds, 1),
            "complete": self.complete,
            "trials": [{**t, "value": plain(t["value"])} for t in self.trials],
        }

    def markdown(self) -> str:
        lines = [
            f"# Post-processing chosen on val ({OBJECTIVE})",
            "",
            f"{self.start_score:.4f} with the model's own settings -> {self.best_score:.4f}; "
            f"{len(self.trials)} trials in {self.seconds:.0f} s"
            + ("" if self.complete else " (time budget spent before the search settled)"),
            "",
            "| key | start | chosen |",
            "| --- | --- | --- |",
        ]
        start, chosen = params_dict(self.start), params_dict(self.chosen)
        lines += [f"| `{k}` | {start[k]} | {chosen[k]} |" for k in SEARCH_KEYS]
        lines += ["", "| trial | key | value | score | kept |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {i} | `{t['key']}` | {plain(t['value'])} | {t['score']:.4f} | "
            f"{'yes' if t['kept'] else ''} |"
            for i, t in enumerate(self.trials, start=1)
        ]
        return "\n".join(lines) + "\n"


def plain(value):
    return list(value) if isinstance(value, tuple) else value


def params_dict(params: PostprocessParams) -> dict:
    return {k: plain(v) for k, v in dataclasses.asdict(params).items()}


def search(
    objective: Callable[[PostprocessParams], float],
    start: PostprocessParams,
    keys: tuple[str, ...] = SEARCH_KEYS,
    budget_seconds: float = BUDGET_SECONDS,
    max_passes: int = 3,
    progress: Callable[[str], None] | None = None,
) -> Tuning:
    """Coordinate descent from ``start``, maximising ``objective``."""
    began = time.monotonic()
    current, best = start, objective(start)
    tuning = Tuning(start, start, best, best)
    for _ in range(max_passes):
        improved = False
        for key in keys:
            for value in grid(key, current):
                if value == getattr(current, key):
                    continue
                if time.monotonic() - began > budget_seconds:
                    tuning.complete = False
                    break
                candidate = dataclasses.replace(current, **{key: value})
                score = objective(candidate)
                kept = score > best
                tuning.trials.append({"key": key, "value": value, "score": score, "kept": kept})
                if progress:
                    progress(
                        f"tune: {key}={plain(value)} -> {score:.4f}{' (kept)' if kept else ''}"
                    )
                if kept:
                    current, best, improved = candidate, score, True
            if not tuning.complete:
                break
        if not improved or not tuning.complete:
            break
    else:
        tuning.complete = False  # the passes ran out while still improving
    tuning.chosen, tuning.best_score = current, best
    tuning.seconds = time.monotonic() - began
    return tuning


@dataclass
class SplitMaps:
    """A split's ground truth and the model's maps of it, at the working resolution."""

    gt_doc: dict
    images: list[dict]
    maps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    shapes: list[tuple[int, int]]

    def box_map50(self, params: PostprocessParams) -> float:
        """Strict box mAP@0.5 of these maps post-processed with ``params``."""
        from cellseg.data.coco import coco_results
        from cellseg.evaluation.inference import resize_labels
        from cellseg.evaluation.metrics import coco_map
        from cellseg.evaluation.postprocess import postprocess

        results = []
        for im, m, shape in zip(self.images, self.maps, self.shapes, strict=True):
            inst = postprocess(*m, params)
            inst.labels = resize_labels(inst.labels, shape)
            results += coco_results(im["id"], inst)
        return coco_map(self.gt_doc, results, "bbox")["map50"]


def split_maps(data: Path, predictor, split: str = "val", limit: int = 0) -> SplitMaps:
    """Run ``predictor``'s network once over ``split`` of the converted dataset ``data``."""
    from tqdm import tqdm

    from cellseg.data.arrays import load_sample

    gt_doc = json.loads((Path(data) / "coco" / f"{split}.json").read_text())
    images = sorted(gt_doc["images"], key=lambda im: im["id"])[: limit or None]
    ids = {im["id"] for im in images}
    gt_doc = {
        **gt_doc,
        "images": images,
        "annotations": [a for a in gt_doc["annotations"] if a["image_id"] in ids],
    }
    maps, shapes = [], []
    batch = getattr(predictor, "batch_size", 1)
    for start in tqdm(range(0, len(images), batch), desc=f"tune: {split} maps", file=sys.stderr):
        chunk = images[start : start + batch]
        pixels = [load_sample(data, Path(im["file_name"]).stem)["image"] for im in chunk]
        maps += predictor.probabilities_batch([predictor.check(p) for p in pixels])
        shapes += [p.shape[:2] for p in pixels]
    return SplitMaps(gt_doc, images, maps, shapes)


def write_tuned(source: Path, target: Path, tuning: Tuning) -> None:
    """``source`` (a whole checkpoint) with the chosen settings in its config, as ``target``:
    the settings every reader of a checkpoint applies (evaluation, predict, serving)."""
    import torch

    from cellseg.model.checkpoint import write_payload

    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    if ckpt.get("frozen"):
        raise CheckpointError(f"{source}: tune a whole checkpoint (best_phase<N>.pt)")
    ckpt["config"] = {**ckpt["config"], **params_dict(tuning.chosen)}
    ckpt["tuning"] = {k: v for k, v in tuning.as_dict().items() if k != "trials"}
    write_payload(target, ckpt)


def tune(
    model: Path,
    data: Path,
    out: Path,
    device: str = "auto",
    budget_seconds: float = BUDGET_SECONDS,
    limit: int = 0,
    keys: tuple[str, ...] = SEARCH_KEYS,
) -> Tuning:
    """Search ``model``'s post-processing on ``data``'s val split; ``out`` gets the checkpoint
    with the chosen settings (same file name), ``tuning.json`` and ``tuning.md``."""
    from cellseg.atomic import staged_dir
    from cellseg.evaluation.inference import Predictor
    from cellseg.model.checkpoint import find_checkpoint

    source = find_checkpoint(Path(model))
    predictor = Predictor.from_checkpoint(source, device)
    maps = split_maps(Path(data), predictor, "val", limit)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    tuning = search(maps.box_map50, predictor.params, keys, budget_seconds, progress=progress)
    with staged_dir(Path(out)) as work:
        write_tuned(source, work / source.name, tuning)
        (work / "tuning.json").write_text(json.dumps(tuning.as_dict(), indent=2))
        (work / "tuning.md").write_text(tuning.markdown())
    return tuning
