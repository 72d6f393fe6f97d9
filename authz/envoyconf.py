"""Render the Envoy config templates in ``envoy/`` (``${NAME}`` placeholders) into real configs.

The templates under ``envoy/`` are the single source of truth for the shipped Envoy configs; tests
render them with test ports and run ``envoy --mode validate``, and the Kubernetes overlays carry
pre-rendered copies that a test keeps identical to ``render(template, defaults + values file)``.

Template format:
- ``${NAME}`` (``NAME`` = ``[A-Z][A-Z0-9_]*``) is replaced by ``values[NAME]``. Any other ``${`` is
  an error, so a typo cannot silently survive into Envoy.
- ``# @param NAME=default  description`` lines declare each placeholder and its default
  (:func:`defaults` reads them). They document the template and let callers override only what
  differs.

:func:`render` fails loudly (``TemplateError``) on a placeholder without a value, on a value no
placeholder uses (a misspelt override), and on values that could change the YAML's structure
(newlines, control characters, ``${``). It is pure: no file or network access.

Command line (the documented render step)::

    python -m authz.envoyconf envoy/sidecar.yaml [--values FILE] [NAME=VALUE ...] [-o OUT] [--check]

Must not import grpc, prometheus, asyncio or network libraries.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["TemplateError", "defaults", "main", "placeholders", "read_values", "render"]

_NAME = r"[A-Z][A-Z0-9_]*"
_PLACEHOLDER_RE = re.compile(r"\$\{(" + _NAME + r")\}")
_PARAM_RE = re.compile(r"^#\s*@param\s+(" + _NAME + r")=(\S*)(?:\s.*)?$")
_BAD_VALUE_RE = re.compile(r"[\x00-\x1f\x7f]|\$\{")


class TemplateError(ValueError):
    """A template or its values cannot be rendered; the message names every problem."""


def placeholders(template_text: str) -> frozenset[str]:
    """The placeholder names a template uses (outside ``# @param`` declarations)."""
    return frozenset(_PLACEHOLDER_RE.findall(_body(template_text)))


def defaults(template_text: str) -> dict[str, str]:
    """The ``# @param NAME=default`` declarations of a template, in order."""
    found: dict[str, str] = {}
    for line in template_text.splitlines():
        m = _PARAM_RE.match(line.strip())
        if m:
            found[m.group(1)] = m.group(2)
    return found


def render(template_text: str, values: Mapping[str, str]) -> str:
    """Substitute every ``${NAME}``; TemplateError on missing, unknown or unsafe values."""
    problems: list[str] = []
    used = placeholders(template_text)
    problems += [f"missing value for placeholder ${{{n}}}" for n in sorted(used - values.keys())]
    problems += [
        f"unknown placeholder {n!r} (not used by the template)"
        for n in sorted(values.keys() - used)
    ]
    for name, value in sorted(values.items()):
        if not isinstance(value, str):
            problems.append(f"{name}: value must be a string, got {type(value).__name__}")
        elif _BAD_VALUE_RE.search(value):
            problems.append(f"{name}: value contains a control character or '${{'")
    stray = _PLACEHOLDER_RE.sub("", _body(template_text)).count("${")
    if stray:
        problems.append(f"{stray} malformed placeholder(s): use ${{UPPER_CASE_NAME}}")
    if problems:
        raise TemplateError(
            "cannot render Envoy template:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template_text)


def read_values(text: str) -> dict[str, str]:
    """Parse a values file: ``NAME=VALUE`` lines; blank lines and ``#`` comments are ignored."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not re.fullmatch(_NAME, name.strip()):
            raise TemplateError(f"line {number}: expected NAME=VALUE, got {raw!r}")
        values[name.strip()] = value.strip()
    return values


def _body(template_text: str) -> str:
    """The template without its ``# @param`` lines (their ``${...}`` mentions are documentation)."""
    return "\n".join(ln for ln in template_text.splitlines() if not _PARAM_RE.match(ln.strip()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m authz.envoyconf", description="Render an envoy/*.yaml template."
    )
    parser.add_argument("template", type=Path)
    parser.add_argument("overrides", nargs="*", metavar="NAME=VALUE")
    parser.add_argument("--values", type=Path, help="file of NAME=VALUE lines (after defaults)")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if --output differs from the rendering"
    )
    args = parser.parse_args(argv)
    try:
        text = args.template.read_text(encoding="utf-8")
        values = defaults(text)
        if args.values is not None:
            values.update(read_values(args.values.read_text(encoding="utf-8")))
        values.update(read_values("\n".join(args.overrides)))
        rendered = render(text, values)
    except (OSError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(rendered)
        return 0
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != rendered:
            print(
                f"{args.output} is out of date: re-render it from {args.template}", file=sys.stderr
            )
            return 1
        return 0
    args.output.write_text(rendered, encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
