"""``DevIdP``: a local issuer shaped like Microsoft Entra ID, for development, demos and tests.

Size: one dev tool: every Entra path it imitates plus its /_dev controls.

NOT FOR PRODUCTION. It mints whatever token anyone asks for over ``POST /_dev/token``.

It serves Entra's paths for every configured tenant GUID, each domain alias, and
``common``/``organizations``/``consumers``::

    GET  /{tenant}/v2.0/.well-known/openid-configuration   v2 metadata (issuer {base}/{tid}/v2.0)
    GET  /{tenant}/.well-known/openid-configuration        v1 metadata (issuer {base}/sts/{tid}/)
    GET  /{tenant}/discovery/v2.0/keys                     v2 JWKS (keys carry ``issuer``)
    GET  /{tenant}/discovery/keys                          v1 JWKS (no ``issuer``)
    POST /_dev/token | /_dev/rotate | /_dev/retire | /_dev/outage | /_dev/garbled | /_dev/reset
    GET  /_dev/stats

``delete_tenant(tid)`` makes a tenant answer like a deleted one (400 ``invalid_tenant`` on every
document); ``restore_tenant(tid)`` undoes it.

Test hook (Python API only, off by default): ``hold_jwks()`` makes every JWKS request wait until
``release_jwks()``, so a test can hold a key refresh — and the checks awaiting it — in flight for
exactly as long as it wants (``wait_jwks_held()`` tells it the request has arrived).

Keys are RSA 2048, generated in memory when a ``DevIdP`` is built; nothing is written to disk.
Key state, failure switches and request counters sit behind one lock (the server is threaded).

Must not import: the production packages (``authz.identity``, ``authz.server``, ...). Production
code must never import this package.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import rsa

from authz.dev.idp._http import BackgroundHTTPServer, JSONHandler
from authz.dev.idp.keys import SigningKey, generate_signing_key
from authz.dev.idp.tokens import (
    DEFAULT_AUD,
    DEFAULT_CLIENT_ID,
    UNSET,
    Unset,
    build_claims,
    build_header,
    sign_jws,
)
from authz.policy.model import CONSUMERS, GUID_RE, MULTI_TENANT

__all__ = [
    "BANNER",
    "CONTOSO",
    "FABRIKAM",
    "MSA_TENANT",
    "DevIdP",
]

_log = logging.getLogger("authz.dev.idp")

CONTOSO: Final = "11111111-1111-4111-8111-111111111111"
FABRIKAM: Final = "22222222-2222-4222-8222-222222222222"
# The Microsoft-account (consumer) tenant: its key's v2 'issuer' is concrete, not templated.
MSA_TENANT: Final = "9188040d-6c67-4c5b-b112-36a304b66dad"

TENANT_TEMPLATE: Final = "{tenantid}"

BANNER: Final = (
    "\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    "!!  authz dev-idp: a FAKE Entra ID issuer. NOT FOR PRODUCTION.                !!\n"
    "!!  Anyone who can reach it can mint any token it signs (POST /_dev/token).   !!\n"
    "!!  Never point a production config's 'instance' at it.                       !!\n"
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
)

_GARBLED_DEFAULT: Final = b'{"keys": [{"kty": "RSA", "kid": '  # truncated: not JSON
# A held JWKS request is answered after this long even if nobody releases it (a forgotten hold
# must not hang the server's stop forever).
_HOLD_MAX_S: Final = 60.0

_MINT_PARAMS: Final = frozenset(
    {
        "tid",
        "version",
        "aud",
        "kind",
        "scp",
        "roles",
        "groups",
        "oid",
        "sub",
        "client_id",
        "lifetime",
        "nbf_offset",
        "iat_offset",
        "kid",
        "idtyp",
        "extra",
        "remove",
        "header_extra",
        "header_remove",
        "agent",
        "cnf_x5t",
    }
)


class _Resolved:
    """A ``{tenant}`` path segment resolved: the segment used in URLs and the tid (or template)."""

    __slots__ = ("segment", "tid")

    def __init__(self, segment: str, tid: str) -> None:
        self.segment = segment
        self.tid = tid


class DevIdP:
    """A local, Entra-shaped issuer. ``start()`` it, point the ``instance`` at ``base_url``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tenants: Iterable[str] = (CONTOSO, FABRIKAM),
        domains: Mapping[str, str] | None = None,
    ) -> None:
        self._tenants = tuple(t.lower() for t in tenants)
        for tid in self._tenants:
            if not GUID_RE.fullmatch(tid):
                raise ValueError(f"tenant must be a GUID, not {tid!r}")
        self._domains = {d.lower(): t.lower() for d, t in (domains or {}).items()}
        for domain, tid in self._domains.items():
            if tid not in self._tenants and tid != MSA_TENANT:
                raise ValueError(f"domain {domain!r} maps to unconfigured tenant {tid!r}")
        self._lock = threading.RLock()
        first = generate_signing_key()
        msa = generate_signing_key(owner_tid=MSA_TENANT)
        self._all_keys: dict[str, SigningKey] = {first.kid: first, msa.kid: msa}
        self._published: list[str] = [first.kid]  # tenant keys, in publication order
        self._active = first.kid
        self._msa_kid = msa.kid
        self._outage = False
        self._garbled: bytes | None = None
        self._deleted: set[str] = set()
        self._counts: Counter[str] = Counter()
        # hold_jwks(): the gate JWKS requests wait on (None: answer at once), and how many wait.
        self._jwks_gate: threading.Event | None = None
        self._jwks_waiting = 0
        self._jwks_changed = threading.Condition(self._lock)
        handler = type("DevIdPHandler", (_DevIdPHandler,), {"idp": self})
        self._http = BackgroundHTTPServer(host, port, handler)
        self._base_url: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind and serve in a background thread. Returns ``self``."""
        self._http.start(name="dev-idp")
        host = self._http.host
        shown = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{shown}:{self._http.port}"
        _log.warning("dev-idp NOT FOR PRODUCTION: fake Entra issuer at %s", self._base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Safe to call twice. Releases held JWKS."""
        self.release_jwks()
        self._http.stop()

    def __enter__(self) -> Self:
        if self._base_url is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: what a config's ``instance`` should say."""
        if self._base_url is None:
            raise RuntimeError("DevIdP is not started")
        return self._base_url

    @property
    def tenants(self) -> tuple[str, ...]:
        return self._tenants

    # -- issuers and tokens ------------------------------------------------------------------

    def issuer(self, tid: str, version: str = "2.0") -> str:
        """v2: ``{base}/{tid}/v2.0``; v1: ``{base}/sts/{tid}/``.

        The v1 form keeps the trailing slash of ``https://sts.windows.net/{tid}/``.
        ``tid`` may be the template ``{tenantid}``.
        """
        if version == "2.0":
            return f"{self.base_url}/{tid}/v2.0"
        if version == "1.0":
            return f"{self.base_url}/sts/{tid}/"
        raise ValueError(f"version must be '1.0' or '2.0', not {version!r}")

    def mint(
        self,
        *,
        tid: str = CONTOSO,
        version: str = "2.0",
        aud: str = DEFAULT_AUD,
        kind: str = "user",
        scp: str | Unset | None = UNSET,
        roles: Iterable[str] | Unset | None = UNSET,
        groups: Iterable[str] | None = None,
        oid: str | None = None,
        sub: str | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        lifetime: int = 3600,
        nbf_offset: int = 0,
        iat_offset: int = 0,
        kid: str | None = None,
        idtyp: str | Unset | None = UNSET,
        extra: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        header_extra: Mapping[str, Any] | None = None,
        header_remove: Iterable[str] = (),
        agent: str | None = None,
        cnf_x5t: str | None = None,
    ) -> str:
        """A signed access token shaped like Entra's.

        ``agent`` ("autonomous" with ``kind="app"``; "agent-user" or "on-behalf-of" with
        ``kind="user"``) mints an Entra Agent ID token; ``cnf_x5t`` a certificate-bound one.

        Defaults: user tokens get ``scp="Orders.Read"`` and no ``roles``; app tokens get
        ``roles=["Orders.Read.All"]``, no ``scp``, ``idtyp="app"`` and ``sub == oid``. Pass
        ``None`` to omit ``scp``/``roles``/``idtyp``. ``iat = now + iat_offset``,
        ``nbf = now + nbf_offset``, ``exp = now + lifetime``. ``kid`` picks the signing key
        (default: the active key, or the MSA key when ``tid == MSA_TENANT``); to put a kid in the
        header that differs from the signer, use ``header_extra={"kid": ...}``.
        """
        if kid is None and tid.lower() == MSA_TENANT:
            kid = self._msa_kid
        key = self._key(kid)
        claims = build_claims(
            issuer=self.issuer(tid, version),
            now=int(time.time()),
            tid=tid,
            version=version,
            aud=aud,
            kind=kind,
            scp=scp,
            roles=roles,
            groups=groups,
            oid=oid,
            sub=sub,
            client_id=client_id,
            lifetime=lifetime,
            nbf_offset=nbf_offset,
            iat_offset=iat_offset,
            idtyp=idtyp,
            username=self._username(tid),
            extra=extra,
            remove=remove,
            agent=agent,
            cnf_x5t=cnf_x5t,
        )
        header = build_header(
            kid=key.kid, version=version, header_extra=header_extra, header_remove=header_remove
        )
        return sign_jws(key.private_key, header, claims)

    def sign(
        self,
        header: Mapping[str, Any] | bytes,
        payload: Mapping[str, Any] | bytes,
        kid: str | None = None,
    ) -> str:
        """Raw RS256 signature over exactly this header and payload (bytes used verbatim).

        The header is not touched: add ``kid`` yourself. ``kid`` here only picks the signer.
        """
        return sign_jws(self._key(kid).private_key, header, payload)

    # -- keys --------------------------------------------------------------------------------

    @property
    def active_kid(self) -> str:
        with self._lock:
            return self._active

    @property
    def msa_kid(self) -> str:
        """The key owned by the MSA tenant (its v2 ``issuer`` is concrete)."""
        return self._msa_kid

    @property
    def kids(self) -> tuple[str, ...]:
        """Every kid the JWKS endpoints publish now (tenant keys in order, then the MSA key)."""
        with self._lock:
            return (*self._published, self._msa_kid)

    def private_key(self, kid: str | None = None) -> rsa.RSAPrivateKey:
        """The private key for ``kid`` (default: the active signer), published or not."""
        return self._key(kid).private_key

    def public_jwk(self, kid: str | None = None) -> dict[str, Any]:
        """The public JWK for ``kid`` (default: active) in Entra's v1 shape (no ``issuer``)."""
        return self._key(kid).public_jwk()

    def rotate(self) -> str:
        """Generate a key, publish it and make it the active signer; the old key stays published."""
        new = generate_signing_key()
        with self._lock:
            self._all_keys[new.kid] = new
            self._published.append(new.kid)
            self._active = new.kid
        return new.kid

    def retire(self, kid: str) -> None:
        """Stop publishing ``kid``. Retiring the active key leaves it signing (tokens then fail)."""
        with self._lock:
            if kid == self._msa_kid:
                raise KeyError("the MSA key cannot be retired")
            if kid not in self._published:
                raise KeyError(f"kid {kid!r} is not published")
            self._published.remove(kid)

    def _key(self, kid: str | None) -> SigningKey:
        with self._lock:
            the_kid = self._active if kid is None else kid
            try:
                return self._all_keys[the_kid]
            except KeyError:
                raise KeyError(f"no signing key with kid {the_kid!r}") from None

    def _username(self, tid: str) -> str:
        domain = next((d for d, t in self._domains.items() if t == tid.lower()), None)
        return f"dev.user@{domain or tid.lower() + '.dev-idp.invalid'}"

    # -- failure switches and counters -------------------------------------------------------

    def set_outage(self, on: bool) -> None:
        """While on, every discovery and JWKS endpoint answers 503."""
        with self._lock:
            self._outage = on

    def delete_tenant(self, tid: str) -> None:
        """From now on ``tid`` is answered as Entra answers a deleted tenant: 400
        ``invalid_tenant`` (AADSTS90002) for its discovery documents and JWKS."""
        with self._lock:
            self._deleted.add(tid.lower())

    def restore_tenant(self, tid: str) -> None:
        with self._lock:
            self._deleted.discard(tid.lower())

    def set_garbled(self, on: bool, body: bytes | None = None) -> None:
        """While on, JWKS endpoints answer 200 with ``body`` (default: truncated, not JSON)."""
        with self._lock:
            self._garbled = (body if body is not None else _GARBLED_DEFAULT) if on else None

    def hold_jwks(self) -> None:
        """Test hook: from now on every JWKS request waits (unanswered) until ``release_jwks``.

        Discovery documents are still answered at once. Off by default; a held request is
        answered anyway after 60 s, and ``stop()`` releases every held request.
        """
        with self._lock:
            if self._jwks_gate is None:
                self._jwks_gate = threading.Event()

    def release_jwks(self) -> None:
        """Answer every held JWKS request now (with the keys published now); stop holding."""
        with self._lock:
            gate, self._jwks_gate = self._jwks_gate, None
        if gate is not None:
            gate.set()

    @property
    def jwks_held(self) -> int:
        """JWKS requests received and waiting for ``release_jwks``."""
        with self._lock:
            return self._jwks_waiting

    def wait_jwks_held(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until at least ``count`` JWKS requests are held; False on timeout."""
        with self._jwks_changed:
            return self._jwks_changed.wait_for(lambda: self._jwks_waiting >= count, timeout)

    def _hold_jwks_request(self) -> None:
        """Called by the handler on a JWKS request: wait while a hold is on."""
        with self._lock:
            gate = self._jwks_gate
            if gate is None:
                return
            self._jwks_waiting += 1
            self._jwks_changed.notify_all()
        try:
            if not gate.wait(_HOLD_MAX_S):
                _log.warning("dev-idp: JWKS request held %.0f s, answering it", _HOLD_MAX_S)
        finally:
            with self._lock:
                self._jwks_waiting -= 1
                self._jwks_changed.notify_all()

    def request_count(self, path_contains: str = "") -> int:
        """Requests received whose path (without query) contains ``path_contains``."""
        with self._lock:
            return sum(n for path, n in self._counts.items() if path_contains in path)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": dict(self._counts),
                "active_kid": self._active,
                "kids": [*self._published, self._msa_kid],
                "msa_kid": self._msa_kid,
                "outage": self._outage,
                "garbled": self._garbled is not None,
                "jwks_held": self._jwks_waiting,
            }

    # -- documents ---------------------------------------------------------------------------

    def _resolve(self, segment: str) -> _Resolved | None:
        low = segment.lower()
        with self._lock:
            if low in self._deleted or self._domains.get(low) in self._deleted:
                return None
        if low in MULTI_TENANT:
            return _Resolved(low, TENANT_TEMPLATE)
        if low == CONSUMERS:
            return _Resolved(low, MSA_TENANT)
        if low in self._tenants or low == MSA_TENANT:
            return _Resolved(low, low)
        if low in self._domains:
            # Entra answers a domain lookup with the tenant's GUID in every URL.
            tid = self._domains[low]
            return _Resolved(tid, tid)
        return None

    def openid_configuration(self, segment: str, version: str) -> dict[str, Any] | None:
        """The metadata document Entra serves for ``/{segment}``, or ``None`` if unknown."""
        res = self._resolve(segment)
        if res is None:
            return None
        base = self.base_url
        t = res.segment
        if version == "2.0":
            oauth = f"{base}/{t}/oauth2/v2.0"
            jwks_uri = f"{base}/{t}/discovery/v2.0/keys"
        else:
            oauth = f"{base}/{t}/oauth2"
            jwks_uri = f"{base}/{t}/discovery/keys"
        doc: dict[str, Any] = {
            "token_endpoint": f"{oauth}/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": jwks_uri,
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": self.issuer(res.tid, version),
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{oauth}/authorize",
            "device_authorization_endpoint": f"{oauth}/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{oauth}/logout",
            "claims_supported": [
                "sub",
                "iss",
                "cloud_instance_name",
                "cloud_instance_host_name",
                "cloud_graph_host_name",
                "msgraph_host",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "acr",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "at_hash",
                "c_hash",
                "email",
            ],
            "kerberos_endpoint": f"{base}/{t}/kerberos",
            "tenant_region_scope": None if res.tid == TENANT_TEMPLATE else "WW",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        if version == "1.0":
            doc["microsoft_multi_refresh_token"] = True
            doc["check_session_iframe"] = f"{oauth}/checksession"
        return doc

    def jwks(self, segment: str, version: str) -> dict[str, Any] | None:
        """The JWKS Entra serves for ``/{segment}``; v2 keys carry ``issuer``."""
        res = self._resolve(segment)
        if res is None:
            return None
        with self._lock:
            keys = [self._all_keys[k] for k in (*self._published, self._msa_kid)]
        out = []
        for key in keys:
            jwk = key.public_jwk()
            if version == "2.0":
                jwk["issuer"] = self.issuer(key.owner_tid or res.tid, "2.0")
            out.append(jwk)
        return {"keys": out}

    def _count(self, path: str) -> None:
        with self._lock:
            self._counts[path] += 1

    def _failure_mode(self) -> tuple[bool, bytes | None]:
        with self._lock:
            return self._outage, self._garbled


def _tenant_error(segment: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
    return {
        "error": "invalid_tenant",
        "error_description": (
            f"AADSTS90002: Tenant '{segment}' not found. Check to make sure you have the correct "
            "tenant ID and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant. "
            f"Trace ID: {trace} Correlation ID: {corr} Timestamp: {now}"
        ),
        "error_codes": [90002],
        "timestamp": now,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": "https://login.microsoftonline.com/error?code=90002",
    }


class _BadRequest(Exception):
    pass


def _mint_kwargs(body: bytes) -> dict[str, Any]:
    """``POST /_dev/token`` JSON body -> ``DevIdP.mint`` keyword arguments (absent = default)."""
    doc = json.loads(body or b"{}")
    if not isinstance(doc, dict):
        raise _BadRequest("body must be a JSON object")
    unknown = sorted(set(doc) - _MINT_PARAMS)
    if unknown:
        raise _BadRequest(f"unknown parameters: {', '.join(unknown)}")
    for name in ("roles", "groups", "remove", "header_remove"):
        value = doc.get(name)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise _BadRequest(f"{name} must be a list of strings")
    for name in ("extra", "header_extra"):
        if doc.get(name) is not None and not isinstance(doc[name], dict):
            raise _BadRequest(f"{name} must be an object")
    for name in ("lifetime", "nbf_offset", "iat_offset"):
        if name in doc and (not isinstance(doc[name], int) or isinstance(doc[name], bool)):
            raise _BadRequest(f"{name} must be an integer")
    for name in ("tid", "version", "aud", "kind", "client_id", "agent", "cnf_x5t"):
        if name in doc and not isinstance(doc[name], str):
            raise _BadRequest(f"{name} must be a string")
    for name in ("remove", "header_remove"):
        if doc.get(name) is None:
            doc.pop(name, None)
    return doc


class _DevIdPHandler(JSONHandler):
    idp: DevIdP

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.idp._count(path)
        if path == "/_dev/stats":
            self.send_json(200, self.idp.stats())
            return
        parts = path.strip("/").split("/")
        route: tuple[str, str] | None = None
        if len(parts) >= 2:
            tail = "/".join(parts[1:])
            route = {
                "v2.0/.well-known/openid-configuration": ("meta", "2.0"),
                ".well-known/openid-configuration": ("meta", "1.0"),
                "discovery/v2.0/keys": ("keys", "2.0"),
                "discovery/keys": ("keys", "1.0"),
            }.get(tail)
        if route is None:
            self.send_json(404, {"error": "not_found", "error_description": f"no route {path}"})
            return
        if route[0] == "keys":
            self.idp._hold_jwks_request()
        outage, garbled = self.idp._failure_mode()
        if outage:
            self.send_json(503, {"error": "temporarily_unavailable"}, {"Retry-After": "1"})
            return
        what, version = route
        if what == "keys" and garbled is not None:
            self.send_bytes(200, garbled)
            return
        if what == "meta":
            doc = self.idp.openid_configuration(parts[0], version)
        else:
            doc = self.idp.jwks(parts[0], version)
        if doc is None:
            self.send_json(400, _tenant_error(parts[0]))
            return
        self.send_json(200, doc, {"Cache-Control": "max-age=86400, private"})

    do_HEAD = do_GET

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        self.idp._count(path)
        body = self.read_body()
        try:
            self._post(path, body)
        except (_BadRequest, ValueError, TypeError, KeyError) as exc:
            # json.JSONDecodeError is a ValueError.
            message = exc.args[0] if exc.args else type(exc).__name__
            self.send_json(400, {"error": "invalid_request", "error_description": str(message)})

    def _post(self, path: str, body: bytes) -> None:
        idp = self.idp
        if path == "/_dev/token":
            kwargs = _mint_kwargs(body)
            token = idp.mint(**kwargs)
            lifetime = kwargs.get("lifetime", 3600)
            self.send_json(
                200,
                {
                    "token_type": "Bearer",
                    "expires_in": lifetime,
                    "ext_expires_in": lifetime,
                    "access_token": token,
                },
            )
        elif path == "/_dev/rotate":
            self.send_json(200, {"kid": idp.rotate()})
        elif path == "/_dev/retire":
            doc = json.loads(body or b"{}")
            kid = doc.get("kid") if isinstance(doc, dict) else None
            if not isinstance(kid, str):
                raise _BadRequest('body must be {"kid": "..."}')
            idp.retire(kid)
            self.send_json(200, {"retired": kid, "kids": list(idp.kids)})
        elif path in ("/_dev/outage", "/_dev/garbled"):
            doc = json.loads(body or b"{}")
            on = doc.get("on", True) if isinstance(doc, dict) else None
            if not isinstance(on, bool):
                raise _BadRequest('body must be {"on": true|false}')
            if path == "/_dev/outage":
                idp.set_outage(on)
                self.send_json(200, {"outage": on})
            else:
                idp.set_garbled(on)
                self.send_json(200, {"garbled": on})
        elif path == "/_dev/reset":
            idp.reset_counts()
            self.send_json(200, {"reset": True})
        else:
            self.send_json(404, {"error": "not_found", "error_description": f"no route {path}"})
