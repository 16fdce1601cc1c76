-- Several replicas on one store (scale-out).
--
-- Every change of a key's row bumps its revision (the store's UPDATEs say so explicitly):
-- replicas compare the revisions of the keys they cache with these, so a change made through
-- one replica reaches the others' caches. Revisions only grow and key rows are never deleted,
-- so COUNT(*) and SUM(revision) together change exactly when some key changed.
ALTER TABLE kms_keys ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;

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
