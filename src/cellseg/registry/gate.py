"""The promotion gate: the challenger against the champion, both scored on this run's test split.

The challenger becomes champion when it beats the champion's PQ and no class's PQ drops by more
than the tolerance (:data:`cellseg.settings.PROMOTION_TOLERANCE`); the first model becomes
champion; a champion that cannot be loaded keeps the challenger out unless promotion is forced
(recorded as forced). The decision, its reasons, both scores, both versions and the data md5
become version tags; :func:`decision_markdown` is the decision as a person reads it (the KFP run
page and the local summary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cellseg.classes import CLASS_NAMES
from cellseg.registry.champion import ChampionScore


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    forced: bool = False


def metric_tags(metrics: dict) -> dict[str, str]:
    """The figures the gate compares, as version tags (``test_pq``, ``test_pq_RBC``, ...)."""
    tags = {"test_pq": metrics["pq"], "test_box_map50": metrics["box_map50"]}
    tags.update({f"test_pq_{c}": metrics["per_class"][c]["pq"] for c in CLASS_NAMES})
    return {k: f"{float(v):.6f}" for k, v in tags.items()}


def decide(
    challenger: dict[str, str],
    champion: dict[str, str] | None,
    tolerance: float,
    force: bool,
    champion_error: str = "",
) -> Decision:
    """Compare two sets of metric tags (see :func:`metric_tags`) from the same test split.

    Args:
        champion: the champion's fresh tags; None when there is no champion (or it failed).
        champion_error: why the champion could not be scored; only ``force`` promotes then.
    """
    if force:
        return Decision(True, ["forced promotion", *([champion_error] if champion_error else [])],
                        forced=True)  # fmt: skip
    if champion_error:
        return Decision(False, [f"{champion_error}; only force_promote promotes"])
    if champion is None:
        return Decision(True, ["first model: no champion yet"])
    new, old = float(challenger["test_pq"]), float(champion["test_pq"])
    reasons = []
    if new <= old:
        reasons.append(f"test PQ {new:.4f} does not beat the champion's {old:.4f}")
    for c in CLASS_NAMES:
        drop = float(champion[f"test_pq_{c}"]) - float(challenger[f"test_pq_{c}"])
        if drop > tolerance:
            reasons.append(f"{c} PQ drops by {drop:.4f} (tolerance {tolerance:.4f})")
    if reasons:
        return Decision(False, reasons)
    return Decision(True, [f"test PQ {new:.4f} beats the champion's {old:.4f}"])


def gate_tags(version: str, tags: dict, champion: ChampionScore, data_md5: str) -> dict[str, str]:
    """What the gate compared, on the new version: both scores, both versions, the data md5."""
    scored = metric_tags(champion.metrics) if champion.metrics else {}
    out = {
        "gate.data_md5": data_md5,
        "gate.challenger_version": version,
        "gate.challenger_test_pq": tags["test_pq"],
        "gate.champion_version": champion.version,
        "gate.champion_test_pq": scored.get("test_pq", "unloadable" if champion.error else ""),
    }
    out.update({f"gate.champion_{k}": v for k, v in scored.items() if k != "test_pq"})
    return out


def _pq(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def verdict(result: dict) -> str:
    if result.get("forced"):
        return "promoted to champion (forced)"
    return "promoted to champion" if result["promote"] else "kept as challenger"


def decision_rows(result: dict) -> list[tuple[str, str, str]]:
    """Rows (what, challenger, champion) of a register step's result."""
    champion = f"v{result['champion_version']}" if result["champion_version"] else "none"
    champion_pq = _pq(result["champion_test_pq"])
    if result.get("champion_error"):
        champion_pq = "could not be loaded"
    return [
        ("version", f"v{result['version']}", champion),
        ("test PQ (this run's split)", _pq(result["test_pq"]), champion_pq),
    ]


def decision_markdown(result: dict) -> str:
    """The register step's result (see :func:`cellseg.steps.register.register_step`) as Markdown."""
    lines = [
        f"# Promotion gate: version {result['version']} {verdict(result)}",
        "",
        f"Data md5: `{result.get('data_md5') or '-'}`. Both models scored on the same test split.",
        "",
        "| | challenger | champion |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {what} | {new} | {old} |" for what, new, old in decision_rows(result)]
    lines += ["", "## Reasons", ""]
    lines += [f"- {reason}" for reason in result["reasons"]]
    if result.get("champion_error"):
        lines += ["", f"Champion: {result['champion_error']}"]
    lines += [
        "",
        "The promote step moves `champion` only if it still points to the compared version.",
        "",
    ]
    return "\n".join(lines)
