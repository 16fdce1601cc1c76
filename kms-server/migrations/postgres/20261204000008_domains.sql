-- Tokenization domains (a study, a data-use agreement): each has a master key and versioned
-- 32-byte domain keys, stored only as blobs sealed under that master key (hex). Access is by
-- key grants on the master key with the operations tokenize, domain-key and reidentify.
CREATE TABLE tokenization_domains (
    domain      TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);

CREATE TABLE domain_key_versions (
    domain      TEXT NOT NULL REFERENCES tokenization_domains (domain),
    version     BIGINT NOT NULL,
    sealed_key  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (domain, version)
);
