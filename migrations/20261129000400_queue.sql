-- The job queue's rules on top of apalis's table: one active run per CP,
-- enqueue and abort as SQL functions any client may call, the status words
-- users know, the Import Logs view, schedule ticks and retention.
--
-- A sync run is one row of apalis.jobs with job_type 'ocsync.sync'. Its
-- payload (job, JSON as UTF-8 bytes) holds ids only: cp, mode, subjects,
-- trigger, requested_by. Its metadata (hstore) holds what users see and
-- what the worker remembers between attempts:
--   cp, mode, trigger, requested_by, enqueued_at   set at enqueue
--   started_at                                      first time a worker took it
--   progress                                        JSON of sync::Progress, written
--                                                   with every batch checkpoint
--   result                                          success | failed (Done rows)
--   error                                           why the last attempt failed
--   abort                                           when an abort was asked for
--   worker                                          who ran the last attempt

-- The status words of the Import Logs, from apalis's row.
CREATE OR REPLACE FUNCTION ocsync.run_status(status text, attempts integer,
                                             max_attempts integer, metadata hstore)
    RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN status = 'Killed' AND metadata ? 'abort' THEN 'Aborted'
        WHEN status IN ('Pending', 'Queued') THEN 'Queued'
        WHEN status = 'Running' THEN 'In Progress'
        WHEN status = 'Done' THEN
            CASE WHEN metadata -> 'result' = 'failed' THEN 'Failed' ELSE 'Success' END
        -- Waiting for its backoff to pass: shown as Queued (retrying).
        WHEN status = 'Failed' AND attempts < max_attempts THEN 'Queued'
        ELSE 'Failed'
    END
$$;
COMMENT ON FUNCTION ocsync.run_status(text, integer, integer, hstore) IS
    'Queued | In Progress | Success | Failed | Aborted, from an apalis.jobs row';

-- One active run per CP, enforced by the database. The predicate is every
-- non-terminal state: Pending/Queued/Running, and Failed while attempts
-- remain (a retry waiting for its backoff). apalis once rewrote the
-- metadata column (drop + rename), which silently drops an index on it:
-- this function re-creates it when missing and is called after every
-- migrate and at every worker start; it returns whether the index exists.
CREATE OR REPLACE FUNCTION ocsync.ensure_queue_guards() RETURNS boolean
    LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('apalis.ocsync_one_active_run_per_cp') IS NULL THEN
        BEGIN
            CREATE UNIQUE INDEX IF NOT EXISTS ocsync_one_active_run_per_cp
                ON apalis.jobs ((metadata -> 'cp'))
                WHERE job_type = 'ocsync.sync'
                  AND (status IN ('Pending', 'Queued', 'Running')
                       OR (status = 'Failed' AND attempts < max_attempts));
        EXCEPTION WHEN unique_violation OR duplicate_table THEN
            -- Another process created it at the same moment.
            NULL;
        END;
    END IF;
    RETURN to_regclass('apalis.ocsync_one_active_run_per_cp') IS NOT NULL;
END
$$;
SELECT ocsync.ensure_queue_guards();

CREATE OR REPLACE FUNCTION ocsync.utc_text(t timestamptz) RETURNS text
    LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The id of the CP's active run (queued, in progress or retrying), or NULL.
CREATE OR REPLACE FUNCTION ocsync.cp_active_run(cp text) RETURNS text
    LANGUAGE sql STABLE AS $$
    SELECT j.id FROM apalis.jobs j
     WHERE j.job_type = 'ocsync.sync' AND j.metadata -> 'cp' = $1
       AND (j.status IN ('Pending', 'Queued', 'Running')
            OR (j.status = 'Failed' AND j.attempts < j.max_attempts))
     LIMIT 1
$$;
COMMENT ON FUNCTION ocsync.cp_active_run(text) IS
    'Id of the CP''s active (queued, in progress or retrying) sync run, or NULL';

-- Enqueues a sync run and returns its id. mode: incremental | all |
-- subjects (then subjects lists SubjectKeys or labels); trigger: schedule |
-- user | sql. A CP with an active run: unique_violation (23505) whose
-- message names the run in the way (its id is also the DETAIL).
CREATE OR REPLACE FUNCTION ocsync.enqueue_sync(
    cp text,
    mode text DEFAULT 'incremental',
    subjects text[] DEFAULT NULL,
    trigger text DEFAULT 'sql',
    requested_by text DEFAULT NULL,
    max_attempts integer DEFAULT 5,
    idempotency_key text DEFAULT NULL
) RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id text;
    v_who text := coalesce(enqueue_sync.requested_by, session_user);
    v_payload jsonb;
    v_active text;
    v_status text;
BEGIN
    -- FOR SHARE: waits for an edit of the CP in flight (edits lock the row
    -- FOR UPDATE while they check ocsync.cp_active_run).
    PERFORM 1 FROM ocsync.cps c WHERE c.id = enqueue_sync.cp FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'CP % does not exist', enqueue_sync.cp USING ERRCODE = 'no_data_found';
    END IF;
    IF enqueue_sync.mode IS NULL OR enqueue_sync.mode NOT IN ('incremental', 'all', 'subjects') THEN
        RAISE EXCEPTION 'unknown mode %: expected incremental, all or subjects', enqueue_sync.mode
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue_sync.mode = 'subjects' AND coalesce(cardinality(enqueue_sync.subjects), 0) = 0 THEN
        RAISE EXCEPTION 'mode subjects needs a non-empty subject list'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue_sync.mode <> 'subjects' AND coalesce(cardinality(enqueue_sync.subjects), 0) > 0 THEN
        RAISE EXCEPTION 'a subject list goes with mode subjects only'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF enqueue_sync.trigger IS NULL OR enqueue_sync.trigger NOT IN ('schedule', 'user', 'sql') THEN
        RAISE EXCEPTION 'unknown trigger %: expected schedule, user or sql', enqueue_sync.trigger
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF coalesce(enqueue_sync.max_attempts, 0) < 1 THEN
        RAISE EXCEPTION 'max_attempts must be at least 1' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_payload := jsonb_build_object('cp', enqueue_sync.cp, 'mode', enqueue_sync.mode,
                                    'trigger', enqueue_sync.trigger, 'requested_by', v_who);
    IF enqueue_sync.mode = 'subjects' THEN
        v_payload := v_payload || jsonb_build_object('subjects', to_jsonb(enqueue_sync.subjects));
    END IF;
    BEGIN
        INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts, run_at,
                                 priority, metadata, idempotency_key)
        VALUES (apalis.generate_ulid(), 'ocsync.sync', convert_to(v_payload::text, 'UTF8'),
                'Pending', 0, enqueue_sync.max_attempts, now(), 0,
                hstore(ARRAY['cp', enqueue_sync.cp, 'mode', enqueue_sync.mode,
                             'trigger', enqueue_sync.trigger, 'requested_by', v_who,
                             'enqueued_at', ocsync.utc_text(clock_timestamp())]),
                enqueue_sync.idempotency_key)
        RETURNING apalis.jobs.id INTO v_id;
    EXCEPTION WHEN unique_violation THEN
        SELECT j.id, ocsync.run_status(j.status, j.attempts, j.max_attempts, j.metadata)
          INTO v_active, v_status
          FROM apalis.jobs j
         WHERE j.id = ocsync.cp_active_run(enqueue_sync.cp);
        IF v_active IS NULL THEN
            RAISE unique_violation USING
                MESSAGE = format('a run with idempotency key %s already exists', enqueue_sync.idempotency_key);
        END IF;
        RAISE unique_violation USING
            MESSAGE = format('CP %s already has an active run %s (%s)', enqueue_sync.cp, v_active, v_status),
            DETAIL = v_active,
            HINT = 'wait for it to end, or abort it: SELECT ocsync.abort_run(''' || v_active || ''')',
            CONSTRAINT = 'ocsync_one_active_run_per_cp';
    END;
    RETURN v_id;
END
$$;
COMMENT ON FUNCTION ocsync.enqueue_sync(text, text, text[], text, text, integer, text) IS
    'Enqueues a sync run for a CP; returns its id. Refused (23505) while the CP has an active run.';

-- Asks a run to stop. A waiting run (queued, or retrying) ends at once as
-- Aborted; a running one gets the abort marker and a NOTIFY on
-- ocsync_run_abort, and its worker ends it at the next batch boundary.
-- Returns the run's status after the call: Aborted, Aborting, or the
-- terminal status it already had.
CREATE OR REPLACE FUNCTION ocsync.abort_run(run_id text) RETURNS text
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r record;
    v_status text;
    v_now text := ocsync.utc_text(clock_timestamp());
BEGIN
    SELECT j.status, j.attempts, j.max_attempts, j.metadata INTO r
      FROM apalis.jobs j
     WHERE j.id = abort_run.run_id AND j.job_type = 'ocsync.sync'
       FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % does not exist', abort_run.run_id USING ERRCODE = 'no_data_found';
    END IF;
    v_status := ocsync.run_status(r.status, r.attempts, r.max_attempts, r.metadata);
    IF v_status IN ('Success', 'Failed', 'Aborted') THEN
        RETURN v_status;
    END IF;
    IF r.status IN ('Pending', 'Failed') THEN
        UPDATE apalis.jobs j
           SET status = 'Killed', done_at = now(), lock_by = NULL, lock_at = NULL,
               last_result = '{"Err": "aborted"}'::jsonb,
               metadata = j.metadata || hstore('abort', v_now)
         WHERE j.id = abort_run.run_id;
        RETURN 'Aborted';
    END IF;
    -- Queued (in a worker's buffer) or Running: the worker ends it.
    UPDATE apalis.jobs j
       SET metadata = j.metadata || hstore('abort', coalesce(j.metadata -> 'abort', v_now))
     WHERE j.id = abort_run.run_id;
    PERFORM pg_notify('ocsync_run_abort', abort_run.run_id);
    RETURN 'Aborting';
END
$$;
COMMENT ON FUNCTION ocsync.abort_run(text) IS
    'Aborts a sync run: a waiting one at once, a running one at its next batch boundary';

-- The Import Logs: one row per run, newest first by id (ULIDs sort by time).
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
    j.metadata -> 'error' AS last_error
FROM apalis.jobs j
CROSS JOIN LATERAL (SELECT (j.metadata -> 'progress')::jsonb AS p) p
WHERE j.job_type = 'ocsync.sync';
COMMENT ON VIEW ocsync.import_logs IS
    'One row per sync run: status, mode, trigger, requester, timings, progress, counts, error count';

-- Schedule ticks: one row per fired tick, inserted by the replica that
-- wins it (the primary key decides), with what it did.
CREATE TABLE IF NOT EXISTS ocsync.schedule_ticks (
    tick      timestamptz PRIMARY KEY,
    fired_by  text        NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now(),
    enqueued  integer     NOT NULL DEFAULT 0,
    -- CPs skipped because they had an active run.
    skipped   integer     NOT NULL DEFAULT 0
);
COMMENT ON TABLE ocsync.schedule_ticks IS
    'Study Data Importer ticks: exactly one row per fired tick, written by the replica that won it';

-- Fires one schedule tick for the listed CPs (the enabled ones among them):
-- the first replica to insert the tick enqueues an incremental run for each
-- and counts the CPs skipped for an active run; the others do nothing
-- (won = false).
CREATE OR REPLACE FUNCTION ocsync.fire_schedule_tick(tick timestamptz, cps text[],
                                                     fired_by text, max_attempts integer DEFAULT 5)
    RETURNS TABLE (won boolean, enqueued integer, skipped integer)
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    c text;
    n_enq integer := 0;
    n_skip integer := 0;
BEGIN
    INSERT INTO ocsync.schedule_ticks (tick, fired_by)
    VALUES (fire_schedule_tick.tick, fire_schedule_tick.fired_by)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, 0, 0;
        RETURN;
    END IF;
    FOR c IN SELECT p.id FROM ocsync.cps p
              WHERE p.enabled AND p.id = ANY (fire_schedule_tick.cps) ORDER BY p.id LOOP
        BEGIN
            PERFORM ocsync.enqueue_sync(c, 'incremental', NULL, 'schedule', 'scheduler',
                                        fire_schedule_tick.max_attempts,
                                        'schedule:' || c || ':' || ocsync.utc_text(fire_schedule_tick.tick));
            n_enq := n_enq + 1;
        EXCEPTION WHEN unique_violation THEN
            n_skip := n_skip + 1;
        END;
    END LOOP;
    UPDATE ocsync.schedule_ticks t SET enqueued = n_enq, skipped = n_skip
     WHERE t.tick = fire_schedule_tick.tick;
    RETURN QUERY SELECT true, n_enq, n_skip;
END
$$;

-- Retention: deletes finished runs (Success, Failed, Aborted) that ended
-- before `older_than`, with their error rows, and old schedule ticks.
-- Returns the number of runs deleted.
CREATE OR REPLACE FUNCTION ocsync.prune_runs(older_than timestamptz) RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n bigint;
BEGIN
    WITH gone AS (
        DELETE FROM apalis.jobs j
         WHERE j.job_type = 'ocsync.sync'
           AND (j.status IN ('Done', 'Killed')
                OR (j.status = 'Failed' AND j.attempts >= j.max_attempts))
           AND j.done_at < prune_runs.older_than
        RETURNING j.id
    ), errors AS (
        DELETE FROM ocsync.run_errors e USING gone WHERE e.run_id = gone.id
    )
    SELECT count(*) INTO n FROM gone;
    DELETE FROM ocsync.schedule_ticks t WHERE t.tick < prune_runs.older_than;
    RETURN n;
END
$$;
