"""``make compile``: write pipelines/cellseg_pipeline.yaml (committed; a test keeps it fresh)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import yaml
from kfp import compiler

from components import IMAGE
from pipelines.cellseg_pipeline import cellseg_pipeline

DEFAULT_OUTPUT = Path(__file__).with_name("cellseg_pipeline.yaml")


def set_image(spec_path: Path, image: str) -> None:
    """Point every step of a compiled pipeline, and its training jobs, at ``image``."""
    docs = list(yaml.safe_load_all(spec_path.read_text()))
    for executor in docs[0]["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    docs[0]["root"]["inputDefinitions"]["parameters"]["image"]["defaultValue"] = (
        image  # PyTorchJobs
    )
    spec_path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def _sorted_literal(value):
    if isinstance(value, dict):
        return {k: _sorted_literal(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_literal(v) for v in value]
    return value


def stable_header(text: str) -> str:
    """KFP writes dict defaults into the header comment in hash order, which changes from one
    process to the next; sort them so the committed YAML is reproducible."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        head, sep, rest = line.partition("[Default: ")
        if sep and rest.rstrip().endswith("]"):
            default = ast.literal_eval(rest.rstrip()[:-1])
            lines[i] = f"{head}{sep}{_sorted_literal(default)!r}]\n"
    return "".join(lines)


def compile_pipeline(output: Path = DEFAULT_OUTPUT, image: str = IMAGE) -> Path:
    compiler.Compiler().compile(cellseg_pipeline, str(output))
    output.write_text(stable_header(output.read_text()))
    if image != IMAGE:
        set_image(output, image)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--image", default=IMAGE, help="the project image for every step")
    args = parser.parse_args(argv)
    print(f"compiled -> {compile_pipeline(args.output, args.image)}")


if __name__ == "__main__":
    main()
