"""Route matching: which API a request belongs to, and which of its routes applies.

``RouteTable.build(api)`` compiles an API's routes once; ``RouteTable.match(method, host, path)``
answers with the FIRST route in configuration order whose method, host and path all match (as
Envoy's route tables do), or ``None``. ``path`` must already be canonical (``authz.policy.paths``).

Path kinds:

* ``exact``: the canonical path equals ``route.path``.
* ``prefix``: segment-aware. ``/orders`` matches ``/orders`` and ``/orders/...`` but not
  ``/ordersx``; a prefix ending in ``/`` (``/orders/``) matches itself and everything under it,
  not ``/orders``; ``/`` matches every path.
* ``template``: literal segments and placeholders that each fill a whole segment: ``{name}`` is one
  non-empty segment, ``{name...}`` (last segment only) is one or more segments. A trailing ``/``
  is significant, as for exact paths.

Methods are compared exactly (HTTP methods are case-sensitive: ``get`` is not ``GET``); ``HEAD``
is not implied by ``GET``. Hosts compare case-insensitively without ``:port`` or a trailing dot;
``*.example.com`` matches any host ending in ``.example.com``. Empty method/host sets match all.

Everything is compiled into ONE regular expression whose alternatives are the routes in order, so
a match is one C-level scan: the regex engine tries alternatives left to right, which is exactly
first-match-in-config-order.

``ApiSelector`` picks the API: Envoy's ``context_extensions`` key ``api`` names it when present
(an unknown name selects nothing); otherwise the API whose ``match_path_prefixes`` (segment-aware)
is the longest prefix of the path, and whose ``match_hosts`` (when listed) contain the host. An
API with neither hosts nor prefixes is only reachable by name.

``unreachable_routes(api)`` lists routes that an earlier route always shadows (for check-config).

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from authz.policy.errors import BadRequest
from authz.policy.model import ApiSpec, Route
from authz.policy.paths import canonicalize, is_canonical

__all__ = [
    "ApiSelector",
    "RouteTable",
    "normalize_host",
    "prefix_matches",
    "split_host_port",
    "unreachable_routes",
]

_METHOD_RE = re.compile(r"[A-Z][A-Z0-9_-]*")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}")
_HOST_RE = re.compile(r"(?:\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
# Separates method, host and path in the string the combined regex scans. Neither a canonical
# path nor a method or host that Envoy's codecs accept can contain NUL.
_SEP = "\x00"
_ONE_SEGMENT = r"[^/\x00]+"
_SEGMENTS = r"[^/\x00]+(?:/[^/\x00]+)*"


def split_host_port(authority: str) -> tuple[str, str]:
    """``host[:port]`` -> ``(host, port)``: the one place a host and its port are told apart (the
    route table, config's instance URLs, listen addresses). A bracketed IPv6 host keeps its
    brackets; ``port`` is "" when there is none (``[::1]:80`` -> ``("[::1]", "80")``)."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            return authority, ""
        rest = authority[end + 1 :]
        return authority[: end + 1], rest[1:] if rest.startswith(":") else ""
    host, colon, port = authority.rpartition(":")
    return (host, port) if colon else (authority, "")


@functools.lru_cache(maxsize=1024)  # a handful of hosts per deployment; called twice per check
def normalize_host(host: str) -> str:
    """Lower-case, without ``:port`` and without a trailing dot (``[::1]:80`` -> ``[::1]``)."""
    host = split_host_port(host.lower())[0]
    if host.endswith("."):
        host = host[:-1]
    return host


def prefix_matches(prefix: str, path: str) -> bool:
    """Segment-aware prefix test (see the module docstring)."""
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class _Template:
    regex: str  # unanchored pattern for the path part
    literal_prefix: str  # everything before the first placeholder; ends with '/'
    shape: str  # the template with placeholder names erased, for equality of templates


def _parse_template(where: str, template: str) -> _Template:
    if not template.startswith("/"):
        raise ValueError(f"{where}: template {template!r} must start with '/'")
    segments = template[1:].split("/")
    parts: list[str] = []
    shape: list[str] = []
    names: set[str] = set()
    literal_prefix: str | None = None
    seen_placeholder = False
    for i, segment in enumerate(segments):
        is_last = i == len(segments) - 1
        if "{" in segment or "}" in segment:
            match = _PLACEHOLDER_RE.fullmatch(segment)
            if match is None:
                raise ValueError(
                    f"{where}: template {template!r}: segment {segment!r} must be a whole "
                    "placeholder like {id} or {path...}"
                )
            name, rest = match.group(1), match.group(2)
            if name in names:
                raise ValueError(f"{where}: template {template!r}: placeholder {name!r} repeated")
            names.add(name)
            if rest and not is_last:
                raise ValueError(
                    f"{where}: template {template!r}: {{{name}...}} must be the last segment"
                )
            if literal_prefix is None:
                literal_prefix = "/" + "/".join(segments[:i]) + ("/" if i else "")
            seen_placeholder = True
            parts.append(_SEGMENTS if rest else _ONE_SEGMENT)
            shape.append("{...}" if rest else "{}")
            continue
        if segment == "" and not is_last:
            raise ValueError(f"{where}: template {template!r} has an empty segment ('//')")
        parts.append(re.escape(segment))
        shape.append(segment)
    if not seen_placeholder:
        raise ValueError(f"{where}: template {template!r} has no placeholder: use an exact path")
    literal = "/" + "/".join(s for s in segments if "{" not in s)
    if not is_canonical(literal.replace("//", "/")):
        raise ValueError(f"{where}: template {template!r} has non-canonical literal segments")
    assert literal_prefix is not None
    return _Template("/" + "/".join(parts), literal_prefix, "/" + "/".join(shape))


def _canonical_spelling(path: str) -> str | None:
    """The canonical form of a configured path that has one (``/a%3Ab`` -> ``/a:b``)."""
    try:
        canonical = canonicalize(path)
    except BadRequest:
        return None
    return canonical if canonical != path and "?" not in path and "#" not in path else None


def _path_pattern(where: str, route: Route) -> str:
    if route.path_kind == "template":
        return _parse_template(where, route.path).regex
    if not is_canonical(route.path):
        hint = " (placeholders need path_kind 'template')" if "{" in route.path else ""
        spelling = _canonical_spelling(route.path)
        if not hint and spelling is not None:
            hint = f"; write it as {spelling!r}"
        raise ValueError(
            f"{where}: path {route.path!r} is not canonical and could never match{hint}"
        )
    if route.path_kind == "exact":
        return re.escape(route.path)
    if route.path_kind == "prefix":
        if route.path.endswith("/"):
            return re.escape(route.path) + r"[^\x00]*"
        return re.escape(route.path) + r"(?:/[^\x00]*)?"
    raise ValueError(f"{where}: unknown path kind {route.path_kind!r}")


def _host_pattern(where: str, hosts: Iterable[str]) -> str:
    alternatives = []
    for host in sorted(hosts):
        normal = normalize_host(host) if not host.startswith("*.") else host.lower()
        if normal != host.lower().rstrip(".") or not _HOST_RE.fullmatch(normal):
            raise ValueError(
                f"{where}: host {host!r} must be a bare host name (no port, scheme or path); "
                "a leading '*.' is the only wildcard"
            )
        if normal.startswith("*."):
            alternatives.append(r"[^\x00]+" + re.escape(normal[1:]))
        else:
            alternatives.append(re.escape(normal))
    return "(?:" + "|".join(alternatives) + ")" if alternatives else r"[^\x00]*"


def _method_pattern(where: str, methods: Iterable[str]) -> str:
    ordered = sorted(methods)
    for method in ordered:
        if not _METHOD_RE.fullmatch(method):
            raise ValueError(
                f"{where}: method {method!r} must be upper-case (HTTP methods are case-sensitive)"
            )
    return "(?:" + "|".join(ordered) + ")" if ordered else r"[^\x00]*"


def _route_pattern(where: str, route: Route) -> str:
    return (
        _method_pattern(where, route.methods)
        + _SEP
        + _host_pattern(where, route.hosts)
        + _SEP
        + _path_pattern(where, route)
    )


class RouteTable:
    """An API's routes compiled for first-match lookup. Build once per configuration."""

    __slots__ = ("_regex", "_routes", "api")

    def __init__(self, api: ApiSpec, routes: tuple[Route, ...], regex: re.Pattern[str]) -> None:
        self.api = api
        self._routes = routes
        self._regex = regex

    @classmethod
    def build(cls, api: ApiSpec) -> RouteTable:
        """Compile ``api.routes``; raises ``ValueError`` naming the route for a bad route."""
        alternatives = []
        for i, route in enumerate(api.routes):
            where = f"apis[{api.name}].routes[{i}] ({route.name})"
            alternatives.append(f"(?P<r{i}>{_route_pattern(where, route)})")
        # '(?!)' never matches: an API without routes matches nothing.
        regex = re.compile("|".join(alternatives) or "(?!)")
        return cls(api, api.routes, regex)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def match(self, method: str, host: str, canonical_path: str) -> Route | None:
        """The first route (in config order) matching all three, or ``None``."""
        index = self.match_index(method, host, canonical_path)
        return None if index is None else self._routes[index]

    def match_index(self, method: str, host: str, canonical_path: str) -> int | None:
        """The position in ``routes`` of the first route matching all three, or ``None``."""
        if _SEP in method or _SEP in host:
            return None  # never sent by Envoy; refuse rather than let it shift the fields
        found = self._regex.fullmatch(f"{method}{_SEP}{normalize_host(host)}{_SEP}{canonical_path}")
        if found is None:
            return None
        name = found.lastgroup
        assert name is not None
        return int(name[1:])


class ApiSelector:
    """Assigns a request to one configured API. Build once per configuration."""

    __slots__ = ("_by_name", "_entries")

    def __init__(self, apis: tuple[ApiSpec, ...]) -> None:
        self._by_name: dict[str, ApiSpec] = {}
        entries: list[tuple[int, int, int, str, frozenset[str], ApiSpec]] = []
        for order, api in enumerate(apis):
            if api.name in self._by_name:
                raise ValueError(f"apis[{order}]: duplicate API name {api.name!r}")
            self._by_name[api.name] = api
            hosts = frozenset(normalize_host(h) for h in api.match_hosts)
            prefixes = api.match_path_prefixes or (("/",) if hosts else ())
            for prefix in prefixes:
                if not prefix.startswith("/") or not is_canonical(prefix):
                    raise ValueError(
                        f"apis[{order}].match.path_prefixes: {prefix!r} is not a canonical path"
                    )
                # Longest prefix first; among equals an API that names its hosts first; then
                # config order.
                entries.append((-len(prefix), 0 if hosts else 1, order, prefix, hosts, api))
        entries.sort(key=lambda e: (e[0], e[1], e[2]))
        self._entries = tuple((e[3], e[4], e[5]) for e in entries)

    def select(self, context: Mapping[str, str], host: str, canonical_path: str) -> ApiSpec | None:
        name = context.get("api")
        if name is not None:
            return self._by_name.get(name)
        normal = normalize_host(host)
        for prefix, hosts, api in self._entries:
            if hosts and normal not in hosts:
                continue
            if prefix_matches(prefix, canonical_path):
                return api
        return None


# ------------------------------------------------------------------------- unreachable routes


def _hosts_cover(earlier: frozenset[str], later: frozenset[str]) -> bool:
    if not earlier:
        return True
    if not later:
        return False
    norm_earlier = {h.lower().rstrip(".") for h in earlier}
    wildcards = tuple(h[1:] for h in norm_earlier if h.startswith("*."))
    for host in later:
        h = host.lower().rstrip(".")
        if h in norm_earlier:
            continue
        base = h[2:] if h.startswith("*.") else h
        if not any(base.endswith(suffix) for suffix in wildcards):
            return False
    return True


def _methods_cover(earlier: frozenset[str], later: frozenset[str]) -> bool:
    return not earlier or (bool(later) and later <= earlier)


def _path_covers(where: str, earlier: Route, later: Route) -> bool:
    if earlier.path_kind == "prefix":
        if later.path_kind == "template":
            return prefix_matches(earlier.path, _parse_template(where, later.path).literal_prefix)
        return prefix_matches(earlier.path, later.path)
    if earlier.path_kind == "exact":
        return later.path_kind == "exact" and later.path == earlier.path
    # earlier is a template
    parsed = _parse_template(where, earlier.path)
    if later.path_kind == "exact":
        return re.fullmatch(parsed.regex, later.path) is not None
    if later.path_kind == "template":
        return parsed.shape == _parse_template(where, later.path).shape
    return False


def unreachable_routes(api: ApiSpec) -> list[str]:
    """Warnings for routes that can never match because an earlier route matches everything they
    match (methods, hosts and path all covered). Assumes ``RouteTable.build(api)`` succeeds."""
    warnings: list[str] = []
    for j, later in enumerate(api.routes):
        for i, earlier in enumerate(api.routes[:j]):
            where = f"apis[{api.name}].routes[{i}]"
            if (
                _methods_cover(earlier.methods, later.methods)
                and _hosts_cover(earlier.hosts, later.hosts)
                and _path_covers(where, earlier, later)
            ):
                warnings.append(
                    f"apis[{api.name}].routes[{j}] ({later.name}) is unreachable: "
                    f"routes[{i}] ({earlier.name}) matches every request it matches"
                )
                break
    return warnings
