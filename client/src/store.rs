//! The site's own privacy ledger: every spend this site agreed to, per study and round, and
//! every task it refused, in one SQLite file in the site's state directory.
//!
//! Two budgets are enforced, in the transaction that records the spend: the study's own cap
//! (the accountant over the study's events, at the study's delta) and the cap of the data
//! source the study reads, over every study that ever read it (a Rényi filter, sound under
//! fully adaptive composition: see `fedpriv_common::dp::filter`). The first spend of a study
//! also pins the terms it was paid under and its source: a later round under other terms,
//! or against another source, is refused.
//!
//! The site's cap is enforced against this ledger, whatever the coordinator says, so it
//! stores mechanism parameters (q, sigma, steps) and recomputes epsilon with the accountant;
//! it never trusts an epsilon from anywhere. A spend is on disk before the call returns (WAL,
//! `synchronous=FULL`), and is never overwritten, refunded or paid twice: a second task for
//! the same (study, round) is refused with [`StoreError::AlreadySpent`], so a coordinator
//! cannot replay a round to get a second update.
//!
//! A file that is not ours, comes from a newer fedpriv or fails its integrity check is refused
//! with the path and a recovery hint; the ledger is never reset or rebuilt.
//!
//! Timestamps are unix seconds passed in by the caller; the ledger never reads the clock.

use std::path::{Path, PathBuf};

use fedpriv_common::dp::accountant::{self, AccountError, AccountantKind};
use fedpriv_common::dp::filter;
use fedpriv_common::dp::{Delta, Epsilon, SgmEvent};
use fedpriv_common::state_db::{open_db, Access, DbFileError, DbSpec};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

pub use fedpriv_common::state_db::FileProblem;

/// Why the ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be used as this ledger. The operator's to resolve (the message says
    /// how); nothing was reset.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    /// Creating or inspecting the file failed at the file-system level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// This site paid for rounds of another run of this study id (another coordinator
    /// state, whose round numbers start again): it takes no part in this run.
    #[error("study {study:?} was paid for under another run; this run's rounds are refused (a new study id is needed)")]
    OtherInstance { study: String },
    /// This site already paid for this round of this study: decline the task (a replay).
    #[error("round {round} of study {study:?} was already paid for; a round is never run twice")]
    AlreadySpent { study: String, round: u64 },
    /// The task would take the study, or its data source, past this site's own cap:
    /// decline it.
    #[error(
        "round {round} of study {study:?} would bring {which} to epsilon {epsilon_after} \
         (cap {cap})"
    )]
    OverCap {
        study: String,
        round: u64,
        which: CapKind,
        /// Infinite when the accountant finds no finite bound.
        epsilon_after: f64,
        cap: f64,
    },
    /// The study was first paid for under other terms (or from another data source): a
    /// coordinator changing what it asks after the spend. Decline.
    #[error("study {study:?} was paid for under other terms ({what}); they never change")]
    TermsChanged { study: String, what: &'static str },
    /// The data source's delta differs from the one its filter was started with.
    #[error(
        "data source {source_name:?} was first charged at delta {stored}, the config now says \
         {configured}: a source's delta is fixed once it is charged"
    )]
    SourceDeltaChanged {
        source_name: String,
        stored: f64,
        configured: f64,
    },
    /// The accountant could not answer.
    #[error("accountant: {0}")]
    Account(#[from] AccountError),
    /// Any other SQLite failure.
    #[error("site ledger database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl From<DbFileError> for StoreError {
    fn from(e: DbFileError) -> Self {
        match e {
            DbFileError::File { path, problem } => Self::File { path, problem },
            DbFileError::Io { path, source } => Self::Io { path, source },
            DbFileError::Sqlite(e) => Self::Sqlite(e),
        }
    }
}

/// Which of the site's caps a refused spend would have exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CapKind {
    /// The study's own cap.
    Study,
    /// The data source's cap, over every study reading it.
    Source,
}

impl std::fmt::Display for CapKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Study => "the study's cap",
            Self::Source => "the data source's cap",
        })
    }
}

/// A data source's cap: epsilon at delta over everything read from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceCap {
    pub epsilon: Epsilon,
    pub delta: Delta,
}

/// One round's charge, as the site priced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Spend<'a> {
    pub study: &'a str,
    pub round: u64,
    /// The study-level event (what the coordinator charges too).
    pub event: SgmEvent,
    /// The data source the study reads.
    pub source: &'a str,
    /// The same release under record-level add/remove adjacency, for the source's filter.
    pub source_event: SgmEvent,
    /// The round's evaluation, when it carries one: a record-level event already, charged
    /// to the study and to the source beside the training event.
    pub evaluation: Option<SgmEvent>,
    /// The terms the round is paid under, in a canonical text form (pinned at the first
    /// spend of the study; later spends must match them).
    pub terms: &'a str,
    /// The coordinator's identity (from its certificate) that asked for the round.
    pub coordinator: &'a str,
    /// The run of the study the round belongs to (its announcement's `instance`): pinned
    /// at the study's first spend here; rounds of another run are refused.
    pub instance: &'a str,
}

/// What a recorded spend brought the study and its source to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paid {
    /// The study's epsilon at its delta, after this spend.
    pub study_epsilon: f64,
    /// The source filter's level after this spend (see `dp::filter::level`).
    pub source_level: f64,
}

/// A data source as the ledger knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceRow {
    pub name: String,
    pub delta: f64,
    pub orders: Vec<f64>,
    pub created_at: i64,
}

/// The site's own limit for one study, and how epsilon is computed against it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    pub epsilon: Epsilon,
    pub delta: Delta,
    pub accountant: AccountantKind,
}

/// One round this site paid for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpendRow {
    pub round: u64,
    pub event: SgmEvent,
    /// The coordinator's identity (from its certificate) that asked for the round.
    pub coordinator: String,
    pub recorded_at: i64,
}

/// One task this site declined.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RefusalRow {
    pub round: u64,
    pub coordinator: String,
    pub reason: String,
    pub at: i64,
}

const APPLICATION_ID: i32 = 0x6670_7273; // "fprs"

/// `MIGRATIONS[i]` takes the schema from version i to i + 1.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
CREATE TABLE spends (
    study TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    coordinator TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    PRIMARY KEY (study, round)
) STRICT;
-- Spends are append-only, also against a hand-run UPDATE or DELETE.
CREATE TRIGGER spends_no_update BEFORE UPDATE ON spends
    BEGIN SELECT RAISE(ABORT, 'spends are never changed'); END;
CREATE TRIGGER spends_no_delete BEFORE DELETE ON spends
    BEGIN SELECT RAISE(ABORT, 'spends are never deleted'); END;
CREATE TABLE refusals (
    id INTEGER PRIMARY KEY,
    study TEXT NOT NULL,
    round INTEGER NOT NULL CHECK (round >= 0),
    coordinator TEXT NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
) STRICT;
CREATE INDEX refusals_by_study ON refusals (study, round);
",
    "
-- A data source's Rényi filter: its delta and orders are fixed when it is first charged.
CREATE TABLE sources (
    name TEXT PRIMARY KEY NOT NULL,
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    orders TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;
CREATE TRIGGER sources_no_update BEFORE UPDATE ON sources
    BEGIN SELECT RAISE(ABORT, 'sources are never changed'); END;
CREATE TRIGGER sources_no_delete BEFORE DELETE ON sources
    BEGIN SELECT RAISE(ABORT, 'sources are never deleted'); END;
-- Every spend again as its source counts it (record-level add/remove adjacency).
CREATE TABLE source_events (
    source TEXT NOT NULL REFERENCES sources(name),
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES spends(study, round)
) STRICT;
CREATE INDEX source_events_by_source ON source_events (source);
CREATE TRIGGER source_events_no_update BEFORE UPDATE ON source_events
    BEGIN SELECT RAISE(ABORT, 'source events are never changed'); END;
CREATE TRIGGER source_events_no_delete BEFORE DELETE ON source_events
    BEGIN SELECT RAISE(ABORT, 'source events are never deleted'); END;
-- The terms (and source) a study was first paid under; they never change.
CREATE TABLE study_terms (
    study TEXT PRIMARY KEY NOT NULL,
    source TEXT NOT NULL REFERENCES sources(name),
    terms TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    pinned_at INTEGER NOT NULL
) STRICT;
CREATE TRIGGER study_terms_no_update BEFORE UPDATE ON study_terms
    BEGIN SELECT RAISE(ABORT, 'pinned terms are never changed'); END;
CREATE TRIGGER study_terms_no_delete BEFORE DELETE ON study_terms
    BEGIN SELECT RAISE(ABORT, 'pinned terms are never deleted'); END;
",
    "
-- The run of each study this site paid under (the announcement's instance id).
CREATE TABLE study_instances (
    study TEXT PRIMARY KEY NOT NULL,
    instance TEXT NOT NULL,
    pinned_at INTEGER NOT NULL
) STRICT;
CREATE TRIGGER study_instances_no_update BEFORE UPDATE ON study_instances
    BEGIN SELECT RAISE(ABORT, 'pinned runs are never changed'); END;
CREATE TRIGGER study_instances_no_delete BEFORE DELETE ON study_instances
    BEGIN SELECT RAISE(ABORT, 'pinned runs are never deleted'); END;
",
    "
-- A round's DP evaluation, charged beside its training spend: to the study and, again
-- under record-level adjacency, to the source.
CREATE TABLE evaluation_spends (
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES spends(study, round)
) STRICT;
CREATE TRIGGER evaluation_spends_no_update BEFORE UPDATE ON evaluation_spends
    BEGIN SELECT RAISE(ABORT, 'spends are never changed'); END;
CREATE TRIGGER evaluation_spends_no_delete BEFORE DELETE ON evaluation_spends
    BEGIN SELECT RAISE(ABORT, 'spends are never deleted'); END;
CREATE TABLE source_evaluation_events (
    source TEXT NOT NULL REFERENCES sources(name),
    study TEXT NOT NULL,
    round INTEGER NOT NULL,
    q REAL NOT NULL CHECK (q > 0 AND q <= 1),
    sigma REAL NOT NULL CHECK (sigma > 0),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    PRIMARY KEY (study, round),
    FOREIGN KEY (study, round) REFERENCES spends(study, round)
) STRICT;
CREATE INDEX source_evaluation_events_by_source ON source_evaluation_events (source);
CREATE TRIGGER source_evaluation_events_no_update BEFORE UPDATE ON source_evaluation_events
    BEGIN SELECT RAISE(ABORT, 'source events are never changed'); END;
CREATE TRIGGER source_evaluation_events_no_delete BEFORE DELETE ON source_evaluation_events
    BEGIN SELECT RAISE(ABORT, 'source events are never deleted'); END;
-- The seed of each study's held-out split, drawn once so the split survives restarts.
CREATE TABLE holdouts (
    study TEXT PRIMARY KEY NOT NULL,
    seed INTEGER NOT NULL,
    drawn_at INTEGER NOT NULL
) STRICT;
CREATE TRIGGER holdouts_no_update BEFORE UPDATE ON holdouts
    BEGIN SELECT RAISE(ABORT, 'held-out splits are never changed'); END;
CREATE TRIGGER holdouts_no_delete BEFORE DELETE ON holdouts
    BEGIN SELECT RAISE(ABORT, 'held-out splits are never deleted'); END;
",
];

const SPEC: DbSpec = DbSpec {
    app_id: APPLICATION_ID,
    kind: "fedpriv site ledger",
    migrations: MIGRATIONS,
    read_only_standins: &[
        "",
        "",
        "CREATE TEMP TABLE study_instances (
            study TEXT PRIMARY KEY NOT NULL, instance TEXT NOT NULL, pinned_at INTEGER NOT NULL
        ) STRICT;",
        "CREATE TEMP TABLE evaluation_spends (
            study TEXT NOT NULL, round INTEGER NOT NULL, q REAL NOT NULL, sigma REAL NOT NULL,
            steps INTEGER NOT NULL, PRIMARY KEY (study, round)
        ) STRICT;
        CREATE TEMP TABLE source_evaluation_events (
            source TEXT NOT NULL, study TEXT NOT NULL, round INTEGER NOT NULL, q REAL NOT NULL,
            sigma REAL NOT NULL, steps INTEGER NOT NULL, PRIMARY KEY (study, round)
        ) STRICT;
        CREATE TEMP TABLE holdouts (
            study TEXT PRIMARY KEY NOT NULL, seed INTEGER NOT NULL, drawn_at INTEGER NOT NULL
        ) STRICT;",
    ],
};

/// The site's ledger.
#[derive(Debug)]
pub struct SiteLedger {
    conn: Connection,
    path: PathBuf,
}

impl SiteLedger {
    /// Opens the ledger at `path`, creating and migrating it when the file does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path.as_ref(), Access::ReadWrite)
    }

    /// Opens an existing ledger for reading only: never creates, migrates or writes it, so
    /// it can run beside the running daemon (WAL readers do not block the writer). A missing
    /// file is [`StoreError::Io`] of kind `NotFound`; write methods fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path.as_ref(), Access::ReadOnly)
    }

    fn open_with(path: &Path, access: Access) -> Result<Self, StoreError> {
        Ok(Self {
            conn: open_db(path, &SPEC, access)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every spend for `study`, in round order: what the accountant composes.
    pub fn events(&self, study: &str) -> Result<Vec<SgmEvent>, StoreError> {
        Ok(events_in(&self.conn, study)?)
    }

    /// Every spend for `study` with who asked and when, in round order.
    pub fn spends(&self, study: &str) -> Result<Vec<SpendRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, q, sigma, steps, coordinator, recorded_at FROM spends
             WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| {
            Ok(SpendRow {
                round: r.get(0)?,
                event: sgm_event(r, 1)?,
                coordinator: r.get(4)?,
                recorded_at: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The studies this site has spent budget on, sorted.
    pub fn studies(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT study FROM spends ORDER BY study")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The studies this site has declined a task of, sorted.
    pub fn refused_studies(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT study FROM refusals ORDER BY study")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether this site already paid for `round` of `study`: a task for it is a replay.
    pub fn has_spent(&self, study: &str, round: u64) -> Result<bool, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT 1 FROM spends WHERE study = ?1 AND round = ?2")?;
        Ok(stmt.exists(params![study, round])?)
    }

    /// Records a spend without any cap or source (ledger tests only: every real spend goes
    /// through [`Self::pay`]).
    #[cfg(test)]
    pub(crate) fn record_spend(
        &mut self,
        study: &str,
        round: u64,
        event: SgmEvent,
        coordinator: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        insert_spend(&tx, study, round, event, coordinator, now)?;
        tx.commit()?;
        Ok(())
    }

    /// The seed of `study`'s held-out split: the one drawn before, or `fresh`, kept now.
    pub fn holdout_seed(&mut self, study: &str, fresh: u64, now: i64) -> Result<u64, StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO holdouts (study, seed, drawn_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (study) DO NOTHING",
            params![study, fresh as i64, now],
        )?;
        let seed: i64 =
            tx.query_row("SELECT seed FROM holdouts WHERE study = ?1", [study], |r| {
                r.get(0)
            })?;
        tx.commit()?;
        Ok(seed as u64)
    }

    /// The evaluation charges of `study` this site paid, by round.
    pub fn evaluation_spends(&self, study: &str) -> Result<Vec<(u64, SgmEvent)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, q, sigma, steps FROM evaluation_spends WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| Ok((r.get(0)?, sgm_event(r, 1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The rounds of `study` whose evaluation this site paid for.
    pub fn evaluation_rounds(&self, study: &str) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round FROM evaluation_spends WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The run (announcement instance) `study` was first paid under, if it was.
    pub fn pinned_instance(&self, study: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT instance FROM study_instances WHERE study = ?1")?
            .query_row([study], |r| r.get(0))
            .optional()?)
    }

    /// The terms and source `study` was first paid under, if it was: `(source, terms)`.
    pub fn pinned_terms(&self, study: &str) -> Result<Option<(String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT source, terms FROM study_terms WHERE study = ?1")?;
        let mut rows = stmt.query([study])?;
        match rows.next()? {
            Some(r) => Ok(Some((r.get(0)?, r.get(1)?))),
            None => Ok(None),
        }
    }

    /// Pays for one round, on disk when this returns `Ok`: call it before anything the round
    /// produces leaves the site. In one transaction: the round must not be paid yet
    /// ([`StoreError::AlreadySpent`]); the study's pinned terms and source, if any, must be
    /// `spend`'s ([`StoreError::TermsChanged`]; the first spend pins them); the study's
    /// epsilon with this event must stay within `study_cap`, and the source's filter level
    /// within `source_cap` ([`StoreError::OverCap`]). Two tasks racing for the last of a
    /// budget cannot both pass. Nothing is recorded on refusal.
    pub fn pay(
        &mut self,
        spend: &Spend<'_>,
        study_cap: &Cap,
        source_cap: &SourceCap,
        now: i64,
    ) -> Result<Paid, StoreError> {
        let tx = self.write()?;
        let (study, round) = (spend.study, spend.round);
        // Another run first: its round numbers overlap this run's, so "already paid"
        // would hide what happened.
        let run: Option<String> = tx
            .prepare_cached("SELECT instance FROM study_instances WHERE study = ?1")?
            .query_row([study], |r| r.get(0))
            .optional()?;
        if run.as_deref().is_some_and(|r| r != spend.instance) {
            return Err(StoreError::OtherInstance {
                study: study.to_string(),
            });
        }
        let spent: bool = tx
            .prepare_cached("SELECT 1 FROM spends WHERE study = ?1 AND round = ?2")?
            .exists(params![study, round])?;
        if spent {
            return Err(already(study, round));
        }
        let digest = fedpriv_common::digest::sha256_hex(spend.terms.as_bytes());
        let pinned: Option<(String, String)> = tx
            .prepare_cached("SELECT source, sha256 FROM study_terms WHERE study = ?1")?
            .query_row([study], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((source, sha)) = &pinned {
            let what = if source != spend.source {
                Some("data source")
            } else if *sha != digest {
                Some("terms")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(StoreError::TermsChanged {
                    study: study.to_string(),
                    what,
                });
            }
        }
        // The source's filter: created at its first charge with today's orders and the
        // configured delta, which are then fixed.
        let stored: Option<(f64, String)> = tx
            .prepare_cached("SELECT delta, orders FROM sources WHERE name = ?1")?
            .query_row([spend.source], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let orders: Vec<f64> = match stored {
            Some((delta, orders)) => {
                if delta.to_bits() != source_cap.delta.get().to_bits() {
                    return Err(StoreError::SourceDeltaChanged {
                        source_name: spend.source.to_string(),
                        stored: delta,
                        configured: source_cap.delta.get(),
                    });
                }
                serde_json::from_str(&orders).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        1,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?
            }
            None => {
                let orders = filter::DEFAULT_ORDERS.to_vec();
                tx.execute(
                    "INSERT INTO sources (name, delta, orders, created_at) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        spend.source,
                        source_cap.delta.get(),
                        serde_json::to_string(&orders).unwrap_or_default(),
                        now
                    ],
                )?;
                orders
            }
        };
        // Spends recorded before sources existed (schema 1) count against the source now.
        tx.execute(
            "INSERT INTO source_events (source, study, round, q, sigma, steps)
             SELECT ?1, study, round, q, sigma, steps FROM spends
             WHERE study = ?2 AND round NOT IN (SELECT round FROM source_events WHERE study = ?2)",
            params![spend.source, study],
        )?;

        let mut all = events_in(&tx, study)?;
        all.push(spend.event);
        all.extend(spend.evaluation);
        let study_epsilon = match accountant::epsilon(study_cap.accountant, &all, study_cap.delta) {
            Ok(e) => e,
            Err(AccountError::Unbounded) => f64::INFINITY,
            Err(e) => return Err(e.into()),
        };
        // NaN cannot come from the accountant, but if it did it must not pass.
        if study_epsilon.is_nan() || study_epsilon > study_cap.epsilon.get() {
            return Err(StoreError::OverCap {
                study: study.to_string(),
                round,
                which: CapKind::Study,
                epsilon_after: study_epsilon,
                cap: study_cap.epsilon.get(),
            });
        }
        let mut source_events = source_events_in(&tx, spend.source)?;
        source_events.push(spend.source_event);
        source_events.extend(spend.evaluation);
        let (source_level, _) = filter::level(&source_events, &orders, source_cap.delta.get())?;
        if source_level.is_nan() || source_level > source_cap.epsilon.get() {
            return Err(StoreError::OverCap {
                study: study.to_string(),
                round,
                which: CapKind::Source,
                epsilon_after: source_level,
                cap: source_cap.epsilon.get(),
            });
        }
        insert_spend(&tx, study, round, spend.event, spend.coordinator, now)?;
        let e = spend.source_event;
        tx.execute(
            "INSERT INTO source_events (source, study, round, q, sigma, steps)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                spend.source,
                study,
                round,
                e.q.get(),
                e.sigma.get(),
                e.steps
            ],
        )?;
        if let Some(e) = spend.evaluation {
            let (q, sigma, steps) = (e.q.get(), e.sigma.get(), e.steps);
            tx.execute(
                "INSERT INTO evaluation_spends (study, round, q, sigma, steps)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![study, round, q, sigma, steps],
            )?;
            tx.execute(
                "INSERT INTO source_evaluation_events (source, study, round, q, sigma, steps)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![spend.source, study, round, q, sigma, steps],
            )?;
        }
        if run.is_none() {
            // The first spend pins the run (spends from before runs were pinned count as
            // this run's).
            tx.execute(
                "INSERT INTO study_instances (study, instance, pinned_at) VALUES (?1, ?2, ?3)",
                params![study, spend.instance, now],
            )?;
        }
        if pinned.is_none() {
            tx.execute(
                "INSERT INTO study_terms (study, source, terms, sha256, pinned_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![study, spend.source, spend.terms, digest, now],
            )?;
        }
        tx.commit()?;
        Ok(Paid {
            study_epsilon,
            source_level,
        })
    }

    /// The data sources that have been charged, by name.
    pub fn sources(&self) -> Result<Vec<SourceRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, delta, orders, created_at FROM sources ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            let orders: String = r.get(2)?;
            Ok(SourceRow {
                name: r.get(0)?,
                delta: r.get(1)?,
                orders: serde_json::from_str(&orders).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
                created_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every event charged to `source`, in the order they were recorded.
    pub fn source_events(&self, source: &str) -> Result<Vec<SgmEvent>, StoreError> {
        Ok(source_events_in(&self.conn, source)?)
    }

    /// The studies that have read `source`, sorted.
    pub fn source_studies(&self, source: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT DISTINCT study FROM source_events WHERE source = ?1 ORDER BY study",
        )?;
        let rows = stmt.query_map([source], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The filter level of `source` (see `dp::filter::level`): 0 if never charged.
    pub fn source_level(&self, source: &str) -> Result<f64, StoreError> {
        let Some(row) = self.sources()?.into_iter().find(|s| s.name == source) else {
            return Ok(0.0);
        };
        let events = self.source_events(source)?;
        if events.is_empty() {
            return Ok(0.0);
        }
        Ok(filter::level(&events, &row.orders, row.delta)?.0)
    }

    /// Records that this site declined `round` of `study`, and why.
    pub fn record_refusal(
        &mut self,
        study: &str,
        round: u64,
        coordinator: &str,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO refusals (study, round, coordinator, reason, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![study, round, coordinator, reason, now],
        )?;
        Ok(())
    }

    /// The tasks of `study` this site declined, oldest first.
    pub fn refusals(&self, study: &str) -> Result<Vec<RefusalRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, coordinator, reason, at FROM refusals WHERE study = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([study], |r| {
            Ok(RefusalRow {
                round: r.get(0)?,
                coordinator: r.get(1)?,
                reason: r.get(2)?,
                at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Epsilon this site has spent on `study` at `delta`, from every recorded spend.
    pub fn epsilon(
        &self,
        study: &str,
        delta: Delta,
        kind: AccountantKind,
    ) -> Result<f64, StoreError> {
        Ok(accountant::epsilon(kind, &self.events(study)?, delta)?)
    }

    /// A write transaction that takes the lock up front, so it never fails half-way with
    /// "busy" when a reader holds the file.
    fn write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

fn source_events_in(conn: &Connection, source: &str) -> rusqlite::Result<Vec<SgmEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT q, sigma, steps FROM source_events WHERE source = ?1
         UNION ALL
         SELECT q, sigma, steps FROM source_evaluation_events WHERE source = ?1",
    )?;
    let rows = stmt.query_map([source], |r| sgm_event(r, 0))?;
    rows.collect()
}

fn events_in(conn: &Connection, study: &str) -> rusqlite::Result<Vec<SgmEvent>> {
    let mut stmt = conn.prepare_cached(
        "SELECT q, sigma, steps FROM spends WHERE study = ?1
         UNION ALL
         SELECT q, sigma, steps FROM evaluation_spends WHERE study = ?1",
    )?;
    let rows = stmt.query_map([study], |r| sgm_event(r, 0))?;
    rows.collect()
}

fn insert_spend(
    tx: &rusqlite::Transaction<'_>,
    study: &str,
    round: u64,
    event: SgmEvent,
    coordinator: &str,
    now: i64,
) -> Result<(), StoreError> {
    let res = tx.execute(
        "INSERT INTO spends (study, round, q, sigma, steps, coordinator, recorded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            study,
            round,
            event.q.get(),
            event.sigma.get(),
            event.steps,
            coordinator,
            now
        ],
    );
    match res {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(f, _))
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            Err(already(study, round))
        }
        Err(e) => Err(e.into()),
    }
}

fn already(study: &str, round: u64) -> StoreError {
    StoreError::AlreadySpent {
        study: study.to_string(),
        round,
    }
}

/// Reads (q, sigma, steps) from columns `at`, `at + 1`, `at + 2`, validated again: a stored
/// value outside its range means the file was edited or damaged.
fn sgm_event(r: &Row<'_>, at: usize) -> rusqlite::Result<SgmEvent> {
    SgmEvent::new(r.get(at)?, r.get(at + 1)?, r.get(at + 2)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Real, Box::new(e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(q: f64, sigma: f64, steps: u64) -> SgmEvent {
        SgmEvent::new(q, sigma, steps).expect("valid event")
    }

    fn delta() -> Delta {
        Delta::new(1e-5).expect("delta")
    }

    /// A source cap that never binds.
    fn open_source() -> SourceCap {
        SourceCap {
            epsilon: Epsilon::new(1e9).expect("eps"),
            delta: delta(),
        }
    }

    /// Pays `event` for `round` of `study` from source "wards" under terms "t".
    fn pay(
        ledger: &mut SiteLedger,
        study: &str,
        round: u64,
        event: SgmEvent,
        cap: &Cap,
        now: i64,
    ) -> Result<Paid, StoreError> {
        let spend = Spend {
            study,
            round,
            event,
            source: "wards",
            source_event: event,
            evaluation: None,
            terms: "t",
            coordinator: "coord",
            instance: "run-1",
        };
        ledger.pay(&spend, cap, &open_source(), now)
    }

    fn fresh() -> (tempfile::TempDir, PathBuf, SiteLedger) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site-ledger.db");
        let ledger = SiteLedger::open(&path).expect("open fresh");
        (dir, path, ledger)
    }

    fn file_problem(e: StoreError) -> FileProblem {
        match e {
            StoreError::File { problem, .. } => problem,
            other => panic!("expected a file problem, got {other:?}"),
        }
    }

    #[test]
    fn spends_survive_reopen_and_feed_the_accountant() {
        let (_dir, path, mut ledger) = fresh();
        assert_eq!(
            ledger
                .epsilon("s1", delta(), AccountantKind::Rdp)
                .expect("eps"),
            0.0
        );
        // Recorded out of round order; read back in round order.
        ledger
            .record_spend("s1", 2, ev(0.02, 1.1, 40), "coord", 30)
            .expect("spend");
        ledger
            .record_spend("s1", 0, ev(0.01, 1.0, 50), "coord", 10)
            .expect("spend");
        ledger
            .record_spend("s2", 0, ev(1.0, 5.0, 1), "coord", 11)
            .expect("spend");
        drop(ledger);

        let ledger = SiteLedger::open(&path).expect("reopen");
        let events = ledger.events("s1").expect("events");
        assert_eq!(events, vec![ev(0.01, 1.0, 50), ev(0.02, 1.1, 40)]);
        let spends = ledger.spends("s1").expect("spends");
        assert_eq!(spends[1].round, 2);
        assert_eq!(
            (spends[1].coordinator.as_str(), spends[1].recorded_at),
            ("coord", 30)
        );
        assert_eq!(ledger.studies().expect("studies"), vec!["s1", "s2"]);
        assert!(ledger.has_spent("s1", 2).expect("query"));
        assert!(!ledger.has_spent("s1", 1).expect("query"));
        for kind in [AccountantKind::Rdp, AccountantKind::Pld] {
            let eps = ledger.epsilon("s1", delta(), kind).expect("eps");
            let want = accountant::epsilon(kind, &events, delta()).expect("eps");
            assert_eq!(eps, want);
            assert!(eps > 0.0);
        }
    }

    #[test]
    fn spend_is_visible_without_a_clean_close() {
        let (_dir, path, mut ledger) = fresh();
        ledger
            .record_spend("s1", 0, ev(0.1, 1.0, 3), "coord", 1)
            .expect("spend");
        // As after a crash: no close, no checkpoint; the commit lives in the WAL.
        std::mem::forget(ledger);
        let ledger = SiteLedger::open(&path).expect("reopen");
        assert_eq!(ledger.events("s1").expect("events"), vec![ev(0.1, 1.0, 3)]);
        assert!(matches!(
            ledger_after_crash_replay(&path),
            Err(StoreError::AlreadySpent { round: 0, .. })
        ));
    }

    fn ledger_after_crash_replay(path: &Path) -> Result<(), StoreError> {
        SiteLedger::open(path)?.record_spend("s1", 0, ev(0.1, 1.0, 3), "coord", 2)
    }

    #[test]
    fn durability_settings_are_on() {
        let (_dir, _path, ledger) = fresh();
        let mode: String = ledger
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("pragma");
        let sync: i64 = ledger
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .expect("pragma");
        let fk: i64 = ledger
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("pragma");
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1));
    }

    #[test]
    fn a_round_is_paid_for_once() {
        let (_dir, path, mut ledger) = fresh();
        ledger
            .record_spend("s1", 4, ev(0.1, 1.0, 10), "coord", 1)
            .expect("spend");
        let again = ledger.record_spend("s1", 4, ev(0.5, 0.6, 99), "other", 2);
        assert!(
            matches!(&again, Err(StoreError::AlreadySpent { study, round: 4 }) if study == "s1"),
            "{again:?}"
        );
        let cap = Cap {
            epsilon: Epsilon::new(100.0).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        assert!(matches!(
            pay(&mut ledger, "s1", 4, ev(0.1, 1.0, 10), &cap, 3),
            Err(StoreError::AlreadySpent { .. })
        ));
        // Neither an API call nor a hand-run statement changes the first spend.
        assert!(ledger
            .conn
            .execute("UPDATE spends SET steps = 0", [])
            .is_err());
        assert!(ledger.conn.execute("DELETE FROM spends", []).is_err());
        drop(ledger);
        let ledger = SiteLedger::open(&path).expect("reopen");
        let spends = ledger.spends("s1").expect("spends");
        assert_eq!(spends.len(), 1);
        assert_eq!(spends[0].event, ev(0.1, 1.0, 10));
        assert_eq!(spends[0].coordinator, "coord");
    }

    #[test]
    fn the_cap_is_checked_with_the_spend() {
        let (_dir, _path, mut ledger) = fresh();
        let step = ev(0.05, 1.0, 100);
        let one = accountant::epsilon(AccountantKind::Rdp, &[step], delta()).expect("eps");
        let two = accountant::epsilon(AccountantKind::Rdp, &[step, step], delta()).expect("eps");
        assert!(two > one);
        let cap = Cap {
            epsilon: Epsilon::new(0.5 * (one + two)).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let after = pay(&mut ledger, "s1", 0, step, &cap, 1).expect("first fits");
        assert_eq!(after.study_epsilon, one);
        let over = pay(&mut ledger, "s1", 1, step, &cap, 2);
        match over {
            Err(StoreError::OverCap {
                epsilon_after,
                round: 1,
                which: CapKind::Study,
                ..
            }) => assert_eq!(epsilon_after, two),
            other => panic!("expected OverCap, got {other:?}"),
        }
        assert_eq!(ledger.events("s1").expect("events"), vec![step]);
        // Another study has its own budget.
        pay(&mut ledger, "s2", 1, step, &cap, 3).expect("other study");
        // A hopeless spend is over any cap, whether or not its bound is finite.
        let tiny = Cap {
            epsilon: Epsilon::new(1e6).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let wild = ev(1.0, 0.05, 1_000_000);
        assert!(matches!(
            pay(&mut ledger, "s3", 0, wild, &tiny, 4),
            Err(StoreError::OverCap { .. })
        ));
        assert!(ledger.events("s3").expect("events").is_empty());
    }

    #[test]
    fn refusals_are_kept() {
        let (_dir, path, mut ledger) = fresh();
        ledger
            .record_refusal("s1", 3, "coord", "over the site cap", 7)
            .expect("refusal");
        ledger
            .record_refusal("s1", 3, "coord", "replayed round", 8)
            .expect("refusal");
        drop(ledger);
        let ledger = SiteLedger::open(&path).expect("reopen");
        let r = ledger.refusals("s1").expect("refusals");
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            RefusalRow {
                round: 3,
                coordinator: "coord".into(),
                reason: "over the site cap".into(),
                at: 7
            }
        );
        assert!(ledger.events("s1").expect("events").is_empty());
    }

    #[test]
    fn bad_files_are_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site-ledger.db");
        std::fs::write(
            &path,
            b"this is not a database, just some text\n".repeat(100),
        )
        .expect("write");
        let err = SiteLedger::open(&path).expect_err("garbage");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(file_problem(err), FileProblem::NotSqlite);

        std::fs::write(&path, b"").expect("write");
        assert_eq!(
            file_problem(SiteLedger::open(&path).expect_err("empty")),
            FileProblem::Empty
        );

        std::fs::remove_file(&path).expect("remove");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch("PRAGMA application_id = 1718645347; CREATE TABLE t (x);")
                .expect("sql");
        }
        // A coordinator database is not a site ledger.
        assert!(matches!(
            file_problem(SiteLedger::open(&path).expect_err("coordinator file")),
            FileProblem::NotOurs {
                found: 0x6670_7263,
                ..
            }
        ));
    }

    #[test]
    fn truncated_or_newer_ledger_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("site-ledger.db");
        {
            let mut ledger = SiteLedger::open(&path).expect("open");
            for round in 0..500u64 {
                let study = format!("study-with-a-longish-name-{}", round % 7);
                ledger
                    .record_spend(&study, round, ev(0.01, 1.0, 10), "coord", 1)
                    .expect("spend");
            }
        }
        let len = std::fs::metadata(&path).expect("meta").len();
        assert!(len > 8 * 4096, "{len}");
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).expect("copy");

        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(len / 3).expect("truncate");
        drop(file);
        assert!(matches!(
            file_problem(SiteLedger::open(&path).expect_err("truncated")),
            FileProblem::Corrupt(_)
        ));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), len / 3);

        {
            let conn = Connection::open(&copy).expect("raw open");
            conn.execute("UPDATE schema_version SET version = 7", [])
                .expect("bump");
        }
        assert_eq!(
            file_problem(SiteLedger::open(&copy).expect_err("newer")),
            FileProblem::NewerSchema {
                found: 7,
                supported: MIGRATIONS.len() as i64
            }
        );
    }

    #[test]
    fn a_source_cap_binds_across_studies_whatever_their_ids() {
        let (_dir, path, mut ledger) = fresh();
        let study_cap = Cap {
            epsilon: Epsilon::new(1e9).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let release = ev(1.0, 2.0, 1);
        let source = SourceCap {
            epsilon: Epsilon::new(6.0).expect("eps"),
            delta: delta(),
        };
        // Each round is a new study id: the study caps never bind, the source's does.
        let mut paid = 0u64;
        let mut last_level = 0.0;
        loop {
            let id = format!("study-{paid}");
            let spend = Spend {
                study: &id,
                round: 1,
                event: release,
                source: "wards",
                source_event: release,
                evaluation: None,
                terms: "t",
                coordinator: "coord",
                instance: "run-1",
            };
            match ledger.pay(&spend, &study_cap, &source, 1) {
                Ok(p) => {
                    assert!(p.source_level > last_level && p.source_level <= 6.0);
                    last_level = p.source_level;
                    paid += 1;
                }
                Err(StoreError::OverCap {
                    which: CapKind::Source,
                    epsilon_after,
                    ..
                }) => {
                    assert!(epsilon_after > 6.0);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
            assert!(paid < 1000, "the source cap never bound");
        }
        assert!(paid >= 2);
        // The filter's own reading agrees, after a reopen; another source is untouched.
        drop(ledger);
        let mut ledger = SiteLedger::open(&path).expect("reopen");
        assert_eq!(
            ledger.source_events("wards").expect("events").len() as u64,
            paid
        );
        let level = ledger.source_level("wards").expect("level");
        assert!((level - last_level).abs() < 1e-12);
        let spend = Spend {
            study: "other",
            round: 1,
            event: release,
            source: "icu",
            source_event: release,
            evaluation: None,
            terms: "t",
            coordinator: "coord",
            instance: "run-1",
        };
        ledger
            .pay(&spend, &study_cap, &source, 2)
            .expect("another source");
        // A source's delta is fixed once charged.
        let moved = SourceCap {
            epsilon: Epsilon::new(60.0).expect("eps"),
            delta: Delta::new(1e-6).expect("delta"),
        };
        let spend = Spend {
            study: "late",
            ..spend
        };
        assert!(matches!(
            ledger.pay(&spend, &study_cap, &moved, 3),
            Err(StoreError::SourceDeltaChanged { .. })
        ));
        assert!(ledger
            .conn
            .execute("DELETE FROM source_events", [])
            .is_err());
        assert!(ledger
            .conn
            .execute("UPDATE sources SET delta = 0.5", [])
            .is_err());
    }

    #[test]
    fn a_study_is_paid_under_one_run_only() {
        let (_dir, _path, mut ledger) = fresh();
        let cap = Cap {
            epsilon: Epsilon::new(1e9).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let step = ev(0.1, 1.0, 10);
        let first = Spend {
            study: "s1",
            round: 1,
            event: step,
            source: "wards",
            source_event: step,
            evaluation: None,
            terms: "terms A",
            coordinator: "coord",
            instance: "run-1",
        };
        ledger.pay(&first, &cap, &open_source(), 1).expect("first");
        // Another run of the same study id (a coordinator with fresh state starts its
        // rounds again): refused as such, for any round, and nothing is recorded.
        for round in [1, 2, 7] {
            let other = Spend {
                round,
                instance: "run-2",
                ..first.clone()
            };
            assert!(matches!(
                ledger.pay(&other, &cap, &open_source(), 2),
                Err(StoreError::OtherInstance { .. })
            ));
        }
        assert_eq!(ledger.spends("s1").expect("spends").len(), 1);
        let next = Spend {
            round: 2,
            ..first.clone()
        };
        ledger
            .pay(&next, &cap, &open_source(), 3)
            .expect("same run");
        assert!(ledger
            .conn
            .execute("UPDATE study_instances SET instance = 'run-2'", [])
            .is_err());
    }

    #[test]
    fn terms_and_source_are_pinned_by_the_first_spend() {
        let (_dir, _path, mut ledger) = fresh();
        let cap = Cap {
            epsilon: Epsilon::new(1e9).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let step = ev(0.1, 1.0, 10);
        let first = Spend {
            study: "s1",
            round: 1,
            event: step,
            source: "wards",
            source_event: step,
            evaluation: None,
            terms: "terms A",
            coordinator: "coord",
            instance: "run-1",
        };
        assert_eq!(ledger.pinned_terms("s1").expect("query"), None);
        ledger.pay(&first, &cap, &open_source(), 1).expect("first");
        assert_eq!(
            ledger.pinned_terms("s1").expect("query"),
            Some(("wards".to_string(), "terms A".to_string()))
        );
        let changed = Spend {
            round: 2,
            terms: "terms B",
            ..first.clone()
        };
        assert!(matches!(
            ledger.pay(&changed, &cap, &open_source(), 2),
            Err(StoreError::TermsChanged { what: "terms", .. })
        ));
        let moved = Spend {
            round: 2,
            source: "icu",
            ..first.clone()
        };
        assert!(matches!(
            ledger.pay(&moved, &cap, &open_source(), 2),
            Err(StoreError::TermsChanged {
                what: "data source",
                ..
            })
        ));
        let same = Spend { round: 2, ..first };
        ledger
            .pay(&same, &cap, &open_source(), 2)
            .expect("same terms");
        assert_eq!(ledger.events("s1").expect("events").len(), 2);
    }

    #[test]
    fn spends_from_before_sources_count_against_the_source_at_the_next_payment() {
        let (_dir, _path, mut ledger) = fresh();
        let cap = Cap {
            epsilon: Epsilon::new(1e9).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        // A spend as schema 1 recorded it: no source event.
        ledger
            .record_spend("old", 1, ev(1.0, 1.0, 1), "coord", 1)
            .expect("legacy spend");
        pay(&mut ledger, "old", 2, ev(1.0, 1.0, 1), &cap, 2).expect("pay");
        assert_eq!(ledger.source_events("wards").expect("events").len(), 2);
    }
}
