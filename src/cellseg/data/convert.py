"""BCCD (VOC boxes) -> instance-segmentation dataset: the pipeline's first step.

Output directory (written to a temporary sibling and renamed at the end)::

    manifest.json            counts per split and class, parameters, source md5, version
    images/<stem>.jpg        the source JPEG, byte for byte
    targets/<stem>.npz       instance (uint16), classes (uint8), ignore (bool)
    coco/<split>.json        COCO instances ground truth (RLE masks, original boxes)
    preview/<stem>.png       overlays for a person to judge (``--preview N``)
"""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from tqdm import tqdm

from cellseg.atomic import staged_dir
from cellseg.classes import CLASS_NAMES
from cellseg.data import coco
from cellseg.data.arrays import load_sample, save_arrays
from cellseg.data.manifest import SPLITS, write_manifest
from cellseg.data.pseudomask import MaskCounts, MaskParams, instances_from_boxes
from cellseg.data.source import voc_md5
from cellseg.data.voc import CleanupCounts, clean_boxes, parse_voc
from cellseg.errors import DataError
from cellseg.overlay import draw_overlay
from cellseg.runtime import cpu_budget


@dataclass
class ImageResult:
    stem: str
    split: str
    width: int = 0
    height: int = 0
    annotations: list[dict] = field(default_factory=list)
    cleanup: CleanupCounts = field(default_factory=CleanupCounts)
    masks: MaskCounts = field(default_factory=MaskCounts)
    void_pixels: int = 0
    void_regions: int = 0
    error: str | None = None


def read_splits(source: Path) -> dict[str, list[str]]:
    """Image stems per split from ``ImageSets/Main``; a stem in two splits is an error."""
    splits, seen = {}, {}
    for split in SPLITS:
        path = source / "ImageSets" / "Main" / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: split file missing")
        stems = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for stem in stems:
            if stem in seen:
                raise DataError(f"{path}: {stem} is also in the {seen[stem]} split")
            seen[stem] = split
        splits[split] = stems
    return splits


def load_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: image missing")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise DataError(f"{path}: not a readable image ({err})") from None


def convert_image(
    source: Path, stem: str, split: str, work: Path, params: MaskParams
) -> ImageResult:
    """Convert one image; writes its target arrays and JPEG into ``work``. Never raises."""
    result = ImageResult(stem=stem, split=split)
    try:
        xml_path = source / "Annotations" / f"{stem}.xml"
        ann = parse_voc(xml_path)
        jpg_path = source / "JPEGImages" / f"{stem}.jpg"
        image = load_rgb(jpg_path)
        if image.shape[:2] != (ann.height, ann.width):
            raise DataError(
                f"{jpg_path}: image is {image.shape[1]}x{image.shape[0]}, "
                f"{xml_path.name} says {ann.width}x{ann.height}"
            )
        boxes = clean_boxes(
            ann.boxes,
            ann.width,
            ann.height,
            params.min_box_side,
            params.duplicate_iou,
            result.cleanup,
        )
        instance, classes, void, kept = instances_from_boxes(image, boxes, params, result.masks)
    except DataError as err:
        result.error = str(err)
        return result
    save_arrays(
        work / "targets" / f"{stem}.npz",
        {"instance": instance, "classes": classes, "ignore": void},
    )
    shutil.copyfile(jpg_path, work / "images" / f"{stem}.jpg")
    result.width, result.height = ann.width, ann.height
    result.annotations = coco.box_annotations(instance, kept)
    result.void_pixels = int(void.sum())
    result.void_regions = int(ndi.label(void)[1])
    return result


def _convert_star(job: tuple) -> ImageResult:
    return convert_image(*job)


def write_preview(work: Path, stem: str) -> None:
    s = load_sample(work, stem)
    overlay = draw_overlay(s["image"], s["instance"], s["classes"], s["ignore"])
    Image.fromarray(overlay).save(work / "preview" / f"{stem}.png", optimize=True)


def split_counts(results: list[ImageResult], split: str) -> dict:
    mine = [r for r in results if r.split == split and r.error is None]
    per_class = {name: 0 for name in CLASS_NAMES}
    for r in mine:
        for a in r.annotations:
            per_class[CLASS_NAMES[a["category_id"] - 1]] += 1
    return {
        "images": len(mine),
        "files": [r.stem for r in mine],
        "instances": per_class,
        "void_pixels": sum(r.void_pixels for r in mine),
        "void_regions": sum(r.void_regions for r in mine),
    }


def _sum_counts(results: list[ImageResult], attr: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in results:
        for key, value in asdict(getattr(r, attr)).items():
            total[key] = total.get(key, 0) + value
    return total


def convert_dataset(
    source: Path,
    out: Path,
    preview: int = 0,
    skip_bad: bool = False,
    params: MaskParams | None = None,
    workers: int | None = None,
) -> dict:
    """Convert a VOC folder into the dataset directory ``out``; returns the manifest.

    Raises:
        DataError: listing every bad file, one line each, with nothing written; unless
            ``skip_bad`` (then they are skipped, listed on stderr and in the manifest).
    """
    params = params or MaskParams()
    source, out = Path(source), Path(out)
    if not (source / "Annotations").is_dir():
        raise DataError(f"{source}: no Annotations/ folder (not a VOC dataset)")
    splits = read_splits(source)
    jobs_meta = [(stem, split) for split in SPLITS for stem in splits[split]]

    with staged_dir(out) as work:
        for sub in ("images", "targets", "coco", "preview"):
            (work / sub).mkdir()
        jobs = [(source, stem, split, work, params) for stem, split in jobs_meta]
        workers = workers or min(cpu_budget(), 8)
        with ProcessPoolExecutor(workers) as pool:
            results = list(
                tqdm(
                    pool.map(_convert_star, jobs, chunksize=4),
                    total=len(jobs),
                    desc="convert",
                    unit="img",
                    file=sys.stderr,
                )
            )
        bad = [r for r in results if r.error]
        if bad and not skip_bad:
            lines = [r.error for r in bad]
            if len(bad) > 1:
                lines.append(
                    f"{len(bad)} bad files; nothing written (--skip-bad converts the rest)"
                )
            raise DataError("\n".join(lines))
        for r in bad:
            print(f"skipped: {r.error}", file=sys.stderr)
        manifest = write_outputs(work, source, results, params, preview)
    return manifest


def write_outputs(
    work: Path, source: Path, results: list[ImageResult], params: MaskParams, preview: int
) -> dict:
    good = [r for r in results if r.error is None]
    image_ids = {r.stem: i + 1 for i, r in enumerate(sorted(good, key=lambda r: r.stem))}
    for split in SPLITS:
        images, anns = [], []
        for r in good:
            if r.split != split:
                continue
            images.append(
                {
                    "id": image_ids[r.stem],
                    "file_name": f"{r.stem}.jpg",
                    "width": r.width,
                    "height": r.height,
                }
            )
            anns += [{"image_id": image_ids[r.stem], **a} for a in r.annotations]
        (work / "coco" / f"{split}.json").write_text(json.dumps(coco.ground_truth(images, anns)))

    for r in good[:preview]:
        write_preview(work, r.stem)
    manifest = {
        "package_version": version("cellseg-kfp"),
        "source": {"path": str(source), "dvc_md5": voc_md5(source)},
        "params": asdict(params),
        "splits": {split: split_counts(results, split) for split in SPLITS},
        "cleanup": _sum_counts(good, "cleanup"),
        "masks": _sum_counts(good, "masks"),
        "skipped": [{"file": r.stem, "error": r.error} for r in results if r.error],
    }
    return write_manifest(work, manifest)
