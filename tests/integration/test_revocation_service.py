"""Revocation with the real app in-process: the dev IdP over HTTP, the admin listener's API
(protected by our own engine: role required), the CLI on the file and on the API, hot reload of
the file (bad file: last good kept), rule expiry, and the audit of every change."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import prometheus_client as prom
import pytest

from authz import cli
from authz import config as config_mod
from authz.dev.idp import CONTOSO, FABRIKAM, DevIdP
from authz.dev.stack import ADMIN_AUDIENCE, ADMIN_ROLE, stack_config
from authz.observability import AuditLog, Metrics
from authz.policy.model import RequestAttrs
from authz.revocation import RevocationFileError
from authz.server.app import App
from authz.service import Service

pytestmark = pytest.mark.integration


@pytest.fixture
def idp() -> Iterator[DevIdP]:
    with DevIdP(tenants=(CONTOSO, FABRIKAM)) as idp:
        yield idp


class Running:
    def __init__(self, app: App, audit: io.StringIO, registry: prom.CollectorRegistry) -> None:
        self.app = app
        self.service = app.service
        self.audit = audit
        self.registry = registry
        self.url = f"http://127.0.0.1:{app.admin_port}"

    async def check(self, token: str | None) -> Any:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        return await self.service.check(
            RequestAttrs(method="GET", path="/orders/7", headers=headers, request_id="r-1")
        )

    async def api(
        self, method: str, path: str = "", token: str | None = None, **kw: Any
    ) -> httpx.Response:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        async with httpx.AsyncClient(trust_env=False) as c:
            return await c.request(
                method, f"{self.url}/admin/revocations{path}", headers=headers, timeout=5, **kw
            )

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def audit_events(self) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.audit.getvalue().splitlines()]
        return [x for x in lines if "event" in x]


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, idp: DevIdP, extra: str = "") -> AsyncIterator[Running]:
    path = tmp_path / "authz.yaml"
    text = stack_config(idp.base_url, revocations=tmp_path / "revocations.json")
    path.write_text(text + extra)
    registry = prom.CollectorRegistry()
    audit = io.StringIO()
    service = Service(
        config_mod.load(path),
        metrics=Metrics(registry),
        audit=AuditLog(audit),
        config_path=str(path),
    )
    app = App(
        service,
        metrics_body=lambda: (prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST),
        grpc_listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        watch_interval_s=0.1,
    )
    await app.start()
    try:
        yield Running(app, audit, registry)
    finally:
        await app.stop()


@pytest.fixture
async def running(tmp_path: Path, idp: DevIdP) -> AsyncIterator[Running]:
    async with serve(tmp_path, idp) as r:
        yield r


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


VICTIM = "99999999-9999-4999-8999-999999999999"  # not the admin's oid (the dev user's)


def user(idp: DevIdP, **kw: Any) -> str:
    kw.setdefault("oid", VICTIM)
    return idp.mint(aud="api://orders", scp="Orders.Read", **kw)


def admin(idp: DevIdP, **kw: Any) -> str:
    kw.setdefault("roles", (ADMIN_ROLE,))
    return idp.mint(aud=ADMIN_AUDIENCE, **kw)


def oid_of(token: str) -> str:
    import jwt

    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return str(claims["oid"])


# ------------------------------------------------------------------------------ admin API


async def test_the_admin_api_needs_a_token_with_the_role(running: Running, idp: DevIdP) -> None:
    body = {"oid": oid_of(user(idp)), "expires_in": 600, "reason": "stolen laptop"}
    no_token = await running.api("POST", json=body)
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == 'Bearer realm="authz-admin"'
    wrong_api = await running.api("POST", token=user(idp, roles=(ADMIN_ROLE,)), json=body)
    assert (wrong_api.status_code, wrong_api.json()["code"]) == (401, "audience_mismatch")
    no_role = await running.api("POST", token=admin(idp, roles=("Other.Role",)), json=body)
    assert (no_role.status_code, no_role.json()["code"]) == (403, "missing_role")
    assert f'scope="{ADMIN_ROLE}"' in no_role.headers["www-authenticate"]
    listing = await running.api("GET", token=admin(idp, roles=None))
    assert listing.status_code == 403  # reading needs the role too
    assert running.service.revocations.current.rules == ()  # nothing was added
    denied = [e for e in running.audit_events() if e["event"] == "admin_api_denied"]
    assert [e["status"] for e in denied] == [401, 401, 403, 403]
    assert "eyJ" not in running.audit.getvalue()


async def test_a_rule_added_through_the_api_denies_the_next_request(
    running: Running, idp: DevIdP, tmp_path: Path
) -> None:
    victim = user(idp)
    assert (await running.check(victim)).allowed  # its claims are now cached
    hits = running.service._state.cache.hits  # type: ignore[union-attr]
    token = admin(idp)
    r = await running.api(
        "POST",
        token=token,
        json={
            "id": "stolen-laptop",
            "oid": oid_of(victim),
            "issued_before": "now",
            "expires_in": 600,
            "reason": "laptop reported stolen",
        },
    )
    assert r.status_code == 201, r.text
    rule = r.json()["rule"]
    assert (rule["id"], rule["source"]) == ("stolen-laptop", "file")
    assert rule["created_by"].startswith(f"admin_api:oid={oid_of(token)},tid={CONTOSO}")
    d = await running.check(victim)  # the very next request, no poll needed in this process
    assert (d.status, d.code) == (401, "token_revoked")
    assert running.service._state.cache.hits == hits + 1  # type: ignore[union-attr]
    assert (await running.check(user(idp, iat_offset=5))).allowed  # issued after: passes
    # persisted in the file, and listed
    saved = json.loads((tmp_path / "revocations.json").read_text())["rules"]
    assert [x["id"] for x in saved] == ["stolen-laptop"]
    listing = (await running.api("GET", token=token)).json()["rules"]
    assert [x["id"] for x in listing] == ["stolen-laptop"]
    one = await running.api("GET", "/stolen-laptop", token=token)
    assert one.json()["rule"]["reason"] == "laptop reported stolen"
    # removed: the same token passes again
    gone = await running.api("DELETE", "/stolen-laptop", token=token)
    assert gone.status_code == 200
    assert gone.json()["removed"]["id"] == "stolen-laptop"
    assert (await running.check(victim)).allowed
    events = {e["event"]: e for e in running.audit_events()}
    added = events["revocation_added"]
    assert (added["via"], added["by"]["oid"], added["rule"]["id"]) == (
        "admin_api",
        oid_of(token),
        "stolen-laptop",
    )
    assert events["revocation_removed"]["rule"]["id"] == "stolen-laptop"
    changed = [e for e in running.audit_events() if e["event"] == "revocation_rules_changed"]
    assert [(e["added"], e["removed"]) for e in changed] == [
        (["stolen-laptop"], []),
        ([], ["stolen-laptop"]),
    ]
    assert "eyJ" not in running.audit.getvalue()


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "expect"),
    [
        ("POST", "", {"content": b"{}", "headers": {"content-type": "text/plain"}}, 415, ""),
        (
            "POST",
            "",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "not JSON",
        ),
        ("POST", "", {"json": {"expires_in": 60, "reason": "x"}}, 400, "rule: name at least one"),
        ("POST", "", {"json": {"oid": "nope", "expires_in": 60, "reason": "x"}}, 400, "rule.oid"),
        (
            "POST",
            "",
            {"json": {"uti": "u", "expires_in": 10**7, "reason": "x"}},
            400,
            "rule.expires_at",
        ),
        (
            "POST",
            "",
            {"json": {"uti": "u", "expires_in": 60, "reason": "x", "created_by": "me"}},
            400,
            "set by the server",
        ),
        (
            "POST",
            "",
            {"content": b"x" * 70000, "headers": {"content-type": "application/json"}},
            413,
            "",
        ),
        ("DELETE", "/nope", {}, 404, "no rule"),
        ("GET", "/nope", {}, 404, "no rule"),
        ("PUT", "", {}, 405, "use GET, POST"),
        ("POST", "/x", {}, 405, "use GET, DELETE"),
        ("GET", "/a/b", {}, 404, "no such resource"),
    ],
    ids=[
        "not-json-type",
        "bad-json",
        "no-matcher",
        "bad-guid",
        "beyond-max-lifetime",
        "spoofed-created-by",
        "too-large",
        "delete-unknown",
        "get-unknown",
        "bad-method",
        "post-on-item",
        "nested-path",
    ],
)
async def test_bad_admin_requests_get_json_errors(
    running: Running,
    idp: DevIdP,
    method: str,
    path: str,
    kw: dict[str, Any],
    status: int,
    expect: str,
) -> None:
    r = await running.api(method, path, token=admin(idp), **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert expect in r.text
    assert running.service.revocations.current.rules == ()


async def test_a_duplicate_id_is_a_conflict(running: Running, idp: DevIdP) -> None:
    body = {"id": "same", "uti": "abc", "expires_in": 60, "reason": "x"}
    assert (await running.api("POST", token=admin(idp), json=body)).status_code == 201
    again = await running.api("POST", token=admin(idp), json=body)
    assert again.status_code == 409
    assert "already exists" in again.json()["message"]


async def test_the_api_never_overwrites_a_bad_file(
    running: Running, idp: DevIdP, tmp_path: Path
) -> None:
    (tmp_path / "revocations.json").write_text('{"rules": [{"id": "x"}]}')
    r = await running.api(
        "POST", token=admin(idp), json={"uti": "abc", "expires_in": 60, "reason": "x"}
    )
    assert r.status_code == 409
    assert any("rules[0]" in p for p in r.json()["problems"])
    assert (tmp_path / "revocations.json").read_text() == '{"rules": [{"id": "x"}]}'


async def test_a_revoked_admin_token_cannot_use_the_api(running: Running, idp: DevIdP) -> None:
    token = admin(idp)
    body = {"oid": oid_of(token), "expires_in": 600, "reason": "admin account compromised"}
    assert (await running.api("POST", token=token, json=body)).status_code == 201
    again = await running.api("GET", token=token)
    assert (again.status_code, again.json()["code"]) == (401, "token_revoked")


# ------------------------------------------------------------------------------------ CLI


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_cli_on_the_file_is_picked_up_and_expiry_restores_access(
    running: Running, idp: DevIdP, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = user(idp)
    assert (await running.check(victim)).allowed
    config = running.service.config_path or ""
    code, out, err = run_cli(
        "revoke", "add", "--config", config, "--oid", oid_of(victim), "--expires-in", "2s",
        "--reason", "compromised", "--id", "short", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("added rule short to ")
    audit = json.loads(err.strip().splitlines()[-1])
    assert (audit["event"], audit["via"], audit["rule"]["id"]) == (
        "revocation_added",
        "cli",
        "short",
    )

    async def revoked() -> bool:
        return (await running.check(victim)).code == "token_revoked"

    await wait_for(revoked)  # the file poll (0.2 s in the stack config) brought it in

    async def allowed_again() -> bool:
        return bool((await running.check(victim)).allowed)

    await wait_for(allowed_again)  # the rule expired: the same token passes again
    code, out, _ = run_cli("revoke", "list", "--config", config, capsys=capsys)
    assert (code, out.splitlines()[0]) == (0, "0 rule(s) in force")


async def test_a_bad_file_keeps_the_last_good_rules(
    running: Running, idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = user(idp)
    config = running.service.config_path or ""
    code, _, err = run_cli(
        "revoke", "add", "--config", config, "--uti", "x", "--oid", oid_of(victim),
        "--expires-in", "10m", "--reason", "r", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err

    async def loaded() -> bool:
        return len(running.service.revocations.current) == 1

    await wait_for(loaded)
    file = tmp_path / "revocations.json"
    good = file.read_text()
    file.write_text(good.replace('"reason": "r"', '"reason": ""'))

    async def rejected() -> bool:
        labels = {"source": "file", "result": "invalid"}
        return running.metric("authz_revocation_reloads_total", labels) >= 1

    await wait_for(rejected)
    assert len(running.service.revocations.current) == 1  # the last good rules stay
    code, _, err = run_cli("check-config", config, capsys=capsys)
    assert code == 2
    assert "rules[0].reason: required" in err
    # the CLI refuses to write over a bad file too
    code, _, err = run_cli("revoke", "remove", "--config", config, "x", capsys=capsys)
    assert code == 2
    assert "rules[0].reason" in err


async def test_the_cli_through_the_admin_api(
    running: Running,
    idp: DevIdP,
    capsys: pytest.CaptureFixture[str],
) -> None:
    victim = user(idp)
    assert (await running.check(victim)).allowed
    base = ("--url", running.url)
    code, _, err = await asyncio.to_thread(
        run_cli, "revoke", "add", *base, "--token", admin(idp, roles=None), "--oid",
        oid_of(victim), "--expires-in", "1h", "--reason", "x", capsys=capsys,
    )  # fmt: skip
    assert code == 1
    assert "403" in err
    assert "missing_role" in err
    # a real process, the token from $AUTHZ_ADMIN_TOKEN (kept out of argv and shell history)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "authz", "revoke", "add", *base, "--oid", oid_of(victim),
         "--issued-before", "now", "--expires-in", "1h", "--reason", "offboarded", "--id",
         "via-api"],
        env={**os.environ, "AUTHZ_ADMIN_TOKEN": admin(idp)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"added rule via-api via {running.url}")
    assert (await running.check(victim)).code == "token_revoked"
    token = ("--token", admin(idp))
    code, out, _ = await asyncio.to_thread(
        run_cli, "revoke", "list", *base, *token, "--json", capsys=capsys
    )
    assert [r["id"] for r in json.loads(out)["rules"]] == ["via-api"]
    code, out, _ = await asyncio.to_thread(
        run_cli, "revoke", "remove", *base, *token, "via-api", capsys=capsys
    )
    assert code == 0
    assert (await running.check(victim)).allowed


# -------------------------------------------------------------------------- startup, reload


def test_a_server_does_not_start_on_a_bad_revocation_file(tmp_path: Path, idp: DevIdP) -> None:
    path = tmp_path / "authz.yaml"
    path.write_text(stack_config(idp.base_url, revocations=tmp_path / "revocations.json"))
    (tmp_path / "revocations.json").write_text('{"rules": [{"id": "x", "reason": "r"}]}')
    with pytest.raises(RevocationFileError) as err:
        Service(
            config_mod.load(path),
            metrics=Metrics(prom.CollectorRegistry()),
            audit=AuditLog(io.StringIO()),
        )
    assert "rules[0].expires_at: required key is missing" in str(err.value)
    served = subprocess.run(
        [sys.executable, "-m", "authz", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert served.returncode == 2
    assert "rules[0].expires_at: required key is missing" in served.stderr
    assert "not starting" in served.stderr


async def test_a_reload_to_another_file_reads_it_first(
    running: Running, idp: DevIdP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.yaml"
    code, _, err = run_cli(
        "revoke", "add", "--file", str(other), "--oid", oid_of(user(idp)), "--expires-in", "1h",
        "--reason", "moved", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert other.read_text().startswith("# Revocation rules")  # YAML for a non-.json name
    config = Path(running.service.config_path or "")
    config.write_text(config.read_text().replace(str(tmp_path / "revocations.json"), str(other)))
    await running.service.reload()
    assert (await running.check(user(idp))).code == "token_revoked"
    # a reload to a bad file is refused whole; the rules in force stay
    other.write_text("rules: [{id: x}]\n")
    config.write_text(
        config.read_text().replace("poll_interval_seconds: 0.2", "poll_interval_seconds: 0.3")
    )
    assert await running.service.reload() is False
    assert (await running.check(user(idp))).code == "token_revoked"
    # and a config without a file drops the file's rules
    config.write_text(
        config.read_text()
        .replace(f'file: "{other}"', 'file: ""')
        .replace("enabled: true", "enabled: false")
    )
    assert await running.service.reload() is True
    assert (await running.check(user(idp))).allowed
