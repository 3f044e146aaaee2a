//! The coordinator database's schema: one migration per version, and the TEMP stand-ins a
//! read-only open of an older file uses instead of migrating it.

use fedpriv_common::state_db::DbSpec;

pub(super) const APPLICATION_ID: i32 = 0x6670_7263; // "fprc"

/// `MIGRATIONS[i]` takes the schema from version i to i + 1.
pub(super) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
CREATE TABLE studies (
    id TEXT PRIMARY KEY NOT NULL,
    config_toml TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'completed', 'stopped')),
    end_reason TEXT
) STRICT;
CREATE TABLE enrolments (
    study TEXT NOT NULL REFERENCES studies(id),
    site TEXT NOT NULL,
    PRIMARY KEY (study, site)
) STRICT;
CREATE TABLE site_records (
    study TEXT NOT NULL,
    site TEXT NOT NULL,
    records INTEGER NOT NULL CHECK (records >= 0),
    PRIMARY KEY (study, site),
    FOREIGN KEY (study, site) REFERENCES enrolments(study, site)
) STRICT;
CREATE TABLE rounds (
    study TEXT NOT NULL REFERENCES studies(id),
    round INTEGER NOT NULL CHECK (round >= 0),
    status TEXT NOT NULL CHECK (status IN ('reserved', 'completed', 'aborted')),
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    reason TEXT,
    PRIMARY KEY (study, round)
) STRICT;
CREATE TABLE ledger (
    study TEXT NOT NULL,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    epsilon_after REAL NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (study, site, round),
    FOREIGN KEY (study, round) REFERENCES rounds(study, round),
    FOREIGN KEY (study, site) REFERENCES enrolments(study, site)
) STRICT;
-- Spends are append-only, also against a hand-run UPDATE or DELETE.
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger entries are never changed'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger entries are never deleted'); END;
CREATE TABLE model_versions (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES rounds(study, round)
) STRICT;
-- A contributor must have paid for the round: an update with no spend is a privacy bug.
CREATE TABLE lineage (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    site TEXT NOT NULL,
    PRIMARY KEY (study, round, site),
    FOREIGN KEY (study, round) REFERENCES model_versions(study, round),
    FOREIGN KEY (study, site, round) REFERENCES ledger(study, site, round)
) STRICT;
",
    "
-- A model version whose file the retention policy removed: when, and the seq of the audit
-- record that announced it before the file was deleted. The version's row and its lineage
-- stay: what the version was and which sites made it outlive its file.
CREATE TABLE model_prunes (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    pruned_at INTEGER NOT NULL,
    audit_seq INTEGER NOT NULL CHECK (audit_seq > 0),
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES model_versions(study, round)
) STRICT;
CREATE TRIGGER model_prunes_no_update BEFORE UPDATE ON model_prunes
    BEGIN SELECT RAISE(ABORT, 'prune records are never changed'); END;
CREATE TRIGGER model_prunes_no_delete BEFORE DELETE ON model_prunes
    BEGIN SELECT RAISE(ABORT, 'prune records are never deleted'); END;
",
    "
-- Privacy audits run against a study's terms (`privacy-audit --state`), passing or not;
-- an export of a study that requires one looks for a passing audit of its exact terms.
-- No reference to studies: an audit usually runs before the study is started.
CREATE TABLE privacy_audits (
    id INTEGER PRIMARY KEY,
    study TEXT NOT NULL,
    terms_sha256 TEXT NOT NULL,
    audited_at INTEGER NOT NULL,
    epsilon_claimed REAL NOT NULL,
    epsilon_lower_bound REAL NOT NULL,
    delta REAL NOT NULL,
    confidence REAL NOT NULL,
    canaries INTEGER NOT NULL,
    guesses INTEGER NOT NULL,
    correct_guesses INTEGER NOT NULL,
    passed INTEGER NOT NULL CHECK (passed IN (0, 1)),
    report_json TEXT NOT NULL
) STRICT;
CREATE TRIGGER privacy_audits_no_update BEFORE UPDATE ON privacy_audits
    BEGIN SELECT RAISE(ABORT, 'audit records are never changed'); END;
CREATE TRIGGER privacy_audits_no_delete BEFORE DELETE ON privacy_audits
    BEGIN SELECT RAISE(ABORT, 'audit records are never deleted'); END;
-- The study's run id, sent with its announcements; NULL until the study's next start.
ALTER TABLE studies ADD COLUMN instance TEXT;
",
    "
-- What a round's evaluation cost each site, beside the round's training spend (same
-- append-only rules; the accountant composes both).
CREATE TABLE evaluation_spends (
    study TEXT NOT NULL,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (study, site, round),
    FOREIGN KEY (study, site, round) REFERENCES ledger(study, site, round)
) STRICT;
CREATE TRIGGER evaluation_spends_no_update BEFORE UPDATE ON evaluation_spends
    BEGIN SELECT RAISE(ABORT, 'ledger entries are never changed'); END;
CREATE TRIGGER evaluation_spends_no_delete BEFORE DELETE ON evaluation_spends
    BEGIN SELECT RAISE(ABORT, 'ledger entries are never deleted'); END;
-- A round's DP evaluation: the sum of the sites' noised vectors and what it says (JSON),
-- measuring the model after `model_round`.
CREATE TABLE evaluations (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    model_round INTEGER NOT NULL,
    sites TEXT NOT NULL,
    sum TEXT NOT NULL,
    summary TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES rounds(study, round)
) STRICT;
CREATE TRIGGER evaluations_no_update BEFORE UPDATE ON evaluations
    BEGIN SELECT RAISE(ABORT, 'evaluations are never changed'); END;
CREATE TRIGGER evaluations_no_delete BEFORE DELETE ON evaluations
    BEGIN SELECT RAISE(ABORT, 'evaluations are never deleted'); END;
",
];

/// `READ_ONLY_STANDINS[i]`: empty TEMP tables standing in for what `MIGRATIONS[i]` adds,
/// created by a read-only open of a file whose schema predates that migration, so the read
/// queries work on a file an older fedpriv wrote without migrating it (a read-only open
/// never writes the file; the running coordinator migrates it when it next starts).
pub(super) const READ_ONLY_STANDINS: &[&str] = &[
    "",
    "CREATE TEMP TABLE model_prunes (
        study TEXT NOT NULL, round INTEGER NOT NULL, pruned_at INTEGER NOT NULL,
        audit_seq INTEGER NOT NULL, PRIMARY KEY (study, round)
    ) STRICT;",
    "CREATE TEMP TABLE privacy_audits (
        id INTEGER PRIMARY KEY, study TEXT NOT NULL, terms_sha256 TEXT NOT NULL,
        audited_at INTEGER NOT NULL, epsilon_claimed REAL NOT NULL,
        epsilon_lower_bound REAL NOT NULL, delta REAL NOT NULL, confidence REAL NOT NULL,
        canaries INTEGER NOT NULL, guesses INTEGER NOT NULL, correct_guesses INTEGER NOT NULL,
        passed INTEGER NOT NULL, report_json TEXT NOT NULL
    ) STRICT;",
    "CREATE TEMP TABLE evaluation_spends (
        study TEXT NOT NULL, site TEXT NOT NULL, round INTEGER NOT NULL, q REAL NOT NULL,
        sigma REAL NOT NULL, steps INTEGER NOT NULL, recorded_at INTEGER NOT NULL,
        PRIMARY KEY (study, site, round)
    ) STRICT;
    CREATE TEMP TABLE evaluations (
        study TEXT NOT NULL, round INTEGER NOT NULL, model_round INTEGER NOT NULL,
        sites TEXT NOT NULL, sum TEXT NOT NULL, summary TEXT NOT NULL,
        recorded_at INTEGER NOT NULL, PRIMARY KEY (study, round)
    ) STRICT;",
];

pub(super) const SPEC: DbSpec = DbSpec {
    app_id: APPLICATION_ID,
    kind: "fedpriv coordinator database",
    migrations: MIGRATIONS,
    read_only_standins: READ_ONLY_STANDINS,
};
