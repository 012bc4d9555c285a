"""kcompile.distributed: spawning local ranks, env detection, and failure without hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from kcompile import distributed as kd
from kcompile.errors import KcompileError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sum_ranks(rank, world, base):
    t = torch.tensor([float(rank + base)])
    dist.all_reduce(t)
    return (rank, world, float(t), kd.current().rank, os.environ["WORLD_SIZE"])


def _raise_on_1(rank, world):
    if rank == 1:
        raise KcompileError("rank 1: bad input on purpose")
    dist.barrier()
    return rank


def _die_on_1(rank, world):
    if rank == 1:
        os._exit(3)  # killed: no error report, no goodbye to the group
    dist.barrier()
    dist.all_reduce(torch.ones(1))
    return rank


def _finish(rank, world):
    kd.finish(timeout=20)  # all ranks leave together; the group is gone afterwards
    return kd.is_initialized()


def _finish_alone(rank, world):
    if rank == 1:
        return kd.finish(timeout=2)  # rank 0 never arrives: a one-line error, not a hang
    time.sleep(6)
    return None


def _hang_on_1(rank, world):
    if rank == 1:
        time.sleep(60)  # alive but never joins the collective
    t = torch.ones(1)
    dist.all_reduce(t)
    return rank


def test_spawn_two_ranks_all_reduce():
    out = kd.spawn(_sum_ranks, 2, (10,), timeout=30)
    assert [o[0] for o in out] == [0, 1]
    assert all(o[1] == 2 and o[2] == 21.0 and o[4] == "2" for o in out)
    assert [o[3] for o in out] == [0, 1]


def test_spawn_reports_a_rank_error_in_one_line():
    with pytest.raises(KcompileError) as e:
        kd.spawn(_raise_on_1, 2, timeout=5, grace=5)
    msg = str(e.value)
    assert "rank 1: bad input on purpose" in msg and "\n" not in msg


def test_killed_rank_is_an_error_not_a_hang():
    t0 = time.monotonic()
    with pytest.raises(KcompileError) as e:
        kd.spawn(_die_on_1, 2, timeout=3, grace=6)
    assert time.monotonic() - t0 < 60
    assert "rank 1" in str(e.value) and "exit code 3" in str(e.value)


def test_hanging_rank_times_out():
    t0 = time.monotonic()
    with pytest.raises(KcompileError) as e:
        kd.spawn(_hang_on_1, 2, timeout=2, grace=4)
    assert time.monotonic() - t0 < 50
    msg = str(e.value)
    assert "rank 0" in msg and ("timed out" in msg or "lost the connection" in msg), msg


def test_env_world(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert kd.env_world() is None
    assert kd.init_from_env().world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert kd.env_world() == kd.DistInfo(2, 4, 0, "")
    monkeypatch.setenv("RANK", "7")
    with pytest.raises(KcompileError, match="outside"):
        kd.env_world()


def test_describe_failure_and_backend():
    assert "timed out" in kd.describe_failure(RuntimeError("Timed out waiting 3000ms"), 0)
    assert "lost the connection" in kd.describe_failure(RuntimeError("Connection closed by peer"), 1)
    assert kd.default_backend() in ("gloo", "nccl")
    assert 0 < kd.free_port() < 65536


def test_finish_leaves_the_group_together():
    kd.finish()  # no group: nothing to do
    assert kd.spawn(_finish, 2, timeout=30) == [False, False]


def test_finish_without_the_peers_is_a_one_line_error():
    with pytest.raises(KcompileError) as e:
        kd.spawn(_finish_alone, 2, timeout=10, grace=10)
    assert "rank 1" in str(e.value) and "\n" not in str(e.value)
