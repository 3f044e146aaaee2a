//! From a state directory to a [`ReportData`]: the database opened read-only (the report
//! runs beside a running coordinator and changes nothing), the audit log read page by page
//! as `admin audit` serves it.
//!
//! The same sources as the other commands: the study row and its config as `ledger show`
//! reads them, the study's and each site's epsilon by the same function
//! (`admin::serve::per_site_epsilon`: the accountant over the recorded spends), rounds,
//! lineage and model versions from the store as `inventory` reads them. The per-round
//! curves are the accountant over each site's spends up to that round: epsilons are never
//! added up.

use std::collections::BTreeMap;
use std::path::Path;

use fedpriv_common::audit::details::{Alert, ModelExported, Refused, UpdateRejected};
use fedpriv_common::audit::{decode_line, AuditEvent, AuditRecord};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::dp::accountant;
use fedpriv_common::dp::SgmEvent;

use super::{
    AuditItem, EpsilonPoint, EvalPoint, ExportInfo, ModelInfo, PerSite, ReportData, ReportError,
    RoundInfo, RoundParticipants, SiteSeries, Terms, Visibility,
};
use crate::store::{Store, StoreError};

/// Records per page when reading the audit log (the admin channel's reader).
const PAGE_RECORDS: usize = 10_000;
const PAGE_BYTES: usize = 16 << 20;

fn state(e: impl std::fmt::Display) -> ReportError {
    ReportError::State(e.to_string())
}

/// Gathers the report of `study` from the state directory `state_dir`; `now` is when the
/// report is made.
pub fn gather(state_dir: &Path, study: &str, now: i64) -> Result<ReportData, ReportError> {
    let db = state_dir.join("coordinator.db");
    let store = match Store::open_read_only(&db) {
        Ok(s) => s,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReportError::NoState(db))
        }
        Err(e) => return Err(state(e)),
    };
    let log = state_dir.join("audit.log");
    let records = read_audit(&log)?;
    let audit_log = if log.exists() {
        match fedpriv_common::audit_file::verify_file(&log) {
            Ok(report) => report.to_string(),
            Err(e) => format!("cannot be verified: {e}"),
        }
    } else {
        "no audit log in the state directory".to_string()
    };
    from_store(&store, study, &records, audit_log, now)
}

/// Every well-formed record of the log, in order (a line that does not parse is left out
/// here; `audit_log` in the report says whether the log verifies).
fn read_audit(path: &Path) -> Result<Vec<AuditRecord>, ReportError> {
    let mut out = Vec::new();
    let mut from = 1u64;
    loop {
        let (lines, next) = crate::admin::audit_page(path, from, PAGE_RECORDS, PAGE_BYTES)
            .map_err(|e| ReportError::State(format!("{}: {e}", path.display())))?;
        out.extend(lines.lines().filter_map(decode_line));
        match next {
            Some(n) if n > from => from = n,
            _ => return Ok(out),
        }
    }
}

/// The report from an open store and the audit log's records.
pub fn from_store(
    store: &Store,
    study: &str,
    records: &[AuditRecord],
    audit_log: String,
    now: i64,
) -> Result<ReportData, ReportError> {
    let row = store
        .study(study)
        .map_err(state)?
        .ok_or_else(|| ReportError::NoStudy(study.to_string()))?;
    let cfg = StudyConfig::from_toml(&row.config_toml)
        .map_err(|e| state(format!("the stored config of study {study}: {e}")))?;
    let p = &cfg.privacy;
    let visibility = Visibility::of(p.unit, p.placement);

    // The study's and each site's epsilon now: what `ledger show` prints.
    let (final_map, epsilon_spent) =
        crate::admin::serve::per_site_epsilon(store, study, &cfg).map_err(state)?;

    // Each site's epsilon after each round it paid for: the accountant over its spends up
    // to that round, a round's evaluation charge included.
    let ledger = store.ledger(study).map_err(state)?;
    let evaluation_charges = store.evaluation_ledger(study).map_err(state)?;
    let mut by_site: BTreeMap<&str, Vec<(u64, SgmEvent)>> = BTreeMap::new();
    for r in ledger.iter().chain(&evaluation_charges) {
        by_site
            .entry(r.site.as_str())
            .or_default()
            .push((r.round, r.event));
    }
    let mut curves: BTreeMap<String, Vec<EpsilonPoint>> = BTreeMap::new();
    for (site, spends) in &mut by_site {
        spends.sort_by_key(|(round, _)| *round);
        let events: Vec<SgmEvent> = spends.iter().map(|(_, e)| *e).collect();
        let mut points: Vec<EpsilonPoint> = Vec::with_capacity(spends.len());
        for (i, (round, _)) in spends.iter().enumerate() {
            // One point per round, after every charge of that round.
            if spends.get(i + 1).is_some_and(|(next, _)| next == round) {
                continue;
            }
            let epsilon = accountant::epsilon(p.accountant, &events[..=i], p.delta)
                .map_err(|e| state(format!("site {site} round {round}: {e}")))?;
            points.push(EpsilonPoint {
                round: *round,
                epsilon,
            });
        }
        curves.insert((*site).to_string(), points);
    }
    let study_epsilon = study_curve(&curves);

    let lineage: BTreeMap<u64, Vec<String>> =
        store.lineage(study).map_err(state)?.into_iter().collect();
    let per_site = match visibility {
        Visibility::StudyOnly => None,
        Visibility::PerSite => {
            let mut sites: BTreeMap<String, SiteSeries> = BTreeMap::new();
            for site in store.enrolments(study).map_err(state)? {
                sites.insert(
                    site.clone(),
                    SiteSeries {
                        site,
                        points: Vec::new(),
                        epsilon: 0.0,
                    },
                );
            }
            for (site, points) in &curves {
                let s = sites.entry(site.clone()).or_insert_with(|| SiteSeries {
                    site: site.clone(),
                    points: Vec::new(),
                    epsilon: 0.0,
                });
                s.points = points.clone();
            }
            for (site, eps) in &final_map {
                if let (Some(s), Some(e)) = (sites.get_mut(site), eps.as_f64()) {
                    s.epsilon = e;
                }
            }
            let mut charged: BTreeMap<u64, Vec<String>> = BTreeMap::new();
            for r in &ledger {
                charged.entry(r.round).or_default().push(r.site.clone());
            }
            let participants = charged
                .into_iter()
                .map(|(round, charged)| RoundParticipants {
                    round,
                    charged,
                    contributed: lineage.get(&round).cloned().unwrap_or_default(),
                })
                .collect();
            Some(PerSite {
                sites: sites.into_values().collect(),
                participants,
            })
        }
    };

    let rounds = store
        .rounds(study)
        .map_err(state)?
        .into_iter()
        .map(|r| RoundInfo {
            round: r.round,
            status: r.status.as_str().to_string(),
            started_at: r.started_at,
            finished_at: r.finished_at,
            // "2 of 3 update(s) arrived": a count of who took part.
            reason: match visibility {
                Visibility::PerSite => r.reason,
                Visibility::StudyOnly => None,
            },
        })
        .collect();

    let other_studies: Vec<String> = store
        .studies()
        .map_err(state)?
        .into_iter()
        .map(|s| s.id)
        .filter(|id| id != study)
        .collect();
    let audit = from_audit(records, study, visibility, &other_studies);

    let models = store
        .model_versions(study)
        .map_err(state)?
        .into_iter()
        .map(|v| ModelInfo {
            round: v.round,
            contributors: match visibility {
                Visibility::PerSite => Some(lineage.get(&v.round).map_or(0, Vec::len)),
                Visibility::StudyOnly => None,
            },
            exports: audit.exports.get(&v.round).cloned().unwrap_or_default(),
            sha256: v.sha256,
            created_at: v.created_at,
            pruned_at: v.pruned.map(|p| p.at),
        })
        .collect();

    Ok(ReportData {
        study: row.id,
        status: row.status.as_str().to_string(),
        end_reason: row.end_reason,
        created_at: row.created_at,
        generated_at: now,
        terms: Terms {
            unit: crate::assess::unit_text(&cfg).to_string(),
            placement: match p.placement {
                fedpriv_common::config::Placement::Local => "local",
                fedpriv_common::config::Placement::Central => "central",
            }
            .to_string(),
            clip_norm: p.clip_norm.get(),
            clipped: match p.unit {
                fedpriv_common::config::PrivacyUnit::Record => "each record's gradient",
                fedpriv_common::config::PrivacyUnit::Site => "each site's model update",
            }
            .to_string(),
            noise_multiplier: p.noise_multiplier.get(),
            epsilon_budget: p.epsilon.get(),
            delta: p.delta.get(),
            accountant: p.accountant.as_str().to_string(),
            site_sample_rate: p.site_sample_rate.get(),
            rounds_planned: cfg.rounds,
            min_sites: cfg.min_sites,
            local_training: crate::assess::local_plan_text(&cfg),
            protection: crate::assess::protection_text(&cfg),
            mechanism_sha256: cfg.mechanism_digest(),
        },
        visibility,
        enrolled: cfg.enrolled.len(),
        epsilon_spent,
        study_epsilon,
        per_site,
        rounds,
        models,
        refusals: audit.refusals,
        alerts: audit.alerts,
        withheld_records: audit.withheld,
        service_wide_records: audit.service_wide,
        evaluations: evaluation_points(store, study, &cfg)?,
        audit_log,
    })
}

/// The study's DP evaluations as plot points, at the model each one measured: accuracy or
/// RMSE and the mean loss, each with the noise's standard deviation on it (first order).
fn evaluation_points(
    store: &Store,
    study: &str,
    cfg: &StudyConfig,
) -> Result<Vec<EvalPoint>, ReportError> {
    let mut out = Vec::new();
    for e in store.evaluations(study).map_err(state)? {
        let s = &e.summary;
        let point = |metric: &str, value: f64, noise_sd: f64| EvalPoint {
            round: e.model_round,
            metric: metric.to_string(),
            value,
            noise_sd,
        };
        if let (Some(a), Some(sd)) = (s.accuracy, s.accuracy_sd) {
            out.push(point("accuracy", a, sd));
        }
        if let Some(rmse) = s.rmse {
            let width = cfg
                .data
                .label_range
                .map_or(1.0, |r| f64::from(r[1]) - f64::from(r[0]));
            // d sqrt(m) = dm / (2 sqrt(m)), in label units.
            let sd = width * s.mean_loss_sd / (2.0 * s.mean_loss.max(1e-12).sqrt());
            out.push(point("rmse", rmse, sd));
        }
        out.push(point("mean loss", s.mean_loss, s.mean_loss_sd));
    }
    Ok(out)
}

/// The study's epsilon after each round that charged anyone: the worst site's value at its
/// latest round up to then (a maximum of accountant figures, not a sum).
fn study_curve(curves: &BTreeMap<String, Vec<EpsilonPoint>>) -> Vec<EpsilonPoint> {
    let mut rounds: Vec<u64> = curves.values().flatten().map(|p| p.round).collect();
    rounds.sort_unstable();
    rounds.dedup();
    rounds
        .into_iter()
        .map(|round| EpsilonPoint {
            round,
            epsilon: curves
                .values()
                .filter_map(|pts| pts.iter().rev().find(|p| p.round <= round))
                .map(|p| p.epsilon)
                .fold(0.0, f64::max),
        })
        .collect()
}

/// What the audit log says about the study.
#[derive(Debug, Default)]
struct FromAudit {
    refusals: Vec<AuditItem>,
    alerts: Vec<AuditItem>,
    exports: BTreeMap<u64, Vec<ExportInfo>>,
    withheld: usize,
    service_wide: usize,
}

fn from_audit(
    records: &[AuditRecord],
    study: &str,
    visibility: Visibility,
    other_studies: &[String],
) -> FromAudit {
    let mut out = FromAudit::default();
    let hidden = visibility == Visibility::StudyOnly;
    let item = |rec: &AuditRecord, subject: &str, what: String, detail: &str| AuditItem {
        seq: rec.seq,
        at: rec.ts,
        event: rec.event.as_str().to_string(),
        subject: subject.to_string(),
        what,
        detail: detail.to_string(),
    };
    let prefix = format!("study {study} ");
    for rec in records {
        let d = rec.details.clone();
        match rec.event {
            AuditEvent::ModelExported => {
                if let Ok(e) = serde_json::from_value::<ModelExported>(d) {
                    if e.study == study {
                        out.exports
                            .entry(e.model_version)
                            .or_default()
                            .push(ExportInfo {
                                at: rec.ts,
                                by: e.by,
                                to: e.to,
                            });
                    }
                }
            }
            AuditEvent::UpdateRejected => {
                if let Ok(r) = serde_json::from_value::<UpdateRejected>(d) {
                    if r.study != study {
                        continue;
                    }
                    if hidden {
                        // Names a site that took part in a round.
                        out.withheld += 1;
                    } else {
                        out.refusals.push(item(
                            rec,
                            &r.site,
                            format!("update of round {}", r.round),
                            &r.reason,
                        ));
                    }
                }
            }
            AuditEvent::Refused => match serde_json::from_value::<Refused>(d) {
                Ok(Refused::Request {
                    identity,
                    action,
                    reason,
                    study: Some(s),
                    ..
                }) => {
                    if s == study {
                        out.refusals.push(item(rec, &identity, action, &reason));
                    }
                }
                Ok(Refused::Export {
                    action,
                    study: s,
                    model_version,
                    reason,
                }) => {
                    if s == study {
                        let what = format!("{action} (version {model_version})");
                        out.refusals.push(item(rec, &rec.actor, what, &reason));
                    }
                }
                Ok(Refused::Request { study: None, .. } | Refused::Summary { .. }) | Err(_) => {
                    out.service_wide += 1;
                }
            },
            AuditEvent::ConnectionRefused => out.service_wide += 1,
            AuditEvent::Alert => {
                let Ok(a) = serde_json::from_value::<Alert>(d) else {
                    continue;
                };
                let ours = a.subject == study || a.detail.starts_with(&prefix);
                let theirs = other_studies
                    .iter()
                    .any(|o| a.subject == *o || a.detail.starts_with(&format!("study {o} ")));
                if ours {
                    if hidden && a.subject != study {
                        // About one site in one round.
                        out.withheld += 1;
                    } else {
                        out.alerts.push(item(rec, &a.subject, a.kind, &a.detail));
                    }
                } else if !theirs {
                    out.service_wide += 1;
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fedpriv_common::test_util::StudyBuilder;

    fn record(seq: u64, event: AuditEvent, details: serde_json::Value) -> AuditRecord {
        AuditRecord {
            seq,
            ts: 1_700_000_000 + seq as i64,
            actor: "coordinator".into(),
            event,
            details,
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn the_study_curve_is_the_worst_site_at_each_round() {
        let mut curves = BTreeMap::new();
        let pt = |round, epsilon| EpsilonPoint { round, epsilon };
        curves.insert("a".to_string(), vec![pt(0, 0.5), pt(1, 0.8), pt(3, 1.1)]);
        curves.insert("b".to_string(), vec![pt(1, 0.9), pt(2, 1.0)]);
        assert_eq!(
            study_curve(&curves),
            vec![pt(0, 0.5), pt(1, 0.9), pt(2, 1.0), pt(3, 1.1)]
        );
    }

    /// A state directory with a real store: one study, two sites, two rounds.
    fn store_with(placement: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StudyBuilder::new("s")
            .placement(placement)
            .enrolled(["north-site", "south-site"])
            .noise(1.0, 50.0)
            .rounds(2);
        let toml = cfg.toml();
        let parsed = cfg.config().unwrap();
        let mut store = Store::open(dir.path().join("coordinator.db")).unwrap();
        store
            .create_study("s", &toml, &parsed.enrolled, 1_700_000_000)
            .unwrap();
        let ev = SgmEvent::new(1.0, 2.0, 1).unwrap();
        for round in 0..2u64 {
            let entries: Vec<(String, SgmEvent, f64)> = parsed
                .enrolled
                .iter()
                .map(|s| (s.clone(), ev, 0.0))
                .collect();
            store
                .record_spend("s", round, &entries, 1_700_000_010)
                .unwrap();
            store
                .complete_round(
                    "s",
                    round,
                    &format!("models/s/{round}.sealed"),
                    &"ab".repeat(32),
                    &parsed.enrolled,
                    1_700_000_020,
                )
                .unwrap();
        }
        (dir, store)
    }

    #[test]
    fn local_placement_shows_sites_and_central_hides_them() {
        let rejected = |site: &str| {
            record(
                1,
                AuditEvent::UpdateRejected,
                serde_json::json!({"study": "s", "round": 1, "site": site, "reason": "norm too large"}),
            )
        };
        let (_d, store) = store_with("local");
        let r = from_store(&store, "s", &[rejected("north-site")], String::new(), 0).unwrap();
        let per_site = r.per_site.as_ref().unwrap();
        assert_eq!(per_site.sites.len(), 2);
        assert_eq!(per_site.participants.len(), 2);
        assert_eq!(per_site.sites[0].points.len(), 2);
        assert_eq!(r.refusals.len(), 1);
        assert!(r.models.iter().all(|m| m.contributors == Some(2)));
        // Composition, not a sum: two rounds cost less than twice one.
        let pts = &per_site.sites[0].points;
        assert!(pts[1].epsilon > pts[0].epsilon && pts[1].epsilon < 2.0 * pts[0].epsilon);
        assert_eq!(r.study_epsilon.len(), 2);
        assert!((r.epsilon_spent - pts[1].epsilon).abs() < 1e-12);

        let html = crate::report::render(&r).unwrap();
        assert!(html.contains("north-site") && html.contains("south-site"));
        assert!(html.contains("data-plot=\"sites\""));

        let (_d, store) = store_with("central");
        let r = from_store(&store, "s", &[rejected("north-site")], String::new(), 0).unwrap();
        assert_eq!(r.visibility, Visibility::StudyOnly);
        assert!(r.per_site.is_none());
        assert!(r.refusals.is_empty());
        assert_eq!(r.withheld_records, 1);
        assert!(r.models.iter().all(|m| m.contributors.is_none()));
        assert!(r.rounds.iter().all(|m| m.reason.is_none()));
        // The study's figure stays.
        assert_eq!(r.study_epsilon.len(), 2);
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("north-site"), "{json}");
        let html = crate::report::render(&r).unwrap();
        assert!(!html.contains("north-site") && !html.contains("south-site"));
        assert!(!html.contains("data-plot=\"sites\""));
    }

    #[test]
    fn audit_records_are_sorted_into_the_study_s_others_and_service_wide() {
        let recs = vec![
            record(
                1,
                AuditEvent::ModelExported,
                serde_json::json!({"study": "s", "model_version": 1, "sha256": "x", "by": "local/ana", "to": "/tmp/m"}),
            ),
            record(
                2,
                AuditEvent::Refused,
                serde_json::json!({"action": "model export", "study": "s", "model_version": 1, "reason": "withheld"}),
            ),
            record(
                3,
                AuditEvent::Refused,
                serde_json::json!({"identity": "site/x", "remote": "1.2.3.4:5", "action": "hello", "reason": "bad"}),
            ),
            record(
                4,
                AuditEvent::Alert,
                serde_json::json!({"kind": "budget_near", "subject": "s", "detail": "epsilon 0.9 of 1"}),
            ),
            record(
                5,
                AuditEvent::Alert,
                serde_json::json!({"kind": "budget_near", "subject": "other", "detail": "epsilon 0.9 of 1"}),
            ),
            record(
                6,
                AuditEvent::Alert,
                serde_json::json!({"kind": "repeated_refusals", "subject": "1.2.3.4", "detail": "10 refusals"}),
            ),
        ];
        let a = from_audit(&recs, "s", Visibility::PerSite, &["other".to_string()]);
        assert_eq!(a.exports[&1][0].by, "local/ana");
        assert_eq!(a.refusals.len(), 1);
        assert_eq!(a.refusals[0].detail, "withheld");
        assert_eq!(a.alerts.len(), 1);
        assert_eq!(a.service_wide, 2);
    }
}
