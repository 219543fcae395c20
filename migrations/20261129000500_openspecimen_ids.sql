-- The OpenSpecimen sink's bookkeeping: for every record it has written to
-- OpenSpecimen, the OpenSpecimen id it got and a hash of the JSON last
-- sent. A record whose hash has not changed is not sent again (a second
-- sync of an unchanged study makes no request); a changed one is updated
-- in place by its id. Rows are written in the sync run's transaction, so
-- they commit together with the run's checkpoint.
CREATE TABLE ocsync.os_ids (
    cp_id        text        NOT NULL,
    -- participant | visit | specimen | form_record
    entity       text        NOT NULL CHECK (entity IN ('participant', 'visit', 'specimen', 'form_record')),
    -- The record's natural key parts as a JSON array of strings, e.g.
    -- ["SS_1","SE_VISIT","2"]: unambiguous whatever the parts contain.
    natural_key  text        NOT NULL,
    -- The subject the record belongs to, so one batch's rows are read in
    -- one indexed query.
    subject_key  text        NOT NULL,
    -- NULL for a record removed in OpenClinica before it ever reached
    -- OpenSpecimen (nothing to disable, nothing created).
    os_id        bigint,
    content_hash text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, entity, natural_key)
);
CREATE INDEX os_ids_subject ON ocsync.os_ids (cp_id, subject_key);

COMMENT ON TABLE ocsync.os_ids IS
    'OpenSpecimen sink: natural key of each written record -> OpenSpecimen id and hash of the JSON last sent. Key: (cp_id, entity, natural_key).';
COMMENT ON COLUMN ocsync.os_ids.natural_key IS 'The record''s natural key parts (see src/mapping/records.rs) as a JSON array of strings.';
COMMENT ON COLUMN ocsync.os_ids.os_id IS 'OpenSpecimen id (registration, visit, specimen or form record id); NULL when nothing was created.';
COMMENT ON COLUMN ocsync.os_ids.content_hash IS 'SHA-256 (hex) of the JSON body last sent (without the id): unchanged hash means no request.';
