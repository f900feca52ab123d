"""`make crds`: the pinned upstream CRDs, checked and loosened for the 1.20 test server.

There is no internet here, so "upstream" is a fetch that answers each pinned URL with the
copy in CELLSEG_CRDS (../shared/schemas, where those files were taken from upstream)."""

from pathlib import Path

import pytest
import yaml

from tests import crds
from tests.crds import crd


@pytest.fixture(scope="module")
def upstream():
    by_url = {pin.url: crd(pin.path).read_text() for pin in crds.PINS}
    istio = next(p for p in crds.PINS if p.keep)
    # Istio's file holds every Istio CRD: one more that `keep` must drop
    other = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
             "metadata": {"name": "gateways.networking.istio.io"}, "spec": {}}  # fmt: skip
    by_url[istio.url] = yaml.safe_dump(other) + "---\n" + by_url[istio.url]
    return by_url


def test_every_pin_installs_and_its_1_20_copy_is_what_the_test_server_loads(upstream, tmp_path):
    for pin in crds.PINS:
        path = crds.install(pin, tmp_path, upstream.__getitem__)
        assert crds.is_current(pin, tmp_path)
        names = {d["metadata"]["name"] for d in crds.documents(path.read_text())}
        assert "gateways.networking.istio.io" not in names
        loose = tmp_path / crds.K8S_120 / Path(pin.path).name
        shared = crd(pin.path, k8s_120=True)  # made by ../shared/tools/crd-for-k8s-1.20.py
        assert crds.digest(crds.documents(loose.read_text())) == crds.digest(
            crds.documents(shared.read_text())
        )
    assert (tmp_path / "kueue" / "kueue.x-k8s.io_workloads.yaml").is_file()


def test_a_changed_upstream_file_is_refused_and_nothing_is_written(upstream, tmp_path):
    pin = next(p for p in crds.PINS if p.path.endswith("localqueues.yaml"))
    docs = crds.documents(upstream[pin.url])
    docs[0]["spec"]["versions"][0]["name"] = "v1beta9"
    with pytest.raises(crds.ChecksumMismatch, match="sha256"):
        crds.install(pin, tmp_path, lambda url: yaml.safe_dump_all(docs))
    assert not (tmp_path / pin.path).exists()
    assert not crds.is_current(pin, tmp_path)


def test_pins_are_https_at_a_tag_or_release_branch():
    for pin in crds.PINS:
        assert pin.url.startswith("https://raw.githubusercontent.com/"), pin.url
        assert "/main/" not in pin.url and "/master/" not in pin.url, pin.url
