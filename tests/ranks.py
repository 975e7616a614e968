"""Two ranks for the distributed tests, started and torn down so that none can hang.

A test runs its ranks with ``run_ranks(__file__, out, device_type)``: a fresh interpreter executes
the test module as ``python script out device_type`` (isolated from the pytest process and its
threads), which calls ``spawn(body, out, device_type)``; each rank runs
``body(rank, world, out, device)`` and writes its results under ``out``, moved to the CPU
(``to_cpu``) so that the pytest process loads them without a GPU.

``device_type`` is ``"cpu"``: gloo ranks on the CPU, ``device`` the CPU; or ``"cuda"``: NCCL
ranks, rank ``r`` on ``cuda:r`` (NCCL needs one GPU per rank). ``rank_device_type`` picks it for
``--device``: ``"cuda"`` only with a CUDA device and at least two GPUs.

Teardown is where gloo hangs: a rank that still holds a ``DistributedDataParallel`` wrapper (and
so the process group) while its peer exits can block forever in the group's destructor. This was
seen here about once in five runs of ``test_distributed.py`` before this module existed, and it
stopped a CI run. So ``body`` owns every model, wrapper and mesh it makes; they are freed (and
collected) when it returns, and the ranks then meet at a barrier and destroy the group together.
Collectives time out after ``COLLECTIVE_TIMEOUT`` and the whole script after ``timeout`` seconds,
so a broken rank fails its test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "clean_env",
    "end_group",
    "rank_device",
    "rank_device_type",
    "run_isolated",
    "run_ranks",
    "spawn",
    "to_cpu",
]

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def clean_env() -> dict[str, str]:
    """The environment without a launcher's rendezvous variables (a parent torchrun, say)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD"))}


def run_isolated(cmd: list[str], *, cwd: str | Path, timeout: float = 240, **kw) -> None:
    """Run ``cmd`` in its own session; raise if it fails or passes ``timeout`` seconds.

    On a timeout, or any exception while waiting (pytest-timeout's alarm, say), the process group
    is ended with ``end_group``: the ranks that ``cmd`` started too, so that none is left holding
    the suite's output open.
    """
    with subprocess.Popen(cmd, cwd=cwd, env=clean_env(), start_new_session=True, **kw) as proc:
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            end_group(proc)  # returns at once when every process in the group has exited
    if returncode:
        raise subprocess.CalledProcessError(returncode, cmd)


def end_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group that ``proc`` leads, then SIGKILL what is left after ``grace``.

    SIGTERM first, because torchrun stops its workers (which run in sessions of their own) when
    it gets one; a rank of ``mp.spawn`` stuck in a destructor dies of either.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.1)  # reap the leader, or it stays in the group as a zombie
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rank_device_type(device: torch.device) -> str:
    """Where the ranks run for ``--device`` ``device``: ``"cuda"`` (NCCL, rank ``r`` on
    ``cuda:r``) with a CUDA device and at least two GPUs, else ``"cpu"`` (gloo on the CPU)."""
    return "cuda" if device.type == "cuda" and torch.cuda.device_count() >= 2 else "cpu"


def rank_device(device_type: str, rank: int) -> torch.device:
    """The device of ``rank``: ``cuda:rank`` for ``"cuda"``, else the CPU."""
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts, lists and tuples moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def run_ranks(
    script: str | Path, out: str | Path, device_type: str = "cpu", timeout: float = 240
) -> None:
    """Run the test module ``script`` as ``python script out device_type`` with ``run_isolated``."""
    script = Path(script)
    cmd = [sys.executable, str(script), str(out), device_type]
    run_isolated(cmd, cwd=script.parent, timeout=timeout)


Body = Callable[[int, int, str, torch.device], None]


def spawn(body: Body, out: str | Path, device_type: str = "cpu", world: int = 2) -> None:
    """Start ``world`` ranks that each run ``body(rank, world, out, device)`` in one group: gloo
    on the CPU for ``device_type="cpu"``, NCCL with rank ``r`` on ``cuda:r`` for ``"cuda"``."""
    mp.spawn(_rank, args=(body, world, str(out), device_type), nprocs=world)


def _rank(rank: int, body: Body, world: int, out: str, device_type: str) -> None:
    torch.set_num_threads(1)
    device = rank_device(device_type, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # as tests/conftest.py does for --device cuda: the tests compare runs bit for bit
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{out}/init",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        body(rank, world, out, device)
        gc.collect()  # what held the group is freed now, reference cycles (module hooks) too
        dist.barrier()  # leave together: a rank that tears down alone can hang the other
    finally:
        dist.destroy_process_group()
