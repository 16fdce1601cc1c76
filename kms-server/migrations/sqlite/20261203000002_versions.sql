-- Versions below min_decryption_version are retired: they no longer decrypt.
ALTER TABLE kms_keys ADD COLUMN min_decryption_version BIGINT NOT NULL DEFAULT 1;
-- Each HSM object's CKA_ID is key id || version || this random tag, so that a rotation that
-- lost a race or crashed leaves a harmless orphan instead of a duplicate id. 0 = no tag.
ALTER TABLE kms_key_versions ADD COLUMN hsm_tag BIGINT NOT NULL DEFAULT 0;
