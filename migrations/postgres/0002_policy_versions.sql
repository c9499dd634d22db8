-- Fleet mode (src/policy/fleet.rs): every policy version applied by any sidecar of the fleet.
-- The newest row is the fleet's policy; each insert NOTIFYs `pdgate_policy` with its id in
-- the same transaction. Rows are never updated or deleted: they are also the record of which
-- policy was in force when.

CREATE TABLE policy_versions (
    id         bigserial   PRIMARY KEY,
    -- SHA-256 of the policy files, as `pdgate policy status` shows it.
    version    text        NOT NULL,
    model      text        NOT NULL,
    policy     text        NOT NULL,
    taxonomy   text        NOT NULL,
    routes     text,
    -- The policy's tests as a JSON array of [name, content] pairs; run by every sidecar
    -- before it swaps the version in.
    tests      text        NOT NULL,
    -- Who applied it (the admin identity) and why (the change ticket), when known.
    applied_by text        NOT NULL DEFAULT '',
    comment    text        NOT NULL DEFAULT '',
    applied_at timestamptz NOT NULL DEFAULT now()
);
