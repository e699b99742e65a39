"""The CPUs this process may use, and how its OpenMP threads wait, settled before torch loads.

torch sizes its thread pool by the machine's cores, whatever ``taskset`` or a cgroup ``cpu.max`` allow, and
libgomp's spinning threads hold the cores a busy machine's other threads need: the measurements, and why the
thread count stays the same under load: docs/speed.md, The demo's time, and a shared machine.
``OMP_WAIT_POLICY`` set in the environment always wins.

    allowed_cpus()                 # 2 here; 1 under `taskset -c 0` or a 1-CPU container quota
    choose_wait_policy()           # WaitPolicy("passive", busy=1.96, cpus=2) on a busy machine
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BUSY_THRESHOLD = 0.5  # CPUs kept busy by other processes from which spinning costs more than it saves


def allowed_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota when there is one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_quota() -> float | None:
    """CPUs of quota (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited or unreadable."""
    try:
        v2 = Path("/sys/fs/cgroup/cpu.max")
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.exists():
            quota_us = int(v1.read_text())
            period_us = int((v1.parent / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        pass
    return None


def busy_cpus(seconds: float = 0.1) -> float | None:
    """CPUs kept busy by other processes, sampled from /proc/stat over ``seconds`` (this process sleeps
    meanwhile), scaled to the CPUs this process may use; None where /proc/stat is unreadable."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * allowed_cpus()


@dataclass(frozen=True)
class WaitPolicy:
    """What :func:`choose_wait_policy` decided and from what (a record the command line prints once)."""

    policy: str | None     # "passive" when set by preftune; None: left to libgomp or to the environment
    busy: float | None     # CPUs busy with other processes when sampled
    cpus: int


def choose_wait_policy(environ: dict[str, str] | None = None) -> WaitPolicy:
    """Set ``OMP_WAIT_POLICY=passive`` in ``environ`` (default ``os.environ``) when other processes are busy, and
    ``OMP_NUM_THREADS`` to the CPUs this process may use, so every command's torch sizes its pool by them.

    Only before torch is imported (libgomp reads both once, when it loads) and only what the user has not set.
    Children (``ablate --parallel`` cells, torchrun workers) inherit the choice."""
    env = os.environ if environ is None else environ
    cpus = allowed_cpus()
    if "torch" in sys.modules:
        return WaitPolicy(None, None, cpus)
    env.setdefault("OMP_NUM_THREADS", str(cpus))
    if "OMP_WAIT_POLICY" in env:
        return WaitPolicy(None, None, cpus)
    busy = busy_cpus()
    if busy is None or busy < BUSY_THRESHOLD:
        return WaitPolicy(None, busy, cpus)
    env["OMP_WAIT_POLICY"] = "passive"
    return WaitPolicy("passive", busy, cpus)
