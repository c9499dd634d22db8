-- The subject registry (src/registry/): the current state of each data subject, their
-- consents, and the history of every change. A change is one transaction that bumps the
-- subject's version, changes the state and appends one event with that version.
-- Times are microseconds since the Unix epoch (one exact, ordered integer).

CREATE TABLE subjects (
    subject             TEXT    NOT NULL PRIMARY KEY,
    -- 1 after the first change, +1 with each one after it.
    version             INTEGER NOT NULL CHECK (version > 0),
    use_suspended       INTEGER NOT NULL DEFAULT 0 CHECK (use_suspended IN (0, 1)),
    provision_suspended INTEGER NOT NULL DEFAULT 0 CHECK (provision_suspended IN (0, 1)),
    deletion_requested  INTEGER NOT NULL DEFAULT 0 CHECK (deletion_requested IN (0, 1))
) STRICT;

-- Consent per purpose; consent to the use of communications data (§5) is a row of its own
-- kind, never implied by an ordinary consent. Withdrawal deletes the row (the history keeps it).
CREATE TABLE subject_consents (
    subject        TEXT    NOT NULL REFERENCES subjects (subject),
    communications INTEGER NOT NULL CHECK (communications IN (0, 1)),
    purpose        TEXT    NOT NULL,
    PRIMARY KEY (subject, communications, purpose)
) STRICT, WITHOUT ROWID;

-- The history. The key makes a second event claiming a version already taken fail, so a lost
-- update cannot go unnoticed.
CREATE TABLE subject_events (
    subject        TEXT    NOT NULL REFERENCES subjects (subject),
    version        INTEGER NOT NULL,
    at_us          INTEGER NOT NULL,
    actor          TEXT    NOT NULL,
    source         TEXT,
    change         TEXT    NOT NULL CHECK (change IN ('consent', 'withdraw', 'suspend_use',
                       'resume_use', 'suspend_provision', 'resume_provision', 'request_deletion')),
    purpose        TEXT,
    communications INTEGER NOT NULL DEFAULT 0 CHECK (communications IN (0, 1)),
    PRIMARY KEY (subject, version)
) STRICT;

-- The history is evidence of consent: pdgate only appends to it. These stop a mistaken UPDATE
-- or DELETE; they are not a defence against someone who can write the file.
CREATE TRIGGER subject_events_no_update BEFORE UPDATE ON subject_events
BEGIN
    SELECT RAISE(ABORT, 'the subject history is append-only');
END;

CREATE TRIGGER subject_events_no_delete BEFORE DELETE ON subject_events
BEGIN
    SELECT RAISE(ABORT, 'the subject history is append-only');
END;
