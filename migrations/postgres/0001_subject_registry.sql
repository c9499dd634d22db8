-- The subject registry (src/registry/): the current state of each data subject, their
-- consents, and the history of every change. A change is one transaction that bumps the
-- subject's version (the upsert locks the row, so changes to one subject are serialised),
-- changes the state, appends one event with that version and NOTIFYs `pdgate_subjects`.
-- Tables are created in the first schema of the search_path (set it in the URL with
-- `?options=-c%20search_path%3Dpdgate` to keep them out of `public`).

CREATE TABLE subjects (
    subject             text    NOT NULL PRIMARY KEY,
    -- 1 after the first change, +1 with each one after it.
    version             bigint  NOT NULL CHECK (version > 0),
    use_suspended       boolean NOT NULL DEFAULT false,
    provision_suspended boolean NOT NULL DEFAULT false,
    deletion_requested  boolean NOT NULL DEFAULT false
);

-- Consent per purpose; consent to the use of communications data (§5) is a row of its own
-- kind, never implied by an ordinary consent. Withdrawal deletes the row (the history keeps it).
CREATE TABLE subject_consents (
    subject        text    NOT NULL REFERENCES subjects (subject),
    communications boolean NOT NULL,
    purpose        text    NOT NULL,
    PRIMARY KEY (subject, communications, purpose)
);

-- The history. The key makes a second event claiming a version already taken fail, so a lost
-- update cannot go unnoticed. `at` is the database's clock, one clock for the whole fleet.
CREATE TABLE subject_events (
    subject        text        NOT NULL REFERENCES subjects (subject),
    version        bigint      NOT NULL,
    at             timestamptz NOT NULL,
    actor          text        NOT NULL,
    source         text,
    change         text        NOT NULL CHECK (change IN ('consent', 'withdraw', 'suspend_use',
                       'resume_use', 'suspend_provision', 'resume_provision', 'request_deletion')),
    purpose        text,
    communications boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (subject, version)
);

-- The history is evidence of consent: pdgate only appends to it. This stops a mistaken UPDATE
-- or DELETE; it is not a defence against the table's owner.
CREATE FUNCTION subject_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the subject history is append-only';
END;
$$;

CREATE TRIGGER subject_events_append_only BEFORE UPDATE OR DELETE ON subject_events
    FOR EACH ROW EXECUTE FUNCTION subject_events_append_only();
