"""What the kernel says about processes: the CPUs this process may use (affinity mask and cgroup
v1/v2 quota), and one process's CPU seconds, resident memory and open file descriptors.

Plain readers of ``/proc`` and ``/sys/fs/cgroup``: every one answers a neutral value (None, 0)
when the file is missing or garbled, never raises. Used by the worker count
(``authz.server.lifecycle``), the supervisor's ``process_*`` metrics (``authz.server.workers``)
and the benchmark (``bench/sysstat.py``).

Must not import: anything of ``authz`` (a leaf module), prometheus_client, asyncio.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

# ------------------------------------------------------------------------------------ CPU count


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``"$QUOTA $PERIOD"``); None when unlimited
    (``"max ..."``) or unreadable. ``"150000 100000"`` -> 1.5."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1: ``cpu.cfs_quota_us`` (-1 = unlimited) / ``cpu.cfs_period_us``."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup, or None when there is none (or none readable).

    cgroup v2: ``cpu.max`` of our own cgroup (from ``/proc/self/cgroup``) and of every ancestor up
    to ``root`` -- the smallest wins; cgroup v1: ``cpu/cpu.cfs_quota_us``."""
    limits: list[float] = []
    own = _read(Path("/proc/self/cgroup")) or ""
    rel = ""
    for line in own.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
    here = root / rel if rel else root
    while True:
        text = _read(here / "cpu.max")
        if text is not None and (limit := parse_cpu_max(text)) is not None:
            limits.append(limit)
        if here == root or root not in here.parents:
            break
        here = here.parent
    quota = _read(root / "cpu" / "cpu.cfs_quota_us")
    period = _read(root / "cpu" / "cpu.cfs_period_us")
    if quota is not None and period is not None and (v1 := parse_cfs(quota, period)) is not None:
        limits.append(v1)
    return min(limits) if limits else None


def available_cpus(
    *,
    affinity: Callable[[], int] | None = None,
    limit: Callable[[], float | None] = cgroup_cpu_limit,
) -> int:
    """CPUs this process may really use: the affinity mask, capped by the cgroup quota (rounded
    up: a 1.5-CPU quota still benefits from a second process), at least 1."""
    if affinity is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    else:
        cpus = affinity()
    quota = limit()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


# ---------------------------------------------------------------------------------- one process


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        # after "pid (comm)": state is fields[0]; utime, stime are the 14th, 15th of the line
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_bytes(pid: int) -> int:
    """Resident memory of one process; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def open_fds(pid: int) -> int:
    """Open file descriptors of one process; 0 if it is gone (or not ours to read)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
