"""The verifier's fast paths decide exactly as the straightforward code they replaced.

- ``_b64url``: ``bytes.replace`` instead of ``bytes.translate`` for ``-_`` -> ``+/``;
- ``_json_object``: the decoder's C scanner called directly instead of ``JSONDecoder.decode``;
- ``_new_principal``: the slots' descriptors instead of the dataclass ``__init__``;
- array claims: ``"".join`` instead of a per-item type check.

Each is compared with a reference implementation (the previous code) on the same inputs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import random
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from authz.identity import entra
from authz.identity.entra import TokenVerifier
from authz.policy.errors import Code, Unauthenticated
from authz.policy.model import Actor, Principal, TokenKind

# ------------------------------------------------------------------------------------ base64url

_STD = bytes.maketrans(b"-_", b"+/")


def reference_b64url(segment: str) -> bytes | None:
    """The previous implementation (translate-based); None where it refused the segment."""
    if "+" in segment or "/" in segment or "=" in segment:
        return None
    rest = len(segment) & 3
    if rest == 1:
        return None
    if rest == 2:
        if segment[-1] not in "AQgw":
            return None
        segment += "=="
    elif rest == 3:
        if segment[-1] not in "AEIMQUYcgkosw048":
            return None
        segment += "="
    try:
        return binascii.a2b_base64(segment.encode("ascii").translate(_STD), strict_mode=True)
    except binascii.Error:
        return None


def fast_b64url(segment: str) -> bytes | None:
    try:
        return entra._b64url(segment)
    except entra._Malformed:
        return None


def _segments() -> list[str]:
    rng = random.Random(20240607)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    junk = alphabet + "+/=.! \t\n\x00~"
    out = ["", "A", "AA", "AB", "AAA", "AAB", "AAAA", "----", "____", "-_-_-_", "_w", "-w"]
    for n in range(1, 80):
        out.append(base64.urlsafe_b64encode(rng.randbytes(n)).decode().rstrip("="))
        out.append(base64.urlsafe_b64encode(b"\xff\xfe" * n).decode().rstrip("="))
        out.append("".join(rng.choice(alphabet) for _ in range(n)))
        out.append("".join(rng.choice("-_") for _ in range(n)))
        out.append("".join(rng.choice(junk) for _ in range(n)))
    padded = base64.urlsafe_b64encode(b"abcd").decode()
    out += [padded, padded + "=", "AA==", "AAA=", "AA=A", "=AAA", "A+/A", "A/+A"]
    return out


@pytest.mark.parametrize("segment", _segments())
def test_b64url_matches_reference(segment: str) -> None:
    assert fast_b64url(segment) == reference_b64url(segment)


def test_b64url_round_trips_every_byte_pattern() -> None:
    data = bytes(range(256)) * 3
    for n in range(len(data)):
        segment = base64.urlsafe_b64encode(data[n:]).decode().rstrip("=")
        assert entra._b64url(segment) == data[n:]


# ------------------------------------------------------------------------------------------ JSON


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise entra._Duplicate
    return d


def _constant(name: str) -> Any:
    raise entra._Malformed


_reference_decoder = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant)


def reference_json(raw: bytes) -> Any:
    """The previous implementation (``JSONDecoder.decode``); a string names the refusal."""
    try:
        value = _reference_decoder.decode(raw.decode("utf-8"))
    except entra._Duplicate:
        return "duplicate"
    except (entra._Malformed, ValueError, RecursionError):
        return "malformed"
    return value if type(value) is dict else "malformed"


def fast_json(raw: bytes) -> Any:
    try:
        return entra._json_object(raw)
    except entra._Duplicate:
        return "duplicate"
    except entra._Malformed:
        return "malformed"


JSON_CASES = [
    b"",
    b" ",
    b"\t\n\r ",
    b"{}",
    b" {}",
    b"{} ",
    b"\n\t{}\r\n ",
    b"\x0b{}",
    b"{}\x0b",
    b"{}\xc2\xa0",
    b"\xef\xbb\xbf{}",
    b"{}{}",
    b"{} {}",
    b"{}x",
    b"{},",
    b"[]",
    b"1",
    b'"s"',
    b"null",
    b"true",
    b'{"a":1}',
    b'{"a":1,"a":2}',
    b'{"a":1,"A":2}',
    b'{"a":{"b":1,"b":1}}',
    b'{"a":[{"b":1},{"c":[{"d":1,"d":2}]}]}',
    b'{"a":NaN}',
    b'{"a":Infinity}',
    b'{"a":-Infinity}',
    b'{"a":1e400}',
    b'{"a":' + b"9" * 5000 + b"}",
    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a":"\xff"}',
    b'{"a":"\xed\xa0\x80"}',
    b'{"a":"\\ud800"}',
    b'{"a":"x\ny"}',
    b'{"a":1',
    b'{"a" 1}',
    b"{'a':1}",
    b'{"a":01}',
    b'{"\\u0061":1,"a":2}',
    b'{"a":[1,2,]}',
    b'{"a":1,}',
    b'  {"a": [1, 2, {"b": null}]}  ',
]


@pytest.mark.parametrize("raw", JSON_CASES)
def test_json_object_matches_reference(raw: bytes) -> None:
    assert fast_json(raw) == reference_json(raw)


def test_json_object_matches_reference_on_mutations() -> None:
    rng = random.Random(7)
    base = json.dumps({"a": 1, "b": [1, "x", {"c": None}], "d": {"e": "f"}}).encode()
    for _ in range(3000):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw) + 1)
            op = rng.random()
            char = rng.choice(b' \t\n\r{}[]",:0aeE-+.\\x')
            if op < 0.4 and i < len(raw):
                raw[i] = char
            elif op < 0.7:
                raw.insert(i, char)
            elif i < len(raw):
                del raw[i]
        assert fast_json(bytes(raw)) == reference_json(bytes(raw)), bytes(raw)


# ------------------------------------------------------------------------------------- Principal


def _principal_args() -> tuple[Any, ...]:
    return (
        "tid",
        "oid",
        "sub",
        "client",
        TokenKind.USER,
        "2.0",
        "iss",
        "aud",
        "provider",
        123,
        frozenset({"r"}),
        frozenset({"s"}),
        "s",
        ("r",),
        frozenset({"g"}),
        True,
        frozenset({"c1"}),
        frozenset({"cp1"}),
        "uti",
        "user",
        MappingProxyType({"tid": "tid"}),
        Actor.AGENT,
        True,
        "x5t",
    )


def test_fast_principal_is_active() -> None:
    # If this fails, Principal's fields changed: update _PRINCIPAL_FIELDS and _build_principal
    # in authz/identity/entra.py (until then the verifier falls back to Principal(...)).
    assert entra._FAST_PRINCIPAL
    assert entra._new_principal is entra._build_principal
    assert tuple(f.name for f in dataclasses.fields(Principal)) == entra._PRINCIPAL_FIELDS


def test_fast_principal_equals_the_dataclass_constructor() -> None:
    args = _principal_args()
    fast, slow = entra._build_principal(*args), Principal(*args)
    assert type(fast) is Principal
    assert fast == slow
    assert repr(fast) == repr(slow)
    for f in dataclasses.fields(Principal):
        assert getattr(fast, f.name) is getattr(slow, f.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.tid = "other"  # type: ignore[misc]
    assert dataclasses.replace(fast, tid="other").tid == "other"


def test_verified_principal_equals_the_dataclass_constructor(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    p = verifier.verify(
        minter.token(groups=["g1", "g2"], acrs=["c1"], xms_cc=["cp1"], roles=["b", "a", "b"]),
        env.make_api(),
    )
    values = [getattr(p, f.name) for f in dataclasses.fields(Principal)]
    assert p == Principal(*values)
    assert p.roles_list == ("b", "a", "b")
    assert p.roles == {"a", "b"}


# ---------------------------------------------------------------------------------- array claims


@pytest.mark.parametrize("claim", ["roles", "groups", "acrs", "xms_cc", "wids"])
@pytest.mark.parametrize(
    "value",
    [["a", 1], [None], [True], [1.5], [["a"]], [{"a": "b"}], "a", {"a": "b"}, 1, None, True],
)
def test_array_claims_must_hold_only_strings(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, claim: str, value: Any
) -> None:
    with pytest.raises(Unauthenticated) as denied:
        verifier.verify(minter.token(**{claim: value}), env.make_api())
    assert denied.value.code is Code.INVALID_CLAIM


@pytest.mark.parametrize("claim", ["roles", "groups", "acrs", "xms_cc", "wids"])
def test_array_claims_of_strings_pass(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace, claim: str
) -> None:
    for value in ([], ["x"], ["x", "", "y"]):
        verifier.verify(minter.token(**{claim: value}), env.make_api())


# --------------------------------------------------------------------------------- header cache


def test_header_cache_stores_only_checked_headers(
    verifier: TokenVerifier, minter: Any, env: SimpleNamespace
) -> None:
    api = env.make_api()
    bad = minter.token(header=minter.header(jku="https://evil.example/keys"))
    for _ in range(2):  # a refused header is refused again, with the same code
        with pytest.raises(Unauthenticated) as denied:
            verifier.verify(bad, api)
        assert denied.value.code is Code.FORBIDDEN_HEADER_PARAMETER
    assert verifier._headers == {}
    good = minter.token()
    verifier.verify(good, api)
    verifier.verify(good, api)
    assert verifier._headers == {good.split(".")[0]: ("RS256", env.KID)}
    # The cached header does not vouch for anything else: a tampered payload still fails.
    h, _payload, s = good.split(".")
    tampered = f"{h}.{env.b64url(b'{}')}.{s}"
    with pytest.raises(Unauthenticated):
        verifier.verify(tampered, api)


def test_header_cache_is_bounded(verifier: TokenVerifier, env: SimpleNamespace) -> None:
    api = env.make_api()
    for i in range(entra._MAX_CACHED_HEADERS * 3):
        header = json.dumps({"alg": "RS256", "kid": f"k{i}"}).encode()
        with pytest.raises(Unauthenticated):  # no iss: missing_claim
            verifier.verify(f"{env.b64url(header)}.{env.b64url(b'{}')}.AAAA", api)
        assert len(verifier._headers) <= entra._MAX_CACHED_HEADERS
