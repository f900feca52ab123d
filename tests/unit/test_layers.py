"""The library's layers, stated once and enforced: imports follow the data's way down.

A module may import from its own layer and the layers before it, never from a later one, and no
two modules may import each other, directly or around a circle. Imports inside functions count:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

# The order data flows in: raw VOC -> dataset -> model -> training -> evaluation -> serving ->
# registry; then the cluster machinery, the pipeline steps that use all of it, and the CLI.
LAYERS = (
    ("errors", "classes", "atomic", "settings", "runtime", "overlay"),  # base: no cellseg deps
    ("data",),
    ("model",),
    ("training",),
    ("evaluation",),
    ("serving",),
    ("registry",),
    ("cluster",),
    ("steps",),
    ("cli",),
)
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, src: Path, modules: set[str]) -> set[str]:
    """The project modules (of ``modules``) ``path`` imports, anywhere in it: ``from a import
    b`` counts as module ``a.b`` when there is one, else as ``a``."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found |= {resolve(f"{base}.{a.name}") for a in node.names}
    return found - {None, name, "cellseg"}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    files = {module_name(p, src): p for p in (src / "cellseg").rglob("*.py")}
    return {module: imports(path, src, set(files)) for module, path in files.items()}


def upward_imports(src: Path) -> list[str]:
    problems = []
    for module, targets in sorted(import_graph(src).items()):
        if module == "cellseg":
            continue
        mine = layer_of(module)
        if mine not in RANK:
            problems.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs and RANK.get(theirs, -1) > RANK[mine]:
                problems.append(f"{module} imports {target}: {theirs} comes after {mine}")
    return problems


def circles(src: Path) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = import_graph(src)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_goes_down_the_layers():
    assert upward_imports(SRC) == []


def test_no_import_circle():
    assert circles(SRC) == []


def test_a_planted_upward_import_and_a_planted_circle_are_caught(tmp_path):
    """The checks above can fail: a copy of src/ with a data module that imports the registry,
    and two evaluation modules that import each other."""
    src = tmp_path / "src"
    shutil.copytree(SRC, src, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "cellseg" / "data" / "planted.py").write_text(
        "def f():\n    from cellseg.registry import tracking\n"
    )
    (src / "cellseg" / "evaluation" / "ping.py").write_text("from cellseg.evaluation import pong\n")
    (src / "cellseg" / "evaluation" / "pong.py").write_text(
        "from cellseg.evaluation.ping import x\n"
    )
    assert upward_imports(src) == [
        "cellseg.data.planted imports cellseg.registry.tracking: registry comes after data"
    ]
    assert circles(src) == [["cellseg.evaluation.ping", "cellseg.evaluation.pong"]]
