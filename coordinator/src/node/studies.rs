//! The studies the owner runs: each study's round engine with what the owner keeps beside
//! it (the model's layout, the announcement sites see, the model body of the round being
//! sent out), how a study is built from the store (created, or resumed from its last
//! completed round), and the [`Directory`] the connection tasks read.
//!
//! Only the owner holds a [`Studies`]; everyone else sees the directory it publishes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use fedpriv_common::arch;
use fedpriv_common::audit::details::StudyCreated;
use fedpriv_common::config::{Placement, PrivacyUnit, Strategy, StudyConfig};
use fedpriv_common::model::{FlatModel, ModelSpec};
use fedpriv_common::protocol::StudyAnnouncement;
use fedpriv_common::quic_io::SharedBody;
use fedpriv_common::seal::SealKey;

use super::state::StateStore;
use crate::checkpoint;
use crate::error::ServerError;
use crate::round::StudyEngine;
use crate::store::{RoundStatus, StudyStatus};

/// One study as the owner runs it: the engine, and what the owner keeps beside it.
#[derive(Debug)]
pub struct StudyRuntime {
    pub(crate) engine: StudyEngine,
    pub(crate) meta: StudyMeta,
}

/// What the owner keeps beside a study's engine.
pub(crate) struct StudyMeta {
    spec: ModelSpec,
    announcement: StudyAnnouncement,
    /// The model body of the round being sent out, encoded once for every site.
    broadcast: Option<(u64, SharedBody)>,
}

impl std::fmt::Debug for StudyMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StudyMeta")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl StudyMeta {
    pub(crate) fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The body of `round`'s model for every site's task, encoded on first use; one body
    /// per round, shared by every site's send buffer (not one copy each).
    pub(crate) fn task_body(
        &mut self,
        round: u64,
        model: Arc<Vec<f32>>,
        dtype: fedpriv_common::wire::Dtype,
    ) -> SharedBody {
        match &self.broadcast {
            Some((r, body)) if *r == round => body.clone(),
            _ => {
                let body = SharedBody::encode(model, dtype);
                self.broadcast = Some((round, body.clone()));
                body
            }
        }
    }

    /// The study's terms as announced from now on (its sigma was calibrated).
    pub(crate) fn reannounce(
        &mut self,
        cfg: &fedpriv_common::config::StudyConfig,
    ) -> &StudyAnnouncement {
        self.announcement = StudyAnnouncement::for_study(cfg, &self.announcement.instance);
        &self.announcement
    }

    /// Every task of a round leaves in one batch; holding its body longer would keep the
    /// old model alive when the round closes and force a copy of it.
    pub(crate) fn drop_task_body(&mut self) {
        self.broadcast = None;
    }
}

impl StudyRuntime {
    pub fn engine(&self) -> &StudyEngine {
        &self.engine
    }

    pub fn announcement(&self) -> &StudyAnnouncement {
        &self.meta.announcement
    }

    pub fn is_enrolled(&self, site: &str) -> bool {
        self.engine.config().enrolled.iter().any(|s| s == site)
    }
}

/// Every study the owner runs, by id.
#[derive(Debug, Default)]
pub struct Studies {
    by_id: BTreeMap<String, StudyRuntime>,
}

impl Studies {
    pub fn get(&self, id: &str) -> Option<&StudyRuntime> {
        self.by_id.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut StudyRuntime> {
        self.by_id.get_mut(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn insert(&mut self, rt: StudyRuntime) {
        self.by_id.insert(rt.engine.config().id.clone(), rt);
    }

    pub fn ids(&self) -> Vec<String> {
        self.by_id.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &StudyRuntime)> {
        self.by_id.iter()
    }

    pub fn all_finished(&self) -> bool {
        self.by_id.values().all(|s| s.engine.is_finished())
    }

    /// The earliest time any study needs a tick (see [`StudyEngine::next_deadline`]).
    pub fn next_deadline(&self) -> Option<u64> {
        self.by_id
            .values()
            .filter_map(|s| s.engine.next_deadline())
            .min()
    }

    /// The sites enrolled in `study` (none if there is no such study).
    pub fn enrolled(&self, study: &str) -> Vec<String> {
        self.by_id
            .get(study)
            .map(|s| s.engine.config().enrolled.clone())
            .unwrap_or_default()
    }

    /// The announcements of the studies `site` is enrolled in (its welcome).
    pub fn announcements_for(&self, site: &str) -> Vec<StudyAnnouncement> {
        self.by_id
            .values()
            .filter(|s| s.is_enrolled(site))
            .map(|s| s.meta.announcement.clone())
            .collect()
    }

    /// Each study's model layout and enrolled sites, for the connection tasks.
    pub fn directory(&self) -> Directory {
        Arc::new(
            self.by_id
                .iter()
                .map(|(id, s)| {
                    let p = &s.engine.config().privacy;
                    let central = p.unit == PrivacyUnit::Site && p.placement == Placement::Central;
                    let entry = DirectoryEntry {
                        spec: s.meta.spec.clone(),
                        enrolled: s.engine.config().enrolled.clone(),
                        central,
                    };
                    (id.clone(), entry)
                })
                .collect(),
        )
    }
}

/// Per study, what a connection task needs to check a site's message before the owner sees
/// it; published by the owner after every change of its studies.
pub type Directory = Arc<HashMap<String, DirectoryEntry>>;

/// One study in the [`Directory`].
#[derive(Debug, Clone)]
pub struct DirectoryEntry {
    /// The model's layout (what an update must match).
    pub spec: ModelSpec,
    pub enrolled: Vec<String>,
    /// Updates are un-noised clipped deltas (central placement): no figure computed from
    /// one may be recorded or logged.
    pub central: bool,
}

impl DirectoryEntry {
    pub fn is_enrolled(&self, site: &str) -> bool {
        self.enrolled.iter().any(|s| s == site)
    }
}

/// The record of a study's creation, the same whether it came from a `--study` file or an
/// operator: who, the enrolled sites, the budget and unit, and the SHA-256 of its TOML.
pub fn study_created(cfg: &StudyConfig, by: &str, toml_text: &str) -> StudyCreated {
    StudyCreated {
        study: cfg.id.clone(),
        by: by.to_string(),
        enrolled: cfg.enrolled.clone(),
        epsilon: cfg.privacy.epsilon.get(),
        delta: cfg.privacy.delta.get(),
        unit: format!("{:?}", cfg.privacy.unit).to_lowercase(),
        sha256: fedpriv_common::digest::sha256_hex(toml_text.as_bytes()),
    }
}

/// The spec of a study's model.
pub fn study_spec(cfg: &StudyConfig) -> Result<ModelSpec, ServerError> {
    arch::spec_for_data(&cfg.model, &cfg.data, cfg.n_outputs())
        .map_err(|e| ServerError::Config(format!("study {}: {e}", cfg.id)))
}

/// Why a round the previous run left reserved is aborted when the studies load.
pub const INTERRUPTED: &str = "the coordinator stopped during the round (a model version \
                                   aggregated in it, if any, was not written)";

/// The rounds the last run left reserved, in every stored study (loaded or not: a study
/// stopped by a failed write keeps its reserved round), as `(study, round)`: the ones
/// [`load_studies`] aborts, for the caller to put on the audit trail first.
pub fn interrupted_rounds(store: &impl StateStore) -> Result<Vec<(String, u64)>, ServerError> {
    let mut out = Vec::new();
    for row in store.studies()? {
        for r in store.rounds(&row.id)? {
            if r.status == RoundStatus::Reserved {
                out.push((row.id.clone(), r.round));
            }
        }
    }
    Ok(out)
}

/// Builds each study's engine, creating new studies and resuming known ones from their
/// last completed round, then aborts the [`interrupted_rounds`] (every round ever reserved
/// is consumed, completed or not: its spend stands). Active studies in the store
/// that `studies` does not list (created by an operator at runtime) resume from their
/// stored config.
pub fn load_studies(
    store: &mut impl StateStore,
    state_dir: &Path,
    studies: &[(StudyConfig, String)],
    key: &SealKey,
    now: i64,
) -> Result<Studies, ServerError> {
    let interrupted = interrupted_rounds(store)?;
    let mut out = Studies::default();
    for (cfg, toml_text) in studies {
        out.insert(study_runtime(store, state_dir, cfg, toml_text, key, now)?);
    }
    for row in store.studies()? {
        if row.status != StudyStatus::Active || out.contains(&row.id) {
            continue;
        }
        let cfg = StudyConfig::from_toml(&row.config_toml)
            .map_err(|e| ServerError::Config(format!("stored study {}: {e}", row.id)))?;
        tracing::info!(study = %row.id, "resuming a study created at runtime");
        out.insert(study_runtime(
            store,
            state_dir,
            &cfg,
            &row.config_toml,
            key,
            now,
        )?);
    }
    // Only once every study loaded: a refused start (a wrong key, a damaged checkpoint)
    // changes nothing.
    for (study, round) in interrupted {
        store.abort_round(&study, round, INTERRUPTED, now)?;
    }
    Ok(out)
}

/// Builds one study's engine: creates the study in the store if it is new, else resumes it
/// from its last completed round. A study an operator changed at runtime (see
/// [`fedpriv_common::admin::apply_changes`]) keeps its stored config over `cfg`.
pub fn study_runtime(
    store: &mut impl StateStore,
    state_dir: &Path,
    cfg: &StudyConfig,
    toml_text: &str,
    key: &SealKey,
    now: i64,
) -> Result<StudyRuntime, ServerError> {
    let stored_cfg;
    let cfg = match store.study(&cfg.id)? {
        None => {
            store.create_study(&cfg.id, toml_text, &cfg.enrolled, now)?;
            cfg
        }
        Some(row) => {
            let stored = StudyConfig::from_toml(&row.config_toml)
                .map_err(|e| ServerError::Config(format!("stored study {}: {e}", cfg.id)))?;
            // The file still says `target_epsilon`; the store holds the sigma the coordinator
            // chose from the sites' sizes. The same study if the file, with that sigma
            // written in, is the stored one (or a runtime change of it).
            let as_calibrated = (cfg.privacy.calibrate_to.is_some()
                && stored.privacy.calibrate_to.is_none())
            .then(|| {
                fedpriv_common::admin::calibrated_study(
                    toml_text,
                    stored.privacy.noise_multiplier.get(),
                )
                .ok()
                .map(|(_, c)| c)
            })
            .flatten();
            let file = as_calibrated.as_ref().unwrap_or(cfg);
            if &stored == cfg {
                cfg
            } else if &stored == file || fedpriv_common::admin::is_runtime_change_of(file, &stored)
            {
                tracing::info!(study = %cfg.id, "this study's stored configuration (calibrated or changed at runtime) stands over the file's");
                stored_cfg = stored;
                &stored_cfg
            } else {
                return Err(ServerError::Config(format!(
                    "study {} already exists with a different configuration; a study's privacy terms cannot change once it has started (use a new study id)",
                    cfg.id
                )));
            }
        }
    };
    let spec = study_spec(cfg)?;
    let last = store.last_completed_round(&cfg.id)?;
    let global = match last.clone() {
        Some((round, file, sha)) => {
            let path = state_dir.join(&file);
            // Authenticated (and digest-checked) in full before a byte is parsed.
            let mut bytes = Vec::with_capacity(spec.num_values() * 4 + 4096);
            checkpoint::read_checkpoint(key, &path, &cfg.id, round, Some(&sha), &mut bytes)?;
            let model = FlatModel::from_safetensors_bytes(&bytes, Some(&spec))
                .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
            model.values
        }
        None => {
            arch::init_for_data(&cfg.model, &cfg.data, cfg.n_outputs(), 0)
                .map_err(|e| ServerError::Internal(e.to_string()))?
                .values
        }
    };
    // Every round ever reserved is consumed, completed or not.
    let rounds = store.rounds(&cfg.id)?;
    let next_round = rounds.iter().map(|r| r.round).max().unwrap_or(0) + 1;
    let spent = store.spent_by_site(&cfg.id)?;
    let records = store.site_records(&cfg.id)?;
    let mut engine = StudyEngine::new(
        Arc::new(cfg.clone()),
        spec.clone(),
        global,
        next_round,
        spent,
        records,
    );
    if let (Some((round, ..)), Strategy::FedAdam) = (&last, cfg.strategy) {
        // A restart resumes FedAdam's moments; without them it would silently restart the
        // optimiser, so a missing or unreadable state stops the study from resuming.
        let path = checkpoint::optimizer_path(state_dir, &cfg.id, *round);
        let state = checkpoint::read_optimizer_state(key, &path, &cfg.id, *round).map_err(|e| {
            ServerError::Config(format!(
                "study {} uses FedAdam and cannot resume its optimiser state: {e}",
                cfg.id
            ))
        })?;
        engine.restore_optimizer(&state).map_err(|e| {
            ServerError::Config(format!("study {}: {}: {e}", cfg.id, path.display()))
        })?;
    }
    let status = store.study(&cfg.id)?.map(|r| r.status);
    if status != Some(StudyStatus::Active) {
        tracing::info!(study = %cfg.id, "study already ended; serving its state read-only");
        engine.mark_ended("ended before this start");
    }
    let fresh = {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 16];
        ring::rand::SystemRandom::new()
            .fill(&mut b)
            .map_err(|_| ServerError::Internal("the OS random generator failed".into()))?;
        fedpriv_common::digest::hex(&b)
    };
    let instance = store.study_instance(&cfg.id, &fresh)?;
    let announcement = StudyAnnouncement::for_study(cfg, &instance);
    Ok(StudyRuntime {
        engine,
        meta: StudyMeta {
            spec,
            announcement,
            broadcast: None,
        },
    })
}
