-- The two schemas ocsync owns, besides the job queue's `apalis` schema.
--   ocsync       configuration, runs, error reports, SQL entry points.
--   ocsync_data  the synchronised study data, for SQL users to read.
CREATE SCHEMA IF NOT EXISTS ocsync;
CREATE SCHEMA IF NOT EXISTS ocsync_data;
COMMENT ON SCHEMA ocsync IS 'ocsync: collection protocol configuration, sync runs and their error reports';
COMMENT ON SCHEMA ocsync_data IS 'ocsync: study data synchronised from OpenClinica, keyed by natural keys';
