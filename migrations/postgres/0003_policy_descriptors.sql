-- Fleet mode: the protected service's descriptors (descriptors/ of the policy bundle) travel
-- with each policy version: a JSON array of [name, hex-encoded content] pairs, in name order.
-- Older rows have none.
ALTER TABLE policy_versions ADD COLUMN descriptors text NOT NULL DEFAULT '[]';
