"""``python -m bench.ab --base REF``: CPU per cached check, old code (A) vs this code (B), both
transports, through real Envoy, in interleaved rounds of one run. See docs/performance.md.

A is ``git archive REF`` unpacked in a temp dir and run from there (same venv, same config, same
Envoy templates, same token); B is this worktree (or ``--new REF``, unpacked the same way). Each
round runs, in turn, one wrk run (``-c16 -t1``) through a fresh Envoy (``--concurrency 1``) per
target: A and B over HTTP and gRPC (A first in odd rounds, B first in even ones), the do-nothing
grpc.aio server (``bench/floor_grpc.py``) and, with ``--http-floor``, the constant-allow HTTP
server. A noisy neighbour then lands on every target of a round alike. Per target: CPU µs per
request of our process (utime + stime from ``/proc/<pid>/stat``), Envoy's, req/s and p99; rounds
with CPU steal over ``--max-steal`` % are discarded. The summary is the median over kept rounds,
and the median of the per-round B/A (and B/floor) ratios. Prints markdown; saves JSON under
bench/results/. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from authz.dev.idp import CONTOSO
from authz.dev.stack import free_port, wait_until
from authz.server.ports import envoy_endpoints
from bench import wrk
from bench.__main__ import HERE, RESULTS, Lab, Proc, _connects, _free_block, run_mode

REPO = HERE.parent


def unpack(ref: str, into: Path) -> Path:
    """The tree of ``ref`` (any git revision) as plain files under ``into`` (no git metadata)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", ref],
        check=True,
        capture_output=True,
    ).stdout
    tar = into / "tree.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as tf:
        tf.extractall(into, filter="data")
    tar.unlink()
    return into


def serve(lab: Lab, name: str, tree: Path) -> Proc:
    """``authz serve`` (one worker, both transports) from the code in ``tree``."""
    grpc_port, http_port, admin = _free_block(5)
    cfg = lab.config(lab.cache_max)
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(tree),  # and cwd=tree: this tree's ``authz`` wins over the venv's
        AUTHZ_GRPC_LISTEN=f"127.0.0.1:{grpc_port}",
        AUTHZ_HTTP_LISTEN=f"127.0.0.1:{http_port}",
        AUTHZ_ADMIN_LISTEN=f"127.0.0.1:{admin}",
    )
    cmd = [sys.executable, "-m", "authz", "serve", "--config", str(cfg)]
    cmd += ["--transport", "both", "--workers", "1", "--log-level", "WARNING"]
    out = (lab.workdir / f"{name}.out").open("ab")
    err = (lab.workdir / f"{name}.err").open("ab")
    popen = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=tree)
    proc = Proc(name, popen)
    lab.procs.append(proc)
    proc.ports.update(grpc=grpc_port, http=http_port, admin=admin)
    url = f"http://127.0.0.1:{admin}/readyz"
    wait_until(
        lambda: httpx.get(url, timeout=1, trust_env=False).status_code == 200,
        30,
        f"{name} readiness",
        popen,
    )
    return proc


def floor(lab: Lab, transport: str, variant: str = "") -> Proc:
    """A do-nothing server (``bench/floor_*.py``), optionally one of the gRPC floor variants."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        f"bench.floor_{transport}",
        str(port),
        *([variant] * bool(variant)),
    ]
    proc = lab.spawn(f"floor-{transport}-{variant}", cmd)
    proc.ports[transport] = port
    wait_until(lambda: _connects(port), 15, f"{transport} floor {variant}", proc.popen)
    return proc


def _targets(
    procs: dict[str, Proc],
    floors: dict[str, Proc],
    transports: list[str],
    natives: dict[str, str],
    sides: tuple[str, str] = ("A", "B"),
) -> list[tuple[str, str, str, list[Proc]]]:
    """(label, envoy template, endpoints, measured processes) for one round, in order: A then B,
    or B then A (``sides``; the rounds alternate, because whichever runs second in a round was
    measured ~7 % cheaper in an A/A run on a loaded machine)."""
    out = []
    for transport in transports:
        for side in sides:
            p = procs[side]
            ep = envoy_endpoints([p.ports[transport]])
            out.append((f"{side} {transport}", f"envoy-ext-{transport}.yaml", ep, [p]))
    for label, template in natives.items():
        out.append((label, template, "", []))
    for label, f in floors.items():
        transport = label.split()[1]
        ep = envoy_endpoints([f.ports[transport]])
        out.append((label, f"envoy-ext-{transport}.yaml", ep, [f]))
    return out


def summarize(rounds: list[dict[str, dict[str, Any]]], max_steal: float) -> dict[str, Any]:
    """Medians over the rounds whose every target ran with steal <= ``max_steal``."""
    kept = [r for r in rounds if all(t["steal_pct"] <= max_steal for t in r.values())]
    out: dict[str, Any] = {"rounds": len(rounds), "kept": len(kept), "targets": {}, "ratios": {}}
    if not kept:
        return out
    for label in kept[0]:
        rows = [r[label] for r in kept]
        us = [t["authz_us"] or 0.0 for t in rows]
        out["targets"][label] = {
            "authz_us": statistics.median(us),
            "authz_us_range": (min(us), max(us)),
            "envoy_us": statistics.median(t["envoy_us"] for t in rows),
            "rps": statistics.median(t["rps"] for t in rows),
            "p99_ms": statistics.median(t["p99_ms"] for t in rows),
            "non_2xx": sum(t["non_2xx"] for t in rows),
        }
    labels = kept[0]
    pairs = [(f"B/A {t}", f"B {t}", f"A {t}") for t in ("http", "grpc")]
    pairs += [(f"{s}/floor grpc", f"{s} grpc", "floor grpc") for s in ("A", "B")]
    pairs += [(f"{s}/floor http", f"{s} http", "floor http") for s in ("A", "B")]
    pairs += [(f"{v}/floor grpc", v, "floor grpc") for v in labels if v.startswith("floor grpc ")]
    pairs = [(n, a, b) for n, a, b in pairs if a in labels and b in labels]
    for name, num, den in pairs:
        ratios = [r[num]["authz_us"] / r[den]["authz_us"] for r in kept if r[den]["authz_us"]]
        if ratios:
            out["ratios"][name] = {
                "median": statistics.median(ratios),
                "range": (min(ratios), max(ratios)),
            }
    return out


def report(res: dict[str, Any]) -> str:
    meta, s = res["meta"], res["summary"]
    lines = [
        f"## A/B: A = {meta['base']}, B = {meta['new']} ({meta['when']}, {meta['machine']})",
        "",
        f"Envoy --concurrency 1, wrk -c16 -t1 -d{meta['duration']}s, {s['kept']} of "
        f"{s['rounds']} interleaved rounds kept (steal <= {meta['max_steal']} %); medians, "
        "[lowest-highest kept round].",
        "",
        "| target | our CPU µs/req | Envoy µs/req | req/s | p99 ms | non-2xx |",
        "|---|---|---|---|---|---|",
    ]
    for label, t in s["targets"].items():
        lo, hi = t["authz_us_range"]
        lines.append(
            f"| {label} | {t['authz_us']:.0f} [{lo:.0f}-{hi:.0f}] | {t['envoy_us']:.0f} | "
            f"{t['rps']:.0f} | {t['p99_ms']:.2f} | {t['non_2xx']} |"
        )
    lines += ["", "| ratio (per round, then median) | median | range |", "|---|---|---|"]
    for name, r in s["ratios"].items():
        lo, hi = r["range"]
        lines.append(f"| {name} | {r['median']:.2f} | {lo:.2f}-{hi:.2f} |")
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("--base", required=True, help="git revision of A (the old code)")
    p.add_argument("--new", default="", help="git revision of B (default: this worktree)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (6)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    p.add_argument("--max-steal", type=float, default=5.0, help="discard rounds above (5 %%)")
    p.add_argument("--http-floor", action="store_true", help="also the constant-allow HTTP server")
    p.add_argument(
        "--grpc-floors",
        default="",
        help="also these do-nothing gRPC variants (comma-separated: generic, sync, sync-generic,"
        " throughput, streams, nobdp; see bench/floor_grpc.py)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="also Envoy alone: no auth, and native jwt_authn + RBAC (Envoy's CPU for sizing)",
    )
    p.add_argument("--transports", default="http,grpc", help="A/B over these (http,grpc)")
    p.add_argument("--cache-max", type=int, default=5000, help="claims cache entries (5000)")
    args = p.parse_args(argv)
    wrk.wrk_binary()
    workdir = Path(tempfile.mkdtemp(prefix="authz-ab-"))
    res: dict[str, Any] = {
        "meta": {
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{os.uname().machine}, {len(os.sched_getaffinity(0))} CPUs",
            "base": args.base,
            "new": args.new or "worktree",
            "duration": args.duration,
            "max_steal": args.max_steal,
        },
        "rounds": [],
    }
    try:
        trees = {"A": unpack(args.base, workdir / "A")}
        trees["B"] = unpack(args.new, workdir / "B") if args.new else REPO
        with Lab(workdir, cache_max=args.cache_max) as lab:
            procs = {side: serve(lab, f"authz-{side}", tree) for side, tree in trees.items()}
            floors = {"floor grpc": floor(lab, "grpc")}
            if args.http_floor:
                floors["floor http"] = floor(lab, "http")
            for variant in filter(None, args.grpc_floors.split(",")):
                floors[f"floor grpc {variant}"] = floor(lab, "grpc", variant)
            transports = args.transports.split(",")
            natives = {}
            if args.native:
                natives = {"no auth": "envoy-noauth.yaml", "native": "envoy-jwt-rbac.yaml"}
            one = argparse.Namespace(rounds=1, duration=args.duration)
            jwt_values = {
                "ISSUER": lab.idp.issuer(CONTOSO, "2.0"),
                "JWKS_FILE": str(lab.jwks_file),
            }
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}", flush=True)
                row: dict[str, dict[str, Any]] = {}
                sides = ("A", "B") if i % 2 == 0 else ("B", "A")
                targets = _targets(procs, floors, transports, natives, sides)
                for label, template, ep, measured in targets:
                    values = {"AUTHZ_ENDPOINTS": ep} if ep else {}
                    if label == "native":
                        values = jwt_values
                    row[label] = run_mode(lab, label, template, values, measured, one, fixed=False)
                res["rounds"].append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["summary"] = summarize(res["rounds"], args.max_steal)
    text = report(res)
    print()
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
