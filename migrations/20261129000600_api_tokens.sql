-- API tokens and the abort audit.
--
-- A token is shown once, at creation; only its SHA-256 (hex) is stored, so
-- a copy of the database lets nobody call the API. Lookups go by hash (the
-- unique index), which is why no constant-time comparison is needed.
CREATE TABLE IF NOT EXISTS ocsync.api_tokens (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL UNIQUE
                 CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    role         text        NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    token_hash   text        NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);
COMMENT ON TABLE ocsync.api_tokens IS
    'Bearer tokens of the HTTP API: name, role, SHA-256 of the token (never the token)';

-- Abort with an audit trail: who asked is kept in the run's metadata
-- (`aborted_by`), beside the `abort` marker the worker watches. The
-- one-argument form stays for SQL clients and the CLI.
CREATE OR REPLACE FUNCTION ocsync.abort_run(run_id text, aborted_by text) RETURNS text
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_status text;
BEGIN
    v_status := ocsync.abort_run(abort_run.run_id);
    IF v_status IN ('Aborted', 'Aborting') THEN
        UPDATE apalis.jobs j
           SET metadata = j.metadata
                 || hstore('aborted_by', coalesce(j.metadata -> 'aborted_by',
                                                  coalesce(abort_run.aborted_by, session_user)))
         WHERE j.id = abort_run.run_id;
    END IF;
    RETURN v_status;
END
$$;
COMMENT ON FUNCTION ocsync.abort_run(text, text) IS
    'Aborts a sync run and records who asked (metadata aborted_by)';

-- The Import Logs gain who aborted a run (appended: CREATE OR REPLACE VIEW
-- may only add columns at the end).
CREATE OR REPLACE VIEW ocsync.import_logs AS
SELECT
    j.id AS run_id,
    j.metadata -> 'cp' AS cp,
    ocsync.run_status(j.status, j.attempts, j.max_attempts, j.metadata) AS status,
    (j.status = 'Failed' AND j.attempts < j.max_attempts) AS retrying,
    j.metadata -> 'mode' AS mode,
    j.metadata -> 'trigger' AS trigger,
    j.metadata -> 'requested_by' AS requested_by,
    (j.metadata -> 'enqueued_at')::timestamptz AS enqueued_at,
    (j.metadata -> 'started_at')::timestamptz AS started_at,
    CASE WHEN j.status IN ('Done', 'Killed')
           OR (j.status = 'Failed' AND j.attempts >= j.max_attempts)
         THEN j.done_at END AS finished_at,
    j.attempts,
    j.max_attempts,
    (p.p ->> 'subjects_done')::bigint AS subjects_done,
    (p.p ->> 'subjects_total')::bigint AS subjects_total,
    (p.p #>> '{counts,participants,created}')::bigint AS participants_created,
    (p.p #>> '{counts,participants,updated}')::bigint AS participants_updated,
    (p.p #>> '{counts,participants,unchanged}')::bigint AS participants_unchanged,
    (p.p #>> '{counts,participants,failed}')::bigint AS participants_failed,
    (p.p #>> '{counts,visits,created}')::bigint AS visits_created,
    (p.p #>> '{counts,visits,updated}')::bigint AS visits_updated,
    (p.p #>> '{counts,visits,unchanged}')::bigint AS visits_unchanged,
    (p.p #>> '{counts,visits,failed}')::bigint AS visits_failed,
    (p.p #>> '{counts,specimens,created}')::bigint AS specimens_created,
    (p.p #>> '{counts,specimens,updated}')::bigint AS specimens_updated,
    (p.p #>> '{counts,specimens,unchanged}')::bigint AS specimens_unchanged,
    (p.p #>> '{counts,specimens,failed}')::bigint AS specimens_failed,
    (p.p #>> '{counts,form_records,created}')::bigint AS form_records_created,
    (p.p #>> '{counts,form_records,updated}')::bigint AS form_records_updated,
    (p.p #>> '{counts,form_records,unchanged}')::bigint AS form_records_unchanged,
    (p.p #>> '{counts,form_records,failed}')::bigint AS form_records_failed,
    (SELECT count(*) FROM ocsync.run_errors e WHERE e.run_id = j.id) AS error_count,
    j.metadata -> 'error' AS last_error,
    j.metadata -> 'aborted_by' AS aborted_by
FROM apalis.jobs j
CROSS JOIN LATERAL (SELECT (j.metadata -> 'progress')::jsonb AS p) p
WHERE j.job_type = 'ocsync.sync';
