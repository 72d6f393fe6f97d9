"""Run wrk (closed loop: N connections as fast as they can) and parse its report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = """\
-- Authorization header from a file of tokens (one per line); cycles through them.
local tokens = {}
for line in io.lines("%(tokens)s") do tokens[#tokens + 1] = line end
local i = %(start)d
request = function()
  i = i %% #tokens + 1
  return wrk.format("GET", "%(path)s", {["Authorization"] = "Bearer " .. tokens[i]})
end
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    seconds: float
    max_ms: float = float("nan")  # the slowest request (wrk's "Latency ... Max")


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is missing: make system-deps (apt-get install wrk)")
    return found


def _dur(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)] * 1e3


def parse(out: str, seconds: float) -> WrkResult:
    pct: dict[str, float] = {}
    for m in re.finditer(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)", out, re.M):
        pct[m.group(1)] = _dur(m.group(2))
    lat = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    req = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=int(req.group(1)) if req else 0,
        rps=float(rps.group(1)) if rps else 0.0,
        p50_ms=pct.get("50", float("nan")),
        p90_ms=pct.get("90", float("nan")),
        p99_ms=pct.get("99", float("nan")),
        non_2xx=int(non.group(1)) if non else 0,
        errors=sum(int(x) for x in errs.groups()) if errs else 0,
        seconds=seconds,
        max_ms=_dur(lat.group(1)) if lat else float("nan"),
    )


def script(workdir: Path, tokens: list[str], path: str, name: str = "bench") -> Path:
    """A Lua script that cycles through ``tokens`` in order (one wrk thread: one cycle shared by
    all connections, so each token comes back every ``len(tokens)`` requests)."""
    tok = workdir / f"{name}-tokens.txt"
    tok.write_text("\n".join(tokens) + "\n")
    return restart(tok, path, 0)


def restart(tokens_file: Path, path: str, start: int) -> Path:
    """The script for ``tokens_file`` (from ``script``) that begins after token ``start``: a run
    can continue the previous run's cycle (each wrk run starts a new Lua state)."""
    lua = tokens_file.with_name(tokens_file.name.removesuffix("-tokens.txt") + ".lua")
    lua.write_text(LUA % {"tokens": tokens_file, "path": path, "start": start})
    return lua


def run(url: str, lua: Path, *, seconds: float, connections: int = 16) -> WrkResult:
    cmd = [
        wrk_binary(),
        f"-c{connections}",
        "-t1",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "2s",
        "-s",
        str(lua),
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    return parse(proc.stdout, seconds)
