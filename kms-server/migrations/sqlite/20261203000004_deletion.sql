-- When a key scheduled for deletion is destroyed (seconds since the Unix epoch; NULL unless
-- the key is pending deletion or destroyed).
ALTER TABLE kms_keys ADD COLUMN deletion_due_at BIGINT;
