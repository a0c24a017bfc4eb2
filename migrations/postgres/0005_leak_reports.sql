-- ReportLeakedKeys is idempotent per key and source URL: the first report of
-- a pair acts and is audited, repeats change nothing.
CREATE TABLE leak_reports (
    key_id       TEXT NOT NULL,
    source_url   TEXT NOT NULL,
    PRIMARY KEY (key_id, source_url)
);
