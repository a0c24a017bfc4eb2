-- Embedded backend. Timestamps are INTEGER microseconds since the Unix epoch
-- (they order and compare exactly); scopes are one space-separated string.
CREATE TABLE organizations (
    id            TEXT PRIMARY KEY,
    plan          TEXT NOT NULL DEFAULT 'free'
                  CHECK (plan IN ('free', 'developer', 'pro', 'enterprise')),
    keys_created  INTEGER NOT NULL DEFAULT 0,
    last_call_at  INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id               TEXT PRIMARY KEY,
    organization_id  TEXT NOT NULL REFERENCES organizations (id),
    name             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    scopes           TEXT NOT NULL,
    created_by       TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    last_used_at     INTEGER,
    expires_at       INTEGER,
    environment      TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    secret_hash      TEXT NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE INDEX api_keys_org_created_idx ON api_keys (organization_id, created_at DESC, id DESC);

CREATE TABLE usage_minutes (
    key_id           TEXT NOT NULL,
    organization_id  TEXT NOT NULL,
    minute           INTEGER NOT NULL,
    calls            INTEGER NOT NULL,
    last_used_at     INTEGER NOT NULL,
    PRIMARY KEY (key_id, minute)
);

CREATE INDEX usage_minutes_org_minute_idx ON usage_minutes (organization_id, minute);
CREATE INDEX usage_minutes_minute_idx ON usage_minutes (minute);
