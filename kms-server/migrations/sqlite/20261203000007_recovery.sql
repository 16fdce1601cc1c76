-- Recovery of the master keys by M of N key custodians.
-- A custodian's public age X25519 recipient; the private half never reaches the server.
CREATE TABLE custodian_keys (
    principal     TEXT PRIMARY KEY,
    recipient     TEXT NOT NULL,
    registered_at BIGINT NOT NULL
);

-- One ceremony per split of a recovery key. At most one is active: the others were superseded
-- by a re-share or a rekey, and shares of theirs are refused.
CREATE TABLE recovery_ceremonies (
    ceremony_id TEXT PRIMARY KEY,
    threshold   BIGINT NOT NULL,
    share_count BIGINT NOT NULL,
    kcv         TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    closed_at   BIGINT NOT NULL DEFAULT 0,
    approval_id TEXT NOT NULL
);
-- At most one active ceremony, whichever process records it.
CREATE UNIQUE INDEX recovery_one_active ON recovery_ceremonies (state) WHERE state = 'active';

-- Each share's custodian and commitment; the sealed share (only its custodian can open it)
-- until the ceremony is closed. Never a share in clear.
CREATE TABLE recovery_shares (
    ceremony_id  TEXT NOT NULL REFERENCES recovery_ceremonies (ceremony_id),
    share_index  BIGINT NOT NULL,
    custodian    TEXT NOT NULL,
    commitment   TEXT NOT NULL,
    sealed       TEXT,
    confirmed_at BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (ceremony_id, share_index)
);

-- Backups made by approved requests: master keys wrapped under the recovery key, metadata,
-- and a MAC. Nothing in clear.
CREATE TABLE recovery_backups (
    backup_id   TEXT PRIMARY KEY,
    ceremony_id TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    approval_id TEXT NOT NULL,
    content     TEXT NOT NULL
);
