"""Machine facts the reports record: cpuinfo, the commit without git, CPU used by whom."""

from __future__ import annotations

import math

import pytest

from mofserve.core import machine as bench


def test_machine_helpers_parse_cpuinfo():
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu avx2 fma avx512f amx_bf16\n"
    assert bench.cpu_model(cpuinfo) == "Some CPU @ 2.0GHz"
    assert bench.cpu_flags(cpuinfo) == ["avx2", "fma", "avx512f", "amx_bf16"]


def test_git_commit_reads_refs_without_git(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert bench.git_commit(tmp_path) == sha
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert bench.git_commit(tmp_path) == sha
    assert bench.git_commit(tmp_path / "nowhere") is None


def test_parse_proc_stat_cpu():
    busy, steal, total = bench.parse_proc_stat_cpu("cpu  100 5 20 300 7 1 2 9 4 0")
    assert busy == 100 + 5 + 20 + 1 + 2 and steal == 9 and total == busy + 9 + 300 + 7
    assert bench.parse_proc_stat_cpu("cpu 1 2 3 4") == (6, 0, 10)  # old kernels: fewer fields


def test_parse_pid_stat_with_spaces_and_parens_in_the_name():
    text = "4242 (tritonserver (stub) x) S 4000 4242 4242 0 -1 4194560 10 0 0 0 250 75 3 1 20 0 9 0 100"
    assert bench.parse_pid_stat(text) == (4000, 325)


def test_tree_ticks_counts_descendants_only():
    processes = {1: (0, 1000), 10: (1, 5), 11: (10, 7), 12: (11, 11), 20: (1, 500), 13: (10, 2)}
    assert bench.tree_ticks(10, processes) == 5 + 7 + 11 + 2
    assert bench.tree_ticks(99, processes) == 0


def test_cpu_usage_splits_ours_and_others():
    before = bench.CpuSnapshot(busy=1000, steal=10, total=5000, ours=200, at=100.0)
    after = bench.CpuSnapshot(busy=1000 + 1500, steal=10 + 50, total=5000 + 2000, ours=200 + 1000, at=110.0)
    usage = bench.cpu_usage(before, after, 100.0)
    assert usage == {"seconds": 10.0, "busy_cores": 1.5, "ours_cores": 1.0, "others_cores": 0.5,
                     "steal_cores": 0.05}
    assert math.isnan(bench.cpu_usage(after, after, 100.0)["others_cores"])


def test_cpu_snapshot_sees_this_process():
    snapshot = bench.cpu_snapshot()
    if snapshot is None:
        pytest.skip("no /proc")
    sum(i * i for i in range(200_000))  # burn a little CPU
    later = bench.cpu_snapshot()
    assert later.ours >= snapshot.ours > 0 and later.busy >= snapshot.busy
