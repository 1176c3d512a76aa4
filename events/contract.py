"""The published contract: JSON Schema of every event and an AsyncAPI 3.0 document of the
topics, generated from the pydantic models so auditors' and onboarding tools read the truth."""

from __future__ import annotations

from typing import Any

from events import topics
from events.dlq import DeadLetter
from events.envelope import Envelope
from events.models import KEY_TIMELINE_TYPES, LIFECYCLE_TYPES, PAYLOADS, SCHEMA_VERSIONS

_TOPIC_EVENTS: dict[str, tuple[str, list[str]]] = {
    topics.LIFECYCLE: (
        "Registry and DR tooling: tenant lifecycle. Key = tenant id (region for RegionFailover).",
        sorted(LIFECYCLE_TYPES),
    ),
    topics.TENANTS: (
        "Compacted: current definition of every live tenant; tombstone on delete.",
        ["TenantDefinition"],
    ),
    topics.CORE_KEYS: (
        "Each Core's key timeline, kept forever; no key material of any kind.",
        sorted(KEY_TIMELINE_TYPES),
    ),
    topics.CORE_MATERIAL: (
        "Compacted, key = tenant/layer/key-version-id: wrapped L2 (by L1) and L3 (by L2) blobs.",
        ["KeyMaterial"],
    ),
}


def event_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema (draft 2020-12) of each event: the envelope with its typed payload."""
    envelope = Envelope.model_json_schema(mode="serialization")
    out: dict[str, dict[str, Any]] = {}
    for name, model in sorted(PAYLOADS.items()):
        schema = dict(envelope)
        props = dict(schema["properties"])
        payload_schema = model.model_json_schema(mode="serialization")
        defs = {**schema.get("$defs", {}), **payload_schema.pop("$defs", {})}
        props["type"] = {"const": name}
        props["schema_version"] = {"const": SCHEMA_VERSIONS[name]}
        props["payload"] = payload_schema
        schema.update(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "$id": f"urn:openkcm:event:{name}:v{SCHEMA_VERSIONS[name]}",
                "title": name,
                "properties": props,
                "$defs": defs,
            }
        )
        out[name] = schema
    out["DeadLetter"] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:openkcm:dlq:DeadLetter:v1",
        **DeadLetter.model_json_schema(mode="serialization"),
    }
    return out


def asyncapi() -> dict[str, Any]:
    """AsyncAPI 3.0 document of the platform's topics and messages."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    schemas = event_schemas()
    for name in schemas:
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": {"$ref": f"#/components/schemas/{name}"},
        }
    for topic, (description, types) in {
        **_TOPIC_EVENTS,
        topics.DLQ: ("What could not be accepted, with the reason.", ["DeadLetter"]),
    }.items():
        cid = topic.replace(".", "_")
        channels[cid] = {
            "address": topic,
            "description": description,
            "messages": {t: {"$ref": f"#/components/messages/{t}"} for t in types},
        }
        operations[f"consume_{cid}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cid}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "OpenKCM Global Resilience events",
            "version": "1",
            "description": (
                "Every event travels in one signed envelope (Ed25519; per event or hash-chain "
                "checkpoint). Partition key = tenant id unless stated."
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
