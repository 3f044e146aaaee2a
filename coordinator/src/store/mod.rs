//! The coordinator's durable state: studies, enrolments, rounds, the privacy-budget ledger,
//! model versions and their lineage, in one SQLite file in the state directory.
//!
//! The ledger stores mechanism parameters (q, sigma, steps), never epsilons as the source of
//! truth: `epsilon_after` is kept beside each entry for display only, and any budget decision
//! recomputes epsilon from the events. Spends are append-only: never overwritten, never
//! refunded, also when the round they paid for is later aborted.
//!
//! Durability: WAL with `synchronous=FULL`, so a method that returned `Ok` has its write on
//! disk (the spend that pays for a task is committed before the task leaves the process).
//! A file that is not ours, comes from a newer fedpriv or fails its integrity check is
//! refused with the path and a recovery hint; the store never resets or rebuilds it.
//!
//! Timestamps are unix seconds passed in by the caller; the store never reads the clock.
//!
//! Layout: `schema` (the migrations and what a read-only open stands in for), `studies`
//! (studies, enrolments, record counts), `ledger` (spends), `models` (rounds, model
//! versions, lineage, prunes); this file holds the types and the connection.

use std::path::{Path, PathBuf};

use fedpriv_common::dp::SgmEvent;
use fedpriv_common::state_db::{open_db, Access, DbFileError};
use rusqlite::{Connection, Row, TransactionBehavior};
use serde::Serialize;

pub use audits::PrivacyAuditRow;
pub use fedpriv_common::state_db::FileProblem;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file cannot be used as this store. The operator's to resolve (the message says
    /// how); nothing was reset.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: FileProblem },
    /// Creating or inspecting the file failed at the file-system level.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A write would overwrite or contradict recorded state (a duplicate spend, a spend on a
    /// finished round or study). A bug in the caller: spends are never overwritten.
    #[error("refused: {0}")]
    Conflict(String),
    /// The study, site or round named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An argument the store cannot record (empty spend, non-finite epsilon, bad digest).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Any other SQLite failure.
    #[error("state database: {0}")]
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

/// Lifecycle of a study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StudyStatus {
    /// Rounds may run.
    Active,
    /// Ran to its end (rounds done or budget spent).
    Completed,
    /// Stopped early (operator, too few eligible sites); `end_reason` says why.
    Stopped,
}

impl StudyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Stopped => "stopped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Completed, Self::Stopped]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// State of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundStatus {
    /// Budget spent, tasks may have left; no model yet.
    Reserved,
    /// A model version came out of it.
    Completed,
    /// Ended without a model; its spends stand.
    Aborted,
}

impl RoundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Completed => "completed",
            Self::Aborted => "aborted",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Reserved, Self::Completed, Self::Aborted]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyRow {
    pub id: String,
    pub config_toml: String,
    pub created_at: i64,
    pub status: StudyStatus,
    pub end_reason: Option<String>,
}

/// One site's spend in one round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerRow {
    pub site: String,
    pub round: u64,
    pub event: SgmEvent,
    /// The site's cumulative epsilon after this round as computed when recorded; display
    /// only (the events are the source of truth).
    pub epsilon_after: f64,
    pub recorded_at: i64,
}

/// What one site pays for one round: the training event, the evaluation's when the round
/// carries one, and its epsilon after both (display only).
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub site: String,
    pub event: SgmEvent,
    pub evaluation: Option<SgmEvent>,
    pub epsilon_after: f64,
}

/// A round's DP evaluation as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluationRow {
    pub round: u64,
    /// The model measured: the one after this round.
    pub model_round: u64,
    pub sites: Vec<String>,
    /// The sum of the sites' noised vectors.
    pub sum: Vec<f64>,
    pub summary: fedpriv_common::evaluation::EvalSummary,
    pub recorded_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    pub round: u64,
    pub status: RoundStatus,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub reason: Option<String>,
}

/// One model version (the checkpoint a completed round produced).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelVersionRow {
    pub round: u64,
    /// Path of the checkpoint, relative to the state directory.
    pub file: String,
    pub sha256: String,
    pub created_at: i64,
    /// Set once the retention policy removed the file.
    pub pruned: Option<Pruned>,
}

/// When a model version's file was removed, and the audit record that announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pruned {
    pub at: i64,
    pub audit_seq: u64,
}

mod audits;
mod evaluations;
mod ledger;
mod models;
mod schema;
mod studies;

/// The coordinator's state database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens the store at `path`, creating and migrating it when the file does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path.as_ref(), Access::ReadWrite)
    }

    /// Opens an existing store for reading only: never creates, migrates or writes it, so
    /// it can run beside a running coordinator (WAL readers do not block the writer). A
    /// missing file is [`StoreError::Io`] of kind `NotFound`; write methods fail.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path.as_ref(), Access::ReadOnly)
    }

    fn open_with(path: &Path, access: Access) -> Result<Self, StoreError> {
        Ok(Self {
            conn: open_db(path, &schema::SPEC, access)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write transaction that takes the lock up front, so it never fails half-way with
    /// "busy" when a reader (`ledger show`) holds the file.
    pub(super) fn write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

pub(super) fn study_row(r: &Row<'_>) -> rusqlite::Result<StudyRow> {
    let status: String = r.get(3)?;
    Ok(StudyRow {
        id: r.get(0)?,
        config_toml: r.get(1)?,
        created_at: r.get(2)?,
        status: StudyStatus::parse(&status).ok_or_else(|| bad_text(3, &status))?,
        end_reason: r.get(4)?,
    })
}

/// Reads (q, sigma, steps) from columns `at`, `at + 1`, `at + 2`, validated again: a stored
/// value outside its range means the file was edited or damaged.
pub(super) fn sgm_event(r: &Row<'_>, at: usize) -> rusqlite::Result<SgmEvent> {
    SgmEvent::new(r.get(at)?, r.get(at + 1)?, r.get(at + 2)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Real, Box::new(e))
    })
}

pub(super) fn bad_text(col: usize, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unexpected value {value:?}").into(),
    )
}

/// Turns a uniqueness or foreign-key violation into a `Conflict` with `msg`.
pub(super) fn constraint(e: rusqlite::Error, msg: impl FnOnce() -> String) -> StoreError {
    use rusqlite::ffi;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.extended_code,
                ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    | ffi::SQLITE_CONSTRAINT_UNIQUE
                    | ffi::SQLITE_CONSTRAINT_FOREIGNKEY
            ) =>
        {
            StoreError::Conflict(msg())
        }
        _ => StoreError::Sqlite(e),
    }
}

#[cfg(test)]
mod tests;
