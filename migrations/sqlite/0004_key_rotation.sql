-- RollKey links a key to its successor and back (ApiKey.rotated_from / rotated_to).
ALTER TABLE api_keys ADD COLUMN rotated_from TEXT;
ALTER TABLE api_keys ADD COLUMN rotated_to TEXT;
