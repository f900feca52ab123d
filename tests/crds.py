"""The upstream CRDs the tests validate against, pinned: ``make crds`` downloads them (with
checksums) into a cache, plus copies a Kubernetes 1.20 API server (the envtest one) accepts.

The cache has the layout of ``../shared/schemas``: ``<name>.yaml``, ``kueue/<name>.yaml`` and
``k8s-1.20/<name>.yaml``. Tests read it from ``CELLSEG_CRDS`` or ``~/.cache/cellseg/crds``.
A checksum is the sha256 of the file's documents as canonical JSON, so it pins what the API
server reads, not the file's layout (Istio's two CRDs are cut out of a file of all of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

K8S_120 = "k8s-1.20"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Workload CRD is 1.4 MB
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
GITHUB = "https://raw.githubusercontent.com"


@dataclass(frozen=True)
class Pin:
    """One CRD file: where it comes from and what it must hash to."""

    path: str  # in the cache
    url: str
    sha256: str  # of the upstream documents (kept ones), canonical JSON
    sha256_k8s_120: str  # of the loosened copy in k8s-1.20/
    keep: tuple[str, ...] = ()  # CRD names to keep from a file of many; () = all


def _trainer(name: str) -> str:
    return f"{GITHUB}/kubeflow/trainer/v2.3.0/manifests/base/crds/trainer.kubeflow.org_{name}.yaml"


def _kserve(name: str) -> str:
    return f"{GITHUB}/kserve/kserve/v0.20.0/config/crd/full/serving.kserve.io_{name}.yaml"


def _kueue(name: str) -> str:
    base = f"{GITHUB}/kubernetes-sigs/kueue/v0.19.2/config/components/crd/bases"
    return f"{base}/kueue.x-k8s.io_{name}.yaml"


# Sources as in ../shared/README.md (PyTorchJob: training-operator's release-1.9 branch).
PINS = (
    Pin(
        "kubeflow.org_pytorchjobs.yaml",
        f"{GITHUB}/kubeflow/training-operator/release-1.9/manifests/base/crds/"
        "kubeflow.org_pytorchjobs.yaml",
        "2e7e285a1eacbc894f81e02b6914aec424355d877162c13b350db0a39349f917",
        "79eb4a0ed09d2d61cb2e7ca21e8cf49d84a9afdbc643bead5895650d1d356130",
    ),
    Pin(
        "trainer.kubeflow.org_trainjobs.yaml",
        _trainer("trainjobs"),
        "000c105b2086c5b0fc31431547b72d9704750ef049d665d10765524e0bb1e5d8",
        "32382d6d532c50fa091122227508a040aa1346bae902f047651b95afdd7e06b4",
    ),
    Pin(
        "trainer.kubeflow.org_trainingruntimes.yaml",
        _trainer("trainingruntimes"),
        "231db1e320d1e97db68b8ef9c1267b7ecb043bd73f72218663d03884917197ba",
        "14a8b11040653649e84df283e452e3218c65b38b0ff44ec4cbc52b343863588f",
    ),
    Pin(
        "trainer.kubeflow.org_clustertrainingruntimes.yaml",
        _trainer("clustertrainingruntimes"),
        "91392795f389fb848d52b2678539b864d6c1177f88776381294d2a09d86ae339",
        "a4c4a8927299cc0de7141cce479991ff3f9a003b561597b33d91e67ed6972c5d",
    ),
    Pin(
        "kubeflow.org_profiles.yaml",
        f"{GITHUB}/kubeflow/kubeflow/v1.10.0/components/profile-controller/config/crd/bases/"
        "kubeflow.org_profiles.yaml",
        "f11a40cc575cc75d6b9ee68dd53718aa4c36b80ab8217ce14e6a28ce894aa9ea",
        "f11a40cc575cc75d6b9ee68dd53718aa4c36b80ab8217ce14e6a28ce894aa9ea",
    ),
    Pin(
        "security.istio.io_authorizationpolicies.yaml",
        f"{GITHUB}/istio/istio/1.30.3/manifests/charts/base/files/crd-all.gen.yaml",
        "f9f0234dc41e954ce6d9bd70df625855d4f1700f457371c748a6af1ff39ebc91",
        "408b33fc7ae50e3321010e39e868a11d5a646f531bac7ed3ccc790fce1e0a0ae",
        keep=("authorizationpolicies.security.istio.io", "peerauthentications.security.istio.io"),
    ),
    Pin(
        "kueue/kueue.x-k8s.io_localqueues.yaml",
        _kueue("localqueues"),
        "2ce779a67478d96c99977b14e05e230398703c17978e5dc65a54ba2990dea532",
        "20aaf5f06de5074e90e23e88eb9af34d3e9f49f8bf954a1e628f99f7658928a2",
    ),
    Pin(
        "kueue/kueue.x-k8s.io_clusterqueues.yaml",
        _kueue("clusterqueues"),
        "fba5b6d646d92aa772bd6f541c26d568c9f0f69923fa8b3624282bfb12620160",
        "e69b44dcd958dd0a0444cc647b907735794ea863577faa95765a0c898437f427",
    ),
    Pin(
        "kueue/kueue.x-k8s.io_resourceflavors.yaml",
        _kueue("resourceflavors"),
        "be26b93f0223c78031b3098e069e18d145181874f382fa6704cfc440e3894da4",
        "d3cffd1b6905423c10e9d304e234311cfe490c6d9163b06f092f61dcb64ca0f4",
    ),
    Pin(
        "kueue/kueue.x-k8s.io_workloads.yaml",
        _kueue("workloads"),
        "3ef48dbe0ce354973a6f395459b85d7fd53ac6974f1324540355f68104c5e0f9",
        "9cd80795d550c1209c219b15cb0a2e7485cfee26119da32debc538cef9117b1e",
    ),
    Pin(
        "serving.kserve.io_inferenceservices.yaml",
        _kserve("inferenceservices"),
        "79a13b7c891d505da4112ad41a5b3a40e0db385ceefa574c4c2ab7244566c155",
        "a2652acf99a9ddf735ae18ebfb0d3b0bfc6d8ebb940e53c0e4c42136ff1e017d",
    ),
    Pin(  # the Workflow a KFP run is (KFP 2.17 installs Argo v4.0.5's minimal CRDs)
        "argoproj.io_workflows.yaml",
        f"{GITHUB}/argoproj/argo-workflows/v4.0.5/manifests/base/crds/minimal/"
        "argoproj.io_workflows.yaml",
        "b881b49b8ecc789f1e4278d523f17a1c8e3b6caa7c09824cf08b5ab2cd275079",
        "b881b49b8ecc789f1e4278d523f17a1c8e3b6caa7c09824cf08b5ab2cd275079",
    ),
    Pin(
        "serving.kserve.io_clusterservingruntimes.yaml",
        _kserve("clusterservingruntimes"),
        "1e7e8c89e05f89e03c4656ef281e843ced10b5f04af2349cb4a64cd3414f2c85",
        "8596807e34e6de6982ad270499c044ea01277bea8edf1a389183f90d475509f3",
    ),
)


class ChecksumMismatch(RuntimeError):
    """A downloaded CRD is not the pinned one."""


def default_cache() -> Path:
    return Path.home() / ".cache" / "cellseg" / "crds"


def documents(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=LOADER) if d]


def digest(docs: list[dict]) -> str:
    canonical = json.dumps(docs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def loosen(node):
    """What a Kubernetes 1.20 API server refuses, dropped: empty-string defaults, CEL rules,
    map-type lists (made atomic). Types, required fields and enums stay, so the server still
    rejects malformed objects (as ../shared/tools/crd-for-k8s-1.20.py does)."""
    if isinstance(node, dict):
        if node.get("default") == "":
            del node["default"]
        if node.get("x-kubernetes-list-type") == "map":
            node["x-kubernetes-list-type"] = "atomic"
            node.pop("x-kubernetes-list-map-keys", None)
        node.pop("x-kubernetes-validations", None)
        for value in node.values():
            loosen(value)
    elif isinstance(node, list):
        for value in node:
            loosen(value)
    return node


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as response:  # pinned https URLs only
        return response.read().decode()


def install(pin: Pin, cache: Path, fetch: Callable[[str], str] = _fetch) -> Path:
    """Download ``pin``, check it, and write it and its 1.20 copy under ``cache``."""
    docs = documents(fetch(pin.url))
    if pin.keep:
        docs = [d for d in docs if d.get("metadata", {}).get("name") in pin.keep]
    if digest(docs) != pin.sha256:
        raise ChecksumMismatch(f"{pin.url}: sha256 {digest(docs)}, pinned {pin.sha256}")
    loose = [loosen(json.loads(json.dumps(d))) for d in docs]
    if digest(loose) != pin.sha256_k8s_120:
        raise ChecksumMismatch(f"{pin.path}: the 1.20 copy is not the pinned one")
    for path, content in ((cache / pin.path, docs), (cache / K8S_120 / Path(pin.path).name, loose)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(yaml.dump_all(content, Dumper=DUMPER, sort_keys=False))
        tmp.replace(path)  # a cut download never leaves a half file behind
    return cache / pin.path


def is_current(pin: Pin, cache: Path) -> bool:
    paths = cache / pin.path, cache / K8S_120 / Path(pin.path).name
    if not all(p.is_file() for p in paths):
        return False
    return [digest(documents(p.read_text())) for p in paths] == [pin.sha256, pin.sha256_k8s_120]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download the pinned CRDs the tests read")
    parser.add_argument("--cache", type=Path, default=None, help="default ~/.cache/cellseg/crds")
    args = parser.parse_args(argv)
    cache = args.cache or default_cache()
    try:
        for pin in PINS:
            if is_current(pin, cache):
                print(f"ok      {pin.path}")
                continue
            install(pin, cache)
            print(f"fetched {pin.path}")
    except (OSError, ChecksumMismatch) as err:
        print(f"make crds: {err}", file=sys.stderr)
        return 1
    print(f"CRDs in {cache}: the tests read them (or export CELLSEG_CRDS=that folder)")
    return 0


# --- where the tests find them ----------------------------------------------------------------
HOW_TO_GET = "run `make crds` (downloads the pinned CRDs) or export CELLSEG_CRDS=DIR"


def crds_dir() -> Path:
    return Path(os.environ.get("CELLSEG_CRDS") or default_cache())


# Small CRDs kept in the repository (with their licence), for folders made before their pin
VENDORED = Path(__file__).resolve().parent / "upstream"


def crd(path: str, k8s_120: bool = False) -> Path:
    """The CRD file ``path`` (e.g. ``kueue/kueue.x-k8s.io_localqueues.yaml``); with ``k8s_120``
    its copy a Kubernetes 1.20 API server accepts. A missing one skips the test with the way to
    get it, or fails it where ``CELLSEG_CRDS`` is set (there the CRDs were promised)."""
    import pytest

    found = crds_dir() / (f"{K8S_120}/{Path(path).name}" if k8s_120 else path)
    vendored = VENDORED / Path(path).name
    if not found.is_file() and vendored.is_file():
        return vendored  # pinned as it is upstream: its 1.20 copy is the same file
        message = f"{found} not found: {HOW_TO_GET}"
        if os.environ.get("CELLSEG_CRDS"):
            pytest.fail(message)
        pytest.skip(message)
    return found


if __name__ == "__main__":
    sys.exit(main())
