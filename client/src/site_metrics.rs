//! The site's figures in the Prometheus text format (`fedpriv-client run --metrics-listen`),
//! read from its own ledger at each scrape: tasks paid and declined (by reason) per study,
//! epsilon per study, and each data source's filter level against its cap. Only counts and
//! privacy figures the site's own tools (`ledger`, `inventory`) already show, served on
//! loopback to the site's own scraper; nothing about records, and nothing to the
//! coordinator.

use fedpriv_common::exposition::escape_label;

use crate::config::SiteConfig;
use crate::ledger_view;
use crate::store::SiteLedger;

/// One metric family: its header, then one sample per `(labels, value)`.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: Vec<(String, String)>) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in samples {
        out.push_str(&format!("{name}{{{labels}}} {value}\n"));
    }
}

fn label(key: &str, value: &str) -> String {
    format!("{key}=\"{}\"", escape_label(value))
}

/// Renders the site's metrics from its ledger (read-only).
pub fn render(cfg: &SiteConfig) -> Result<String, String> {
    let view = ledger_view::build(cfg)?;
    let ledger = SiteLedger::open_read_only(cfg.state_dir.join("site-ledger.db"))
        .map_err(|e| e.to_string())?;
    let mut declined = Vec::new();
    for st in &view.studies {
        let mut by_reason: std::collections::BTreeMap<String, u64> = Default::default();
        for r in ledger.refusals(&st.study).map_err(|e| e.to_string())? {
            *by_reason.entry(r.reason).or_default() += 1;
        }
        for (reason, n) in by_reason {
            let labels = format!("{},{}", label("study", &st.study), label("reason", &reason));
            declined.push((labels, n.to_string()));
        }
    }
    let mut out = String::new();
    family(
        &mut out,
        "fedpriv_site_tasks_paid_total",
        "counter",
        "Rounds this site paid for and sent an update for.",
        view.studies
            .iter()
            .map(|st| (label("study", &st.study), st.rounds_paid.to_string()))
            .collect(),
    );
    family(
        &mut out,
        "fedpriv_site_tasks_declined_total",
        "counter",
        "Tasks this site declined, by reason.",
        declined,
    );
    family(
        &mut out,
        "fedpriv_site_study_epsilon",
        "gauge",
        "Epsilon this site has spent on a study, at the study's delta.",
        view.studies
            .iter()
            .filter_map(|st| Some((label("study", &st.study), st.epsilon?.to_string())))
            .collect(),
    );
    family(
        &mut out,
        "fedpriv_site_source_epsilon",
        "gauge",
        "A data source's Renyi-filter level (the epsilon its cap is checked against).",
        view.sources
            .iter()
            .map(|so| (label("source", &so.source), so.filter_level.to_string()))
            .collect(),
    );
    family(
        &mut out,
        "fedpriv_site_source_epsilon_cap",
        "gauge",
        "A data source's epsilon cap in the site config.",
        view.sources
            .iter()
            .filter_map(|so| Some((label("source", &so.source), so.epsilon_cap?.to_string())))
            .collect(),
    );
    Ok(out)
}
