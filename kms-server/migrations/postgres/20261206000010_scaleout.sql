-- Several replicas on one store (scale-out).
--
-- Every change of a key's row bumps its revision (the store's UPDATEs say so explicitly):
-- replicas compare the revisions of the keys they cache with these, so a change made through
-- one replica reaches the others' caches. Revisions only grow and key rows are never deleted,
-- so COUNT(*) and SUM(revision) together change exactly when some key changed.
ALTER TABLE kms_keys ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;

-- PostgreSQL also tells every listening replica at commit: `kms_keys` carries
-- '<key id>:<revision>', `kms_authz` that bindings, grants or windows changed. Triggers, so
-- that every writer (the key service, approvals, a restore) notifies without remembering to.
CREATE FUNCTION kms_notify_key() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kms_keys', NEW.key_id || ':' || NEW.revision);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER kms_keys_notify AFTER INSERT OR UPDATE ON kms_keys
    FOR EACH ROW EXECUTE FUNCTION kms_notify_key();

CREATE FUNCTION kms_notify_authz() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('kms_authz', TG_TABLE_NAME);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER role_bindings_notify AFTER INSERT OR UPDATE OR DELETE ON role_bindings
    FOR EACH STATEMENT EXECUTE FUNCTION kms_notify_authz();
CREATE TRIGGER key_grants_notify AFTER INSERT OR UPDATE OR DELETE ON key_grants
    FOR EACH STATEMENT EXECUTE FUNCTION kms_notify_authz();
CREATE TRIGGER break_glass_windows_notify AFTER INSERT OR UPDATE OR DELETE ON break_glass_windows
    FOR EACH STATEMENT EXECUTE FUNCTION kms_notify_authz();

-- The open recovery share session, if any (at most one: `slot` is always 1). The session
-- itself, with the shares submitted so far, lives in the memory of the replica that opened it;
-- this row says which replica that is, so that the others refuse its calls with a clear error
-- instead of opening a second session. Never a share here.
CREATE TABLE recovery_sessions (
    slot         BIGINT PRIMARY KEY CHECK (slot = 1),
    session_id   TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    replica      TEXT NOT NULL, -- the holder's instance name
    holder       TEXT NOT NULL, -- random per process start: a restarted replica is another holder
    opened_at    BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);
