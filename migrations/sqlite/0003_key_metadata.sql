-- Caller-supplied labels of a key (ApiKey.metadata): a JSON object of strings,
-- validated by the service (at most 16 entries, 4 KiB). Text, not jsonb: it
-- is never queried, only returned, and both backends then store it alike.
ALTER TABLE api_keys ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
