"""Certificate-bound access tokens (RFC 8705 §3): does the token belong to the TLS client?

A token bound to a certificate carries ``cnf: {"x5t#S256": <thumbprint>}``, the thumbprint being
base64url(SHA-256(DER of the certificate)) without padding. The transport converters compute the
same thumbprint from the certificate Envoy saw (``RequestAttrs.client_cert_x5t``); this module
only compares, per the API's ``require_bound_tokens`` (``BoundTokens``):

    mode          token has cnf x5t#S256        token has other cnf       token has no cnf
    off           accepted (cnf ignored)        accepted                  accepted
    when_present  certificate must match        token_binding_unsupported accepted
    always        certificate must match        token_binding_unsupported token_not_bound

"Must match": no certificate -> ``token_binding_missing``; another (or an unreadable) one ->
``token_binding_mismatch``. All are 401s (identity phase): the caller does not prove it holds the
key the token was issued to, so the token does not identify it.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import hmac

from authz.policy.errors import Code, Unauthenticated
from authz.policy.model import BoundTokens, Principal

__all__ = ["BINDING_CODES", "check_binding"]

# Proof-of-possession failures: the presenter is not the token's holder. Unlike token_not_bound
# (a genuine, merely unbound token), these are enforced even in dry-run (see authz.engine).
BINDING_CODES = frozenset(
    {Code.TOKEN_BINDING_MISSING, Code.TOKEN_BINDING_MISMATCH, Code.TOKEN_BINDING_UNSUPPORTED}
)


def check_binding(mode: BoundTokens, p: Principal, presented_x5t: str) -> None:
    """Return when ``p``'s token may be used by the TLS client whose certificate thumbprint is
    ``presented_x5t`` ("" = no certificate); raise the ``Unauthenticated`` denial otherwise."""
    if mode is BoundTokens.OFF:
        return
    if not p.bound:
        if mode is BoundTokens.ALWAYS:
            raise Unauthenticated(Code.TOKEN_NOT_BOUND)
        return
    if not p.cnf_x5t:
        raise Unauthenticated(Code.TOKEN_BINDING_UNSUPPORTED)
    if not presented_x5t:
        raise Unauthenticated(Code.TOKEN_BINDING_MISSING)
    # Thumbprints are public (the token shows its own): constant time is hygiene, not secrecy.
    if not hmac.compare_digest(p.cnf_x5t.encode(), presented_x5t.encode()):
        raise Unauthenticated(Code.TOKEN_BINDING_MISMATCH)
