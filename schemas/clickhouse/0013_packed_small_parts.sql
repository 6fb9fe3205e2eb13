-- Small parts packed into one file. Every insert of the sink writes a part into the raw table and
-- into each of the 13 rollups (and a projection in 6 of them): ~260 files and directories an
-- insert, whatever its size. On the sink's benchmark ~12% of the sink process's CPU (perf) went
-- to creating them: the file system's inode allocation (ext4 scanning for a free inode where
-- merges had just deleted parts).
-- A part under min_bytes_for_full_part_storage (uncompressed) is written as one file,
-- data.packed (its projection's part likewise): ~40 files an insert. Parts are read, merged,
-- mutated, attached (the sink's repair: ATTACH PARTITION FROM a staging table created AS the
-- table, so packed too) and TTL'd as before; a merge makes a part of 16 MiB or more (a raw part
-- of ~160k rows; the rollups' parts are far smaller) full again.
-- ClickHouse's documentation lists this setting as ClickHouse Cloud's; the embedded engine
-- (chDB 26.9, system.merge_tree_settings: tier Production) implements it.
-- tests/test_clickhouse_storage.py checks the parts an insert writes.

ALTER TABLE requests MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_1m MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_1h MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_1d MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_org_1m MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_org_1h MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_org_1d MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_endpoint_1m MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_endpoint_1h MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_endpoint_1d MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_status_1h MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_status_1d MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_key_1h MODIFY SETTING min_bytes_for_full_part_storage = 16777216;

ALTER TABLE requests_key_1d MODIFY SETTING min_bytes_for_full_part_storage = 16777216;
