"""Token revocation, the pure part: deny-list rules, their validation, an indexed immutable
snapshot of them, and the denial a revoked token gets.

Entra pushes no revocation events to custom APIs (critical-event CAE covers Microsoft's own
services only), so a stolen or revoked access token keeps working for its 60-90 minutes unless
the gateway denies it itself. A ``RevocationRule`` names one or more claims of the token
(``oid``, ``sub``, ``azp`` -- ``appid`` on v1 tokens: the client id the verifier extracted --,
``tid``, ``uti``, ``sid``); a token matches when every named claim equals the rule's value and,
when the rule sets ``issued_before``, the token's ``iat`` is earlier than that (what an admin
does after disabling an account or rotating an app secret: every token issued before now).
Every rule carries a reason and an expiry; an expired rule never matches, whatever snapshot
still holds it. No rule needs to outlive the longest token lifetime plus the clock skew, so the
lifetime of a rule is capped (``revocation.max_rule_lifetime_seconds``).

``RevocationSet`` is the immutable snapshot the engine reads, built from the rules of every
source (``authz.revocation.RevocationStore`` merges them and swaps snapshots). Each rule is filed
under one of the claims it names, the most selective one (uti, sid, oid, sub, azp, tid), so a
lookup is one dict probe per claim kind in use plus a full comparison of the few rules filed
under the token's own values: O(number of the token's claims), never O(rules).

The denial is 401 ``token_revoked``. A client that declared ``xms_cc`` ``cp1`` gets the CAE
claims challenge Microsoft's own resource providers send, base64 of
``{"access_token":{"nbf":{"essential":true,"value":"<T>"}}}``, when a newer token can pass
every matching rule (each has ``issued_before``, or names nothing but the token's ``uti``);
otherwise, and for every other client, a plain ``invalid_token``: a challenge no new token can
satisfy would only make the client loop.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from authz.policy.errors import ClaimsChallenge, Code, Unauthenticated
from authz.policy.model import GUID_RE, Principal

__all__ = [
    "DEFAULT_MAX_RULE_LIFETIME_S",
    "EMPTY",
    "MATCHERS",
    "RevocationRule",
    "RevocationSet",
    "RevocationView",
    "format_time",
    "nbf_claims",
    "revocation_denial",
    "rule_problems",
]

# Index priority: the most selective claim a rule names files it (a token id names one token, a
# session id one sign-in, an object id one user or service principal, a tenant id many).
MATCHERS: tuple[str, ...] = ("uti", "sid", "oid", "sub", "azp", "tid")
GUID_MATCHERS = frozenset({"oid", "azp", "tid"})  # Entra issues these as lower-case GUIDs

# 25 h. Entra access tokens live 60-90 minutes by default; a token-lifetime policy can stretch an
# access token to at most 1 day, and our clock skew adds at most 5 minutes (the claims cache never
# outlives exp + skew). A rule that lives 25 h therefore outlives every token it can match that
# was issued before it was made. (CAE's 28 h tokens are issued to CAE-capable Microsoft resources;
# raise the maximum if an API of yours receives such long-lived tokens.)
DEFAULT_MAX_RULE_LIFETIME_S = 90_000

RULE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
VALUE_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,256}")  # sub, uti, sid: base64url-ish or GUIDs
MAX_REASON_CHARS = 500
MAX_CREATED_BY_CHARS = 256
_CAN_ANSWER_CLAIMS_CHALLENGE = "cp1"


def format_time(epoch: int) -> str:
    """``2026-12-03T10:00:00Z``: how rule times are written (files, API, CLI, audit)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@dataclass(frozen=True, slots=True)
class RevocationRule:
    """One deny-list entry. Times are Unix seconds; ``issued_before`` 0 means "any token"."""

    id: str
    reason: str
    expires_at: int
    oid: str = ""
    sub: str = ""
    azp: str = ""  # the client id: 'azp' of v2 tokens, 'appid' of v1 tokens
    tid: str = ""
    uti: str = ""
    sid: str = ""
    issued_before: int = 0
    created_at: int = 0  # 0: unknown (a hand-written rule)
    created_by: str = ""  # who made it (the CLI's user, the admin API caller's oid/azp)

    @property
    def matchers(self) -> tuple[tuple[str, str], ...]:
        """The (claim, value) pairs the rule names, in index priority order."""
        return tuple((name, value) for name in MATCHERS if (value := getattr(self, name)))

    @property
    def challengeable(self) -> bool:
        """Can a token issued after this rule pass it? Then a cp1 client is sent a claims
        challenge (get a newer token); else a plain invalid_token."""
        return bool(self.issued_before) or (bool(self.uti) and len(self.matchers) == 1)

    def matches(self, p: Principal) -> bool:
        """Every named claim equals the token's, and the token predates ``issued_before``.
        Expiry is the caller's business (``RevocationSet.match``)."""
        if self.oid and self.oid != p.oid:
            return False
        if self.sub and self.sub != p.sub:
            return False
        if self.azp and self.azp != p.client_id:
            return False
        if self.tid and self.tid != p.tid:
            return False
        if self.uti and self.uti != p.uti:
            return False
        if self.sid and self.sid != _sid(p):
            return False
        if self.issued_before:
            iat = p.claims.get("iat")
            # iat is a verified integer claim; anything else cannot prove "issued after".
            if iat.__class__ is int and iat >= self.issued_before:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """The rule as files, the admin API and ``authz revoke list`` show it."""
        out: dict[str, Any] = {"id": self.id}
        out.update(self.matchers)
        if self.issued_before:
            out["issued_before"] = format_time(self.issued_before)
        out["reason"] = self.reason
        out["expires_at"] = format_time(self.expires_at)
        if self.created_at:
            out["created_at"] = format_time(self.created_at)
        if self.created_by:
            out["created_by"] = self.created_by
        return out


def _sid(p: Principal) -> str:
    sid = p.claims.get("sid")
    return sid if sid.__class__ is str else ""  # an odd-typed sid must not break the lookup


def rule_problems(
    rule: RevocationRule, *, now: float, max_lifetime_s: float
) -> list[tuple[str, str]]:
    """What is wrong with ``rule``, as (key, message) pairs; [] when it may be enforced.

    An already expired rule is not a problem here (a file outlives its rules: the loader drops
    expired ones); a rule that would outlive ``now + max_lifetime_s`` is."""
    out: list[tuple[str, str]] = []
    if not RULE_ID_RE.fullmatch(rule.id):
        out.append(
            (
                "id",
                "expected 1-128 letters, digits, '_', '.', ':' or '-', first a letter or digit",
            )
        )
    if not rule.matchers:
        out.append(("(rule)", f"name at least one of {', '.join(MATCHERS)} (or appid)"))
    for name, value in rule.matchers:
        if name in GUID_MATCHERS:
            if not GUID_RE.fullmatch(value):
                out.append((name, "expected a lower-case GUID like the token's claim"))
        elif not VALUE_RE.fullmatch(value):
            out.append((name, "expected 1-256 characters of A-Z a-z 0-9 . _ ~ + / = -"))
    if not rule.reason.strip():
        out.append(("reason", "required: say why (it is audited)"))
    elif len(rule.reason) > MAX_REASON_CHARS or not rule.reason.isprintable():
        out.append(("reason", f"at most {MAX_REASON_CHARS} printable characters"))
    if len(rule.created_by) > MAX_CREATED_BY_CHARS or not rule.created_by.isprintable():
        out.append(("created_by", f"at most {MAX_CREATED_BY_CHARS} printable characters"))
    if rule.expires_at > now + max_lifetime_s:
        out.append(
            (
                "expires_at",
                f"more than max_rule_lifetime_seconds ({int(max_lifetime_s)} s) from now: no "
                "rule needs to outlive the tokens it revokes",
            )
        )
    if rule.issued_before < 0 or rule.issued_before > rule.expires_at:
        out.append(("issued_before", "must not be later than expires_at"))
    if rule.created_at < 0:
        out.append(("created_at", "must not be negative"))
    return out


_NO_BOUND = 1 << 62  # a bucket holding a rule without issued_before: any iat may match

# (latest issued_before of the bucket's rules, or _NO_BOUND; the rules): a token issued at or
# after the bound passes every rule of the bucket, so the bucket costs one comparison.
_Bucket = tuple[int, tuple[RevocationRule, ...]]


class RevocationSet:
    """An immutable, indexed snapshot of rules. ``match`` is what the engine calls per check."""

    __slots__ = ("_azp", "_empty", "_oid", "_sid", "_sub", "_tid", "_uti", "next_expiry", "rules")

    def __init__(self, rules: Iterable[RevocationRule] = ()) -> None:
        self.rules: tuple[RevocationRule, ...] = tuple(rules)
        index: dict[str, dict[str, list[RevocationRule]]] = {name: {} for name in MATCHERS}
        for rule in self.rules:
            for name in MATCHERS:  # the first claim the rule names (validation demands one)
                value = getattr(rule, name)
                if value:
                    index[name].setdefault(value, []).append(rule)
                    break
        frozen: dict[str, dict[str, _Bucket]] = {
            name: {value: (_bound(found), tuple(found)) for value, found in index[name].items()}
            for name in MATCHERS
        }
        self._uti, self._sid, self._oid = frozen["uti"], frozen["sid"], frozen["oid"]
        self._sub, self._azp, self._tid = frozen["sub"], frozen["azp"], frozen["tid"]
        self._empty = not self.rules
        self.next_expiry = min((r.expires_at for r in self.rules), default=0)

    def __len__(self) -> int:
        return len(self.rules)

    def match(
        self, p: Principal, clock: Callable[[], float] = time.time
    ) -> tuple[RevocationRule, ...]:
        """The unexpired rules that revoke ``p``'s token; () when none does. The clock is read
        only when some rule matched (the common check never pays for it)."""
        if self._empty:
            return ()
        # One probe per claim kind in use, written out: this runs on every check.
        found: list[RevocationRule] | None = None
        if self._uti and (bucket := self._uti.get(p.uti)) is not None:
            found = _scan(bucket, p, found)
        if self._sid:
            sid = p.claims.get("sid")
            if sid.__class__ is str and (bucket := self._sid.get(sid)) is not None:
                found = _scan(bucket, p, found)
        if self._oid and (bucket := self._oid.get(p.oid)) is not None:
            found = _scan(bucket, p, found)
        if self._sub and (bucket := self._sub.get(p.sub)) is not None:
            found = _scan(bucket, p, found)
        if self._azp and (bucket := self._azp.get(p.client_id)) is not None:
            found = _scan(bucket, p, found)
        if self._tid and (bucket := self._tid.get(p.tid)) is not None:
            found = _scan(bucket, p, found)
        if found is None:
            return ()
        now = clock()
        return tuple(rule for rule in found if rule.expires_at > now)

    def probed(self) -> tuple[str, ...]:
        """The claim kinds a lookup probes (those some rule is filed under)."""
        return tuple(name for name in MATCHERS if getattr(self, "_" + name))

    def bucket(self, claim: str, value: str) -> tuple[RevocationRule, ...]:
        """The rules filed under (claim, value): what a token with that value is compared to."""
        entry: _Bucket | None = getattr(self, "_" + claim).get(value)
        return () if entry is None else entry[1]

    def live(self, now: float) -> RevocationSet:
        """This set without the rules expired by ``now`` (itself when none has)."""
        if not self.rules or self.next_expiry > now:
            return self
        return RevocationSet(r for r in self.rules if r.expires_at > now)


def _bound(rules: Sequence[RevocationRule]) -> int:
    if any(not r.issued_before for r in rules):
        return _NO_BOUND
    return max(r.issued_before for r in rules)


def _scan(
    bucket: _Bucket, p: Principal, found: list[RevocationRule] | None
) -> list[RevocationRule] | None:
    bound, rules = bucket
    if bound != _NO_BOUND:
        iat = p.claims.get("iat")
        if iat.__class__ is int and iat >= bound:
            return found  # issued after every rule of the bucket: none can match
    for rule in rules:
        if rule.matches(p):
            if found is None:
                found = []
            found.append(rule)
    return found


EMPTY = RevocationSet()


class RevocationView(Protocol):
    """What the engine reads: the current snapshot (``RevocationStore`` swaps it)."""

    @property
    def current(self) -> RevocationSet: ...


def nbf_claims(value: int) -> str:
    """The CAE claims request for a token not issued before ``value`` (minified JSON; the value
    is a string of Unix seconds, as Microsoft's resource providers send it)."""
    return json.dumps(
        {"access_token": {"nbf": {"essential": True, "value": str(value)}}},
        separators=(",", ":"),
    )


def revocation_denial(rules: Sequence[RevocationRule], p: Principal) -> Unauthenticated:
    """The 401 ``token_revoked`` for a token matched by ``rules`` (at least one)."""
    if _CAN_ANSWER_CLAIMS_CHALLENGE in p.client_capabilities and all(
        r.challengeable for r in rules
    ):
        iat = p.claims.get("iat")
        newer_than = (iat if iat.__class__ is int else 0) + 1
        value = max(newer_than, *(r.issued_before or r.created_at for r in rules))
        return ClaimsChallenge(Code.TOKEN_REVOKED, nbf_claims(value))
    return Unauthenticated(Code.TOKEN_REVOKED)
