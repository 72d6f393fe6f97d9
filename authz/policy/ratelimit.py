"""Rate limits and quotas, decided synchronously from local counters (``rate-limit-by-key``).

A limit (``LimitSpec``, from ``apis[].rate_limits`` and ``apis[].routes[].rate_limits``) allows
``limit`` requests per ``period_s`` seconds for each value of its key: claims of the verified
token (``oid``, ``azp``, ``tid``, ``sub``) and/or the client address Envoy saw (``ip``).

Algorithm: the **sliding window counter** (Redis/Cloudflare style). Time is cut into fixed
windows of one period (aligned on the Unix epoch, so every replica agrees on them without talking);
the estimate at offset ``f`` (0..1) into the current window is
``previous_window_count * (1 - f) + current_window_count``, and a request is allowed while the
estimate stays below the limit. Chosen over GCRA because its state is a plain count per window:
increments from many processes simply add up, so they can be batched and pushed to Redis as
``INCRBY`` deltas (see ``authz.state.ratelimit_sync``) without a read-modify-write per request;
GCRA's state (a theoretical arrival time) has to be updated in order, request by request, which
batching cannot do. Two integers per key and window, periods from a second to 31 days (quotas).

Only allowed requests are counted (a caller over its limit does not dig itself deeper), and only
when every limit of the request has room: a request denied by one limit consumes none.

``Counters`` holds the counts of this process: ``base`` is the last total Redis reported for a
window (everyone's increments), ``inflight`` what is being pushed right now, ``pending`` the
increments not pushed yet. Without Redis ``base`` stays 0 and the counts are this process's own.

Pure module: no grpc, prometheus, asyncio, redis or network imports. The caller passes ``now``
(Unix seconds): windows must be the same on every replica, so it is wall-clock time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from authz.policy.errors import RateLimited
from authz.policy.model import ApiSpec, LimitSpec, Mode, Principal, RequestAttrs, Route

__all__ = [
    "CounterKey",
    "Counters",
    "LimitId",
    "RateLimiter",
    "client_ip",
    "retry_after",
    "sliding_estimate",
]

# (api, route or "", limit name, period): stable across reloads, so counts survive them.
LimitId = tuple[str, str, str, int]
# (limit id, key value, window index)
CounterKey = tuple[LimitId, str, int]

UNKNOWN_IP = "-"  # requests whose client address is unknown share one bucket (never a bypass)


def client_ip(attrs: RequestAttrs) -> str:
    """The client address: gRPC's ``source.address`` (Envoy's downstream remote address, which
    honours ``xff_num_trusted_hops``); over HTTP the ``x-authz-client-ip`` header that the shipped
    Envoy config sets from the same value (overwriting anything a client sent)."""
    return attrs.source_address or attrs.headers.get("x-authz-client-ip", "") or UNKNOWN_IP


_PARTS: Mapping[str, Callable[[Principal], str]] = {
    "oid": lambda p: p.oid,
    "azp": lambda p: p.client_id,
    "tid": lambda p: p.tid,
    "sub": lambda p: p.sub,
}


def _key_fn(spec: LimitSpec) -> Callable[[Principal | None, RequestAttrs], str | None]:
    """The key value of a request, or None when the limit does not apply (no verified identity
    for a claim-keyed limit). Built once per limit."""
    getters = tuple(_PARTS.get(part) for part in spec.key)
    if len(getters) == 1:
        (only,) = getters
        if only is None:
            return lambda p, a: client_ip(a)
        return lambda p, a: None if p is None else only(p)

    def combined(p: Principal | None, a: RequestAttrs) -> str | None:
        values = []
        for get in getters:
            if get is None:
                values.append(client_ip(a))
            elif p is None:
                return None
            else:
                values.append(get(p))
        return "\x1f".join(values)

    return combined


def sliding_estimate(prev: int, cur: int, offset: float, period: int) -> float:
    """Requests counted in the sliding window ending now, ``offset`` seconds into the window."""
    return prev * (1.0 - offset / period) + cur


def retry_after(prev: int, cur: int, offset: float, period: int, limit: int) -> int:
    """Whole seconds until one more request fits, if nothing else is counted meanwhile (>= 1)."""
    room = limit - 1  # the estimate must fall to limit - 1 for one more request to fit
    if cur <= room and prev > 0:
        # still in this window: prev * (1 - t / period) + cur <= room
        t = period * (1.0 - (room - cur) / prev)
        wait = t - offset
    elif cur <= room:
        wait = 0.0
    else:
        # in the next window, x seconds in: cur * (1 - x / period) <= room
        wait = (period - offset) + period * (1.0 - room / cur)
    return max(1, math.ceil(wait - 1e-9))


class Counters:
    """This process's counts per (limit, key value, window): ``[base, inflight, pending]``.

    Mutated only from the event loop thread (the check path and the sync task), so no locks.
    """

    __slots__ = ("_dirty", "_new", "limited", "shared", "slots")

    def __init__(self, *, shared: bool = True) -> None:
        self.slots: dict[CounterKey, list[int]] = {}
        # What the sync needs (``shared``: a Redis is configured); without one nobody drains these.
        self.shared = shared
        self._dirty: set[CounterKey] = set()  # slots with pending increments
        self._new: set[CounterKey] = set()  # created since the last sync: fetch their prior window
        # Requests over a limit, by (api, route, limit, mode): folded into metrics periodically.
        self.limited: dict[tuple[str, str, str, str], int] = {}

    def count(self, key: CounterKey) -> int:
        slot = self.slots.get(key)
        return 0 if slot is None else slot[0] + slot[1] + slot[2]

    def hit(self, key: CounterKey) -> None:
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = [0, 0, 1]
            if self.shared:
                self._new.add(key)
                self._dirty.add(key)
        else:
            if not slot[2] and self.shared:
                self._dirty.add(key)
            slot[2] += 1

    def __len__(self) -> int:
        return len(self.slots)

    # -- the sync task's side (authz.state.ratelimit_sync) -----------------------------------

    def take_pending(self) -> tuple[list[tuple[CounterKey, int]], list[CounterKey]]:
        """Move every pending increment to in-flight; return them, and the slots new since the
        last call (whose previous window the caller should fetch)."""
        out = []
        slots = self.slots
        for key in self._dirty:
            slot = slots.get(key)
            if slot is not None and slot[2]:
                slot[1] += slot[2]
                out.append((key, slot[2]))
                slot[2] = 0
        self._dirty.clear()
        new = list(self._new)
        self._new.clear()
        return out, new

    def settle(self, key: CounterKey, delta: int, total: int) -> None:
        """Redis counted our ``delta``; ``total`` is everyone's count for the window now."""
        slot = self.slots.get(key)
        if slot is None:  # pruned meanwhile: the window is over
            return
        slot[1] -= delta
        # ``total`` holds our delta now, so it is at least ``base + delta`` - unless Redis lost
        # its data (restarted empty): then we keep what we know. Counts never go down.
        slot[0] = max(slot[0] + delta, total)

    def restore(self, key: CounterKey, delta: int) -> None:
        """The push failed: the increments are pending again (pushed once Redis is back)."""
        slot = self.slots.get(key)
        if slot is not None:
            slot[1] -= delta
            slot[2] += delta
            self._dirty.add(key)

    def observe(self, key: CounterKey, total: int) -> None:
        """Everyone's count for a window we did not push to (a previous window)."""
        slot = self.slots.get(key)
        if slot is None:
            self.slots[key] = [total, 0, 0]
        else:
            slot[0] = max(slot[0], total)

    def renew(self, keys: Iterable[CounterKey]) -> None:
        """Ask for these slots' previous windows again at the next sync (the fetch failed)."""
        self._new.update(k for k in keys if k in self.slots)

    def prune(self, now: float) -> int:
        """Drop windows that can no longer matter (older than the previous one). Returns how
        many slots were dropped."""
        stale = [k for k in self.slots if k[2] < int(now // k[0][3]) - 1]
        for k in stale:
            del self.slots[k]
            self._new.discard(k)
            self._dirty.discard(k)
        return len(stale)


@dataclass(frozen=True, slots=True)
class _Limit:
    id: LimitId
    spec: LimitSpec
    limit: int
    period: int
    key: Callable[[Principal | None, RequestAttrs], str | None]
    dry_run: bool
    policy: str  # the RateLimit-Policy item, rendered once


def _compile(api: str, route: str, spec: LimitSpec, mode: Mode) -> _Limit:
    """``route`` is "" for an API-level limit (one count across the API's routes); ``mode`` is
    the mode of the route (or API) the limit is checked for: dry-run there means dry-run here."""
    return _Limit(
        id=(api, route, spec.name, spec.period_s),
        spec=spec,
        limit=spec.limit,
        period=spec.period_s,
        key=_key_fn(spec),
        dry_run=Mode.DRY_RUN in (spec.mode, mode),
        policy=f'"{spec.name}";q={spec.limit};w={spec.period_s}',
    )


class RateLimiter:
    """The compiled limits of one configuration over a ``Counters`` that outlives it.

    ``check`` is called by the engine after the route's requirement held (identity known), and
    for anonymous routes with whatever identity a valid optional token gave. It returns None
    (counted, go ahead) or a ``RateLimited`` denial carrying the response headers; a denial
    with ``dry_run`` set means "would have been limited" (the request is counted as allowed).
    """

    def __init__(self, apis: Iterable[ApiSpec], counters: Counters) -> None:
        self.counters = counters
        self._by_route: dict[tuple[str, str], tuple[_Limit, ...]] = {}
        for api in apis:
            if api.rate_limits:
                self._by_route[(api.name, "")] = tuple(
                    _compile(api.name, "", spec, api.mode) for spec in api.rate_limits
                )
            for route in api.routes:
                mode = route.mode or api.mode
                limits = (
                    *(_compile(api.name, "", spec, mode) for spec in api.rate_limits),
                    *(_compile(api.name, route.name, spec, mode) for spec in route.rate_limits),
                )
                if limits:
                    self._by_route[(api.name, route.name)] = limits

    @property
    def active(self) -> bool:
        return bool(self._by_route)

    def check(
        self,
        api: ApiSpec,
        route: Route | None,
        principal: Principal | None,
        attrs: RequestAttrs,
        now: float,
    ) -> RateLimited | None:
        limits = self._by_route.get((api.name, route.name if route is not None else ""))
        if not limits:
            return None
        counters = self.counters
        slots = counters.slots
        hits: list[tuple[CounterKey, list[int] | None]] = []
        would: RateLimited | None = None
        for lim in limits:
            value = lim.key(principal, attrs)
            if value is None:
                continue
            period = lim.period
            window = int(now // period)
            key = (lim.id, value, window)
            slot = slots.get(key)
            cur = 0 if slot is None else slot[0] + slot[1] + slot[2]
            before = slots.get((lim.id, value, window - 1))
            prev = 0 if before is None else before[0] + before[1] + before[2]
            offset = now - window * period
            if prev * (1.0 - offset / period) + cur + 1 > lim.limit:
                denial = self._denial(lim, prev, cur, offset, api, route)
                if not lim.dry_run:
                    return denial
                would = would or denial
                continue
            hits.append((key, slot))
        for key, slot in hits:
            if slot is None or (not slot[2] and counters.shared):
                counters.hit(key)
            else:
                slot[2] += 1
        return would

    def _denial(
        self,
        lim: _Limit,
        prev: int,
        cur: int,
        offset: float,
        api: ApiSpec,
        route: Route | None,
    ) -> RateLimited:
        spec = lim.spec
        wait = retry_after(prev, cur, offset, spec.period_s, spec.limit)
        mode = "dry-run" if lim.dry_run else "enforce"
        label = (api.name, route.name if route is not None else "", spec.name, mode)
        limited = self.counters.limited
        limited[label] = limited.get(label, 0) + 1
        headers = (
            ("retry-after", str(wait)),
            ("ratelimit-policy", lim.policy),
            ("ratelimit", f'"{spec.name}";r=0;t={wait}'),
        )
        return RateLimited(spec.name, headers, dry_run=lim.dry_run)
