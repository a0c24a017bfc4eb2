CREATE TABLE audit_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at      INTEGER NOT NULL,
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

ALTER TABLE api_keys ADD COLUMN pepper_id TEXT NOT NULL DEFAULT '';
