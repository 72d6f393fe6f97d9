"""``authz demo``: the whole product on 127.0.0.1 in one command.

Starts the dev IdP, the authz server, a real Envoy and the echo backend (``authz.dev.stack``),
walks a scripted tour through Envoy — allow with the identity headers the backend received, 401
with its challenge, 403, forged identity headers dropped, a 429 once a caller exceeds its rate
limit (counted in a real redis-server, as every replica would share it), a token revoked through
the admin API and restored — then keeps serving and prints
ready-to-paste curl commands until Ctrl-C. ``--once`` runs the tour and exits 0 only if every
step gave the expected answer. Dev tooling: imports ``authz.dev.idp``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from authz.dev.idp import FABRIKAM
from authz.dev.stack import ADMIN_ROLE, CLIENT_APP, Reply, Stack

CONTRACT = ("x-user-id", "x-tenant-id", "x-client-id", "x-roles", "x-scopes", "x-token-kind")


@dataclass
class Step:
    title: str
    method: str
    path: str
    expect: int
    token: Callable[[Stack], str | None] = lambda s: None
    headers: tuple[tuple[str, str], ...] = ()
    check: Callable[[Reply], str | None] = lambda r: None  # extra check: None = ok, else why
    before: int = 0  # identical requests sent first (each must be allowed), e.g. to use a quota
    setup: Callable[[Stack], str] | None = None  # done before the request; returns what it did


def _identity(r: Reply) -> str:
    got = r.backend_headers
    return ", ".join(f"{h}={got[h]}" for h in (*CONTRACT, "x-user-name") if h in got)


def _no_forgery(r: Reply) -> str | None:
    got = r.backend_headers
    if got.get("x-user-id") == "attacker" or "Admin" in str(got.get("x-roles", "")):
        return "a forged identity header reached the backend"
    if "authorization" in got:
        return "the raw token reached the backend"
    return None


def _anonymous_clean(r: Reply) -> str | None:
    got = r.backend_headers
    leaked = [h for h in CONTRACT if h in got]
    return f"forged headers reached the backend: {leaked}" if leaked else None


def _rate_limited(r: Reply) -> str | None:
    if r.json().get("code") != "rate_limited":
        return f"unexpected body {r.body[:80]!r}"
    if not r.headers.get("retry-after", "").isdigit():
        return "no Retry-After"
    if r.headers.get("ratelimit-policy") != '"per-user";q=3;w=60':
        return f"unexpected RateLimit-Policy {r.headers.get('ratelimit-policy')!r}"
    return None


def _challenge(r: Reply) -> str | None:
    www = r.headers.get("www-authenticate", "")
    return None if www.startswith("Bearer realm=") else f"unexpected WWW-Authenticate {www!r}"


# The revocation steps share one user's token: allowed (its claims cached), revoked, restored.
REVOKED_OID = "e0e0e0e0-0000-4000-8000-00000000000e"
REVOKED_RULE = "demo-stolen-laptop"
_held: dict[str, str] = {}


def _victim(stack: Stack) -> str:
    if "victim" not in _held:
        _held["victim"] = stack.mint(scp="Orders.Read", oid=REVOKED_OID)
    return _held["victim"]


def _admin(stack: Stack, method: str, path: str = "", body: object = None) -> httpx.Response:
    token = stack.admin_token(oid="a0a0a0a0-0000-4000-8000-00000000000a")
    return httpx.request(
        method,
        f"{stack.admin_url}/admin/revocations{path}",
        json=body,
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
        trust_env=False,
    )


def _revoke(stack: Stack) -> str:
    _held.clear()
    first = stack.request("GET", "/orders/7", token=_victim(stack))
    r = _admin(
        stack,
        "POST",
        body={
            "id": REVOKED_RULE,
            "oid": REVOKED_OID,
            "issued_before": "now",
            "expires_in": 600,
            "reason": "demo: laptop reported stolen",
        },
    )
    return (
        f"GET /orders/7 -> {first.status} (claims now cached); POST /admin/revocations "
        f"with an admin token (app role {ADMIN_ROLE}) -> {r.status_code}"
    )


def _restore(stack: Stack) -> str:
    r = _admin(stack, "DELETE", f"/{REVOKED_RULE}")
    return f"DELETE /admin/revocations/{REVOKED_RULE} -> {r.status_code}"


def _code(code: str) -> Callable[[Reply], str | None]:
    def check(r: Reply) -> str | None:
        got = r.json().get("code")
        return None if got == code else f"expected code {code}, got {got}"

    return check


STEPS = (
    Step(
        "a user token with scope Orders.Read -> allowed; the backend gets identity headers",
        "GET",
        "/orders/7",
        200,
        token=lambda s: s.mint(scp="Orders.Read"),
        check=lambda r: None if r.backend_headers.get("x-token-kind") == "user" else "no identity",
    ),
    Step(
        "an app token with role Orders.Read.All -> allowed as an app",
        "GET",
        "/orders/7",
        200,
        token=lambda s: s.mint(kind="app", roles=("Orders.Read.All",), scp=None),
        check=lambda r: None if r.backend_headers.get("x-token-kind") == "app" else "not app",
    ),
    Step(
        "no token -> 401 with a Bearer challenge (no error attribute)",
        "GET",
        "/orders/7",
        401,
        check=_challenge,
    ),
    Step(
        "a token without the role Orders.Write -> 403 insufficient_scope",
        "POST",
        "/orders",
        403,
        token=lambda s: s.mint(scp="Orders.Read"),
    ),
    Step(
        "an expired token -> 401 invalid_token",
        "GET",
        "/orders/7",
        401,
        token=lambda s: s.mint(scp="Orders.Read", lifetime=-600, iat_offset=-4200),
    ),
    Step(
        "a token for another API (audience api://inventory) -> 401 audience_mismatch",
        "GET",
        "/orders/7",
        401,
        token=lambda s: s.mint(scp="Orders.Read", aud="api://inventory"),
    ),
    Step(
        "forged x-user-id / x-roles with a valid token -> dropped, real identity set",
        "GET",
        "/orders/7",
        200,
        token=lambda s: s.mint(scp="Orders.Read"),
        headers=(("x-user-id", "attacker"), ("x-roles", "Admin")),
        check=_no_forgery,
    ),
    Step(
        "forged x-user-id on an anonymous route -> dropped",
        "GET",
        "/orders/healthz",
        200,
        headers=(("x-user-id", "attacker"), ("x-roles", "Admin")),
        check=_anonymous_clean,
    ),
    Step(
        "a partner-tenant (multi-tenant allowlist) app token -> allowed",
        "GET",
        "/orders/sync/run",
        200,
        token=lambda s: s.mint(
            tid=FABRIKAM, kind="app", roles=("Orders.Sync",), scp=None, client_id=CLIENT_APP
        ),
    ),
    Step(
        "the same user a 4th time within a minute on a route limited to 3 -> 429 rate_limited",
        "GET",
        "/orders/quota/today",
        429,
        token=lambda s: s.mint(scp="Orders.Read"),
        check=_rate_limited,
        before=3,
    ),
    Step(
        "path trick /orders/healthz/..%2f7 -> rejected before any rule runs",
        "GET",
        "/orders/healthz/..%2f7",
        400,
    ),
    Step(
        "a revoked user (rule added through the admin API) -> 401 token_revoked, cached or not",
        "GET",
        "/orders/7",
        401,
        token=_victim,
        setup=_revoke,
        check=_code("token_revoked"),
    ),
    Step(
        "the rule removed -> the same token is allowed again",
        "GET",
        "/orders/7",
        200,
        token=_victim,
        setup=_restore,
    ),
)


def run_tour(stack: Stack, out: Callable[[str], None] = print) -> bool:
    ok = True
    for i, step in enumerate(STEPS, 1):
        done = step.setup(stack) if step.setup is not None else ""
        token = step.token(stack)
        earlier = [
            stack.request(step.method, step.path, token=token, headers=list(step.headers)).status
            for _ in range(step.before)
        ]
        reply = stack.request(step.method, step.path, token=token, headers=list(step.headers))
        problem = None
        if any(status != 200 for status in earlier):
            problem = f"the {step.before} requests before were answered {earlier}, expected 200s"
        elif reply.status != step.expect:
            problem = f"expected {step.expect}, got {reply.status}"
        else:
            problem = step.check(reply)
        mark = "PASS" if problem is None else "FAIL"
        ok = ok and problem is None
        out(f"[{mark}] {i:2}. {step.title}")
        if step.before:
            out(f"         {step.before} x {step.method} {step.path} -> {earlier}")
        if done:
            out(f"         first: {done}")
        out(f"         {step.method} {step.path} -> {reply.status}")
        if reply.status == 200:
            ident = _identity(reply)
            out(f"         backend received: {ident or '(no identity headers)'}")
        else:
            www = reply.headers.get("www-authenticate")
            if www:
                out(f"         WWW-Authenticate: {www}")
            for name in ("retry-after", "ratelimit-policy", "ratelimit"):
                if name in reply.headers:
                    out(f"         {name}: {reply.headers[name]}")
            out(f"         body: {reply.body.decode(errors='replace')[:200]}")
        if problem:
            out(f"         problem: {problem}")
    return ok


def authz_command() -> str:
    """How the user's shell reaches *this* ``authz``: ``make demo`` runs ``.venv/bin/authz``,
    which is not on PATH unless the venv is activated, so the hint names it by its path."""
    beside = Path(sys.executable).parent / "authz"
    if not beside.exists() or shutil.which("authz") == str(beside):
        return "authz"
    try:
        return str(beside.relative_to(Path.cwd()))  # .venv/bin/authz from the repository
    except ValueError:
        return str(beside)


def _curl_examples(stack: Stack) -> str:
    user = stack.mint(scp="Orders.Read")
    app = stack.mint(kind="app", roles=("Orders.Read.All",), scp=None)
    writer = stack.mint(scp="Orders.Read", roles=("Orders.Write",))
    admin = stack.admin_token()
    u = stack.url
    rule = '{"oid":"' + REVOKED_OID + '","issued_before":"now","expires_in":600,"reason":"try it"}'
    return "\n".join(
        [
            "Try it (tokens are valid for one hour; new ones every 30 minutes):",
            f"  curl -si {u}/orders/7 -H 'Authorization: Bearer {user}'",
            f"  curl -si {u}/orders/7 -H 'Authorization: Bearer {app}'",
            f"  curl -si -X POST {u}/orders -H 'Authorization: Bearer {writer}'",
            f"  curl -si -X POST {u}/orders -H 'Authorization: Bearer {user}'   # 403",
            f"  curl -si {u}/orders/7                                            # 401",
            f"  curl -si {u}/orders/healthz -H 'x-user-id: attacker'             # dropped",
            f"Mint your own: {authz_command()} dev-idp mint --url {stack.idp.base_url}"
            " --scp Orders.Read",
            f"  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{{http_code}} ' {u}/orders/quota/x"
            f" -H 'Authorization: Bearer {user}'; done; echo   # 3 per minute, then 429",
            "Revoke a user (the admin API needs the app role; see docs/revocation.md):",
            f"  curl -si -X POST {stack.admin_url}/admin/revocations -H 'Authorization: Bearer "
            f"{admin}' -H 'content-type: application/json' -d '{rule}'",
            f"  {authz_command()} revoke list --url {stack.admin_url} --token {admin}",
            f"Metrics: curl -s http://127.0.0.1:{stack.ports['admin']}/metrics | grep authz_",
            "Press Ctrl-C to stop.",
        ]
    )


def main(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    print("Starting the dev IdP, redis-server, authz, Envoy and the echo backend on 127.0.0.1 ...")
    stack = Stack(workdir, redis=True)
    try:
        stack.start()
        print(f"Envoy listens on {stack.url}; authz logs in {workdir}\n")
        ok = run_tour(stack)
        print(f"\nTour: {'every step gave the expected answer' if ok else 'SOME STEPS FAILED'}")
        if args.once:
            return 0 if ok else 1
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        while not stop:
            print("\n" + _curl_examples(stack), flush=True)
            deadline = time.monotonic() + 1800
            while not stop and time.monotonic() < deadline:
                time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
