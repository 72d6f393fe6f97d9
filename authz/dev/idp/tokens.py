"""Entra-shaped access-token claims and raw RS256 signing for the dev issuer.

``build_claims`` is pure (the caller passes ``now`` and the random parts come from ``secrets``);
``sign_jws`` signs exactly what it is given, so tests can build hostile tokens (odd headers,
duplicate JSON keys, a header ``alg`` that lies about the RS256 signature).

Must not import: the production packages (``authz.identity``, ``authz.server``, ...), network code.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from authz.dev.idp.keys import b64url

__all__ = [
    "AGENT_KINDS",
    "DEFAULT_AGENT_BLUEPRINT",
    "DEFAULT_APP_ROLES",
    "DEFAULT_AUD",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_USER_SCOPE",
    "UNSET",
    "Unset",
    "build_claims",
    "build_header",
    "sign_jws",
]

# Random namespace for the deterministic default object ids (uuid5), fixed so that tests can
# predict them across runs.
_OID_NAMESPACE: Final = uuid.UUID("6f1c6d7e-6b8e-4c0a-9d41-3f5e0e5a7d10")

DEFAULT_AUD: Final = "api://orders"
DEFAULT_CLIENT_ID: Final = "bbbbbbbb-0000-4000-8000-00000000000b"
DEFAULT_USER_SCOPE: Final = "Orders.Read"
DEFAULT_APP_ROLES: Final = ("Orders.Read.All",)

Kind = Literal["user", "app"]

# Entra Agent ID tokens (docs/token-kinds.md): how each kind of agent token is shaped. The
# blueprint id and facets follow Microsoft's sample ("agent token claims"); facets 11 (agent
# identity) and 13 (agent user) are the documented markers, 3 and 9 are copied from the sample.
DEFAULT_AGENT_BLUEPRINT: Final = "30cf4c22-9985-4ef7-8756-91cc888176bd"
AGENT_KINDS: Final = ("autonomous", "agent-user", "on-behalf-of")
_AGENT_FACETS: Final = {
    # an agent acting on its own: an app-only token (kind "app")
    "autonomous": {"xms_act_fct": "3 9 11", "xms_sub_fct": "9 3 11"},
    # an agent through its own user account: a user token, idtyp "user"
    "agent-user": {"idtyp": "user", "xms_act_fct": "11", "xms_sub_fct": "13"},
    # an agent acting for a person (delegated): the person is the subject
    "on-behalf-of": {"xms_act_fct": "11"},
}


class Unset(enum.Enum):
    """Sentinel type: 'use the default for this kind of token' (``None`` means 'omit')."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET


def _opaque(nbytes: int) -> str:
    return b64url(secrets.token_bytes(nbytes))


def default_oid(tid: str, kind: str, client_id: str) -> str:
    """Deterministic object id: the dev user of a tenant, or a client's service principal."""
    name = f"user:{tid}" if kind == "user" else f"app:{tid}:{client_id}"
    return str(uuid.uuid5(_OID_NAMESPACE, name))


def pairwise_sub(oid: str, client_id: str) -> str:
    """Entra's user ``sub`` is pairwise per application: derive one stably from oid + client."""
    return b64url(hashlib.sha256(f"{oid}|{client_id}".encode()).digest())


def build_claims(
    *,
    issuer: str,
    now: int,
    tid: str,
    version: str,
    aud: str,
    kind: str,
    scp: str | Unset | None,
    roles: Iterable[str] | Unset | None,
    groups: Iterable[str] | None,
    oid: str | None,
    sub: str | None,
    client_id: str,
    lifetime: int,
    nbf_offset: int,
    iat_offset: int,
    idtyp: str | Unset | None,
    username: str,
    extra: Mapping[str, Any] | None,
    remove: Iterable[str],
    agent: str | None = None,
    cnf_x5t: str | None = None,
) -> dict[str, Any]:
    """Claims as Entra issues them for ``version`` ("1.0" or "2.0") and ``kind`` ("user"/"app").

    ``agent`` (one of ``AGENT_KINDS``) adds Agent ID's claims: ``xms_par_app_azp`` and the facets;
    "autonomous" needs ``kind="app"``, the others ``kind="user"``. ``cnf_x5t`` binds the token to
    a certificate (RFC 8705: ``cnf = {"x5t#S256": cnf_x5t}``). ``extra`` is applied after the
    defaults (override or add anything); ``remove`` last.
    """
    if agent is not None:
        if agent not in AGENT_KINDS:
            raise ValueError(f"agent must be one of {AGENT_KINDS}, not {agent!r}")
        if (agent == "autonomous") != (kind == "app"):
            raise ValueError("an autonomous agent token is app-only; the other kinds are 'user'")
    if version not in ("1.0", "2.0"):
        raise ValueError(f"version must be '1.0' or '2.0', not {version!r}")
    if kind not in ("user", "app"):
        raise ValueError(f"kind must be 'user' or 'app', not {kind!r}")
    is_app = kind == "app"
    the_oid = oid if oid is not None else default_oid(tid, kind, client_id)
    the_sub = sub if sub is not None else (the_oid if is_app else pairwise_sub(the_oid, client_id))
    claims: dict[str, Any] = {
        "aud": aud,
        "iss": issuer,
        "iat": now + iat_offset,
        "nbf": now + nbf_offset,
        "exp": now + lifetime,
    }
    if version == "1.0" and not is_app:
        claims["acr"] = "1"
    claims["aio"] = _opaque(48)
    if version == "1.0":
        if not is_app:
            claims["amr"] = ["pwd"]
        claims["appid"] = client_id
        claims["appidacr"] = "1" if is_app else "0"
    else:
        claims["azp"] = client_id
        claims["azpacr"] = "1" if is_app else "0"
    if groups is not None:
        claims["groups"] = list(groups)
    the_idtyp = ("app" if is_app else None) if isinstance(idtyp, Unset) else idtyp
    if the_idtyp is not None:
        claims["idtyp"] = the_idtyp
    if not is_app:
        claims["name"] = "Dev User"
    claims["oid"] = the_oid
    if not is_app and version == "2.0":
        claims["preferred_username"] = username
    claims["rh"] = f"1.{_opaque(60)}."
    the_roles = (DEFAULT_APP_ROLES if is_app else None) if isinstance(roles, Unset) else roles
    if the_roles is not None:
        claims["roles"] = list(the_roles)
    the_scp = (None if is_app else DEFAULT_USER_SCOPE) if isinstance(scp, Unset) else scp
    if the_scp is not None:
        claims["scp"] = the_scp
    claims["sub"] = the_sub
    claims["tid"] = tid
    if not is_app and version == "1.0":
        claims["unique_name"] = username
        claims["upn"] = username
    claims["uti"] = _opaque(16)
    claims["ver"] = version
    if agent is not None:
        claims["xms_par_app_azp"] = DEFAULT_AGENT_BLUEPRINT
        claims.update(_AGENT_FACETS[agent])
    if cnf_x5t is not None:
        claims["cnf"] = {"x5t#S256": cnf_x5t}
    if extra:
        claims.update(extra)
    for name in remove:
        claims.pop(name, None)
    return claims


def build_header(
    *,
    kid: str,
    version: str,
    header_extra: Mapping[str, Any] | None,
    header_remove: Iterable[str],
) -> dict[str, Any]:
    """``typ``/``alg``/``kid`` (plus ``x5t`` on v1 tokens, as Entra does), then the overrides."""
    header: dict[str, Any] = {"typ": "JWT", "alg": "RS256"}
    if version == "1.0":
        header["x5t"] = kid
    header["kid"] = kid
    if header_extra:
        header.update(header_extra)
    for name in header_remove:
        header.pop(name, None)
    return header


def _segment(part: Mapping[str, Any] | bytes) -> str:
    if isinstance(part, bytes):
        return b64url(part)
    return b64url(json.dumps(part, separators=(",", ":")).encode())


def sign_jws(
    private_key: rsa.RSAPrivateKey,
    header: Mapping[str, Any] | bytes,
    payload: Mapping[str, Any] | bytes,
) -> str:
    """Compact JWS signed with RS256, whatever the header says. Bytes are used verbatim."""
    signing_input = f"{_segment(header)}.{_segment(payload)}".encode("ascii")
    signature = private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"
