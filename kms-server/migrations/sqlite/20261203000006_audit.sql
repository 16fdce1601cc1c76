-- The tamper-evident audit trail (kms-server/src/audit/). One row per RPC, chained: each row's
-- hash is HMAC-SHA256 (under a key derived from the HSM audit key) over the previous row's
-- hash and the row's canonical encoding. Context values and identifiers are stored only as
-- HMACs. Hashes and MACs are lowercase hex. seq is the primary key, so two writers racing on
-- one chain fail instead of forking it.
CREATE TABLE audit_records (
    seq         INTEGER PRIMARY KEY,
    recorded_at BIGINT NOT NULL,
    request_id  TEXT NOT NULL,
    principal   TEXT NOT NULL,
    role        TEXT NOT NULL,
    operation   TEXT NOT NULL,
    key_id      TEXT,
    key_version BIGINT,
    outcome     TEXT NOT NULL,
    error_code  TEXT,
    context     TEXT NOT NULL, -- JSON object: context key -> HMAC of the value
    identifiers TEXT NOT NULL, -- JSON array of [label, HMAC of the value]
    break_glass TEXT,          -- break-glass window id, when the use happened under one
    severity    TEXT NOT NULL,
    detail      TEXT NOT NULL, -- JSON object of non-secret metadata
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_records_break_glass ON audit_records (break_glass, seq) WHERE break_glass IS NOT NULL;

-- Checkpoints: the chain hash at seq, MACed inside the HSM with the audit key itself.
CREATE TABLE audit_checkpoints (
    seq         INTEGER PRIMARY KEY, -- the last record covered
    record_hash TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    mac         TEXT NOT NULL
);

-- Which HSM object is the audit key of this store (its CKA_ID, hex). One row: the first
-- process to register its freshly generated key wins; a loser destroys its own and uses this.
CREATE TABLE audit_key (
    id            BIGINT PRIMARY KEY CHECK (id = 1),
    hsm_object_id TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
