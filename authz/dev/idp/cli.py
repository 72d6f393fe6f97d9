"""``authz dev-idp serve|mint`` and ``authz echo``: command-line faces of the dev tools.

NOT FOR PRODUCTION: ``serve`` runs a fake Entra issuer that signs any token it is asked for.
``register`` is called by the main ``authz`` CLI; each parser sets ``func`` (Namespace -> int).

Must not import: the production packages (``authz.identity``, ``authz.server``, ...).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

import httpx

from authz.dev.echo import EchoServer
from authz.dev.idp.server import BANNER, CONTOSO, FABRIKAM, DevIdP

__all__ = ["cmd_echo", "cmd_mint", "cmd_serve", "register"]

_KNOWN_DOMAINS = {
    CONTOSO: "contoso.onmicrosoft.com",
    FABRIKAM: "fabrikam.onmicrosoft.com",
}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``dev-idp`` (``serve``, ``mint``) and ``echo`` to the ``authz`` command."""
    d = subparsers.add_parser(
        "dev-idp", help="local Entra-shaped issuer for development and tests (NOT FOR PRODUCTION)"
    )
    dsub = d.add_subparsers(dest="dev_idp_command", required=True)

    s = dsub.add_parser("serve", help="run the dev issuer until Ctrl-C / SIGTERM")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9400, help="port (default 9400; 0 = any)")
    s.add_argument(
        "--tenant",
        action="append",
        metavar="GUID",
        help=f"tenant id to serve; repeatable (default {CONTOSO} and {FABRIKAM})",
    )
    s.add_argument(
        "--domain",
        action="append",
        metavar="DOMAIN=GUID",
        help="domain alias for a tenant; repeatable (default: contoso/fabrikam.onmicrosoft.com)",
    )
    s.set_defaults(func=cmd_serve)

    m = dsub.add_parser("mint", help="ask a running dev issuer for a token; prints it")
    m.add_argument("--url", default="http://127.0.0.1:9400", help="the dev issuer's base URL")
    m.add_argument("--tenant", default=CONTOSO, metavar="GUID", help="tid (default contoso)")
    m.add_argument("--aud", default=None, help="audience (default api://orders)")
    m.add_argument("--scp", default=None, help="space-separated scopes (user tokens)")
    m.add_argument("--role", action="append", default=None, metavar="R", help="repeatable")
    m.add_argument("--group", action="append", default=None, metavar="GUID", help="repeatable")
    m.add_argument("--client-id", default=None, help="azp / appid")
    m.add_argument("--app", action="store_true", help="app-only token (client credentials)")
    m.add_argument("--v1", action="store_true", help="v1.0 token (sts.windows.net-style iss)")
    m.add_argument(
        "--agent",
        choices=("autonomous", "agent-user", "on-behalf-of"),
        default=None,
        help="an Entra Agent ID token (autonomous implies --app); docs/token-kinds.md",
    )
    m.add_argument(
        "--cnf-x5t",
        default=None,
        metavar="THUMBPRINT",
        help="bind the token to a client certificate (RFC 8705 cnf x5t#S256)",
    )
    m.add_argument("--lifetime", type=int, default=None, help="seconds (default 3600)")
    m.add_argument("--claims", action="store_true", help="also print the claims to stderr")
    m.set_defaults(func=cmd_mint)

    e = subparsers.add_parser("echo", help="echo backend: answers every request with what it got")
    e.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    e.add_argument("--port", type=int, default=9500, help="port (default 9500; 0 = any)")
    e.set_defaults(func=cmd_echo)


def _wait_for_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _parse_domains(values: list[str] | None, tenants: tuple[str, ...]) -> dict[str, str]:
    if values is None:
        return {d: t for t, d in _KNOWN_DOMAINS.items() if t in tenants}
    out: dict[str, str] = {}
    for value in values:
        domain, sep, tid = value.partition("=")
        if not sep or not domain or not tid:
            raise ValueError(f"--domain expects DOMAIN=GUID, not {value!r}")
        out[domain] = tid
    return out


def config_snippet(idp: DevIdP) -> str:
    """A config excerpt that trusts this dev issuer (what ``serve`` prints)."""
    lines = ["issuers:"]
    for i, tid in enumerate(idp.tenants):
        lines += [
            f"  - name: dev-tenant-{i + 1}",
            f'    instance: "{idp.base_url}"',
            f'    tenant: "{tid}"',
            '    versions: ["1.0", "2.0"]',
        ]
    return "\n".join(lines)


def cmd_serve(args: argparse.Namespace) -> int:
    tenants = tuple(args.tenant or (CONTOSO, FABRIKAM))
    try:
        domains = _parse_domains(args.domain, tenants)
        idp = DevIdP(host=args.host, port=args.port, tenants=tenants, domains=domains)
    except ValueError as exc:
        print(f"dev-idp: {exc}", file=sys.stderr)
        return 2
    print(BANNER, file=sys.stderr, flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"dev-idp: WARNING: bound to {args.host}, not loopback: anyone who can reach it "
            "can mint tokens.",
            file=sys.stderr,
        )
    try:
        idp.start()
    except OSError as exc:
        print(f"dev-idp: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        base = idp.base_url
        print(f"dev-idp listening on {base}  (NOT FOR PRODUCTION)")
        print(f"  v2 metadata: {base}/{tenants[0]}/v2.0/.well-known/openid-configuration")
        print(f"  mint:        authz dev-idp mint --url {base} --scp Orders.Read")
        print("\nExample config (set 'instance' to the dev issuer):\n")
        print(config_snippet(idp), flush=True)
        _wait_for_signal()
    finally:
        idp.stop()
    print("dev-idp stopped", file=sys.stderr)
    return 0


def cmd_mint(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"tid": args.tenant}
    if args.app or args.agent == "autonomous":
        body["kind"] = "app"
    if args.agent is not None:
        body["agent"] = args.agent
    if args.cnf_x5t is not None:
        body["cnf_x5t"] = args.cnf_x5t
    if args.v1:
        body["version"] = "1.0"
    if args.aud is not None:
        body["aud"] = args.aud
    if args.scp is not None:
        body["scp"] = args.scp
    if args.role is not None:
        body["roles"] = args.role
    if args.group is not None:
        body["groups"] = args.group
    if args.client_id is not None:
        body["client_id"] = args.client_id
    if args.lifetime is not None:
        body["lifetime"] = args.lifetime
    url = args.url.rstrip("/") + "/_dev/token"
    try:
        response = httpx.post(url, json=body, timeout=10)
    except httpx.HTTPError as exc:
        print(f"dev-idp mint: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"dev-idp mint: {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    token = str(response.json()["access_token"])
    print(token)
    if args.claims:
        import jwt  # noqa: PLC0415 - only for this display option

        claims = jwt.decode(token, options={"verify_signature": False})
        print(json.dumps(claims, indent=2), file=sys.stderr)
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    server = EchoServer(host=args.host, port=args.port)
    try:
        server.start()
    except OSError as exc:
        print(f"echo: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"echo backend listening on {server.url} (dev and tests only)", flush=True)
        _wait_for_signal()
    finally:
        server.stop()
    return 0
