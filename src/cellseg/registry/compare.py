"""``cellseg compare``: the last pipeline runs side by side, the registry, a metric-history PNG."""

from __future__ import annotations

from pathlib import Path

from cellseg.classes import CLASS_NAMES
from cellseg.registry import tracking
from cellseg.registry.champion import champion_version
from cellseg.settings import REGISTERED_MODEL

KEY_METRICS = ("test_pq", "test_f1", "test_box_map50", "test_mask_map50")
DATA_MD5_TAG = "cellseg.data_md5"


def pipeline_runs(client, experiment_id: str, n: int) -> list[dict]:
    """The newest ``n`` pipeline runs: id, start, params of Phase 1/2, evaluation metrics."""
    parents = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` LIKE '%'",  # only pipeline parents
        order_by=["attributes.start_time DESC"],
        max_results=n,
    )
    rows = []
    for parent in parents:
        children = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        params, metrics = {}, {}
        # a scheduled run (data_md5 "") learns its revision in the data-version step: the
        # register step tags it on its own run
        md5s = [parent.data.tags.get(DATA_MD5_TAG)]
        md5s += [c.data.tags.get(DATA_MD5_TAG) for c in children]
        for child in children:
            step = child.data.tags.get(tracking.STEP_TAG, "")
            params.update({f"{step}.{k}": v for k, v in child.data.params.items()})
            metrics.update(child.data.metrics)
        rows.append(
            {
                "run": parent.data.tags[tracking.PARENT_TAG],
                "mlflow_run_id": parent.info.run_id,
                "start": parent.info.start_time,
                "params": params,
                "metrics": metrics,
                "data_md5": next((m for m in md5s if m), ""),
                "version": next(
                    (
                        c.data.tags["cellseg.model_version"]
                        for c in children
                        if "cellseg.model_version" in c.data.tags
                    ),
                    "",
                ),
            }
        )
    return rows


def differing_params(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]})
    return [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]


def table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))


def runs_table(rows: list[dict]) -> str:
    diff = differing_params(rows)
    header = ["pipeline run", "data md5", "version", *KEY_METRICS, *diff]
    body = [
        [r["run"], r.get("data_md5") or "-", r["version"] or "-"]
        + [_fmt(r["metrics"].get(m)) for m in KEY_METRICS]
        + [r["params"].get(k, "-") for k in diff]
        for r in rows
    ]
    return table(header, body)


def runs_side_by_side(a: dict, b: dict) -> str:
    header = ["metric", a["run"], b["run"]]
    names = [*KEY_METRICS]
    for c in CLASS_NAMES:
        names += [f"test_pq_{c}", f"test_f1_{c}", f"test_box_ap50_{c}"]
    body = [[m, _fmt(a["metrics"].get(m)), _fmt(b["metrics"].get(m))] for m in names]
    diff = differing_params([a, b])
    body += [[k, a["params"].get(k, "-"), b["params"].get(k, "-")] for k in diff]
    return table(header, body)


def version_aliases(client, name: str) -> dict[str, list[str]]:
    """Version -> its aliases, from the registered model (``search_model_versions`` leaves
    ``aliases`` empty on MLflow's SQL store)."""
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(client.get_registered_model(name).aliases.items()):
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def registry_table(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
        aliases = version_aliases(client, name)
    except MlflowException:
        return f"(no registered model {name!r})"
    body = [
        [
            v.version,
            ",".join(aliases.get(str(v.version), [])) or "-",
            v.tags.get("test_pq", "-"),
            _versus(v.tags),
            v.tags.get("promotion.decision", "-"),
            v.tags.get("gate.data_md5") or "-",
        ]
        for v in sorted(versions, key=lambda v: int(v.version), reverse=True)
    ]
    header = ["version", "aliases", "test_pq", "champion then (same split)", "decision", "data md5"]
    return table(header, body)


def _versus(tags: dict) -> str:
    """The champion the gate compared with, and its PQ on the same split: ``v1 0.412000``."""
    version = tags.get("gate.champion_version")
    if not version:
        return "-"
    return f"v{version} {tags.get('gate.champion_test_pq') or '-'}"


def plot_history(rows: list[dict], path: Path, champion: str = "") -> int | None:
    """Test metrics over the pipeline runs, oldest first; the run that registered the champion
    version is marked. Returns that run's position (1-based) in the plot, or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(rows, key=lambda r: r["start"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in KEY_METRICS:
        ax.plot(
            range(1, len(ordered) + 1),
            [r["metrics"].get(m, float("nan")) for r in ordered],
            "o-",
            label=m,
        )
    marked = next(
        (i for i, r in enumerate(ordered, 1) if champion and r["version"] == champion), None
    )
    if marked is not None:
        ax.axvline(marked, color="goldenrod", linewidth=6, alpha=0.35, label="champion")
        ax.annotate(f"champion v{champion}", (marked, 0.95), ha="center", fontsize=8)
    ax.set_xlabel("pipeline run (oldest to newest)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Test metrics over runs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return marked


def compare(
    n: int = 10, runs: list[str] | None = None, png: Path | None = None, uri: str | None = None
) -> str:
    """The comparison as text; the history plot goes to ``png``."""
    import mlflow

    experiment_id = tracking.configure(uri)
    client = mlflow.MlflowClient()
    rows = pipeline_runs(client, experiment_id, 10_000 if runs else n)
    if runs:
        chosen = []
        for wanted in runs:
            match = [r for r in rows if wanted in (r["run"], r["mlflow_run_id"])]
            if not match:
                raise ValueError(
                    f"no pipeline run {wanted!r} in experiment {tracking.EXPERIMENT!r}"
                )
            chosen.append(match[0])
        return runs_side_by_side(*chosen)
    if png is not None and rows:
        plot_history(rows, png, champion_version(client, REGISTERED_MODEL))
    return "\n\n".join(
        [
            f"Last {len(rows)} pipeline run(s):",
            runs_table(rows) if rows else "(none yet: make pipeline-run)",
            "Registry:",
            registry_table(client, REGISTERED_MODEL),
        ]
    )
