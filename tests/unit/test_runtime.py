import os

import pytest

from cellseg.runtime import cgroup_cpu_quota, cpu_budget, match_torch_threads


def test_the_cgroup_v2_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert cgroup_cpu_quota(tmp_path) == pytest.approx(1.5)
    assert cpu_budget(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert cpu_budget(tmp_path) == len(os.sched_getaffinity(0))


def test_the_cgroup_v1_quota_caps_the_cores(tmp_path):
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("100000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.0 and cpu_budget(tmp_path) == 1
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_torch_threads_follow_the_quota_shared_by_the_nodes_processes(tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    try:
        assert match_torch_threads(tmp_path) == 1 and torch.get_num_threads() == 1
        (tmp_path / "cpu.max").write_text("400000 100000\n")
        monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(64)))  # a big host
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on the node
        assert match_torch_threads(tmp_path) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_portable_kernels_are_set_unless_the_user_chose_already():
    from cellseg.runtime import PORTABLE_CPU_KERNELS, portable_cpu_kernels

    env = {"MKL_CBWR": "COMPATIBLE"}
    in_force = portable_cpu_kernels(env)
    assert env["MKL_CBWR"] == "COMPATIBLE"  # the user's own choice stays
    assert in_force == {**PORTABLE_CPU_KERNELS, "MKL_CBWR": "COMPATIBLE"} == env


# A convolution, its weight gradient, a linear layer and a softmax: each library's kernels.
PROBE = """
import hashlib, sys, torch
if sys.argv[1] == "pin":
    from cellseg.runtime import portable_cpu_kernels
    portable_cpu_kernels()  # after `import torch`, before any computation: still in time
torch.manual_seed(0); torch.set_num_threads(1)
conv, lin = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Linear(64, 96)
x, y = torch.randn(2, 16, 40, 40), torch.randn(2, 50, 64)
conv(x).square().mean().backward()
h = hashlib.sha256()
for t in (conv(x), conv.weight.grad, lin(y), x.softmax(1)):
    h.update(t.detach().numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def probe(mode: str, **env: str) -> list[str]:
    import subprocess
    import sys

    from cellseg.runtime import PORTABLE_CPU_KERNELS

    keep = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_KERNELS}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**keep, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the kernels pinned are x86's")
def test_portable_kernels_compute_as_avx2_does_whatever_the_cpu_has():
    from cellseg.runtime import PORTABLE_CPU_KERNELS

    native_isa, native = probe("native")
    pinned_isa, pinned = probe("pin")
    assert pinned_isa == "AVX2"
    # the same bits as a process started with the AVX2 settings, as on an AVX2-only machine
    assert probe("native", **PORTABLE_CPU_KERNELS) == [pinned_isa, pinned]
    if native_isa != "AVX2":  # an AVX-512 machine rounds differently unpinned: the cause
        assert native != pinned


def test_portable_kernels_are_refused_where_they_would_not_reach_the_steps(capsys):
    from pipelines.run_local import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--runner", "container", "--image", "x", "--portable-kernels"])
    assert exit_info.value.code == 2
    assert "reaches subprocess steps only" in capsys.readouterr().err
