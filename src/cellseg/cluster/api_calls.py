"""Every Kubernetes API call the pipeline's account makes, in one list: the launcher's
(:mod:`cellseg.cluster.launch`), what KFP and Argo do in a step's pod, and the promote step's
rollout. ``cellseg doctor`` checks exactly these (a ``SelfSubjectAccessReview`` each), the RBAC
manifests' test grants them, and a test records the calls a launcher run makes against a real
API server and finds each one here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cellseg.cluster.jobs import ENGINES
from cellseg.serving import rollout

KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"  # served from Kueue v0.16
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # on each Workload: the uid of its job
# Kueue's manager configuration (namespace, ConfigMap, key), where integrations.frameworks is
KUEUE_CONFIG = ("kueue-system", "kueue-manager-config", "controller_manager_config.yaml")
ARGO_GROUP, ARGO_VERSION = "argoproj.io", "v1alpha1"  # the Workflow a KFP run is


@dataclass(frozen=True)
class ApiCall:
    """One authorisation check: ``verb`` on ``resource[/subresource]`` of ``group``."""

    verb: str
    resource: str
    group: str = ""  # "" = the core group
    version: str = "v1"
    subresource: str = ""

    def show(self) -> str:
        name = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{self.verb} {name}.{self.group}" if self.group else f"{self.verb} {name}"


def launcher_calls(engine_name: str) -> tuple[ApiCall, ...]:
    """What :func:`cellseg.cluster.launch.run_job` may call for a job of ``engine_name``."""
    e = ENGINES[engine_name]
    verbs = ("create", "get", "watch", "patch", "delete")  # patch: a retry adopts the job
    return (
        *(ApiCall(verb, e.plural, e.group, e.version) for verb in verbs),
        ApiCall("list", "pods"),  # the job's pods, read for failures only they show
        ApiCall("get", "pods", subresource="log"),  # rank 0's log, followed
        ApiCall("list", "events"),  # the kubelet's and the scheduler's word on stuck pods
        ApiCall("list", "workloads", KUEUE_GROUP, KUEUE_VERSION),  # admitted? why suspended?
        ApiCall("get", "workflows", ARGO_GROUP, ARGO_VERSION),  # is the run being terminated?
    )


# What Argo's executor and KFP's driver/launcher do in a step's pod (kfp-steps-rbac.yaml).
STEP_CALLS = (
    ApiCall("create", "workflowtaskresults", "argoproj.io", "v1alpha1"),
    ApiCall("patch", "workflowtaskresults", "argoproj.io", "v1alpha1"),
    ApiCall("get", "configmaps"),
)

# The promote step rolling a KServe InferenceService to the new champion: read its deployment
# mode, then patch. (KServe's inferenceservice-config, in KServe's namespace, is read too when
# the service has neither status nor annotation; without the right the mode stays unknown.)
ROLLOUT_CALLS = (
    ApiCall("get", rollout.PLURAL, rollout.GROUP, rollout.VERSION),
    ApiCall("patch", rollout.PLURAL, rollout.GROUP, rollout.VERSION),
)
