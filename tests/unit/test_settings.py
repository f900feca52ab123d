"""One source per default: ``cellseg.settings`` (and, for post-processing, the checkpoint format's
``PostprocessParams``) hold every default; the pipeline, the train component, the job specs and
the CLI read them from there, under the same names."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

from cellseg import settings
from cellseg.cli import build_parser
from cellseg.model.postprocess_params import POSTPROCESS_KEYS, PostprocessParams
from cellseg.settings import TRAINING_JOB, TrainingJobSettings

REPO = Path(__file__).resolve().parents[2]
JOB_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingJobSettings))
# Where a default may be spelt: the settings module, the post-processing dataclass.
OWNERS = {REPO / "src/cellseg/settings.py", REPO / "src/cellseg/model/postprocess_params.py"}
SETTING_NAMES = {*JOB_FIELDS, *POSTPROCESS_KEYS, "tolerance", "promotion_tolerance", "engine"}
# Engine names, job sizes and API versions: one constant each, in the one module that owns it.
SPELT_ONCE = {
    "pytorchjob": "settings.py", "trainjob": "settings.py", "64Gi": "settings.py",
    "16Gi": "settings.py", "kueue.x-k8s.io": "api_calls.py", "v1beta2": "api_calls.py",
    "v1beta1": "rollout.py",  # KServe's InferenceService
}  # fmt: skip


def pipeline_defaults() -> dict:
    from pipelines.cellseg_pipeline import cellseg_pipeline

    signature = inspect.signature(cellseg_pipeline.pipeline_func)
    return {k: p.default for k, p in signature.parameters.items()}


def test_the_pipeline_signature_takes_the_training_job_defaults_under_their_names():
    defaults = pipeline_defaults()
    shared = [f for f in JOB_FIELDS if f in defaults]
    assert set(JOB_FIELDS) - set(shared) == {"queue_timeout_hours"}  # the CLI's alone
    for name in shared:
        expected = getattr(TRAINING_JOB, name)
        got = defaults[name]
        assert (list(got) if name == "tolerations" else got) == (
            list(expected) if name == "tolerations" else expected
        ), name
    assert defaults["promotion_tolerance"] == settings.PROMOTION_TOLERANCE
    assert defaults["profile"] == settings.CLUSTER_PROFILE


def test_the_train_component_passes_every_pipeline_job_parameter_by_the_same_name():
    from components.train.component import train

    inputs = set(train.component_spec.inputs)
    assert {f for f in JOB_FIELDS if f != "queue_timeout_hours"} <= inputs


def test_cellseg_launch_defaults_are_the_settings():
    args = build_parser().parse_args(["launch"])
    for name in JOB_FIELDS:
        if name in ("node_selector", "tolerations"):
            continue  # repeatable flags: empty means the settings' (cmd_launch)
        assert getattr(args, name) == getattr(TRAINING_JOB, name), name
    register = build_parser().parse_args(["register", "--model", "m", "--metrics", "x",
                                          "--data", "d"])  # fmt: skip
    assert register.tolerance == settings.PROMOTION_TOLERANCE


def test_the_training_config_extends_the_post_processing_defaults():
    from cellseg.training.config import TrainConfig

    config, params = TrainConfig(), PostprocessParams()
    assert all(getattr(config, k) == getattr(params, k) for k in POSTPROCESS_KEYS)
    assert TrainConfig().decoder_lr == 1e-4  # the notebook's Phase 2 decoder LR


def python_files() -> list[Path]:
    roots = [REPO / "src", REPO / "components", REPO / "pipelines"]
    return sorted(p for root in roots for p in root.rglob("*.py") if p not in OWNERS)


def literal(node: ast.AST | None) -> bool:
    """A value written out (a number, a string, or a container of them), not a reference."""
    if node is None:
        return False
    if isinstance(node, ast.Constant):  # None, False and "" say "none", not a default
        return node.value not in (None, "") and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return literal(node.operand)
    if isinstance(node, ast.Tuple | ast.List):
        return bool(node.elts) and all(literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return bool(node.values) and all(literal(v) for v in node.values)
    return False


def spelt_defaults(path: Path, root: Path = REPO) -> list[str]:
    """Defaults of settings-named parameters, fields and flags written as literals in ``path``,
    and constants that must be spelt once."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    where = lambda node: f"{path.relative_to(root)}:{node.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults,
                             strict=True))  # fmt: skip
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
            found += [f"{where(d)} {a.arg}" for a, d in pairs if a.arg in SETTING_NAMES
                      and literal(d)]  # fmt: skip
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id in SETTING_NAMES and literal(node.value):
                found.append(f"{where(node)} {node.target.id}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            name = flags[0].lstrip("-").replace("-", "_") if flags else ""
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if name in SETTING_NAMES and literal(default):
                found.append(f"{where(node)} --{name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and path.name != SPELT_ONCE.get(node.value, path.name)
        ):
            found.append(f"{where(node)} {node.value!r}")
    return found


def test_no_module_spells_a_default_that_settings_owns():
    assert [hit for path in python_files() for hit in spelt_defaults(path)] == []


def test_the_check_finds_a_spelt_default(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def run(train_timeout_hours: float = 72.0, engine='pytorchjob', np_threshold=0.5):\n"
        "    pass\n"
    )
    hits = spelt_defaults(planted, tmp_path)
    assert [h.split()[-1] for h in hits] == [
        "train_timeout_hours", "engine", "np_threshold", "'pytorchjob'",
    ]  # fmt: skip
