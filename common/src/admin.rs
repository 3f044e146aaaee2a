//! The admin protocol: what operators and auditors ask a running coordinator, over the same
//! mTLS QUIC endpoint the sites use, and the rules for changing a study once it exists.
//!
//! One request per bidirectional stream: the client writes one [`AdminRequest`] frame and
//! finishes its side; the coordinator answers with zero or more [`AdminResponse::Part`]
//! frames and one final frame (`Ok`, `Refused` or `Error`), then finishes. Payloads larger
//! than a control frame travel as parts, so every frame stays under
//! [`crate::wire::MAX_CONTROL_FRAME`]; the client caps what it gathers at
//! [`MAX_RESPONSE_BYTES`].
//!
//! Who may ask what is the coordinator's decision (its `admin::authorize`), from the role in
//! the requester's certificate, never from a field of the request.
//!
//! Pure: no sockets, no files.

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, StudyConfig};

/// Longest study TOML accepted in a request (bytes). A real study is a few hundred bytes;
/// the cap keeps a request well inside one control frame.
pub const MAX_STUDY_TOML: usize = 32 * 1024;
/// Longest free-text reason accepted in a request (bytes).
pub const MAX_REASON: usize = 1024;
/// Most settings one change request may carry.
pub const MAX_CHANGES: usize = 16;
/// Longest key or value of one setting (bytes).
pub const MAX_SETTING: usize = 256;
/// Most audit records one page may ask for.
pub const MAX_AUDIT_PAGE: u32 = 10_000;
/// Text per response frame (bytes): leaves room for the frame's own encoding.
pub const PART_BYTES: usize = 48 * 1024;
/// Most payload bytes a client gathers from one response.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// What an operator or auditor asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Create a study from its TOML (validated as `run --study` would).
    CreateStudy { config_toml: String },
    /// Change settings of an active study: `(key, value)` pairs such as
    /// `("rounds", "40")`; see [`apply_changes`] for what may change.
    ChangeStudy {
        study: String,
        changes: Vec<(String, String)>,
    },
    /// Stop a study now; no further round starts and its sites are told.
    StopStudy { study: String, reason: String },
    /// Every study with its status and budget (JSON array).
    ListStudies,
    /// A study's privacy ledger, as `ledger show --json` prints it.
    ShowLedger { study: String },
    /// Audit records from `from_seq` on (raw log lines), at most `max` of them per page.
    FetchAudit { from_seq: u64, max: u32 },
    /// The coordinator's counters in the Prometheus text format.
    Metrics,
    /// A completed round's model (the last completed one without `round`), decrypted and
    /// streamed to the operator as safetensors ([`AdminResponse::Bytes`] parts), recorded
    /// with its digest before a byte leaves; refused while the study's release conditions
    /// (a passing privacy audit) are unmet.
    ExportModel { study: String, round: Option<u64> },
}

impl AdminRequest {
    /// The action's name, as refusals and audit records name it.
    pub fn action(&self) -> &'static str {
        match self {
            Self::CreateStudy { .. } => "create_study",
            Self::ChangeStudy { .. } => "change_study",
            Self::StopStudy { .. } => "stop_study",
            Self::ListStudies => "list_studies",
            Self::ShowLedger { .. } => "show_ledger",
            Self::FetchAudit { .. } => "fetch_audit",
            Self::Metrics => "metrics",
            Self::ExportModel { .. } => "export_model",
        }
    }

    /// Whether the request changes state (and so goes to the studies' owner).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Self::CreateStudy { .. } | Self::ChangeStudy { .. } | Self::StopStudy { .. }
        )
    }

    /// The study the request is about, if any.
    pub fn study(&self) -> Option<&str> {
        match self {
            Self::ChangeStudy { study, .. }
            | Self::StopStudy { study, .. }
            | Self::ShowLedger { study }
            | Self::ExportModel { study, .. } => Some(study),
            _ => None,
        }
    }

    /// Checks the request's sizes against the caps above. A failure is the requester's.
    pub fn check_bounds(&self) -> Result<(), String> {
        let long = |what: &str, len: usize, cap: usize| {
            if len > cap {
                Err(format!("{what} is {len} bytes, over the cap of {cap}"))
            } else {
                Ok(())
            }
        };
        match self {
            Self::CreateStudy { config_toml } => {
                long("the study TOML", config_toml.len(), MAX_STUDY_TOML)
            }
            Self::ChangeStudy { study, changes } => {
                long("the study id", study.len(), MAX_SETTING)?;
                if changes.is_empty() {
                    return Err("no change given".into());
                }
                if changes.len() > MAX_CHANGES {
                    return Err(format!(
                        "{} changes, over the cap of {MAX_CHANGES}",
                        changes.len()
                    ));
                }
                for (k, v) in changes {
                    long("a setting's key", k.len(), MAX_SETTING)?;
                    long("a setting's value", v.len(), MAX_SETTING)?;
                }
                Ok(())
            }
            Self::StopStudy { study, reason } => {
                long("the study id", study.len(), MAX_SETTING)?;
                long("the reason", reason.len(), MAX_REASON)?;
                if reason.trim().is_empty() {
                    return Err("a stop needs a reason".into());
                }
                Ok(())
            }
            Self::ShowLedger { study } | Self::ExportModel { study, .. } => {
                long("the study id", study.len(), MAX_SETTING)
            }
            Self::FetchAudit { max, .. } => {
                if *max == 0 || *max > MAX_AUDIT_PAGE {
                    Err(format!("max must be between 1 and {MAX_AUDIT_PAGE}"))
                } else {
                    Ok(())
                }
            }
            Self::ListStudies | Self::Metrics => Ok(()),
        }
    }
}

/// Whose fault an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Whose {
    /// The request's (bad TOML, unknown study, malformed frame): fix the request.
    Peer,
    /// The coordinator's setup (its state directory, its audit log): its operator's to fix.
    Operator,
    /// A failure inside the coordinator.
    Internal,
}

impl std::fmt::Display for Whose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Peer => "request error",
            Self::Operator => "coordinator configuration error",
            Self::Internal => "coordinator internal error",
        })
    }
}

/// One frame of the coordinator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// A piece of a large payload; more frames follow.
    Part { text: String },
    /// Done: the payload is the parts so far followed by `text`. For a paged read, `next`
    /// is what to ask for next when more may follow. For a page of the audit log, `head`
    /// is the seq of the record of this very read (the log's last record once the read was
    /// on record): every page read is recorded, so the log grows while it is paged, and a
    /// client stops at the `head` of its first page rather than chase its own records.
    Ok {
        text: String,
        next: Option<u64>,
        head: Option<u64>,
    },
    /// A piece of a binary payload (an exported model); more frames follow, then `Ok`
    /// whose text describes the whole (its size and SHA-256).
    Bytes { data: Vec<u8> },
    /// Not allowed (role or policy). Already in the coordinator's audit log.
    Refused { reason: String },
    /// Could not be done.
    Error { reason: String, whose: Whose },
}

/// Splits a payload into response frames, each under the control-frame cap (cut at char
/// boundaries); `next` and `head` go in the final `Ok`.
pub fn into_frames(text: &str, next: Option<u64>, head: Option<u64>) -> Vec<AdminResponse> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > PART_BYTES {
        let mut cut = PART_BYTES;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(AdminResponse::Part {
            text: head.to_string(),
        });
        rest = tail;
    }
    out.push(AdminResponse::Ok {
        text: rest.to_string(),
        next,
        head,
    });
    out
}

// ---------------------------------------------------------------------------------------
// Changing a study

/// Why a change cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChangeError {
    /// Not allowed: it would loosen privacy or change what the study is. Audited.
    #[error("{0}")]
    Refused(String),
    /// The request is malformed (unknown key, not a number). The requester's to fix.
    #[error("{0}")]
    Invalid(String),
}

/// A setting that may change on a running study.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changeable {
    Rounds,
    RoundTimeout,
    MinSites,
    Epsilon,
}

fn classify(key: &str) -> Result<Changeable, ChangeError> {
    let key = key.trim();
    let bare = key
        .strip_prefix("study.")
        .or_else(|| key.strip_prefix("privacy."))
        .unwrap_or(key);
    match (key, bare) {
        (_, "rounds") if !key.starts_with("privacy.") => Ok(Changeable::Rounds),
        (_, "round_timeout_secs") if !key.starts_with("privacy.") => Ok(Changeable::RoundTimeout),
        (_, "min_sites") if !key.starts_with("privacy.") => Ok(Changeable::MinSites),
        (_, "epsilon") if !key.starts_with("study.") => Ok(Changeable::Epsilon),
        (_, "delta" | "clip_norm" | "noise_multiplier" | "target_epsilon" | "unit"
            | "placement" | "site_sample_rate" | "accountant") => Err(ChangeError::Refused(format!(
            "{key}: privacy terms cannot change once a study exists (only privacy.epsilon may be lowered); create a new study"
        ))),
        _ if key.starts_with("privacy.") => Err(ChangeError::Refused(format!(
            "{key}: privacy terms cannot change once a study exists; create a new study"
        ))),
        _ if ["study.", "data.", "training.", "sites."]
            .iter()
            .any(|p| key.starts_with(p))
            || ["id", "model", "encoding", "enrolled", "features", "label"].contains(&bare) =>
        {
            Err(ChangeError::Refused(format!(
                "{key}: what a study trains on, how, and with whom is fixed when it is created; create a new study"
            )))
        }
        _ => Err(ChangeError::Invalid(format!(
            "unknown setting {key:?}: the settings that may change are rounds, round_timeout_secs, min_sites and privacy.epsilon"
        ))),
    }
}

/// Where a study stands, for [`apply_changes`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StudyProgress {
    /// The highest round ever started (its spend is recorded), 0 if none.
    pub rounds_started: u64,
    /// The study's epsilon spent so far (the worst site's).
    pub epsilon_spent: f64,
}

/// Applies `changes` to a study's stored TOML and returns the new TOML and its validated
/// config. What may change (everything else is refused):
///
/// - `rounds`: any value not below the rounds already started;
/// - `round_timeout_secs`: any value of at least 1;
/// - `min_sites`: raised only (up to the enrolled sites): fewer sites per round would
///   weaken what each aggregate hides of any one site;
/// - `privacy.epsilon`: lowered only, and not below what is already spent. Raising it
///   would spend more of the patients' privacy than the study was approved for.
///
/// Every other privacy term (delta, clip norm, noise, unit, placement, sampling,
/// accountant) and what the study is (model, data, training, enrolled sites) is fixed.
/// A study whose noise was calibrated from `target_epsilon` keeps that noise: the
/// calibrated value is written into the new TOML, so changing `rounds` cannot re-calibrate
/// it.
pub fn apply_changes(
    config_toml: &str,
    changes: &[(String, String)],
    progress: StudyProgress,
) -> Result<(String, StudyConfig), ChangeError> {
    let internal = |e: ConfigError| ChangeError::Invalid(format!("the stored study: {e}"));
    let old = StudyConfig::from_toml(config_toml).map_err(internal)?;
    let mut table: toml::Table = toml::from_str(config_toml)
        .map_err(|e| ChangeError::Invalid(format!("the stored study: {e}")))?;
    if changes.is_empty() {
        return Err(ChangeError::Invalid("no change given".into()));
    }
    if old.privacy.calibrate_to.is_some() {
        // Its sigma is still the stand-in that fits at q = 1; pinning it now would end the
        // calibration the sites' sizes are awaited for.
        return Err(ChangeError::Refused(
            "the study's noise is not calibrated yet (the coordinator waits for the enrolled sites' declared sizes); change it once its first round has started".into(),
        ));
    }
    for (key, value) in changes {
        let what = classify(key)?;
        let int = || {
            value
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| {
                    ChangeError::Invalid(format!("{key}: {value:?} is not a whole number"))
                })
        };
        let (section, name, new) = match what {
            Changeable::Rounds => {
                let v = int()?;
                if (v as u64) < progress.rounds_started.max(1) {
                    return Err(ChangeError::Refused(format!(
                        "rounds: {v} is below the {} rounds already started",
                        progress.rounds_started.max(1)
                    )));
                }
                ("study", "rounds", toml::Value::Integer(v))
            }
            Changeable::RoundTimeout => {
                ("study", "round_timeout_secs", toml::Value::Integer(int()?))
            }
            Changeable::MinSites => {
                let v = int()?;
                if (v as u64) < old.min_sites as u64 {
                    return Err(ChangeError::Refused(format!(
                        "min_sites: lowering it from {} to {v} would weaken what each round's aggregate hides of one site; it may only be raised",
                        old.min_sites
                    )));
                }
                ("study", "min_sites", toml::Value::Integer(v))
            }
            Changeable::Epsilon => {
                let v: f64 = value.trim().parse().map_err(|_| {
                    ChangeError::Invalid(format!("{key}: {value:?} is not a number"))
                })?;
                if !(v.is_finite() && v > 0.0) {
                    return Err(ChangeError::Invalid(format!(
                        "{key}: must be a positive number"
                    )));
                }
                let budget = old.privacy.epsilon.get();
                if v > budget {
                    return Err(ChangeError::Refused(format!(
                        "privacy.epsilon: raising the budget from {budget} to {v} would spend more privacy than the study was approved for; it may only be lowered"
                    )));
                }
                if v < progress.epsilon_spent {
                    return Err(ChangeError::Refused(format!(
                        "privacy.epsilon: {v} is below the {:.4} already spent",
                        progress.epsilon_spent
                    )));
                }
                ("privacy", "epsilon", toml::Value::Float(v))
            }
        };
        let Some(toml::Value::Table(t)) = table.get_mut(section) else {
            return Err(ChangeError::Invalid(format!(
                "the stored study has no [{section}] table"
            )));
        };
        t.insert(name.to_string(), new);
    }
    // Pin calibrated noise: re-parsing with other rounds must not re-calibrate it.
    pin_noise(&mut table, old.privacy.noise_multiplier.get());
    let text = toml::to_string(&table)
        .map_err(|e| ChangeError::Invalid(format!("cannot write the changed study: {e}")))?;
    let new = StudyConfig::from_toml(&text).map_err(|e| ChangeError::Invalid(e.to_string()))?;
    check_change(&old, &new)?;
    Ok((text, new))
}

/// Replaces a study's `target_epsilon` by the `noise_multiplier` it was calibrated to.
fn pin_noise(table: &mut toml::Table, sigma: f64) {
    if let Some(toml::Value::Table(p)) = table.get_mut("privacy") {
        if p.remove("target_epsilon").is_some() {
            p.insert("noise_multiplier".into(), toml::Value::Float(sigma));
        }
    }
}

/// A record study's TOML once the coordinator has chosen its sigma from the sites' declared
/// sizes: `target_epsilon` replaced by `noise_multiplier = sigma`, and the result validated
/// (it must parse to the same study with that sigma and nothing left to calibrate).
pub fn calibrated_study(stored: &str, sigma: f64) -> Result<(String, StudyConfig), String> {
    let mut table: toml::Table = toml::from_str(stored).map_err(|e| e.to_string())?;
    pin_noise(&mut table, sigma);
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    let cfg = StudyConfig::from_toml(&text).map_err(|e| e.to_string())?;
    if cfg.privacy.calibrate_to.is_some() || cfg.privacy.noise_multiplier.get() != sigma {
        return Err("the stored study has no target_epsilon to calibrate".into());
    }
    Ok((text, cfg))
}

/// Checks that `new` differs from `old` only in what may change at runtime, in the allowed
/// direction (see [`apply_changes`]).
pub fn check_change(old: &StudyConfig, new: &StudyConfig) -> Result<(), ChangeError> {
    let mut rest = new.clone();
    rest.rounds = old.rounds;
    rest.round_timeout_secs = old.round_timeout_secs;
    rest.min_sites = old.min_sites;
    rest.privacy.epsilon = old.privacy.epsilon;
    if rest.privacy != old.privacy {
        return Err(ChangeError::Refused(
            "privacy terms cannot change once a study exists; create a new study".into(),
        ));
    }
    if rest != *old {
        return Err(ChangeError::Refused(
            "only rounds, round_timeout_secs, min_sites and privacy.epsilon may change".into(),
        ));
    }
    if new.privacy.epsilon > old.privacy.epsilon {
        return Err(ChangeError::Refused(
            "privacy.epsilon may only be lowered".into(),
        ));
    }
    if new.min_sites < old.min_sites {
        return Err(ChangeError::Refused("min_sites may only be raised".into()));
    }
    Ok(())
}

/// Whether `stored` (as changed at runtime) is `given` (as in its TOML file) with only
/// runtime changes: a restarted coordinator then keeps the stored one.
pub fn is_runtime_change_of(given: &StudyConfig, stored: &StudyConfig) -> bool {
    check_change(given, stored).is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_study_awaiting_calibration_cannot_be_changed_yet() {
        let toml = crate::test_util::StudyBuilder::new("cal")
            .record_unit(5, 10.0)
            .enrolled(["a", "b"])
            .toml()
            .replace("noise_multiplier = 2.0", "target_epsilon = 2.0");
        let progress = StudyProgress {
            rounds_started: 0,
            epsilon_spent: 0.0,
        };
        let changes = [("rounds".to_string(), "5".to_string())];
        match apply_changes(&toml, &changes, progress) {
            Err(ChangeError::Refused(r)) => assert!(r.contains("not calibrated yet"), "{r}"),
            other => panic!("{other:?}"),
        }
        // Once calibrated (sigma written in), the same change goes through.
        let (calibrated, _) = calibrated_study(&toml, 3.0).unwrap();
        assert!(apply_changes(&calibrated, &changes, progress).is_ok());
    }
    use crate::wire::{decode_frame, encode_frame, MAX_CONTROL_FRAME};

    const STUDY: &str = r#"
[study]
id = "bc"
model = { kind = "logistic_regression" }
rounds = 10
min_sites = 2
round_timeout_secs = 30

[data]
task = "binary"
label = "y"
features = ["a", "b"]
ranges = { a = [0.0, 1.0], b = [-1.0, 1.0] }

[training]
strategy = "fedavg"
local_epochs = 1
batch_size = 8
learning_rate = 0.1
server_learning_rate = 1.0

[privacy]
unit = "site"
placement = "central"
site_sample_rate = 1.0
clip_norm = 1.0
target_epsilon = 2.0
epsilon = 3.0
delta = 1e-5
accountant = "rdp"

[sites]
enrolled = ["a", "b", "c"]
"#;

    fn set(k: &str, v: &str) -> Vec<(String, String)> {
        vec![(k.to_string(), v.to_string())]
    }

    const FRESH: StudyProgress = StudyProgress {
        rounds_started: 0,
        epsilon_spent: 0.0,
    };

    #[test]
    fn safe_changes_apply_and_keep_the_calibrated_noise() {
        let old = StudyConfig::from_toml(STUDY).unwrap();
        let changes = vec![
            ("rounds".to_string(), "40".to_string()),
            ("study.round_timeout_secs".to_string(), "5".to_string()),
            ("min_sites".to_string(), "3".to_string()),
            ("privacy.epsilon".to_string(), "2.5".to_string()),
        ];
        let (text, new) = apply_changes(STUDY, &changes, FRESH).unwrap();
        assert_eq!(
            (new.rounds, new.round_timeout_secs, new.min_sites),
            (40, 5, 3)
        );
        assert_eq!(new.privacy.epsilon.get(), 2.5);
        // 40 rounds re-calibrated from target_epsilon would need more noise; the study's
        // noise is the one it started with, exactly.
        assert_eq!(
            new.privacy.noise_multiplier.get().to_bits(),
            old.privacy.noise_multiplier.get().to_bits()
        );
        assert_eq!(StudyConfig::from_toml(&text).unwrap(), new);
        assert!(is_runtime_change_of(&old, &new));
        assert!(!is_runtime_change_of(&new, &old), "epsilon went up");
    }

    #[test]
    fn loosening_privacy_or_changing_the_study_is_refused() {
        for (k, v) in [
            ("privacy.epsilon", "3.5"),
            ("epsilon", "10"),
            ("privacy.delta", "1e-3"),
            ("delta", "1e-6"),
            ("privacy.clip_norm", "5"),
            ("privacy.noise_multiplier", "0.1"),
            ("privacy.target_epsilon", "5"),
            ("privacy.unit", "record"),
            ("privacy.placement", "local"),
            ("privacy.site_sample_rate", "0.5"),
            ("privacy.accountant", "pld"),
            ("privacy.anything", "1"),
            ("min_sites", "1"),
            ("sites.enrolled", "[\"z\"]"),
            ("data.features", "[\"a\"]"),
            ("study.model", "mlp"),
            ("training.learning_rate", "1"),
            ("id", "other"),
        ] {
            match apply_changes(STUDY, &set(k, v), FRESH) {
                Err(ChangeError::Refused(reason)) => assert!(
                    reason.contains(k.trim_start_matches("privacy."))
                        || reason.contains("min_sites")
                        || reason.contains("epsilon"),
                    "{k}: {reason}"
                ),
                other => panic!("{k}={v}: {other:?}"),
            }
        }
        // Lowering epsilon below what is spent, or rounds below those started.
        let spent = StudyProgress {
            rounds_started: 6,
            epsilon_spent: 1.2,
        };
        assert!(matches!(
            apply_changes(STUDY, &set("privacy.epsilon", "1.0"), spent),
            Err(ChangeError::Refused(r)) if r.contains("already spent")
        ));
        assert!(apply_changes(STUDY, &set("privacy.epsilon", "1.3"), spent).is_ok());
        assert!(matches!(
            apply_changes(STUDY, &set("rounds", "5"), spent),
            Err(ChangeError::Refused(r)) if r.contains("already started")
        ));
        assert!(apply_changes(STUDY, &set("rounds", "6"), spent).is_ok());
    }

    #[test]
    fn malformed_changes_are_the_requesters_error() {
        for (k, v) in [
            ("colour", "blue"),
            ("rounds", "many"),
            ("rounds", "-3"),
            ("privacy.epsilon", "nan"),
            ("privacy.epsilon", "-1"),
        ] {
            assert!(
                matches!(
                    apply_changes(STUDY, &set(k, v), FRESH),
                    Err(ChangeError::Invalid(_))
                ),
                "{k}={v}"
            );
        }
        // Validation still applies: more min_sites than enrolled, a zero timeout.
        assert!(apply_changes(STUDY, &set("min_sites", "4"), FRESH).is_err());
        assert!(apply_changes(STUDY, &set("round_timeout_secs", "0"), FRESH).is_err());
        assert!(apply_changes(STUDY, &[], FRESH).is_err());
    }

    #[test]
    fn requests_are_bounded_and_large_answers_split_under_the_frame_cap() {
        let big = AdminRequest::CreateStudy {
            config_toml: "x".repeat(MAX_STUDY_TOML + 1),
        };
        assert!(big.check_bounds().is_err());
        let ok = AdminRequest::CreateStudy {
            config_toml: "x".repeat(MAX_STUDY_TOML),
        };
        assert!(ok.check_bounds().is_ok());
        assert!(encode_frame(&ok).is_ok(), "a capped request fits one frame");
        assert!(AdminRequest::FetchAudit {
            from_seq: 1,
            max: 0
        }
        .check_bounds()
        .is_err());
        assert!(AdminRequest::StopStudy {
            study: "bc".into(),
            reason: " ".into()
        }
        .check_bounds()
        .is_err());
        assert!(AdminRequest::ChangeStudy {
            study: "bc".into(),
            changes: vec![("rounds".into(), "1".into()); MAX_CHANGES + 1]
        }
        .check_bounds()
        .is_err());

        // Multi-byte characters straddling a cut stay whole.
        let text = "é".repeat(PART_BYTES);
        let frames = into_frames(&text, Some(9), Some(12));
        assert!(frames.len() >= 2);
        let mut joined = String::new();
        for (i, f) in frames.iter().enumerate() {
            let bytes = encode_frame(f).unwrap();
            assert!(bytes.len() <= MAX_CONTROL_FRAME + 4);
            match decode_frame::<AdminResponse>(&bytes).unwrap() {
                AdminResponse::Part { text } => {
                    assert!(i + 1 < frames.len());
                    joined.push_str(&text)
                }
                AdminResponse::Ok { text, next, head } => {
                    assert_eq!((i + 1, next, head), (frames.len(), Some(9), Some(12)));
                    joined.push_str(&text)
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(joined, text);
        assert_eq!(into_frames("", None, None).len(), 1);
    }
}
