//! Data inventory and lineage: `fedpriv-coordinator inventory`. Which studies touched which
//! site's data, when, and which model versions came from it; per study, its sites.
//!
//! Built from the state database alone, opened read-only, so it runs beside a running
//! coordinator and never changes the state. Two kinds of use are kept apart, because they
//! mean different things: a *charged* round is one whose task was paid for from the site's
//! budget (the task was sent; the site may have declined it or its update may have been
//! refused), a *contributed* round is one whose model version includes the site's update
//! (the store's lineage). A site's inventory never lists another site's contributions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::retention::utc_datetime;
use crate::store::{ModelVersionRow, RoundStatus, Store, StoreError, StudyStatus};

/// Why no inventory could be made.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(
        "no state database at {} (is --state the coordinator's state directory?)",
        .0.display()
    )]
    NoState(std::path::PathBuf),
    #[error("no study {0:?} in the state database")]
    NoStudy(String),
    #[error("site {0:?} is enrolled in no study (of those selected)")]
    NoSite(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// A model version as the inventory names it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRef {
    pub round: u64,
    pub sha256: String,
    pub created_at: i64,
    /// The checkpoint, relative to the state directory; `None` once pruned.
    pub file: Option<String>,
    /// When the retention policy removed the file.
    pub pruned_at: Option<i64>,
}

impl ModelRef {
    fn of(v: &ModelVersionRow) -> Self {
        Self {
            round: v.round,
            sha256: v.sha256.clone(),
            created_at: v.created_at,
            file: v.pruned.is_none().then(|| v.file.clone()),
            pruned_at: v.pruned.map(|p| p.at),
        }
    }

    fn where_(&self) -> String {
        match (&self.file, self.pruned_at) {
            (_, Some(at)) => format!("pruned on {}", utc_datetime(at)),
            (Some(f), None) => f.clone(),
            (None, None) => "no file".into(),
        }
    }
}

/// A round whose task was paid for from the site's budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChargedRound {
    pub round: u64,
    pub charged_at: i64,
    pub round_status: RoundStatus,
}

/// A round whose model version includes the site's update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contribution {
    pub round: u64,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub model: ModelRef,
}

/// One study as seen from one site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteStudy {
    pub study: String,
    pub study_status: StudyStatus,
    /// The record count the site reported when it loaded its data, if it did.
    pub records_reported: Option<u64>,
    pub charged_rounds: Vec<ChargedRound>,
    pub contributed_rounds: Vec<Contribution>,
}

/// Everything the coordinator knows about one site's data use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteInventory {
    pub site: String,
    pub studies: Vec<SiteStudy>,
}

/// A model version with the sites whose updates made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionLineage {
    #[serde(flatten)]
    pub model: ModelRef,
    pub sites: Vec<String>,
}

/// One study: its sites and its versions' lineage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudyInventory {
    pub study: String,
    pub status: StudyStatus,
    pub created_at: i64,
    pub enrolled: Vec<String>,
    /// Sites with at least one update in a model version.
    pub contributors: Vec<String>,
    pub versions: Vec<VersionLineage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    pub sites: Vec<SiteInventory>,
    pub studies: Vec<StudyInventory>,
}

/// Opens the state database in `state_dir` read-only and builds the inventory, limited to
/// one study and/or one site when asked.
pub fn inventory_of(
    state_dir: &Path,
    study: Option<&str>,
    site: Option<&str>,
) -> Result<Inventory, InventoryError> {
    let db = state_dir.join("coordinator.db");
    let store = match Store::open_read_only(&db) {
        Ok(s) => s,
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(InventoryError::NoState(db))
        }
        Err(e) => return Err(e.into()),
    };
    build(&store, study, site)
}

/// The inventory from an open store.
pub fn build(
    store: &Store,
    study: Option<&str>,
    site: Option<&str>,
) -> Result<Inventory, InventoryError> {
    let studies: Vec<_> = store
        .studies()?
        .into_iter()
        .filter(|s| study.is_none_or(|id| s.id == id))
        .collect();
    if let (Some(id), true) = (study, studies.is_empty()) {
        return Err(InventoryError::NoStudy(id.to_string()));
    }
    let mut per_site: BTreeMap<String, Vec<SiteStudy>> = BTreeMap::new();
    let mut out_studies = Vec::new();
    for s in &studies {
        let enrolled = store.enrolments(&s.id)?;
        if site.is_some_and(|x| !enrolled.iter().any(|e| e == x)) {
            continue;
        }
        let rounds: BTreeMap<u64, _> = store
            .rounds(&s.id)?
            .into_iter()
            .map(|r| (r.round, r))
            .collect();
        let versions: BTreeMap<u64, ModelRef> = store
            .model_versions(&s.id)?
            .iter()
            .map(|v| (v.round, ModelRef::of(v)))
            .collect();
        let lineage = store.lineage(&s.id)?;
        let records = store.site_records(&s.id)?;
        let ledger = store.ledger(&s.id)?;
        for name in enrolled.iter().filter(|e| site.is_none_or(|x| x == *e)) {
            let charged_rounds = ledger
                .iter()
                .filter(|l| &l.site == name)
                .filter_map(|l| {
                    rounds.get(&l.round).map(|r| ChargedRound {
                        round: l.round,
                        charged_at: l.recorded_at,
                        round_status: r.status,
                    })
                })
                .collect();
            let contributed_rounds = lineage
                .iter()
                .filter(|(_, sites)| sites.contains(name))
                .filter_map(|(round, _)| {
                    let r = rounds.get(round)?;
                    Some(Contribution {
                        round: *round,
                        started_at: r.started_at,
                        finished_at: r.finished_at,
                        model: versions.get(round)?.clone(),
                    })
                })
                .collect();
            per_site.entry(name.clone()).or_default().push(SiteStudy {
                study: s.id.clone(),
                study_status: s.status,
                records_reported: records.get(name).copied(),
                charged_rounds,
                contributed_rounds,
            });
        }
        let contributors: BTreeSet<String> = lineage
            .iter()
            .flat_map(|(_, sites)| sites.iter().cloned())
            .collect();
        let by_round: BTreeMap<u64, Vec<String>> = lineage.into_iter().collect();
        out_studies.push(StudyInventory {
            study: s.id.clone(),
            status: s.status,
            created_at: s.created_at,
            enrolled,
            contributors: contributors.into_iter().collect(),
            versions: versions
                .into_values()
                .map(|model| VersionLineage {
                    sites: by_round.get(&model.round).cloned().unwrap_or_default(),
                    model,
                })
                .collect(),
        });
    }
    if let (Some(x), true) = (site, per_site.is_empty()) {
        return Err(InventoryError::NoSite(x.to_string()));
    }
    Ok(Inventory {
        sites: per_site
            .into_iter()
            .map(|(site, studies)| SiteInventory { site, studies })
            .collect(),
        studies: out_studies,
    })
}

impl std::fmt::Display for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.sites {
            writeln!(f, "site {}", s.site)?;
            for st in &s.studies {
                let records = st
                    .records_reported
                    .map(|n| format!("{n} records reported"))
                    .unwrap_or_else(|| "no record count reported".into());
                writeln!(
                    f,
                    "  study {} ({}): {records}; {} round(s) charged, {} contributed",
                    st.study,
                    st.study_status.as_str(),
                    st.charged_rounds.len(),
                    st.contributed_rounds.len()
                )?;
                for c in &st.charged_rounds {
                    let model = st
                        .contributed_rounds
                        .iter()
                        .find(|k| k.round == c.round)
                        .map(|k| {
                            format!(
                                "contributed to version sha256 {} ({})",
                                k.model.sha256,
                                k.model.where_()
                            )
                        })
                        .unwrap_or_else(|| "no update in a model version".into());
                    writeln!(
                        f,
                        "    round {:>5} charged {} ({}): {model}",
                        c.round,
                        utc_datetime(c.charged_at),
                        c.round_status.as_str()
                    )?;
                }
            }
        }
        for s in &self.studies {
            writeln!(
                f,
                "study {} ({}, created {}): enrolled {}; contributors {}",
                s.study,
                s.status.as_str(),
                utc_datetime(s.created_at),
                list(&s.enrolled),
                list(&s.contributors)
            )?;
            for v in &s.versions {
                writeln!(
                    f,
                    "  version round {:>5} ({}): sha256 {}, {}; sites {}",
                    v.model.round,
                    utc_datetime(v.model.created_at),
                    v.model.sha256,
                    v.model.where_(),
                    list(&v.sites)
                )?;
            }
        }
        Ok(())
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}
