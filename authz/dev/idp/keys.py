"""Signing keys for the dev issuer: RSA 2048 keys with a self-signed certificate.

Each key is generated in memory at run time and never written to disk. The published JWK mimics
Entra's shape: ``kty``, ``use``, ``kid``, ``x5t`` (== ``kid``, the base64url SHA-1 thumbprint of
the certificate), ``n``, ``e``, ``x5c`` and, on v2 endpoints only, ``issuer``; never ``alg``.

Must not import: the production packages (``authz.identity``, ``authz.server``, ...), network code.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = ["SigningKey", "b64url", "generate_signing_key"]


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE wants it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint_b64url(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One RSA signing key, its certificate, and the public JWK fields (without ``issuer``)."""

    kid: str
    private_key: rsa.RSAPrivateKey
    cert_der: bytes
    # The issuer this key belongs to; ``None`` means "any tenant" (templated on v2 endpoints).
    # The MSA key carries a concrete tenant id here.
    owner_tid: str | None

    def public_jwk(self) -> dict[str, Any]:
        """The key as Entra's v1 JWKS lists it (v2 endpoints add ``issuer``)."""
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": _uint_b64url(numbers.n),
            "e": _uint_b64url(numbers.e),
            "x5c": [base64.b64encode(self.cert_der).decode("ascii")],
        }


def generate_signing_key(owner_tid: str | None = None) -> SigningKey:
    """A fresh RSA 2048 key with a one-year self-signed certificate (like Entra's signing certs)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "accounts.accesscontrol.dev-idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    # Entra's kid is the certificate's SHA-1 thumbprint in base64url; x5t is the same value.
    kid = b64url(hashlib.sha1(der, usedforsecurity=False).digest())
    return SigningKey(kid=kid, private_key=key, cert_der=der, owner_tid=owner_tid)
