-- Authorization: who holds which role, what each key user may do with which key, dual-control
-- approval requests and their votes, quorums, and break-glass windows. No secrets here.
CREATE TABLE role_bindings (
    principal   TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (principal, role)
);

CREATE TABLE key_grants (
    grant_id              TEXT PRIMARY KEY,
    principal             TEXT NOT NULL,
    key_id                TEXT NOT NULL,
    operations            TEXT NOT NULL,
    required_context_keys TEXT NOT NULL,
    context_equals        TEXT NOT NULL,
    expires_at            BIGINT NOT NULL,
    created_at            BIGINT NOT NULL,
    approval_id           TEXT NOT NULL,
    revoked_at            BIGINT NOT NULL
);
CREATE INDEX key_grants_principal ON key_grants (principal);

CREATE TABLE approval_quorums (
    kind          TEXT PRIMARY KEY,
    required      BIGINT NOT NULL,
    approver_role TEXT NOT NULL
);

CREATE TABLE approvals (
    approval_id   TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    proposer      TEXT NOT NULL,
    parameters    TEXT NOT NULL,
    required      BIGINT NOT NULL,
    approver_role TEXT NOT NULL,
    state         TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    decided_at    BIGINT NOT NULL,
    result        TEXT NOT NULL
);
CREATE INDEX approvals_state ON approvals (state);

-- One row per distinct approver: the primary key is what makes a second approval by the same
-- principal impossible, even from two concurrent requests.
CREATE TABLE approval_votes (
    approval_id TEXT NOT NULL REFERENCES approvals (approval_id),
    approver    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (approval_id, approver)
);

CREATE TABLE break_glass_windows (
    window_id     TEXT PRIMARY KEY,
    principal     TEXT NOT NULL,
    key_ids       TEXT NOT NULL,
    justification TEXT NOT NULL,
    opened_at     BIGINT NOT NULL,
    closes_at     BIGINT NOT NULL,
    approval_id   TEXT NOT NULL
);
