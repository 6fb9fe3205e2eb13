-- The API key registry's audit trail: one row per change of a key (create, update, revoke,
-- rotate), as the key was after it, who made it and when. Written by the sink from the
-- keys topic. Never the key, nor its hash: the display prefix tells keys apart.
-- Exactly once by (key, version): a record stored twice (a sink restarted between its
-- insert and its commit) is the same row, merged away by ReplacingMergeTree; read it with
-- FINAL (api_key_audit does). Of two different records of one version, the later one in
-- the topic (kafka_offset) is kept, as compaction keeps it.
CREATE TABLE IF NOT EXISTS api_key_changes
(
    org_id          LowCardinality(String),
    key_id          String,
    version         UInt64,
    change          LowCardinality(String),
    actor           String,
    changed_at      DateTime64(3, 'UTC'),
    name            String,
    env             LowCardinality(String),
    display_prefix  String,
    secret_id       LowCardinality(String),
    scopes          Array(String),
    limits          Map(String, UInt64),
    expires_at      Nullable(DateTime64(3, 'UTC')),
    state           LowCardinality(String),
    created_at      DateTime64(3, 'UTC'),
    rotated_from    String,
    rotated_to      String,
    kafka_partition UInt32,
    kafka_offset    UInt64,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(kafka_offset)
ORDER BY (org_id, key_id, version)
SETTINGS non_replicated_deduplication_window = 1000;

-- Who changed what, when: each change with the names of the attributes it changed (every
-- one for a key's first record), read with FINAL so each change is one row.
CREATE VIEW IF NOT EXISTS api_key_audit AS
SELECT changed_at, org_id, key_id, version, change, actor,
       if(prev_version = 0,
          ['name', 'scopes', 'limits', 'expires', 'state', 'rotated_from', 'rotated_to'],
          arrayFilter(x -> x != '', [
              if(name != prev_name, 'name', ''),
              if(scopes != prev_scopes, 'scopes', ''),
              if(limits != prev_limits, 'limits', ''),
              if(expires_ms != prev_expires_ms, 'expires', ''),
              if(state != prev_state, 'state', ''),
              if(rotated_from != prev_rotated_from, 'rotated_from', ''),
              if(rotated_to != prev_rotated_to, 'rotated_to', '')])) AS changed,
       name, env, display_prefix, secret_id, scopes, limits, expires_at, state, created_at, rotated_from, rotated_to
FROM
(
    SELECT *,
           ifNull(toUnixTimestamp64Milli(expires_at), -1) AS expires_ms,
           lagInFrame(version) OVER w AS prev_version,
           lagInFrame(name) OVER w AS prev_name,
           lagInFrame(scopes) OVER w AS prev_scopes,
           lagInFrame(limits) OVER w AS prev_limits,
           lagInFrame(ifNull(toUnixTimestamp64Milli(expires_at), -1)) OVER w AS prev_expires_ms,
           lagInFrame(state) OVER w AS prev_state,
           lagInFrame(rotated_from) OVER w AS prev_rotated_from,
           lagInFrame(rotated_to) OVER w AS prev_rotated_to
    FROM api_key_changes FINAL
    WINDOW w AS (PARTITION BY org_id, key_id ORDER BY version ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
);
