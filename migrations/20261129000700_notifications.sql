-- Notifications of ended runs: an outbox that the database fills when a run
-- ends, whoever ended it (a worker, ocsync.abort_run on a queued run, spent
-- retries, the poison-pill sweep), and that the dispatchers of every worker
-- drain (src/notify/).
--
-- A notification never carries a clinical value: a row holds the run's id,
-- the recipient, a reference to the webhook secret (never the secret) and,
-- after the first attempt, the message built from the run's Import Logs
-- row (CP, status, mode, trigger, requester, times, counts, error count,
-- link). Delivering never changes the run.

CREATE TABLE IF NOT EXISTS ocsync.notifications (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The run (apalis.jobs.id); no foreign key: the queue's table is
    -- apalis's, and retention deletes both together (ocsync.prune_runs).
    run_id          text        NOT NULL,
    cp_id           text        NOT NULL,
    channel         text        NOT NULL CHECK (channel IN ('email', 'webhook')),
    -- The recipient's mailbox, or the webhook URL.
    target          text        NOT NULL,
    -- Webhooks: the CP's webhook_secret reference at the run's end,
    -- {"env": NAME} or {"file": PATH}. Never the secret itself.
    secret_ref      jsonb,
    -- The run's status word when the row was made: Success, Failed, Aborted.
    run_status      text        NOT NULL CHECK (run_status IN ('Success', 'Failed', 'Aborted')),
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'sent', 'failed')),
    -- Attempts made (counted when a dispatcher claims the row).
    attempts        integer     NOT NULL DEFAULT 0,
    -- Pending rows: when the next attempt is due; while a dispatcher holds
    -- the row, the end of its lease.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    -- The message (JSON) as built for the first attempt; retries send it again.
    payload         jsonb,
    UNIQUE (run_id, channel, target)
);
COMMENT ON TABLE ocsync.notifications IS
    'Notifications of ended runs (email, webhook): one row per run and recipient, pending until sent or failed';

-- The dispatchers' claim: due pending rows, oldest first.
CREATE INDEX IF NOT EXISTS notifications_due
    ON ocsync.notifications (next_attempt_at, id) WHERE status = 'pending';

-- Called when a sync run's row moves into Done, Failed or Killed (the
-- trigger's WHEN clause): if its status word just became terminal, one row
-- per recipient of the CP's [notify] section (Failed and Aborted always,
-- Success when on_success), then a NOTIFY on ocsync_notify. The run's own
-- change must never fail because of a notification: anything that goes
-- wrong here (a configuration edited by hand into a shape this does not
-- expect) becomes a WARNING in the Postgres log, and the run ends as it
-- would have.
CREATE OR REPLACE FUNCTION ocsync.queue_run_notifications() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    v_status text := ocsync.run_status(NEW.status, NEW.attempts, NEW.max_attempts, NEW.metadata);
    v_cp text := NEW.metadata -> 'cp';
    v_notify jsonb;
    v_rows integer;
    v_total integer := 0;
BEGIN
    IF v_status NOT IN ('Success', 'Failed', 'Aborted')
       OR ocsync.run_status(OLD.status, OLD.attempts, OLD.max_attempts, OLD.metadata)
              IN ('Success', 'Failed', 'Aborted') THEN
        RETURN NULL;
    END IF;
    BEGIN
        SELECT c.config -> 'notify' INTO v_notify FROM ocsync.cps c WHERE c.id = v_cp;
        IF v_notify IS NULL OR jsonb_typeof(v_notify) <> 'object' THEN
            RETURN NULL;
        END IF;
        IF v_status = 'Success'
           AND NOT coalesce(jsonb_typeof(v_notify -> 'on_success') = 'boolean'
                            AND (v_notify ->> 'on_success')::boolean, false) THEN
            RETURN NULL;
        END IF;
        IF jsonb_typeof(v_notify -> 'email') = 'array' THEN
            INSERT INTO ocsync.notifications (run_id, cp_id, channel, target, run_status)
            SELECT NEW.id, v_cp, 'email', e.value #>> '{}', v_status
              FROM jsonb_array_elements(v_notify -> 'email') AS e(value)
             WHERE jsonb_typeof(e.value) = 'string'
            ON CONFLICT (run_id, channel, target) DO NOTHING;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            v_total := v_total + v_rows;
        END IF;
        IF jsonb_typeof(v_notify -> 'webhook_url') = 'string' THEN
            INSERT INTO ocsync.notifications (run_id, cp_id, channel, target, secret_ref, run_status)
            VALUES (NEW.id, v_cp, 'webhook', v_notify ->> 'webhook_url',
                    v_notify -> 'webhook_secret', v_status)
            ON CONFLICT (run_id, channel, target) DO NOTHING;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            v_total := v_total + v_rows;
        END IF;
        IF v_total > 0 THEN
            PERFORM pg_notify('ocsync_notify', NEW.id);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'ocsync: the notifications of run % could not be queued: % (%)',
            NEW.id, SQLERRM, SQLSTATE;
    END;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION ocsync.queue_run_notifications() IS
    'Trigger: queues the notifications of a sync run whose status just became Success, Failed or Aborted';

-- Every terminal status word comes from a Done, Failed or Killed row (see
-- ocsync.run_status), so the WHEN clause lets nothing else through: claims
-- (Pending -> Queued -> Running), heartbeats (apalis.workers) and progress
-- writes (metadata only) never call the function. A Failed row whose
-- attempts or max_attempts change is checked too, since that can end a
-- waiting retry.
-- Measured on the development machine (20,000 rows, one UPDATE): ending
-- runs of CPs without recipients costs ~27 µs more per run with the
-- trigger, queueing two notifications ~150 µs; metadata-only updates cost
-- the same with and without it.
DROP TRIGGER IF EXISTS ocsync_run_ended ON apalis.jobs;
CREATE TRIGGER ocsync_run_ended
    AFTER UPDATE ON apalis.jobs
    FOR EACH ROW
    WHEN (NEW.job_type = 'ocsync.sync'
          AND NEW.status IN ('Done', 'Failed', 'Killed')
          AND (OLD.status IS DISTINCT FROM NEW.status
               OR OLD.attempts IS DISTINCT FROM NEW.attempts
               OR OLD.max_attempts IS DISTINCT FROM NEW.max_attempts))
    EXECUTE FUNCTION ocsync.queue_run_notifications();

-- Retention also deletes the notifications of the runs it deletes.
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
    ), notifications AS (
        DELETE FROM ocsync.notifications n USING gone WHERE n.run_id = gone.id
    )
    SELECT count(*) INTO n FROM gone;
    DELETE FROM ocsync.schedule_ticks t WHERE t.tick < prune_runs.older_than;
    RETURN n;
END
$$;
