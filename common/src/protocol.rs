//! The messages coordinator and sites exchange, carried as postcard frames (see `wire`).
//!
//! A site's identity is never a message field that the coordinator trusts: it comes from
//! the site's certificate. `Hello` repeats the name only so that a misconfigured site (the
//! wrong certificate on the wrong machine) is told so at once.

use serde::{Deserialize, Serialize};

use crate::config::{DataSpec, LocalPlan, Placement, PrivacyUnit};
use crate::dp::SgmEvent;
use crate::model::Architecture;
use crate::wire::TensorHeader;

/// Bumped on any incompatible change; also part of the ALPN string.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a site needs to know about a study before its first task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyAnnouncement {
    pub study: String,
    pub model: Architecture,
    pub data: DataSpec,
    pub unit: PrivacyUnit,
    pub placement: Placement,
    pub delta: f64,
}

/// One round's work for one site. The global model follows as the tensor body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub study: String,
    pub round: u64,
    pub header: TensorHeader,
    /// What the coordinator has charged this site for the round (already in its ledger).
    pub cost: SgmEvent,
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub unit: PrivacyUnit,
    pub placement: Placement,
    pub local: LocalPlan,
    pub delta: f64,
}

/// Why a site will not do a round. A normal outcome, not an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The round would take the site over its own epsilon cap.
    OverSiteCap { epsilon_after: f64, cap: f64 },
    /// The site already paid for this (study, round): a replay.
    AlreadySpent,
    /// The study's delta is above what the site accepts.
    DeltaTooLarge { delta: f64, max: f64 },
    /// The site is not configured to take part in this study.
    StudyNotAllowed,
    /// The task does not match the study as the site knows it.
    TaskMismatch(String),
    /// The site's data cannot be used for this study.
    DataUnavailable(String),
    /// Something failed at the site.
    Internal(String),
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OverSiteCap { epsilon_after, cap } => {
                write!(f, "the round would take the site to epsilon {epsilon_after:.4}, over its cap of {cap}")
            }
            Self::AlreadySpent => f.write_str("the site already paid for this round"),
            Self::DeltaTooLarge { delta, max } => {
                write!(f, "study delta {delta} is above the site's maximum {max}")
            }
            Self::StudyNotAllowed => f.write_str("the site does not take part in this study"),
            Self::TaskMismatch(m) => write!(f, "task does not match the study: {m}"),
            Self::DataUnavailable(m) => write!(f, "data unavailable: {m}"),
            Self::Internal(m) => write!(f, "site error: {m}"),
        }
    }
}

/// Site to coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SiteMessage {
    Hello {
        version: u32,
        claimed_site: String,
    },
    /// The site can take part; `records` is its record count (treated as public).
    Ready {
        study: String,
        records: u64,
    },
    /// The site cannot take part at all.
    Unable {
        study: String,
        reason: DeclineReason,
    },
    /// The site's noised update; the values follow as the tensor body.
    Update {
        study: String,
        round: u64,
        header: TensorHeader,
    },
    Decline {
        study: String,
        round: u64,
        reason: DeclineReason,
    },
}

/// Coordinator to site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Welcome {
        version: u32,
        studies: Vec<StudyAnnouncement>,
    },
    /// Followed by the global model as the tensor body.
    Task(Task),
    StudyEnded {
        study: String,
        reason: String,
    },
    /// Sent before the coordinator closes the connection on purpose.
    Refused {
        reason: String,
    },
    /// A study created after this connection's `Welcome`, in which this site is enrolled.
    /// The site prepares it as it would one listed in a `Welcome`.
    StudyAnnounced(StudyAnnouncement),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataSpec, Task as DataTask};
    use crate::wire::{decode_frame, encode_frame};

    #[test]
    fn every_message_round_trips_through_the_wire_format() {
        let ann = StudyAnnouncement {
            study: "bc".into(),
            model: Architecture::Mlp { hidden: 4 },
            data: DataSpec {
                task: DataTask::Binary,
                label: "y".into(),
                features: vec!["a".into()],
                ranges: vec![[0.0, 1.0]],
                label_range: None,
            },
            unit: PrivacyUnit::Record,
            placement: Placement::Local,
            delta: 1e-5,
        };
        let welcome = CoordinatorMessage::Welcome {
            version: PROTOCOL_VERSION,
            studies: vec![ann],
        };
        let bytes = encode_frame(&welcome).expect("encodes");
        assert_eq!(
            decode_frame::<CoordinatorMessage>(&bytes).expect("decodes"),
            welcome
        );
        let decline = SiteMessage::Decline {
            study: "bc".into(),
            round: 3,
            reason: DeclineReason::OverSiteCap {
                epsilon_after: 2.5,
                cap: 2.0,
            },
        };
        let bytes = encode_frame(&decline).expect("encodes");
        assert_eq!(
            decode_frame::<SiteMessage>(&bytes).expect("decodes"),
            decline
        );
    }
}
