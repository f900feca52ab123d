"""``make images`` / ``make push``: build the project image with whichever engine the machine has
(docker, else podman, else buildah) and print the figures that matter for a GPU cluster.

A CA bundle for pip (a TLS-intercepting proxy) is handed to the build as the secret ``pip_ca``:
``CA_BUNDLE=...``, else ``PIP_CERT``, else none. It is mounted for the RUN steps that use pip
and never lands in a layer.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cellseg.errors import CellsegError

CONTAINER_TOOLS = ("docker", "podman", "buildah")
DOCKERFILE = Path("images/gpu.Dockerfile")
VENV_SITE = "/opt/venv/lib/python3.11/site-packages"
GPU_STACK = ("torch", "nvidia", "triton")  # what only the GPU steps need


def detect_engine(preferred: str | None = None) -> str:
    """``preferred`` if it is installed, else the first of docker (with a daemon), podman,
    buildah found."""
    for engine in [preferred] if preferred else CONTAINER_TOOLS:
        if engine not in CONTAINER_TOOLS:
            raise CellsegError(
                f"CONTAINER_ENGINE={engine}: expected one of {', '.join(CONTAINER_TOOLS)}"
            )
        if shutil.which(engine) and (engine != "docker" or docker_daemon_answers()):
            return engine
    wanted = preferred or " or ".join(CONTAINER_TOOLS)
    raise CellsegError(f"no container engine: install {wanted} (or set CONTAINER_ENGINE)")


def docker_daemon_answers() -> bool:
    """A docker CLI without a reachable daemon cannot build: try the next engine then."""
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ca_bundle() -> Path | None:
    path = os.environ.get("CA_BUNDLE") or os.environ.get("PIP_CERT")
    return Path(path) if path and Path(path).is_file() else None


def build_command(engine: str, tag: str, base: str | None, ca: Path | None) -> list[str]:
    cmd = {"docker": ["docker", "build"], "podman": ["podman", "build"]}.get(
        engine, ["buildah", "bud"]
    )
    if engine != "docker":
        cmd += ["--isolation", "chroot", "--layers"]  # no nested runtime needed; cache layers
    if ca is not None:
        cmd += ["--secret", f"id=pip_ca,src={ca}"]
    if base:
        cmd += ["--build-arg", f"BASE_IMAGE={base}"]
    return [*cmd, "-f", str(DOCKERFILE), "-t", tag, "."]


def inspector(engine: str) -> str:
    """The tool that reads images back: buildah's images are podman's too."""
    return "podman" if engine == "buildah" else engine


def inspect(engine: str, tag: str) -> dict:
    tool = inspector(engine)
    out = subprocess.run(
        [tool, "image", "inspect", tag], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)[0]


def context_files(root: Path, ignore_file: Path) -> list[Path]:
    """The files a build sends, per ``.dockerignore`` (patterns in order, ``!`` re-includes)."""
    rules = [
        line.strip()
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        rel = path.relative_to(root).as_posix()
        included = True
        for rule in rules:
            negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
            pattern = pattern.removeprefix("**/")
            hit = fnmatch.fnmatch(rel, pattern) or rel.startswith(f"{pattern}/")
            hit = hit or fnmatch.fnmatch(Path(rel).name, pattern) or pattern in rel.split("/")
            if hit:
                included = negate
        if included:
            kept.append(path)
    return kept


def gpu_stack_bytes(engine: str, tag: str) -> int | None:
    """Bytes of torch + CUDA libraries in the image: what a CPU-only image would not carry."""
    tool = inspector(engine)
    dirs = [f"{VENV_SITE}/{name}" for name in GPU_STACK]
    script = "du -sbc " + " ".join(f"{d}*" for d in dirs) + " 2>/dev/null | tail -1"
    result = subprocess.run([tool, "run", "--rm", "--entrypoint", "sh", tag, "-c", script],
                            capture_output=True, text=True)  # fmt: skip
    return int(result.stdout.split()[0]) if result.returncode == 0 and result.stdout else None


def figures(engine: str, tag: str, seconds: float | None = None) -> list[tuple[str, str]]:
    info = inspect(engine, tag)
    size = int(info.get("Size") or info.get("VirtualSize") or 0)
    context = context_files(Path("."), Path(".dockerignore"))
    env_names = [e.split("=", 1)[0] for e in info["Config"].get("Env") or []]
    secrets = [n for n in env_names if any(w in n for w in ("TOKEN", "SECRET", "PASSWORD", "KEY"))]
    context_mb = sum(p.stat().st_size for p in context) / 1e6
    rows = [
        ("image", tag),
        ("size", f"{size / 1e9:.2f} GB"),
        ("layers", str(len(info["RootFS"]["Layers"]))),
        ("build context", f"{len(context)} files, {context_mb:.1f} MB"),
        ("user", info["Config"].get("User") or "root"),
        ("secrets in the environment", ", ".join(secrets) or "none"),
    ]  # fmt: skip
    gpu = gpu_stack_bytes(engine, tag)
    if gpu is not None and size:
        rows.append(
            ("torch + CUDA libraries", f"{gpu / 1e9:.2f} GB ({gpu / size:.0%} of the image)")
        )
    if seconds is not None:
        rows.append(("build time", f"{seconds / 60:.1f} min"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "push", "figures"))
    parser.add_argument("--tag", required=True)
    parser.add_argument("--base", help="BASE_IMAGE build argument (default: the Dockerfile's)")
    parser.add_argument("--engine", help="docker | podman | buildah (default: detected)")
    args = parser.parse_args(argv)
    try:
        engine = detect_engine(args.engine or os.environ.get("CONTAINER_ENGINE") or None)
        if args.action == "push":
            return subprocess.run([engine, "push", args.tag]).returncode
        seconds = None
        if args.action == "build":
            cmd = build_command(engine, args.tag, args.base, ca_bundle())
            print("+ " + " ".join(cmd), flush=True)
            start = time.perf_counter()
            if subprocess.run(cmd).returncode != 0:
                raise CellsegError(f"{engine} could not build {args.tag} (see above)")
            seconds = time.perf_counter() - start
        rows = figures(engine, args.tag, seconds)
    except CellsegError as err:
        print(f"images: error: {err}", file=sys.stderr)
        return 2
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
