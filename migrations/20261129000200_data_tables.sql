-- The Postgres sink's tables: what a sync run wrote, one table per
-- OpenSpecimen entity, keyed by the OpenClinica natural keys within a CP.
--
-- Every key part is text and NOT NULL: an absent repeat key (a
-- non-repeating event or item group) is the empty string '', so keys
-- compare with plain `=`. Values are stored raw, as OpenClinica wrote them
-- (after the CP's mapping): no trimming, '' and NULL are different things.
--
-- Rows are never deleted by ocsync. A record that disappears from
-- OpenClinica is flagged status = 'removed' the next time its subject is
-- synced. A run that finds a row unchanged does not write it at all (no
-- "last seen" timestamp is bumped), so a second sync of an unchanged study
-- writes nothing.
--
-- Secondary indexes do not start with cp_id: on tables without statistics
-- yet (a first sync fills them faster than autovacuum analyses them) the
-- planner would take such an index for the primary key's cp_id prefix and
-- scan a whole CP per batch.

CREATE TABLE ocsync_data.participants (
    cp_id             text        NOT NULL,
    subject_key       text        NOT NULL,
    ppid              text        NOT NULL,
    study_oid         text        NOT NULL,
    site              text,
    uid               text,
    birth_date        text,
    gender            text,
    registration_date text,
    oc_status         text,
    status            text        NOT NULL CHECK (status IN ('active', 'removed')),
    fields            jsonb       NOT NULL DEFAULT '{}',
    first_seen_at     timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, subject_key)
);
CREATE INDEX participants_ppid ON ocsync_data.participants (ppid);

COMMENT ON TABLE ocsync_data.participants IS
    'One row per OpenClinica subject of a CP (an OpenSpecimen registration with its participant). Key: (cp_id, subject_key).';
COMMENT ON COLUMN ocsync_data.participants.cp_id IS 'The collection protocol (CP) the subject was synced for.';
COMMENT ON COLUMN ocsync_data.participants.subject_key IS 'OpenClinica SubjectKey (SS_...): stable even when the label is edited.';
COMMENT ON COLUMN ocsync_data.participants.ppid IS 'OpenSpecimen PPID: OpenClinica StudySubjectID (the label) unless the CP maps another field.';
COMMENT ON COLUMN ocsync_data.participants.study_oid IS 'ClinicalData StudyOID the subject came from: the study or one of its sites.';
COMMENT ON COLUMN ocsync_data.participants.site IS 'OpenSpecimen site through the CP''s site map; NULL when unmapped.';
COMMENT ON COLUMN ocsync_data.participants.uid IS 'OpenClinica UniqueIdentifier.';
COMMENT ON COLUMN ocsync_data.participants.birth_date IS 'DateOfBirth, or YearOfBirth when only the year is collected; raw text (partial dates are real).';
COMMENT ON COLUMN ocsync_data.participants.gender IS 'Male, Female, or NULL.';
COMMENT ON COLUMN ocsync_data.participants.registration_date IS 'OpenClinica EnrollmentDate, raw text.';
COMMENT ON COLUMN ocsync_data.participants.oc_status IS 'OpenClinica''s status word for the subject, raw.';
COMMENT ON COLUMN ocsync_data.participants.status IS 'active, or removed (removed/archived in OpenClinica).';
COMMENT ON COLUMN ocsync_data.participants.fields IS 'Further mapped participant fields: {"OpenSpecimen field": "value" or null}.';
COMMENT ON COLUMN ocsync_data.participants.first_seen_at IS 'When a sync run first wrote this row.';
COMMENT ON COLUMN ocsync_data.participants.updated_at IS 'When a sync run last changed this row''s content or status (first_seen_at for a row never changed).';

CREATE TABLE ocsync_data.visits (
    cp_id            text        NOT NULL,
    subject_key      text        NOT NULL,
    event_oid        text        NOT NULL,
    event_repeat_key text        NOT NULL,
    event_label      text        NOT NULL,
    name             text        NOT NULL,
    visit_date       text,
    end_date         text,
    site             text,
    oc_status        text,
    status           text        NOT NULL CHECK (status IN ('active', 'removed')),
    first_seen_at    timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, subject_key, event_oid, event_repeat_key)
);

COMMENT ON TABLE ocsync_data.visits IS
    'One row per OpenClinica study event occurrence (an OpenSpecimen visit). Key: (cp_id, subject_key, event_oid, event_repeat_key).';
COMMENT ON COLUMN ocsync_data.visits.cp_id IS 'The collection protocol (CP) the subject was synced for.';
COMMENT ON COLUMN ocsync_data.visits.subject_key IS 'OpenClinica SubjectKey; joins ocsync_data.participants on (cp_id, subject_key).';
COMMENT ON COLUMN ocsync_data.visits.event_oid IS 'OpenClinica StudyEventOID.';
COMMENT ON COLUMN ocsync_data.visits.event_repeat_key IS 'StudyEventRepeatKey; '''' for a non-repeating event.';
COMMENT ON COLUMN ocsync_data.visits.event_label IS 'OpenSpecimen event label, through the CP''s event map.';
COMMENT ON COLUMN ocsync_data.visits.name IS 'Visit name, from the CP''s visit naming rule.';
COMMENT ON COLUMN ocsync_data.visits.visit_date IS 'OpenClinica StartDate, raw text.';
COMMENT ON COLUMN ocsync_data.visits.end_date IS 'OpenClinica EndDate, raw text.';
COMMENT ON COLUMN ocsync_data.visits.site IS 'OpenSpecimen site through the CP''s site map; NULL when unmapped.';
COMMENT ON COLUMN ocsync_data.visits.oc_status IS 'OpenClinica''s status word for the event, raw.';
COMMENT ON COLUMN ocsync_data.visits.status IS 'active, or removed (removed in OpenClinica, or no longer in OpenClinica when its subject was last synced).';
COMMENT ON COLUMN ocsync_data.visits.first_seen_at IS 'When a sync run first wrote this row.';
COMMENT ON COLUMN ocsync_data.visits.updated_at IS 'When a sync run last changed this row''s content or status.';

CREATE TABLE ocsync_data.specimens (
    cp_id                 text        NOT NULL,
    subject_key           text        NOT NULL,
    event_oid             text        NOT NULL,
    event_repeat_key      text        NOT NULL,
    crf_oid               text        NOT NULL,
    item_group_oid        text        NOT NULL,
    item_group_repeat_key text        NOT NULL,
    label                 text,
    specimen_type         text,
    quantity              text,
    collection_time       text,
    fields                jsonb       NOT NULL DEFAULT '{}',
    status                text        NOT NULL CHECK (status IN ('active', 'removed')),
    first_seen_at         timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key)
);
CREATE INDEX specimens_label ON ocsync_data.specimens (label);

COMMENT ON TABLE ocsync_data.specimens IS
    'One row per item group repeat that the CP maps as a specimen. Key: (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key).';
COMMENT ON COLUMN ocsync_data.specimens.cp_id IS 'The collection protocol (CP) the subject was synced for.';
COMMENT ON COLUMN ocsync_data.specimens.subject_key IS 'OpenClinica SubjectKey; joins ocsync_data.participants on (cp_id, subject_key).';
COMMENT ON COLUMN ocsync_data.specimens.event_oid IS 'StudyEventOID of the visit; joins ocsync_data.visits on (cp_id, subject_key, event_oid, event_repeat_key).';
COMMENT ON COLUMN ocsync_data.specimens.event_repeat_key IS 'StudyEventRepeatKey; '''' for a non-repeating event.';
COMMENT ON COLUMN ocsync_data.specimens.crf_oid IS 'The CRF (not the CRF version): 3.x ParentFormOID or the FormOID without its _V suffix; 4.x the FormOID.';
COMMENT ON COLUMN ocsync_data.specimens.item_group_oid IS 'OpenClinica ItemGroupOID.';
COMMENT ON COLUMN ocsync_data.specimens.item_group_repeat_key IS 'ItemGroupRepeatKey; '''' for a non-repeating item group.';
COMMENT ON COLUMN ocsync_data.specimens.label IS 'Specimen label, from the item the CP maps to it.';
COMMENT ON COLUMN ocsync_data.specimens.specimen_type IS 'Specimen type, after the CP''s value map.';
COMMENT ON COLUMN ocsync_data.specimens.quantity IS 'Quantity as written (after the CP''s value map), not parsed.';
COMMENT ON COLUMN ocsync_data.specimens.collection_time IS 'Collection time, raw text.';
COMMENT ON COLUMN ocsync_data.specimens.fields IS 'Further mapped specimen fields: {"OpenSpecimen field": "value" or null}.';
COMMENT ON COLUMN ocsync_data.specimens.status IS 'active, or removed (removed in OpenClinica, or no longer in OpenClinica when its subject was last synced).';
COMMENT ON COLUMN ocsync_data.specimens.first_seen_at IS 'When a sync run first wrote this row.';
COMMENT ON COLUMN ocsync_data.specimens.updated_at IS 'When a sync run last changed this row''s content or status.';

CREATE TABLE ocsync_data.form_records (
    cp_id                 text        NOT NULL,
    subject_key           text        NOT NULL,
    event_oid             text        NOT NULL,
    event_repeat_key      text        NOT NULL,
    crf_oid               text        NOT NULL,
    item_group_oid        text        NOT NULL,
    item_group_repeat_key text        NOT NULL,
    form_oid              text        NOT NULL,
    form_version          text,
    form_status           text,
    status                text        NOT NULL CHECK (status IN ('active', 'removed')),
    values                jsonb       NOT NULL DEFAULT '{}',
    item_names            jsonb       NOT NULL DEFAULT '{}',
    first_seen_at         timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key)
);

COMMENT ON TABLE ocsync_data.form_records IS
    'One row per item group repeat of a CRF (an OpenSpecimen form record), values raw and keyed by item OID. Key: (cp_id, subject_key, event_oid, event_repeat_key, crf_oid, item_group_oid, item_group_repeat_key).';
COMMENT ON COLUMN ocsync_data.form_records.cp_id IS 'The collection protocol (CP) the subject was synced for.';
COMMENT ON COLUMN ocsync_data.form_records.subject_key IS 'OpenClinica SubjectKey; joins ocsync_data.participants on (cp_id, subject_key).';
COMMENT ON COLUMN ocsync_data.form_records.event_oid IS 'StudyEventOID of the visit; joins ocsync_data.visits on (cp_id, subject_key, event_oid, event_repeat_key).';
COMMENT ON COLUMN ocsync_data.form_records.event_repeat_key IS 'StudyEventRepeatKey; '''' for a non-repeating event.';
COMMENT ON COLUMN ocsync_data.form_records.crf_oid IS 'The CRF (not the CRF version): 3.x ParentFormOID or the FormOID without its _V suffix; 4.x the FormOID.';
COMMENT ON COLUMN ocsync_data.form_records.item_group_oid IS 'OpenClinica ItemGroupOID.';
COMMENT ON COLUMN ocsync_data.form_records.item_group_repeat_key IS 'ItemGroupRepeatKey; '''' for a non-repeating item group.';
COMMENT ON COLUMN ocsync_data.form_records.form_oid IS 'FormData FormOID as OpenClinica wrote it (3.x: the CRF version OID).';
COMMENT ON COLUMN ocsync_data.form_records.form_version IS 'OpenClinica Version of the CRF.';
COMMENT ON COLUMN ocsync_data.form_records.form_status IS 'OpenClinica''s form status word, raw (invalid marks a removed CRF).';
COMMENT ON COLUMN ocsync_data.form_records.status IS 'active, or removed (removed/invalid in OpenClinica, or no longer in OpenClinica when its subject was last synced).';
COMMENT ON COLUMN ocsync_data.form_records.values IS 'Item values: {"item OID": "raw value" or null for IsNull}. Values are raw strings: untrimmed, partial dates, comma lists, '''' are kept.';
COMMENT ON COLUMN ocsync_data.form_records.item_names IS 'Item names: {"item OID": "ItemDef Name"}.';
COMMENT ON COLUMN ocsync_data.form_records.first_seen_at IS 'When a sync run first wrote this row.';
COMMENT ON COLUMN ocsync_data.form_records.updated_at IS 'When a sync run last changed this row''s content or status.';
