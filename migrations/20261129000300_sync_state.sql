-- What sync runs remember between runs, and what they could not do.

-- Per CP and subject: the fingerprint of what was last written, so an
-- incremental run recognises an unchanged subject and never rewrites it.
CREATE TABLE IF NOT EXISTS ocsync.subject_state (
    cp_id         text        NOT NULL,
    subject_key   text        NOT NULL,
    -- sha-256 (hex) of the subject's mapped records.
    content_hash  text        NOT NULL,
    -- The subject's greatest OpenClinica audit-log ID number, when the
    -- source sent audit logs.
    audit_max_id  bigint,
    -- OpenClinica 4.x participant lastModified, raw.
    last_modified text,
    -- Records per entity at the last write: {"participants":1,"visits":3,…}
    record_counts jsonb       NOT NULL,
    run_id        text        NOT NULL,
    synced_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, subject_key)
);
COMMENT ON TABLE ocsync.subject_state IS
    'Per CP and subject: fingerprint of the records last written, for incremental sync';

-- Per CP: the high-water marks of the last successful run.
CREATE TABLE IF NOT EXISTS ocsync.cp_watermarks (
    cp_id         text PRIMARY KEY,
    audit_max_id  bigint,
    last_modified text,
    run_id        text        NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ocsync.cp_watermarks IS
    'Per CP: high-water marks (audit-log ID, 4.x lastModified) of the last successful run';

-- One row per record a run could not sync: the error report.
CREATE TABLE IF NOT EXISTS ocsync.run_errors (
    run_id         text        NOT NULL,
    seq            bigint      GENERATED ALWAYS AS IDENTITY,
    cp_id          text        NOT NULL,
    subject_key    text,
    ppid           text,
    event_oid      text,
    repeat         text,
    form_oid       text,
    item_group_oid text,
    item_oid       text,
    stage          text        NOT NULL CHECK (stage IN ('fetch', 'parse', 'map', 'write')),
    message        text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
COMMENT ON TABLE ocsync.run_errors IS
    'Error report rows: one per record a run could not sync, with a message a data manager can act on';
