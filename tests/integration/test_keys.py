"""KeyStore against the dev issuer over real HTTP on 127.0.0.1: discovery (v1 + v2), multi-tenant
allowlist, rotation, outages, garbled JWKS, and the unknown-kid flood (attack case 4)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from authz.dev.idp import CONTOSO, FABRIKAM, MSA_TENANT, DevIdP
from authz.identity.entra import TokenVerifier
from authz.identity.keys import KeyStore
from authz.policy.errors import Code, Unauthenticated, Unavailable, UnknownSigningKey
from authz.policy.model import ApiSpec, IssuerSpec, TokenKind, TokenSettings

pytestmark = pytest.mark.integration

AUD = "api://orders"


class Observer:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def on_refresh(self, issuer: str, result: str, keys: int) -> None:
        self.events.append((issuer, result, keys))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def held(idp: DevIdP) -> None:
    """Until a JWKS request is waiting at the dev IdP's gate (``hold_jwks``)."""
    assert await asyncio.to_thread(idp.wait_jwks_held, 1, 5)


@pytest.fixture
def idp() -> Iterator[DevIdP]:
    server = DevIdP(tenants=(CONTOSO, FABRIKAM)).start()
    try:
        yield server
    finally:
        server.release_jwks()
        server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


def spec(idp: DevIdP, **kw: object) -> IssuerSpec:
    fields: dict[str, object] = {
        "name": "contoso",
        "instance": idp.base_url,
        "tenant": CONTOSO,
        "versions": frozenset({"1.0", "2.0"}),
        "fetch_timeout_s": 2.0,
    }
    fields.update(kw)
    return IssuerSpec(**fields)  # type: ignore[arg-type]


def api(*issuers: str) -> ApiSpec:
    return ApiSpec(name="orders", audiences=frozenset({AUD}), issuers=issuers, routes=())


async def store_for(
    client: httpx.AsyncClient, *specs: IssuerSpec, clock: Clock | None = None
) -> tuple[KeyStore, Observer]:
    observer = Observer()
    store = KeyStore(specs, client, observer=observer, clock=clock or Clock())
    await store.start()
    return store, observer


def verifier(store: KeyStore, *specs: IssuerSpec) -> TokenVerifier:
    return TokenVerifier(TokenSettings(), {s.name: s for s in specs}, store)


async def test_v1_and_v2_documents_loaded(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp)
    store, observer = await store_for(client, s)
    assert store.ready
    snap = store.snapshot("contoso")
    assert snap is not None
    assert snap.tenant_id == CONTOSO
    assert snap.issuers == {"1.0": idp.issuer(CONTOSO, "1.0"), "2.0": idp.issuer(CONTOSO, "2.0")}
    assert set(snap.keys) == set(idp.kids)
    assert observer.events == [("contoso", "ok", len(idp.kids))]
    v = verifier(store, s)
    assert v.verify(idp.mint(version="2.0"), api("contoso")).version == "2.0"
    assert v.verify(idp.mint(version="1.0"), api("contoso")).version == "1.0"
    app = v.verify(idp.mint(kind="app"), api("contoso"))
    assert app.kind is TokenKind.APP
    await store.close()


async def test_multi_tenant_allowlist(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp, name="orgs", tenant="organizations", allowed_tenants=frozenset({CONTOSO}))
    idp.reset_counts()
    store, _ = await store_for(client, s)
    snap = store.snapshot("orgs")
    assert snap is not None
    assert snap.tenant_id is None
    assert "{tenantid}" in snap.issuers["2.0"]
    # Keys per tenant, from the tenant's own documents, even for a multi-tenant issuer.
    assert set(snap.tenant_keys) == {CONTOSO}
    assert set(snap.tenant_keys[CONTOSO]) == set(idp.kids)
    assert idp.request_count(f"/{CONTOSO}/v2.0/.well-known/openid-configuration") == 1
    v = verifier(store, s)
    assert v.verify(idp.mint(tid=CONTOSO), api("orgs")).tid == CONTOSO
    assert v.verify(idp.mint(tid=CONTOSO, version="1.0"), api("orgs")).version == "1.0"
    with pytest.raises(Unauthenticated) as info:
        v.verify(idp.mint(tid=FABRIKAM), api("orgs"))
    assert info.value.code == Code.TENANT_NOT_ALLOWED
    with pytest.raises(Unauthenticated) as info:
        v.verify(idp.mint(tid=CONTOSO, kid=idp.msa_kid), api("orgs"))
    assert info.value.code == Code.KEY_ISSUER_MISMATCH
    await store.close()


async def test_rotation(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp)
    clock = Clock()
    store, _ = await store_for(client, s, clock=clock)
    v = verifier(store, s)
    old_kid = idp.active_kid
    old_token = idp.mint()
    v.verify(old_token, api("contoso"))

    new_kid = idp.rotate()
    new_token = idp.mint()
    with pytest.raises(UnknownSigningKey) as info:
        v.verify(new_token, api("contoso"))
    assert await store.refresh_unknown_kid(info.value.issuer) is True
    v.verify(new_token, api("contoso"))
    v.verify(old_token, api("contoso"))  # both published

    idp.retire(old_kid)
    assert await store.refresh("contoso") == "ok"
    snap = store.snapshot("contoso")
    assert snap is not None
    assert old_kid not in snap.keys
    assert new_kid in snap.keys
    with pytest.raises(UnknownSigningKey):
        v.verify(old_token, api("contoso"))
    # the transport's refresh is rate-limited now, and would not bring the key back anyway
    assert await store.refresh_unknown_kid("contoso") is False
    await store.close()


async def test_idp_down_at_start(idp: DevIdP, client: httpx.AsyncClient) -> None:
    idp.set_outage(True)
    s = spec(idp)
    store, observer = await store_for(client, s)
    assert not store.ready
    assert store.snapshot("contoso") is None
    assert observer.events == [("contoso", "error", 0)]
    with pytest.raises(Unavailable) as info:
        verifier(store, s).verify(idp.mint(), api("contoso"))
    assert info.value.code == Code.KEYS_UNAVAILABLE
    idp.set_outage(False)
    assert await store.refresh("contoso") == "ok"
    assert store.ready
    await store.close()


async def test_idp_down_later_keeps_last_good_keys(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp)
    store, observer = await store_for(client, s)
    before = store.snapshot("contoso")
    idp.set_outage(True)
    assert await store.refresh("contoso") == "error"
    assert store.snapshot("contoso") is before
    assert store.ready
    assert observer.events[-1] == ("contoso", "error", len(idp.kids))
    verifier(store, s).verify(idp.mint(), api("contoso"))
    await store.close()


@pytest.mark.parametrize(
    "body",
    [None, b'{"keys": []}', b'{"keys": [{"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"}]}'],
    ids=["truncated", "empty-set", "bad-n"],
)
async def test_garbled_jwks_rejected_old_keys_kept(
    idp: DevIdP,
    client: httpx.AsyncClient,
    body: bytes | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = spec(idp)
    store, observer = await store_for(client, s)
    before = store.snapshot("contoso")
    idp.set_garbled(True, body)
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh("contoso") == "garbled"
    assert store.snapshot("contoso") is before
    assert observer.events[-1][:2] == ("contoso", "garbled")
    # One clear line: which issuer, why, and that the last good keys stay.
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith("signing keys for issuer 'contoso' not refreshed (")
    assert line.endswith("; keeping the last good keys")
    verifier(store, s).verify(idp.mint(), api("contoso"))
    await store.close()


async def test_unknown_kid_flood_is_bounded(idp: DevIdP, client: httpx.AsyncClient) -> None:
    """Attack case 4: 10k distinct unknown kids cause at most one fetch per interval."""
    s = spec(idp, versions=frozenset({"2.0"}), unknown_kid_min_interval_s=300.0)
    clock = Clock()
    store, _ = await store_for(client, s, clock=clock)
    v = verifier(store, s)
    idp.reset_counts()
    issuers = set()
    for i in range(50):  # each distinct unknown kid is denied and names the issuer to refresh
        with pytest.raises(UnknownSigningKey) as info:
            v.verify(idp.mint(header_extra={"kid": f"flood-{i}"}), api("contoso"))
        issuers.add(info.value.issuer)
    assert issuers == {"contoso"}
    assert store.refresh_due("contoso")
    results = await asyncio.gather(*(store.refresh_unknown_kid("contoso") for _ in range(10_000)))
    assert idp.request_count("keys") == 1
    assert not any(results)  # the keys did not change
    assert not store.refresh_due("contoso")  # transports answer at once, awaiting nothing
    assert not store.refresh_due("no-such-issuer")
    results = await asyncio.gather(*(store.refresh_unknown_kid("contoso") for _ in range(10_000)))
    assert idp.request_count("keys") == 1  # same interval: refused without a fetch
    clock.now += 301
    assert store.refresh_due("contoso")
    await asyncio.gather(*(store.refresh_unknown_kid("contoso") for _ in range(10_000)))
    assert idp.request_count("keys") == 2
    await store.close()


async def test_background_refresh_and_close(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp, versions=frozenset({"2.0"}), refresh_interval_s=0.2, refresh_jitter_s=0.0)
    store, observer = await store_for(client, s)
    store.start_background()
    store.start_background()  # idempotent
    for _ in range(100):
        if len(observer.events) >= 3:
            break
        await asyncio.sleep(0.05)
    assert [e[1] for e in observer.events[:3]] == ["ok", "unchanged", "unchanged"]
    await store.close()


async def test_a_failing_tenant_fails_alone(idp: DevIdP, client: httpx.AsyncClient) -> None:
    """Keys and failures per tenant: an allowed tenant Entra answers 400 invalid_tenant for (a
    deleted tenant) neither keeps the issuer, the other tenants nor readiness down; it has no
    keys (503 for its tokens) or keeps its last good ones."""
    s = spec(
        idp, name="orgs", tenant="organizations", allowed_tenants=frozenset({CONTOSO, FABRIKAM})
    )
    idp.delete_tenant(FABRIKAM)
    store, observer = await store_for(client, s)
    assert store.ready
    snap = store.snapshot("orgs")
    assert snap is not None
    assert set(snap.tenant_keys) == {CONTOSO}
    assert ("orgs", "ok", len(idp.kids)) in observer.events
    assert ("orgs", "error", len(idp.kids)) in observer.events  # the tenant's failure, counted
    assert store.keys_expire_at("orgs") == 0.0  # an allowed tenant has no keys: the alert
    v = verifier(store, s)
    assert v.verify(idp.mint(tid=CONTOSO), api("orgs")).tid == CONTOSO
    with pytest.raises(Unavailable) as info:
        v.verify(idp.mint(tid=FABRIKAM), api("orgs"))
    assert info.value.code == Code.KEYS_UNAVAILABLE

    idp.restore_tenant(FABRIKAM)
    assert await store.refresh("orgs") == "ok"
    assert v.verify(idp.mint(tid=FABRIKAM), api("orgs")).tid == FABRIKAM
    fabrikam_keys = store.snapshot("orgs").tenant_keys[FABRIKAM]  # type: ignore[union-attr]

    idp.delete_tenant(FABRIKAM)  # deleted later: its last good keys stay, the others refresh
    new_kid = idp.rotate()
    assert await store.refresh("orgs") == "ok"
    snap = store.snapshot("orgs")
    assert snap is not None
    assert snap.tenant_keys[FABRIKAM] is fabrikam_keys
    assert new_kid in snap.tenant_keys[CONTOSO]
    assert v.verify(idp.mint(tid=CONTOSO), api("orgs")).tid == CONTOSO
    assert v.verify(idp.mint(tid=FABRIKAM, kid=next(iter(fabrikam_keys))), api("orgs"))
    await store.close()


async def test_the_unknown_kid_budget_is_per_tenant(idp: DevIdP, client: httpx.AsyncClient) -> None:
    """A flood of random kids claiming tenant B spends B's forced refresh only: tenant R's key
    rotation is still picked up at once, and only the tenant's own documents are fetched."""
    s = spec(
        idp,
        name="orgs",
        tenant="organizations",
        versions=frozenset({"2.0"}),
        allowed_tenants=frozenset({CONTOSO, FABRIKAM}),
    )
    store, _ = await store_for(client, s)
    v = verifier(store, s)
    idp.reset_counts()
    with pytest.raises(UnknownSigningKey) as info:
        v.verify(idp.mint(tid=FABRIKAM, header_extra={"kid": "random-1"}), api("orgs"))
    assert (info.value.issuer, info.value.tenant) == ("orgs", FABRIKAM)
    assert await store.refresh_unknown_kid("orgs", FABRIKAM) is False
    assert idp.request_count(f"/{FABRIKAM}/") == 2  # its discovery document and its JWKS
    assert idp.request_count() == 2  # nothing else: not the template, not the other tenant
    assert not store.refresh_due("orgs", FABRIKAM)  # B's budget is spent
    assert not store.refresh_due("orgs", "44444444-4444-4444-8444-444444444444")  # not allowed

    new_kid = idp.rotate()
    token = idp.mint(tid=CONTOSO)
    with pytest.raises(UnknownSigningKey):
        v.verify(token, api("orgs"))
    assert store.refresh_due("orgs", CONTOSO)  # R's budget is its own
    assert await store.refresh_unknown_kid("orgs", CONTOSO) is True
    assert v.verify(token, api("orgs")).tid == CONTOSO
    snap = store.snapshot("orgs")
    assert snap is not None
    assert new_kid in snap.tenant_keys[CONTOSO]
    assert new_kid not in snap.tenant_keys[FABRIKAM]  # B's set was not touched
    await store.close()


async def test_an_unknown_kid_wait_is_bounded_and_the_refresh_lands_later(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    """The issuer hangs: the caller stops waiting after ``unknown_kid_wait_s`` (no new keys yet),
    the refresh goes on, and once the issuer answers the keys are there, fetched once."""
    s = spec(idp, fetch_timeout_s=2.0)
    store = KeyStore((s,), client, clock=Clock(), unknown_kid_wait_s=0.05)
    await store.start()
    new_kid = idp.rotate()
    idp.reset_counts()
    idp.hold_jwks()
    assert await store.refresh_unknown_kid("contoso") is False
    await held(idp)  # answered while the JWKS request is still unanswered (held at the IdP)
    assert store.refresh_due("contoso")  # the refresh is in flight: later checks join it
    idp.release_jwks()
    await store.wait_refreshes()
    snap = store.snapshot("contoso")
    assert snap is not None
    assert new_kid in snap.keys
    assert idp.request_count("keys") == 2  # one refresh: the v1 and v2 JWKS, once each
    verifier(store, s).verify(idp.mint(), api("contoso"))
    await store.close()


async def test_v1_only_issuer_learns_key_issuers_from_the_v2_jwks(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    """``versions: ["1.0"]``: the v2 documents are fetched too, so keys carry their issuer and
    the MSA key (or any foreign issuer's key in the v1 JWKS) cannot sign the tenant's tokens."""
    s = spec(idp, versions=frozenset({"1.0"}))
    idp.reset_counts()
    store, _ = await store_for(client, s)
    assert idp.request_count(f"/{CONTOSO}/discovery/v2.0/keys") == 1
    snap = store.snapshot("contoso")
    assert snap is not None
    assert snap.keys[idp.msa_kid].issuer == idp.issuer(MSA_TENANT)
    v = verifier(store, s)
    assert v.verify(idp.mint(version="1.0"), api("contoso")).version == "1.0"
    with pytest.raises(Unauthenticated) as info:
        v.verify(idp.mint(version="1.0", kid=idp.msa_kid), api("contoso"))
    assert info.value.code == Code.KEY_ISSUER_MISMATCH
    with pytest.raises(Unauthenticated) as info:  # v2 documents are for key issuers only
        v.verify(idp.mint(version="2.0"), api("contoso"))
    assert info.value.code == Code.TOKEN_VERSION_NOT_ACCEPTED
    await store.close()


async def test_recovery_after_an_outage_at_start_follows_the_backoff(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    """The issuer is down at start: the background loop retries after 5 s (the documented first
    retry), then 10 s, and the issuer is ready at the first retry after the outage ends."""
    delays: list[float] = []
    slept = asyncio.Event()

    async def sleep(seconds: float) -> None:  # the schedule, without the waiting
        delays.append(seconds)
        if len(delays) == 2:
            idp.set_outage(False)
        if len(delays) >= 3:
            slept.set()
            await asyncio.Event().wait()  # park the loop: the test has what it needs

    s = spec(idp)
    idp.set_outage(True)
    store = KeyStore((s,), client, clock=Clock(), rand=lambda a, b: 0.0, sleep=sleep)
    await store.start()
    assert not store.ready
    store.start_background()
    await asyncio.wait_for(slept.wait(), 10)
    assert delays == [5.0, 10.0, 3600.0]  # failed, failed, then loaded: the interval
    assert store.ready
    await store.close()


async def test_adopt_reuses_unchanged_issuers(idp: DevIdP, client: httpx.AsyncClient) -> None:
    s = spec(idp)
    old, _ = await store_for(client, s)
    idp.reset_counts()
    changed = spec(idp, name="orgs", tenant="organizations", allowed_tenants=frozenset({FABRIKAM}))
    new = KeyStore((s, changed), client)
    new.adopt(old)
    assert new.snapshot("contoso") is old.snapshot("contoso")
    assert not new.ready
    await new.start()
    assert new.ready
    assert idp.request_count(f"/{CONTOSO}/") == 0
    assert idp.request_count("/organizations") > 0
    assert idp.request_count(f"/{FABRIKAM}/") > 0  # the allowed tenant's own key set
    await old.close()
    await new.close()


async def test_close_lets_a_refresh_in_flight_finish(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    """A check awaiting an unknown-kid refresh gets the keys even though the store closes."""
    s = spec(idp)
    store, _ = await store_for(client, s)
    store.start_background()
    new_kid = idp.rotate()
    idp.hold_jwks()
    waiter = asyncio.create_task(store.refresh_unknown_kid("contoso"))
    await held(idp)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert not closing.done()  # draining: the fetch runs on
    idp.release_jwks()
    assert await waiter is True
    await closing
    snap = store.snapshot("contoso")
    assert snap is not None
    assert new_kid in snap.keys
    # a closed store starts no fetch
    idp.reset_counts()
    assert not store.refresh_due("contoso")
    assert await store.refresh_unknown_kid("contoso") is False
    assert await store.refresh("contoso") == "error"
    assert idp.request_count() == 0


async def test_close_without_drain_answers_no_keys_and_caller_cancel_propagates(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    s = spec(idp)
    store, _ = await store_for(client, s)
    idp.rotate()
    idp.hold_jwks()
    first = asyncio.create_task(store.refresh_unknown_kid("contoso"))
    second = asyncio.create_task(store.refresh_unknown_kid("contoso"))
    await held(idp)
    # cancelling one caller cancels that caller only: the shared fetch runs on for the other
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert not first.done()
    await store.close(drain=False)
    assert await first is False  # the fetch was cancelled under it: no new keys, no exception
    idp.release_jwks()


async def test_adopt_carries_the_unknown_kid_rate_limit(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    s = spec(idp, unknown_kid_min_interval_s=300.0)
    clock = Clock()
    old, _ = await store_for(client, s, clock=clock)
    assert await old.refresh_unknown_kid("contoso") is False  # a forced fetch: nothing new
    assert not old.refresh_due("contoso")
    idp.reset_counts()
    changed = spec(idp, fetch_timeout_s=3.0)  # the same issuer, reconfigured: still rate-limited
    for new_spec in (s, changed):
        new = KeyStore((new_spec,), client, clock=clock)
        new.adopt(old)
        await new.start()
        idp.reset_counts()
        assert not new.refresh_due("contoso")
        assert await new.refresh_unknown_kid("contoso") is False
        assert idp.request_count() == 0
        clock.now += 301
        assert new.refresh_due("contoso")
        clock.now -= 301
        await new.close()
    await old.close()


async def test_adopt_joins_a_refresh_in_flight(idp: DevIdP, client: httpx.AsyncClient) -> None:
    """The new store neither repeats the old store's fetch nor misses the keys it brings."""
    s = spec(idp, unknown_kid_min_interval_s=300.0)
    clock = Clock()
    old, _ = await store_for(client, s, clock=clock)
    new_kid = idp.rotate()
    idp.reset_counts()
    idp.hold_jwks()
    on_old = asyncio.create_task(old.refresh_unknown_kid("contoso"))
    await held(idp)
    new = KeyStore((s,), client, clock=clock)
    new.adopt(old)
    new.adopt(old)  # idempotent: at the swap, the reload adopts once more
    assert new.refresh_due("contoso")  # joins the fetch in flight
    on_new = asyncio.create_task(new.refresh_unknown_kid("contoso"))
    closing = asyncio.create_task(old.close())
    await asyncio.sleep(0.05)
    idp.release_jwks()
    assert await on_old is True
    assert await on_new is True
    await closing
    snap = new.snapshot("contoso")
    assert snap is not None
    assert new_kid in snap.keys
    assert idp.request_count("keys") == 2  # one refresh: the v1 and the v2 JWKS, once each
    assert not new.refresh_due("contoso")  # and the rate limit came along
    await new.close()


# ------------------------------------------------- single flight, adoption, failure paths
# The dev IdP over real HTTP again; where a failure no well-behaved IdP produces is needed (a bug
# below the store, a slow network, a tenant document naming another issuer), ``Faults`` sits
# between the store's client and the real transport and changes that one response.


class _Recorded(httpx.AsyncByteStream):
    """A response body that notes when it has been read to its end."""

    def __init__(self, inner: httpx.AsyncByteStream, done: Callable[[], None]) -> None:
        self.inner, self.done = inner, done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            yield chunk
        self.done()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Faults(httpx.AsyncBaseTransport):
    """The real transport to the dev IdP, with at most one fault per URL fragment: raise an
    exception, delay the answer, rewrite its body, or hold it until ``gate`` is set."""

    def __init__(self) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.raise_on: dict[str, BaseException] = {}
        self.delay: dict[str, float] = {}
        self.rewrite: dict[str, tuple[bytes, bytes]] = {}
        self.gate: dict[str, asyncio.Event] = {}
        self.seen: list[str] = []  # requested
        self.read: list[str] = []  # answered, and the body read to its end

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        self.seen.append(url)
        for part, gate in self.gate.items():
            if part in url:
                await gate.wait()
        for part, exc in self.raise_on.items():
            if part in url:
                raise exc
        for part, seconds in self.delay.items():
            if part in url:
                await asyncio.sleep(seconds)
        response = await self.real.handle_async_request(request)
        for part, (old, new) in self.rewrite.items():
            if part in url:
                body = (await response.aread()).replace(old, new)
                return httpx.Response(response.status_code, headers={}, content=body)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Recorded(response.stream, lambda: self.read.append(url)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.real.aclose()


@pytest.fixture
async def faults() -> AsyncIterator[tuple[Faults, httpx.AsyncClient]]:
    transport = Faults()
    async with httpx.AsyncClient(transport=transport, trust_env=False) as c:
        yield transport, c


def orgs(idp: DevIdP, **kw: object) -> IssuerSpec:
    return spec(
        idp, name="orgs", tenant="organizations", allowed_tenants=frozenset({CONTOSO}), **kw
    )


async def test_concurrent_refreshes_share_one_fetch(idp: DevIdP, client: httpx.AsyncClient) -> None:
    store, _ = await store_for(client, spec(idp))
    await store.wait_refreshes()  # nothing in flight: returns at once
    idp.reset_counts()
    idp.hold_jwks()
    first = asyncio.create_task(store.refresh("contoso"))
    await held(idp)
    second = asyncio.create_task(store.refresh("contoso"))  # joins the fetch in progress
    waiting = asyncio.create_task(store.wait_refreshes())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    idp.release_jwks()
    assert await first == await second == "unchanged"
    await waiting
    assert idp.request_count("keys") == 2  # one refresh: the v1 and the v2 JWKS, once each
    await store.close()


async def test_an_observer_that_fails_is_logged_and_the_keys_still_load(
    idp: DevIdP, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def on_refresh(self, issuer: str, result: str, keys: int) -> None:
            raise RuntimeError("metrics backend gone")

    store = KeyStore((spec(idp),), client, observer=Broken(), clock=Clock())
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        await store.start()
    assert store.ready
    assert "key refresh observer failed" in caplog.text
    await store.close()


async def test_adopt_keeps_the_newer_snapshot_and_drops_removed_issuers(
    idp: DevIdP, client: httpx.AsyncClient
) -> None:
    """A store that never loaded (outage at its start) hands over nothing; a store older than
    the new one's keys does not overwrite them; an issuer the new config dropped takes its
    unknown-kid rate limit with it."""
    s, multi = spec(idp), orgs(idp, unknown_kid_min_interval_s=300.0)
    idp.set_outage(True)
    never, _ = await store_for(client, s)
    assert never.snapshot("contoso") is None
    idp.set_outage(False)
    new = KeyStore((s,), client, clock=Clock())
    new.adopt(never)
    await new.start()
    mine = new.snapshot("contoso")
    assert mine is not None
    old, _ = await store_for(client, s, multi)
    await old.refresh_unknown_kid("orgs", CONTOSO)  # a forced fetch: rate-limited from now
    assert not old.refresh_due("orgs", CONTOSO)
    await new.refresh("contoso")  # now newer than old's
    newer = new.snapshot("contoso")
    new.adopt(old)
    assert new.snapshot("contoso") is newer
    assert new.issuers == ("contoso",)
    assert not new.refresh_due("orgs", CONTOSO)  # not configured here: nothing to refresh
    await never.close()
    await old.close()
    await new.close()


async def test_a_jwks_over_the_size_bound_is_refused_and_the_keys_kept(
    idp: DevIdP, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    from authz.identity.keys import MAX_DOCUMENT_BYTES

    store, _ = await store_for(client, spec(idp))
    before = store.snapshot("contoso")
    idp.set_garbled(True, b" " * (MAX_DOCUMENT_BYTES + 1))
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh("contoso") == "error"
    assert f"body over {MAX_DOCUMENT_BYTES} bytes" in caplog.text
    assert store.snapshot("contoso") is before
    await store.close()


async def test_a_tenant_refresh_that_fails_keeps_that_tenants_keys(
    idp: DevIdP, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = await store_for(client, orgs(idp))
    snap = store.snapshot("orgs")
    assert snap is not None
    kept = snap.tenant_keys[CONTOSO]
    idp.rotate()
    idp.set_outage(True)
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh_unknown_kid("orgs", CONTOSO) is False
    assert f"signing keys for tenant {CONTOSO} of issuer 'orgs' not refreshed" in caplog.text
    after = store.snapshot("orgs")
    assert after is not None
    assert after.tenant_keys[CONTOSO] is kept
    await store.close()


@pytest.mark.parametrize("scope", ["whole", "tenant-in-whole", "tenant-alone"])
async def test_an_unexpected_error_below_the_store_is_a_failed_refresh(
    idp: DevIdP,
    faults: tuple[Faults, httpx.AsyncClient],
    caplog: pytest.LogCaptureFixture,
    scope: str,
) -> None:
    """Not an HTTP or OS error (a bug, say): logged with its traceback, counted as an error,
    the last good keys kept."""
    transport, client = faults
    store, observer = await store_for(client, orgs(idp))
    before = store.snapshot("orgs")
    assert before is not None
    where = "/organizations/" if scope == "whole" else f"/{CONTOSO}/"
    transport.raise_on[where] = RuntimeError("a bug below the key store")
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        if scope == "tenant-alone":
            assert await store.refresh_unknown_kid("orgs", CONTOSO) is False
        else:
            result = await store.refresh("orgs")
            # a tenant failing fails alone: the issuer itself refreshed
            assert result == ("error" if scope == "whole" else "unchanged")
    assert "unexpected error" in caplog.text
    assert "a bug below the key store" in caplog.text  # the traceback is logged
    after = store.snapshot("orgs")
    assert after is not None
    assert after.tenant_keys[CONTOSO] == before.tenant_keys[CONTOSO]
    assert ("orgs", "error", len(before.keys)) in observer.events
    await store.close()


async def test_documents_slower_than_twice_the_fetch_timeout_time_out(
    idp: DevIdP, faults: tuple[Faults, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    """Each GET is within its timeout, the discovery and the JWKS together are not."""
    transport, client = faults
    store, _ = await store_for(client, spec(idp, fetch_timeout_s=0.3))
    transport.delay["/"] = 0.35  # discovery, then JWKS: 0.7 s > 2 x 0.3 s (the delay is ours,
    # before the real request, so no single GET's own timeout fires)
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh("contoso") == "error"
    assert f"{idp.base_url}/{CONTOSO}: timed out" in caplog.text
    await store.close()


async def test_a_tenant_document_naming_another_issuer_is_garbled(
    idp: DevIdP, faults: tuple[Faults, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    transport, client = faults
    store, _ = await store_for(client, orgs(idp))
    transport.rewrite[f"/{CONTOSO}/v2.0/.well-known"] = (
        f"/{CONTOSO}/v2.0".encode(),
        f"/{FABRIKAM}/v2.0".encode(),
    )
    with caplog.at_level(logging.ERROR, logger="authz.keys"):
        assert await store.refresh_unknown_kid("orgs", CONTOSO) is False
    assert f"tenant {CONTOSO}'s document names" in caplog.text
    await store.close()


async def test_a_whole_refresh_joins_a_tenant_refresh_in_flight(
    idp: DevIdP, faults: tuple[Faults, httpx.AsyncClient]
) -> None:
    """The tenant's key set is fetched once: the whole refresh waits for the tenant refresh in
    progress and keeps what it installed."""
    transport, client = faults
    store, _ = await store_for(client, orgs(idp))
    new_kid = idp.rotate()
    gate = transport.gate[f"/{CONTOSO}/discovery"] = asyncio.Event()
    first = len(transport.seen)
    tenant = asyncio.create_task(store.refresh_unknown_kid("orgs", CONTOSO))
    while not any(f"/{CONTOSO}/discovery" in u for u in transport.seen):
        await asyncio.sleep(0.01)
    whole = asyncio.create_task(store.refresh("orgs"))
    while len([u for u in transport.read if "/organizations/discovery" in u]) < 2:
        await asyncio.sleep(0.01)  # the issuer's own documents are in: its tenant phase is next
    for _ in range(100):  # no I/O left before it looks for the tenant's refresh: loop turns only
        await asyncio.sleep(0)
    assert not whole.done()  # waiting for the tenant's refresh
    gate.set()
    assert await tenant is True
    assert await whole == "ok"
    # the tenant's documents were fetched once: two discovery documents, two JWKS
    assert len([u for u in transport.seen[first:] if f"/{CONTOSO}/" in u]) == 4
    snap = store.snapshot("orgs")
    assert snap is not None
    assert new_kid in snap.tenant_keys[CONTOSO]
    await store.close()
