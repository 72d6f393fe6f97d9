"""/proc readings: per-process CPU (utime+stime), RSS, children, and machine-wide CPU steal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from authz.server.procfs import cpu_seconds, rss_bytes

# Per-process readings are the service's own (its supervisor exports them as process_*).
__all__ = ["CpuMeter", "MachineCpu", "children", "cpu_seconds", "rss_bytes"]


def children(pid: int) -> list[int]:
    """Direct child processes (all threads' children lists)."""
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            out += [int(x) for x in text]
    except OSError:
        pass
    return sorted(set(out))


@dataclass(frozen=True, slots=True)
class MachineCpu:
    total: int
    idle: int
    steal: int

    @staticmethod
    def read() -> MachineCpu:
        parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        vals = [int(x) for x in parts]
        # user nice system idle iowait irq softirq steal guest guest_nice (guest is in user)
        total = sum(vals[:8])
        return MachineCpu(total=total, idle=vals[3] + vals[4], steal=vals[7])

    def steal_pct_since(self, before: MachineCpu) -> float:
        dt = self.total - before.total
        return 100.0 * (self.steal - before.steal) / dt if dt > 0 else 0.0

    def busy_pct_since(self, before: MachineCpu) -> float:
        dt = self.total - before.total
        return 100.0 * (dt - (self.idle - before.idle)) / dt if dt > 0 else 0.0


class CpuMeter:
    """CPU seconds of named process groups between ``start()`` and ``stop()``."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[int, float] = {}
        self._machine: MachineCpu | None = None
        self.per_pid: dict[int, float] = {}
        self.steal_pct = 0.0
        self.busy_pct = 0.0

    def start(self) -> None:
        self._machine = MachineCpu.read()
        self._before = {p: cpu_seconds(p) for pids in self.groups.values() for p in pids}

    def stop(self) -> None:
        after = {p: cpu_seconds(p) for p in self._before}
        self.per_pid = {p: max(0.0, after[p] - self._before[p]) for p in self._before}
        assert self._machine is not None
        now = MachineCpu.read()
        self.steal_pct = now.steal_pct_since(self._machine)
        self.busy_pct = now.busy_pct_since(self._machine)

    def seconds(self, group: str) -> float:
        return sum(self.per_pid.get(p, 0.0) for p in self.groups.get(group, []))
