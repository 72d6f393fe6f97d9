"""Revocation at runtime: the store that merges named sources into the snapshot the engine reads,
the file source (format, validation, hot reload, atomic updates) and the audit of every change.

Size: the store, the file format and its feed change together (one file contract).

    RevocationStore        named sources -> one immutable RevocationSet (``current``), swapped
    │                      whole in one assignment: a check reads the snapshot it started with
    ├── "file"  FileFeed   a YAML or JSON file: polled (resolved path, inode, mtime, size) every
    │                      ``revocation.poll_interval_seconds`` and re-read on SIGHUP; parsed in a
    │                      thread; a bad file is rejected whole and the last good rules stay
    └── (more sources)     e.g. a shared Redis feed: ``store.replace_async(name, rules)``

The check path never awaits any of this (the pattern of the key store): it reads
``store.current``. Expired rules never match (the snapshot checks expiry at lookup) and are
pruned from the snapshot in the background.

Writes (``authz revoke add|remove``, the admin API) go to the file: read and validate it whole
(a bad file is never overwritten), change it, write a temporary file beside it, fsync, rename
over (readers see the old file or the new one, never half), all under an exclusive ``flock`` on
``<file>.lock`` so two writers cannot lose each other's change. ``.json`` files are written as
JSON, anything else as YAML.

Every change of a source's rules is audited (one JSON line: source, added and removed rule ids,
what triggered it); the admin API and the CLI audit who asked. Never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import Field, ValidationError, field_validator

from authz import config as config_mod
from authz.config import ConfigError, RevocationSettings, StrictStr
from authz.policy.revocation import (
    GUID_MATCHERS,
    RevocationRule,
    RevocationSet,
    rule_problems,
)

log = logging.getLogger("authz.revocation")

FILE_SOURCE = "file"
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_RULES = 1_000_000
LOCK_TIMEOUT_S = 5.0
PRUNE_INTERVAL_S = 30.0
_AUDIT_IDS = 50  # rule ids listed per audit line (the count is always complete)

Audit = Callable[..., None]  # AuditLog.event(event, **fields)


class RevocationFileError(Exception):
    """Rules that must not be enforced; ``problems`` name the key path, like the config's
    (``rules[3].oid: expected a lower-case GUID like the token's claim``)."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = config_mod._bounded(problems)
        self.source = source
        head = f"invalid revocation rules{f' in {source}' if source else ''}"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class RevocationConflict(Exception):
    """A write that cannot be made: a duplicate rule id, an unknown one, a lock held too long."""


class UnknownRule(RevocationConflict):
    """No rule with that id (in the file)."""


# ------------------------------------------------------------------------------- the format


def epoch(value: Any) -> int:
    """A rule time: Unix seconds, or ISO 8601 with a zone (``2026-12-03T10:00:00Z``), or a YAML
    timestamp with a zone."""
    if isinstance(value, bool):
        raise ValueError("expected a time, not true/false")  # noqa: TRY004 (pydantic wants it)
    if isinstance(value, int):
        if not 0 <= value < 2**33:
            raise ValueError("expected Unix seconds between 1970 and 2242")
        return value
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "expected Unix seconds or an ISO 8601 time with a zone, e.g. 2026-12-03T10:00:00Z"
            ) from None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("the time has no zone: add Z (UTC) or an offset like +01:00")
        return int(value.timestamp())
    raise ValueError(
        "expected Unix seconds or an ISO 8601 time with a zone, e.g. 2026-12-03T10:00:00Z"
    )


class _Rule(config_mod._Model):
    id: StrictStr
    oid: StrictStr = ""
    sub: StrictStr = ""
    azp: StrictStr = ""
    appid: StrictStr = ""  # v1 spelling of azp: the same matcher
    tid: StrictStr = ""
    uti: StrictStr = ""
    sid: StrictStr = ""
    issued_before: Any = 0  # validators do not run on defaults: 0 is already the answer
    reason: StrictStr
    expires_at: Any
    created_at: Any = 0
    created_by: StrictStr = ""

    @field_validator("issued_before", "created_at")
    @classmethod
    def _optional_time(cls, v: Any) -> int:
        return 0 if v is None else epoch(v)

    @field_validator("expires_at")
    @classmethod
    def _time(cls, v: Any) -> int:
        return epoch(v)


class _File(config_mod._Model):
    rules: list[_Rule] = Field(default_factory=list, max_length=MAX_RULES)


def rules_from_document(
    data: Any,
    *,
    now: float,
    max_lifetime_s: float,
    source: str = "",
    early: Sequence[str] = (),
) -> tuple[list[RevocationRule], int]:
    """Validate a parsed document: ``({rules: [...]}``, or nothing) -> (live rules, how many
    expired ones were dropped). Raises RevocationFileError naming every problem."""
    problems = list(early)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RevocationFileError(
            [*problems, "(top level): expected a mapping {rules: [...]}"], source
        )
    try:
        doc = _File.model_validate(data)
    except ValidationError as e:
        raise RevocationFileError([*problems, *config_mod._problems(e)], source) from None
    rules: list[RevocationRule] = []
    seen: dict[str, int] = {}
    for i, m in enumerate(doc.rules):
        where = f"rules[{i}]"
        if m.azp and m.appid and m.azp != m.appid:
            problems.append(f"{where}: azp and appid name the same claim; set one of them")
        rule = rule_from_fields(
            {
                "id": m.id,
                "oid": m.oid,
                "sub": m.sub,
                "azp": m.azp or m.appid,
                "tid": m.tid,
                "uti": m.uti,
                "sid": m.sid,
                "issued_before": m.issued_before,
                "reason": m.reason,
                "expires_at": m.expires_at,
                "created_at": m.created_at,
                "created_by": m.created_by,
            }
        )
        for key, message in rule_problems(rule, now=now, max_lifetime_s=max_lifetime_s):
            problems.append(f"{where}{'' if key == '(rule)' else '.' + key}: {message}")
        if m.id in seen:
            problems.append(f"{where}.id: duplicate rule id {m.id!r} (also rules[{seen[m.id]}])")
        seen.setdefault(m.id, i)
        rules.append(rule)
    if problems:
        raise RevocationFileError(problems, source)
    live = [r for r in rules if r.expires_at > now]
    return live, len(rules) - len(live)


def rule_from_fields(fields: Mapping[str, Any]) -> RevocationRule:
    """A rule from already-typed fields, GUID matchers lower-cased (Entra issues them so)."""
    kw = dict(fields)
    for name in GUID_MATCHERS:
        if isinstance(kw.get(name), str):
            kw[name] = kw[name].lower()
    return RevocationRule(**kw)


def new_rule(data: Any, *, now: float, max_lifetime_s: float, created_by: str) -> RevocationRule:
    """A rule as the admin API and ``authz revoke add`` take it: the file's fields, plus
    ``expires_in`` (seconds from now) instead of ``expires_at``, ``issued_before: "now"`` (every
    token issued up to this second), and
    ``id`` optional (generated). ``created_at``/``created_by`` are set here, never taken from the
    caller. Problems are named ``rule.<key>``."""
    if not isinstance(data, dict):
        raise RevocationFileError(["rule: expected an object of rule fields"])
    d = dict(data)
    problems = [
        f"rule.{key}: set by the server, not by the caller"
        for key in ("created_at", "created_by")
        if key in d
    ]
    d.setdefault("id", "r-" + secrets.token_hex(6))
    if "expires_in" in d:
        seconds = d.pop("expires_in")
        if "expires_at" in d:
            problems.append("rule.expires_in: set one of expires_at and expires_in")
        elif isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            problems.append("rule.expires_in: expected a positive whole number of seconds")
        else:
            d["expires_at"] = int(now) + seconds
    if d.get("issued_before") == "now":
        # iat has one-second granularity: "now" includes a token issued in this very second
        # (fail closed); a token fetched from the next second on passes.
        d["issued_before"] = int(now) + 1
    if problems:
        raise RevocationFileError(problems)
    d["created_at"], d["created_by"] = int(now), created_by
    try:
        rules, expired = rules_from_document({"rules": [d]}, now=now, max_lifetime_s=max_lifetime_s)
    except RevocationFileError as e:
        raise RevocationFileError([p.replace("rules[0]", "rule", 1) for p in e.problems]) from None
    if expired:
        raise RevocationFileError(["rule.expires_at: already in the past"])
    return rules[0]


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {config_mod.short(key)} in an object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_document(text: str, path: str) -> tuple[Any, list[str]]:
    """The document of a ``.json`` file (duplicate keys rejected) or a YAML one (the config
    loader: duplicate keys, nesting and alias limits)."""
    if path.endswith(".json"):
        try:
            return json.loads(text, object_pairs_hook=_json_pairs, parse_constant=_no_constant), []
        except ValueError as e:
            raise RevocationFileError([f"not valid JSON: {e}"], path) from None
    try:
        return config_mod.read_yaml(text, path)
    except ConfigError as e:
        raise RevocationFileError(e.problems, path) from None


def _stamp(path: str) -> tuple[str, int, int, int] | None:
    """Resolved target, inode, mtime and size (a ConfigMap swaps a symlink); None if absent."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError:
        return ("", 0, 0, 0)
    return (real, st.st_ino, st.st_mtime_ns, st.st_size)


def load_file(
    path: str, *, now: float, max_lifetime_s: float
) -> tuple[list[RevocationRule], int, bool]:
    """(live rules, expired dropped, file exists). A missing file holds no rules."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return [], 0, False
    except OSError as e:
        raise RevocationFileError([f"cannot read the file: {e}"], path) from None
    if len(raw) > MAX_FILE_BYTES:
        raise RevocationFileError([f"larger than {MAX_FILE_BYTES} bytes"], path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RevocationFileError([f"not UTF-8: {e}"], path) from None
    data, early = read_document(text, path)
    rules, expired = rules_from_document(
        data, now=now, max_lifetime_s=max_lifetime_s, source=path, early=early
    )
    return rules, expired, True


def render_file(path: str, rules: Sequence[RevocationRule]) -> str:
    doc = {"rules": [r.to_dict() for r in rules]}
    if path.endswith(".json"):
        return json.dumps(doc, indent=1) + "\n"
    head = (
        "# Revocation rules (docs/revocation.md). Written by `authz revoke` and the admin API;\n"
        "# hand edits are fine, comments are not kept.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, allow_unicode=False, width=1000)


def write_atomically(path: str, text: str) -> None:
    """Temporary file beside ``path``, fsync, rename over it, fsync the directory."""
    target = Path(path)
    try:
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o644 & ~umask
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dirfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


@contextlib.contextmanager
def locked(path: str, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.lock`` for one read-modify-write."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise RevocationConflict(
                        f"{path}.lock is held by another writer (waited {timeout_s:.0f} s)"
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class FileSource:
    """The revocation file: read, and changed under the lock. Blocking: call from a thread."""

    name = FILE_SOURCE

    def __init__(
        self, path: str, *, max_lifetime_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.max_lifetime_s = max_lifetime_s
        self._clock = clock

    def stamp(self) -> tuple[str, int, int, int] | None:
        return _stamp(self.path)

    def load(self) -> tuple[list[RevocationRule], int, bool]:
        return load_file(self.path, now=self._clock(), max_lifetime_s=self.max_lifetime_s)

    def add(self, rule: RevocationRule) -> tuple[RevocationRule, ...]:
        """Append ``rule`` (its id must be new); returns every live rule of the file after."""
        with locked(self.path):
            rules, _, _ = self.load()
            if any(r.id == rule.id for r in rules):
                raise RevocationConflict(f"a rule with id {rule.id!r} already exists")
            problems = rule_problems(rule, now=self._clock(), max_lifetime_s=self.max_lifetime_s)
            if problems:
                raise RevocationFileError([f"rule.{k}: {m}" for k, m in problems])
            rules.append(rule)
            write_atomically(self.path, render_file(self.path, rules))
            return tuple(rules)

    def remove(self, rule_id: str) -> tuple[RevocationRule, tuple[RevocationRule, ...]]:
        """Delete the rule ``rule_id``; returns it and every live rule of the file after."""
        with locked(self.path):
            rules, _, _ = self.load()
            doomed = [r for r in rules if r.id == rule_id]
            if not doomed:
                raise UnknownRule(f"no rule with id {rule_id!r} in {self.path}")
            kept = [r for r in rules if r.id != rule_id]
            write_atomically(self.path, render_file(self.path, kept))
            return doomed[0], tuple(kept)


# -------------------------------------------------------------------------------- the store


class StoreObserver(Protocol):
    def on_revocation_rules(self, source: str, rules: int) -> None: ...


class RevocationStore:
    """Named sources of rules merged into ``current``, the snapshot the engine reads.

    Only the event loop's thread changes it. Building the snapshot of a large list takes a
    while (~0.3 s for 100 000 rules), so the async paths build it in a worker thread and swap
    it in on the loop; a build that raced with another source's change is redone."""

    def __init__(
        self,
        *,
        audit: Audit | None = None,
        observer: StoreObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.current = RevocationSet()
        self._sources: dict[str, tuple[RevocationRule, ...]] = {}
        self._version = 0
        self._audit = audit
        self._observer = observer
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def replace(self, source: str, rules: Sequence[RevocationRule], *, via: str = "") -> None:
        """Swap one source's rules and rebuild the snapshot here (startup, small lists)."""
        merged = {**self._sources, source: tuple(rules)}
        self._install(merged, _build(merged), changed=source, via=via)

    async def replace_async(
        self, source: str, rules: Sequence[RevocationRule], *, via: str = ""
    ) -> None:
        """``replace`` with the snapshot built in a worker thread."""
        for _ in range(3):
            version = self._version
            merged = {**self._sources, source: tuple(rules)}
            built = await asyncio.to_thread(_build, merged)
            if version == self._version:
                self._install(merged, built, changed=source, via=via)
                return
        self.replace(source, rules, via=via)  # pragma: no cover - three races in a row

    def _install(
        self,
        merged: dict[str, tuple[RevocationRule, ...]],
        built: RevocationSet,
        *,
        changed: str,
        via: str,
    ) -> None:
        old = self._sources.get(changed, ())
        new = merged[changed]
        self._sources = merged
        self.current = built  # the swap: a check reads one snapshot or the other
        self._version += 1
        if self._observer is not None:
            for name, rules in merged.items():
                self._observer.on_revocation_rules(name, len(rules))
        old_ids, new_ids = {r.id for r in old}, {r.id for r in new}
        added, removed = sorted(new_ids - old_ids), sorted(old_ids - new_ids)
        if (added or removed) and self._audit is not None:
            self._audit(
                "revocation_rules_changed",
                source=changed,
                via=via,
                rules=len(new),
                added=added[:_AUDIT_IDS],
                removed=removed[:_AUDIT_IDS],
                added_count=len(added),
                removed_count=len(removed),
            )

    def sources(self) -> dict[str, tuple[RevocationRule, ...]]:
        return dict(self._sources)

    def find(self, rule_id: str) -> list[tuple[str, RevocationRule]]:
        return [(s, r) for s, rules in self._sources.items() for r in rules if r.id == rule_id]

    async def prune(self) -> bool:
        """Drop expired rules from every source and the snapshot (lookups ignore them anyway:
        this frees them). True when something was dropped."""
        now = self._clock()
        if not self.current.rules or self.current.next_expiry > now:
            return False
        version = self._version
        kept = {
            n: tuple(r for r in rules if r.expires_at > now) for n, rules in self._sources.items()
        }
        built = await asyncio.to_thread(_build, kept)
        if version != self._version:
            return False  # a source changed meanwhile; the next round prunes
        self._sources = kept
        self.current = built
        self._version += 1
        if self._observer is not None:
            for name, rules in kept.items():
                self._observer.on_revocation_rules(name, len(rules))
        return True

    def start_background(self, interval_s: float = PRUNE_INTERVAL_S) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(interval_s), name="authz.revocation:prune")

    async def _run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.prune()
            except Exception:  # pragma: no cover - nothing in prune is expected to fail
                log.exception("pruning expired revocation rules failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _build(sources: Mapping[str, tuple[RevocationRule, ...]]) -> RevocationSet:
    return RevocationSet(r for rules in sources.values() for r in rules)


class ReloadObserver(Protocol):
    def on_revocation_reload(self, source: str, result: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """A file read and validated, not yet in force."""

    stamp: tuple[str, int, int, int] | None
    rules: list[RevocationRule]
    expired: int
    exists: bool


class PollingFeed:
    """What every feed shares: a background task that calls ``refresh()`` every
    ``poll_interval_s`` until closed (``refresh`` handles its own errors)."""

    name = "feed"
    poll_interval_s = 1.0
    _task: asyncio.Task[None] | None = None

    async def refresh(self, *, force: bool = False, via: str = "poll") -> bool:
        raise NotImplementedError

    def start_background(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"authz.revocation:{self.name}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - refresh() handles its own errors
                log.exception("revocation %s watch failed; retrying", self.name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class FileFeed(PollingFeed):
    """Keeps the store's ``file`` source in step with the file, and writes to it."""

    def __init__(
        self,
        settings: RevocationSettings,
        store: RevocationStore,
        *,
        observer: ReloadObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.source = FileSource(
            settings.file, max_lifetime_s=settings.max_rule_lifetime_s, clock=clock
        )
        self.store = store
        self._observer = observer
        self._stamp: tuple[str, int, int, int] | None = ("?", -1, -1, -1)  # never seen
        self.name, self.poll_interval_s = FILE_SOURCE, settings.poll_interval_s
        self._lock = asyncio.Lock()

    @property
    def path(self) -> str:
        return self.source.path

    def prepare(self) -> Prepared:
        """Read and validate the file (blocking): raises RevocationFileError on a bad file."""
        stamp = self.source.stamp()
        rules, expired, exists = self.source.load()
        return Prepared(stamp, rules, expired, exists)

    def commit(self, prepared: Prepared, *, via: str) -> None:
        """Put prepared rules in force (the snapshot built here: startup, reloads)."""
        self._stamp = prepared.stamp
        self.store.replace(FILE_SOURCE, prepared.rules, via=via)
        self._loaded(prepared)

    async def commit_async(self, prepared: Prepared, *, via: str) -> None:
        """``commit`` with the snapshot built in a worker thread."""
        self._stamp = prepared.stamp
        await self.store.replace_async(FILE_SOURCE, prepared.rules, via=via)
        self._loaded(prepared)

    def load_now(self) -> None:
        """The first load (startup, blocking): raises RevocationFileError on a bad file, so a
        server never starts without the rules it was told to enforce."""
        self.commit(self.prepare(), via="startup")

    async def refresh(self, *, force: bool = False, via: str = "poll") -> bool:
        """Re-read the file if it changed (or ``force``); True if new rules are in force. A bad
        file is logged and counted, and the last good rules stay."""
        async with self._lock:
            stamp = self.source.stamp()
            if stamp == self._stamp and not force:
                return False
            try:
                prepared = await asyncio.to_thread(self.prepare)
            except RevocationFileError as e:
                self._stamp = stamp
                self._count("invalid")
                log.error("revocation file rejected; the previous rules stay in force:\n%s", e)
                return False
            except Exception as e:
                self._stamp = stamp
                self._count("error")
                log.error("revocation file reload failed; the previous rules stay: %s", e)
                return False
            await self.commit_async(prepared, via=via)
            return True

    def _loaded(self, prepared: Prepared) -> None:
        if not prepared.exists:
            log.warning("revocation file %s does not exist: no file rules", self.path)
        self._count("ok")
        log.info(
            "revocation rules from %s: %d in force (%d expired dropped)",
            self.path,
            len(prepared.rules),
            prepared.expired,
        )

    def _count(self, result: str) -> None:
        if self._observer is not None:
            self._observer.on_revocation_reload(FILE_SOURCE, result)

    async def add(self, rule: RevocationRule, *, via: str) -> None:
        async with self._lock:
            rules = await asyncio.to_thread(self.source.add, rule)
            self._stamp = self.source.stamp()
            await self.store.replace_async(FILE_SOURCE, rules, via=via)

    async def remove(self, rule_id: str, *, via: str) -> RevocationRule:
        async with self._lock:
            doomed, rules = await asyncio.to_thread(self.source.remove, rule_id)
            self._stamp = self.source.stamp()
            await self.store.replace_async(FILE_SOURCE, rules, via=via)
            return doomed
