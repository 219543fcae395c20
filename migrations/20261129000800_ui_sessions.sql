-- Sign-ins of the web pages (src/ui/session.rs).
--
-- A session is opened by pasting an API token into the sign-in form. The
-- browser keeps a random 256-bit session id in an HttpOnly cookie; only its
-- SHA-256 (hex) is stored here, so a copy of the database opens no
-- session. Lookups go by hash (the primary key). The session belongs to its
-- token: its name and role are read through the join on every request, a
-- revoked token ends its sessions at once (the join requires revoked_at IS
-- NULL), and deleting a token deletes them.
CREATE TABLE IF NOT EXISTS ocsync.ui_sessions (
    id_hash     text        PRIMARY KEY CHECK (id_hash ~ '^[0-9a-f]{64}$'),
    token_id    bigint      NOT NULL REFERENCES ocsync.api_tokens (id) ON DELETE CASCADE,
    -- Every form of the session carries it; a POST without it is refused.
    csrf_secret text        NOT NULL CHECK (csrf_secret ~ '^[0-9a-f]{64}$'),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS ui_sessions_expires_at ON ocsync.ui_sessions (expires_at);
CREATE INDEX IF NOT EXISTS ui_sessions_token_id ON ocsync.ui_sessions (token_id);
COMMENT ON TABLE ocsync.ui_sessions IS
    'Web page sign-ins: SHA-256 of the session cookie (never the cookie), the API token it was opened with, CSRF secret, expiry';
