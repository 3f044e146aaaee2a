//! The messages coordinator and sites exchange, carried as postcard frames (see `wire`).
//!
//! A site's identity is never a message field that the coordinator trusts: it comes from
//! the site's certificate. `Hello` repeats the name only so that a misconfigured site (the
//! wrong certificate on the wrong machine) is told so at once.
//!
//! What a site sends is deliberately narrow (the coordinator may be hostile): a noised update,
//! the record count it *declared* in its config (a public figure, never counted from data),
//! and, when it will not take part, one [`DeclineReason`] from a fixed set with no text. The
//! details of a refusal stay in the site's own audit log.

use serde::{Deserialize, Serialize};

use crate::config::{DataSpec, LocalPlan, Placement, PrivacyUnit, StudyConfig};
use crate::dp::SgmEvent;
use crate::evaluation::EvaluationPlan;
use crate::model::Architecture;
use crate::wire::TensorHeader;

/// Bumped on any incompatible change; also part of the ALPN string.
pub const PROTOCOL_VERSION: u32 = 3;

/// A study's terms: everything a site checks against its own pinned terms before it agrees,
/// and that no later announcement or task of the study may change once the site has paid for
/// a round of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyAnnouncement {
    pub study: String,
    pub model: Architecture,
    pub data: DataSpec,
    pub unit: PrivacyUnit,
    pub placement: Placement,
    pub delta: f64,
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    /// How each site trains in a round (DP-SGD plan for the record unit).
    pub local: LocalPlan,
    /// A random id of this run of the study, chosen when the coordinator created it: a
    /// site that paid under one run refuses another run of the same study id (its round
    /// numbers would start again), rather than decline round after round as already paid.
    pub instance: String,
    /// DP federated evaluation on the sites' held-out records, if the study asks for it.
    pub evaluation: Option<EvaluationPlan>,
}

impl StudyAnnouncement {
    /// The terms of a validated study, as the coordinator announces them.
    pub fn for_study(cfg: &StudyConfig, instance: &str) -> Self {
        let p = &cfg.privacy;
        Self {
            instance: instance.to_string(),
            study: cfg.id.clone(),
            model: cfg.model.clone(),
            data: cfg.data.clone(),
            unit: p.unit,
            placement: p.placement,
            delta: p.delta.get(),
            clip_norm: p.clip_norm.get(),
            noise_multiplier: p.noise_multiplier.get(),
            local: cfg.local.clone(),
            evaluation: cfg.evaluation,
        }
    }

    /// Whether `task` asks for exactly these terms (unit, placement, delta, clip, noise,
    /// training plan; floats compared bit for bit).
    pub fn task_matches(&self, task: &Task) -> bool {
        task.study == self.study
            && task.unit == self.unit
            && task.placement == self.placement
            && task.delta.to_bits() == self.delta.to_bits()
            && task.clip_norm.to_bits() == self.clip_norm.to_bits()
            && task.noise_multiplier.to_bits() == self.noise_multiplier.to_bits()
            && task.local == self.local
    }
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
    /// When the round carries an evaluation of the model it sends: what the evaluation
    /// costs the site (already in the coordinator's ledger, beside `cost`).
    pub evaluation: Option<SgmEvent>,
}

/// Why a site will not take part in a study or a round. A normal outcome, not an error.
///
/// A fixed set without text on purpose: nothing here may depend on the site's records (a
/// refusal that did would tell the coordinator something about a patient). Which term
/// differed, by how much, what failed: all of that stays in the site's audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeclineReason {
    /// The site's config has no such study: it does not take part.
    NotEnrolled,
    /// The study's terms (unit, placement, mechanism, delta, task, columns, fills, model)
    /// are not what the site pinned, or differ from the terms it already paid under.
    TermsDiffer,
    /// The task or its model is malformed (non-finite or out-of-bound values, a plan or
    /// price that does not match the announced terms).
    InvalidTask,
    /// The round would take the site over one of its own caps (per study or per data
    /// source).
    OverCap,
    /// The site already paid for this round of this study: a replay.
    AlreadyPaid,
    /// The study's data could not be loaded when the site started (decided once, at start).
    Unavailable,
    /// Something failed at the site before it paid for the round.
    Internal,
    /// The site paid for rounds of another run of this study id (another coordinator
    /// state): it takes no part in this one.
    OtherInstance,
}

impl DeclineReason {
    /// Whether the site will refuse every later round of the study too (so the coordinator
    /// should stop asking).
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            Self::NotEnrolled
                | Self::TermsDiffer
                | Self::OverCap
                | Self::Unavailable
                | Self::OtherInstance
        )
    }

    /// A stable machine-readable name (metrics labels, audit records).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotEnrolled => "not_enrolled",
            Self::TermsDiffer => "terms_differ",
            Self::InvalidTask => "invalid_task",
            Self::OverCap => "over_cap",
            Self::AlreadyPaid => "already_paid",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::OtherInstance => "other_instance",
        }
    }
}

impl std::fmt::Display for DeclineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotEnrolled => "the site does not take part in this study",
            Self::TermsDiffer => {
                "the study's terms differ from those the site pinned or paid under"
            }
            Self::InvalidTask => "the task or its model is malformed",
            Self::OverCap => "the round would exceed one of the site's own caps",
            Self::AlreadyPaid => "the site already paid for this round",
            Self::Unavailable => {
                "the site's data for this study has been unavailable since it started"
            }
            Self::Internal => "the site failed before paying for the round",
            Self::OtherInstance => {
                "the site paid under another run of this study id; use a new study id"
            }
        })
    }
}

/// Site to coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SiteMessage {
    Hello {
        version: u32,
        claimed_site: String,
    },
    /// The site can take part; `records` is the record count the site declared in its
    /// config for the data source (public, never counted from the data), which sets q.
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
    /// The site's noised evaluation vector (see [`crate::evaluation::Layout`]) of the
    /// model `round`'s task carried; sent before the round's update.
    Evaluation {
        study: String,
        round: u64,
        values: Vec<f64>,
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
    StudyAnnounced(Box<StudyAnnouncement>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataSpec, Task as DataTask};
    use crate::wire::{decode_frame, encode_frame};

    #[test]
    fn every_message_round_trips_through_the_wire_format() {
        let ann = StudyAnnouncement {
            instance: "0123456789abcdef".into(),
            study: "bc".into(),
            model: Architecture::mlp(4),
            data: DataSpec {
                task: DataTask::Binary,
                label: "y".into(),
                classes: 0,
                class_labels: Vec::new(),
                features: vec!["a".into()],
                ranges: vec![[0.0, 1.0]],
                label_range: None,
                fills: vec![None],
                categorical: Vec::new(),
                image: None,
            },
            unit: PrivacyUnit::Record,
            placement: Placement::Local,
            delta: 1e-5,
            clip_norm: 1.0,
            noise_multiplier: 1.1,
            local: LocalPlan::DpSgd {
                steps: 10,
                expected_batch: 32.0,
                learning_rate: 0.5,
            },
            evaluation: None,
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
            reason: DeclineReason::OverCap,
        };
        let bytes = encode_frame(&decline).expect("encodes");
        assert_eq!(
            decode_frame::<SiteMessage>(&bytes).expect("decodes"),
            decline
        );
    }
}
