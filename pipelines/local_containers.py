"""``make pipeline-run RUNNER=container``: kfp.local's DockerRunner, on Docker or on podman.

kfp 2.17 starts each task container with ``auto_remove=True``. podman removes such a container
the moment it exits, so kfp's ``wait()`` gets 404 and reports exit code 0: a failing step passes.
(And a task shorter than about a second makes podman answer 500 "no such container", which kfp
does not catch.) :func:`run_container` replaces kfp's function: the container is kept until its
exit code is read, then removed. On Docker it behaves as kfp's own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """Run one task container to its end and return its real exit code."""
    import docker

    if ":" not in image.rsplit("/", 1)[-1]:
        image = f"{image}:latest"
    known = {ref for i in client.images.list() for ref in i.tags + i.attrs.get("RepoDigests", [])}
    if image not in known:
        print(f"Pulling image {image!r}", flush=True)
        client.images.pull(image)
    container = client.containers.run(
        image=image, command=command, volumes=volumes, detach=True, stdout=True, stderr=True,
        auto_remove=False, **run_args,
    )  # fmt: skip
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="", flush=True)
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


def docker_runner(binds: dict[Path, bool]):
    """A ``kfp.local.DockerRunner`` (with :func:`run_container`) that also bind-mounts each of
    ``binds`` (path -> read-only?) at the same path inside the task containers."""
    import docker
    from kfp import local
    from kfp.local import docker_task_handler

    docker_task_handler.run_docker_container = run_container
    mounts = [
        docker.types.Mount(target=str(p), source=str(p), type="bind", read_only=ro)
        for p, ro in binds.items()
    ]
    return local.DockerRunner(mounts=mounts)


def docker_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
        return True
    except Exception:  # no daemon, no socket, wrong DOCKER_HOST: all mean "not here"
        return False


@contextlib.contextmanager
def docker_api() -> Iterator[str]:
    """A Docker-compatible API for the docker client: the one ``DOCKER_HOST`` (or the default
    socket) names if it answers, else ``podman system service`` on a private socket, stopped by
    PID afterwards. Yields the API's address."""
    if docker_answers():
        yield os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        return
    if not shutil.which("podman"):
        from cellseg.errors import CellsegError

        raise CellsegError("RUNNER=container needs Docker or podman (apt-get install podman)")
    folder = tempfile.mkdtemp(prefix="cellseg-podman-")
    address = f"unix://{folder}/podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", address],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = address
    try:
        deadline = time.monotonic() + 30
        while not docker_answers():
            if service.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"podman system service did not answer on {address}")
            time.sleep(0.3)
        yield address
    finally:
        service.terminate()
        service.wait(timeout=30)
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        shutil.rmtree(folder, ignore_errors=True)
