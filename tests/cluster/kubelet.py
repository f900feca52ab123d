"""What a kubelet, the scheduler and a training operator write about pods, for a test API server
that has none of them.

:class:`Kubelet` creates a job's pods (as the operator would), writes their status through the
status subresource (as the kubelet and the scheduler do) and records events. :class:`FakeKubelet`
is a node's kubelet endpoint, HTTPS on 127.0.0.1: the API server proxies ``pods/log`` to it
exactly as to a real kubelet (``/containerLogs/<ns>/<pod>/<container>``), and each connection
plays the next script of log chunks, so a test can end a stream (log rotation, a container
restart) and see what the client asks for on reconnect.
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from tests.cluster.conftest import NAMESPACE


def rfc3339(seconds_ago: float = 0.0) -> str:
    when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def log_stamp(seconds_ago: float = 0.0) -> str:
    """The kubelet's ``timestamps=true`` prefix (RFC 3339, nanoseconds)."""
    when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class Kubelet:
    def __init__(self, server, namespace: str = NAMESPACE):
        from kubernetes import client

        self.core = client.CoreV1Api(server.client("admin"))
        self.namespace = namespace

    def pod(self, name: str, labels: dict, container: str, node: str = "", image: str = "x:1"):
        body = {
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": container, "image": image}]},
        }
        if node:
            body["spec"]["nodeName"] = node
        return self.core.create_namespaced_pod(self.namespace, body)

    def status(self, name: str, **status) -> None:
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": status})

    def scheduled(self, name: str, seconds_ago: float = 0.0) -> dict:
        return {
            "type": "PodScheduled",
            "status": "True",
            "lastTransitionTime": rfc3339(seconds_ago),
        }

    def unschedulable(self, name: str, message: str) -> None:
        """What the scheduler writes for a pod no node can take: a condition and an event."""
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": message, "lastTransitionTime": rfc3339()}  # fmt: skip
        self.status(name, phase="Pending", conditions=[condition])
        self.event(name, "FailedScheduling", message, "default-scheduler")

    def container(self, name: str, container: str, image: str, scheduled_ago: float = 0.0,
                  phase: str = "Pending", **state) -> None:  # fmt: skip
        """A container's status as the kubelet reports it (``state``/``lastState``/...)."""
        status = {"name": container, "image": image, "imageID": "", "ready": False,
                  "restartCount": state.pop("restartCount", 0), **state}  # fmt: skip
        self.status(name, phase=phase, conditions=[self.scheduled(name, scheduled_ago)],
                    containerStatuses=[status])  # fmt: skip

    def event(self, pod: str, reason: str, message: str, component: str = "kubelet") -> None:
        now = rfc3339()
        self.core.create_namespaced_event(
            self.namespace,
            {
                "metadata": {"name": f"{pod}.{uuid.uuid4().hex[:12]}"},
                "involvedObject": {
                    "kind": "Pod",
                    "name": pod,
                    "namespace": self.namespace,
                    "apiVersion": "v1",
                },
                "reason": reason,
                "message": message,
                "type": "Warning",
                "source": {"component": component},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
        )

    def node(self, name: str, port: int) -> None:
        """A node whose kubelet listens on 127.0.0.1:``port``."""
        self.core.create_node({"metadata": {"name": name}})
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
        }
        self.core.patch_node_status(name, {"status": status})


class FakeKubelet:
    """Serves ``/containerLogs/...``: connection *i* to a container plays ``scripts[key][i]``, a
    list of ``(bytes, seconds to wait after)``, then ends the stream (the last script repeats).
    ``requests`` keeps each request's path and query."""

    def __init__(self, workdir: Path):
        self.scripts: dict[tuple[str, str], list[list[tuple[bytes, float]]]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.served: dict[tuple[str, str], int] = {}
        cert, key = workdir / "kubelet.crt", workdir / "kubelet.key"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def do_GET(self):
                url = urlparse(self.path)
                fake.requests.append((url.path, parse_qs(url.query)))
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                key = (parts[2], parts[3])
                scripts = fake.scripts.get(key)
                if not scripts:
                    self.send_error(404, "no such container")
                    return
                i = fake.served.get(key, 0)
                fake.served[key] = i + 1
                previous = parse_qs(url.query).get("previous") == ["true"]
                script = scripts[min(i, len(scripts) - 1)] if not previous else scripts[-1]
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                try:
                    for data, pause in script:
                        self.wfile.write(data)
                        self.wfile.flush()
                        time.sleep(pause)
                except OSError:
                    pass  # the client went away

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def kubelet_on_node(server, workdir: Path, node: str):
    """A :class:`FakeKubelet` registered as ``node``'s kubelet, closed on exit."""
    fake = FakeKubelet(workdir)
    Kubelet(server).node(node, fake.port)
    try:
        yield fake
    finally:
        fake.close()
