"""Ed25519 authentication of events: per-event signatures and signed hash-chain checkpoints.

An event's digest is sha256(prev_digest || body), where `prev` is the digest of the previous
event of the same chain (absent for a standalone event). A signature is over the digest, so a
signed event authenticates itself and every earlier event of its chain: a producer that signs
one checkpoint per batch costs a consumer one Ed25519 verification per batch, not per event.

Keys: a service keeps its private key in its data dir and publishes its public key into the
trust dir as `<key_id>.pub` (PEM). A key id is `<owner>.<16 hex of sha256(public key)>`, where
the owner is the producer name (`registry`, `operator` or a region); a key only authenticates
events of its owner.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from events.envelope import Auth, Envelope

_DOMAIN = b"openkcm-event-v1:"
_sha256 = hashlib.sha256


class VerificationError(ValueError):
    """An event failed authentication; the message is the reason for the DLQ."""


def key_id_for(owner: str, public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"{owner}.{hashlib.sha256(raw).hexdigest()[:16]}"


@functools.lru_cache(maxsize=4096)
def owner_of(key_id: str) -> str:
    return key_id.rsplit(".", 1)[0]


@dataclass(frozen=True)
class SigningKey:
    """A producer's Ed25519 private key. Only `sign` is exposed; the key never leaves."""

    owner: str
    _private: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, owner: str) -> SigningKey:
        return cls(owner, Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private.public_key()

    @property
    def key_id(self) -> str:
        return key_id_for(self.owner, self.public_key)

    def sign(self, digest: bytes) -> str:
        return base64.b64encode(self._private.sign(_DOMAIN + digest)).decode()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def publish_public_key(key: SigningKey, trust_dir: Path) -> Path:
    trust_dir.mkdir(parents=True, exist_ok=True)
    path = trust_dir / f"{key.key_id}.pub"
    if not path.exists():
        tmp = path.with_suffix(".pub.tmp")
        tmp.write_bytes(key.public_pem())
        os.replace(tmp, path)
    return path


def load_or_create_signing_key(
    data_dir: Path, owner: str, trust_dir: Path | None = None
) -> SigningKey:
    """Load `<data_dir>/signing-<owner>.pem`, creating it (mode 0600) on first start, and
    publish its public key into `trust_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"signing-{owner}.pem"
    if path.exists():
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        key = SigningKey(owner, private)
    else:
        key = SigningKey.generate(owner)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key.private_pem())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    if trust_dir is not None:
        publish_public_key(key, trust_dir)
    return key


class TrustStore:
    """Public keys by key id, loaded from a trust dir (re-read when an unknown id shows up)."""

    def __init__(self, directory: Path | None = None, rescan_interval: float = 1.0) -> None:
        self.directory = directory
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._rescan_interval = rescan_interval
        self._last_scan = 0.0
        self._dir_mtime: int | None = None
        if directory is not None:
            self.rescan()

    def add(self, key_id: str, public_key: Ed25519PublicKey) -> None:
        if key_id != key_id_for(owner_of(key_id), public_key):
            raise ValueError(f"key id {key_id} does not match its public key")
        self._keys[key_id] = public_key

    def add_signer(self, key: SigningKey) -> None:
        self.add(key.key_id, key.public_key)

    def _mtime(self) -> int | None:
        try:
            return self.directory.stat().st_mtime_ns if self.directory is not None else None
        except OSError:
            return None

    def rescan(self) -> None:
        self._last_scan = time.monotonic()
        self._dir_mtime = self._mtime()
        if self.directory is None or not self.directory.is_dir():
            return
        for path in self.directory.glob("*.pub"):
            key_id = path.name[: -len(".pub")]
            if key_id in self._keys:
                continue
            try:
                pub = serialization.load_pem_public_key(path.read_bytes())
            except ValueError:
                continue
            if isinstance(pub, Ed25519PublicKey) and key_id == key_id_for(owner_of(key_id), pub):
                self._keys[key_id] = pub

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        """The key, re-reading the trust dir for an unknown id when a key was published since
        the last read (the directory changed) or the rescan interval passed: a key published
        a moment before its first event is never missed."""
        key = self._keys.get(key_id)
        if key is None and self.directory is not None and (
            self._mtime() != self._dir_mtime
            or time.monotonic() - self._last_scan >= self._rescan_interval
        ):
            self.rescan()
            key = self._keys.get(key_id)
        return key

    def key_ids(self) -> list[str]:
        return sorted(self._keys)


class Authenticated(Protocol):
    """What authentication reads of an event: an `Envelope` or a `fastpath.RawEvent`."""

    @property
    def producer(self) -> str: ...

    @property
    def auth(self) -> Any: ...

    def body(self) -> bytes: ...


def event_digest(env: Authenticated) -> bytes:
    prev = env.auth.prev if env.auth is not None else None
    try:
        prev_bytes = bytes.fromhex(prev) if prev else b""
    except ValueError:
        raise VerificationError("auth.prev is not a hex digest") from None
    return hashlib.sha256(prev_bytes + env.body()).digest()


def sign_event(
    env: Envelope, key: SigningKey, *, prev: str | None = None, checkpoint: bool = True
) -> Envelope:
    """Attach authentication: chained after `prev` (hex digest) if given, signed if
    `checkpoint`. Returns the new envelope; the event's digest is `event_digest(result)`."""
    if env.producer != key.owner:
        raise ValueError(f"a key of {key.owner!r} cannot sign events of {env.producer!r}")
    unsigned = env.model_copy(update={"auth": Auth(key_id=key.key_id, prev=prev)})
    unsigned._signed_body = env.body()
    if not checkpoint:
        return unsigned
    signed = env.model_copy(
        update={"auth": Auth(key_id=key.key_id, prev=prev, sig=key.sign(event_digest(unsigned)))}
    )
    signed._signed_body = env.body()
    return signed


def _check_signature(env: Authenticated, trust: TrustStore) -> bytes:
    """Verify a signed event's own signature; return its digest."""
    auth = env.auth
    if auth is None:
        raise VerificationError("unauthenticated event (no auth)")
    if owner_of(auth.key_id) != env.producer:
        raise VerificationError(f"key {auth.key_id} does not belong to producer {env.producer}")
    public = trust.get(auth.key_id)
    if public is None:
        raise VerificationError(f"unknown signer {auth.key_id}")
    digest = event_digest(env)
    if auth.sig is not None:
        try:
            public.verify(base64.b64decode(auth.sig), _DOMAIN + digest)
        except (InvalidSignature, ValueError):
            raise VerificationError(f"bad signature by {auth.key_id}") from None
    return digest


def verify_digest(trust: TrustStore, key_id: str, digest: bytes, sig: str) -> None:
    """Verify a signature made by `SigningKey.sign` over a digest (e.g. a snapshot's).
    Raises VerificationError naming the reason."""
    public = trust.get(key_id)
    if public is None:
        raise VerificationError(f"unknown signer {key_id}")
    try:
        public.verify(base64.b64decode(sig), _DOMAIN + digest)
    except (InvalidSignature, ValueError):
        raise VerificationError(f"bad signature by {key_id}") from None


def verify_event(env: Authenticated, trust: TrustStore) -> None:
    """Verify one event that carries its own signature. Raises VerificationError."""
    if env.auth is not None and env.auth.sig is None:
        raise VerificationError("event carries no signature (needs its chain's checkpoint)")
    _check_signature(env, trust)


@dataclass
class ChainSigner:
    """Producer side of hash chains: one head per chain (e.g. per topic partition).

    The caller persists `heads` with its own state if chains must survive restarts.
    """

    key: SigningKey
    heads: dict[Hashable, str] = field(default_factory=dict)

    def sign(self, env: Envelope, chain: Hashable, *, checkpoint: bool) -> Envelope:
        out = sign_event(env, self.key, prev=self.heads.get(chain), checkpoint=checkpoint)
        self.heads[chain] = event_digest(out).hex()
        return out


E = TypeVar("E", bound=Authenticated)


@dataclass
class ChainVerifier:
    """Consumer side: feed events of each chain in order; get back the verified ones.

    Unsigned events wait until a signed checkpoint whose chain links back to them arrives;
    pending events that the checkpoint does not cover are rejected (forged or broken chain),
    except exact copies of covered events (a producer's retry), which are dropped.
    """

    trust: TrustStore
    max_pending: int = 100_000
    _pending: dict[Hashable, list[tuple[bytes, bytes | None, Any]]] = field(default_factory=dict)
    _vouched: dict[str, set[str]] = field(default_factory=dict)
    """key id -> producers it was checked to belong to, its public key being known (a trust
    store only ever gains keys, so an unsigned event of such a pair needs only its digest)."""

    def feed(self, chain: Hashable, env: E) -> tuple[list[E], list[tuple[E, str]]]:
        """Returns (events now verified, in chain order; rejected events with reasons)."""
        auth = env.auth
        if auth is not None and auth.sig is None:
            producers = self._vouched.get(auth.key_id)
            if producers is not None and env.producer in producers:
                # the checks of _check_signature for a pair already checked: only the digest
                prev = auth.prev
                try:
                    prev_bytes = bytes.fromhex(prev) if prev else b""
                except ValueError:
                    return [], [(env, "auth.prev is not a hex digest")]
                pending = self._pending.get(chain)
                if pending is None:
                    pending = self._pending[chain] = []
                if len(pending) >= self.max_pending:
                    return [], [(env, "too many events waiting for a checkpoint")]
                pending.append(
                    (_sha256(prev_bytes + env.body()).digest(), prev_bytes if prev else None, env)
                )
                return [], []
        try:
            digest = _check_signature(env, self.trust)
        except VerificationError as exc:
            return [], [(env, str(exc))]
        assert auth is not None
        self._vouched.setdefault(auth.key_id, set()).add(env.producer)
        pending = self._pending.setdefault(chain, [])
        if auth.sig is None:
            if len(pending) >= self.max_pending:
                return [], [(env, "too many events waiting for a checkpoint")]
            pending.append((digest, bytes.fromhex(auth.prev) if auth.prev else None, env))
            return [], []
        # A checkpoint: walk back through the pending events it covers. Usually they are
        # exactly the chain that ends at the checkpoint, in order: checked in one pass.
        link = bytes.fromhex(auth.prev) if auth.prev is not None else None
        i = len(pending)
        while i and pending[i - 1][0] == link:
            i -= 1
            link = pending[i][1]
        if i == 0:
            covered: list[E] = [e for _, _, e in pending]
            pending.clear()
            covered.append(env)
            return covered, []
        by_digest = {d: e for d, _, e in pending}
        prevs = {d: p for d, p, _ in pending}
        covered = []
        covered_digests: set[bytes] = set()
        link = bytes.fromhex(auth.prev) if auth.prev is not None else None
        while link is not None:
            prior = by_digest.pop(link, None)
            if prior is None:
                break
            covered.append(prior)
            covered_digests.add(link)
            link = prevs[link]
        covered.reverse()
        rejected = [
            (e, "not covered by any signed checkpoint (broken or forged chain)")
            for d, _, e in pending
            if d not in covered_digests
        ]
        pending.clear()
        return [*covered, env], rejected

    def pending(self, chain: Hashable) -> int:
        return len(self._pending.get(chain, ()))
