import os

import pytest

from cellseg.threads import cgroup_cpu_quota, cpu_budget, match_torch_threads


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
