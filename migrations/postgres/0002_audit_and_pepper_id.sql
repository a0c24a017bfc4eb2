-- Append-only record of every mutation, written in the mutation's own
-- transaction. The service never updates or deletes these rows.
CREATE TABLE audit_events (
    id               BIGSERIAL PRIMARY KEY,
    occurred_at      TIMESTAMPTZ NOT NULL,
    organization_id  TEXT NOT NULL,
    actor            TEXT NOT NULL,
    principal        TEXT NOT NULL,
    action           TEXT NOT NULL,
    key_id           TEXT,
    key_prefix       TEXT,
    status_before    TEXT,
    status_after     TEXT,
    request_id       TEXT NOT NULL,
    peer             TEXT,
    detail           TEXT
);

CREATE INDEX audit_events_org_id_idx ON audit_events (organization_id, id DESC);

-- Which pepper keyed each hash, so a new pepper can be introduced while
-- keys hashed with the old one keep verifying. '' = the first pepper.
ALTER TABLE api_keys ADD COLUMN pepper_id TEXT NOT NULL DEFAULT '';
