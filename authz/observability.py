"""Metrics, the audit log and log redaction: everything an operator sees, in one place.

Size: everything an operator sees, in one place by design (the list below).

- ``Metrics`` registers every series on an injected ``CollectorRegistry`` (tests use their own)
  and caches labelled children so recording a check costs a couple of microseconds.
- ``AuditLog`` writes one JSON line per decision (every deny; allows configurable and sampled)
  straight to a stream: no logging machinery on the hot path. Every client-supplied field goes
  through ``audit_field`` (token-shaped text redacted, length bounded); the path never carries
  its query or fragment.
- ``GcPauses`` times every cyclic-GC collection (``gc.callbacks``) into
  ``authz_gc_pause_seconds{generation}``: the stalls of a full claims cache show there
  (docs/performance.md, "Many users and the GC").
- ``JsonFormatter`` + ``RedactFilter`` make the service's own logs structured and strip anything
  shaped like a JWT, as a last line of defence: code never logs tokens in the first place.

Labels are bounded: configured API/route/issuer names and decision codes only, never paths,
user ids or tenant ids taken from tokens.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import prometheus_client as prom

from authz import __version__
from authz.policy.model import Decision, RequestAttrs

DURATION_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)

# Cyclic-GC pauses: a young collection takes tens of µs, a full one over a big heap 10-300 ms.
GC_PAUSE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)

_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii
_FLUSH_BYTES = 64 * 1024
_SEGMENTS_MAX = 4096  # audit line stretches kept per (caller, route, decision): AuditLog.record
_SegmentKey = tuple[str, str, str, bool, int, str, str, str, str, str, str]

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
REDACTED = "[redacted-token]"
# Anything token-shaped in a client-supplied audit field: a JWT (even cut short), three
# base64url segments of 16+ characters (a JWS whatever its header), or a Bearer credential,
# raw or URL-encoded ("Bearer%20...", "bearer+...").
TOKEN_RE = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*"
    r"|[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}"
    r"|(?i:bearer)(?:\s|%20|\+|:|=)+[A-Za-z0-9._~+/%-]+=*"
)
# Client-supplied audit fields are cut to these lengths (after redaction).
REQUEST_ID_MAX = 128
METHOD_MAX = 16
PATH_MAX = 512
CLAIM_MAX = 128


def audit_field(value: str, limit: int) -> str:
    """A client-supplied value made fit for the audit line: anything token-shaped replaced by
    ``[redacted-token]``, then cut to ``limit`` characters. JSON escaping happens on output."""
    # Every match has a '.' or a "bearer": two substring tests (~0.15 us) spare the regex for
    # the common value (a GUID, a dot-free path), where a search alone cost 3x as much.
    if "." in value or "earer" in value.lower():
        value = TOKEN_RE.sub(REDACTED, value)
    return value if len(value) <= limit else value[:limit]


def audit_path(raw: str) -> str:
    """The path of the audit line: never the query or the fragment (either may carry a token),
    then ``audit_field``."""
    return audit_field(_path_only(raw), PATH_MAX)


def _path_only(raw: str) -> str:
    cut = raw.find("?")
    if cut >= 0:
        raw = raw[:cut]
    cut = raw.find("#")
    return raw if cut < 0 else raw[:cut]


def outcome(d: Decision) -> str:
    """The ``decision`` label: allow, deny, or dry_run_deny (allowed, but would have denied)."""
    if not d.allowed:
        return "deny"
    return "dry_run_deny" if d.would_deny else "allow"


class Metrics:
    """All Prometheus series of the service."""

    def __init__(self, registry: prom.CollectorRegistry) -> None:
        self.registry = registry
        self.checks = prom.Counter(
            "authz_checks",
            "Authorization checks by API, route, decision and code.",
            ["api", "route", "decision", "code"],
            registry=registry,
        )
        # Who acts (docs/token-kinds.md): a separate series, so authz_checks keeps its labels.
        self.checks_by_actor = prom.Counter(
            "authz_checks_by_actor",
            "Authorization checks by API, decision and actor: human, agent, app, or none "
            "(no verified token).",
            ["api", "decision", "actor"],
            registry=registry,
        )
        self.check_duration = prom.Histogram(
            "authz_check_duration_seconds",
            "Time to decide one check, inside the service.",
            ["api", "decision"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.jwks_refreshes = prom.Counter(
            "authz_jwks_refreshes",
            "Signing-key refreshes by issuer and result.",
            ["issuer", "result"],
            registry=registry,
        )
        self.jwks_keys = prom.Gauge(
            "authz_jwks_keys",
            "Signing keys currently loaded, by issuer.",
            ["issuer"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.jwks_last_success = prom.Gauge(
            "authz_jwks_last_success_timestamp_seconds",
            "Unix time of the last successful key refresh, by issuer.",
            ["issuer"],
            registry=registry,
            multiprocess_mode="min",
        )
        self.jwks_keys_expiry = prom.Gauge(
            "authz_jwks_keys_expiry_timestamp_seconds",
            "Unix time at which the issuer's oldest key set in use passes its maximum age "
            "(0: an issuer or allowed tenant has no keys); past it, its checks answer 503.",
            ["issuer"],
            registry=registry,
            multiprocess_mode="min",
        )
        self.cache_hits = prom.Counter(
            "authz_token_cache_hits", "Verified-token cache hits.", registry=registry
        )
        self.cache_misses = prom.Counter(
            "authz_token_cache_misses", "Verified-token cache misses.", registry=registry
        )
        self.cache_entries = prom.Gauge(
            "authz_token_cache_entries",
            "Entries in the verified-token cache.",
            registry=registry,
            multiprocess_mode="sum",
        )
        self.reloads = prom.Counter(
            "authz_config_reloads",
            "Configuration reloads by result.",
            ["result"],
            registry=registry,
        )
        self.config_last_success = prom.Gauge(
            "authz_config_last_reload_success_timestamp_seconds",
            "Unix time the running configuration was loaded.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.ready = prom.Gauge(
            "authz_ready",
            "1 when the service can decide requests (config valid, keys loaded).",
            registry=registry,
            multiprocess_mode="min",
        )
        self.internal_errors = prom.Counter(
            "authz_internal_errors",
            "Unexpected errors turned into explicit denies.",
            ["transport"],
            registry=registry,
        )
        self.revocation_rules = prom.Gauge(
            "authz_revocation_rules",
            "Revocation rules in force, by source.",
            ["source"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.revocation_reloads = prom.Counter(
            "authz_revocation_reloads",
            "Revocation source loads by source and result (ok, invalid, error).",
            ["source", "result"],
            registry=registry,
        )
        self.build_info = prom.Gauge(
            "authz_build_info",
            "Build information (always 1).",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__, sys.version.split()[0]).set(1)
        self.ratelimit_limited = prom.Counter(
            "authz_ratelimit_limited",
            "Requests over a rate limit, by API, route ('' = an API-wide limit), limit name and "
            "mode (enforce: answered 429; dry-run: only counted and logged).",
            ["api", "route", "limit", "mode"],
            registry=registry,
        )
        self.ratelimit_counters = prom.Gauge(
            "authz_ratelimit_counters",
            "Rate-limit counters (key x window) held in memory.",
            registry=registry,
            multiprocess_mode="sum",
        )
        self.ratelimit_syncs = prom.Counter(
            "authz_ratelimit_syncs",
            "Rate-limit syncs with Redis by result: ok, idle (nothing to send), down.",
            ["result"],
            registry=registry,
        )
        self.ratelimit_max_unsynced = prom.Gauge(
            "authz_ratelimit_max_unsynced_increments",
            "The most increments one counter held locally between two Redis syncs: this "
            "process's share of the overshoot bound.",
            registry=registry,
            multiprocess_mode="max",
        )
        self.redis_errors = prom.Counter(
            "authz_redis_errors",
            "Failed Redis operations by operation.",
            ["op"],
            registry=registry,
        )
        self.gc_pause = prom.Histogram(
            "authz_gc_pause_seconds",
            "Cyclic garbage-collector pauses (wall time of one collection) by generation "
            "(0, 1 young; 2 full).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=registry,
        )
        # Registered only when Redis is configured (enable_redis): absent = not configured.
        self.redis_up: prom.Gauge | None = None
        self._limited_seen: dict[tuple[str, str, str, str], int] = {}
        self._check_children: dict[tuple[str, str, str, str], Any] = {}
        self._actor_children: dict[tuple[str, str, str], Any] = {}
        self._duration_children: dict[tuple[str, str], Any] = {}
        self._cache_seen = (0, 0)

    def record_check(self, d: Decision, seconds: float) -> None:
        label = outcome(d)
        key = (d.api, d.route, label, d.code)
        child = self._check_children.get(key)
        if child is None:
            child = self._check_children[key] = self.checks.labels(*key)
        child.inc()
        p = d.principal
        akey = (d.api, label, "none" if p is None else p.actor.value)
        actor_child = self._actor_children.get(akey)
        if actor_child is None:
            actor_child = self._actor_children[akey] = self.checks_by_actor.labels(*akey)
        actor_child.inc()
        dkey = (d.api, label)
        hist = self._duration_children.get(dkey)
        if hist is None:
            hist = self._duration_children[dkey] = self.check_duration.labels(*dkey)
        hist.observe(seconds)

    def sync_cache(self, hits: int, misses: int, size: int) -> None:
        """Fold the cache's own counters into Prometheus (called periodically, not per check)."""
        seen_hits, seen_misses = self._cache_seen
        if hits >= seen_hits and misses >= seen_misses:
            self.cache_hits.inc(hits - seen_hits)
            self.cache_misses.inc(misses - seen_misses)
        self._cache_seen = (hits, misses)
        self.cache_entries.set(size)

    def sync_ratelimit(self, limited: dict[tuple[str, str, str, str], int], counters: int) -> None:
        """Fold the limiter's own over-limit counts into Prometheus (periodically)."""
        seen = self._limited_seen
        for labels, n in limited.items():
            delta = n - seen.get(labels, 0)
            if delta > 0:
                self.ratelimit_limited.labels(*labels).inc(delta)
                seen[labels] = n
        self.ratelimit_counters.set(counters)

    # RedisLink observer protocol
    def enable_redis(self) -> None:
        if self.redis_up is None:
            self.redis_up = prom.Gauge(
                "authz_redis_up",
                "1 while the Redis that shares state is reachable, 0 while decisions run on "
                "local state only (absent: no Redis configured).",
                registry=self.registry,
                multiprocess_mode="min",
            )

    def on_redis_state(self, up: bool) -> None:
        self.enable_redis()
        assert self.redis_up is not None
        self.redis_up.set(1 if up else 0)

    def on_redis_error(self, op: str) -> None:
        self.redis_errors.labels(op).inc()

    # RateLimitSync observer protocol
    def on_ratelimit_sync(self, result: str, max_delta: int, counters: int) -> None:
        if result != "local":
            self.ratelimit_syncs.labels(result).inc()
            self.ratelimit_max_unsynced.set(max_delta)

    # RevocationStore / FileFeed observer protocols
    def on_revocation_rules(self, source: str, rules: int) -> None:
        self.revocation_rules.labels(source).set(rules)

    def on_revocation_reload(self, source: str, result: str) -> None:
        self.revocation_reloads.labels(source, result).inc()

    # KeyStore observer protocol
    def on_refresh(self, issuer: str, result: str, keys: int) -> None:
        self.jwks_refreshes.labels(issuer, result).inc()
        if result in ("ok", "unchanged"):
            self.jwks_keys.labels(issuer).set(keys)
            self.jwks_last_success.labels(issuer).set(time.time())


class GcPauses:
    """A ``gc.callbacks`` hook: the wall time of every collection, by generation, for the
    histogram ``Metrics.gc_pause``.

    The callback only appends a float to a list: a collection can start inside any allocation,
    including one made while prometheus-client holds its value lock (one global, non-reentrant
    lock in multiprocess mode), so observing from the callback could deadlock. ``flush()``
    (every 0.25 s, from the serving loop) moves the pauses into the histogram. Collections do
    not nest and hold the GIL, so one start time suffices; nothing is done per check."""

    def __init__(self, histogram: prom.Histogram) -> None:
        self._by_generation = tuple(histogram.labels(str(g)) for g in range(3))
        self._pending: tuple[list[float], ...] = ([], [], [])
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pending[info["generation"]].append(time.perf_counter() - self._started)

    def flush(self) -> None:
        for child, pending in zip(self._by_generation, self._pending, strict=True):
            while pending:
                child.observe(pending.pop())

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        self.flush()


class AuditLog:
    """One JSON line per decision. Never the token, a signature or the claim set."""

    def __init__(
        self,
        stream: IO[str] | None = None,
        *,
        log_allows: bool = True,
        allow_sample_rate: float = 1.0,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self.log_allows = log_allows
        self.allow_sample_rate = allow_sample_rate
        self._rand = rand
        self._clock = clock
        self._buffer: list[str] = []
        self._buffered = 0
        self._segments: dict[_SegmentKey, tuple[str, str]] = {}

    def wants(self, d: Decision) -> bool:
        if not d.allowed or d.would_deny:
            return True
        if not self.log_allows:
            return False
        return self.allow_sample_rate >= 1.0 or self._rand() < self.allow_sample_rate

    def record(self, attrs: RequestAttrs, d: Decision, seconds: float) -> None:
        if not self.wants(d):
            return
        p = d.principal
        q = _quote
        tid = oid = azp = uti = actor = ""
        if p is not None:
            tid, oid, azp, uti, actor = p.tid, p.oid, p.client_id, p.uti, p.actor.value
        # What is the same on every check of one caller on one route (the decision and the
        # caller's claims) is redacted, bounded and encoded once (``_segments``, bounded).
        o, dn = outcome(d), d.would_deny
        key = (d.api, d.route, o, dn, d.status, d.code, actor, tid, oid, azp, uti)
        segments = self._segments.get(key)
        if segments is None:
            segments = self._segments_for(key)
        # Every client-supplied field is redacted and bounded (audit_field). One probe over all
        # of them first: the common line (a GUID, a short dot-free path) needs neither.
        rid, method, path = attrs.request_id, attrs.method, _path_only(attrs.path)
        probe = f"{rid}{method}{path}"
        if (
            "." in probe
            or "earer" in probe.lower()
            or len(path) > PATH_MAX
            or len(rid) > REQUEST_ID_MAX
            or len(method) > METHOD_MAX
        ):
            f = audit_field
            rid, method, path = f(rid, REQUEST_ID_MAX), f(method, METHOD_MAX), f(path, PATH_MAX)
        # An f-string over escaped fields: the same JSON as json.dumps on a dict, at half the cost.
        line = (
            f'{{"ts":{self._clock():.3f},"log":"audit",'
            f'"request_id":{q(rid)},'
            f'"decision_id":{q(d.decision_id)},{segments[0]}'
            f'"method":{q(method)},"path":{q(path)},{segments[1]}'
            f'"latency_us":{seconds * 1e6:.1f}'
        )
        if d.code == "rate_limited":  # which limit (its configured name, never the key value)
            line += f',"rate_limit":{q(d.metadata.get("rate_limit", ""))}'
        line += "}\n"
        # Buffered in-process: one write per flush (every 250 ms), not one system call per check.
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= _FLUSH_BYTES:
            self.flush()

    def event(self, event: str, **fields: Any) -> None:
        """A management event (revocation rules changed, an admin API call): one JSON line,
        written at once. Strings are redacted and bounded like client-supplied fields."""
        record = {"ts": round(self._clock(), 3), "log": "audit", "event": event}
        record.update({k: _redact(v) for k, v in fields.items()})
        self._buffer.append(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self.flush()

    def _segments_for(self, key: _SegmentKey) -> tuple[str, str]:
        """The two constant stretches of one caller's audit line on one route (``record``)."""
        api, route, decision, would_deny, status, code, actor, *claims = key
        q = _quote
        tid, oid, azp, uti = (audit_field(v, CLAIM_MAX) for v in claims)
        segments = (
            f'"api":{q(api)},"route":{q(route)},',
            f'"decision":"{decision}","would_deny":{"true" if would_deny else "false"},'
            f'"status":{int(status)},"code":{q(code)},'
            f'"tid":{q(tid)},"oid":{q(oid)},"azp":{q(azp)},"uti":{q(uti)},'
            f'"actor":"{actor}",',
        )
        if len(self._segments) >= _SEGMENTS_MAX:  # the oldest goes, not all (GC: perf doc)
            del self._segments[next(iter(self._segments))]
        self._segments[key] = segments
        return segments

    def flush(self) -> None:
        """Write what is buffered. Called every 250 ms by the app and at shutdown: an operator
        must not wait for a buffer to fill to see a deny."""
        if not self._buffer:
            return
        chunk = "".join(self._buffer)
        self._buffer.clear()
        self._buffered = 0
        try:
            self._stream.write(chunk)
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or full stdout must not turn a decision into an error.
            return


EVENT_FIELD_MAX = 600


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return audit_field(value, EVENT_FIELD_MAX)
    if isinstance(value, dict):
        return {str(k): _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


class RedactFilter(logging.Filter):
    """Replace anything shaped like a JWT in a log record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "eyJ" in msg:
            record.msg = JWT_RE.sub(REDACTED, msg)
            record.args = None
        return True


def rfc3339(epoch: float) -> str:
    """``2026-12-03T07:10:07.123Z``: RFC 3339, UTC, milliseconds (the form of Envoy's
    ``%START_TIME%`` in our access logs), so both logs sort and join on one clock format."""
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_OWN_KEYS = frozenset({"ts", "level", "logger", "msg", "worker", "exc"})


def _extra_value(value: Any) -> Any:
    """A JSON-ready ``extra=`` value, with anything shaped like a JWT redacted."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = value if isinstance(value, str) else str(value)
    return JWT_RE.sub(REDACTED, text) if "eyJ" in text else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: RFC 3339 ``ts``, ``level``, ``logger``, ``msg``, every field the
    caller passed with ``extra=`` (in the order given; ``None`` values left out; a name clashing
    with one of ours is not written), and ``worker`` (the worker index) on every line a worker
    process writes."""

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _OWN_KEYS and value is not None:
                out[key] = _extra_value(value)
        if self._worker is not None:
            out["worker"] = self._worker
        if record.exc_info:
            out["exc"] = JWT_RE.sub(REDACTED, self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"))


def configure_logging(
    level: str = "INFO", *, json_format: bool = True, worker: int | None = None
) -> None:
    """Logs to stderr; ``worker``: the worker index a worker process stamps on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactFilter())
    plain = logging.Formatter("%(message)s" if worker is None else f"[worker {worker}] %(message)s")
    handler.setFormatter(JsonFormatter(worker=worker) if json_format else plain)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every key fetch at INFO; the key store logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
