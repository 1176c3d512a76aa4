"""The Registry's event-sourced store (RocksDB through rocksdict).

The event log is the source of truth; the tenant state is its fold. One accepted command
appends its event, the tenant's new state and the new sequence in ONE synced WriteBatch, so a
`kill -9` leaves either all of it or none. The relay's position and hash-chain heads live in the
same database (`m/relay`), written in their own synced batch after Kafka acknowledged.

Key layout (all values JSON or canonical JSON bytes):

    e/<seq, 8 bytes big-endian>   the event's signed body: canonical envelope without `auth`
    s/<seq, 8 bytes big-endian>   the tenant's state right after that event (for the relay)
    t/<tenant id>                 the tenant's current state
    m/seq                         the last store sequence (= envelope `seq`, gap-free)
    m/relay                       {"seq", "heads", "partitions"}: how far the relay got
    m/format                      the layout version

`apply(state, event) -> state` is the pure fold used live, at restart and for replay; opening the
store re-folds the whole log and compares it with the stored state (the integrity check).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from events.envelope import new_envelope
from events.ids import is_region, utcnow
from events.models import (
    MAX_REGIONS,
    Payload,
    TenantCreated,
    TenantDeleted,
    TenantRegionsChanged,
    TenantRestored,
)

PRODUCER = "registry"
FORMAT = b"openkcm-registry-store/1"

_E = b"e/"
_S = b"s/"
_T = b"t/"
_M_SEQ = b"m/seq"
_M_RELAY = b"m/relay"
_M_FORMAT = b"m/format"

TENANT_EVENT_TYPES = frozenset(
    {"TenantCreated", "TenantDeleted", "TenantRestored", "TenantRegionsChanged"}
)


class StoreError(Exception):
    """The store cannot be opened or failed its integrity check (tier 3: frozen)."""


class FoldError(ValueError):
    """An event that cannot follow the state it is applied to."""


# --- State and the pure fold ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantState:
    tenant_id: str
    regions: tuple[str, ...]
    home_region: str
    status: Literal["live", "deleted"]
    created_at: str
    """ISO-8601 UTC, exactly as in the TenantCreated envelope."""
    deleted_at: str | None
    version: int
    """Store sequence of the tenant's last event."""

    @property
    def live(self) -> bool:
        return self.status == "live"

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "regions": list(self.regions),
            "home_region": self.home_region,
            "status": self.status,
            "created_at": self.created_at,
            "deleted_at": self.deleted_at,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TenantState:
        return cls(
            tenant_id=data["tenant_id"],
            regions=tuple(data["regions"]),
            home_region=data["home_region"],
            status=data["status"],
            created_at=data["created_at"],
            deleted_at=data["deleted_at"],
            version=int(data["version"]),
        )

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()


def apply(state: TenantState | None, event: Mapping[str, Any]) -> TenantState:
    """The state of one tenant after one of its events (a plain-JSON envelope)."""
    kind = event["type"]
    tenant_id = event["tenant_id"]
    seq = int(event["seq"])
    payload = event["payload"]
    if kind == "TenantCreated":
        if state is not None:
            raise FoldError(f"TenantCreated of existing tenant {tenant_id} (seq {seq})")
        return TenantState(
            tenant_id=tenant_id,
            regions=tuple(payload["regions"]),
            home_region=payload["home_region"],
            status="live",
            created_at=event["occurred_at"],
            deleted_at=None,
            version=seq,
        )
    if state is None:
        raise FoldError(f"{kind} of unknown tenant {tenant_id} (seq {seq})")
    if kind == "TenantDeleted":
        if not state.live:
            raise FoldError(f"TenantDeleted of deleted tenant {tenant_id} (seq {seq})")
        return replace(state, status="deleted", deleted_at=event["occurred_at"], version=seq)
    if kind == "TenantRestored":
        if state.live:
            raise FoldError(f"TenantRestored of live tenant {tenant_id} (seq {seq})")
        return replace(state, status="live", deleted_at=None, version=seq)
    if kind == "TenantRegionsChanged":
        if not state.live:
            raise FoldError(f"TenantRegionsChanged of deleted tenant {tenant_id} (seq {seq})")
        return replace(
            state,
            regions=tuple(payload["regions"]),
            home_region=payload["home_region"],
            version=seq,
        )
    raise FoldError(f"not a tenant event of the Registry: {kind}")


def fold(
    events: Iterable[Mapping[str, Any]], state: dict[str, TenantState] | None = None
) -> dict[str, TenantState]:
    """Fold tenant events (in order) into {tenant_id: state}. Events about regions
    (RegionFailover) are skipped: ownership after a failover is the Cores' business."""
    tenants: dict[str, TenantState] = {} if state is None else state
    for event in events:
        if event["type"] not in TENANT_EVENT_TYPES:
            continue
        tid = event["tenant_id"]
        tenants[tid] = apply(tenants.get(tid), event)
    return tenants


# --- Commands and decisions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateTenant:
    tenant_id: str
    regions: tuple[str, ...]
    home_region: str


@dataclass(frozen=True, slots=True)
class DeleteTenant:
    tenant_id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RestoreTenant:
    tenant_id: str


@dataclass(frozen=True, slots=True)
class ChangeRegions:
    tenant_id: str
    regions: tuple[str, ...]
    expected_version: int | None = None


Command = CreateTenant | DeleteTenant | RestoreTenant | ChangeRegions


class Rejected(Exception):
    """A command refused against the current state or the catalogue."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Policy:
    regions: frozenset[str]
    """The catalogue of valid regions (`--regions`)."""
    purge_grace: timedelta = timedelta(days=7)


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def purge_after(state: TenantState, policy: Policy) -> datetime | None:
    if state.deleted_at is None:
        return None
    return parse_time(state.deleted_at) + policy.purge_grace


def _check_regions(regions: Sequence[str], policy: Policy) -> None:
    if not regions:
        raise Rejected(422, "invalid_regions", "regions must list at least one region")
    if len(regions) > MAX_REGIONS:
        raise Rejected(422, "invalid_regions", f"at most {MAX_REGIONS} regions")
    if len(set(regions)) != len(regions):
        raise Rejected(422, "invalid_regions", "regions must not repeat")
    bad = [r for r in regions if not is_region(r)]
    if bad:
        raise Rejected(422, "invalid_regions", f"not region names: {', '.join(bad)}")
    unknown = [r for r in regions if r not in policy.regions]
    if unknown:
        raise Rejected(
            422,
            "unknown_region",
            f"regions not in the catalogue: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(policy.regions))})",
        )


def decide(
    cmd: Command, state: TenantState | None, policy: Policy, now: datetime
) -> Payload | None:
    """The event a command produces against the tenant's current state (None: nothing to
    change), or `Rejected` with the HTTP status and a message."""
    tid = cmd.tenant_id
    if isinstance(cmd, CreateTenant):
        _check_regions(cmd.regions, policy)
        if cmd.home_region not in cmd.regions:
            raise Rejected(
                422,
                "home_region_outside_regions",
                f"home_region {cmd.home_region} is not in regions {list(cmd.regions)}",
            )
        if state is not None and state.live:
            raise Rejected(409, "tenant_exists", f"tenant {tid} already exists")
        if state is not None:
            raise Rejected(
                409,
                "tenant_deleted",
                f"tenant {tid} was deleted at {state.deleted_at}; restore it within the purge "
                "grace (tenant ids are never reused)",
            )
        return TenantCreated(regions=list(cmd.regions), home_region=cmd.home_region)
    if state is None:
        raise Rejected(404, "tenant_not_found", f"no tenant {tid}")
    if isinstance(cmd, DeleteTenant):
        if not state.live:
            raise Rejected(409, "tenant_deleted", f"tenant {tid} is already deleted")
        return TenantDeleted(reason=cmd.reason)
    if isinstance(cmd, RestoreTenant):
        if state.live:
            raise Rejected(409, "tenant_not_deleted", f"tenant {tid} is not deleted")
        deadline = purge_after(state, policy)
        assert deadline is not None
        if now >= deadline:
            raise Rejected(
                409,
                "purge_grace_over",
                f"the purge grace of tenant {tid} ended at {deadline.isoformat()}; "
                "its keys are purged and it cannot be restored",
            )
        return TenantRestored()
    if isinstance(cmd, ChangeRegions):
        if not state.live:
            raise Rejected(409, "tenant_deleted", f"tenant {tid} is deleted")
        if cmd.expected_version is not None and cmd.expected_version != state.version:
            raise Rejected(
                409,
                "version_conflict",
                f"tenant {tid} is at version {state.version}, not {cmd.expected_version}",
            )
        _check_regions(cmd.regions, policy)
        if state.home_region not in cmd.regions:
            raise Rejected(
                409,
                "home_region_required",
                f"the allow-list of tenant {tid} must keep its home region {state.home_region}",
            )
        if set(cmd.regions) == set(state.regions):
            return None
        return TenantRegionsChanged(regions=list(cmd.regions), home_region=state.home_region)
    raise TypeError(f"not a command: {cmd!r}")


# --- The store ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one command: the tenant afterwards and its event, or the rejection."""

    state: TenantState | None
    event_id: str | None
    seq: int
    error: Rejected | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    tenant_id: str
    body: bytes
    """Canonical envelope without `auth` (what is signed)."""
    after: TenantState
    """The tenant's state right after this event."""


@dataclass
class RelayPosition:
    seq: int = 0
    """The last store sequence the relay published and Kafka acknowledged."""
    heads: dict[int, str] = field(default_factory=dict)
    """Hash-chain head (hex digest) per partition of the lifecycle topic."""
    partitions: int = 0
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    """Next offset per topic and partition after our last acknowledged record: a broker whose
    end offsets are below these lost our records (e.g. an in-memory broker restarted)."""

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "seq": self.seq,
                "heads": {str(k): v for k, v in self.heads.items()},
                "partitions": self.partitions,
                "offsets": {
                    t: {str(p): o for p, o in parts.items()} for t, parts in self.offsets.items()
                },
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()

    @classmethod
    def loads(cls, raw: bytes) -> RelayPosition:
        data = json.loads(raw)
        return cls(
            seq=int(data["seq"]),
            heads={int(k): str(v) for k, v in data["heads"].items()},
            partitions=int(data.get("partitions", 0)),
            offsets={
                t: {int(p): int(o) for p, o in parts.items()}
                for t, parts in data.get("offsets", {}).items()
            },
        )

    def copy(self) -> RelayPosition:
        return RelayPosition(
            self.seq,
            dict(self.heads),
            self.partitions,
            {t: dict(parts) for t, parts in self.offsets.items()},
        )


def _seq_key(prefix: bytes, seq: int) -> bytes:
    return prefix + seq.to_bytes(8, "big")


class RegistryStore:
    """The open store: the RocksDB handle plus the folded state in memory.

    Writes are serialised by a lock (one writer at a time) and each command is checked against
    the state the previous one left (the expected-version check), so of two concurrent creates
    of one tenant exactly one is accepted.
    """

    def __init__(self, path: Path, policy: Policy) -> None:
        self.path = path
        self.policy = policy
        self.lock = threading.Lock()
        self.tenants: dict[str, TenantState] = {}
        self.seq = 0
        self.relay = RelayPosition()
        self._sync = WriteOptions()
        self._sync.sync = True
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_paranoid_checks(True)
        try:
            path.mkdir(parents=True, exist_ok=True)
            self.db = Rdict(str(path), options)
        except Exception as exc:  # noqa: BLE001 - rocksdb reports corruption as many kinds
            raise StoreError(f"cannot open the store at {path}: {exc}") from exc
        try:
            self._load_and_verify()
        except StoreError:
            self.db.close()
            raise
        except Exception as exc:  # noqa: BLE001
            self.db.close()
            raise StoreError(f"store at {path} failed its integrity check: {exc}") from exc

    # -- opening --------------------------------------------------------------------------

    def _load_and_verify(self) -> None:
        fmt = self.db.get(_M_FORMAT)
        raw_seq = self.db.get(_M_SEQ)
        if fmt is None and raw_seq is None:
            if self._any(_E) or self._any(_T):
                raise StoreError("store has events or tenants but no metadata")
            self.db.put(_M_FORMAT, FORMAT, self._sync)
            return
        if fmt != FORMAT:
            raise StoreError(f"unknown store format {fmt!r}")
        stored_seq = int(raw_seq or b"0")
        folded: dict[str, TenantState] = {}
        expected = 1
        afters = iter(self._prefixed(_S))
        for key, body in self._prefixed(_E):
            seq = int.from_bytes(key[len(_E):], "big")
            if seq != expected:
                raise StoreError(f"event log has a gap: expected seq {expected}, found {seq}")
            event = json.loads(body)
            if event.get("seq") != seq or event.get("producer") != PRODUCER:
                raise StoreError(f"event at seq {seq} does not carry its own sequence")
            tid = event["tenant_id"]
            after = apply(folded.get(tid), event)
            folded[tid] = after
            after_key, stored_after = next(afters, (b"", b""))
            if after_key != key.replace(_E, _S, 1) or stored_after != after.dumps():
                raise StoreError(f"state recorded after seq {seq} differs from the fold")
            expected += 1
        if next(afters, None) is not None:
            raise StoreError("state records without their events")
        if expected - 1 != stored_seq:
            raise StoreError(f"store sequence {stored_seq} but the log ends at {expected - 1}")
        count = 0
        for key, value in self._prefixed(_T):
            count += 1
            state = folded.get(key[len(_T):].decode())
            if state is None or value != state.dumps():
                raise StoreError(
                    f"stored state of tenant {key[len(_T):].decode()!r} differs from the fold "
                    "of the event log"
                )
        if count != len(folded):
            raise StoreError(
                f"{len(folded) - count} tenants of the event log have no stored state"
            )
        relay_raw = self.db.get(_M_RELAY)
        relay = RelayPosition.loads(relay_raw) if relay_raw is not None else RelayPosition()
        if relay.seq > stored_seq:
            raise StoreError(f"relay position {relay.seq} is beyond the log ({stored_seq})")
        self.tenants = folded
        self.seq = stored_seq
        self.relay = relay

    def _prefixed(self, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
        for key, value in self.db.items(from_key=prefix):
            assert isinstance(key, bytes)  # raw mode: keys and values are bytes
            if not key.startswith(prefix):
                break
            yield key, value

    def _any(self, prefix: bytes) -> bool:
        return next(iter(self._prefixed(prefix)), None) is not None

    # -- writing --------------------------------------------------------------------------

    def execute(self, commands: Sequence[Command], now: datetime | None = None) -> list[Outcome]:
        """Decide every command in order against the state the previous ones left; write the
        accepted events and the new state in one synced batch; return one outcome each."""
        now = now or utcnow()
        with self.lock:
            overlay: dict[str, TenantState] = {}
            outcomes: list[Outcome] = []
            batch = WriteBatch(raw_mode=True)
            seq = self.seq
            for cmd in commands:
                tid = cmd.tenant_id
                current = overlay.get(tid, self.tenants.get(tid))
                try:
                    payload = decide(cmd, current, self.policy, now)
                except Rejected as exc:
                    outcomes.append(Outcome(current, None, seq, exc))
                    continue
                if payload is None:
                    outcomes.append(Outcome(current, None, seq))
                    continue
                seq += 1
                env = new_envelope(
                    payload, producer=PRODUCER, seq=seq, tenant_id=tid, occurred_at=now
                )
                body = env.body()
                after = apply(current, json.loads(body))
                overlay[tid] = after
                encoded = after.dumps()
                batch.put(_seq_key(_E, seq), body)
                batch.put(_seq_key(_S, seq), encoded)
                batch.put(_T + tid.encode(), encoded)
                outcomes.append(Outcome(after, str(env.event_id), seq))
            if seq != self.seq:
                batch.put(_M_SEQ, str(seq).encode())
                self.db.write(batch, self._sync)
                self.tenants.update(overlay)
                self.seq = seq
            return [
                o if o.error is not None or o.event_id is not None else replace(o, seq=seq)
                for o in outcomes
            ]

    def record_relay(self, position: RelayPosition) -> None:
        """Persist how far the relay got, with its chain heads (one synced write)."""
        with self.lock:
            batch = WriteBatch(raw_mode=True)
            batch.put(_M_RELAY, position.dumps())
            self.db.write(batch, self._sync)
            self.relay = position.copy()

    # -- reading --------------------------------------------------------------------------

    def read_events(self, after_seq: int, limit: int) -> list[StoredEvent]:
        """Up to `limit` events after `after_seq`, in order, with the state each one left."""
        out: list[StoredEvent] = []
        end = min(self.seq, after_seq + limit)
        for seq in range(after_seq + 1, end + 1):
            body = self.db.get(_seq_key(_E, seq))
            after = self.db.get(_seq_key(_S, seq))
            if body is None or after is None:
                raise StoreError(f"event {seq} is missing from the log")
            state = TenantState.from_json(json.loads(after))
            out.append(StoredEvent(seq, state.tenant_id, body, state))
        return out

    def get(self, tenant_id: str) -> TenantState | None:
        return self.tenants.get(tenant_id)

    def live_snapshot(self) -> tuple[int, list[TenantState]]:
        """A consistent view for `/v1/snapshot`: the sequence and every live tenant, by id."""
        with self.lock:
            seq = self.seq
            live = [s for s in self.tenants.values() if s.live]
        live.sort(key=lambda s: s.tenant_id)
        return seq, live

    def by_region(
        self, region: str | None, after: str | None, limit: int, include_deleted: bool = False
    ) -> tuple[int, list[TenantState], str | None]:
        """A page of tenants (by id) whose allow-list admits `region` (all when None)."""
        with self.lock:
            seq = self.seq
            items = [
                s
                for s in self.tenants.values()
                if (include_deleted or s.live)
                and (region is None or region in s.regions)
                and (after is None or s.tenant_id > after)
            ]
        items.sort(key=lambda s: s.tenant_id)
        page = items[:limit]
        next_after = page[-1].tenant_id if len(items) > limit else None
        return seq, page, next_after

    def live_count(self) -> int:
        return sum(1 for s in self.tenants.values() if s.live)

    def close(self) -> None:
        with self.lock:
            try:
                self.db.close()
            except Exception:  # noqa: BLE001 - already closed
                pass
