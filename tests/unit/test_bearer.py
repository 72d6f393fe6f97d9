"""extract_bearer: the happy paths (the hostile ones are cases 26-29 of test_attacks.py)."""

from __future__ import annotations

import random
import re

import pytest

from authz.identity.bearer import _is_b64token, extract_bearer
from authz.policy.errors import BadRequest, Code, Unauthenticated

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({}, "", None),
        ({"x-other": "1"}, "a=b", None),
        ({"authorization": ""}, "", None),
        ({"authorization": "  "}, "", None),
        ({"authorization": f"Bearer {TOKEN}"}, "", TOKEN),
        ({"authorization": f"Bearer {TOKEN}"}, "a=1&b=access_token", TOKEN),
        ({"authorization": f"Bearer {TOKEN}"}, "my_access_token=1", TOKEN),
        ({"Authorization": f"Bearer {TOKEN}"}, "", TOKEN),
        ({"authorization": "Bearer abc~+/=="}, "", "abc~+/=="),
        ({}, f"access_token={TOKEN}", None),
    ],
    ids=[
        "no-headers",
        "no-authorization",
        "empty-header",
        "blank-header",
        "bearer",
        "unrelated-query",
        "query-name-suffix",
        "mixed-case-header-name",
        "b64token-alphabet",
        "query-token-ignored",
    ],
)
def test_extract(headers: dict[str, str], query: str, expected: str | None) -> None:
    assert extract_bearer(headers, query) == expected


def test_statuses() -> None:
    with pytest.raises(BadRequest) as bad:
        extract_bearer({"authorization": f"Bearer {TOKEN}"}, f"access_token={TOKEN}")
    assert (bad.value.status, bad.value.code) == (400, Code.INVALID_REQUEST)
    with pytest.raises(Unauthenticated) as unauth:
        extract_bearer({"authorization": "Digest x"}, "")
    assert (unauth.value.status, unauth.value.code) == (401, Code.MALFORMED_TOKEN)


def test_b64token_check_equals_the_rfc_6750_grammar() -> None:
    """The C-speed check accepts exactly what the RFC 6750 §2.1 regex accepts."""
    grammar = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
    alphabet = "Aa0-._~+/=" + "=" * 4 + " \t,;:!\"#%&'()*<>?@[\\]^`{|}\x00\x7f\u00e9\u2028\uff21"
    rng = random.Random(6750)
    samples = ["", "=", "==", "a", "a=", "a==", "=a", "a=b", "a==b=", "a b", "\u00e9", "A" * 2048]
    samples += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(5000)
    ]
    for s in samples:
        assert _is_b64token(s) == bool(grammar.fullmatch(s)), repr(s)
