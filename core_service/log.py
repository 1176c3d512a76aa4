"""The Core's local event log and its state projection, in ONE RocksDB.

Layout (raw bytes keys):
- `l` + pos (8 bytes big-endian) -> one log entry: a kind byte and the event's JSON
  (`E` own timeline event as signed wire bytes, `L` accepted lifecycle event as received,
  `P` local record, `I` another region's timeline event imported by hydration or the
  follower). Positions count 1, 2, 3... without gaps.
- `t` + tenant id -> the tenant's folded state (the projection; loaded directly on restart).
- `e` + event id -> position of an accepted lifecycle event (dedupe by event_id).
- `m/meta` -> log head: last position, the Core's producer seq, the hash-chain heads of its
  `kcm.core.keys` partitions, the consumed lifecycle offsets (tracking) and producer seqs.
- `m/relay` -> how far the relay published.
- `b` + tenant id -> an L1 re-binding in progress (the new reference), see engine.bind_l1.

Every append writes the entries, the tenant states they produced and the new head in one
WriteBatch with sync: nothing is ever half-applied. The recorder interface follows the
eventsourcing library's shape (`insert_events` with tracking, `select_events`,
`max_notification_id`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from rocksdict import AccessType, Options, Rdict, WriteBatch, WriteOptions

from core_service.memory import gc_paused
from core_service.state import TenantState, dump_tenant, load_tenant

OWN = b"E"
LIFECYCLE = b"L"
LOCAL = b"P"
IMPORTED = b"I"

_META = b"m/meta"
_RELAY = b"m/relay"


@dataclass
class LogMeta:
    pos: int = 0
    seq: int = 0
    heads: dict[str, str] = field(default_factory=dict)
    """partition (as str) -> hex digest of the last own event chained on it."""
    offsets: dict[str, list[int]] = field(default_factory=dict)
    """lifecycle partition -> [next offset to read, high-water mark of offsets seen]."""
    pseq: dict[str, int] = field(default_factory=dict)
    """"partition/producer" -> last applied lifecycle seq."""
    last_rotation: float | None = None
    rotations: int = 0
    key_offsets: dict[str, int] = field(default_factory=dict)
    """kcm.core.keys partition -> next offset the follower reads (core_service.follower)."""

    def copy(self) -> LogMeta:
        return LogMeta(
            self.pos, self.seq, dict(self.heads), {k: list(v) for k, v in self.offsets.items()},
            dict(self.pseq), self.last_rotation, self.rotations, dict(self.key_offsets),
        )


@dataclass
class RelayMeta:
    pos: int = 0
    ends: dict[str, int] = field(default_factory=dict)
    """kcm.core.keys partition -> end offset after our last acknowledged publish."""


def _pos_key(pos: int) -> bytes:
    return b"l" + pos.to_bytes(8, "big")


def event_of(entry: bytes) -> dict[str, Any]:
    """The JSON object of a log entry (kind byte stripped)."""
    return orjson.loads(entry[1:])  # type: ignore[no-any-return]


class EventLog:
    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only` opens a log another process may be writing (replay --verify)."""
        self.path = path
        opts = Options(raw_mode=True)
        if read_only:
            if not (path / "CURRENT").exists():
                raise FileNotFoundError(f"no Core event log at {path}")
            self.db = Rdict(str(path), options=opts, access_type=AccessType.read_only())
        else:
            path.mkdir(parents=True, exist_ok=True)
            opts.create_if_missing(True)
            self.db = Rdict(str(path), options=opts)
        self._sync = WriteOptions()
        self._sync.sync = True
        raw = self.db.get(_META)
        self.meta = LogMeta(**orjson.loads(raw)) if raw else LogMeta()
        raw = self.db.get(_RELAY)
        self.relay = RelayMeta(**orjson.loads(raw)) if raw else RelayMeta()

    # -- writing ----------------------------------------------------------------------
    def insert_events(
        self,
        entries: list[bytes],
        tenants: Mapping[str, TenantState],
        meta: LogMeta,
        *,
        event_ids: Mapping[str, int] | None = None,
        puts: Mapping[bytes, bytes] | None = None,
        deletes: list[bytes] | None = None,
    ) -> None:
        """Append `entries` at positions meta.pos - len(entries) + 1 .. meta.pos, with the
        tenant states and head (tracking included) they produced: one synced WriteBatch."""
        first = meta.pos - len(entries) + 1
        if first != self.meta.pos + 1:
            raise ValueError(f"log position gap: head {self.meta.pos}, batch starts at {first}")
        wb = WriteBatch(raw_mode=True)
        for i, entry in enumerate(entries):
            wb.put(_pos_key(first + i), entry)
        for tid, t in tenants.items():
            wb.put(b"t" + tid.encode(), dump_tenant(t))
        for eid, pos in (event_ids or {}).items():
            wb.put(b"e" + eid.encode(), pos.to_bytes(8, "big"))
        for k, v in (puts or {}).items():
            wb.put(k, v)
        for k in deletes or ():
            wb.delete(k)
        wb.put(_META, orjson.dumps(meta.__dict__))
        self.db.write(wb, self._sync)
        self.meta = meta

    def save_relay(self, relay: RelayMeta) -> None:
        self.db.put(_RELAY, orjson.dumps(relay.__dict__), self._sync)
        self.relay = relay

    def put_marker(self, key: bytes, value: bytes) -> None:
        self.db.put(key, value, self._sync)

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)  # type: ignore[no-any-return]

    # -- reading ----------------------------------------------------------------------
    def has_event(self, event_id: str) -> bool:
        return self.db.get(b"e" + event_id.encode()) is not None

    def select_events(self, after: int, limit: int = 10_000) -> list[tuple[int, bytes]]:
        """Entries at positions after..after+limit (inclusive range, in order)."""
        out = []
        for key, value in self.db.items(from_key=_pos_key(after + 1)):
            if not key.startswith(b"l") or len(key) != 9:
                break
            out.append((int.from_bytes(key[1:], "big"), value))
            if len(out) >= limit:
                break
        return out

    def iter_events(self) -> Iterator[tuple[int, bytes]]:
        pos = 0
        while True:
            chunk = self.select_events(pos, 50_000)
            if not chunk:
                return
            yield from chunk
            pos = chunk[-1][0]

    def max_notification_id(self) -> int:
        return self.meta.pos

    def load_tenants(self) -> dict[str, TenantState]:
        """The projection as stored (no re-folding): what a restart serves from."""
        out: dict[str, TenantState] = {}
        with gc_paused():  # hundreds of thousands of small immutable objects: no cycles
            for key, value in self.db.items(from_key=b"t"):
                if not key.startswith(b"t"):
                    break
                out[key[1:].decode()] = load_tenant(value)
        return out

    def markers(self, prefix: bytes) -> dict[bytes, bytes]:
        out = {}
        for key, value in self.db.items(from_key=prefix):
            if not key.startswith(prefix):
                break
            out[key[len(prefix):]] = value
        return out

    def close(self) -> None:
        try:
            self.db.flush_wal(True)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        self.db.close()


def size_on_disk(path: Path) -> int:
    if not os.path.isdir(path):
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
