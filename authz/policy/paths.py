"""Request-path canonicalisation: the one string that route matching, and nothing else, looks at.

``canonicalize(raw)`` turns Envoy's ``:path`` into the form the route table matches, or raises
``BadRequest(non_canonical_path)`` when the path could mean different things to us and to the
backend (the class of bug behind CVE-2019-9901 and istio#27409). The rules, in order:

1. Drop the query (``?...``) and fragment (``#...``).
2. Reject what cannot be canonicalised safely: no leading ``/`` (including ``*`` and the empty
   path), non-ASCII characters, control characters (raw or encoded, ``%00``-``%1F`` and ``%7F``),
   ``\\`` and ``%5C``, encoded ``/`` (``%2F``), ``;`` and ``%3B`` (path parameters), and ``%`` not
   followed by two hex digits.
3. Percent-decode every character that is legal raw in a segment (RFC 3986 ``pchar``): the
   unreserved ``A-Z a-z 0-9 - . _ ~``, the sub-delims ``! $ & ' ( ) * + , =`` and ``: @``, so
   ``/orders/export%3Aall`` is ``/orders/export:all`` (backends decode before they route; a
   spelling must not pick another rule). ``%2B`` is ``+`` and ``+`` is never a space (paths are
   not form-encoded). Every other escape stays encoded with upper-case hex digits
   (``%c3%a9`` -> ``%C3%A9``); ``%25`` stays ``%25`` (no double decoding). Raw printable characters
   that are not allowed in a path segment (space and ``" < > [ ] ^ ` { | }``) are percent-encoded,
   so a raw and an encoded spelling canonicalise alike.
4. Remove dot segments (RFC 3986 §5.2.4) *after* decoding, so ``/public/%2e%2e/admin`` is
   ``/admin`` and is matched as ``/admin``. A ``..`` that would climb above the root is rejected
   (RFC 3986 would silently drop it).
5. Merge repeated slashes (``//admin`` -> ``/admin``). A ``..`` that would remove an *empty*
   segment (``/public//../admin``) is rejected: backends that merge slashes first see ``/admin``,
   RFC-order backends see ``/public/admin``, and we refuse to guess which one is behind us.

Matching is case-sensitive: ``/ADMIN`` and ``/admin`` are different paths (as in Envoy). Backends
that fold case must be fronted by routes that cover every spelling, or by a deny default.

Canonicalisation is idempotent: ``canonicalize(canonicalize(p)) == canonicalize(p)``. Already
canonical paths (the common case) are recognised by one precompiled regex and returned unchanged.

Pure module: no grpc, prometheus, asyncio or network imports.
"""

from __future__ import annotations

import re

from authz.policy.errors import BadRequest, Code

__all__ = ["canonicalize", "is_canonical"]

# pchar (RFC 3986) minus '%' (escapes take the slow path) and ';' (path parameters are rejected).
_SEGMENT_CHARS = r"A-Za-z0-9\-._~!$&'()*+,=:@"
# A canonical path: '/' or '/'-separated non-empty segments that are not '.' or '..', optionally
# with one trailing '/'.
_CANONICAL = re.compile(
    rf"/|(?:/(?!\.\.?(?:/|\Z))[{_SEGMENT_CHARS}]+)+/?",
)
_UNRESERVED = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~",
)
# Escapes decoded to their character: unreserved plus the pchar sub-delims and ':' '@' (';' is
# rejected below). Each means the same raw or encoded to a backend that decodes before routing.
_DECODED = _UNRESERVED | frozenset("!$&'()*+,=:@")
# Raw printable ASCII that is legal in a request target on the wire in practice but not in a path
# segment: normalised to its escape so that both spellings are one path.
_ENCODE_RAW = frozenset(' "<>[]^`{|}')
_ESCAPE_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _reject(reason: str) -> BadRequest:
    # Reasons are fixed phrases: the path itself never goes into a public reason.
    return BadRequest(Code.NON_CANONICAL_PATH, reason)


def _decode_escape(match: re.Match[str]) -> str:
    value = int(match.group(1), 16)
    char = chr(value)
    if char in _DECODED:
        return char
    if value == 0x2F:
        raise _reject("encoded '/' in path")
    if value == 0x5C:
        raise _reject("encoded backslash in path")
    if value == 0x3B:
        raise _reject("path parameters (';') are not accepted")
    if value < 0x20 or value == 0x7F:
        raise _reject("control character in path")
    return f"%{value:02X}"


def _normalise_segment(segment: str) -> str:
    if "%" in segment:
        if _BAD_ESCAPE_RE.search(segment):
            raise _reject("invalid percent escape in path")
        segment = _ESCAPE_RE.sub(_decode_escape, segment)
    if any(c in _ENCODE_RAW for c in segment):
        segment = "".join(f"%{ord(c):02X}" if c in _ENCODE_RAW else c for c in segment)
    return segment


def _check_raw(path: str) -> None:
    if not path.startswith("/"):
        raise _reject("path must start with '/'")
    if not path.isascii():
        raise _reject("non-ASCII character in path")
    if not path.isprintable():  # for ASCII: any control character, including NUL, TAB and DEL
        raise _reject("control character in path")
    if "\\" in path:
        raise _reject("backslash in path")
    if ";" in path:
        raise _reject("path parameters (';') are not accepted")


def canonicalize(raw_path: str) -> str:
    """Return the canonical form of ``raw_path`` (query and fragment dropped).

    Raises ``BadRequest(Code.NON_CANONICAL_PATH)`` for anything listed in the module docstring.
    """
    path = raw_path
    cut = path.find("?")
    if cut >= 0:
        path = path[:cut]
    cut = path.find("#")
    if cut >= 0:
        path = path[:cut]
    if _CANONICAL.fullmatch(path):
        return path
    return _canonicalize_slow(path)


def _canonicalize_slow(path: str) -> str:
    _check_raw(path)
    segments = path[1:].split("/")
    last = len(segments) - 1
    # Interior empty segments are kept (as "") until the end so that a '..' consuming one can be
    # detected: that is exactly where slash-merging order changes the result.
    out: list[str] = []
    trailing = False
    for i, raw in enumerate(segments):
        segment = _normalise_segment(raw)
        if segment in ("", "."):
            if i == last:
                trailing = True
            elif segment == "":
                out.append("")
            continue
        if segment == "..":
            if not out:
                raise _reject("'..' above the root")
            if out.pop() == "":
                raise _reject("'..' after an empty segment is ambiguous")
            trailing = i == last
            continue
        out.append(segment)
    kept = [s for s in out if s]
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if trailing else "")


def is_canonical(path: str) -> bool:
    """True when ``path`` is its own canonical form (used to validate configured route paths)."""
    try:
        return canonicalize(path) == path and "?" not in path and "#" not in path
    except BadRequest:
        return False
