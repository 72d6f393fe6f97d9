"""Revocation through real Envoy, over both ext_authz transports: a rule added with the CLI (on
the server's file) or through the admin API (role required) denies the next request 401
token_revoked -- including a token whose verified claims are cached -- with the CAE claims
challenge for cp1 clients; removing the rule, or its expiry, restores access."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import httpx
import pytest

from authz.dev.stack import Reply, Stack

pytestmark = pytest.mark.e2e


def _cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "authz", "revoke", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done


def _until(stack: Stack, token: str, done: Callable[[Reply], bool], limit_s: float = 15) -> Reply:
    """The first answer that satisfies ``done``, polling at most ``limit_s`` (the file is read
    every 0.2 s in the stack's config; a bound, not a latency claim)."""
    deadline = time.monotonic() + limit_s
    while True:
        r = stack.request("GET", "/orders/7", token=token)
        if done(r) or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def _revoked(r: Reply) -> bool:
    return r.status == 401 and r.json()["code"] == "token_revoked"


def _claims_of(www: str) -> object:
    return json.loads(base64.b64decode(www.split('claims="', 1)[1].split('"', 1)[0]))


def test_a_rule_added_with_the_cli_denies_cached_tokens(stack: Stack) -> None:
    oid = str(uuid.uuid4())
    plain = stack.mint(scp="Orders.Read", oid=oid)
    capable = stack.mint(scp="Orders.Read", oid=oid, extra={"xms_cc": ["cp1"]})
    for token in (plain, capable):  # verified now: their claims are in the cache
        assert stack.request("GET", "/orders/7", token=token).status == 200
    rule_id = f"e2e-cli-{stack.transport}"
    config = str(stack.config_path)
    _cli(stack, "add", "--config", config, "--id", rule_id, "--oid", oid,
         "--issued-before", "now", "--expires-in", "1h", "--reason", "e2e: disabled")  # fmt: skip
    r = _until(stack, plain, _revoked)
    assert _revoked(r), r.body
    www = r.headers["www-authenticate"]
    assert www.startswith('Bearer realm="orders", error="invalid_token", error_description=')
    r = stack.request("GET", "/orders/7", token=capable)
    assert (r.status, r.json()["code"], r.json()["error"]) == (
        401,
        "token_revoked",
        "insufficient_claims",
    )
    www = r.headers["www-authenticate"]
    assert 'error="insufficient_claims"' in www
    nbf = _claims_of(www)
    assert isinstance(nbf, dict)
    value = int(nbf["access_token"]["nbf"]["value"])
    assert nbf == {"access_token": {"nbf": {"essential": True, "value": str(value)}}}
    # a token issued after the rule passes; removing the rule restores the old ones
    time.sleep(max(0.0, value - time.time()))
    fresh = stack.mint(scp="Orders.Read", oid=oid)
    assert stack.request("GET", "/orders/7", token=fresh).status == 200
    _cli(stack, "remove", "--config", config, rule_id)
    assert _until(stack, plain, lambda r: r.status == 200).status == 200
    logs = stack.logs()
    assert not [t for t in (plain, capable, fresh) if t.split(".")[2] in logs]  # no token logged


def test_the_admin_api_needs_the_role_and_its_rule_expires(stack: Stack) -> None:
    oid = str(uuid.uuid4())
    victim = stack.mint(scp="Orders.Read", oid=oid)
    assert stack.request("GET", "/orders/7", token=victim).status == 200  # cached
    url = f"{stack.admin_url}/admin/revocations"
    body = {"oid": oid, "expires_in": 3, "reason": "e2e: stolen token"}

    def post(token: str | None) -> httpx.Response:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        return httpx.post(url, json=body, headers=headers, timeout=10, trust_env=False)

    assert post(None).status_code == 401
    no_role = post(stack.admin_token(roles=("Orders.Read.All",)))
    assert (no_role.status_code, no_role.json()["code"]) == (403, "missing_role")
    assert stack.request("GET", "/orders/7", token=victim).status == 200  # nothing changed
    added = post(stack.admin_token(oid=str(uuid.uuid4())))
    assert added.status_code == 201, added.text
    # the server that took the rule enforces it at once: the very next request is denied
    assert _revoked(stack.request("GET", "/orders/7", token=victim))
    # 3 s later the rule has expired: the same (cached) token passes again
    assert _until(stack, victim, lambda r: r.status == 200).status == 200
    audit = [json.loads(x) for x in stack.logs().splitlines() if '"event":"revocation_added"' in x]
    assert any(e["rule"]["oid"] == oid and e["via"] == "admin_api" for e in audit)
