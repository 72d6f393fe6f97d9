"""``authz revoke add|list|remove``: manage revocation rules in the file, or through the admin API.

Two ways to reach the rules, one flag each:

- ``--config FILE`` (the file named by its ``revocation.file``, with its maximum rule lifetime)
  or ``--file RULES`` (a rules file directly): the file is changed under a lock and replaced
  atomically; a running server picks it up at its next poll (``poll_interval_seconds``, 1 s) or
  on SIGHUP. The change is audited on stderr (who: the OS user and host) and again by every
  server that loads it. When that config sets ``revocation.redis: true``, ``--config`` works on
  the shared rules in its Redis instead (every replica polls them: in force everywhere within
  ``revocation.redis_poll_interval_seconds``).
- ``--url http://ADMIN`` with ``--token TOKEN`` (``-`` reads it from stdin; default
  ``$AUTHZ_ADMIN_TOKEN``): the admin API of a running server, which checks the token (the
  configured app role), writes its file and audits the caller.

Exit codes: 0 done, 1 refused (the server said no, a duplicate or unknown id), 2 bad usage or
configuration. Prints what it did; never prints a token.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from authz.policy.revocation import DEFAULT_MAX_RULE_LIFETIME_S, MATCHERS, RevocationRule

TOKEN_ENV = "AUTHZ_ADMIN_TOKEN"
_DURATION_RE = re.compile(r"([0-9]+)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> int:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` -> seconds."""
    m = _DURATION_RE.fullmatch(value.strip())
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 2h or 1d: {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def when(value: str) -> int | str:
    """``now``, Unix seconds, or an ISO 8601 time with a zone."""
    from authz.revocation import epoch  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    v = value.strip()
    if v == "now":
        return "now"
    try:
        return epoch(int(v) if v.isdigit() else v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(sub: Any) -> None:
    r = sub.add_parser("revoke", help="manage revocation rules (file or admin API)")
    rsub = r.add_subparsers(dest="revoke_command", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("--config", help="authz config: use its revocation.file")
        g.add_argument("--file", help="a revocation rules file (.json or YAML)")
        g.add_argument("--url", help="the admin listener of a running server, http://HOST:PORT")
        p.add_argument(
            "--token",
            default=None,
            help=f"with --url: the admin API token, - for stdin (default ${TOKEN_ENV})",
        )
        p.add_argument(
            "--max-lifetime",
            type=duration,
            default=DEFAULT_MAX_RULE_LIFETIME_S,
            help="with --file: the maximum rule lifetime (default 25h)",
        )

    a = rsub.add_parser("add", help="add a rule")
    target(a)
    for name in MATCHERS:
        a.add_argument(f"--{name}", default="", help=f"match the token's '{name}'")
    a.add_argument("--appid", default="", help="match the client id (same as --azp)")
    a.add_argument(
        "--issued-before", type=when, default=None, help="only tokens issued before: now|TIME"
    )
    exp = a.add_mutually_exclusive_group(required=True)
    exp.add_argument("--expires-in", type=duration, help="e.g. 2h (at most the maximum lifetime)")
    exp.add_argument("--expires-at", type=when, help="Unix seconds or ISO 8601 with a zone")
    a.add_argument("--reason", required=True, help="why (audited)")
    a.add_argument("--id", default=None, help="rule id (default: generated)")
    a.set_defaults(func=cmd_add)

    ls = rsub.add_parser("list", help="list the rules in force")
    target(ls)
    ls.add_argument("--json", action="store_true", help="one JSON document")
    ls.set_defaults(func=cmd_list)

    rm = rsub.add_parser("remove", help="remove a rule by id")
    target(rm)
    rm.add_argument("id")
    rm.set_defaults(func=cmd_remove)


# ----------------------------------------------------------------------------------- helpers


class _Usage(Exception):
    pass


def _settings(args: argparse.Namespace) -> Any:
    from authz import config as config_mod  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    try:
        return config_mod.load(args.config)
    except config_mod.ConfigError as e:
        raise _Usage(str(e)) from None


def _shared(args: argparse.Namespace) -> Any:
    """With --config whose ``revocation.redis`` is on: its settings (rules go to Redis)."""
    if not args.config:
        return None
    settings = _settings(args)
    return settings if settings.revocation.redis else None


def _on_redis(settings: Any, op: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``op(feed)`` against the shared Redis source named by ``settings``."""
    import asyncio  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    from authz.revocation import RevocationStore  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)
    from authz.state.redisconn import RedisLink  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)
    from authz.state.revocation_feed import RedisFeed, RedisUnavailable  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    async def run() -> Any:
        link = RedisLink(settings.redis)
        feed = RedisFeed(settings.revocation, RevocationStore(), link)
        try:
            await feed.refresh(force=True)
            if link.up is not True:
                raise RedisUnavailable(f"redis at {settings.redis.url} is not reachable")
            return await op(feed)
        finally:
            await link.close()

    try:
        return asyncio.run(run())
    except RedisUnavailable as e:
        raise _Refused(str(e)) from None


def _local(args: argparse.Namespace) -> tuple[str, float]:
    """(rules file, maximum rule lifetime) for --config / --file."""
    if args.config:
        settings = _settings(args)
        if not settings.revocation.file:
            raise _Usage(f"{args.config}: revocation.file is not set (no file to write)")
        return settings.revocation.file, settings.revocation.max_rule_lifetime_s
    return str(args.file), float(args.max_lifetime)


def _token(args: argparse.Namespace) -> str:
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV, "")
    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise _Usage(f"--url needs a token: --token TOKEN, --token - (stdin) or ${TOKEN_ENV}")
    return token


def _who() -> dict[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no passwd entry (some containers)
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname()}


def _audit(event: str, **fields: Any) -> None:
    from authz.observability import AuditLog  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    AuditLog(sys.stderr).event(event, via="cli", by=_who(), **fields)


def _api(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import httpx  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

    url = args.url.rstrip("/") + "/admin/revocations" + path
    headers = {"authorization": f"Bearer {_token(args)}"}
    try:
        r = httpx.request(method, url, json=body, headers=headers, timeout=10, trust_env=False)
    except httpx.HTTPError as e:
        raise _Usage(f"cannot reach {args.url}: {e}") from None
    try:
        doc = r.json()
    except ValueError:
        doc = {"error": r.text[:200]}
    if r.status_code >= 300:
        raise _Refused(f"{method} {url}: {r.status_code} {json.dumps(doc)}")
    return doc


class _Refused(Exception):
    pass


def _show(rule: dict[str, Any]) -> str:
    return json.dumps(rule, separators=(", ", ": "))


def _run(args: argparse.Namespace, body: Any) -> int:
    try:
        return int(body(args))
    except _Usage as e:
        print(f"authz revoke: {e}", file=sys.stderr)
        return 2
    except _Refused as e:
        print(f"authz revoke: refused: {e}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------- commands


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"reason": args.reason}
    if args.id:
        fields["id"] = args.id
    for name in (*MATCHERS, "appid"):
        if getattr(args, name):
            fields[name] = getattr(args, name)
    if args.issued_before is not None:
        fields["issued_before"] = args.issued_before
    if args.expires_in is not None:
        fields["expires_in"] = args.expires_in
    else:
        fields["expires_at"] = int(time.time()) if args.expires_at == "now" else args.expires_at
    return fields


def cmd_add(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        fields = _fields(args)
        if args.url:
            rule = _api(args, "POST", "", fields)["rule"]
            print(f"added rule {rule['id']} via {args.url}: {_show(rule)}")
            return 0
        from authz.revocation import (  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)
            FileSource,
            RevocationConflict,
            RevocationFileError,
            new_rule,
        )

        shared = _shared(args)
        if shared is not None:
            who = _who()
            try:
                made = new_rule(
                    fields,
                    now=time.time(),
                    max_lifetime_s=shared.revocation.max_rule_lifetime_s,
                    created_by=f"cli:{who['user']}@{who['host']}",
                )
            except RevocationFileError as e:
                raise _Usage(str(e)) from None
            _on_redis(shared, lambda feed: feed.add(made, via="cli"))
            _audit("revocation_added", source="redis", rule=made.to_dict())
            print(f"added rule {made.id} to redis: {_show(made.to_dict())}")
            return 0
        path, max_lifetime = _local(args)
        who = _who()
        try:
            made = new_rule(
                fields,
                now=time.time(),
                max_lifetime_s=max_lifetime,
                created_by=f"cli:{who['user']}@{who['host']}",
            )
            FileSource(path, max_lifetime_s=max_lifetime).add(made)
        except RevocationFileError as e:
            raise _Usage(str(e)) from None
        except RevocationConflict as e:
            raise _Refused(str(e)) from None
        _audit("revocation_added", source=f"file:{path}", rule=made.to_dict())
        print(f"added rule {made.id} to {path}: {_show(made.to_dict())}")
        return 0

    return _run(args, body)


def cmd_list(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        shared = None if args.url else _shared(args)
        if args.url:
            rules: list[dict[str, Any]] = _api(args, "GET", "")["rules"]
        elif shared is not None:

            async def listed(feed: Any) -> list[dict[str, Any]]:
                found = feed.store.sources().get("redis", ())
                return [{**r.to_dict(), "source": "redis"} for r in found]

            rules = _on_redis(shared, listed)
        else:
            from authz.revocation import RevocationFileError, load_file  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)

            path, max_lifetime = _local(args)
            try:
                found, _, _ = load_file(path, now=time.time(), max_lifetime_s=max_lifetime)
            except RevocationFileError as e:
                raise _Usage(str(e)) from None
            rules = [{**r.to_dict(), "source": "file"} for r in found]
        if args.json:
            print(json.dumps({"rules": rules}, indent=1))
        else:
            print(f"{len(rules)} rule(s) in force")
            for rule in rules:
                print(f"  {_show(rule)}")
        return 0

    return _run(args, body)


def cmd_remove(args: argparse.Namespace) -> int:
    def body(args: argparse.Namespace) -> int:
        if args.url:
            removed = _api(args, "DELETE", f"/{args.id}")["removed"]
            print(f"removed rule {removed['id']} via {args.url}: {_show(removed)}")
            return 0
        from authz.revocation import (  # noqa: PLC0415  (lazy: every command builds this parser; revoke alone loads it)
            FileSource,
            RevocationConflict,
            RevocationFileError,
        )

        shared = _shared(args)
        if shared is not None:
            try:
                gone_r: RevocationRule = _on_redis(
                    shared, lambda feed: feed.remove(args.id, via="cli")
                )
            except RevocationConflict as e:
                raise _Refused(str(e)) from None
            _audit("revocation_removed", source="redis", rule=gone_r.to_dict())
            print(f"removed rule {gone_r.id} from redis: {_show(gone_r.to_dict())}")
            return 0
        path, max_lifetime = _local(args)
        try:
            gone: RevocationRule = FileSource(path, max_lifetime_s=max_lifetime).remove(args.id)[0]
        except RevocationFileError as e:
            raise _Usage(str(e)) from None
        except RevocationConflict as e:
            raise _Refused(str(e)) from None
        _audit("revocation_removed", source=f"file:{path}", rule=gone.to_dict())
        print(f"removed rule {gone.id} from {path}: {_show(gone.to_dict())}")
        return 0

    return _run(args, body)
