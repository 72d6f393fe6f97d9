"""The revocation admin API on the admin listener, protected by an Entra token.

Every request's bearer token is decided by our own engine before anything else happens
(``Service.check_admin``: the API of ``revocation.admin_api`` -- its audiences and issuers, the
same verifier, keys and revocation rules as the checks -- and its app role). A request without
a valid token gets the engine's 401, one without the role its 403 (``missing_role``), with the
usual ``WWW-Authenticate`` challenge and JSON body: there is no unauthenticated endpoint that
changes anything, and none that lists anything either.

    GET    /admin/revocations        200 {"rules": [{...rule, "source": "file"}, ...]}
    GET    /admin/revocations/ID     200 {"rule": {...}}                    404 unknown id
    POST   /admin/revocations        201 {"rule": {...}}   body: a JSON rule (the file's fields;
                                     "id" optional, "expires_in" seconds instead of
                                     "expires_at", "issued_before": "now")
                                     400 invalid rule, 409 duplicate id or a bad file, 415
    DELETE /admin/revocations/ID     200 {"removed": {...}}                 404 unknown id

Bodies are at most ``revocation.admin_api.max_body_bytes`` (413 beyond), JSON in and out.
Changes go to the file source (persisted, atomic; other processes see them at their next poll,
this one at once). Every change, and every refused request, is audited with who asked (the
verified token's oid, tid and azp; never the token).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from authz.observability import audit_path
from authz.policy.model import Principal, RequestAttrs
from authz.revocation import (
    FileFeed,
    RevocationConflict,
    RevocationFileError,
    UnknownRule,
    new_rule,
)
from authz.service import ADMIN_API, Service
from authz.state.revocation_feed import RedisFeed, RedisUnavailable

log = logging.getLogger("authz.admin_api")

PREFIX = "/admin/revocations"
_JSON = ("content-type", "application/json")


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    target: str  # the request target as sent (path and query)
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class AdminResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (_JSON,)


def _json(status: int, doc: Any, extra: tuple[tuple[str, str], ...] = ()) -> AdminResponse:
    return AdminResponse(status, json.dumps(doc, separators=(",", ":")).encode(), (_JSON, *extra))


def _error(status: int, error: str, message: str, **more: Any) -> AdminResponse:
    return _json(status, {"error": error, "message": message, **more})


def _who(p: Principal | None) -> dict[str, str]:
    if p is None:
        return {}
    return {"oid": p.oid, "tid": p.tid, "azp": p.client_id, "kind": p.kind.value}


class RevocationApi:
    """``handle`` answers one admin API request; the listener (``AdminServer``) does HTTP."""

    def __init__(self, service: Service, *, clock: Callable[[], float] = time.time) -> None:
        self.service = service
        self._clock = clock

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    @property
    def max_body(self) -> int:
        return self.service.settings.revocation.admin_api.max_body_bytes

    async def handle(self, req: AdminRequest) -> AdminResponse:
        service = self.service
        if not service.admin_api_enabled:
            return _error(404, "not_found", "the admin API is not enabled (revocation.admin_api)")
        attrs = RequestAttrs(
            method=req.method,
            path=req.target,
            host=req.headers.get("host", ""),
            headers=req.headers,
            context={"api": ADMIN_API},
            request_id=req.headers.get("x-request-id", ""),
            source_address=req.peer,
        )
        decision = await service.check_admin(attrs)
        request_id = attrs.request_id
        if not decision.allowed:
            service.audit.event(
                "admin_api_denied",
                method=req.method[:16],
                path=audit_path(req.target),
                status=decision.status,
                code=decision.code,
                request_id=request_id,
                peer=req.peer,
                by=_who(decision.principal),
            )
            return AdminResponse(decision.status, decision.body, decision.response_headers)
        who = _who(decision.principal)
        path = req.target.split("?", 1)[0]
        rule_id = path[len(PREFIX) + 1 :] if path != PREFIX else ""
        try:
            if rule_id == "" and req.method in ("GET", "HEAD"):
                return self._list()
            if rule_id == "" and req.method == "POST":
                return await self._add(req, who, request_id)
            if rule_id and "/" not in rule_id and req.method in ("GET", "HEAD"):
                return self._get(rule_id)
            if rule_id and "/" not in rule_id and req.method == "DELETE":
                return await self._remove(rule_id, who, request_id)
        except RevocationConflict as e:
            return _error(409, "conflict", str(e))
        except RevocationFileError as e:
            # The file itself is bad: never overwritten; fix it first (check-config names it).
            return _error(409, "conflict", "the revocation file is invalid", problems=e.problems)
        except OSError as e:
            log.error("admin API: cannot write the revocation file: %s", e)
            return _error(503, "temporarily_unavailable", "cannot write the revocation file")
        except Exception:
            log.exception("admin API request failed")
            return _error(503, "internal_error", "unexpected error")
        if rule_id and "/" in rule_id:
            return _error(404, "not_found", "no such resource")
        allow = "GET, POST" if rule_id == "" else "GET, DELETE"
        return _json(
            405, {"error": "method_not_allowed", "message": f"use {allow}"}, (("allow", allow),)
        )

    def _rules(self) -> list[dict[str, Any]]:
        return [
            {**rule.to_dict(), "source": source}
            for source, rules in self.service.revocations.sources().items()
            for rule in rules
            if rule.expires_at > self._clock()
        ]

    def _list(self) -> AdminResponse:
        return _json(200, {"rules": self._rules()})

    def _get(self, rule_id: str) -> AdminResponse:
        found = [r for r in self._rules() if r["id"] == rule_id]
        if not found:
            return _error(404, "not_found", f"no rule with id {rule_id!r}")
        return _json(200, {"rule": found[0]})

    async def _add(self, req: AdminRequest, who: dict[str, str], request_id: str) -> AdminResponse:
        ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return _error(415, "unsupported_media_type", "send the rule as application/json")
        try:
            data = json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "invalid_request", "the body is not JSON")
        feed, source = self._writable()
        if feed is None:  # pragma: no cover - config requires a source when the API is enabled
            return _error(503, "temporarily_unavailable", "no writable revocation source")
        settings = self.service.settings.revocation
        by = f"admin_api:oid={who['oid']},tid={who['tid']},azp={who['azp']}"
        try:
            rule = new_rule(
                data, now=self._clock(), max_lifetime_s=settings.max_rule_lifetime_s, created_by=by
            )
        except RevocationFileError as e:
            return _error(400, "invalid_request", "invalid rule", problems=e.problems)
        try:
            await feed.add(rule, via="admin_api")
        except RedisUnavailable:
            return _error(503, "temporarily_unavailable", "redis did not take the rule; retry")
        self.service.audit.event(
            "revocation_added",
            via="admin_api",
            source=source,
            by=who,
            request_id=request_id,
            rule=rule.to_dict(),
        )
        return _json(201, {"rule": {**rule.to_dict(), "source": source}})

    async def _remove(self, rule_id: str, who: dict[str, str], request_id: str) -> AdminResponse:
        feed, source = self._writable()
        if feed is None:  # pragma: no cover - config requires a source when the API is enabled
            return _error(503, "temporarily_unavailable", "no writable revocation source")
        try:
            removed = await feed.remove(rule_id, via="admin_api")
        except UnknownRule:
            return _error(404, "not_found", f"no rule with id {rule_id!r} in the {source} source")
        except RedisUnavailable:
            return _error(503, "temporarily_unavailable", "redis did not take the change; retry")
        self.service.audit.event(
            "revocation_removed",
            via="admin_api",
            source=source,
            by=who,
            request_id=request_id,
            rule=removed.to_dict(),
        )
        return _json(200, {"removed": {**removed.to_dict(), "source": source}})

    def _writable(self) -> tuple[FileFeed | RedisFeed | None, str]:
        """Where the API writes: the shared Redis source when configured, else the file."""
        if self.service.revocation_redis is not None:
            return self.service.revocation_redis, "redis"
        return self.service.revocation_file, "file"
