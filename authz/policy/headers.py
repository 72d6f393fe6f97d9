"""The identity-header contract: which headers an allow sets on the upstream request, which it
removes, and how values are made safe to put in a header.

On EVERY allow (anonymous routes and dry-run included) every contract header we do not set is
removed, so a client can never smuggle identity to the backend: the seven standard headers, the
contract's ``also_strip`` names, the API's ``claim_headers`` names, the method-override headers
(``x-http-method-override``, ``x-method-override``, ``x-http-method``) unless the API sets
``strip_method_override: false``, and ``authorization`` unless the API sets
``forward_authorization``. A method override would make the backend run another method than the
one the route's rule was chosen for (a ``GET`` rule letting a ``DELETE`` through). Set headers
are overwritten, never appended (the transports render them with append=false and
OVERWRITE_IF_EXISTS_OR_ADD).

Values, with a principal:

    user_id -> oid         tenant_id -> tid       client_id -> azp/appid
    roles   -> roles in token order, comma-joined  scopes -> 'scp' verbatim (space-separated)
    token_kind -> "app" | "user"                   claim_headers -> the claim, stringified
    actor_kind -> "human" | "agent" | "app"        (docs/token-kinds.md)

A claim is stringified as: a string as-is; a list with its items comma-joined (strings as-is,
anything else as compact JSON); any other value as compact JSON (``true``, ``42``, ``{"a":1}``).
A missing or null claim, and any value that renders empty, sets no header: the header is removed.

Header-safety rule (applied to every value we set): the value is percent-encoded UTF-8 in which
only printable ASCII other than ``%`` appears literally. Concretely ``%``, control characters
(CR, LF, NUL, TAB, DEL, ...), non-ASCII characters, and leading or trailing spaces are written as
``%XX`` escapes; inside comma-joined lists a comma within an item is written ``%2C``. So
``urllib.parse.unquote`` on the value (after splitting lists on ``,``) returns exactly the claim,
GUIDs, role and scope names pass unchanged, and no value can break a header line.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from authz.policy.model import ApiSpec, HeaderContract, Principal

__all__ = ["METHOD_OVERRIDE_HEADERS", "HeaderPlan", "claim_header_value", "safe_header_value"]

AUTHORIZATION = "authorization"
# Headers some frameworks read as "the real method" (Express method-override, Rack, Symfony,
# ASP.NET Core, OData, Google APIs): removed on allow by default.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-method-override", "x-http-method")
_MEMO_MAX = 1024
_Rendered = tuple[tuple[tuple[str, str], ...], tuple[str, ...]]


def _escape_char(char: str) -> str:
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))


def safe_header_value(value: str, *, list_item: bool = False) -> str:
    """Apply the header-safety rule (module docstring) to one value or one list item."""
    if (
        value.isascii()
        and value.isprintable()
        and "%" not in value
        and not (list_item and "," in value)
        and not value.startswith(" ")
        and not value.endswith(" ")
    ):
        return value
    out = []
    last = len(value) - 1
    for i, char in enumerate(value):
        if char == " ":
            out.append("%20" if i in (0, last) else " ")
        elif "!" <= char <= "~" and char != "%" and not (list_item and char == ","):
            out.append(char)
        else:
            out.append(_escape_char(char))
    return "".join(out)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def claim_header_value(value: Any) -> str:
    """A claim value as a header value ("" when it renders empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return safe_header_value(value)
    if isinstance(value, list | tuple):
        items = (item if isinstance(item, str) else _json(item) for item in value)
        return ",".join(safe_header_value(item, list_item=True) for item in items)
    return safe_header_value(_json(value))


def _unique_lower(names: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.lower(), None)
    return tuple(seen)


class HeaderPlan:
    """The contract resolved for one API: computed once, applied on every allow."""

    __slots__ = ("_claims", "_memo", "_names", "_remove_all", "_standard", "strip_authorization")

    def __init__(self, api: ApiSpec | None, contract: HeaderContract) -> None:
        self._standard = tuple(name.lower() for name in contract.standard)
        claim_headers = api.claim_headers if api is not None else ()
        self._claims = tuple((header.lower(), claim) for header, claim in claim_headers)
        overrides = METHOD_OVERRIDE_HEADERS if api is None or api.strip_method_override else ()
        self._names = _unique_lower(
            [*self._standard, *contract.also_strip, *(h for h, _ in self._claims), *overrides]
        )
        self.strip_authorization = api is None or not api.forward_authorization
        self._remove_all = self._names + ((AUTHORIZATION,) if self.strip_authorization else ())
        # Rendered headers by principal identity: a cache whose key is request data (the verified
        # token), so it cannot be compiled ahead like the rest of the plan. Verified principals
        # come from the claims cache, so a token's repeat requests reuse one object; the entry
        # keeps it alive, so its id cannot be reused while cached. It lives (and dies) with the
        # plan, i.e. with the engine: a reload never sees the old configuration's renderings.
        # Full: the oldest entry goes, one per new one (not a clear() of all). With more users
        # than entries, a clear freed ~10 000 objects at once, while the collector's count of
        # young objects (allocations minus frees, never below zero) had counted every
        # allocation in between: a young collection every ~60 checks, a full one every ~6 000
        # (docs/performance.md, "Many users and the GC").
        self._memo: OrderedDict[int, tuple[Principal, _Rendered]] = OrderedDict()

    def render(self, principal: Principal | None) -> _Rendered:
        """``(headers to set, headers to remove)`` for one allow."""
        if principal is None:
            return (), self._remove_all
        entry = self._memo.get(id(principal))
        if entry is not None and entry[0] is principal:
            return entry[1]
        rendered = self._render(principal)
        memo = self._memo
        if len(memo) >= _MEMO_MAX:
            memo.popitem(last=False)
        memo[id(principal)] = (principal, rendered)
        return rendered

    def _render(self, principal: Principal) -> _Rendered:
        user_id, tenant_id, client_id, roles, scopes, token_kind, actor_kind = self._standard
        candidates = [
            (user_id, safe_header_value(principal.oid)),
            (tenant_id, safe_header_value(principal.tid)),
            (client_id, safe_header_value(principal.client_id)),
            (roles, ",".join(safe_header_value(r, list_item=True) for r in principal.roles_list)),
            (scopes, safe_header_value(principal.scp)),
            (token_kind, principal.kind.value),
            (actor_kind, principal.actor.value),
        ]
        claims = principal.claims
        for header, claim in self._claims:
            candidates.append((header, claim_header_value(claims.get(claim))))
        # Names are unique (config rejects a claim header named like a standard one); the dict
        # keeps the first-seen order.
        chosen: dict[str, str] = {}
        for name, value in candidates:
            if value:
                chosen[name] = value
            else:
                chosen.pop(name, None)
        remove = tuple(name for name in self._remove_all if name not in chosen)
        return tuple(chosen.items()), remove
