"""The evaluation report a person reads: Markdown tables, PNG figures, and one self-contained
HTML page (figures and overlays embedded) for the KFP run page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.data.arrays import load_sample
from cellseg.overlay import draw_overlay

KEYS = ("pq", "sq", "rq", "f1", "precision", "recall")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(metrics: dict) -> str:
    va = metrics["void_aware"]
    lines = [
        f"# Evaluation: {metrics['split']} split ({metrics['images']} images)",
        "",
        f"Model: `{metrics['model']}`",
        "",
        "## Overall",
        "",
        _row(["metric", "strict", "void-aware"]),
        _row(["---"] * 3),
    ]
    for key in ("box_map50", "mask_map50", "mask_map", *KEYS, "bpq", "mpq"):
        lines.append(_row([key, _fmt(metrics[key]), _fmt(va.get(key, "")) if key in va else "="]))
    lines += [_row(["aji", _fmt(metrics["aji"]), "="]), "", "## Per class (strict)", ""]
    cols = ["box_ap50", "mask_ap50", "pq", "sq", "rq", "f1", "iou", "dice"]
    lines += [_row(["class", *cols]), _row(["---"] * (len(cols) + 1))]
    for name in CLASS_NAMES:
        pc = metrics["per_class"][name]
        lines.append(_row([name, *(_fmt(pc[c]) for c in cols)]))
    lines += ["", "## Per class (void-aware)", ""]
    cols = ["box_ap50", "pq", "f1", "iou", "dice"]
    lines += [_row(["class", *cols]), _row(["---"] * (len(cols) + 1))]
    for name in CLASS_NAMES:
        pc = va["per_class"][name]
        lines.append(_row([name, *(_fmt(pc[c]) for c in cols)]))
    lines += [
        "",
        "Box mAP@0.5 is measured against the original BCCD boxes (the detection literature's",
        "figure: CST-YOLO 0.927, YOLOv5x 0.923). Void-aware figures do not count predictions",
        "on unannotated cells as false positives.",
        "",
        "![confusion matrix](confusion.png)",
        "",
        "![PR curves](pr_curves.png)",
        "",
    ]
    return "\n".join(lines)


def plot_confusion(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = metrics["confusion"]
    counts = np.array(conf["counts"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(4), conf["cols"])
    ax.set_yticks(range(4), conf["rows"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for (i, j), v in np.ndenumerate(counts):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_title("Instances matched at IoU > 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pr_curves(pr50: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, precision in pr50.items():
        p = np.array(precision)
        ax.plot(recall[p > -1], p[p > -1], label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Box PR curves at IoU 0.5")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


BACKGROUND = "background"


def square_confusion(metrics: dict) -> tuple[list[str], list[list[int]]]:
    """The confusion matrix with one label set for rows and columns (what KFP's
    ``ClassificationMetrics`` takes): an unmatched prediction is true *background*, a missed
    instance is predicted *background*."""
    counts = [list(map(int, row)) for row in metrics["confusion"]["counts"]]
    counts[-1][-1] = 0  # background predicted as background is not counted
    return [*CLASS_NAMES, BACKGROUND], counts


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">' \
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"  # fmt: skip


def html_report(work: Path, metrics: dict) -> str:
    """One page, nothing to fetch: headline figures, confusion matrix, PR curves and the best
    and worst overlays as data URIs (KFP's HTML viewer shows a single file)."""
    va = metrics["void_aware"]
    rows = "".join(
        f"<tr><td>{k}</td><td>{metrics[k]:.3f}</td><td>{va[k]:.3f}</td></tr>"
        for k in ("box_map50", "mask_map50", "pq", "f1")
    )
    per_class = "".join(
        f"<tr><td>{c}</td><td>{metrics['per_class'][c]['box_ap50']:.3f}</td>"
        f"<td>{metrics['per_class'][c]['pq']:.3f}</td></tr>"
        for c in CLASS_NAMES
    )
    overlays = sorted((work / "overlays").glob("*.png"))
    title = f"Evaluation: {metrics['split']} split ({metrics['images']} images)"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px ",
        "solid #ccc;padding:2px 8px}img{max-width:480px}figure{display:inline-block}</style>",
        f"</head><body><h1>{html.escape(title)}</h1><p>Model: <code>",
        f"{html.escape(str(metrics['model']))}</code></p>",
        "<table><tr><th>metric</th><th>strict</th><th>void-aware</th></tr>",
        f"{rows}</table><h2>Per class (strict)</h2><table><tr><th>class</th><th>box AP50",
        f"</th><th>PQ</th></tr>{per_class}</table><h2>Figures</h2>",
        _img(work / "confusion.png", "confusion matrix"),
        _img(work / "pr_curves.png", "box PR curves"),
        "<h2>Best and worst test images</h2>",
        *(_img(p, p.stem) for p in overlays),
        "</body></html>",
    ]
    return "".join(parts)


def write_report(
    work: Path, metrics: dict, pr50: dict, data: Path, per_image: list, n: int
) -> None:
    """report.md, confusion.png, pr_curves.png, overlays of the best and worst images, and
    report.html holding all of them."""
    (work / "report.md").write_text(markdown(metrics))
    plot_confusion(metrics, work / "confusion.png")
    plot_pr_curves(pr50, work / "pr_curves.png")
    ranked = sorted(per_image, key=lambda r: (r[0], r[1]))
    chosen = [("worst", r) for r in ranked[:n]] + [("best", r) for r in ranked[::-1][:n]]
    for tag, (pq, stem, inst) in chosen:
        image = load_sample(data, stem)["image"]
        overlay = draw_overlay(image, inst.labels, inst.class_map())
        Image.fromarray(overlay).save(work / "overlays" / f"{tag}_{stem}_pq{pq:.2f}.png")
    (work / "report.html").write_text(html_report(work, metrics))
