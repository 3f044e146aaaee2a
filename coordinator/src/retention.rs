//! Retention of model checkpoints: what `fedpriv-coordinator prune` removes and how it
//! records that it did.
//!
//! The operator states the policy on every run (`--keep-models-days`, `--keep-last`); there
//! is no default age. A model version's file is removed only when it is older than the
//! cut-off *and* not among the study's `keep_last` latest versions. Never removed: a
//! study's latest version (a restart resumes from it; the store refuses it too), any version
//! newer than the cut-off, the version's row in the store (its digest and lineage stay,
//! marked pruned, so the inventory still says which sites made it) and the audit log: no
//! option here touches audit records, which are kept at least six years (the log itself has
//! no prune operation, see `fedpriv_common::audit_file`).
//!
//! Order of a run: take the audit log's exclusive lock (a running coordinator holds it, so
//! prune refuses to run beside one), append one `pruned` record naming every file to remove
//! (on disk before anything is deleted), mark the versions pruned in the store, then delete
//! the files. A run killed after the store update leaves files behind; the next run deletes
//! them and says so in its record. Checkpoint contents are never read (they may be sealed).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use fedpriv_common::audit::details::{Details, PrunePolicy, Pruned, PrunedFile};
use fedpriv_common::audit_file::{AuditError, AuditLog};
use serde::Serialize;

use crate::store::{ModelVersionRow, Store, StoreError};

/// Seconds in a retention day.
const DAY: i64 = 86_400;

/// Files named per audit record: keeps a record well under the log's 1 MiB line limit
/// (an entry is about 200 bytes). A larger run appends one record per batch, each before
/// its own deletions.
const MAX_FILES_PER_RECORD: usize = 1000;

/// Why a prune did not (fully) happen.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The operator's: wrong `--state`.
    #[error(
        "no state database at {} (is --state the coordinator's state directory?)",
        .0.display()
    )]
    NoState(PathBuf),
    /// The operator's: the policy as given cannot be applied.
    #[error("retention policy: {0}")]
    Policy(String),
    /// The operator's: prune and a running coordinator must not change the state together.
    #[error(
        "the coordinator is running (it holds the audit log {} open): stop it and run prune \
         again; `prune --dry-run` shows what would be removed while it runs",
        .0.display()
    )]
    CoordinatorRunning(PathBuf),
    /// The audit log cannot take the record; nothing was removed.
    #[error("{0}; nothing was removed")]
    Audit(AuditError),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The state database names a checkpoint outside `models/` of the state directory: it was
    /// edited or damaged. Nothing is deleted on its word.
    #[error(
        "round {round} of study {study:?}: the state database names the checkpoint {file:?}, \
         which is not under models/ of the state directory; refusing to delete anything \
         (check the database)"
    )]
    BadPath {
        study: String,
        round: u64,
        file: String,
    },
    /// Recorded (audit log and store) but some files could not be deleted.
    #[error(
        "recorded as pruned, but {} file(s) could not be deleted (first: {}: {first_error}); \
         fix the cause and run prune again to finish",
        .paths.len(),
        .paths.first().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    Delete {
        paths: Vec<PathBuf>,
        first_error: std::io::Error,
    },
}

/// The retention the operator stated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetentionPolicy {
    /// Versions created within this many days are kept.
    pub keep_models_days: u32,
    /// The latest this many versions of each study are kept, whatever their age (>= 1).
    pub keep_last: u32,
}

impl RetentionPolicy {
    pub fn new(keep_models_days: u32, keep_last: u32) -> Result<Self, RetentionError> {
        if keep_last == 0 {
            return Err(RetentionError::Policy(
                "--keep-last must be at least 1: the latest model version of every study is \
                 always kept (a restart resumes from it)"
                    .into(),
            ));
        }
        Ok(Self {
            keep_models_days,
            keep_last,
        })
    }

    /// Versions created before this time (unix seconds) may be removed.
    pub fn cutoff(&self, now: i64) -> i64 {
        now.saturating_sub(i64::from(self.keep_models_days) * DAY)
    }
}

/// One checkpoint file the plan removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub study: String,
    pub round: u64,
    pub sha256: String,
    /// Relative to the state directory, as the store records it.
    pub file: String,
    pub created_at: i64,
}

/// What a run removes and keeps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrunePlan {
    pub policy: RetentionPolicy,
    pub cutoff: i64,
    /// Versions whose files this run removes, by study then round.
    pub remove: Vec<Removal>,
    /// Versions whose files stay (latest, recent, or within `keep_last`).
    pub kept: usize,
    /// Files of versions an earlier, interrupted run recorded as pruned but did not delete.
    pub leftovers: Vec<Removal>,
}

/// What a (non-dry) run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PruneReport {
    pub plan: PrunePlan,
    pub dry_run: bool,
    /// Seqs of the `pruned` audit records appended (none for a dry run).
    pub audit_seqs: Vec<u64>,
}

impl std::fmt::Display for PruneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.plan;
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        writeln!(
            f,
            "retention: keep versions newer than {} days (cut-off {}) and the latest {} of each study",
            p.policy.keep_models_days,
            utc_datetime(p.cutoff),
            p.policy.keep_last
        )?;
        for r in &p.remove {
            writeln!(
                f,
                "  {verb} study {} round {} ({}, created {}, sha256 {})",
                r.study,
                r.round,
                r.file,
                utc_datetime(r.created_at),
                r.sha256
            )?;
        }
        for r in &p.leftovers {
            writeln!(
                f,
                "  {} study {} round {} ({}): left behind by an earlier prune",
                if self.dry_run {
                    "would delete"
                } else {
                    "deleted"
                },
                r.study,
                r.round,
                r.file
            )?;
        }
        write!(f, "{verb} {} file(s), kept {}", p.remove.len(), p.kept)?;
        if self.dry_run {
            write!(f, " (dry run: nothing deleted or recorded)")?;
        } else if !self.audit_seqs.is_empty() {
            let seqs: Vec<String> = self.audit_seqs.iter().map(u64::to_string).collect();
            write!(f, "; audit record(s) {}", seqs.join(", "))?;
        }
        Ok(())
    }
}

/// Decides what `policy` removes, from the store alone (no file is looked at except to
/// find leftovers of an interrupted run).
pub fn plan(
    state_dir: &Path,
    store: &Store,
    policy: RetentionPolicy,
    now: i64,
) -> Result<PrunePlan, RetentionError> {
    let cutoff = policy.cutoff(now);
    let mut remove = Vec::new();
    let mut leftovers = Vec::new();
    let mut kept = 0usize;
    for study in store.studies()? {
        let versions = store.model_versions(&study.id)?;
        let mut live: Vec<&ModelVersionRow> = Vec::new();
        let latest = versions.iter().map(|v| v.round).max();
        for v in &versions {
            // The latest version is never deleted, whatever a (damaged or edited) prune
            // row says: a restart resumes from it.
            if v.pruned.is_some() && Some(v.round) != latest {
                if checkpoint_path(state_dir, &study.id, v)?.exists() {
                    leftovers.push(removal(&study.id, v));
                }
            } else {
                live.push(v);
            }
        }
        // Newest first; the pruned ones are older than the latest, which is never pruned.
        live.sort_by_key(|v| std::cmp::Reverse(v.round));
        let keep_last = usize::try_from(policy.keep_last).unwrap_or(usize::MAX);
        for (i, v) in live.iter().enumerate() {
            if i < keep_last || v.created_at >= cutoff {
                kept += 1;
            } else {
                checkpoint_path(state_dir, &study.id, v)?;
                remove.push(removal(&study.id, v));
            }
        }
    }
    remove.sort_by(|a, b| (&a.study, a.round).cmp(&(&b.study, b.round)));
    Ok(PrunePlan {
        policy,
        cutoff,
        remove,
        kept,
        leftovers,
    })
}

fn removal(study: &str, v: &ModelVersionRow) -> Removal {
    Removal {
        study: study.to_string(),
        round: v.round,
        sha256: v.sha256.clone(),
        file: v.file.clone(),
        created_at: v.created_at,
    }
}

/// The checkpoint's path, refused unless the store's relative path stays under `models/`.
fn checkpoint_path(
    state_dir: &Path,
    study: &str,
    v: &ModelVersionRow,
) -> Result<PathBuf, RetentionError> {
    let rel = Path::new(&v.file);
    let mut parts = rel.components();
    let under_models = parts.next() == Some(Component::Normal("models".as_ref()))
        && parts.clone().next().is_some()
        && parts.all(|c| matches!(c, Component::Normal(_)));
    // The path is derivable from (study, round): a row naming any other file (another
    // study's or round's checkpoint) is refused, never followed.
    let derived = crate::checkpoint::model_path(state_dir, study, v.round);
    if !under_models || state_dir.join(rel) != derived {
        return Err(RetentionError::BadPath {
            study: study.to_string(),
            round: v.round,
            file: v.file.clone(),
        });
    }
    Ok(derived)
}

/// Applies `policy` to the state directory: see the module docs for the order. With
/// `dry_run` the store is opened read-only and nothing is recorded or deleted (so it also
/// runs beside a running coordinator).
pub fn prune(
    state_dir: &Path,
    policy: RetentionPolicy,
    now: i64,
    dry_run: bool,
) -> Result<PruneReport, RetentionError> {
    let db = state_dir.join("coordinator.db");
    if !db.exists() {
        return Err(RetentionError::NoState(db));
    }
    if dry_run {
        let store = Store::open_read_only(&db)?;
        return Ok(PruneReport {
            plan: plan(state_dir, &store, policy, now)?,
            dry_run: true,
            audit_seqs: Vec::new(),
        });
    }
    // The lock first: nothing is read for a decision while a coordinator could change it.
    let log_path = state_dir.join("audit.log");
    let mut log = match AuditLog::open(&log_path) {
        Ok(log) => log,
        Err(AuditError::InUse { path }) => return Err(RetentionError::CoordinatorRunning(path)),
        Err(e) => return Err(RetentionError::Audit(e)),
    };
    let mut store = Store::open(&db)?;
    let plan = plan(state_dir, &store, policy, now)?;
    let mut audit_seqs = Vec::new();
    let mut failed: Vec<(PathBuf, std::io::Error)> = Vec::new();
    let batches: Vec<&[Removal]> = if plan.remove.is_empty() {
        vec![&[]]
    } else {
        plan.remove.chunks(MAX_FILES_PER_RECORD).collect()
    };
    let parts = batches.len();
    let by = crate::audit::local_user();
    for (i, batch) in batches.into_iter().enumerate() {
        let removed = batch
            .iter()
            .map(|r| PrunedFile {
                study: r.study.clone(),
                round: r.round,
                sha256: Some(r.sha256.clone()),
                file: r.file.clone(),
            })
            .collect();
        let finishing = (i == 0 && !plan.leftovers.is_empty()).then(|| {
            plan.leftovers
                .iter()
                .map(|r| PrunedFile {
                    study: r.study.clone(),
                    round: r.round,
                    sha256: None,
                    file: r.file.clone(),
                })
                .collect()
        });
        let details = Pruned {
            what: "model_versions".into(),
            by: by.clone(),
            policy: PrunePolicy {
                keep_models_days: policy.keep_models_days,
                keep_last: policy.keep_last,
            },
            cutoff: plan.cutoff,
            removed,
            kept: plan.kept as u64,
            part: (parts > 1).then(|| format!("{} of {parts}", i + 1)),
            finishing,
        };
        // On disk before anything it names is touched.
        let seq = log
            .append(&by, Pruned::EVENT, details.to_value(), now)
            .map_err(RetentionError::Audit)?;
        audit_seqs.push(seq);
        let mut by_study: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for r in batch {
            by_study.entry(&r.study).or_default().push(r.round);
        }
        for (study, rounds) in &by_study {
            store.record_prunes(study, rounds, seq, now)?;
        }
        let leftovers: &[Removal] = if i == 0 { &plan.leftovers } else { &[] };
        for r in batch.iter().chain(leftovers) {
            let path = state_dir.join(&r.file);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                // Gone already (removed by hand): the record and the store say what matters.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push((path, e)),
            }
        }
    }
    sync_model_dirs(state_dir, &plan);
    if let Some((_, first_error)) = failed.first() {
        let first_error = std::io::Error::new(first_error.kind(), first_error.to_string());
        return Err(RetentionError::Delete {
            paths: failed.into_iter().map(|(p, _)| p).collect(),
            first_error,
        });
    }
    Ok(PruneReport {
        plan,
        dry_run: false,
        audit_seqs,
    })
}

/// Makes the deletions durable. Best effort: the removal is already recorded, and a file
/// that comes back after a power loss is found and deleted as a leftover by the next run.
fn sync_model_dirs(state_dir: &Path, plan: &PrunePlan) {
    let dirs: std::collections::BTreeSet<PathBuf> = plan
        .remove
        .iter()
        .chain(&plan.leftovers)
        .filter_map(|r| state_dir.join(&r.file).parent().map(Path::to_path_buf))
        .collect();
    for dir in dirs {
        if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not sync a model directory after pruning");
        }
    }
}

/// Why `round` of `study` cannot be exported because its file was pruned, if it was.
pub fn pruned_note(store: &Store, study: &str, round: u64) -> Result<Option<String>, StoreError> {
    Ok(store
        .model_versions(study)?
        .into_iter()
        .find(|v| v.round == round)
        .and_then(|v| v.pruned)
        .map(|p| {
            format!(
                "round {round} of study {study} was pruned on {} under the retention policy \
                 (audit record {}); its digest and lineage remain in `inventory`",
                utc_datetime(p.at),
                p.audit_seq
            )
        }))
}

pub use fedpriv_common::time::utc_datetime;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_last_zero_is_refused() {
        assert!(matches!(
            RetentionPolicy::new(30, 0),
            Err(RetentionError::Policy(_))
        ));
        let p = RetentionPolicy::new(2, 1).expect("policy");
        assert_eq!(p.cutoff(10 * DAY), 8 * DAY);
    }

    #[test]
    fn paths_outside_models_are_refused() {
        let v = |file: &str| ModelVersionRow {
            round: 1,
            file: file.into(),
            sha256: String::new(),
            created_at: 0,
            pruned: None,
        };
        let dir = Path::new("/state");
        assert!(checkpoint_path(dir, "s", &v("models/s/round-00001.safetensors")).is_ok());
        for bad in [
            "../models/x",
            "models/../coordinator.db",
            "/etc/passwd",
            "audit.log",
            "models",
            "models/./x/../../audit.log",
            // Under models/, but another study's or round's checkpoint.
            "models/other/round-00001.safetensors",
            "models/s/round-00002.safetensors",
        ] {
            assert!(
                matches!(
                    checkpoint_path(dir, "s", &v(bad)),
                    Err(RetentionError::BadPath { .. })
                ),
                "{bad}"
            );
        }
    }
}
