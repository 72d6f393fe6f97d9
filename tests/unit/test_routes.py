"""Route matching (first match in config order), API selection, and unreachable-route warnings."""

from __future__ import annotations

from typing import Any

import pytest

from authz.policy.model import AUTHENTICATED, ApiSpec, PathKind, Route
from authz.policy.paths import canonicalize
from authz.policy.routes import (
    ApiSelector,
    RouteTable,
    normalize_host,
    prefix_matches,
    split_host_port,
    unreachable_routes,
)


def route(name: str, path: str, kind: PathKind = "exact", **kw: Any) -> Route:
    return Route(name=name, path=path, path_kind=kind, require=AUTHENTICATED, **kw)


def api(*routes: Route, name: str = "orders", **kw: Any) -> ApiSpec:
    return ApiSpec(name=name, audiences=frozenset({"api://x"}), issuers=("i",), routes=routes, **kw)


ORDERS = api(
    route("health", "/orders/healthz", methods=frozenset({"GET"})),
    route("read", "/orders/{id}", "template", methods=frozenset({"GET"})),
    route("write", "/orders/", "prefix", methods=frozenset({"POST", "PUT", "DELETE"})),
    route("admin", "/orders/admin", "prefix"),
    route("files", "/files/{path...}", "template"),
    route("item", "/shops/{shop}/items/{item}", "template"),
    route("internal", "/internal", "prefix", hosts=frozenset({"Internal.Example.com"})),
    route("wild", "/wild", "exact", hosts=frozenset({"*.example.net"})),
    route("root", "/", "exact"),
)
TABLE = RouteTable.build(ORDERS)

MATCHES = [
    ("exact first match", "GET", "", "/orders/healthz", "health"),
    ("template one segment", "GET", "", "/orders/42", "read"),
    ("first match beats later prefix", "GET", "", "/orders/admin", "read"),
    ("method falls through to next route", "DELETE", "", "/orders/admin", "write"),
    ("prefix with slash matches itself", "POST", "", "/orders/", "write"),
    ("prefix with slash matches deeper", "POST", "", "/orders/1/lines/2", "write"),
    ("prefix without slash matches itself", "PATCH", "", "/orders/admin", "admin"),
    ("prefix without slash matches below", "PATCH", "", "/orders/admin/x", "admin"),
    ("prefix is segment-aware", "PATCH", "", "/orders/adminx", None),
    ("template does not match deeper", "GET", "", "/orders/42/lines", None),
    ("template needs a non-empty segment", "GET", "", "/orders/", None),
    ("template trailing slash is significant", "GET", "", "/orders/42/", None),
    ("rest placeholder one segment", "GET", "", "/files/a", "files"),
    ("rest placeholder many segments", "GET", "", "/files/a/b/c.txt", "files"),
    ("rest placeholder needs a segment", "GET", "", "/files/", None),
    ("rest placeholder not the bare prefix", "GET", "", "/files", None),
    ("two placeholders", "GET", "", "/shops/s1/items/i2", "item"),
    ("literal between placeholders", "GET", "", "/shops/s1/things/i2", None),
    ("lower-case method is another method", "get", "", "/orders/healthz", None),
    ("HEAD is not GET", "HEAD", "", "/orders/healthz", None),
    ("paths are case-sensitive", "GET", "", "/ORDERS/healthz", None),
    ("host matches case-insensitively", "GET", "INTERNAL.example.COM", "/internal/x", "internal"),
    ("host port ignored", "GET", "internal.example.com:8443", "/internal", "internal"),
    ("host trailing dot ignored", "GET", "internal.example.com.", "/internal", "internal"),
    ("other host does not match", "GET", "example.com", "/internal", None),
    ("no host does not match a host route", "GET", "", "/internal", None),
    ("wildcard host", "GET", "a.b.example.net", "/wild", "wild"),
    ("wildcard needs a label", "GET", "example.net", "/wild", None),
    ("root exact", "OPTIONS", "", "/", "root"),
    ("NUL in method is refused", "GET\x00x", "", "/", None),
    ("NUL in host is refused", "GET", "a\x00b", "/", None),
]


@pytest.mark.parametrize(
    ("method", "host", "path", "expected"),
    [m[1:] for m in MATCHES],
    ids=[m[0] for m in MATCHES],
)
def test_match(method: str, host: str, path: str, expected: str | None) -> None:
    got = TABLE.match(method, host, path)
    assert (got.name if got is not None else None) == expected


def test_encoded_bypass_attempts_match_as_the_path_they_resolve_to() -> None:
    table = RouteTable.build(
        api(
            route("public", "/public/", "prefix"),
            route("admin", "/admin", "prefix", methods=frozenset({"GET"})),
        )
    )
    for raw in ("/public/%2e%2e/admin", "/public/../admin", "//admin"):
        got = table.match("GET", "", canonicalize(raw))
        assert got is not None
        assert got.name == "admin"


def test_encoded_pchar_cannot_fall_through_an_exact_rule_to_a_weaker_prefix() -> None:
    """Backends decode '%3A' to ':' before routing: so do we, or the exact rule is skipped."""
    table = RouteTable.build(
        api(
            route("export", "/orders/export:all", methods=frozenset({"GET"})),
            route("alice", "/users/alice@contoso.com"),
            route("orders", "/orders", "prefix"),
            route("users", "/users", "prefix"),
        )
    )
    for raw, name in [
        ("/orders/export:all", "export"),
        ("/orders/export%3Aall", "export"),
        ("/orders/export%3aall", "export"),
        ("/users/alice%40contoso.com", "alice"),
        ("/users/alice%40contoso%2Ecom", "alice"),
    ]:
        got = table.match("GET", "", canonicalize(raw))
        assert got is not None, raw
        assert got.name == name, raw


def test_an_encoded_config_path_is_refused_with_its_canonical_spelling() -> None:
    with pytest.raises(ValueError, match=r"write it as '/orders/export:all'"):
        RouteTable.build(api(route("export", "/orders/export%3Aall")))


@pytest.mark.parametrize("path", ["/a%zz", "/a%2Fb", "/a%00"], ids=["bad-escape", "slash", "nul"])
def test_a_config_path_no_request_can_spell_gets_no_spelling_hint(path: str) -> None:
    """A path that has no canonical form (a request spelling it is refused as bad input) is
    refused without a "write it as" hint: there is nothing to write instead."""
    with pytest.raises(ValueError, match="not canonical and could never match") as err:
        RouteTable.build(api(route("r", path)))
    assert "write it as" not in str(err.value)


def test_empty_api_matches_nothing() -> None:
    assert RouteTable.build(api()).match("GET", "", "/") is None


def test_many_routes_compile_and_keep_config_order() -> None:
    routes = [route(f"r{i}", f"/p{i}", "prefix") for i in range(500)]
    routes.append(route("catch", "/", "prefix"))
    table = RouteTable.build(api(*routes))
    assert table.match("GET", "", "/p499/x") is routes[499]
    assert table.match("GET", "", "/nope") is routes[500]
    assert table.routes == tuple(routes)


BAD_ROUTES = [
    ("lower-case method", route("r", "/a", methods=frozenset({"get"})), "upper-case"),
    ("non-canonical exact", route("r", "/a/../b"), "not canonical"),
    ("exact with placeholder", route("r", "/a/{id}"), "template"),
    ("lower-case escape", route("r", "/a%2a"), "not canonical"),
    ("prefix with query", route("r", "/a?x", "prefix"), "not canonical"),
    ("template partial segment", route("r", "/a/x{id}", "template"), "whole placeholder"),
    ("template bad name", route("r", "/a/{1d}", "template"), "whole placeholder"),
    ("template unclosed", route("r", "/a/{id", "template"), "whole placeholder"),
    ("template repeated name", route("r", "/{id}/{id}", "template"), "repeated"),
    ("template rest not last", route("r", "/{p...}/x", "template"), "last segment"),
    ("template without placeholder", route("r", "/a/b", "template"), "no placeholder"),
    ("template relative", route("r", "a/{id}", "template"), "start with '/'"),
    ("template empty segment", route("r", "/a//{id}", "template"), "empty segment"),
    ("template dot segment", route("r", "/a/../{id}", "template"), "non-canonical"),
    ("host with port", route("r", "/a", hosts=frozenset({"a.example.com:80"})), "bare host"),
    ("host with scheme", route("r", "/a", hosts=frozenset({"https://a"})), "bare host"),
    ("host inner wildcard", route("r", "/a", hosts=frozenset({"a.*.com"})), "bare host"),
    ("unknown kind", route("r", "/a", "regex"), "unknown path kind"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("bad", "message"), [b[1:] for b in BAD_ROUTES], ids=[b[0] for b in BAD_ROUTES]
)
def test_bad_routes_are_rejected_at_build_time(bad: Route, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        RouteTable.build(api(route("ok", "/ok"), bad))
    assert "routes[1] (r)" in str(info.value)


HOSTS = [
    ("lower", "A.Example.COM", "a.example.com"),
    ("port", "a.example.com:8080", "a.example.com"),
    ("ipv6 with port", "[::1]:8080", "[::1]"),
    ("ipv6", "[::1]", "[::1]"),
    ("trailing dot", "a.example.com.", "a.example.com"),
    ("empty", "", ""),
]


@pytest.mark.parametrize(("host", "expected"), [h[1:] for h in HOSTS], ids=[h[0] for h in HOSTS])
def test_normalize_host(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


SPLITS = [
    ("name and port", "a.example.com:8080", ("a.example.com", "8080")),
    ("name alone", "a.example.com", ("a.example.com", "")),
    ("ipv6 and port", "[::1]:8080", ("[::1]", "8080")),
    ("ipv6 alone", "[::1]", ("[::1]", "")),
    ("unclosed bracket", "[::1", ("[::1", "")),
    ("junk after bracket", "[::1]x", ("[::1]", "")),
    ("empty host", ":50051", ("", "50051")),
]


@pytest.mark.parametrize(
    ("authority", "expected"), [s[1:] for s in SPLITS], ids=[s[0] for s in SPLITS]
)
def test_split_host_port(authority: str, expected: tuple[str, str]) -> None:
    assert split_host_port(authority) == expected


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        ("/orders", "/orders", True),
        ("/orders", "/orders/1", True),
        ("/orders", "/ordersx", False),
        ("/orders/", "/orders", False),
        ("/orders/", "/orders/", True),
        ("/", "/anything", True),
    ],
    ids=["equal", "below", "sibling", "slash-prefix-bare", "slash-prefix-equal", "root"],
)
def test_prefix_matches(prefix: str, path: str, expected: bool) -> None:
    assert prefix_matches(prefix, path) is expected


# ---------------------------------------------------------------------------------- selection

SELECT_APIS = (
    api(
        name="orders", match_hosts=frozenset({"api.example.com"}), match_path_prefixes=("/orders",)
    ),
    api(name="orders-v2", match_path_prefixes=("/orders/v2",)),
    api(name="any-host-orders", match_path_prefixes=("/orders",)),
    api(name="billing-host", match_hosts=frozenset({"billing.example.com"})),
    api(name="by-name-only"),
)
SELECTOR = ApiSelector(SELECT_APIS)

SELECTIONS = [
    ("context names the api", {"api": "by-name-only"}, "x", "/whatever", "by-name-only"),
    (
        "context wins over match rules",
        {"api": "orders-v2"},
        "api.example.com",
        "/orders",
        "orders-v2",
    ),
    ("unknown context name selects nothing", {"api": "nope"}, "api.example.com", "/orders", None),
    ("host and prefix", {}, "api.example.com:443", "/orders/1", "orders"),
    ("longest prefix wins over host", {}, "api.example.com", "/orders/v2/x", "orders-v2"),
    ("host-specific beats any-host at equal length", {}, "API.example.com", "/orders", "orders"),
    ("any-host api for other hosts", {}, "other.example.com", "/orders/1", "any-host-orders"),
    ("prefix is segment-aware", {}, "other.example.com", "/ordersx", None),
    ("hosts without prefixes cover every path", {}, "billing.example.com", "/x/y", "billing-host"),
    ("nothing matches", {}, "other.example.com", "/x", None),
    ("other context keys are ignored", {"route": "x"}, "api.example.com", "/orders", "orders"),
]


@pytest.mark.parametrize(
    ("context", "host", "path", "expected"),
    [s[1:] for s in SELECTIONS],
    ids=[s[0] for s in SELECTIONS],
)
def test_api_selection(context: dict[str, str], host: str, path: str, expected: str | None) -> None:
    got = SELECTOR.select(context, host, path)
    assert (got.name if got is not None else None) == expected


def test_selector_rejects_duplicate_names_and_bad_prefixes() -> None:
    with pytest.raises(ValueError, match="duplicate API name"):
        ApiSelector((api(name="a"), api(name="a")))
    with pytest.raises(ValueError, match="not a canonical path"):
        ApiSelector((api(name="a", match_path_prefixes=("orders",)),))


# ------------------------------------------------------------------------------- unreachable

GET = frozenset({"GET"})
GET_POST = frozenset({"GET", "POST"})
H = frozenset({"a.example.com"})

UNREACHABLE = [
    ("prefix covers exact", [route("p", "/a", "prefix"), route("e", "/a/b")], ["e"]),
    ("prefix covers equal exact", [route("p", "/a", "prefix"), route("e", "/a")], ["e"]),
    (
        "prefix covers deeper prefix",
        [route("p", "/a", "prefix"), route("q", "/a/b/", "prefix")],
        ["q"],
    ),
    (
        "slash prefix does not cover bare",
        [route("p", "/a/", "prefix"), route("q", "/a", "prefix")],
        [],
    ),
    ("prefix is segment-aware", [route("p", "/a", "prefix"), route("e", "/ab")], []),
    ("root prefix covers all", [route("p", "/", "prefix"), route("t", "/{x}", "template")], ["t"]),
    (
        "prefix covers template under it",
        [route("p", "/a", "prefix"), route("t", "/a/{id}", "template")],
        ["t"],
    ),
    (
        "prefix does not cover template elsewhere",
        [route("p", "/a", "prefix"), route("t", "/{id}/a", "template")],
        [],
    ),
    ("exact covers equal exact", [route("e", "/a"), route("f", "/a")], ["f"]),
    ("exact does not cover prefix", [route("e", "/a"), route("p", "/a", "prefix")], []),
    (
        "template covers matching exact",
        [route("t", "/a/{id}", "template"), route("e", "/a/b")],
        ["e"],
    ),
    (
        "template covers renamed template",
        [route("t", "/a/{id}", "template"), route("u", "/a/{x}", "template")],
        ["u"],
    ),
    (
        "template does not cover rest template",
        [route("t", "/a/{id}", "template"), route("u", "/a/{x...}", "template")],
        [],
    ),
    (
        "template does not cover prefix",
        [route("t", "/a/{x...}", "template"), route("p", "/a/b", "prefix")],
        [],
    ),
    (
        "narrower methods do not cover",
        [route("p", "/a", "prefix", methods=GET), route("e", "/a", methods=GET_POST)],
        [],
    ),
    (
        "methods superset covers",
        [route("p", "/a", "prefix", methods=GET_POST), route("e", "/a", methods=GET)],
        ["e"],
    ),
    (
        "method list does not cover any-method",
        [route("p", "/a", "prefix", methods=GET), route("e", "/a")],
        [],
    ),
    (
        "host list does not cover any-host",
        [route("p", "/a", "prefix", hosts=H), route("e", "/a")],
        [],
    ),
    ("any-host covers host list", [route("p", "/a", "prefix"), route("e", "/a", hosts=H)], ["e"]),
    (
        "same host list covers",
        [
            route("p", "/a", "prefix", hosts=H),
            route("e", "/a", hosts=frozenset({"A.example.com."})),
        ],
        ["e"],
    ),
    (
        "wildcard covers host",
        [route("p", "/a", "prefix", hosts=frozenset({"*.example.com"})), route("e", "/a", hosts=H)],
        ["e"],
    ),
    (
        "wildcard covers deeper wildcard",
        [
            route("p", "/a", "prefix", hosts=frozenset({"*.example.com"})),
            route("e", "/a", hosts=frozenset({"*.b.example.com"})),
        ],
        ["e"],
    ),
    (
        "wildcard does not cover apex",
        [
            route("p", "/a", "prefix", hosts=frozenset({"*.example.com"})),
            route("e", "/a", hosts=frozenset({"example.com"})),
        ],
        [],
    ),
    (
        "reported once",
        [route("p", "/", "prefix"), route("q", "/a", "prefix"), route("e", "/a/b")],
        ["q", "e"],
    ),
]


@pytest.mark.parametrize(
    ("routes", "expected"), [u[1:] for u in UNREACHABLE], ids=[u[0] for u in UNREACHABLE]
)
def test_unreachable_routes(routes: list[Route], expected: list[str]) -> None:
    spec = api(*routes)
    RouteTable.build(spec)  # the precondition: the routes themselves are valid
    warnings = unreachable_routes(spec)
    assert len(warnings) == len(expected)
    for warning, name in zip(warnings, expected, strict=True):
        assert f"({name}) is unreachable" in warning


def test_example_config_routes_are_all_reachable() -> None:
    assert unreachable_routes(ORDERS) == []
