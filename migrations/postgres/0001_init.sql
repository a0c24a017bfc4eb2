-- Organizations exist in this service only for plan limits and stats.
-- keys_created counts every key ever created, deleted ones included.
CREATE TABLE organizations (
    id            TEXT PRIMARY KEY,
    plan          TEXT NOT NULL DEFAULT 'free'
                  CHECK (plan IN ('free', 'developer', 'pro', 'enterprise')),
    keys_created  BIGINT NOT NULL DEFAULT 0,
    last_call_at  TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- secret_hash is an argon2id PHC string keyed with the server pepper;
-- the key itself is never stored.
CREATE TABLE api_keys (
    id               TEXT PRIMARY KEY,
    organization_id  TEXT NOT NULL REFERENCES organizations (id),
    name             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('active', 'disabled', 'revoked')),
    scopes           TEXT[] NOT NULL,
    created_by       TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    last_used_at     TIMESTAMPTZ,
    expires_at       TIMESTAMPTZ,
    environment      TEXT NOT NULL CHECK (environment IN ('live', 'test')),
    secret_hash      TEXT NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- ListKeys: newest first within an organization, keyset-paginated.
CREATE INDEX api_keys_org_created_idx ON api_keys (organization_id, created_at DESC, id DESC);

-- Verification counts per key and minute. No foreign key to api_keys:
-- a deleted key's calls still count in its organization's 24 h figure.
CREATE TABLE usage_minutes (
    key_id           TEXT NOT NULL,
    organization_id  TEXT NOT NULL,
    minute           TIMESTAMPTZ NOT NULL,
    calls            BIGINT NOT NULL,
    last_used_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (key_id, minute)
);

CREATE INDEX usage_minutes_org_minute_idx ON usage_minutes (organization_id, minute);
CREATE INDEX usage_minutes_minute_idx ON usage_minutes (minute);
