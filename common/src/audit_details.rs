//! The `details` of each audit event the coordinator writes, as types: one struct (or enum,
//! where an event has several shapes) per event, each bound to its [`AuditEvent`] by
//! [`Details::EVENT`]. A record is built in one place and written as the canonical JSON of
//! its type, so the same event always carries the same keys, and a reader (a test, an
//! auditor's script) can parse a record back into its type.
//!
//! What it does not cover yet: the site daemon's records (`data_loaded`, `study_accepted`,
//! `stand_in_released`, `column_check` and the site's own `budget_spent`, `refused`, ...)
//! still build their details by hand; their shapes differ from the coordinator's for the
//! same event names.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AuditEvent;

/// A record's details, typed. `EVENT` is the event the details belong to.
pub trait Details: Serialize {
    const EVENT: AuditEvent;

    /// The details as the JSON value the log writer takes.
    fn to_value(&self) -> Value {
        // Only maps with non-string keys fail to serialise; none of these types has one.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

macro_rules! details {
    ($($ty:ident => $event:ident),* $(,)?) => {
        $(impl Details for $ty {
            const EVENT: AuditEvent = AuditEvent::$event;
        })*
    };
}

details! {
    ServiceStarted => ServiceStarted,
    ServiceStopped => ServiceStopped,
    ConfigLoaded => ConfigLoaded,
    ConnectionAccepted => ConnectionAccepted,
    ConnectionRefused => ConnectionRefused,
    StudyCreated => StudyCreated,
    StudyChanged => StudyChanged,
    StudyStopped => StudyStopped,
    RoundStarted => RoundStarted,
    RoundFinished => RoundFinished,
    UpdateReceived => UpdateReceived,
    UpdateRejected => UpdateRejected,
    BudgetSpent => BudgetSpent,
    ModelExported => ModelExported,
    Refused => Refused,
    Alert => Alert,
    Pruned => Pruned,
    AccessGranted => AccessGranted,
    PrivacyAudited => PrivacyAudited,
    ModelEvaluated => ModelEvaluated,
}

/// A privacy audit of a study's terms ran (`privacy-audit --state`): the figures the
/// release gate and the exported model's metadata carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyAudited {
    pub study: String,
    /// The audited terms' digest (`StudyConfig::mechanism_digest`).
    pub terms_sha256: String,
    pub epsilon_claimed: f64,
    pub epsilon_lower_bound: f64,
    pub delta: f64,
    pub confidence: f64,
    pub canaries: u64,
    pub guesses: u64,
    pub correct_guesses: u64,
    pub passed: bool,
}

/// The coordinator started (`version` of fedpriv, the address it listens on, how many
/// studies it was given on the command line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStarted {
    pub version: String,
    pub listen: String,
    pub studies: usize,
}

/// The coordinator stopped: `shutdown`, or `error: ...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStopped {
    pub reason: String,
}

/// A study file given on the command line was loaded (SHA-256 of its text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigLoaded {
    pub study: String,
    pub sha256: String,
}

/// An mTLS connection was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionAccepted {
    pub identity: String,
    pub role: String,
    pub remote: String,
}

/// A connection attempt was refused before any identity was established.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRefused {
    pub remote: String,
    pub reason: String,
}

/// A study was created, from the command line or by an operator. Built by one constructor
/// on the coordinator's side, so both ways record the same keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyCreated {
    pub study: String,
    pub by: String,
    pub enrolled: Vec<String>,
    pub epsilon: f64,
    pub delta: f64,
    /// `record` or `site`.
    pub unit: String,
    /// SHA-256 of the study's TOML as given.
    pub sha256: String,
}

/// An operator changed a study's settings at runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyChanged {
    pub study: String,
    pub by: String,
    pub changes: Vec<(String, String)>,
    /// SHA-256 of the study's TOML after the change.
    pub sha256: String,
}

/// A study ended: stopped by an operator, or ended by the coordinator (`by` is then the
/// coordinator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudyStopped {
    pub study: String,
    pub by: String,
    pub reason: String,
}

/// A round's spend is on the ledger and its tasks may leave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundStarted {
    pub study: String,
    pub round: u64,
    pub sites: Vec<String>,
}

/// A round ended, with or without a model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundFinished {
    pub study: String,
    pub round: u64,
    #[serde(flatten)]
    pub outcome: RoundOutcome,
}

/// How a round ended (`outcome` in the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RoundOutcome {
    /// A model version came out of it: its file (relative to the state directory), the
    /// SHA-256 of the sealed file, the sites whose updates made it, the study's epsilon.
    Completed {
        model_version: u64,
        file: String,
        sha256: String,
        contributors: Vec<String>,
        epsilon: f64,
    },
    /// No model; the round's spends stand.
    Aborted { reason: String },
}

/// A site's update arrived whole and was handed to the aggregator. `norm` is absent under
/// central placement (an un-noised clipped delta's norm is a fact about the site's records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateReceived {
    pub study: String,
    pub round: u64,
    pub site: String,
    pub values: u64,
    pub bytes: u64,
    pub dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm: Option<f64>,
}

/// A site's update was refused; the round goes on without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRejected {
    pub study: String,
    pub round: u64,
    pub site: String,
    pub reason: String,
}

/// One site's charge for one round, as recorded on the ledger: the mechanism (q, sigma,
/// steps) and the site's epsilon after it, at the study's delta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetSpent {
    pub study: String,
    pub round: u64,
    pub site: String,
    pub q: f64,
    pub sigma: f64,
    pub steps: u64,
    pub epsilon: f64,
    pub delta: f64,
    /// The round also carries a DP evaluation: its mechanism, charged with the round
    /// (`epsilon` is after both). Absent from records of rounds without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::dp::SgmEvent>,
}

/// A round's DP evaluation arrived: which model it measured, from how many sites, and the
/// headline figure with the noise's standard deviation on the summed vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEvaluated {
    pub study: String,
    pub round: u64,
    pub model_version: u64,
    pub sites: u64,
    pub metric: String,
    pub value: f64,
    pub noise_sd: f64,
}

/// A model version left the state directory (`to`: a file, or an admin requester).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelExported {
    pub study: String,
    pub model_version: u64,
    pub sha256: String,
    pub by: String,
    pub to: String,
}

/// Something asked for was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Refused {
    /// A request by a known identity (a site's message, an admin request): who, from where,
    /// what, why, and the study it named if any.
    Request {
        identity: String,
        remote: String,
        action: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        study: Option<String>,
    },
    /// Refusals from `source` (an address, an identity, or `all`) that the per-source cap
    /// counted instead of writing one by one, in the window that just closed.
    Summary {
        source: String,
        suppressed_refusals: u32,
        window_s: u64,
    },
    /// A model export from the command line failed after it was put on record.
    Export {
        action: String,
        study: String,
        model_version: u64,
        reason: String,
    },
}

/// An alert was raised (also a warning in the log and a counter).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub kind: String,
    pub subject: String,
    pub detail: String,
}

/// A retention prune: the files it is about to remove, announced before any is touched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pruned {
    pub what: String,
    pub by: String,
    pub policy: PrunePolicy,
    pub cutoff: i64,
    pub removed: Vec<PrunedFile>,
    pub kept: u64,
    /// `i of n` when one prune needed several records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// Files an earlier, interrupted prune recorded but did not remove.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finishing: Option<Vec<PrunedFile>>,
}

/// The retention policy a prune ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunePolicy {
    pub keep_models_days: u32,
    pub keep_last: u32,
}

/// One model version's file in a prune record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrunedFile {
    pub study: String,
    pub round: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub file: String,
}

/// A read was served to an operator or auditor (on record before the answer left).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessGranted {
    pub identity: String,
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<String>,
    /// For a page of the audit log: where it started and how many records it held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn details_serialise_to_the_keys_the_log_has_always_had() {
        let finished = RoundFinished {
            study: "s".into(),
            round: 3,
            outcome: RoundOutcome::Aborted {
                reason: "too few".into(),
            },
        };
        assert_eq!(
            finished.to_value(),
            json!({"study": "s", "round": 3, "outcome": "aborted", "reason": "too few"})
        );
        let summary = Refused::Summary {
            source: "all".into(),
            suppressed_refusals: 4,
            window_s: 60,
        };
        assert_eq!(
            summary.to_value(),
            json!({"source": "all", "suppressed_refusals": 4, "window_s": 60})
        );
        let received = UpdateReceived {
            study: "s".into(),
            round: 1,
            site: "a".into(),
            values: 10,
            bytes: 40,
            dtype: "f32".into(),
            norm: None,
        };
        assert!(received.to_value().get("norm").is_none());
        // Records parse back into their types.
        let back: RoundFinished =
            serde_json::from_value(finished.to_value()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, finished);
        let back: Refused =
            serde_json::from_value(summary.to_value()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, summary);
    }
}
