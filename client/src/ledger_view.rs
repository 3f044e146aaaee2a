//! `fedpriv-client ledger`: what this site has spent, per data source and per study, from
//! its own ledger alone (read-only, beside the running daemon).
//!
//! Per source: the cap and delta, the Rényi filter's level (the smallest cap under which
//! the filter would have admitted every event so far; the cap is what is guaranteed, under
//! fully adaptive composition), and beside it the PLD figure for the same events composed
//! as if they had been fixed in advance (tighter, but not a guarantee when later studies were
//! chosen after earlier results). Per study: its cap, delta, epsilon (the site's accountant
//! over its events), rounds paid and declined.

use std::collections::BTreeSet;

use fedpriv_common::dp::{accountant, pld, Delta};
use serde::Serialize;

use crate::config::SiteConfig;
use crate::store::{SiteLedger, StoreError};

/// One data source's spend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceSpend {
    pub source: String,
    /// The cap in the site config (`None` if the config no longer names the source).
    pub epsilon_cap: Option<f64>,
    pub delta: f64,
    /// The filter's level: how much of the cap the events so far use.
    pub filter_level: f64,
    /// PLD epsilon of the same events composed non-adaptively (for comparison only).
    pub pld_epsilon: Option<f64>,
    pub events: usize,
    pub studies: Vec<String>,
}

/// One study's spend at this site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudySpend {
    pub study: String,
    pub source: Option<String>,
    pub epsilon_cap: Option<f64>,
    /// The study's delta (from the terms it was paid under).
    pub delta: Option<f64>,
    /// The study's epsilon at that delta; `None` when its delta is unknown.
    pub epsilon: Option<f64>,
    pub rounds_paid: usize,
    /// Of those rounds, how many carried a DP evaluation (charged beside the training).
    pub evaluations_paid: usize,
    pub rounds_declined: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerView {
    pub site: String,
    pub sources: Vec<SourceSpend>,
    pub studies: Vec<StudySpend>,
}

fn e(e: StoreError) -> String {
    e.to_string()
}

/// Reads the site's ledger (read-only) into per-source and per-study figures.
pub fn build(cfg: &SiteConfig) -> Result<LedgerView, String> {
    let path = cfg.state_dir.join("site-ledger.db");
    let ledger = SiteLedger::open_read_only(&path).map_err(|err| match err {
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            format!(
                "no site ledger at {} (has this site run yet?)",
                path.display()
            )
        }
        other => other.to_string(),
    })?;
    let mut sources = Vec::new();
    for row in ledger.sources().map_err(e)? {
        let events = ledger.source_events(&row.name).map_err(e)?;
        let filter_level = fedpriv_common::dp::filter::level(&events, &row.orders, row.delta)
            .map_err(|err| err.to_string())?
            .0;
        sources.push(SourceSpend {
            epsilon_cap: cfg.sources.get(&row.name).map(|s| s.epsilon_cap.get()),
            delta: row.delta,
            filter_level,
            pld_epsilon: pld::epsilon(&events, row.delta).ok(),
            events: events.len(),
            studies: ledger.source_studies(&row.name).map_err(e)?,
            source: row.name,
        });
    }
    let mut ids: BTreeSet<String> = ledger.studies().map_err(e)?.into_iter().collect();
    ids.extend(ledger.refused_studies().map_err(e)?);
    let mut studies = Vec::new();
    for study in ids {
        let events = ledger.events(&study).map_err(e)?;
        let pinned = ledger.pinned_terms(&study).map_err(e)?;
        let delta = pinned.as_ref().and_then(|(_, t)| {
            serde_json::from_str::<serde_json::Value>(t)
                .ok()?
                .get("delta")?
                .as_f64()
        });
        let epsilon = match delta.map(Delta::new) {
            Some(Ok(d)) if !events.is_empty() => Some(
                accountant::epsilon(cfg.accountant, &events, d).map_err(|err| err.to_string())?,
            ),
            _ => None,
        };
        studies.push(StudySpend {
            source: pinned.map(|(s, _)| s),
            epsilon_cap: cfg.studies.get(&study).map(|s| s.epsilon_cap.get()),
            delta,
            epsilon,
            rounds_paid: ledger.spends(&study).map_err(e)?.len(),
            evaluations_paid: ledger.evaluation_rounds(&study).map_err(e)?.len(),
            rounds_declined: ledger.refusals(&study).map_err(e)?.len(),
            study,
        });
    }
    Ok(LedgerView {
        site: cfg.name.clone(),
        sources,
        studies,
    })
}

impl std::fmt::Display for LedgerView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "site {}", self.site)?;
        if self.sources.is_empty() && self.studies.is_empty() {
            return writeln!(f, "nothing spent yet");
        }
        for s in &self.sources {
            let cap = s
                .epsilon_cap
                .map(|c| format!("cap epsilon {c}"))
                .unwrap_or_else(|| "not in the config".into());
            let pld = s
                .pld_epsilon
                .map(|p| format!("{p:.4}"))
                .unwrap_or_else(|| "unbounded".into());
            writeln!(
                f,
                "source {} ({cap} at delta {}): filter level {:.4} over {} event(s) from {} ({} if composed non-adaptively, PLD)",
                s.source,
                s.delta,
                s.filter_level,
                s.events,
                s.studies.join(", "),
                pld
            )?;
        }
        for s in &self.studies {
            let cap = s
                .epsilon_cap
                .map(|c| format!("cap {c}"))
                .unwrap_or_else(|| "not in the config".into());
            let eps = match (s.epsilon, s.delta) {
                (Some(e), Some(d)) => format!("epsilon {e:.4} at delta {d}"),
                _ => "nothing paid".into(),
            };
            writeln!(
                f,
                "study {} (source {}, {cap}): {eps}; {} round(s) paid ({} with an evaluation), {} declined",
                s.study,
                s.source.as_deref().unwrap_or("-"),
                s.rounds_paid,
                s.evaluations_paid,
                s.rounds_declined
            )?;
        }
        Ok(())
    }
}
