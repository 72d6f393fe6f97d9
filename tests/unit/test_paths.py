"""Path canonicalisation: the accepted forms, and the bypass catalogue that must be rejected."""

from __future__ import annotations

import pytest

from authz.policy.errors import BadRequest, Code
from authz.policy.paths import canonicalize, is_canonical

CANONICAL = [
    ("/", "/"),
    ("/orders", "/orders"),
    ("/orders/", "/orders/"),
    ("/orders/42", "/orders/42"),
    ("/a-b_c.d~e/!$&'()*+,=:@", "/a-b_c.d~e/!$&'()*+,=:@"),
    ("/..a/b...", "/..a/b..."),
]

REWRITTEN = [
    ("query dropped", "/orders?x=1&y=/../admin", "/orders"),
    ("fragment dropped", "/orders#frag", "/orders"),
    ("dot-dot removed", "/admin/../public", "/public"),
    ("dot-dot to root", "/a/..", "/"),
    ("dot-dot keeps trailing slash", "/a/b/..", "/a/"),
    ("dot removed", "/a/./b", "/a/b"),
    ("trailing dot", "/a/.", "/a/"),
    ("lone dot", "/.", "/"),
    ("merged slashes", "//admin", "/admin"),
    ("merged interior slashes", "/a///b//", "/a/b/"),
    ("only slashes", "///", "/"),
    ("encoded dots decoded then removed", "/public/%2e%2e/admin", "/admin"),
    ("mixed-case encoded dots", "/public/.%2E/admin", "/admin"),
    ("encoded single dot", "/a/%2e/b", "/a/b"),
    ("unreserved decoded", "/%41%62%7e%2D%5f", "/Ab~-_"),
    ("other escapes upper-cased", "/caf%c3%a9", "/caf%C3%A9"),
    ("encoded percent stays", "/100%25", "/100%25"),
    ("double encoding is not decoded twice", "/a/%252e%252e/b", "/a/%252e%252e/b"),
    ("raw space encoded", "/a b", "/a%20b"),
    ("raw braces encoded", "/a{b}|c", "/a%7Bb%7D%7Cc"),
    ("raw and encoded spellings agree", "/a%7bb%7d%7cc", "/a%7Bb%7D%7Cc"),
    ("dot then query", "/a/..?q=/admin", "/"),
    ("encoded colon decoded", "/orders/export%3Aall", "/orders/export:all"),
    ("encoded colon lower-case hex", "/orders/export%3aall", "/orders/export:all"),
    ("encoded at decoded", "/users/alice%40contoso.com", "/users/alice@contoso.com"),
    ("encoded sub-delims decoded", "/%21%24%26%27%28%29%2A%2B%2C%3D", "/!$&'()*+,="),
    ("encoded plus is a plus", "/a%2Bb+c", "/a+b+c"),
    ("encoded colon then dot-dot", "/a%3A/../b", "/b"),
]

REJECTED = [
    ("encoded slash", "/public/..%2fadmin"),
    ("encoded slash upper", "/public%2F..%2Fadmin"),
    ("backslash", "/public\\..\\admin"),
    ("encoded backslash", "/public/..%5cadmin"),
    ("encoded backslash upper", "/a%5Cb"),
    ("raw NUL", "/admin\x00.txt"),
    ("encoded NUL", "/admin%00.txt"),
    ("encoded control", "/a%0d%0aX-Evil:1"),
    ("raw CR LF", "/a\r\nX-Evil: 1"),
    ("raw tab", "/a\tb"),
    ("encoded DEL", "/a%7Fb"),
    ("raw DEL", "/a\x7fb"),
    ("path parameter", "/admin;x=1"),
    ("path parameter in segment", "/public;/../admin"),
    ("encoded semicolon", "/admin%3bx=1"),
    ("invalid escape", "/a%zzb"),
    ("truncated escape", "/a%4"),
    ("trailing percent", "/a%"),
    ("non-ASCII", "/caf\u00e9"),
    ("non-ASCII lookalike", "/\u0430dmin"),
    ("relative", "admin"),
    ("asterisk form", "*"),
    ("empty", ""),
    ("only a query", "?a=b"),
    ("above root", "/.."),
    ("above root later", "/a/../../admin"),
    ("encoded above root", "/%2e%2e/admin"),
    ("dot-dot after empty segment", "/public//../admin"),
    ("dot-dot eats empty segment later", "/a//b/../../c"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL, ids=[c[0] for c in CANONICAL])
def test_canonical_paths_are_returned_unchanged(raw: str, expected: str) -> None:
    assert canonicalize(raw) == expected
    assert is_canonical(raw)


@pytest.mark.parametrize(
    ("raw", "expected"), [r[1:] for r in REWRITTEN], ids=[r[0] for r in REWRITTEN]
)
def test_paths_are_rewritten_to_their_canonical_form(raw: str, expected: str) -> None:
    got = canonicalize(raw)
    assert got == expected
    assert canonicalize(got) == got, "canonicalisation must be idempotent"


@pytest.mark.parametrize("raw", [r[1] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_unsafe_paths_are_rejected_as_non_canonical(raw: str) -> None:
    with pytest.raises(BadRequest) as info:
        canonicalize(raw)
    assert info.value.code is Code.NON_CANONICAL_PATH
    assert info.value.status == 400
    assert raw not in info.value.reason or not raw, "the public reason never echoes the path"
    assert not is_canonical(raw)


def test_case_is_significant() -> None:
    assert canonicalize("/ADMIN") == "/ADMIN"
    assert canonicalize("/ADMIN") != canonicalize("/admin")


def test_encoded_dot_segments_cannot_hide_a_path_from_matching() -> None:
    """Whatever the spelling, the path we match on is the path the backend would resolve."""
    for spelling in ("/public/%2e%2e/admin", "/public/../admin", "/x/./../admin", "//admin"):
        assert canonicalize(spelling) == "/admin"


def test_is_canonical_rejects_query_and_rewritten_forms() -> None:
    assert not is_canonical("/a?b")
    assert not is_canonical("/a/../b")
    assert not is_canonical("/%7e")
