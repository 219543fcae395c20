-- A fingerprint of what a subject's records are made from (its ODM as
-- read, the CP's configuration, the study's metadata and the ocsync
-- version), so an incremental run skips a subject whose input is unchanged
-- without mapping it. See src/mapping/hash.rs.
ALTER TABLE ocsync.subject_state ADD COLUMN IF NOT EXISTS input_hash text;

COMMENT ON COLUMN ocsync.subject_state.input_hash IS
    'xxh3-128 (hex) of the subject''s ODM as read, keyed by the CP configuration, the metadata and the ocsync version; NULL until first computed';
