-- Collection protocol (CP) configurations: one row per OpenSpecimen CP
-- linked to an OpenClinica study. The configuration itself is JSON (the
-- typed `CpConfig` of src/cp/model.rs); passwords are never in it, only
-- references to an environment variable or a mounted secret file.
CREATE TABLE IF NOT EXISTS ocsync.cps (
    -- OpenSpecimen CP short title.
    id         text        PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
    config     jsonb       NOT NULL,
    -- Copy of config->'enabled', for the scheduler's query.
    enabled    boolean     NOT NULL DEFAULT true,
    -- Bumped on every edit: an edit names the version it started from and
    -- is refused when another edit came first (optimistic concurrency).
    version    integer     NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ocsync.cps IS
    'Collection protocol configurations (one per OpenSpecimen CP), versioned for optimistic concurrency';

-- The id of the CP's queued or running sync run, or NULL. Editing a CP is
-- refused while this returns a run. The job queue does not exist yet: this
-- placeholder says "no run" and the queue's migration replaces it (CREATE
-- OR REPLACE, same signature). The replacement should lock the CP's row
-- (SELECT ... FROM ocsync.cps WHERE id = cp FOR SHARE) when a run starts,
-- so that an edit and a run start cannot interleave: an edit holds the row
-- FOR UPDATE while it checks this function.
CREATE OR REPLACE FUNCTION ocsync.cp_active_run(cp text) RETURNS text
    LANGUAGE sql STABLE AS $$ SELECT NULL::text $$;
COMMENT ON FUNCTION ocsync.cp_active_run(text) IS
    'Id of the CP''s active (queued or running) sync run, or NULL. Placeholder returning NULL: the queue migration replaces it.';
