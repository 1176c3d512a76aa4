"""The Regional Core: lifecycle consumer, RocksDB event log and state, key hierarchy, rotation
scheduler, key-log relay and the Gateway (L4) API. See docs/core.md."""
