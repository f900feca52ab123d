"""A real MLflow tracking server on 127.0.0.1 (proxied artifacts), on SQLite or on a real
PostgreSQL that the session starts and stops (Debian's ``postgresql``, run as a non-root user)."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

BACKENDS = ("sqlite", "postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian's server binaries (not on PATH there), else an ``initdb`` on PATH."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").is_file():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its commands as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields its SQLAlchemy URI, stops by PID."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: apt-get install postgresql")
        pytest.skip("PostgreSQL is not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the test extra's psycopg2-binary")
    root = Path(tempfile.mkdtemp(prefix="cellseg-pg-"))  # not under pytest's root-only tmp
    data, port = root / "data", free_port()
    run = as_postgres_user()
    if run:
        shutil.chown(root, "postgres")
    subprocess.run([*run, str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow",
                    "-A", "trust", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off"
    subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                    "-l", str(root / "server.log"), "-w", "start"], check=True,
                   capture_output=True)  # fmt: skip
    try:
        subprocess.run([*run, str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                        "-U", "mlflow", "mlflow"], check=True, capture_output=True)  # fmt: skip
        # psycopg2 named: SQLAlchemy 2.1 defaults to psycopg 3, which is not a dependency
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*run, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                        "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def start_mlflow_server(root: Path, backend_uri: str, *extra: str, env: dict | None = None):
    """``mlflow server`` on a free port; returns (process, uri) once /health answers."""
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_uri,
            "--artifacts-destination", str(root / "artifacts"), *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()) from None
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 120 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session", params=BACKENDS)
def mlflow_server(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"mlflow-{request.param}")
    if request.param == "postgresql":
        backend = request.getfixturevalue("postgres")
    else:
        backend = f"sqlite:///{root / 'mlflow.db'}"
    proc, uri = start_mlflow_server(root, backend)
    yield uri
    stop(proc)


@pytest.fixture(scope="session")
def sqlite_mlflow_server(tmp_path_factory):
    """SQLite only: for the pipeline tests, whose subject is not the store."""
    root = tmp_path_factory.mktemp("mlflow-sqlite-only")
    proc, uri = start_mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}")
    yield uri
    stop(proc)


def _use(uri: str, monkeypatch) -> str:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def mlflow_uri(mlflow_server, monkeypatch):
    """The server's URI as MLFLOW_TRACKING_URI (each store in turn)."""
    return _use(mlflow_server, monkeypatch)


@pytest.fixture
def sqlite_mlflow_uri(sqlite_mlflow_server, monkeypatch):
    return _use(sqlite_mlflow_server, monkeypatch)
