"""The gate and what it shows, on hand-written numbers: decide, the Markdown decision, the
confusion matrix KFP takes, the self-contained HTML report."""

import numpy as np
from PIL import Image

from cellseg.classes import CLASS_NAMES
from cellseg.evaluation.report import html_report, square_confusion
from cellseg.registry.champion import ChampionScore
from cellseg.registry.gate import decide, decision_markdown, gate_tags, metric_tags


def tags(pq: float) -> dict[str, str]:
    return metric_tags(
        {"pq": pq, "box_map50": pq, "per_class": {c: {"pq": pq} for c in CLASS_NAMES}}
    )


def test_an_unloadable_champion_keeps_the_challenger_unless_forced():
    error = "champion v3 could not be loaded: OSError: gone"
    kept = decide(tags(0.9), None, 0.02, False, error)
    assert not kept.promote and kept.reasons == [f"{error}; only force_promote promotes"]
    forced = decide(tags(0.1), None, 0.02, True, error)
    assert forced.promote and forced.forced and error in forced.reasons


def test_gate_tags_hold_both_scores_both_versions_and_the_md5():
    baseline = ChampionScore(
        "4", {"pq": 0.3, "box_map50": 0.3, "per_class": {c: {"pq": 0.3} for c in CLASS_NAMES}}
    )
    out = gate_tags("7", tags(0.5), baseline, "abc.dir")
    assert out["gate.challenger_version"] == "7" and out["gate.champion_version"] == "4"
    assert (
        out["gate.challenger_test_pq"] == "0.500000" and out["gate.champion_test_pq"] == "0.300000"
    )
    assert out["gate.champion_test_pq_WBC"] == "0.300000" and out["gate.data_md5"] == "abc.dir"
    assert (
        gate_tags("1", tags(0.5), ChampionScore("2", None, "x"), "")["gate.champion_test_pq"]
        == "unloadable"
    )


def test_the_decision_markdown_puts_both_scores_side_by_side_with_the_reasons():
    result = {
        "version": "5", "promote": True, "forced": False, "data_md5": "abc.dir",
        "reasons": ["test PQ 0.5000 beats the champion's 0.4000"], "test_pq": 0.5,
        "champion_version": "4", "champion_test_pq": 0.4, "champion_error": "",
    }  # fmt: skip
    text = decision_markdown(result)
    assert "version 5 promoted to champion" in text
    assert "| version | v5 | v4 |" in text and "| 0.5000 | 0.4000 |" in text
    assert "- test PQ 0.5000 beats the champion's 0.4000" in text and "`abc.dir`" in text


def test_the_confusion_matrix_has_one_label_set_with_background_for_missed_and_extra():
    counts = [[5, 1, 0, 2], [0, 3, 0, 1], [0, 0, 2, 1], [4, 0, 1, 9]]
    labels, matrix = square_confusion({"confusion": {"counts": counts}})
    assert labels == [*CLASS_NAMES, "background"]
    assert matrix[0] == [5, 1, 0, 2]  # 2 RBC missed: predicted background
    assert matrix[3] == [4, 0, 1, 0]  # 4 extra RBC predictions: true background


def test_the_html_report_embeds_every_figure_and_overlay(tmp_path):
    (tmp_path / "overlays").mkdir()
    png = np.zeros((4, 4, 3), np.uint8)
    for name in (
        "confusion.png",
        "pr_curves.png",
        "overlays/best_a_pq0.90.png",
        "overlays/worst_b_pq0.10.png",
    ):
        Image.fromarray(png).save(tmp_path / name)
    per_class = {c: {"box_ap50": 0.5, "pq": 0.4} for c in CLASS_NAMES}
    figures = {"box_map50": 0.5, "mask_map50": 0.4, "pq": 0.3, "f1": 0.6}
    metrics = {"split": "test", "images": 2, "model": "m", **figures, "per_class": per_class,
               "void_aware": figures}  # fmt: skip
    html = html_report(tmp_path, metrics)
    assert html.count("data:image/png;base64,") == 4
    assert "best_a_pq0.90" in html and "worst_b_pq0.10" in html and 'src="confusion' not in html
