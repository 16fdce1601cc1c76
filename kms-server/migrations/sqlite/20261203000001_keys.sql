-- Master key metadata. No key material: the keys live in the HSM.
CREATE TABLE kms_keys (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id          TEXT NOT NULL UNIQUE,
    alias           TEXT UNIQUE,
    description     TEXT NOT NULL,
    tags            TEXT NOT NULL,
    state           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    primary_version BIGINT NOT NULL
);

CREATE TABLE kms_key_versions (
    key_id     TEXT NOT NULL REFERENCES kms_keys (key_id),
    version    BIGINT NOT NULL,
    state      TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (key_id, version)
);
