"""The revocation file and config section: validation with key paths, JSON and YAML, times,
expired rules dropped, atomic locked writes, the store's merge/audit/prune, and the
``revocation:`` section of the config."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from authz import config as config_mod
from authz.policy.revocation import RevocationRule
from authz.revocation import (
    FileSource,
    RevocationConflict,
    RevocationFileError,
    RevocationStore,
    UnknownRule,
    epoch,
    load_file,
    locked,
    new_rule,
    render_file,
    rules_from_document,
)

NOW = 1_700_000_000
OID = "55555555-5555-4555-8555-555555555555"
MAX = 90_000.0


def rules(doc: Any, now: float = NOW) -> list[RevocationRule]:
    return rules_from_document(doc, now=now, max_lifetime_s=MAX)[0]


def problems(doc: Any) -> list[str]:
    with pytest.raises(RevocationFileError) as err:
        rules_from_document(doc, now=NOW, max_lifetime_s=MAX)
    return list(err.value.problems)


def good(**kw: Any) -> dict[str, Any]:
    return {"id": "r1", "oid": OID, "reason": "x", "expires_at": NOW + 60, **kw}


# ------------------------------------------------------------------------------ the format


def test_an_empty_document_holds_no_rules() -> None:
    assert rules(None) == []
    assert rules({}) == []
    assert rules({"rules": []}) == []


def test_a_rule_is_read_with_every_field() -> None:
    [r] = rules(
        {
            "rules": [
                good(
                    sub="s",
                    tid="11111111-1111-4111-8111-111111111111",
                    uti="u",
                    sid="sid",
                    appid="AAAAAAAA-0000-4000-8000-00000000000A",
                    issued_before="2023-11-14T22:13:20Z",
                    created_at=NOW - 5,
                    created_by="ops",
                )
            ]
        }
    )
    assert r == RevocationRule(
        id="r1",
        reason="x",
        expires_at=NOW + 60,
        oid=OID,
        sub="s",
        azp="aaaaaaaa-0000-4000-8000-00000000000a",  # appid is azp; GUIDs lower-cased
        tid="11111111-1111-4111-8111-111111111111",
        uti="u",
        sid="sid",
        issued_before=NOW,
        created_at=NOW - 5,
        created_by="ops",
    )


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([], "(top level): expected a mapping {rules: [...]}"),
        ({"rule": []}, "rule: unknown key"),
        ({"rules": [good(oid=7)]}, "rules[0].oid: expected a string (got 7)"),
        ({"rules": [good(extra=1)]}, "rules[0].extra: unknown key"),
        ({"rules": [{"id": "r1", "oid": OID, "reason": "x"}]}, "rules[0].expires_at: required"),
        ({"rules": [good(expires_at="tomorrow")]}, "rules[0].expires_at: expected Unix seconds"),
        (
            {"rules": [good(expires_at="2026-12-03T10:00:00")]},
            "rules[0].expires_at: the time has no zone",
        ),
        (
            {"rules": [good(expires_at=True)]},
            "rules[0].expires_at: expected a time, not true/false",
        ),
        ({"rules": [good(expires_at=-1)]}, "rules[0].expires_at: expected Unix seconds between"),
        ({"rules": [good(expires_at=[1])]}, "rules[0].expires_at: expected Unix seconds or an ISO"),
        ({"rules": [good(oid="")]}, "rules[0]: name at least one of"),
        ({"rules": [good(oid="not-a-guid")]}, "rules[0].oid: expected a lower-case GUID"),
        ({"rules": [good(expires_at=NOW + 10**6)]}, "rules[0].expires_at: more than max_rule"),
        ({"rules": [good(azp=OID, appid=OID.replace("5", "6"))]}, "rules[0]: azp and appid"),
        ({"rules": [good(), good()]}, "rules[1].id: duplicate rule id 'r1' (also rules[0])"),
    ],
    ids=[
        "list-document",
        "misspelt-section",
        "non-string",
        "unknown-key",
        "no-expiry",
        "bad-time",
        "naive-time",
        "bool-time",
        "negative-time",
        "list-time",
        "no-matcher",
        "bad-guid",
        "beyond-max",
        "azp-and-appid",
        "duplicate-id",
    ],
)
def test_problems_name_the_key_path(doc: Any, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(doc)), problems(doc)


def test_every_problem_is_reported_in_one_pass() -> None:
    found = problems({"rules": [good(oid="x"), good(id="r2", reason="")]})
    assert [p.split(":")[0] for p in found] == ["rules[0].oid", "rules[1].reason"]


def test_expired_rules_are_dropped_not_refused() -> None:
    kept, expired = rules_from_document(
        {"rules": [good(expires_at=NOW - 1), good(id="r2")]}, now=NOW, max_lifetime_s=MAX
    )
    assert ([r.id for r in kept], expired) == (["r2"], 1)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (NOW, NOW),
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T23:13:20+01:00", NOW),
    ],
)
def test_times(value: Any, expected: int) -> None:
    assert epoch(value) == expected


def test_json_and_yaml_files(tmp_path: Path) -> None:
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"rules": [good()]}))
    assert [r.id for r in load_file(str(j), now=NOW, max_lifetime_s=MAX)[0]] == ["r1"]
    y = tmp_path / "r.yaml"
    y.write_text(
        f"rules:\n  - {{id: r1, oid: '{OID}', reason: x, expires_at: 2023-11-14T22:14:20Z}}\n"
    )
    [r] = load_file(str(y), now=NOW, max_lifetime_s=MAX)[0]
    assert r.expires_at == NOW + 60  # a YAML timestamp with a zone
    assert load_file(str(tmp_path / "absent.json"), now=NOW, max_lifetime_s=MAX) == ([], 0, False)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("r.json", '{"rules": [], "rules": []}', "not valid JSON: duplicate key 'rules'"),
        ("r.json", '{"rules": [NaN]}', "not valid JSON: NaN is not JSON"),
        ("r.json", "{", "not valid JSON"),
        ("r.yaml", "rules: []\nrules: []\n", "rules: duplicate key 'rules' on line 2"),
        ("r.yaml", "rules: [", "line 1"),
        ("r.yaml", b"\xff", "not UTF-8"),
    ],
    ids=["json-dup", "json-nan", "json-syntax", "yaml-dup", "yaml-syntax", "not-utf8"],
)
def test_unreadable_files_are_refused_whole(
    tmp_path: Path, name: str, text: str | bytes, expected: str
) -> None:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(RevocationFileError) as err:
        load_file(str(path), now=NOW, max_lifetime_s=MAX)
    assert any(expected in p for p in err.value.problems), err.value.problems
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------- new rules


def test_new_rule_takes_expires_in_and_issued_before_now() -> None:
    r = new_rule(
        {"oid": OID, "issued_before": "now", "expires_in": 600, "reason": "x"},
        now=NOW + 0.5,
        max_lifetime_s=MAX,
        created_by="me",
    )
    assert (r.issued_before, r.expires_at, r.created_at, r.created_by) == (
        NOW + 1,  # this very second included
        NOW + 600,
        NOW,
        "me",
    )
    assert r.id.startswith("r-")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("x", "rule: expected an object"),
        ({"oid": OID, "reason": "x", "expires_in": 0}, "rule.expires_in: expected a positive"),
        ({"oid": OID, "reason": "x", "expires_in": 1, "expires_at": 1}, "rule.expires_in: set one"),
        ({"oid": OID, "reason": "x", "expires_in": 1, "created_by": "me"}, "rule.created_by"),
        (
            {"oid": OID, "reason": "x", "expires_at": NOW - 1},
            "rule.expires_at: already in the past",
        ),
        ({"reason": "x", "expires_in": 60}, "rule: name at least one"),
    ],
)
def test_new_rule_problems(data: Any, expected: str) -> None:
    with pytest.raises(RevocationFileError) as err:
        new_rule(data, now=NOW, max_lifetime_s=MAX, created_by="me")
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


# ---------------------------------------------------------------------------------- writes


def source(tmp_path: Path, name: str = "r.json") -> FileSource:
    return FileSource(str(tmp_path / name), max_lifetime_s=MAX, clock=lambda: float(NOW))


def rule(rule_id: str = "r1", **kw: Any) -> RevocationRule:
    kw.setdefault("expires_at", NOW + 60)
    return RevocationRule(id=rule_id, reason="x", oid=OID, **kw)


@pytest.mark.parametrize("name", ["r.json", "r.yaml"])
def test_add_and_remove_round_trip(tmp_path: Path, name: str) -> None:
    src = source(tmp_path, name)
    assert src.add(rule("a")) == (rule("a"),)
    assert src.add(rule("b", issued_before=NOW)) == (rule("a"), rule("b", issued_before=NOW))
    assert src.load()[0] == [rule("a"), rule("b", issued_before=NOW)]
    with pytest.raises(RevocationConflict, match="already exists"):
        src.add(rule("a"))
    removed, left = src.remove("a")
    assert (removed, left) == (rule("a"), (rule("b", issued_before=NOW),))
    with pytest.raises(UnknownRule):
        src.remove("a")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers


def test_a_write_keeps_the_files_mode_and_is_a_rename(tmp_path: Path) -> None:
    src = source(tmp_path)
    src.add(rule("a"))
    os.chmod(src.path, 0o600)
    before = os.stat(src.path).st_ino
    src.add(rule("b"))
    st = os.stat(src.path)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_ino != before  # a new file renamed over the old one, never rewritten in place


def test_a_write_refuses_a_bad_file_and_an_invalid_rule(tmp_path: Path) -> None:
    src = source(tmp_path)
    Path(src.path).write_text('{"rules": [{"id": "x"}]}')
    with pytest.raises(RevocationFileError):
        src.add(rule("a"))
    assert Path(src.path).read_text() == '{"rules": [{"id": "x"}]}'
    Path(src.path).unlink()
    with pytest.raises(RevocationFileError, match=r"rule\.expires_at"):
        src.add(rule("a", expires_at=NOW + 10**6))


def test_a_held_lock_makes_a_writer_give_up(tmp_path: Path) -> None:
    src = source(tmp_path)
    release = threading.Event()
    held = threading.Event()

    def hold() -> None:
        with locked(src.path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        with (
            pytest.raises(RevocationConflict, match="held by another writer"),
            locked(src.path, timeout_s=0.05),
        ):
            pass
    finally:
        release.set()
        t.join()
    src.add(rule("a"))  # free again


def test_render_file_is_what_load_reads(tmp_path: Path) -> None:
    r = rule("a", issued_before=NOW, created_at=NOW, created_by="ops")
    for name in ("r.json", "r.yml"):
        path = tmp_path / name
        path.write_text(render_file(str(path), [r]))
        assert load_file(str(path), now=NOW, max_lifetime_s=MAX)[0] == [r]


# ----------------------------------------------------------------------------------- store


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.rules: dict[str, int] = {}

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def on_revocation_rules(self, source: str, rules: int) -> None:
        self.rules[source] = rules


def test_the_store_merges_sources_and_audits_changes() -> None:
    seen = Events()
    store = RevocationStore(audit=seen, observer=seen, clock=lambda: float(NOW))
    store.replace("file", [rule("a")], via="startup")
    store.replace("redis", [rule("b", uti="u")], via="pubsub")
    assert {r.id for r in store.current.rules} == {"a", "b"}
    assert store.find("b") == [("redis", rule("b", uti="u"))]
    store.replace("file", [rule("c")], via="poll")
    store.replace("file", [rule("c")], via="poll")  # no change: no audit line
    assert [(e, f["source"], f["added"], f["removed"]) for e, f in seen.events] == [
        ("revocation_rules_changed", "file", ["a"], []),
        ("revocation_rules_changed", "redis", ["b"], []),
        ("revocation_rules_changed", "file", ["c"], ["a"]),
    ]
    assert seen.rules == {"file": 1, "redis": 1}


async def test_the_store_prunes_expired_rules() -> None:
    now = [float(NOW)]
    seen = Events()
    store = RevocationStore(observer=seen, clock=lambda: now[0])
    store.replace("file", [rule("a", expires_at=NOW + 5), rule("b")])
    assert await store.prune() is False  # nothing expired yet
    assert len(store.current) == 2
    now[0] = NOW + 5
    assert await store.prune() is True
    assert [r.id for r in store.current.rules] == ["b"]
    assert [r.id for r in store.sources()["file"]] == ["b"]
    assert seen.rules == {"file": 1}


async def test_a_threaded_build_swaps_in_the_merged_snapshot() -> None:
    seen = Events()
    store = RevocationStore(audit=seen)
    store.replace("redis", [rule("b", uti="u")])
    await store.replace_async("file", [rule("a")], via="poll")
    assert {r.id for r in store.current.rules} == {"a", "b"}
    assert seen.events[-1][1]["added"] == ["a"]


# ------------------------------------------------------------------------ config section

BASE = """
issuers:
  - {name: contoso, tenant: "11111111-1111-4111-8111-111111111111"}
apis:
  - {name: orders, audiences: ["api://orders"], issuers: [contoso]}
"""


def parse(extra: str, source: str = "") -> config_mod.Settings:
    return config_mod.parse(BASE + extra, source=source, env={})


def config_problems(extra: str) -> list[str]:
    with pytest.raises(config_mod.ConfigError) as err:
        parse(extra)
    return list(err.value.problems)


def test_the_section_defaults_to_off() -> None:
    r = parse("").revocation
    assert (r.file, r.admin_api.enabled, r.max_rule_lifetime_s) == ("", False, 90000.0)


def test_a_relative_file_is_next_to_the_config(tmp_path: Path) -> None:
    r = parse("revocation: {file: rules.json}", source=str(tmp_path / "authz.yaml")).revocation
    assert r.file == str(tmp_path / "rules.json")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("revocation: {admin_api: {enabled: true, audiences: [a], issuers: [contoso], role: R}}",
         "revocation.admin_api.enabled: needs revocation.file"),
        ("revocation: {file: f.json, admin_api: {enabled: true, issuers: [contoso], role: R}}",
         "revocation.admin_api.audiences: required when enabled"),
        ("revocation: {file: f.json, admin_api: {enabled: true, audiences: [a], role: R}}",
         "revocation.admin_api.issuers: required when enabled"),
        ("revocation: {file: f, admin_api: {enabled: true, audiences: [a], issuers: [contoso]}}",
         "revocation.admin_api.role: required when enabled"),
        ("revocation: {admin_api: {issuers: [nobody]}}",
         "revocation.admin_api.issuers[0]: no issuer named 'nobody'"),
        ("revocation: {max_rule_lifetime_seconds: 10}",
         "revocation.max_rule_lifetime_seconds: Input should be greater than or equal to 60"),
        ("revocation: {poll: 1}", "revocation.poll: unknown key"),
        ("revocation: {redis: true}", "revocation.redis: needs redis.url"),
        ("revocation: {redis: true, redis_poll_interval_seconds: 0.001}",
         "revocation.redis_poll_interval_seconds: Input should be greater than or equal to 0.05"),
    ],
    ids=["no-file", "no-audience", "no-issuer", "no-role", "unknown-issuer", "tiny-max", "typo",
         "redis-without-url", "tiny-redis-poll"],
)  # fmt: skip
def test_section_problems_name_the_key(extra: str, expected: str) -> None:
    found = config_problems(extra)
    assert any(p.startswith(expected) for p in found), found


def test_the_admin_api_may_write_to_redis_instead_of_a_file() -> None:
    extra = (
        'redis: {url: "redis://127.0.0.1:6379"}\n'
        "revocation: {redis: true, admin_api: {enabled: true, audiences: [a], issuers: [contoso],"
        " role: R}}"
    )
    r = parse(extra).revocation
    assert (r.redis, r.file, r.admin_api.enabled, r.redis_poll_interval_s) == (True, "", True, 0.2)


def test_rules_written_now_load_later(tmp_path: Path) -> None:
    """A file outlives its rules: what is valid when written stays valid, then expires."""
    path = tmp_path / "r.json"
    src = FileSource(str(path), max_lifetime_s=MAX)
    src.add(new_rule({"uti": "u", "expires_in": 1, "reason": "x"}, now=time.time(),
                     max_lifetime_s=MAX, created_by="t"))  # fmt: skip
    assert len(load_file(str(path), now=time.time(), max_lifetime_s=MAX)[0]) == 1
    assert load_file(str(path), now=time.time() + 2, max_lifetime_s=MAX)[:2] == ([], 1)
