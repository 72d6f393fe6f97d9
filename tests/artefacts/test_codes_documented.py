"""README's table of denial codes is the documentation of record: it must list every code, with
the meaning the code itself carries."""

from __future__ import annotations

import re
from pathlib import Path

from authz.policy.errors import MEANING, Code

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> dict[str, str]:
    rows = {}
    section = README.read_text().split("\n## Denial codes\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        m = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = m.group(3).replace("\\|", "|")
    return rows


def test_every_code_is_in_the_readme_table() -> None:
    table = _table()
    assert sorted(table) == sorted(c.value for c in Code)


def test_meanings_match() -> None:
    table = _table()
    for code in Code:
        assert table[code.value] == MEANING[code], code
