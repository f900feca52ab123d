"""Every pod template inside a manifest, wherever its kind nests it (Deployment, PyTorchJob
replicas, a TrainingRuntime's JobSet, a TrainJob's runtime patch), and what each must carry."""

from __future__ import annotations

ISTIO_INJECT = "sidecar.istio.io/inject"


def pod_templates(node, where: str = ""):
    """(path, template) for each ``template`` whose spec is a pod's (not a Job's or JobSet's)."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{where}.{key}"
            spec = value.get("spec") if isinstance(value, dict) else None
            is_pod = isinstance(spec, dict) and not {"template", "replicatedJobs"} & set(spec)
            if key == "template" and is_pod:
                yield path, value
            else:
                yield from pod_templates(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_templates(value, f"{where}[{i}]")


def mesh_and_seccomp_problems(obj: dict) -> list[str]:
    """Pod templates of ``obj`` that Istio would inject or Pod Security "restricted" refuses
    for want of a seccomp profile."""
    problems = []
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    for path, template in pod_templates(obj):
        labels = (template.get("metadata") or {}).get("labels") or {}
        if labels.get(ISTIO_INJECT) != "false":
            problems.append(f"{name}{path}: no {ISTIO_INJECT}: 'false' label")
        seccomp = (template["spec"].get("securityContext") or {}).get("seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            problems.append(f"{name}{path}: no seccompProfile RuntimeDefault")
    return problems
