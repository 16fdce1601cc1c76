-- The token vault: random tokens for values that must not be derivable from any key. No value
-- in clear: `lookup` is a keyed hash (HMAC-SHA256 under a key derived from the domain key),
-- `sealed_value` the value under AES-SIV (hex), `key_version` the domain key version of both.
CREATE TABLE token_vault (
    domain       TEXT NOT NULL REFERENCES tokenization_domains (domain),
    field        TEXT NOT NULL,
    key_version  BIGINT NOT NULL,
    lookup       TEXT NOT NULL,
    token        TEXT NOT NULL,
    sealed_value TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (domain, field, key_version, lookup)
);
CREATE UNIQUE INDEX token_vault_token ON token_vault (domain, field, token);
