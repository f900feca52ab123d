"""``make compile``: write pipelines/cellseg_pipeline.yaml (committed; a test keeps it fresh)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from components import IMAGE
from pipelines.cellseg_pipeline import cellseg_pipeline

DEFAULT_OUTPUT = Path(__file__).with_name("cellseg_pipeline.yaml")


def set_image(image: str) -> None:
    """Point every component of the pipeline at ``image`` (default: the committed one)."""
    import components.convert.component as c1
    import components.evaluate.component as c4
    import components.promote.component as c6
    import components.register.component as c5
    import components.train_phase1.component as c2
    import components.train_phase2.component as c3

    for module, name in [
        (c1, "convert"),
        (c2, "train_phase1"),
        (c3, "train_phase2"),
        (c4, "evaluate"),
        (c5, "register"),
        (c6, "promote"),
    ]:
        getattr(module, name).component_spec.implementation.container.image = image


def compile_pipeline(output: Path = DEFAULT_OUTPUT, image: str = IMAGE) -> Path:
    set_image(image)
    try:
        compiler.Compiler().compile(cellseg_pipeline, str(output))
    finally:
        set_image(IMAGE)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--image", default=IMAGE, help="the project image for every step")
    args = parser.parse_args(argv)
    print(f"compiled -> {compile_pipeline(args.output, args.image)}")


if __name__ == "__main__":
    main()
