"""The one list of API calls (``cellseg.cluster.api_calls``) against what really happens: a
launcher run through its whole life, recorded on the wire as the pipeline's account, makes
exactly the calls of the list; the base RBAC grants each of them; ``cellseg doctor`` fails a Role
that lacks one (``patch``, which only adoption uses)."""

from __future__ import annotations

import io
from urllib.parse import urlparse

import pytest
import yaml

from cellseg.cluster.api_calls import STEP_CALLS, ApiCall, launcher_calls
from cellseg.cluster.doctor import DoctorOptions, allowed, as_user, check_rbac
from cellseg.cluster.jobs import ENGINES, build_job
from cellseg.cluster.launch import JobRunner
from tests.cluster.conftest import NAMESPACE, PIPELINE_SA, REPO
from tests.cluster.kubelet import Kubelet, kubelet_on_node
from tests.cluster.test_launcher import Operator, finish, launch_in_thread, spec
from tests.cluster.test_live_logs import lines, wait_until

pytestmark = pytest.mark.cluster
NODE = "gpu-node-calls"


@pytest.fixture(scope="module")
def kubelet(installed, tmp_path_factory):
    with kubelet_on_node(installed, tmp_path_factory.mktemp("kubelet-calls"), NODE) as fake:
        yield fake


def as_call(method: str, url: str, query: list) -> ApiCall | None:
    """The authorisation check a request meets (None: discovery, which every user may read)."""
    parts = urlparse(url).path.strip("/").split("/")
    if parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    else:
        group, version, rest = parts[1], parts[2], parts[3:]
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    if not rest:
        return None
    resource, name, sub = rest[0], rest[1] if len(rest) > 1 else "", "/".join(rest[2:])
    watching = any(k == "watch" and str(v).lower() == "true" for k, v in query or [])
    verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(method)
    if verb is None:
        verb = "get" if name else "watch" if watching else "list"
    return ApiCall(verb, resource, group, version, sub)


def recording(api_client, calls: set):
    """``api_client`` with every request it sends added to ``calls`` as an :class:`ApiCall`."""
    rest = api_client.rest_client
    send = rest.request

    def request(method, url, query_params=None, *args, **kwargs):
        call = as_call(method, url, query_params)
        if call is not None:
            calls.add(call)
        return send(method, url, query_params, *args, **kwargs)

    rest.request = request
    return api_client


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_a_launcher_run_makes_exactly_the_listed_calls(installed, kubelet, engine):
    """Submit, follow rank 0's log, read the pods' events and the run's Workflow, succeed; a
    retry adopts the job (patch), asks Kueue why it was suspended, and deletes it."""
    from kubernetes import client

    e, name = ENGINES[engine], f"calls-{engine}"
    workflow = {"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow",
                "metadata": {"name": f"run-{name}"}, "spec": {"entrypoint": "main"}}  # fmt: skip
    client.CustomObjectsApi(installed.client("admin")).create_namespaced_custom_object(
        "argoproj.io", "v1alpha1", NAMESPACE, "workflows", workflow
    )
    pod = f"{name}-rank0"
    kubelet.scripts[(pod, e.container)] = [[(lines(0, "rank 0: step 1"), 30)]]
    calls: set[ApiCall] = set()
    api = recording(installed.client(PIPELINE_SA), calls)
    runner = JobRunner(e, api, poll_seconds=1, out=io.StringIO(), delete_timeout=20,
                       workflow=f"run-{name}")  # fmt: skip
    thread, outcome = launch_in_thread(runner, build_job(spec(name, engine=engine)), timeout=60)
    operator = Operator(installed, engine)
    operator.wait_for(name)
    Kubelet(installed).pod(pod, {e.pod_label: name}, e.container, node=NODE)
    operator.condition(name, "Running")
    wait_until(lambda: "rank 0: step 1" in runner.out.getvalue())
    operator.condition(name, e.succeeded)
    assert finish(thread, outcome).get("result") == "succeeded", outcome
    retry = build_job(spec(name, engine=engine, owner_pod=("step-retry", "uid-retry")))
    adopted = runner.submit(retry)
    assert adopted["metadata"]["ownerReferences"][0]["name"] == "step-retry"
    runner.eviction(adopted)
    runner.delete(name, NAMESPACE)
    listed = set(launcher_calls(engine))
    assert calls - listed == set()  # nothing the doctor does not check
    assert listed - calls == set()  # and nothing listed that the launcher never does


def test_the_base_rbac_grants_every_listed_call_in_its_namespace_only(installed):
    api = as_user(installed.client("admin"), PIPELINE_SA)
    for engine in ENGINES:
        for call in (*launcher_calls(engine), *STEP_CALLS):
            assert allowed(api, NAMESPACE, call), call.show()
            assert not allowed(api, "default", call), call.show()


def test_the_doctor_fails_a_role_without_patch(installed):
    """A Role as manifests/base/rbac.yaml's, less ``patch``: the launcher's adoption would get a
    403 on a real cluster, and the doctor says so before any run."""
    namespace = "doctor-nopatch"
    installed.kubectl("create", "namespace", namespace)
    objects = [o for o in yaml.safe_load_all((REPO / "manifests/base/rbac.yaml").read_text()) if o]
    for obj in objects:
        obj["metadata"]["namespace"] = namespace
        for rule in obj.get("rules", []):
            rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
    path = installed.root / "rbac-nopatch.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    installed.kubectl("apply", "-f", str(path))
    for engine in ENGINES:
        results = check_rbac(installed.client("admin"), DoctorOptions(namespace=namespace,
                                                                       engine=engine))  # fmt: skip
        launcher = next(r for r in results if "what the launcher does" in r.requirement)
        assert not launcher.ok and launcher.blocker
        plural, group = ENGINES[engine].plural, ENGINES[engine].group
        assert launcher.detail == f"denied: patch {plural}.{group}"
