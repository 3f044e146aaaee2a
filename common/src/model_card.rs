//! What a model file says about itself: every checkpoint (and so every exported model)
//! carries, in its safetensors metadata, the study and round it comes from, the task and
//! classes, the data contract (features with their public ranges and fills, categorical
//! columns, the image format), the layer list, and the privacy guarantee at that round
//! (unit, epsilon, delta). With it a model can be used without its study file, and with the
//! same preprocessing the sites used (`fedpriv-coordinator model evaluate | predict`).
//!
//! Metadata values are strings (the safetensors format); structured ones are JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{DataSpec, PrivacyUnit, StudyConfig};
use crate::model::Architecture;

/// Metadata key of the card (one JSON object).
pub const CARD_KEY: &str = "fedpriv.card";

/// The card's format; bumped on any incompatible change.
pub const CARD_VERSION: u32 = 1;

/// A model's description, as stored with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub version: u32,
    pub study: String,
    pub round: u64,
    pub model: Architecture,
    pub data: DataSpec,
    pub unit: PrivacyUnit,
    /// The study's epsilon at `delta` after this round (the worst site's).
    pub epsilon: f64,
    pub delta: f64,
}

/// The card's problem, when a file has none or an unreadable one. The file's fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CardError {
    #[error("the file carries no fedpriv model card (not a fedpriv model, or made before cards existed)")]
    Missing,
    #[error("the model card is not readable: {0}")]
    Malformed(String),
    #[error("model card version {0} is newer than this fedpriv reads ({CARD_VERSION})")]
    TooNew(u32),
}

impl ModelCard {
    /// The card of round `round` of `cfg`, at the study's `epsilon`.
    pub fn for_round(cfg: &StudyConfig, round: u64, epsilon: f64) -> Self {
        Self {
            version: CARD_VERSION,
            study: cfg.id.clone(),
            round,
            model: cfg.model.clone(),
            data: cfg.data.clone(),
            unit: cfg.privacy.unit,
            epsilon,
            delta: cfg.privacy.delta.get(),
        }
    }

    /// The metadata entries that carry it.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(
            CARD_KEY.to_string(),
            serde_json::to_string(self).unwrap_or_default(),
        );
        // Plain entries too, for tools that show metadata without parsing JSON.
        m.insert("fedpriv.study".into(), self.study.clone());
        m.insert("fedpriv.round".into(), self.round.to_string());
        m.insert("fedpriv.epsilon".into(), self.epsilon.to_string());
        m.insert("fedpriv.delta".into(), self.delta.to_string());
        m
    }

    /// Reads the card out of a safetensors file's bytes (its header only).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, CardError> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| CardError::Malformed(e.to_string()))?;
        let text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CARD_KEY))
            .ok_or(CardError::Missing)?;
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version =
            serde_json::from_str(text).map_err(|e| CardError::Malformed(e.to_string()))?;
        if v.version > CARD_VERSION {
            return Err(CardError::TooNew(v.version));
        }
        serde_json::from_str(text).map_err(|e| CardError::Malformed(e.to_string()))
    }
}
