-- The rollups' t-digest latency column, replaced by 0007's bucket counts (kept until now so
-- that 0007 could run again after a failure).
ALTER TABLE requests_1m DROP COLUMN IF EXISTS latency_ms;
ALTER TABLE requests_1h DROP COLUMN IF EXISTS latency_ms;
ALTER TABLE requests_1d DROP COLUMN IF EXISTS latency_ms;
ALTER TABLE requests_org_1m DROP COLUMN IF EXISTS latency_ms;
ALTER TABLE requests_org_1h DROP COLUMN IF EXISTS latency_ms;
ALTER TABLE requests_org_1d DROP COLUMN IF EXISTS latency_ms;
