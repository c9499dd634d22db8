-- Fleet mode: one ordered log of every change the fleet's sidecars must hear of — subject
-- changes (payload `"<version> <subject>"`) and policy versions (payload: the row id of
-- `policy_versions`). A sidecar behind a transaction-mode pooler cannot LISTEN; it reads this
-- table after its cursor instead (`[fleet] change_feed = "poll"`). Every change is written
-- here whatever the sidecars' feed, so a fleet may mix both.
--
-- Ids come from the single row of `fleet_change_counter`, updated in the change's own
-- transaction: the row lock is held until commit, so ids commit in order with no gaps, and a
-- reader that has seen id `n` has seen every change before it. Rows older than a quarter of an
-- hour are pruned by the writers; a reader whose cursor fell behind the oldest row sees the
-- gap and drops its cache.

CREATE TABLE fleet_change_counter (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last     bigint  NOT NULL
);
INSERT INTO fleet_change_counter (only_row, last) VALUES (true, 0);

CREATE TABLE fleet_changes (
    id      bigint      PRIMARY KEY,
    kind    text        NOT NULL CHECK (kind IN ('subject', 'policy')),
    payload text        NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
