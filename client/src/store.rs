//! The site's own privacy ledger: every spend this site agreed to, per study and round, and
//! every task it refused, in one SQLite file in the site's state directory.
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
use fedpriv_common::dp::{Delta, Epsilon, SgmEvent};
use fedpriv_common::state_db::{open_db, Access, DbFileError, DbSpec};
use rusqlite::{params, Connection, Row, TransactionBehavior};
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
    /// This site already paid for this round of this study: decline the task (a replay).
    #[error("round {round} of study {study:?} was already paid for; a round is never run twice")]
    AlreadySpent { study: String, round: u64 },
    /// The task would take the study past this site's own cap: decline it.
    #[error(
        "round {round} of study {study:?} would bring this site's epsilon to {epsilon_after} \
         (cap {cap})"
    )]
    OverCap {
        study: String,
        round: u64,
        /// Infinite when the accountant finds no finite bound.
        epsilon_after: f64,
        cap: f64,
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
const MIGRATIONS: &[&str] = &["
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
"];

const SPEC: DbSpec = DbSpec {
    app_id: APPLICATION_ID,
    kind: "fedpriv site ledger",
    migrations: MIGRATIONS,
    read_only_standins: &[""],
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

    /// Records that this site pays `event` for `round` of `study`; on disk when this returns
    /// `Ok`, so call it before the update leaves the site. [`StoreError::AlreadySpent`] if
    /// the round was paid for already (the first spend stays as it was).
    ///
    /// Checks no cap: prefer [`Self::record_spend_within_cap`], which checks and records in
    /// one transaction.
    pub fn record_spend(
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

    /// Records the spend only if the study's epsilon, with it, stays within `cap`; the check
    /// and the write are one transaction, so two tasks racing for the last of the budget
    /// cannot both pass. Returns the study's epsilon after this spend. Refused with
    /// [`StoreError::AlreadySpent`] or [`StoreError::OverCap`], recording nothing.
    pub fn record_spend_within_cap(
        &mut self,
        study: &str,
        round: u64,
        event: SgmEvent,
        coordinator: &str,
        cap: &Cap,
        now: i64,
    ) -> Result<f64, StoreError> {
        let tx = self.write()?;
        let spent: bool = tx
            .prepare_cached("SELECT 1 FROM spends WHERE study = ?1 AND round = ?2")?
            .exists(params![study, round])?;
        if spent {
            return Err(already(study, round));
        }
        let mut all = events_in(&tx, study)?;
        all.push(event);
        let eps = match accountant::epsilon(cap.accountant, &all, cap.delta) {
            Ok(e) => e,
            Err(AccountError::Unbounded) => f64::INFINITY,
            Err(e) => return Err(e.into()),
        };
        // NaN cannot come from the accountant, but if it did it must not pass.
        if eps.is_nan() || eps > cap.epsilon.get() {
            return Err(StoreError::OverCap {
                study: study.to_string(),
                round,
                epsilon_after: eps,
                cap: cap.epsilon.get(),
            });
        }
        insert_spend(&tx, study, round, event, coordinator, now)?;
        tx.commit()?;
        Ok(eps)
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

fn events_in(conn: &Connection, study: &str) -> rusqlite::Result<Vec<SgmEvent>> {
    let mut stmt =
        conn.prepare_cached("SELECT q, sigma, steps FROM spends WHERE study = ?1 ORDER BY round")?;
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
            ledger.record_spend_within_cap("s1", 4, ev(0.1, 1.0, 10), "coord", &cap, 3),
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
        let after = ledger
            .record_spend_within_cap("s1", 0, step, "coord", &cap, 1)
            .expect("first fits");
        assert_eq!(after, one);
        let over = ledger.record_spend_within_cap("s1", 1, step, "coord", &cap, 2);
        match over {
            Err(StoreError::OverCap {
                epsilon_after,
                round: 1,
                ..
            }) => assert_eq!(epsilon_after, two),
            other => panic!("expected OverCap, got {other:?}"),
        }
        assert_eq!(ledger.events("s1").expect("events"), vec![step]);
        // Another study has its own budget.
        ledger
            .record_spend_within_cap("s2", 1, step, "coord", &cap, 3)
            .expect("other study");
        // A hopeless spend is over any cap, whether or not its bound is finite.
        let tiny = Cap {
            epsilon: Epsilon::new(1e6).expect("eps"),
            delta: delta(),
            accountant: AccountantKind::Rdp,
        };
        let wild = ev(1.0, 0.05, 1_000_000);
        assert!(matches!(
            ledger.record_spend_within_cap("s3", 0, wild, "coord", &tiny, 4),
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
                supported: 1
            }
        );
    }
}
