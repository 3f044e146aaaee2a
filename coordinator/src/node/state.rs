//! What the studies' owner needs of the durable state: the [`Store`]'s methods it calls,
//! as a trait, so that the simulation can drive the owner over the real store with
//! failures injected (as quinn's tests drive a connection over a lossy `Pair`). Only the
//! owner and study loading use it; read-only commands use [`Store`] directly.

use std::collections::BTreeMap;

use fedpriv_common::dp::SgmEvent;

use crate::store::{Charge, EvaluationRow, RoundRow, Store, StoreError, StudyRow, StudyStatus};

/// The owner's view of the state database. Every write is durable when it returns `Ok`.
pub trait StateStore {
    fn study(&self, id: &str) -> Result<Option<StudyRow>, StoreError>;
    fn studies(&self) -> Result<Vec<StudyRow>, StoreError>;
    fn create_study(
        &mut self,
        id: &str,
        config_toml: &str,
        enrolled: &[String],
        now: i64,
    ) -> Result<(), StoreError>;
    fn set_study_config(&mut self, id: &str, config_toml: &str) -> Result<(), StoreError>;
    fn set_study_status(
        &mut self,
        id: &str,
        status: StudyStatus,
        reason: Option<&str>,
    ) -> Result<(), StoreError>;
    fn record_charges(
        &mut self,
        study: &str,
        round: u64,
        entries: &[Charge],
        now: i64,
    ) -> Result<(), StoreError>;
    fn record_evaluation(
        &mut self,
        study: &str,
        evaluation: &EvaluationRow,
    ) -> Result<(), StoreError>;
    fn complete_round(
        &mut self,
        study: &str,
        round: u64,
        model_file: &str,
        sha256: &str,
        contributors: &[String],
        now: i64,
    ) -> Result<(), StoreError>;
    fn abort_round(
        &mut self,
        study: &str,
        round: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    fn last_completed_round(
        &self,
        study: &str,
    ) -> Result<Option<(u64, String, String)>, StoreError>;
    fn rounds(&self, study: &str) -> Result<Vec<RoundRow>, StoreError>;
    fn spent_by_site(&self, study: &str) -> Result<BTreeMap<String, Vec<SgmEvent>>, StoreError>;
    fn site_records(&self, study: &str) -> Result<BTreeMap<String, u64>, StoreError>;
    fn set_site_records(&mut self, study: &str, site: &str, n: u64) -> Result<(), StoreError>;
    /// The study's run id, chosen once when it is first needed (see
    /// [`fedpriv_common::protocol::StudyAnnouncement::instance`]).
    fn study_instance(&mut self, id: &str, fresh: &str) -> Result<String, StoreError>;
}

impl StateStore for Store {
    fn study_instance(&mut self, id: &str, fresh: &str) -> Result<String, StoreError> {
        Store::study_instance(self, id, fresh)
    }
    fn study(&self, id: &str) -> Result<Option<StudyRow>, StoreError> {
        Store::study(self, id)
    }
    fn studies(&self) -> Result<Vec<StudyRow>, StoreError> {
        Store::studies(self)
    }
    fn create_study(
        &mut self,
        id: &str,
        config_toml: &str,
        enrolled: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        Store::create_study(self, id, config_toml, enrolled, now)
    }
    fn set_study_config(&mut self, id: &str, config_toml: &str) -> Result<(), StoreError> {
        Store::set_study_config(self, id, config_toml)
    }
    fn set_study_status(
        &mut self,
        id: &str,
        status: StudyStatus,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        Store::set_study_status(self, id, status, reason)
    }
    fn record_charges(
        &mut self,
        study: &str,
        round: u64,
        entries: &[Charge],
        now: i64,
    ) -> Result<(), StoreError> {
        Store::record_charges(self, study, round, entries, now)
    }
    fn record_evaluation(&mut self, study: &str, e: &EvaluationRow) -> Result<(), StoreError> {
        Store::record_evaluation(self, study, e)
    }
    fn complete_round(
        &mut self,
        study: &str,
        round: u64,
        model_file: &str,
        sha256: &str,
        contributors: &[String],
        now: i64,
    ) -> Result<(), StoreError> {
        Store::complete_round(self, study, round, model_file, sha256, contributors, now)
    }
    fn abort_round(
        &mut self,
        study: &str,
        round: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        Store::abort_round(self, study, round, reason, now)
    }
    fn last_completed_round(
        &self,
        study: &str,
    ) -> Result<Option<(u64, String, String)>, StoreError> {
        Store::last_completed_round(self, study)
    }
    fn rounds(&self, study: &str) -> Result<Vec<RoundRow>, StoreError> {
        Store::rounds(self, study)
    }
    fn spent_by_site(&self, study: &str) -> Result<BTreeMap<String, Vec<SgmEvent>>, StoreError> {
        Store::spent_by_site(self, study)
    }
    fn site_records(&self, study: &str) -> Result<BTreeMap<String, u64>, StoreError> {
        Store::site_records(self, study)
    }
    fn set_site_records(&mut self, study: &str, site: &str, n: u64) -> Result<(), StoreError> {
        Store::set_site_records(self, study, site, n)
    }
}
