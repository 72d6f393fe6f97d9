"""The ``authz`` command: serve, check-config, explain, revoke, import-apim, dev-idp, echo, demo.

This module parses arguments and calls: ``serve`` runs ``authz.server.lifecycle.serve``. The dev
tools (``dev-idp``, ``echo``, ``demo``) are imported only when one of them is the command.

Exit codes: 0 success, 1 a check/tour failed, 2 bad configuration or usage.

No input makes a command print a traceback: a bad file, environment variable or argument, or a
port already in use, ends in one clear message and exit 2. ``check-config`` prints the message;
``serve`` logs it as one JSON line on stderr (what a log collector ingests), as it logs everything.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from authz import __version__, revocation_cli
from authz import config as config_mod

log = logging.getLogger("authz.cli")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(value: str) -> str:
    """``--log-level`` / ``AUTHZ_LOG_LEVEL``: a level name, any case."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(LOG_LEVELS)} (got {config_mod.short(value)})"
        )
    return level


def _load_or_exit(path: str, *, logged: bool = False) -> config_mod.Settings | None:
    try:
        settings = config_mod.load(path)
    except config_mod.ConfigError as e:
        if logged:
            log.error("%s; not starting", e)
        else:
            print(str(e), file=sys.stderr)
        return None
    for w in settings.warnings:
        if logged:
            log.warning("config: %s", w)
        else:
            print(f"warning: {w}", file=sys.stderr)
    return settings


def _revocation_problem(settings: config_mod.Settings) -> str:
    """Why the configured revocation file cannot be enforced, or "" (a missing file is fine:
    no rules yet; the first ``authz revoke add`` creates it)."""
    if not settings.revocation.file:
        return ""
    from authz.revocation import RevocationFileError, load_file  # noqa: PLC0415  (lazy: only a configured revocation file needs it)

    r = settings.revocation
    try:
        load_file(r.file, now=time.time(), max_lifetime_s=r.max_rule_lifetime_s)
    except RevocationFileError as e:
        return str(e)
    return ""


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load_or_exit(args.config)
    if settings is None:
        return 2
    problem = _revocation_problem(settings)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    routes = sum(len(a.routes) for a in settings.apis)
    print(
        f"{args.config}: OK ({len(settings.issuers)} issuer(s), {len(settings.apis)} API(s), "
        f"{routes} route(s), {len(settings.warnings)} warning(s))"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from authz.observability import configure_logging  # noqa: PLC0415  (lazy: prometheus_client loads for serve only)

    configure_logging(args.log_level, json_format=not args.plain_logs)
    settings = _load_or_exit(args.config, logged=True)
    if settings is None:
        return 2
    problem = _revocation_problem(settings)
    if problem:
        log.error("%s; not starting", problem)
        return 2
    from authz.server import lifecycle  # noqa: PLC0415  (lazy: grpc and the servers load for serve only)

    opts = lifecycle.ServeOptions(
        config_path=args.config,
        transport=args.transport,
        workers=args.workers,
        log_level=args.log_level,
        plain_logs=bool(args.plain_logs),
    )
    try:
        return lifecycle.serve(settings, opts)
    except (OSError, RuntimeError) as e:  # a port in use (grpc raises RuntimeError), no such host
        log.error("cannot start: %s", _bounded(e))
        return 2


def cmd_explain(args: argparse.Namespace) -> int:
    from authz import explain  # noqa: PLC0415  (lazy: loaded by explain only)

    settings = _load_or_exit(args.config)
    if settings is None:
        return 2
    return explain.main(settings, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from authz.dev import demo  # noqa: PLC0415  (lazy: keeps dev tools out of serve)

    return demo.main(args)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``authz`` parser for ``argv`` (default ``sys.argv[1:]``): the dev tools' parsers only
    when ``argv`` names one of them."""
    p = argparse.ArgumentParser(
        prog="authz", description="Envoy ext_authz service for Microsoft Entra ID access tokens."
    )
    p.add_argument("--version", action="version", version=f"entra-authz {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the authorization server")
    s.add_argument("--config", required=True, help="YAML configuration file")
    s.add_argument(
        "--transport",
        choices=("config", "grpc", "http", "both"),
        default="config",
        help="which ext_authz transports to serve (default: as configured)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes (default: server.workers; 0 = one per available CPU, cgroup-aware)",
    )
    s.add_argument(
        "--log-level",
        type=log_level,
        default=os.environ.get("AUTHZ_LOG_LEVEL", "INFO"),
        help=f"{', '.join(LOG_LEVELS)} (default: $AUTHZ_LOG_LEVEL or INFO)",
    )
    s.add_argument("--plain-logs", action="store_true", help="human-readable logs, not JSON")
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a configuration file and exit")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)

    e = sub.add_parser("explain", help="show every check made for one request")
    e.add_argument("--config", required=True)
    e.add_argument("--method", default="GET")
    e.add_argument("--path", required=True)
    e.add_argument("--host", default="")
    e.add_argument("--api", default="", help="as Envoy's context_extensions 'api'")
    e.add_argument("--token", default="", help="the access token, or - to read it from stdin")
    e.add_argument("--jwks", default="", help="a JWKS file to use instead of live discovery")
    e.add_argument(
        "--client-cert",
        default="",
        metavar="PEM",
        help="the client certificate the request comes with (certificate-bound tokens)",
    )
    e.set_defaults(func=cmd_explain)

    d = sub.add_parser("demo", help="run the end-to-end demo (dev-idp, authz, Envoy, echo)")
    d.add_argument("--once", action="store_true", help="run the tour and exit (0 = all passed)")
    d.set_defaults(func=cmd_demo)

    revocation_cli.register(sub)

    if _command(argv) == "import-apim":  # its XML parser is loaded for this command only
        from authz import apim_import  # noqa: PLC0415

        apim_import.register(sub, IMPORT_APIM_HELP)
    else:
        sub.add_parser("import-apim", help=IMPORT_APIM_HELP, add_help=False)

    if _command(argv) in DEV_COMMANDS:
        from authz.dev.idp import cli as devidp_cli  # noqa: PLC0415  (lazy: keeps dev tools out of serve)

        devidp_cli.register(sub)
    else:  # listed for --help only: any other command never imports the dev tools
        for name, summary in DEV_COMMANDS.items():
            sub.add_parser(name, help=summary, add_help=False)
    return p


IMPORT_APIM_HELP = "translate an Azure API Management policy into a config (stdout)"

# The dev tools' commands (``authz.dev.idp.cli`` defines their arguments). Their parsers are built
# only when one of them is the command, so ``serve`` never loads the dev IdP (tests/integration/
# test_cli_imports.py; the import graph's rule: tests/unit/test_import_graph.py).
DEV_COMMANDS = {
    "dev-idp": "local Entra-shaped issuer for development and tests (NOT FOR PRODUCTION)",
    "echo": "echo backend: answers every request with what it got",
}


def _command(argv: Sequence[str] | None) -> str:
    """The subcommand named in ``argv`` (the first word that is not an option), or ""."""
    words = sys.argv[1:] if argv is None else argv
    return next((w for w in words if not w.startswith("-")), "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the promise: no traceback for any input; one bounded message
        if logging.getLogger().handlers:  # `serve` configured JSON logging: stay one JSON line
            log.error("failed: %s: %s", type(e).__name__, _bounded(e))
        else:
            print(f"authz: error: {type(e).__name__}: {_bounded(e)}", file=sys.stderr)
        return 2


def _bounded(e: BaseException) -> str:
    text = str(e)
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
