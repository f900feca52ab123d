"""The gate's decision as a person reads it: the KFP run page (Markdown) and the local summary."""

from __future__ import annotations


def _pq(value) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def verdict(result: dict) -> str:
    if result.get("forced"):
        return "promoted to champion (forced)"
    return "promoted to champion" if result["promote"] else "kept as challenger"


def side_by_side(result: dict) -> list[tuple[str, str, str]]:
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
    """The register step's result (see :func:`cellseg.ops.steps.register_step`) as Markdown."""
    lines = [
        f"# Promotion gate: version {result['version']} {verdict(result)}",
        "",
        f"Data md5: `{result.get('data_md5') or '-'}`. Both models scored on the same test split.",
        "",
        "| | challenger | champion |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {what} | {new} | {old} |" for what, new, old in side_by_side(result)]
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
