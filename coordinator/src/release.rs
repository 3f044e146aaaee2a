//! What must hold before a model of a study leaves the coordinator (`model export`, `admin
//! export`): the model version exists and its file was not pruned, and the study's release
//! conditions are met (`[release] require_privacy_audit`: a passing privacy audit of the
//! study's exact terms on record). Decides only; the callers record and send.

use std::collections::BTreeMap;

use fedpriv_common::config::StudyConfig;

use crate::store::{RoundStatus, Store};

/// Why a model may not be exported, and whose it is to fix.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The request names something that is not there (no such study or round). The
    /// requester's.
    #[error("{0}")]
    NotFound(String),
    /// A release condition of the study is unmet (to be recorded as a refusal).
    #[error("{0}")]
    Withheld(String),
    /// The state database or a stored config failed. The operator's.
    #[error("{0}")]
    State(String),
}

/// A model version cleared for export.
#[derive(Debug, Clone, PartialEq)]
pub struct Cleared {
    pub round: u64,
    /// The sealed checkpoint's SHA-256, as the store recorded it.
    pub sha256: String,
    /// Metadata to add to the exported file (the privacy audit the gate found, if any).
    pub metadata: BTreeMap<String, String>,
}

/// Checks that round `round` (the last completed one if `None`) of `study` may leave.
pub fn clear(store: &Store, study: &str, round: Option<u64>) -> Result<Cleared, ReleaseError> {
    let state = |e: crate::store::StoreError| ReleaseError::State(e.to_string());
    let row = store
        .study(study)
        .map_err(state)?
        .ok_or_else(|| ReleaseError::NotFound(format!("no study {study:?}")))?;
    let round = match round {
        Some(r) => r,
        None => store
            .last_completed_round(study)
            .map_err(state)?
            .map(|(r, ..)| r)
            .ok_or_else(|| {
                ReleaseError::NotFound(format!("study {study} has no completed round yet"))
            })?,
    };
    let rounds = store.rounds(study).map_err(state)?;
    if !rounds
        .iter()
        .any(|r| r.round == round && r.status == RoundStatus::Completed)
    {
        return Err(ReleaseError::NotFound(format!(
            "round {round} of study {study} did not complete"
        )));
    }
    if let Some(note) = crate::retention::pruned_note(store, study, round)
        .map_err(|e| ReleaseError::State(e.to_string()))?
    {
        return Err(ReleaseError::NotFound(note));
    }
    let sha256 = store
        .model_versions(study)
        .map_err(state)?
        .into_iter()
        .find(|v| v.round == round)
        .map(|v| v.sha256)
        .ok_or_else(|| {
            ReleaseError::NotFound(format!(
                "round {round} of study {study} has no model version"
            ))
        })?;
    let cfg = StudyConfig::from_toml(&row.config_toml)
        .map_err(|e| ReleaseError::State(format!("study {study}'s stored config: {e}")))?;
    let passing = store
        .passing_privacy_audit(study, &cfg.mechanism_digest())
        .map_err(state)?;
    if cfg.release.require_privacy_audit && passing.is_none() {
        return Err(ReleaseError::Withheld(format!(
            "study {study} requires a passing privacy audit of its terms before export, and none is on record (run `fedpriv-coordinator privacy-audit --study FILE --state DIR` with the coordinator stopped)"
        )));
    }
    let mut metadata = BTreeMap::new();
    if let Some(a) = &passing {
        metadata.insert(
            "fedpriv.privacy_audit".to_string(),
            serde_json::json!({
                "terms_sha256": a.terms_sha256,
                "audited_at": a.audited_at,
                "epsilon_claimed": a.epsilon_claimed,
                "epsilon_lower_bound": a.epsilon_lower_bound,
                "delta": a.delta,
                "confidence": a.confidence,
                "canaries": a.canaries,
                "guesses": a.guesses,
                "correct_guesses": a.correct_guesses,
            })
            .to_string(),
        );
    }
    Ok(Cleared {
        round,
        sha256,
        metadata,
    })
}
