//! The site's own data inventory: `fedpriv-client inventory`. Which studies touched this
//! site's data, when (rounds and times), which columns they read, and the epsilon each
//! has spent, from the site's own records only.
//!
//! Sources, read-only (both work beside the running daemon): the site ledger (rounds paid,
//! with times; tasks declined) and the site audit log (column checks: the columns each
//! study reads; `budget_spent` records: the study's delta). The audit log is used only if
//! it verifies; otherwise the inventory says so and leaves out what only the log knows.
//!
//! Retention: the site keeps no model or update files. The global model of a task is held
//! in memory, trained on and dropped; the update leaves over the network and is not
//! stored. The site's state is the ledger and the audit log, both kept (audit records at
//! least six years), so a site has nothing to prune.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use fedpriv_common::audit::{decode_line, AuditEvent};
use fedpriv_common::dp::accountant;
use fedpriv_common::dp::Delta;
use serde::Serialize;

use crate::config::SiteConfig;
use crate::store::{SiteLedger, StoreError};

/// What the site keeps, stated in every inventory.
pub const RETENTION_NOTE: &str = "this site keeps no model or update files (the global model \
     is held in memory for a task and the update is sent, never stored): its state is the \
     ledger and the audit log, both kept, so there is nothing to prune";

/// How the audit log was found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditSource {
    pub path: PathBuf,
    pub verified: bool,
    /// Why it was not used, when it was not.
    pub problem: Option<String>,
    pub records: u64,
}

/// A round this site paid for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PaidRound {
    pub round: u64,
    pub at: i64,
    pub coordinator: String,
    pub q: f64,
    pub sigma: f64,
    pub steps: u64,
    /// The round's DP evaluation, when it carried one: charged beside the training.
    pub evaluation: Option<fedpriv_common::dp::SgmEvent>,
}

/// A task this site declined (its data was not trained on for that round).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Declined {
    pub round: u64,
    pub at: i64,
    pub reason: String,
}

/// The columns the study read, from the audit log's column checks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnsRead {
    /// Every column named by a check that let the study load its data.
    pub columns: Vec<String>,
    pub checks_allowed: u64,
    pub checks_refused: u64,
    pub first_at: i64,
    pub last_at: i64,
}

/// Epsilon spent on one study, recomputed from the ledger's events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpsilonSpent {
    pub epsilon: f64,
    pub delta: f64,
}

/// One study's use of this site's data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyUse {
    pub study: String,
    /// The site's own cap for it, if its config still names the study.
    pub epsilon_cap: Option<f64>,
    /// `None` when the study's delta is not known from a verified audit log (computing at
    /// another delta would understate or overstate it).
    pub epsilon_spent: Option<EpsilonSpent>,
    pub paid_rounds: Vec<PaidRound>,
    pub declined: Vec<Declined>,
    /// `None` when the audit log is unusable or records no column check for the study.
    pub columns_read: Option<ColumnsRead>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteInventory {
    pub site: String,
    pub ledger: PathBuf,
    pub audit_log: AuditSource,
    pub retention: &'static str,
    pub studies: Vec<StudyUse>,
}

/// What the audit log adds, per study.
#[derive(Default)]
struct FromLog {
    columns: BTreeMap<String, ColumnsRead>,
    /// The smallest delta a `budget_spent` record names (the largest epsilon, if two differ).
    delta: BTreeMap<String, f64>,
}

/// Builds the inventory of the site `cfg` describes, opening its ledger read-only.
pub fn build(cfg: &SiteConfig) -> Result<SiteInventory, String> {
    let ledger_path = cfg.state_dir.join("site-ledger.db");
    let ledger = match SiteLedger::open_read_only(&ledger_path) {
        Ok(l) => l,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "no site ledger at {} (has this site run yet? is state_dir in the config right?)",
                ledger_path.display()
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let (audit_log, log) = read_log(&crate::daemon::audit_path(cfg));
    let mut ids: BTreeSet<String> = ledger
        .studies()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    ids.extend(ledger.refused_studies().map_err(|e| e.to_string())?);
    ids.extend(log.columns.keys().cloned());
    let mut studies = Vec::new();
    for study in ids {
        let spends = ledger.spends(&study).map_err(|e| e.to_string())?;
        let evaluations = ledger
            .evaluation_spends(&study)
            .map_err(|e| e.to_string())?;
        // The study's delta: from the terms it was paid under, else from the audit log.
        let pinned_delta = ledger
            .pinned_terms(&study)
            .ok()
            .flatten()
            .and_then(|(_, terms)| {
                serde_json::from_str::<serde_json::Value>(&terms)
                    .ok()?
                    .get("delta")?
                    .as_f64()
            });
        let epsilon_spent = match pinned_delta.or_else(|| log.delta.get(&study).copied()) {
            Some(d) if !spends.is_empty() => {
                let delta = Delta::new(d).map_err(|e| format!("study {study}: delta {d}: {e}"))?;
                // Training and evaluation charges alike.
                let events = ledger.events(&study).map_err(|e| e.to_string())?;
                let epsilon = accountant::epsilon(cfg.accountant, &events, delta)
                    .map_err(|e| format!("study {study}: {e}"))?;
                Some(EpsilonSpent { epsilon, delta: d })
            }
            _ => None,
        };
        studies.push(StudyUse {
            epsilon_cap: cfg.studies.get(&study).map(|s| s.epsilon_cap.get()),
            epsilon_spent,
            paid_rounds: spends
                .iter()
                .map(|s| PaidRound {
                    evaluation: evaluations
                        .iter()
                        .find(|(r, _)| *r == s.round)
                        .map(|(_, e)| *e),
                    round: s.round,
                    at: s.recorded_at,
                    coordinator: s.coordinator.clone(),
                    q: s.event.q.get(),
                    sigma: s.event.sigma.get(),
                    steps: s.event.steps,
                })
                .collect(),
            declined: ledger
                .refusals(&study)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|r| Declined {
                    round: r.round,
                    at: r.at,
                    reason: r.reason,
                })
                .collect(),
            columns_read: log.columns.get(&study).cloned(),
            study,
        });
    }
    Ok(SiteInventory {
        site: cfg.name.clone(),
        ledger: ledger_path,
        audit_log,
        retention: RETENTION_NOTE,
        studies,
    })
}

/// Verifies the log, then collects column checks and deltas from it; an unusable log gives
/// nothing (and says why).
fn read_log(path: &Path) -> (AuditSource, FromLog) {
    let mut source = AuditSource {
        path: path.to_path_buf(),
        verified: false,
        problem: None,
        records: 0,
    };
    let report = match fedpriv_common::audit_file::verify_file(path) {
        Ok(r) => r,
        Err(e) => {
            source.problem = Some(e.to_string());
            return (source, FromLog::default());
        }
    };
    if !report.is_ok() {
        source.problem = Some(format!(
            "does not verify ({report}); run `fedpriv-client audit verify`"
        ));
        return (source, FromLog::default());
    }
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            source.problem = Some(format!("{}: {e}", path.display()));
            return (source, FromLog::default());
        }
    };
    source.verified = true;
    let mut out = FromLog::default();
    // Lines appended since the verification are used only if each checks on its own; a
    // half-written last line does not parse and is skipped.
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Some(rec) = decode_line(&line) else {
            continue;
        };
        source.records += 1;
        let d = &rec.details;
        let Some(study) = d.get("study").and_then(|s| s.as_str()) else {
            continue;
        };
        let entry = |out: &mut FromLog| {
            let e = out.columns.entry(study.to_string()).or_insert(ColumnsRead {
                columns: Vec::new(),
                checks_allowed: 0,
                checks_refused: 0,
                first_at: rec.ts,
                last_at: rec.ts,
            });
            e.first_at = e.first_at.min(rec.ts);
            e.last_at = e.last_at.max(rec.ts);
        };
        let add_columns = |out: &mut FromLog, named: Vec<&str>| {
            if let Some(e) = out.columns.get_mut(study) {
                e.checks_allowed += 1;
                for column in named {
                    if !e.columns.iter().any(|c| c == column) {
                        e.columns.push(column.to_string());
                    }
                }
            }
        };
        let names = |p: &str| -> Vec<&str> {
            d.pointer(p)
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str())
                .collect()
        };
        match rec.event {
            // Terms accepted: the columns the study reads from now on.
            AuditEvent::StudyAccepted => {
                entry(&mut out);
                add_columns(&mut out, names("/columns"));
            }
            AuditEvent::Refused
                if d.get("action").and_then(|a| a.as_str()) == Some("announcement") =>
            {
                entry(&mut out);
                if let Some(e) = out.columns.get_mut(study) {
                    e.checks_refused += 1;
                }
            }
            // Logs written before terms were pinned (data loaded per announcement).
            AuditEvent::ColumnCheck => {
                entry(&mut out);
                if d.get("outcome").and_then(|o| o.as_str()) == Some("allowed") {
                    add_columns(&mut out, names("/check/checked"));
                } else if let Some(e) = out.columns.get_mut(study) {
                    e.checks_refused += 1;
                }
            }
            AuditEvent::BudgetSpent => {
                if let Some(delta) = d.get("delta").and_then(|x| x.as_f64()) {
                    let e = out.delta.entry(study.to_string()).or_insert(delta);
                    *e = e.min(delta);
                }
            }
            _ => {}
        }
    }
    (source, out)
}

impl std::fmt::Display for SiteInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "site {} (ledger {})", self.site, self.ledger.display())?;
        match &self.audit_log.problem {
            None => writeln!(
                f,
                "audit log {}: verified, {} records",
                self.audit_log.path.display(),
                self.audit_log.records
            )?,
            Some(p) => writeln!(
                f,
                "audit log {}: not used: {p} (columns read and epsilon are left out)",
                self.audit_log.path.display()
            )?,
        }
        writeln!(f, "retention: {}", self.retention)?;
        for s in &self.studies {
            let cap = s
                .epsilon_cap
                .map(|c| format!("cap {c}"))
                .unwrap_or_else(|| "not in the config".into());
            let eps = s
                .epsilon_spent
                .as_ref()
                .map(|e| format!("epsilon {:.4} spent at delta {}", e.epsilon, e.delta))
                .unwrap_or_else(|| "epsilon not computed (study delta unknown)".into());
            writeln!(
                f,
                "study {} ({cap}): {eps}; {} round(s) paid, {} declined",
                s.study,
                s.paid_rounds.len(),
                s.declined.len()
            )?;
            match &s.columns_read {
                Some(c) => writeln!(
                    f,
                    "  columns read: {} ({} check(s) allowed, {} refused, {} to {})",
                    if c.columns.is_empty() {
                        "none recorded".to_string()
                    } else {
                        c.columns.join(", ")
                    },
                    c.checks_allowed,
                    c.checks_refused,
                    utc_datetime(c.first_at),
                    utc_datetime(c.last_at)
                )?,
                None => writeln!(f, "  columns read: not recorded")?,
            }
            for r in &s.paid_rounds {
                writeln!(
                    f,
                    "  round {:>5} paid {}: q {:.4} sigma {:.4} steps {} (for {})",
                    r.round,
                    utc_datetime(r.at),
                    r.q,
                    r.sigma,
                    r.steps,
                    r.coordinator
                )?;
            }
            for d in &s.declined {
                writeln!(
                    f,
                    "  round {:>5} declined {}: {}",
                    d.round,
                    utc_datetime(d.at),
                    d.reason
                )?;
            }
        }
        Ok(())
    }
}

pub use fedpriv_common::time::utc_datetime;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::audit_file::AuditLog;
    use fedpriv_common::dp::accountant::AccountantKind;
    use fedpriv_common::dp::SgmEvent;
    use serde_json::json;

    fn config(dir: &Path) -> SiteConfig {
        let study = |id: &str, cap: f64| {
            format!(
                "[studies.{id}]\nsource = \"wards\"\nepsilon_cap = {cap:?}\nunit = \"record\"\n\
                 task = \"binary\"\nlabel = \"y\"\nfeatures = [\"age\", \"bmi\"]\nclip_norm = 1.0\n\
                 min_noise_multiplier = 1.0\nmax_sample_rate = 0.5\nmax_steps_per_round = 50\n\
                 max_delta = 1e-6\n\n"
            )
        };
        let toml = format!(
            "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\naccountant = \"rdp\"\n\n\
             [coordinator]\naddress = \"127.0.0.1:7443\"\nserver_name = \"localhost\"\n\n\
             [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
             [sources.wards]\npath = \"a.csv\"\nrecords = 500\ndelta = 1e-5\nepsilon_cap = 10.0\n\n{}{}",
            study("s1", 3.0),
            study("s2", 1.0)
        );
        let toml = toml.as_str();
        SiteConfig::from_toml(toml, dir).unwrap()
    }

    fn ev(q: f64) -> SgmEvent {
        SgmEvent::new(q, 1.1, 20).unwrap()
    }

    /// A site that took part in two studies: s1 twice (columns age, bmi, y), s2 once
    /// (columns age, y) plus a declined round, and a third study refused by the column check.
    fn site(dir: &Path) -> SiteConfig {
        let cfg = config(dir);
        std::fs::create_dir_all(&cfg.state_dir).unwrap();
        let mut ledger = SiteLedger::open(cfg.state_dir.join("site-ledger.db")).unwrap();
        let mut log = AuditLog::open(crate::daemon::audit_path(&cfg)).unwrap();
        // s1 as today's daemon records it (terms accepted, with the columns); s2 as a daemon
        // before pinned terms did (a column check); s3 refused.
        log.append(
            "st-marys",
            AuditEvent::StudyAccepted,
            json!({"study": "s1", "action": "announcement", "outcome": "accepted", "columns": ["age", "bmi", "y"]}),
            1_000,
        )
        .unwrap();
        log.append(
            "st-marys",
            AuditEvent::ColumnCheck,
            json!({"study": "s2", "check": {"checked": ["age", "y"]}, "outcome": "allowed"}),
            1_001,
        )
        .unwrap();
        log.append(
            "st-marys",
            AuditEvent::Refused,
            json!({"study": "s3", "action": "announcement", "outcome": "refused", "reason": "terms_differ"}),
            1_002,
        )
        .unwrap();
        for (study, round, q, at) in [
            ("s1", 0, 0.1, 1_010),
            ("s2", 0, 0.2, 1_020),
            ("s1", 1, 0.1, 1_030),
        ] {
            ledger
                .record_spend(study, round, ev(q), "coordinator/main", at)
                .unwrap();
            log.append(
                "st-marys",
                AuditEvent::BudgetSpent,
                json!({"study": study, "round": round, "delta": 1e-6}),
                at,
            )
            .unwrap();
        }
        ledger
            .record_refusal("s2", 1, "coordinator/main", "over the site's cap", 1_040)
            .unwrap();
        // The daemon keeps both open while an inventory runs.
        std::mem::forget(ledger);
        std::mem::forget(log);
        cfg
    }

    #[test]
    fn inventory_of_two_studies_from_the_sites_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = site(dir.path());
        let inv = build(&cfg).unwrap();
        assert!(inv.audit_log.verified, "{:?}", inv.audit_log);
        assert_eq!(inv.audit_log.records, 6);
        let ids: Vec<&str> = inv.studies.iter().map(|s| s.study.as_str()).collect();
        assert_eq!(ids, ["s1", "s2", "s3"]);
        let s1 = &inv.studies[0];
        let rounds: Vec<(u64, i64)> = s1.paid_rounds.iter().map(|r| (r.round, r.at)).collect();
        assert_eq!(rounds, [(0, 1_010), (1, 1_030)]);
        let cols = s1.columns_read.as_ref().unwrap();
        assert_eq!(cols.columns, ["age", "bmi", "y"]);
        let eps = s1.epsilon_spent.as_ref().unwrap();
        assert_eq!(eps.delta, 1e-6);
        let expected = accountant::epsilon(
            AccountantKind::Rdp,
            &[ev(0.1), ev(0.1)],
            Delta::new(1e-6).unwrap(),
        )
        .unwrap();
        assert_eq!(eps.epsilon, expected);
        assert_eq!(s1.epsilon_cap, Some(3.0));
        let s2 = &inv.studies[1];
        assert_eq!(s2.paid_rounds.len(), 1);
        assert_eq!(s2.declined.len(), 1);
        assert_eq!(s2.columns_read.as_ref().unwrap().columns, ["age", "y"]);
        let s3 = &inv.studies[2];
        assert!(s3.paid_rounds.is_empty() && s3.epsilon_spent.is_none());
        let c3 = s3.columns_read.as_ref().unwrap();
        assert!(c3.columns.is_empty());
        assert_eq!((c3.checks_allowed, c3.checks_refused), (0, 1));
        assert_eq!(s3.epsilon_cap, None);
        let text = inv.to_string();
        assert!(text.contains("columns read: age, bmi, y"), "{text}");
        assert!(text.contains("nothing to prune"), "{text}");
    }

    #[test]
    fn a_log_that_does_not_verify_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = site(dir.path());
        let path = crate::daemon::audit_path(&cfg);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("\"bmi\"", "\"bmj\"", 1)).unwrap();
        let inv = build(&cfg).unwrap();
        assert!(!inv.audit_log.verified);
        assert!(inv.audit_log.problem.is_some());
        assert!(inv
            .studies
            .iter()
            .all(|s| s.columns_read.is_none() && s.epsilon_spent.is_none()));
        // The ledger's part stands.
        assert_eq!(inv.studies[0].paid_rounds.len(), 2);
    }

    #[test]
    fn missing_ledger_is_an_error_and_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let err = build(&cfg).unwrap_err();
        assert!(err.contains("no site ledger"), "{err}");
        assert!(!cfg.state_dir.join("site-ledger.db").exists());
    }
}
