"""The manifests against a real API server: CRDs install, every overlay is accepted (server-side
dry run, then for real), and RBAC grants what docs/training-jobs.md says and nothing more."""

import pytest
import yaml

from tests.cluster.conftest import NAMESPACE, PIPELINE_SA, REPO, TRAIN_SA

pytestmark = pytest.mark.cluster
OVERLAYS = sorted(p.name for p in (REPO / "manifests" / "overlays").iterdir())


def test_the_training_crds_are_served(installed):
    resources = installed.kubectl("api-resources", "-o", "name").stdout.split()
    served = {
        "pytorchjobs.kubeflow.org",
        "trainjobs.trainer.kubeflow.org",
        "trainingruntimes.trainer.kubeflow.org",
        "localqueues.kueue.x-k8s.io",
        "clusterqueues.kueue.x-k8s.io",
        "profiles.kubeflow.org",
        "authorizationpolicies.security.istio.io",
    }
    assert served <= set(resources)


def in_namespace(objects: list[dict], namespace: str) -> list[dict]:
    """The overlay's objects moved to ``namespace``: overlays are alternatives (a claim's storage
    class cannot change once created), so each is applied where no other one was."""
    for obj in objects:
        if obj["kind"] in ("Namespace", "Profile"):  # a Profile is named after its namespace
            obj["metadata"]["name"] = namespace
        elif "namespace" in obj["metadata"]:
            obj["metadata"]["namespace"] = namespace
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
    return objects


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_is_accepted_by_the_server_then_applied(installed, overlay, tmp_path):
    rendered = installed.kubectl("kustomize", str(REPO / "manifests" / "overlays" / overlay))
    namespace = f"overlay-{overlay}"
    objects = in_namespace([o for o in yaml.safe_load_all(rendered.stdout) if o], namespace)
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    # a server-side dry run needs the namespace to exist, as on a fresh cluster (for a Profile,
    # the profile controller makes it; there is none here)
    installed.kubectl("create", "namespace", namespace)
    dry = installed.kubectl("apply", "--dry-run=server", "-f", str(path))
    assert dry.stdout.count("(server dry run)") == len(objects)
    installed.kubectl("apply", "-f", str(path))
    first_job = "jsonpath={.spec.template.spec.replicatedJobs[0].name}"
    runtime = installed.kubectl(
        "get", "trainingruntime", "cellseg-torch", "-n", namespace, "-o", first_job
    )
    assert runtime.stdout == "node"  # the TrainJob's runtimePatches address this job by name


def can_i(server, user: str, verb: str, resource: str, namespace: str) -> bool:
    result = server.kubectl("auth", "can-i", verb, resource, "-n", namespace, f"--as={user}",
                            check=False)  # fmt: skip
    return result.stdout.strip() == "yes"


JOB_KINDS = ("trainjobs.trainer.kubeflow.org", "pytorchjobs.kubeflow.org")


@pytest.mark.parametrize("resource", JOB_KINDS)
def test_the_pipeline_account_manages_training_jobs_in_its_namespace_only(installed, resource):
    for verb in ("create", "get", "list", "watch", "delete"):
        assert can_i(installed, PIPELINE_SA, verb, resource, NAMESPACE), verb
        assert not can_i(installed, PIPELINE_SA, verb, resource, "default"), verb
    assert not can_i(installed, PIPELINE_SA, "update", resource, NAMESPACE)  # no more than asked
    assert can_i(installed, PIPELINE_SA, "get", "pods/log", NAMESPACE)
    assert not can_i(installed, PIPELINE_SA, "create", "pods", NAMESPACE)


@pytest.mark.parametrize("resource", JOB_KINDS)
def test_the_training_pods_account_cannot_create_jobs(installed, resource):
    for verb in ("create", "get", "delete"):
        assert not can_i(installed, TRAIN_SA, verb, resource, NAMESPACE), verb
    assert not can_i(installed, TRAIN_SA, "get", "secrets", NAMESPACE)


def test_the_local_queue_is_kueue_v1beta2_and_accepted_by_kueue_0_19(installed):
    """The kueue overlay's LocalQueue at the version Kueue 0.16+ stores (v1beta1 is deprecated),
    read back from the server through v1beta2."""
    rendered = installed.kubectl("kustomize", str(REPO / "manifests" / "overlays" / "kueue"))
    (queue,) = [o for o in yaml.safe_load_all(rendered.stdout) if o and o["kind"] == "LocalQueue"]
    assert queue["apiVersion"] == "kueue.x-k8s.io/v1beta2"
    installed.kubectl("create", "namespace", "kueue-version")
    queue["metadata"]["namespace"] = "kueue-version"
    path = installed.root / "local-queue.yaml"
    path.write_text(yaml.safe_dump(queue))
    installed.kubectl("apply", "-f", str(path))
    name, jsonpath = queue["metadata"]["name"], "jsonpath={.spec.clusterQueue}"
    got = installed.kubectl(
        "get", "localqueues.v1beta2.kueue.x-k8s.io", name, "-n", "kueue-version", "-o", jsonpath
    )
    assert got.stdout == "gpu-cluster-queue"


def test_the_runs_account_may_do_what_kfp_does_in_a_step_and_no_more(installed):
    """cellseg-kfp-steps: Argo's task results, the kfp-launcher ConfigMap, one Secret by name.
    (A SelfSubjectAccessReview as the account: kubectl's can-i needs Argo's CRD installed.)"""
    from cellseg.cluster.api_calls import ApiCall
    from cellseg.cluster.doctor import allowed, as_user

    api = as_user(installed.client("admin"), PIPELINE_SA)

    def may(verb, group, resource, namespace=NAMESPACE, name=""):
        from kubernetes import client

        attributes = client.V1ResourceAttributes(
            namespace=namespace, group=group, resource=resource, verb=verb, name=name or None
        )
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
        answer = client.AuthorizationV1Api(api).create_self_subject_access_review(review)
        return answer.status.allowed

    assert allowed(api, NAMESPACE, ApiCall("create", "workflowtaskresults", "argoproj.io"))
    assert may("patch", "argoproj.io", "workflowtaskresults")
    assert not may("create", "argoproj.io", "workflowtaskresults", namespace="default")
    assert may("get", "", "configmaps", name="kfp-launcher")
    assert may("get", "", "secrets", name="mlpipeline-minio-artifact")
    assert not may("get", "", "secrets", name="cellseg-hf-token")
