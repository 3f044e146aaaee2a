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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedpriv_common::dp::SgmEvent;
use fedpriv_common::state_db::{open_db, Access, DbFileError, DbSpec};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::Serialize;

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

const APPLICATION_ID: i32 = 0x6670_7263; // "fprc"

/// `MIGRATIONS[i]` takes the schema from version i to i + 1.
const MIGRATIONS: &[&str] = &[
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
];

/// `READ_ONLY_STANDINS[i]`: empty TEMP tables standing in for what `MIGRATIONS[i]` adds,
/// created by a read-only open of a file whose schema predates that migration, so the read
/// queries work on a file an older fedpriv wrote without migrating it (a read-only open
/// never writes the file; the running coordinator migrates it when it next starts).
const READ_ONLY_STANDINS: &[&str] = &[
    "",
    "CREATE TEMP TABLE model_prunes (
        study TEXT NOT NULL, round INTEGER NOT NULL, pruned_at INTEGER NOT NULL,
        audit_seq INTEGER NOT NULL, PRIMARY KEY (study, round)
    ) STRICT;",
];

const SPEC: DbSpec = DbSpec {
    app_id: APPLICATION_ID,
    kind: "fedpriv coordinator database",
    migrations: MIGRATIONS,
    read_only_standins: READ_ONLY_STANDINS,
};

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
            conn: open_db(path, &SPEC, access)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates an active study with its enrolled sites. Refused if the id exists.
    pub fn create_study(
        &mut self,
        id: &str,
        config_toml: &str,
        enrolled: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO studies (id, config_toml, created_at, status) VALUES (?1, ?2, ?3, ?4)",
            params![id, config_toml, now, StudyStatus::Active.as_str()],
        )
        .map_err(|e| constraint(e, || format!("study {id:?} already exists")))?;
        for site in enrolled {
            tx.execute(
                "INSERT INTO enrolments (study, site) VALUES (?1, ?2)",
                params![id, site],
            )
            .map_err(|e| constraint(e, || format!("site {site:?} is listed twice")))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Replaces a study's stored config (an operator's runtime change, already checked by
    /// [`fedpriv_common::admin::apply_changes`]).
    pub fn set_study_config(&mut self, id: &str, config_toml: &str) -> Result<(), StoreError> {
        let tx = self.write()?;
        let n = tx.execute(
            "UPDATE studies SET config_toml = ?2 WHERE id = ?1",
            params![id, config_toml],
        )?;
        if n == 0 {
            return Err(StoreError::Invalid(format!("no study {id:?}")));
        }
        tx.commit()?;
        Ok(())
    }

    pub fn study(&self, id: &str) -> Result<Option<StudyRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, config_toml, created_at, status, end_reason FROM studies WHERE id = ?1",
        )?;
        Ok(stmt.query_row([id], study_row).optional()?)
    }

    /// All studies, oldest first.
    pub fn studies(&self) -> Result<Vec<StudyRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, config_toml, created_at, status, end_reason FROM studies
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], study_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sites enrolled in `study`, sorted.
    pub fn enrolments(&self, study: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT site FROM enrolments WHERE study = ?1 ORDER BY site")?;
        let rows = stmt.query_map([study], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Sets a study's status and its end reason (`None` clears it).
    pub fn set_study_status(
        &mut self,
        id: &str,
        status: StudyStatus,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let n = self.conn.execute(
            "UPDATE studies SET status = ?2, end_reason = ?3 WHERE id = ?1",
            params![id, status.as_str(), reason],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("study {id:?}")));
        }
        Ok(())
    }

    /// Records what `round` of `study` costs each site, as `(site, event, epsilon_after)`,
    /// and marks the round reserved; one transaction, on disk when this returns `Ok`.
    ///
    /// Called before any task of the round leaves the process. Refused, storing nothing of
    /// this call, when a site already paid for this round, a site is not enrolled, the round
    /// has already completed or aborted, or the study is not active. A reserved round may
    /// receive further sites' spends in a later call.
    pub fn record_spend(
        &mut self,
        study: &str,
        round: u64,
        entries: &[(String, SgmEvent, f64)],
        now: i64,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Err(StoreError::Invalid(format!(
                "round {round} of study {study:?}: a spend needs at least one site"
            )));
        }
        if let Some((site, _, eps)) = entries
            .iter()
            .find(|(_, _, e)| !(e.is_finite() && *e >= 0.0))
        {
            return Err(StoreError::Invalid(format!(
                "epsilon_after {eps} for site {site:?} is not a finite, non-negative number"
            )));
        }
        let tx = self.write()?;
        let status: Option<String> = tx
            .query_row("SELECT status FROM studies WHERE id = ?1", [study], |r| {
                r.get(0)
            })
            .optional()?;
        match status.as_deref() {
            None => return Err(StoreError::NotFound(format!("study {study:?}"))),
            Some(s) if s != StudyStatus::Active.as_str() => {
                return Err(StoreError::Conflict(format!(
                    "study {study:?} is {s}: no further spends"
                )))
            }
            Some(_) => {}
        }
        tx.execute(
            "INSERT INTO rounds (study, round, status, started_at) VALUES (?1, ?2, 'reserved', ?3)
             ON CONFLICT (study, round) DO NOTHING",
            params![study, round, now],
        )?;
        let rs: String = tx.query_row(
            "SELECT status FROM rounds WHERE study = ?1 AND round = ?2",
            params![study, round],
            |r| r.get(0),
        )?;
        if rs != RoundStatus::Reserved.as_str() {
            return Err(StoreError::Conflict(format!(
                "round {round} of study {study:?} is already {rs}"
            )));
        }
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO ledger (study, site, round, q, sigma, steps, epsilon_after, recorded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?;
            for (site, ev, eps) in entries {
                ins.execute(params![
                    study,
                    site,
                    round,
                    ev.q.get(),
                    ev.sigma.get(),
                    ev.steps,
                    eps,
                    now
                ])
                .map_err(|e| {
                    constraint(e, || {
                        format!(
                            "site {site:?} already paid for round {round} of study {study:?} \
                             (spends are never overwritten), or is not enrolled in it"
                        )
                    })
                })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every spend of `site` in `study`, in round order.
    pub fn site_events(&self, study: &str, site: &str) -> Result<Vec<SgmEvent>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT q, sigma, steps FROM ledger WHERE study = ?1 AND site = ?2 ORDER BY round",
        )?;
        let rows = stmt.query_map([study, site], |r| sgm_event(r, 0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The study's ledger, by round then site.
    pub fn ledger(&self, study: &str) -> Result<Vec<LedgerRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, round, q, sigma, steps, epsilon_after, recorded_at FROM ledger
             WHERE study = ?1 ORDER BY round, site",
        )?;
        let rows = stmt.query_map([study], |r| {
            Ok(LedgerRow {
                site: r.get(0)?,
                round: r.get(1)?,
                event: sgm_event(r, 2)?,
                epsilon_after: r.get(5)?,
                recorded_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Each enrolled site's spends in round order; a site that has spent nothing maps to an
    /// empty list.
    pub fn spent_by_site(
        &self,
        study: &str,
    ) -> Result<BTreeMap<String, Vec<SgmEvent>>, StoreError> {
        let mut out: BTreeMap<String, Vec<SgmEvent>> = self
            .enrolments(study)?
            .into_iter()
            .map(|s| (s, Vec::new()))
            .collect();
        let mut stmt = self.conn.prepare_cached(
            "SELECT site, q, sigma, steps FROM ledger WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| Ok((r.get::<_, String>(0)?, sgm_event(r, 1)?)))?;
        for row in rows {
            let (site, ev) = row?;
            out.entry(site).or_default().push(ev);
        }
        Ok(out)
    }

    /// Marks a reserved round completed with its model version and the sites whose updates
    /// made it; one transaction. Every contributor must have paid for the round.
    pub fn complete_round(
        &mut self,
        study: &str,
        round: u64,
        model_file: &str,
        sha256: &str,
        contributors: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        if !(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(StoreError::Invalid(format!(
                "{sha256:?} is not a hex SHA-256 digest"
            )));
        }
        if contributors.is_empty() {
            return Err(StoreError::Invalid(format!(
                "round {round} of study {study:?}: a model version needs contributors"
            )));
        }
        let tx = self.write()?;
        finish_round(&tx, study, round, RoundStatus::Completed, None, now)?;
        tx.execute(
            "INSERT INTO model_versions (study, round, file, sha256, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![study, round, model_file, sha256, now],
        )?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO lineage (study, round, site) VALUES (?1, ?2, ?3)")?;
            for site in contributors {
                ins.execute(params![study, round, site]).map_err(|e| {
                    constraint(e, || {
                        format!(
                            "contributor {site:?} is listed twice or did not pay for round \
                             {round} of study {study:?}"
                        )
                    })
                })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a reserved round aborted. Its spends stand.
    pub fn abort_round(
        &mut self,
        study: &str,
        round: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        finish_round(&tx, study, round, RoundStatus::Aborted, Some(reason), now)?;
        tx.commit()?;
        Ok(())
    }

    /// The latest completed round with its model file and digest: where a restart resumes.
    pub fn last_completed_round(
        &self,
        study: &str,
    ) -> Result<Option<(u64, String, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.round, m.file, m.sha256 FROM model_versions m
             JOIN rounds r ON r.study = m.study AND r.round = m.round
             WHERE m.study = ?1 AND r.status = 'completed'
             ORDER BY m.round DESC LIMIT 1",
        )?;
        Ok(stmt
            .query_row([study], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?)
    }

    /// Every round of the study, in order.
    pub fn rounds(&self, study: &str) -> Result<Vec<RoundRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, status, started_at, finished_at, reason FROM rounds
             WHERE study = ?1 ORDER BY round",
        )?;
        let rows = stmt.query_map([study], |r| {
            let status: String = r.get(1)?;
            Ok(RoundRow {
                round: r.get(0)?,
                status: RoundStatus::parse(&status).ok_or_else(|| bad_text(1, &status))?,
                started_at: r.get(2)?,
                finished_at: r.get(3)?,
                reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records (or replaces) the record count an enrolled site reported.
    pub fn set_site_records(&mut self, study: &str, site: &str, n: u64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO site_records (study, site, records) VALUES (?1, ?2, ?3)
                 ON CONFLICT (study, site) DO UPDATE SET records = excluded.records",
                params![study, site, n],
            )
            .map_err(|e| {
                constraint(e, || {
                    format!("site {site:?} is not enrolled in study {study:?}")
                })
            })?;
        Ok(())
    }

    /// The record counts sites reported, by site.
    pub fn site_records(&self, study: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT site, records FROM site_records WHERE study = ?1")?;
        let rows = stmt.query_map([study], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Which sites contributed to each completed round's model, by round; sites sorted.
    pub fn lineage(&self, study: &str) -> Result<Vec<(u64, Vec<String>)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT round, site FROM lineage WHERE study = ?1 ORDER BY round, site",
        )?;
        let rows = stmt.query_map([study], |r| Ok((r.get::<_, u64>(0)?, r.get(1)?)))?;
        let mut out: Vec<(u64, Vec<String>)> = Vec::new();
        for row in rows {
            let (round, site) = row?;
            match out.last_mut() {
                Some((r, sites)) if *r == round => sites.push(site),
                _ => out.push((round, vec![site])),
            }
        }
        Ok(out)
    }

    /// Every model version of the study, in round order, with its prune record if the
    /// retention policy removed its file.
    pub fn model_versions(&self, study: &str) -> Result<Vec<ModelVersionRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.round, m.file, m.sha256, m.created_at, p.pruned_at, p.audit_seq
             FROM model_versions m
             LEFT JOIN model_prunes p ON p.study = m.study AND p.round = m.round
             WHERE m.study = ?1 ORDER BY m.round",
        )?;
        let rows = stmt.query_map([study], |r| {
            let pruned_at: Option<i64> = r.get(4)?;
            let seq: Option<u64> = r.get(5)?;
            Ok(ModelVersionRow {
                round: r.get(0)?,
                file: r.get(1)?,
                sha256: r.get(2)?,
                created_at: r.get(3)?,
                pruned: pruned_at
                    .zip(seq)
                    .map(|(at, audit_seq)| Pruned { at, audit_seq }),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that the files of `rounds` of `study` are removed under the retention policy,
    /// announced by audit record `audit_seq`; one transaction. Call it after the audit
    /// record is on disk and before deleting the files. Refused, recording nothing, for a
    /// round without a model version, one already pruned, or the study's latest version
    /// (a restart resumes from it: it is never pruned).
    pub fn record_prunes(
        &mut self,
        study: &str,
        rounds: &[u64],
        audit_seq: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        if audit_seq == 0 {
            return Err(StoreError::Invalid(
                "a prune needs the seq of the audit record that announced it".into(),
            ));
        }
        let tx = self.write()?;
        let latest: Option<u64> = tx.query_row(
            "SELECT max(round) FROM model_versions WHERE study = ?1",
            [study],
            |r| r.get(0),
        )?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO model_prunes (study, round, pruned_at, audit_seq)
                 VALUES (?1, ?2, ?3, ?4)",
            )?;
            for &round in rounds {
                if Some(round) == latest {
                    return Err(StoreError::Conflict(format!(
                        "round {round} is the latest model version of study {study:?}: it is \
                         never pruned (a restart resumes from it)"
                    )));
                }
                ins.execute(params![study, round, now, audit_seq])
                    .map_err(|e| {
                        constraint(e, || {
                            format!(
                                "round {round} of study {study:?} has no model version or was \
                                 already pruned"
                            )
                        })
                    })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A write transaction that takes the lock up front, so it never fails half-way with
    /// "busy" when a reader (`ledger show`) holds the file.
    fn write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }
}

fn finish_round(
    tx: &rusqlite::Transaction<'_>,
    study: &str,
    round: u64,
    to: RoundStatus,
    reason: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    let status: Option<String> = tx
        .query_row(
            "SELECT status FROM rounds WHERE study = ?1 AND round = ?2",
            params![study, round],
            |r| r.get(0),
        )
        .optional()?;
    match status.as_deref() {
        None => Err(StoreError::NotFound(format!(
            "round {round} of study {study:?}"
        ))),
        Some("reserved") => {
            tx.execute(
                "UPDATE rounds SET status = ?3, finished_at = ?4, reason = ?5
                 WHERE study = ?1 AND round = ?2",
                params![study, round, to.as_str(), now, reason],
            )?;
            Ok(())
        }
        Some(s) => Err(StoreError::Conflict(format!(
            "round {round} of study {study:?} is already {s}"
        ))),
    }
}

fn study_row(r: &Row<'_>) -> rusqlite::Result<StudyRow> {
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
fn sgm_event(r: &Row<'_>, at: usize) -> rusqlite::Result<SgmEvent> {
    SgmEvent::new(r.get(at)?, r.get(at + 1)?, r.get(at + 2)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Real, Box::new(e))
    })
}

fn bad_text(col: usize, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unexpected value {value:?}").into(),
    )
}

/// Turns a uniqueness or foreign-key violation into a `Conflict` with `msg`.
fn constraint(e: rusqlite::Error, msg: impl FnOnce() -> String) -> StoreError {
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
mod tests {
    use super::*;
    use fedpriv_common::state_db::{configure, migrate};

    fn ev(q: f64, sigma: f64, steps: u64) -> SgmEvent {
        SgmEvent::new(q, sigma, steps).expect("valid event")
    }

    fn sites(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn fresh() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        let mut store = Store::open(&path).expect("open fresh");
        store
            .create_study("s1", "rounds = 3", &sites(&["a", "b", "c"]), 100)
            .expect("create study");
        (dir, path, store)
    }

    fn file_problem(e: StoreError) -> FileProblem {
        match e {
            StoreError::File { problem, .. } => problem,
            other => panic!("expected a file problem, got {other:?}"),
        }
    }

    #[test]
    fn reopen_persists_everything() {
        let (_dir, path, mut store) = fresh();
        store.set_site_records("s1", "a", 120).expect("records");
        store
            .set_site_records("s1", "a", 130)
            .expect("records replaced");
        let spend = vec![
            ("a".to_string(), ev(0.1, 1.1, 5), 0.5),
            ("b".to_string(), ev(0.2, 1.2, 5), 0.7),
        ];
        store.record_spend("s1", 0, &spend, 110).expect("spend");
        store
            .complete_round(
                "s1",
                0,
                "model-0.safetensors",
                SHA,
                &sites(&["a", "b"]),
                120,
            )
            .expect("complete");
        store
            .set_study_status("s1", StudyStatus::Stopped, Some("operator"))
            .expect("status");
        let before = (
            store.studies().expect("studies"),
            store.ledger("s1").expect("ledger"),
            store.rounds("s1").expect("rounds"),
            store.site_records("s1").expect("records"),
            store.lineage("s1").expect("lineage"),
        );
        drop(store);

        let store = Store::open(&path).expect("reopen");
        let after = (
            store.studies().expect("studies"),
            store.ledger("s1").expect("ledger"),
            store.rounds("s1").expect("rounds"),
            store.site_records("s1").expect("records"),
            store.lineage("s1").expect("lineage"),
        );
        assert_eq!(before, after);
        let study = store.study("s1").expect("query").expect("exists");
        assert_eq!(study.status, StudyStatus::Stopped);
        assert_eq!(study.end_reason.as_deref(), Some("operator"));
        assert_eq!(study.config_toml, "rounds = 3");
        assert_eq!(
            store.enrolments("s1").expect("enrolments"),
            sites(&["a", "b", "c"])
        );
        assert_eq!(store.site_records("s1").expect("records")["a"], 130);
        assert_eq!(
            store.site_events("s1", "b").expect("events"),
            vec![ev(0.2, 1.2, 5)]
        );
        assert_eq!(
            store.last_completed_round("s1").expect("query"),
            Some((0, "model-0.safetensors".to_string(), SHA.to_string()))
        );
        assert!(store.study("nope").expect("query").is_none());
    }

    #[test]
    fn spend_is_visible_without_a_clean_close() {
        let (_dir, path, mut store) = fresh();
        store
            .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 3), 0.2)], 1)
            .expect("spend");
        // As after a crash: no close, no checkpoint; the commit lives in the WAL.
        std::mem::forget(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.site_events("s1", "a").expect("events"),
            vec![ev(0.1, 1.0, 3)]
        );
        assert_eq!(
            store.rounds("s1").expect("rounds")[0].status,
            RoundStatus::Reserved
        );
    }

    #[test]
    fn durability_settings_are_on() {
        let (_dir, _path, store) = fresh();
        let get = |p: &str| -> String {
            store
                .conn
                .pragma_query_value(None, p, |r| r.get::<_, rusqlite::types::Value>(0))
                .map(|v| format!("{v:?}"))
                .expect("pragma")
        };
        assert_eq!(get("journal_mode"), "Text(\"wal\")");
        assert_eq!(get("synchronous"), "Integer(2)"); // FULL
        assert_eq!(get("foreign_keys"), "Integer(1)");
        assert_eq!(get("application_id"), format!("Integer({APPLICATION_ID})"));
    }

    #[test]
    fn duplicate_spend_is_refused_and_the_original_survives() {
        let (_dir, path, mut store) = fresh();
        store
            .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 10), 0.4)], 1)
            .expect("first spend");
        let again = store.record_spend("s1", 0, &[("a".into(), ev(0.5, 0.5, 99), 9.0)], 2);
        assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
        // The ledger refuses edits even when asked directly.
        assert!(store
            .conn
            .execute("UPDATE ledger SET steps = 0", [])
            .is_err());
        assert!(store.conn.execute("DELETE FROM ledger", []).is_err());
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.site_events("s1", "a").expect("events"),
            vec![ev(0.1, 1.0, 10)]
        );
        let ledger = store.ledger("s1").expect("ledger");
        assert_eq!(ledger.len(), 1);
        assert_eq!((ledger[0].epsilon_after, ledger[0].recorded_at), (0.4, 1));
    }

    #[test]
    fn record_spend_is_all_or_nothing() {
        let (_dir, _path, mut store) = fresh();
        // The same site twice in one call: nothing of round 1 is kept, not even its row.
        let dup = vec![
            ("c".to_string(), ev(0.1, 1.0, 1), 0.1),
            ("a".to_string(), ev(0.1, 1.0, 1), 0.1),
            ("a".to_string(), ev(0.2, 1.0, 1), 0.2),
        ];
        assert!(matches!(
            store.record_spend("s1", 1, &dup, 5),
            Err(StoreError::Conflict(_))
        ));
        assert!(store.ledger("s1").expect("ledger").is_empty());
        assert!(store.rounds("s1").expect("rounds").is_empty());
        // A site that is not enrolled.
        let stranger = vec![
            ("b".to_string(), ev(0.1, 1.0, 1), 0.1),
            ("zed".to_string(), ev(0.1, 1.0, 1), 0.1),
        ];
        assert!(matches!(
            store.record_spend("s1", 1, &stranger, 5),
            Err(StoreError::Conflict(_))
        ));
        assert!(store.ledger("s1").expect("ledger").is_empty());
        // A later call for a reserved round adds sites but cannot overwrite one.
        store
            .record_spend("s1", 2, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 6)
            .expect("spend");
        let mixed = vec![
            ("b".to_string(), ev(0.1, 1.0, 1), 0.1),
            ("a".to_string(), ev(0.3, 1.0, 1), 0.3),
        ];
        assert!(store.record_spend("s1", 2, &mixed, 7).is_err());
        assert!(store.site_events("s1", "b").expect("events").is_empty());
        store
            .record_spend("s1", 2, &[("b".into(), ev(0.1, 1.0, 1), 0.1)], 8)
            .expect("second site joins the reserved round");
        let by_site = store.spent_by_site("s1").expect("by site");
        assert_eq!(by_site.len(), 3);
        assert_eq!(by_site["a"], vec![ev(0.1, 1.0, 1)]);
        assert!(by_site["c"].is_empty());
        // Bad input is refused before anything is written.
        assert!(matches!(
            store.record_spend("s1", 3, &[], 9),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.record_spend("s1", 3, &[("a".into(), ev(0.1, 1.0, 1), f64::NAN)], 9),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.record_spend("nope", 3, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 9),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn finished_rounds_and_studies_take_no_spends() {
        let (_dir, _path, mut store) = fresh();
        let spend = [("a".to_string(), ev(0.1, 1.0, 1), 0.1)];
        store.record_spend("s1", 0, &spend, 1).expect("spend");
        store.abort_round("s1", 0, "timeout", 2).expect("abort");
        let b = [("b".to_string(), ev(0.1, 1.0, 1), 0.1)];
        assert!(matches!(
            store.record_spend("s1", 0, &b, 3),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.complete_round("s1", 0, "m", SHA, &sites(&["a"]), 3),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.abort_round("s1", 9, "x", 3),
            Err(StoreError::NotFound(_))
        ));
        // The aborted round's spend stands.
        assert_eq!(store.site_events("s1", "a").expect("events").len(), 1);
        let rounds = store.rounds("s1").expect("rounds");
        assert_eq!(rounds[0].status, RoundStatus::Aborted);
        assert_eq!(rounds[0].reason.as_deref(), Some("timeout"));
        assert_eq!(rounds[0].finished_at, Some(2));
        assert_eq!(store.last_completed_round("s1").expect("query"), None);

        store
            .set_study_status("s1", StudyStatus::Completed, Some("budget spent"))
            .expect("status");
        assert!(matches!(
            store.record_spend("s1", 1, &b, 4),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.set_study_status("nope", StudyStatus::Stopped, None),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.create_study("s1", "", &[], 5),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn lineage_round_trips_and_needs_a_spend() {
        let (_dir, path, mut store) = fresh();
        for round in 0..3u64 {
            let entries: Vec<_> = ["a", "b", "c"]
                .iter()
                .map(|s| (s.to_string(), ev(0.1, 1.0, 2), 0.1 * (round + 1) as f64))
                .collect();
            store
                .record_spend("s1", round, &entries, 10 + round as i64)
                .expect("spend");
        }
        store
            .complete_round("s1", 0, "m0", SHA, &sites(&["c", "a"]), 20)
            .expect("round 0");
        store
            .abort_round("s1", 1, "too few updates", 21)
            .expect("round 1");
        store
            .complete_round("s1", 2, "m2", SHA, &sites(&["a", "b", "c"]), 22)
            .expect("round 2");
        // A contributor that did not pay for the round is refused, and nothing is kept.
        store
            .record_spend("s1", 3, &[("a".into(), ev(0.1, 1.0, 2), 0.4)], 23)
            .expect("spend");
        assert!(matches!(
            store.complete_round("s1", 3, "m3", SHA, &sites(&["a", "b"]), 24),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(
            store.rounds("s1").expect("rounds")[3].status,
            RoundStatus::Reserved
        );
        assert!(matches!(
            store.complete_round("s1", 3, "m3", "not-hex", &sites(&["a"]), 24),
            Err(StoreError::Invalid(_))
        ));
        drop(store);
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.lineage("s1").expect("lineage"),
            vec![(0, sites(&["a", "c"])), (2, sites(&["a", "b", "c"]))]
        );
        assert_eq!(
            store.last_completed_round("s1").expect("query"),
            Some((2, "m2".to_string(), SHA.to_string()))
        );
    }

    #[test]
    fn garbage_and_empty_files_are_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        let garbage: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &garbage).expect("write");
        let err = Store::open(&path).expect_err("garbage must be refused");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(file_problem(err), FileProblem::NotSqlite);
        assert_eq!(std::fs::read(&path).expect("read"), garbage);

        std::fs::write(&path, b"").expect("write");
        assert_eq!(
            file_problem(Store::open(&path).expect_err("empty")),
            FileProblem::Empty
        );
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
    }

    #[test]
    fn someone_elses_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
                .expect("sql");
        }
        let err = Store::open(&path).expect_err("foreign");
        assert!(matches!(
            file_problem(err),
            FileProblem::NotOurs { found: 0, .. }
        ));
    }

    fn populated(path: &Path) {
        let mut store = Store::open(path).expect("open");
        store
            .create_study("s1", &"x".repeat(20_000), &sites(&["a", "b"]), 1)
            .expect("study");
        for round in 0..200u64 {
            let e = vec![
                ("a".to_string(), ev(0.01, 1.0, 50), 0.01),
                ("b".to_string(), ev(0.02, 1.0, 50), 0.02),
            ];
            store.record_spend("s1", round, &e, 2).expect("spend");
        }
        drop(store);
        let mut wal = path.as_os_str().to_os_string();
        wal.push("-wal");
        assert!(!Path::new(&wal).exists(), "closing checkpoints the WAL");
    }

    #[test]
    fn truncated_database_is_refused_not_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        populated(&path);
        let len = std::fs::metadata(&path).expect("meta").len();
        assert!(len > 8 * 4096, "{len}");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(len / 2).expect("truncate");
        drop(file);
        let err = Store::open(&path).expect_err("truncated");
        assert!(err.to_string().contains("restore it from backup"), "{err}");
        assert!(matches!(file_problem(err), FileProblem::Corrupt(_)));
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), len / 2);
    }

    #[test]
    fn damaged_page_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        populated(&path);
        let mut bytes = std::fs::read(&path).expect("read");
        let page = usize::from(u16::from_be_bytes([bytes[16], bytes[17]]));
        let at = bytes.len() / 2 / page * page;
        bytes[at..at + page].fill(0x55);
        std::fs::write(&path, &bytes).expect("write");
        let err = Store::open(&path).expect_err("damaged");
        assert!(matches!(file_problem(err), FileProblem::Corrupt(_)));
    }

    #[test]
    fn newer_schema_is_refused() {
        let (_dir, path, store) = fresh();
        store
            .conn
            .execute("UPDATE schema_version SET version = 99", [])
            .expect("bump");
        drop(store);
        let err = Store::open(&path).expect_err("newer");
        assert_eq!(
            file_problem(err),
            FileProblem::NewerSchema {
                found: 99,
                supported: MIGRATIONS.len() as i64
            }
        );
        let conn = Connection::open(&path).expect("raw open");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM studies", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 1, "the data is still there");
    }

    #[test]
    fn missing_schema_version_is_corrupt() {
        let (_dir, path, store) = fresh();
        store
            .conn
            .execute("DELETE FROM schema_version", [])
            .expect("delete");
        drop(store);
        assert!(matches!(
            file_problem(Store::open(&path).expect_err("no version")),
            FileProblem::Corrupt(_)
        ));
    }

    #[test]
    fn leftover_init_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        std::fs::write(dir.path().join("coordinator.db.init"), b"half-written").expect("write");
        std::fs::write(dir.path().join("coordinator.db.init-wal"), b"stale").expect("write");
        Store::open(&path).expect("open over leftovers");
        assert!(!dir.path().join("coordinator.db.init").exists());
        Store::open(&path).expect("reopen");
    }

    /// A file as the first schema wrote it, with one completed round.
    fn version_one_file(path: &Path) {
        let mut conn = Connection::open(path).expect("open");
        configure(&conn).expect("configure");
        let tx = conn.transaction().expect("tx");
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .expect("app id");
        migrate(&tx, 0, &MIGRATIONS[..1]).expect("v1");
        tx.execute_batch(&format!(
            "INSERT INTO studies VALUES ('s1', '', 1, 'active', NULL);
             INSERT INTO enrolments VALUES ('s1', 'a');
             INSERT INTO rounds VALUES ('s1', 0, 'completed', 2, 3, NULL);
             INSERT INTO ledger VALUES ('s1', 'a', 0, 0.1, 1.0, 1, 0.1, 2);
             INSERT INTO model_versions VALUES ('s1', 0, 'm0', '{SHA}', 3);
             INSERT INTO lineage VALUES ('s1', 0, 'a');"
        ))
        .expect("rows");
        tx.commit().expect("commit");
        conn.close().expect("close");
    }

    fn schema_version(path: &Path) -> i64 {
        Connection::open(path)
            .expect("raw open")
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .expect("version")
    }

    #[test]
    fn version_one_file_reads_without_migrating_and_migrates_on_open() {
        assert_eq!(READ_ONLY_STANDINS.len(), MIGRATIONS.len());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        version_one_file(&path);
        let before = std::fs::read(&path).expect("read");
        {
            let mut ro = Store::open_read_only(&path).expect("read-only open of a v1 file");
            let versions = ro.model_versions("s1").expect("versions");
            assert_eq!(versions.len(), 1);
            assert_eq!(versions[0].pruned, None);
            assert!(ro.record_prunes("s1", &[0], 1, 9).is_err(), "read-only");
        }
        assert_eq!(schema_version(&path), 1, "a read-only open never migrates");
        assert_eq!(std::fs::read(&path).expect("read"), before);
        let store = Store::open(&path).expect("read-write open migrates");
        assert_eq!(store.model_versions("s1").expect("versions")[0].sha256, SHA);
        assert_eq!(
            store.lineage("s1").expect("lineage"),
            vec![(0, sites(&["a"]))]
        );
        drop(store);
        assert_eq!(schema_version(&path), MIGRATIONS.len() as i64);
    }

    #[test]
    fn read_only_open_never_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.db");
        match Store::open_read_only(&path) {
            Err(StoreError::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
        assert!(!path.exists());
    }

    #[test]
    fn read_only_open_reads_beside_a_writer() {
        let (_dir, path, mut store) = fresh();
        let ro = Store::open_read_only(&path).expect("read-only beside the writer");
        store
            .record_spend("s1", 0, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 1)
            .expect("the writer is not blocked");
        assert_eq!(ro.ledger("s1").expect("ledger").len(), 1);
    }

    #[test]
    fn prunes_are_recorded_once_and_never_the_latest() {
        let (_dir, path, mut store) = fresh();
        for round in 0..3u64 {
            store
                .record_spend("s1", round, &[("a".into(), ev(0.1, 1.0, 1), 0.1)], 1)
                .expect("spend");
            store
                .complete_round("s1", round, &format!("m{round}"), SHA, &sites(&["a"]), 10)
                .expect("complete");
        }
        assert!(matches!(
            store.record_prunes("s1", &[0, 2], 5, 20),
            Err(StoreError::Conflict(m)) if m.contains("latest")
        ));
        assert!(matches!(
            store.record_prunes("s1", &[0, 7], 5, 20),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            store.record_prunes("s1", &[0], 0, 20),
            Err(StoreError::Invalid(_))
        ));
        assert!(store
            .model_versions("s1")
            .expect("versions")
            .iter()
            .all(|v| v.pruned.is_none()));
        store.record_prunes("s1", &[0, 1], 5, 20).expect("prune");
        assert!(matches!(
            store.record_prunes("s1", &[1], 6, 21),
            Err(StoreError::Conflict(_))
        ));
        assert!(store.conn.execute("DELETE FROM model_prunes", []).is_err());
        drop(store);
        let store = Store::open(&path).expect("reopen");
        let pruned: Vec<_> = store
            .model_versions("s1")
            .expect("versions")
            .iter()
            .map(|v| v.pruned)
            .collect();
        let p = Some(Pruned {
            at: 20,
            audit_seq: 5,
        });
        assert_eq!(pruned, vec![p, p, None]);
    }
}
