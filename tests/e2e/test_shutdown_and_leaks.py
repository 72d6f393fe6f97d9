"""SIGTERM while Envoy sends checks loses no in-flight answer; nothing the service or Envoy writes
ever contains a token or a signature."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz import config as config_mod
from authz.dev.stack import Reply, Stack, stack_config
from authz.observability import JWT_RE
from tests.e2e import test_through_envoy as through
from tests.e2e.conftest import TRANSPORTS

pytestmark = pytest.mark.e2e


def _audit(stack: Stack) -> list[dict[str, object]]:
    out = []
    for line in (stack.workdir / "authz.stdout").read_text().splitlines():
        if line.startswith("{") and '"log":"audit"' in line:
            out.append(json.loads(line))
    return out


def test_sigterm_under_load_loses_no_answer(tmp_path: Path) -> None:
    with Stack(tmp_path / "stack") as stack:
        token = stack.mint(scp="Orders.Read")
        results: dict[str, int] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            i = 0
            while not stop.is_set():
                rid = f"load-{n}-{i}"
                i += 1
                try:
                    r = stack.request(
                        "GET", "/orders/7", token=token, headers=[("x-request-id", rid)]
                    )
                    status = r.status
                except OSError:
                    status = -1
                with lock:
                    results[rid] = status

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert stack.authz is not None
        sent_at = time.time()
        stack.authz.send_signal(signal.SIGTERM)
        stack.authz.wait(timeout=20)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=20)
        assert stack.authz.returncode == 0

        audit = _audit(stack)
        decided = {
            str(a["request_id"]): a for a in audit if str(a["request_id"]).startswith("load-")
        }
        # every check the server decided reached the client with that decision's status
        lost = {
            rid: results.get(rid) for rid, a in decided.items() if results.get(rid) != a["status"]
        }
        assert lost == {}
        assert sum(1 for s in results.values() if s == 200) > 20
        # after SIGTERM nothing was allowed without a decision: failures are Envoy's 503s only
        undecided = {s for rid, s in results.items() if rid not in decided}
        assert undecided <= {503}
        assert len(decided) > 20
        assert sent_at > 0


# ------------------------------------------------------------- SIGTERM with checks held in flight


def _segment(token: str, i: int) -> dict[str, Any]:
    seg = token.split(".")[i]
    doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    return doc


def _poll(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return True


def _envoy_checks_out(stack: Stack, admin: httpx.Client) -> tuple[int, int]:
    """Envoy's authz cluster: (requests sent and awaiting an answer, requests still waiting for a
    connection)."""
    r = admin.get(f"http://127.0.0.1:{stack.ports['envoy_admin']}/stats")
    cluster = "authz_http" if stack.transport == "http" else "authz"
    stats = dict(line.split(": ", 1) for line in r.text.splitlines() if ": " in line)
    return (
        int(stats[f"cluster.{cluster}.upstream_rq_active"]),
        int(stats[f"cluster.{cluster}.upstream_rq_pending_active"]),
    )


def _ready(stack: Stack) -> bool:
    try:
        return stack.authz_ready()
    except httpx.HTTPError:
        return False


def _statuses(replies: dict[str, Reply | BaseException]) -> dict[str, int | str]:
    return {rid: r.status if isinstance(r, Reply) else repr(r) for rid, r in replies.items()}


HELD = 6  # checks held in flight at once


# A short in-check wait for these tests: the whole held sequence must fit inside it, and it
# stays under Envoy's 0.25 s check timeout (envoy/*.yaml).
HELD_WAIT_S = 0.15


def _held_config() -> str:
    return stack_config("{instance}").replace(
        "tokens:\n", f"tokens:\n  unknown_kid_wait_seconds: {HELD_WAIT_S}\n", 1
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hanging_issuer_gets_our_401_not_envoys_503(tmp_path: Path, transport: str) -> None:
    """A token signed with a key authz has never seen, while the issuer does not answer its
    JWKS: authz answers 401 unknown_signing_key after tokens.unknown_kid_wait_seconds (the
    default, 0.1 s), before Envoy's 0.25 s timeout would turn it into a 503; the refresh goes on,
    and once the issuer answers the same token is allowed, with no second fetch."""
    with Stack(tmp_path / "stack", transport=transport) as stack:
        new_kid = stack.idp.rotate()
        token = stack.mint(scp="Orders.Read")
        assert _segment(token, 0)["kid"] == new_kid
        jwks_before = stack.idp.request_count("/keys")
        stack.idp.hold_jwks()
        try:
            r = stack.request("GET", "/orders/7", token=token)
            assert (r.status, r.json()["code"]) == (401, "unknown_signing_key")
            assert stack.idp.jwks_held >= 1  # answered while the refresh is still held
        finally:
            stack.idp.release_jwks()
        # the refresh lands in the background; a check meanwhile joins it (never a new fetch)
        for _ in range(100):
            r = stack.request("GET", "/orders/7", token=token)
            if r.status == 200:
                break
            assert r.json()["code"] == "unknown_signing_key"
            time.sleep(0.02)
        assert r.status == 200
        assert stack.idp.request_count("/keys") - jwks_before == 2  # v1 and v2 JWKS, once each


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sigterm_answers_checks_held_on_a_key_refresh(tmp_path: Path, transport: str) -> None:
    """Checks really in flight when SIGTERM lands (each meets a kid authz has never seen, and the
    dev IdP holds that refresh's JWKS request unanswered) all get authz's own decision through
    Envoy: 401 unknown_signing_key once the in-check wait (HELD_WAIT_S) is over, never Envoy's
    503; then authz exits within its grace period, the held refresh cancelled."""
    with (
        Stack(tmp_path / "stack", transport=transport, config_text=_held_config()) as stack,
        httpx.Client(timeout=1, trust_env=False) as admin,
    ):
        authz = stack.authz
        assert authz is not None
        grace = config_mod.load(stack.config_path).server.shutdown_grace_s
        assert config_mod.load(stack.config_path).tokens.unknown_kid_wait_s == HELD_WAIT_S
        assert _envoy_checks_out(stack, admin) == (0, 0)
        # authz loaded the keys at start; from now on the IdP signs with a key authz never saw
        new_kid = stack.idp.rotate()
        tokens = {f"held-{transport}-{i}": stack.mint(scp="Orders.Read") for i in range(HELD)}
        assert {_segment(t, 0)["kid"] for t in tokens.values()} == {new_kid}
        jwks_before = stack.idp.request_count("/keys")
        stack.idp.hold_jwks()

        replies: dict[str, Reply | BaseException] = {}

        def send(rid: str, token: str) -> None:
            try:
                replies[rid] = stack.request(
                    "GET", "/orders/7", token=token, headers=[("x-request-id", rid)]
                )
            except BaseException as e:  # reported below, with the request id
                replies[rid] = e

        threads = [threading.Thread(target=send, args=item) for item in tokens.items()]
        try:
            for t in threads:
                t.start()
            # Held: the IdP has the refresh's JWKS request and has not answered it; Envoy has
            # sent every check to authz and awaits each answer.
            assert stack.idp.wait_jwks_held(1, timeout=HELD_WAIT_S), "no JWKS request arrived"
            assert _poll(lambda: _envoy_checks_out(stack, admin) == (HELD, 0), 0.05), (
                _envoy_checks_out(stack, admin)
            )
            sigterm_at = time.time()
            authz.send_signal(signal.SIGTERM)
            assert not replies, _statuses(replies)  # in flight when the signal landed
            for t in threads:
                t.join(timeout=10)
            authz.wait(timeout=grace + 5)
            exited_after = time.time() - sigterm_at
            assert stack.idp.jwks_held >= 1  # the refresh never got its answer
        finally:
            stack.idp.release_jwks()

        assert authz.returncode == 0
        assert exited_after < grace + 1.0
        # one refresh for all the held checks: one JWKS request per metadata version at most
        assert 1 <= stack.idp.request_count("/keys") - jwks_before <= 2
        # every held check got authz's own decision: no 503, no error
        assert _statuses(replies) == dict.fromkeys(tokens, 401)
        for reply in replies.values():
            assert isinstance(reply, Reply)
            assert reply.json()["code"] == "unknown_signing_key"
        # and authz decided each one after the signal. (That each was in flight when it landed is
        # shown above by Envoy's counters and the empty replies; authz's own start time is not
        # compared with the signal: on a loaded machine gRPC may hand a check Envoy has already
        # sent to the handler a few milliseconds later.)
        audit = {str(a["request_id"]): a for a in _audit(stack)}
        for rid in tokens:
            entry = audit[rid]
            assert (entry["status"], entry["code"]) == (401, "unknown_signing_key")
            finished = float(str(entry["ts"]))
            assert sigterm_at <= finished + 0.002  # ts is rounded to the millisecond


# --------------------------------------------------------------------------- nothing leaks tokens


def _hostile_cases() -> list[str]:
    """The hostile-token catalogue of test_through_envoy.py (its test_hostile_tokens cases)."""
    cases = [case for case, _, _ in through.HOSTILE_CASES]
    assert cases, "test_through_envoy.HOSTILE_CASES is empty"
    return cases


def _bearer_tokens(token: str | None, headers: list[tuple[str, str]]) -> list[str]:
    found = [token] if token is not None else []
    for name, value in headers:
        if name.lower() == "authorization" and value.startswith("Bearer "):
            found.append(value.removeprefix("Bearer "))
    return found


# (method, path) each token is sent to: a read, an anonymous route, a dry-run route, a missing
# role (insufficient_scope), an auth-context step-up, a path outside the API, an unknown route
LEAK_ROUTES = [
    ("GET", "/orders/7"),
    ("GET", "/orders/healthz"),
    ("GET", "/orders/reports/q3"),
    ("POST", "/orders"),
    ("POST", "/orders/9/approve"),
    ("GET", "/inventory/sku-1"),
    ("DELETE", "/orders/7"),
]


def test_nothing_written_contains_a_token(stack: Stack) -> None:
    cases = _hostile_cases()
    assert len(cases) >= 8
    sends: list[tuple[str | None, list[tuple[str, str]]]] = [
        through._hostile(stack, case) for case in cases
    ]
    plain = [
        stack.mint(scp="Orders.Read"),
        stack.mint(scp="Orders.Read", aud="api://elsewhere"),
        stack.mint(scp="Orders.Read", lifetime=-600, iat_offset=-4200),
        stack.mint(scp="Orders.Read", header_extra={"kid": "nope"}),
        stack.mint(kind="app", roles=("Orders.Read.All",), scp=None),
        stack.mint(scp="Orders.Read", extra={"xms_cc": ["cp1"]}),
        stack.mint(scp="Orders.Read", roles=("Orders.Write",)),
    ]
    sends += [(t, []) for t in plain]
    sends.append((plain[0][:-6] + "AAAAAA", []))
    tokens = [t for token, headers in sends for t in _bearer_tokens(token, headers)]
    assert len(tokens) >= len(sends)

    n = 0
    for token, headers in sends:
        for method, path in LEAK_ROUTES:
            n += 1
            rid = [("x-request-id", f"leak-{n}")]
            stack.request(method, path, token=token, headers=headers + through.FORGED + rid)
        for t in _bearer_tokens(token, headers):
            n += 1
            rid = [("x-request-id", f"leak-{n}")]
            stack.request("GET", f"/orders/7?access_token={t}", headers=through.FORGED + rid)
            stack.request("GET", "/orders/healthz", headers=[("x-access-token", t), *rid])
    # wait for the last request in both the audit log (flushed every 250 ms) and Envoy's access
    # log (every 100 ms)
    last = f'"leak-{n}"'
    assert _poll(
        lambda: (
            last in (stack.workdir / "authz.stdout").read_text()
            and any(last in ln for ln in stack.logs().splitlines() if '"authz_code"' in ln)
        ),
        5.0,
    )

    written = stack.logs() + stack.metrics_text()
    assert JWT_RE.findall(written) == []
    for t in tokens:
        _header, payload, signature = t.split(".")
        for segment in (payload, signature):
            if not segment:
                continue  # alg-none: no signature
            assert segment not in written
            assert segment[:40] not in written
            assert segment[-40:] not in written
