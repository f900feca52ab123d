"""The project image, built without Docker (podman/buildah here) and run: every pipeline step
runs inside it on a cluster, as uid 1000, with volumes mounted from outside.

The image is built once per content (Dockerfile, lock, and the sources the wheel holds) and
reused while they are unchanged. ``CELLSEG_BASE_IMAGE`` picks the base (``.ci/run`` builds the
local Debian stand-in with ``make base-image``: no registry is reachable here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from images.build import detect_engine, inspector
from tests.conftest import REPO

pytestmark = pytest.mark.container
WHEEL_SOURCES = ("pyproject.toml", "README.md", "requirements.lock", "images/gpu.Dockerfile")
WHEEL_TREES = ("src", "components", "pipelines")


def content_hash() -> str:
    digest = hashlib.sha256()
    files = [REPO / f for f in WHEEL_SOURCES]
    for tree in WHEEL_TREES:
        files += sorted(
            p for p in (REPO / tree).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="session")
def engine() -> str:
    try:
        return inspector(detect_engine(os.environ.get("CONTAINER_ENGINE") or None))
    except Exception as err:
        if os.environ.get("CI"):  # .ci/run installs podman: there these tests must run
            pytest.fail(str(err))
        pytest.skip(f"{err}; .ci/run installs podman with apt")


CACHE = Path.home() / ".cache" / "cellseg-tests"


def canary_bundle(tag: str) -> Path:
    """The build's pip CA bundle: the host's plus a CA made up for this image, which must end
    up in no file of it (``CACHE/<tag>.pem`` remembers it while the image is reused)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    canary = CACHE / f"{tag.rsplit(':', 1)[-1]}-canary.pem"
    key = CACHE / "canary.key"
    subject = f"/CN=cellseg-{canary.stem}"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(canary), "-subj", subject],
                   check=True, capture_output=True)  # fmt: skip
    host = Path(os.environ.get("CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt")
    bundle = CACHE / "build-bundle.pem"
    bundle.write_text((host.read_text() if host.is_file() else "") + canary.read_text())
    return bundle


@pytest.fixture(scope="session")
def image(engine) -> str:
    tag = f"localhost/cellseg-kfp:test-{content_hash()}"
    canary = CACHE / f"{tag.rsplit(':', 1)[-1]}-canary.pem"
    exists = subprocess.run([engine, "image", "inspect", tag], capture_output=True).returncode == 0
    if not (exists and canary.is_file()):
        cmd = [sys.executable, "-m", "images.build", "build", "--tag", tag]
        if os.environ.get("CELLSEG_BASE_IMAGE"):
            cmd += ["--base", os.environ["CELLSEG_BASE_IMAGE"]]
        env = {**os.environ, "CA_BUNDLE": str(canary_bundle(tag))}
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800,
                                env=env)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tag


def run(engine: str, image: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([engine, "run", "--rm", *args[:-1], image, *args[-1].split()],
                          capture_output=True, text=True, timeout=300, **kwargs)  # fmt: skip


def test_the_image_runs_cellseg_as_uid_1000(engine, image):
    result = run(engine, image, "cellseg --help")
    assert result.returncode == 0 and "convert" in result.stdout, result.stderr
    assert run(engine, image, "id -u").stdout.strip() == "1000"
    info = json.loads(subprocess.run([engine, "image", "inspect", image], capture_output=True,
                                     text=True, check=True).stdout)[0]  # fmt: skip
    assert info["Config"]["User"].split(":")[0] == "1000"


def five_image_voc(bccd: Path, root: Path) -> Path:
    """A VOC folder with 5 BCCD images: train 3, val 1, test 1."""
    stems = sorted(p.stem for p in (bccd / "Annotations").glob("*.xml"))[:5]
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for stem in stems:
        shutil.copy(bccd / "Annotations" / f"{stem}.xml", root / "Annotations")
        shutil.copy(bccd / "JPEGImages" / f"{stem}.jpg", root / "JPEGImages")
    for split, part in (("train", stems[:3]), ("val", stems[3:4]), ("test", stems[4:])):
        (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{s}\n" for s in part))
    return root


@pytest.mark.data
def test_convert_runs_in_the_image_read_only_on_mounted_folders(
    engine, image, bccd_source, tmp_path
):
    voc = five_image_voc(bccd_source, tmp_path / "voc")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # a volume the pod's fsGroup can write
    result = run(
        engine, image, "--read-only", "--tmpfs", "/tmp", "-v", f"{voc}:/data/voc:ro",
        "-v", f"{out}:/data/out", "cellseg convert --source /data/voc --out /data/out/dataset",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert {k: v["images"] for k, v in manifest["splits"].items()} == {
        "train": 3,
        "val": 1,
        "test": 1,
    }
    assert (out / "dataset" / "manifest.json").stat().st_uid == 1000  # written as the image's user


def test_the_build_ca_bundle_is_in_no_file_of_the_image(engine, image):
    """The build's CA bundle held a CA made up for it (see canary_bundle); pip used the bundle,
    and no layer may keep it."""
    canary = (CACHE / f"{image.rsplit(':', 1)[-1]}-canary.pem").read_text()
    probe = canary.splitlines()[3]  # one whole base64 line of it, as any PEM file holds it
    assert len(probe) == 64
    mount = subprocess.run(["podman", "image", "mount", image], capture_output=True, text=True)
    assert mount.returncode == 0, mount.stderr
    try:
        found = subprocess.run(["grep", "-rlF", probe, mount.stdout.strip()],
                               capture_output=True, text=True)  # fmt: skip
        assert found.returncode == 1 and not found.stdout, found.stdout  # 1: no match anywhere
    finally:
        subprocess.run(["podman", "image", "unmount", image], capture_output=True)


def test_a_step_that_fails_in_a_container_fails_its_pipeline(engine, image, tmp_path):
    """With podman, kfp 2.17 alone reports this step as a success (its container is auto-removed
    before kfp reads the exit code); cellseg's runner must not."""
    code = f"""
import sys
from kfp import dsl, local
from pipelines.local_containers import docker_api, docker_runner

@dsl.component(base_image={image!r}, install_kfp_package=False)
def fails():
    raise SystemExit(3)

@dsl.component(base_image={image!r}, install_kfp_package=False)
def succeeds() -> str:
    return "ok"

@dsl.pipeline
def passing():
    succeeds()

@dsl.pipeline
def failing():
    succeeds()
    fails()

with docker_api():
    local.init(runner=docker_runner({{}}), pipeline_root={str(tmp_path / "root")!r},
               raise_on_error=False)
    (failing if sys.argv[1] == "fail" else passing)()
"""
    root = tmp_path / "root"
    root.mkdir()
    root.chmod(0o777)
    script = tmp_path / "two.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ok = subprocess.run([sys.executable, str(script), "ok"], capture_output=True, text=True,
                        env=env, timeout=600)  # fmt: skip
    log = strip_ansi(ok.stdout + ok.stderr)
    assert "Pipeline 'passing' finished with status SUCCESS" in log, log[-2000:]
    bad = subprocess.run([sys.executable, str(script), "fail"], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    log = strip_ansi(bad.stdout + bad.stderr)
    assert "Task 'fails' finished with status FAILURE" in log, log[-2000:]
    assert "Pipeline 'failing' finished with status FAILURE" in log, log[-2000:]


def strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_the_pipeline_runs_with_every_step_in_the_image(image, tmp_path):
    """`make pipeline-run RUNNER=container` on a few synthetic images: every step in a container
    as uid 1000, the same summary as the subprocess runner."""
    from pipelines.local_containers import docker_api
    from pipelines.run_local import run_local, summary
    from tests.conftest import TINY, synthetic_samples, write_voc

    samples = synthetic_samples(8)
    stems = sorted(samples)
    voc = write_voc(
        tmp_path / "voc", samples, {"train": stems[:4], "val": stems[4:6], "test": stems[6:]}
    )
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    with docker_api():
        run_dir = run_local(voc, tmp_path / "kfp", "local", [*TINY, "epochs=1"], uri, image=image)
    text = summary(run_dir, uri)
    assert "Registry: cellseg version 1 promoted to champion" in text, text
    metrics = json.loads((run_dir / "evaluate" / "report_files" / "metrics.json").read_text())
    assert metrics["images"] == 2
    checkpoint = run_dir / "train-2" / "model" / "best_phase2.pt"
    assert checkpoint.stat().st_uid == 1000  # written inside the container, by the image's user
