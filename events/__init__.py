"""The event contract of OpenKCM Global Resilience.

Pydantic v2 models for the envelope and every event, canonical bytes, Ed25519 signing and
hash-chain checkpoints, schema versions with upcasters, topic names and the small Kafka layer.
This package imports nothing else of the project.
"""

from events.canonical import canonical_bytes
from events.envelope import (
    DecodeError,
    Envelope,
    decode,
    encode,
    new_envelope,
    partition_key,
)
from events.models import PAYLOADS, SCHEMA_VERSIONS, Payload
from events.signing import (
    ChainSigner,
    ChainVerifier,
    SigningKey,
    TrustStore,
    VerificationError,
    load_or_create_signing_key,
    sign_event,
    verify_event,
)

__all__ = [
    "PAYLOADS",
    "SCHEMA_VERSIONS",
    "ChainSigner",
    "ChainVerifier",
    "DecodeError",
    "Envelope",
    "Payload",
    "SigningKey",
    "TrustStore",
    "VerificationError",
    "canonical_bytes",
    "decode",
    "encode",
    "load_or_create_signing_key",
    "new_envelope",
    "partition_key",
    "sign_event",
    "verify_event",
]
