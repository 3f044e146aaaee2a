//! Operators' writes (create, change, stop a study), carried out by the owner: the only
//! place studies change, so a write and the rounds it affects never race. Each write is on
//! the audit log (durably) before it takes effect; a policy refusal is answered, and
//! audited by the requester's connection under its identity's refusal cap.

use std::sync::Arc;

use fedpriv_common::admin::{self, AdminRequest, AdminResponse, ChangeError, StudyProgress, Whose};
use fedpriv_common::audit::details::{Details, StudyChanged, StudyStopped};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::digest::sha256_hex;
use fedpriv_common::pki::Identity;
use fedpriv_common::protocol::CoordinatorMessage;

use super::{Now, Owner};
use crate::node::state::StateStore;
use crate::node::studies::{self, study_created};
use crate::store::StudyStatus;

fn error(whose: Whose, reason: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        reason: reason.into(),
        whose,
    }
}

fn ok(text: String) -> AdminResponse {
    AdminResponse::Ok {
        text,
        next: None,
        head: None,
    }
}

impl<S: StateStore> Owner<S> {
    /// Carries out a write (already authorized). Returns the answer and the study it
    /// created or changed, if any.
    pub(super) fn admin_write(
        &mut self,
        request: AdminRequest,
        by: &Identity,
        now: Now,
    ) -> (AdminResponse, Option<String>) {
        let who = by.to_string();
        match request {
            AdminRequest::CreateStudy { config_toml } => self.create(&who, &config_toml, now),
            AdminRequest::ChangeStudy { study, changes } => self.change(&who, &study, &changes),
            AdminRequest::StopStudy { study, reason } => (self.stop(&who, &study, &reason), None),
            other => (
                error(
                    Whose::Internal,
                    format!("{} is not a write", other.action()),
                ),
                None,
            ),
        }
    }

    fn audit<D: Details>(&self, who: &str, details: &D) -> Result<(), AdminResponse> {
        self.ctx
            .audit
            .record_blocking(who, details)
            .map(|_| ())
            .map_err(|e| error(Whose::Operator, format!("{e}; nothing was changed")))
    }

    fn create(
        &mut self,
        who: &str,
        config_toml: &str,
        now: Now,
    ) -> (AdminResponse, Option<String>) {
        let cfg = match StudyConfig::from_toml(config_toml) {
            Ok(c) => c,
            Err(e) => return (error(Whose::Peer, format!("study config: {e}")), None),
        };
        let exists =
            self.studies.contains(&cfg.id) || !matches!(self.ctx.store.study(&cfg.id), Ok(None));
        if exists {
            let reason = format!(
                "study {:?} already exists; a study id is never reused",
                cfg.id
            );
            return (error(Whose::Peer, reason), None);
        }
        if let Err(e) = studies::study_spec(&cfg) {
            return (error(Whose::Peer, e.to_string()), None);
        }
        // On file before anything else happens; a study nobody recorded never runs.
        if let Err(e) = self.audit(who, &study_created(&cfg, who, config_toml)) {
            return (e, None);
        }
        let runtime = studies::study_runtime(
            &mut self.ctx.store,
            &self.ctx.state_dir,
            &cfg,
            config_toml,
            &self.ctx.at_rest_key,
            now.unix,
        );
        let rt = match runtime {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(study = %cfg.id, error = %e, "cannot create the study");
                let reason = format!("cannot create the study: {e}");
                return (error(Whose::Internal, reason), None);
            }
        };
        let announced = CoordinatorMessage::StudyAnnounced(Box::new(rt.announcement().clone()));
        self.studies.insert(rt);
        self.ctx.broadcast(&cfg.enrolled, &announced);
        tracing::info!(study = %cfg.id, by = %who, sites = cfg.enrolled.len(), "study created");
        let text = format!(
            "created study {} with {} enrolled sites ({}); epsilon budget {} at delta {}",
            cfg.id,
            cfg.enrolled.len(),
            cfg.enrolled.join(", "),
            cfg.privacy.epsilon,
            cfg.privacy.delta
        );
        (ok(text), Some(cfg.id))
    }

    fn change(
        &mut self,
        who: &str,
        study: &str,
        changes: &[(String, String)],
    ) -> (AdminResponse, Option<String>) {
        let Some(rt) = self.studies.get_mut(study) else {
            return (
                error(Whose::Peer, format!("no study {study:?} is running")),
                None,
            );
        };
        if rt.engine.is_finished() {
            let reason = format!("study {study:?} has ended; it cannot change");
            return (error(Whose::Peer, reason), None);
        }
        let epsilon_spent = rt.engine.study_epsilon();
        let stored = match self.ctx.store.study(study) {
            Ok(Some(row)) => row.config_toml,
            Ok(None) => {
                let reason = format!("study {study:?} is not in the store");
                return (error(Whose::Internal, reason), None);
            }
            Err(e) => return (error(Whose::Internal, e.to_string()), None),
        };
        let rounds_started = match self.ctx.store.rounds(study) {
            Ok(r) => r.iter().map(|r| r.round).max().unwrap_or(0),
            Err(e) => return (error(Whose::Internal, e.to_string()), None),
        };
        let progress = StudyProgress {
            rounds_started,
            epsilon_spent,
        };
        let (text, cfg) = match admin::apply_changes(&stored, changes, progress) {
            Ok(ok) => ok,
            Err(ChangeError::Refused(reason)) => {
                // Not audited here: the requester's connection audits it (under the
                // identity's refusal cap) before the requester is told, keeping fsyncs of a
                // requester that loops on refused changes out of the owner's loop.
                tracing::info!(identity = %who, action = "change_study", %study, "refused by policy");
                return (AdminResponse::Refused { reason }, None);
            }
            Err(ChangeError::Invalid(reason)) => return (error(Whose::Peer, reason), None),
        };
        let record = StudyChanged {
            study: study.to_string(),
            by: who.to_string(),
            changes: changes.to_vec(),
            sha256: sha256_hex(text.as_bytes()),
        };
        if let Err(e) = self.audit(who, &record) {
            return (e, None);
        }
        if let Err(e) = self.ctx.store.set_study_config(study, &text) {
            tracing::error!(%study, error = %e, "cannot store the changed study");
            let reason = format!("the change was not stored: {e}");
            return (error(Whose::Internal, reason), None);
        }
        if let Some(rt) = self.studies.get_mut(study) {
            rt.engine.set_config(Arc::new(cfg));
        }
        tracing::info!(%study, by = %who, changes = changes.len(), "study changed");
        let list: Vec<String> = changes.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        let text = format!("changed study {study}: {}", list.join(", "));
        (ok(text), Some(study.to_string()))
    }

    fn stop(&mut self, who: &str, study: &str, reason: &str) -> AdminResponse {
        let Some(rt) = self.studies.get(study) else {
            return error(Whose::Peer, format!("no study {study:?} is running"));
        };
        if rt.engine.is_finished() {
            return error(Whose::Peer, format!("study {study:?} has already ended"));
        }
        let record = StudyStopped {
            study: study.to_string(),
            by: who.to_string(),
            reason: reason.to_string(),
        };
        if let Err(e) = self.audit(who, &record) {
            return e;
        }
        let text = format!("stopped by {who}: {reason}");
        // The study stops whatever the store says: fail closed.
        if let Some(rt) = self.studies.get_mut(study) {
            rt.engine.mark_ended(&text);
        }
        let ended = CoordinatorMessage::StudyEnded {
            study: study.to_string(),
            reason: text.clone(),
        };
        self.ctx.broadcast(&self.studies.enrolled(study), &ended);
        if let Err(e) = self
            .ctx
            .store
            .set_study_status(study, StudyStatus::Stopped, Some(&text))
        {
            tracing::error!(%study, error = %e, "cannot store the study's stop");
            return error(
                Whose::Internal,
                format!("the study stopped in this process, but the state database did not record the stop ({e}): a restart would resume it; repair the state database and stop the study again"),
            );
        }
        tracing::info!(%study, by = %who, "study stopped");
        ok(format!("stopped study {study}"))
    }
}
