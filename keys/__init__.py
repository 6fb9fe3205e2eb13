"""API key management: the registry's operations (create, update, revoke, rotate; list and
show), each change one KeyRecord published to the compacted keys topic, the registry's
source of truth, which the processor's materializer (processors/key_registry.py) writes to
Redis for gateways and the ClickHouse sink keeps as the audit trail.

changes.py: what each change makes of a key, every input checked (pure logic);
registry.py: reading the materialized state and publishing changes.
"""
