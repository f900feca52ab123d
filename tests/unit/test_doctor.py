"""`cellseg doctor`'s checks that need no API server: the KFP API's version and MLflow's
health, against a real HTTP server on 127.0.0.1 answering as KFP's /apis/v2beta1/healthz and
MLflow's /health do. The cluster checks run against a real API server: tests/cluster/."""

import http.server
import json
import threading

import pytest

from cellseg.cluster.doctor import DoctorOptions, check_kfp, check_mlflow, parse_version


@pytest.fixture
def server():
    answers = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status, body = answers.get(self.path, (404, ""))
            answers.setdefault("auth", self.headers.get("Authorization"))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}", answers
    httpd.shutdown()
    httpd.server_close()


def healthz(tag: str, multi_user: bool = True) -> tuple[int, str]:
    return 200, json.dumps({"commit_sha": "abc", "tag_name": tag, "multi_user": multi_user})


@pytest.mark.parametrize(
    ("tag", "ok"), [("2.4.1", False), ("2.5.0", True), ("v2.17.0", True), ("1.8.5", False)]
)
def test_the_kfp_backend_must_be_2_5_or_later(server, tag, ok):
    url, answers = server
    answers["/pipeline/apis/v2beta1/healthz"] = healthz(tag)
    result = check_kfp(DoctorOptions(kfp_host=f"{url}/pipeline", kfp_token="t0k"))
    assert result.ok is ok and result.blocker
    assert "multi-user" in result.detail
    assert answers["auth"] == "Bearer t0k"
    if not ok:
        assert "upgrade KFP to 2.5.0" in result.line()


def test_an_unknown_kfp_version_is_a_warning_and_no_kfp_host_no_check(server):
    url, answers = server
    answers["/apis/v2beta1/healthz"] = healthz("dev", multi_user=False)
    result = check_kfp(DoctorOptions(kfp_host=url))
    assert not result.ok and not result.blocker and result.line().startswith("WARN")
    assert check_kfp(DoctorOptions(kfp_host="")) is None
    assert parse_version("2.5.0-rc.1") == (2, 5, 0)


def test_mlflow_health_passes_on_ok_and_fails_with_the_status(server):
    url, answers = server
    answers["/health"] = (200, "OK")
    assert check_mlflow(None, DoctorOptions(mlflow_uri=url)).ok
    answers["/health"] = (503, "")
    result = check_mlflow(None, DoctorOptions(mlflow_uri=url))
    assert not result.ok and "HTTP 503" in result.detail and result.line().startswith("FAIL")
