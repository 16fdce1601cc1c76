-- Rotation policy per key (0 = no period / the server's default usage limit) and the durable
-- usage counter per version: encryptions are reserved in blocks before they are used, so a
-- crash can only over-count.
ALTER TABLE kms_keys ADD COLUMN rotation_period_secs BIGINT NOT NULL DEFAULT 0;
ALTER TABLE kms_keys ADD COLUMN usage_limit BIGINT NOT NULL DEFAULT 0;
ALTER TABLE kms_key_versions ADD COLUMN usage_reserved BIGINT NOT NULL DEFAULT 0;
