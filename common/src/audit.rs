//! Tamper-evident audit log: the record format, the hash chain and its verifier.
//!
//! Pure: no file I/O here. The append-only writer and `verify_file` live in
//! [`crate::audit_file`] (feature `fs`); this module only turns records into lines and
//! lines into a [`VerifyReport`].
//!
//! # Format
//!
//! The log is UTF-8 text, one record per line, each line ending in `\n`. A line is exactly
//!
//! ```text
//! {"seq":N,"ts":T,"actor":"A","event":"E","details":D,"prev":"P","hash":"H"}
//! ```
//!
//! with the keys in this order and no whitespace outside strings, where
//!
//! - `seq` is 1 for the first record and goes up by one per record (so line k holds seq k);
//! - `ts` is the writer's clock in Unix seconds (informational, not checked for order:
//!   clocks step backwards);
//! - `actor` is who caused the event (a certificate identity such as
//!   `fedpriv://operator/alice`, or the daemon itself);
//! - `event` is one of the [`AuditEvent`] names (snake_case);
//! - `details` is any JSON value (normally an object), written canonically: object keys
//!   sorted by their UTF-8 bytes, no whitespace, numbers as `serde_json` prints them, strings
//!   escaped only where JSON requires it (`\"`, `\\`, `\b \f \n \r \t`, other control
//!   characters as `\u00xx`), everything else raw UTF-8;
//! - `prev` is the `hash` of the previous record, or 64 zeros ([`GENESIS_HASH`]) for seq 1;
//! - `hash` is the lowercase hex SHA-256 of the same line with the `,"hash":"H"` member
//!   removed, i.e. of `{"seq":…,"prev":"P"}`.
//!
//! Because a line must be byte-for-byte the canonical encoding of what it parses to, any
//! edit of a line (even whitespace) is visible, and because each record names its
//! predecessor's hash, a deleted, inserted or reordered record breaks the chain at that spot.
//!
//! # Head file
//!
//! Dropping whole records from the *end* leaves a valid chain, so the writer also keeps the
//! last seq and hash in a small side file (`<log>.head`, one line
//! `{"seq":N,"hash":"H"}`; seq 0 and [`GENESIS_HASH`] for an empty log). [`verify`] compares
//! the log against it when given one: a head beyond the end of the log means trailing
//! records were removed (or the head edited); a head whose hash differs from the log's
//! record at that seq means one of them was replaced. A head *behind* the log is reported as
//! a note, not a problem: the writer syncs the log line before it rewrites the head, so a
//! crash in between leaves the head one record behind; the records after the head are then
//! only covered by the chain.
//!
//! # Limits
//!
//! The chain is not keyed: whoever can write both the log and its head can rewrite history
//! consistently. It detects accidental damage and edits by anyone who cannot also recompute
//! the chain; against a privileged insider, copy the head (or the log) to another machine
//! or a write-once store from time to time and verify against that copy.

use crate::digest::hex;
use std::fmt;

#[path = "audit_details.rs"]
pub mod details;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `prev` of the first record, and the hash of the empty log in a head file.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest accepted line (bytes, without the newline). Records are small; the cap keeps a
/// damaged file without newlines from being read into memory whole.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// Problems kept in a [`VerifyReport`]; more are counted, not kept, so a wholly damaged
/// log does not make a report as large as the log.
pub const MAX_REPORTED_PROBLEMS: usize = 100;

/// What happened. The `details` of a record carry the particulars; the keys listed per
/// variant are the convention (the verifier does not check them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEvent {
    /// Daemon started (`version`, `config`).
    ServiceStarted,
    /// Daemon stopped cleanly (`reason`).
    ServiceStopped,
    /// Configuration loaded and validated (`path`, `sha256` of the file).
    ConfigLoaded,
    /// mTLS connection accepted (`identity`, `role`, `remote`).
    ConnectionAccepted,
    /// Connection or handshake refused (`identity` if known, `remote`, `reason`).
    ConnectionRefused,
    /// Study created (`study`, `by`).
    StudyCreated,
    /// Study settings changed (`study`, `by`, `changes`).
    StudyChanged,
    /// Study stopped (`study`, `by`, `reason`).
    StudyStopped,
    /// Round started (`study`, `round`, `sites`).
    RoundStarted,
    /// Round finished (`study`, `round`, `model_version`, `contributors`).
    RoundFinished,
    /// Site update received and accepted (`study`, `round`, `site`, `bytes`, `clipped_norm`).
    UpdateReceived,
    /// Site update rejected: NaN, wrong shape, replayed, out of round (`study`, `round`,
    /// `site`, `reason`).
    UpdateRejected,
    /// Privacy budget reserved before a round (`study`, `round`, `epsilon`, `delta`).
    BudgetReserved,
    /// Privacy budget spent (`study`, `round`, `epsilon`, `delta`, `total_epsilon`).
    BudgetSpent,
    /// Reserved budget released unspent (`study`, `round`, `epsilon`, `delta`).
    BudgetReleased,
    /// Model exported (`study`, `model_version`, `by`, `to`).
    ModelExported,
    /// Data column check (`column`, `outcome`: allowed / refused / allowed_by_config,
    /// `kind` of identifier suspected). Never the column's values.
    ColumnCheck,
    /// Any other refusal: role, rate limit, cap, enrolment (`identity`, `action`, `reason`).
    Refused,
    /// Alert raised (`kind`, `subject`, `count`).
    Alert,
    /// Retention prune ran (`what`, `removed`, `kept`). Never used for audit records.
    Pruned,
    /// The audit log itself was repaired after a crash (`torn_bytes_dropped`,
    /// `head_rebuilt`).
    AuditRecovered,
    /// Read access granted: an operator or auditor was served a read (ledger, study list,
    /// metrics, a page of the audit log) (`identity`, `action`, `study` if any; for the
    /// audit log `from_seq` and `records`). Written before the answer leaves.
    AccessGranted,
    /// A site loaded a study's data at start (`study`, `source`, `available`, the column
    /// check, counts of rows kept, filled and skipped; never a value or a row number).
    DataLoaded,
    /// A site accepted a study's announced terms (`study`, `terms_sha256`, `columns` it will
    /// read).
    StudyAccepted,
    /// A site released a stand-in instead of its trained update after paying for a round
    /// (`study`, `round`, `kind`: `noise_only` or `zero_delta`, `why`).
    StandInReleased,
    /// A site ran a membership-inference test of a released model on its own records
    /// (`study`, `model_sha256`, `round`, counts, each attack's AUC; the report itself
    /// stays at the site).
    LeakageTested,
    /// A privacy audit of a study's mechanism ran (`study`, `epsilon_claimed`,
    /// `epsilon_lower_bound`, `delta`, `confidence`, `canaries`, `guesses`,
    /// `correct_guesses`, `passed`).
    PrivacyAudited,
    /// A round's DP evaluation arrived (`study`, `round`, `model_version`, `sites`,
    /// `metric`, `value`, `noise_sd`): noised figures only.
    ModelEvaluated,
}

impl AuditEvent {
    /// Every event, in declaration order.
    pub const ALL: &'static [AuditEvent] = &[
        AuditEvent::ServiceStarted,
        AuditEvent::ServiceStopped,
        AuditEvent::ConfigLoaded,
        AuditEvent::ConnectionAccepted,
        AuditEvent::ConnectionRefused,
        AuditEvent::StudyCreated,
        AuditEvent::StudyChanged,
        AuditEvent::StudyStopped,
        AuditEvent::RoundStarted,
        AuditEvent::RoundFinished,
        AuditEvent::UpdateReceived,
        AuditEvent::UpdateRejected,
        AuditEvent::BudgetReserved,
        AuditEvent::BudgetSpent,
        AuditEvent::BudgetReleased,
        AuditEvent::ModelExported,
        AuditEvent::ColumnCheck,
        AuditEvent::Refused,
        AuditEvent::Alert,
        AuditEvent::Pruned,
        AuditEvent::AuditRecovered,
        AuditEvent::AccessGranted,
        AuditEvent::DataLoaded,
        AuditEvent::StudyAccepted,
        AuditEvent::StandInReleased,
        AuditEvent::LeakageTested,
        AuditEvent::PrivacyAudited,
        AuditEvent::ModelEvaluated,
    ];

    /// The name written in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::ServiceStarted => "service_started",
            AuditEvent::ServiceStopped => "service_stopped",
            AuditEvent::ConfigLoaded => "config_loaded",
            AuditEvent::ConnectionAccepted => "connection_accepted",
            AuditEvent::ConnectionRefused => "connection_refused",
            AuditEvent::StudyCreated => "study_created",
            AuditEvent::StudyChanged => "study_changed",
            AuditEvent::StudyStopped => "study_stopped",
            AuditEvent::RoundStarted => "round_started",
            AuditEvent::RoundFinished => "round_finished",
            AuditEvent::UpdateReceived => "update_received",
            AuditEvent::UpdateRejected => "update_rejected",
            AuditEvent::BudgetReserved => "budget_reserved",
            AuditEvent::BudgetSpent => "budget_spent",
            AuditEvent::BudgetReleased => "budget_released",
            AuditEvent::ModelExported => "model_exported",
            AuditEvent::ColumnCheck => "column_check",
            AuditEvent::Refused => "refused",
            AuditEvent::Alert => "alert",
            AuditEvent::Pruned => "pruned",
            AuditEvent::AuditRecovered => "audit_recovered",
            AuditEvent::AccessGranted => "access_granted",
            AuditEvent::DataLoaded => "data_loaded",
            AuditEvent::StudyAccepted => "study_accepted",
            AuditEvent::StandInReleased => "stand_in_released",
            AuditEvent::LeakageTested => "leakage_tested",
            AuditEvent::PrivacyAudited => "privacy_audited",
            AuditEvent::ModelEvaluated => "model_evaluated",
        }
    }

    /// The event of a log name, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|e| e.as_str() == name)
    }
}

impl fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audit record. Build with [`chain_next`] / [`chain_from`], write with [`encode_line`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts: i64,
    pub actor: String,
    pub event: AuditEvent,
    pub details: Value,
    /// Hash of the previous record ([`GENESIS_HASH`] for seq 1).
    pub prev: String,
    /// Hash of this record (see the module docs for what it covers).
    pub hash: String,
}

impl AuditRecord {
    /// Where the chain stands after this record.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

/// The last seq and hash of a log: what a record chains onto, and the content of the head
/// file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
}

impl AuditHead {
    /// The head of an empty log.
    pub fn genesis() -> Self {
        AuditHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }

    /// The head file's content: one line, `{"seq":N,"hash":"H"}\n`.
    pub fn encode(&self) -> String {
        format!("{{\"seq\":{},\"hash\":\"{}\"}}\n", self.seq, self.hash)
    }

    /// Parses a head file's content (exactly the form [`AuditHead::encode`] writes).
    pub fn parse(text: &str) -> Result<Self, HeadError> {
        let head: AuditHead = serde_json::from_str(text).map_err(|_| HeadError)?;
        if !is_hex_hash(&head.hash) || head.encode() != text {
            return Err(HeadError);
        }
        Ok(head)
    }
}

/// A head file that is not `{"seq":N,"hash":"<64 lowercase hex>"}` plus a newline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("head file is not of the form {{\"seq\":N,\"hash\":\"<64 hex>\"}}")]
pub struct HeadError;

/// The record that follows `prev` (`None`: the first record of a log).
pub fn chain_next(
    prev: Option<&AuditRecord>,
    ts: i64,
    actor: &str,
    event: AuditEvent,
    details: Value,
) -> AuditRecord {
    let head = prev.map_or_else(AuditHead::genesis, AuditRecord::head);
    chain_from(&head, ts, actor, event, details)
}

/// The record that follows a log whose last record is `head` (what a writer keeps between
/// appends, so it need not hold the whole previous record).
pub fn chain_from(
    head: &AuditHead,
    ts: i64,
    actor: &str,
    event: AuditEvent,
    details: Value,
) -> AuditRecord {
    let seq = head.seq + 1;
    let body = canonical_body(seq, ts, actor, event.as_str(), &details, &head.hash);
    AuditRecord {
        seq,
        ts,
        actor: actor.to_owned(),
        event,
        details,
        prev: head.hash.clone(),
        hash: body_hash(&body),
    }
}

/// The record's line, without the trailing newline.
pub fn encode_line(rec: &AuditRecord) -> String {
    let body = canonical_body(
        rec.seq,
        rec.ts,
        &rec.actor,
        rec.event.as_str(),
        &rec.details,
        &rec.prev,
    );
    with_hash(body, &rec.hash)
}

/// Parses one line. `None` unless it is a well-formed, canonical record with a known event
/// and a hash that matches its content; the chain is not checked (that needs the previous
/// record: use [`verify`] or [`Verifier`]).
pub fn decode_line(line: &str) -> Option<AuditRecord> {
    let raw: RawRecord = serde_json::from_str(line).ok()?;
    let event = AuditEvent::from_name(&raw.event)?;
    let body = canonical_body(
        raw.seq,
        raw.ts,
        &raw.actor,
        &raw.event,
        &raw.details,
        &raw.prev,
    );
    if body_hash(&body) != raw.hash || with_hash(body, &raw.hash) != line {
        return None;
    }
    Some(AuditRecord {
        seq: raw.seq,
        ts: raw.ts,
        actor: raw.actor,
        event,
        details: raw.details,
        prev: raw.prev,
        hash: raw.hash,
    })
}

/// A record as found in a line, before its event name is checked (so that a record with
/// an unknown event still hashes and chains, and is reported as what it is).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    seq: u64,
    ts: i64,
    actor: String,
    event: String,
    details: Value,
    prev: String,
    hash: String,
}

/// `{"seq":…,"prev":"…"` without the closing brace, so the line and the hash input share it.
fn canonical_body(
    seq: u64,
    ts: i64,
    actor: &str,
    event: &str,
    details: &Value,
    prev: &str,
) -> String {
    let mut out = String::with_capacity(128);
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = write!(out, "{{\"seq\":{seq},\"ts\":{ts},\"actor\":");
    write_json_str(&mut out, actor);
    out.push_str(",\"event\":");
    write_json_str(&mut out, event);
    out.push_str(",\"details\":");
    write_canonical(&mut out, details);
    out.push_str(",\"prev\":");
    write_json_str(&mut out, prev);
    out
}

fn with_hash(mut body: String, hash: &str) -> String {
    body.push_str(",\"hash\":");
    write_json_str(&mut body, hash);
    body.push('}');
    body
}

fn body_hash(body: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(body.as_bytes());
    ctx.update(b"}");
    hex(ctx.finish().as_ref())
}

fn is_hex_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Canonical JSON: sorted keys (explicitly, whatever `serde_json`'s map order feature is),
/// no whitespace.
fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_json_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, val)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_str(out, k);
                out.push(':');
                write_canonical(out, val);
            }
            out.push('}');
        }
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// What is wrong at one place of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// An empty line.
    EmptyLine,
    /// The last line has no newline: a torn (partial) write or a truncated file.
    TornLastLine { bytes: usize },
    /// A line over [`MAX_LINE_BYTES`].
    LineTooLong { bytes: usize },
    /// Not UTF-8.
    NotUtf8,
    /// Not JSON, or not a record's fields (column of the parser's complaint).
    Malformed { column: usize },
    /// The hash does not match the record's content: the record was edited.
    ContentAltered,
    /// The hash matches but the line is not in canonical form: the line was edited.
    NonCanonical,
    /// A well-formed record whose event name is not an [`AuditEvent`].
    UnknownEvent,
    /// Seq jumps forward: the records in between are missing (deleted or moved later).
    Missing { expected: u64, found: u64 },
    /// Seq goes backwards or repeats: a record was moved or duplicated.
    OutOfOrder { expected: u64, found: u64 },
    /// Seq is right but `prev` is not the previous line's hash: the previous record was
    /// replaced by a re-hashed one, or this one was forged.
    ChainBroken,
    /// The log has records but no head file next to it.
    HeadMissing,
    /// The head file is not in the head format.
    HeadUnreadable,
    /// The head names a seq beyond the end of the log: trailing records were removed, or
    /// the head file was altered.
    Truncated { head_seq: u64, log_seq: u64 },
    /// The head's hash differs from the log's record at the head's seq (or that seq was
    /// not found in the log): the record or the head file was altered.
    HeadMismatch { head_seq: u64 },
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::EmptyLine => write!(f, "empty line"),
            ProblemKind::TornLastLine { bytes } => write!(
                f,
                "last line is incomplete ({bytes} bytes, no newline): torn write or truncated file"
            ),
            ProblemKind::LineTooLong { bytes } => write!(
                f,
                "line of {bytes} bytes is over the {MAX_LINE_BYTES}-byte limit"
            ),
            ProblemKind::NotUtf8 => write!(f, "line is not UTF-8"),
            ProblemKind::Malformed { column } => {
                write!(f, "not a valid audit record (parser stopped at column {column})")
            }
            ProblemKind::ContentAltered => {
                write!(f, "record content altered: its hash does not match its contents")
            }
            ProblemKind::NonCanonical => {
                write!(f, "line altered: not in canonical form although its hash matches")
            }
            ProblemKind::UnknownEvent => write!(f, "unknown event name"),
            ProblemKind::Missing { expected, found } => {
                if found - expected == 1 {
                    write!(
                        f,
                        "record seq {expected} missing before this one (seq {found}): deleted or moved"
                    )
                } else {
                    write!(
                        f,
                        "records seq {expected}..={} missing before this one (seq {found}): deleted or moved",
                        found - 1
                    )
                }
            }
            ProblemKind::OutOfOrder { expected, found } => write!(
                f,
                "out of order: expected seq {expected}, found seq {found} (record moved or duplicated)"
            ),
            ProblemKind::ChainBroken => write!(
                f,
                "chain broken: prev does not match the hash of the record before it (that record replaced, or this one forged)"
            ),
            ProblemKind::HeadMissing => write!(
                f,
                "head file missing: removal of trailing records cannot be ruled out"
            ),
            ProblemKind::HeadUnreadable => write!(f, "head file unreadable or altered"),
            ProblemKind::Truncated { head_seq, log_seq } => write!(
                f,
                "log ends at seq {log_seq} but the head file records seq {head_seq}: trailing records removed (or head file altered)"
            ),
            ProblemKind::HeadMismatch { head_seq } => write!(
                f,
                "head file's hash for seq {head_seq} does not match the log: that record or the head file was altered"
            ),
        }
    }
}

/// One problem and where: `line` is 1-based (`None` for the head file), `seq` the record's
/// seq when the line parsed far enough to have one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub seq: Option<u64>,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.seq) {
            (Some(l), Some(s)) => write!(f, "line {l} (seq {s}): {}", self.kind),
            (Some(l), None) => write!(f, "line {l}: {}", self.kind),
            (None, _) => write!(f, "head file: {}", self.kind),
        }
    }
}

/// How the log compares with its head file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadStatus {
    /// No head given: removal of trailing records is not checked.
    NotChecked,
    /// The head names the log's last record.
    Matches,
    /// The head names an earlier record, correctly: the records after it are covered by
    /// the chain only (normal after a crash between an append and the head update).
    Behind { head_seq: u64 },
    /// The head disagrees with the log (see the problems).
    Disagrees,
}

/// The outcome of [`verify`]: counts, the log's last record, and every problem found (the
/// first [`MAX_REPORTED_PROBLEMS`]). Its `Display` is what `audit verify` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Lines read, including broken ones.
    pub lines: usize,
    /// Lines that parsed as records (whether or not they verify).
    pub records: u64,
    /// Seq and hash of the last record that parsed (genesis for an empty log); what a
    /// writer resumes from when the report is clean.
    pub last: AuditHead,
    pub head: HeadStatus,
    /// The first [`MAX_REPORTED_PROBLEMS`] problems, in log order, head problems last.
    pub problems: Vec<Problem>,
    /// All problems found, including those not kept.
    pub problem_count: usize,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problem_count == 0
    }

    /// The first problem, for one-line error messages.
    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ok() {
            write!(
                f,
                "audit log OK: {} records, last seq {}, last hash {}",
                self.records, self.last.seq, self.last.hash
            )?;
        } else {
            write!(
                f,
                "audit log FAILED verification: {} problem(s) in {} lines",
                self.problem_count, self.lines
            )?;
        }
        match self.head {
            HeadStatus::NotChecked => write!(
                f,
                "\n  note: no head file checked; removal of trailing records cannot be detected"
            )?,
            HeadStatus::Matches => write!(f, "\n  head file matches the last record")?,
            HeadStatus::Behind { head_seq } => write!(
                f,
                "\n  note: head file is at seq {head_seq}, behind the log (crash between append and head update?); records after it are covered by the chain only"
            )?,
            HeadStatus::Disagrees => {}
        }
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        let more = self.problem_count - self.problems.len();
        if more > 0 {
            write!(f, "\n  … and {more} more problem(s)")?;
        }
        Ok(())
    }
}

/// Streaming verifier: feed it the log line by line (without newlines), then
/// [`Verifier::finish`]. Memory stays constant whatever the log's length.
#[derive(Debug)]
pub struct Verifier {
    head: Option<AuditHead>,
    /// Whether the log's record at the head's seq had the head's hash (`None`: not seen).
    head_seen: Option<bool>,
    lines: usize,
    records: u64,
    expected_seq: u64,
    prev_hash: String,
    last: AuditHead,
    problems: Vec<Problem>,
    problem_count: usize,
}

impl Verifier {
    /// A verifier that will compare the log's end with `head` (the head file's content).
    pub fn new(head: Option<AuditHead>) -> Self {
        Verifier {
            head,
            head_seen: None,
            lines: 0,
            records: 0,
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
            last: AuditHead::genesis(),
            problems: Vec::new(),
            problem_count: 0,
        }
    }

    fn problem(&mut self, line: Option<usize>, seq: Option<u64>, kind: ProblemKind) {
        self.problem_count += 1;
        if self.problems.len() < MAX_REPORTED_PROBLEMS {
            self.problems.push(Problem { line, seq, kind });
        }
    }

    /// One complete line (its newline removed).
    pub fn feed_line(&mut self, line: &str) {
        self.lines += 1;
        let n = Some(self.lines);
        if line.is_empty() {
            return self.problem(n, None, ProblemKind::EmptyLine);
        }
        if line.len() > MAX_LINE_BYTES {
            return self.problem(n, None, ProblemKind::LineTooLong { bytes: line.len() });
        }
        let raw: RawRecord = match serde_json::from_str(line) {
            Ok(r) => r,
            // Only the column: the parser's message can quote the line's content.
            Err(e) => return self.problem(n, None, ProblemKind::Malformed { column: e.column() }),
        };
        self.records += 1;
        let seq = Some(raw.seq);
        let body = canonical_body(
            raw.seq,
            raw.ts,
            &raw.actor,
            &raw.event,
            &raw.details,
            &raw.prev,
        );
        // One problem per line, the most specific first: a content edit also breaks
        // canonical form, and a deletion also breaks `prev`.
        if body_hash(&body) != raw.hash {
            self.problem(n, seq, ProblemKind::ContentAltered);
        } else if with_hash(body, &raw.hash) != line {
            self.problem(n, seq, ProblemKind::NonCanonical);
        } else if AuditEvent::from_name(&raw.event).is_none() {
            self.problem(n, seq, ProblemKind::UnknownEvent);
        } else if raw.seq > self.expected_seq {
            let expected = self.expected_seq;
            self.problem(
                n,
                seq,
                ProblemKind::Missing {
                    expected,
                    found: raw.seq,
                },
            );
        } else if raw.seq < self.expected_seq {
            let expected = self.expected_seq;
            self.problem(
                n,
                seq,
                ProblemKind::OutOfOrder {
                    expected,
                    found: raw.seq,
                },
            );
        } else if raw.prev != self.prev_hash {
            self.problem(n, seq, ProblemKind::ChainBroken);
        }
        if let Some(h) = &self.head {
            if h.seq == raw.seq {
                self.head_seen = Some(h.hash == raw.hash);
            }
        }
        // Resynchronise on this line so one damaged spot is reported once, not on every
        // line after it.
        self.expected_seq = raw.seq.saturating_add(1);
        self.last = AuditHead {
            seq: raw.seq,
            hash: raw.hash.clone(),
        };
        self.prev_hash = raw.hash;
    }

    /// A line that could not be decoded as UTF-8.
    pub fn feed_not_utf8(&mut self) {
        self.lines += 1;
        self.problem(Some(self.lines), None, ProblemKind::NotUtf8);
    }

    /// A line over [`MAX_LINE_BYTES`] that the caller did not read whole.
    pub fn feed_too_long(&mut self, bytes: usize) {
        self.lines += 1;
        self.problem(Some(self.lines), None, ProblemKind::LineTooLong { bytes });
    }

    /// The log ends with `bytes` bytes and no newline.
    pub fn feed_torn_tail(&mut self, bytes: usize) {
        self.lines += 1;
        self.problem(Some(self.lines), None, ProblemKind::TornLastLine { bytes });
    }

    /// Lines fed so far.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Lines that parsed as records so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Records a problem with the head file found by the caller (missing, unreadable).
    pub fn head_problem(&mut self, kind: ProblemKind) {
        self.problem(None, None, kind);
    }

    /// Compares the end with the head and returns the report.
    pub fn finish(mut self) -> VerifyReport {
        let head = match self.head.take() {
            None => HeadStatus::NotChecked,
            Some(h) if h.seq > self.last.seq => {
                let log_seq = self.last.seq;
                self.problem(
                    None,
                    None,
                    ProblemKind::Truncated {
                        head_seq: h.seq,
                        log_seq,
                    },
                );
                HeadStatus::Disagrees
            }
            Some(h) => {
                let agrees = if h.seq == 0 {
                    h.hash == GENESIS_HASH
                } else {
                    self.head_seen == Some(true)
                };
                if !agrees {
                    self.problem(None, None, ProblemKind::HeadMismatch { head_seq: h.seq });
                    HeadStatus::Disagrees
                } else if h.seq == self.last.seq {
                    HeadStatus::Matches
                } else {
                    HeadStatus::Behind { head_seq: h.seq }
                }
            }
        };
        VerifyReport {
            lines: self.lines,
            records: self.records,
            last: self.last,
            head,
            problems: self.problems,
            problem_count: self.problem_count,
        }
    }
}

/// Verifies complete lines (newlines removed) against an optional head. A torn last line
/// cannot be told from a complete one here; use [`verify_bytes`] for raw file content.
pub fn verify<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    head: Option<&AuditHead>,
) -> VerifyReport {
    let mut v = Verifier::new(head.cloned());
    for line in lines {
        v.feed_line(line);
    }
    v.finish()
}

/// Verifies a whole log's bytes, including whether its last line is complete.
pub fn verify_bytes(data: &[u8], head: Option<&AuditHead>) -> VerifyReport {
    let mut v = Verifier::new(head.cloned());
    let mut rest = data;
    while !rest.is_empty() {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                match std::str::from_utf8(&rest[..i]) {
                    Ok(line) => v.feed_line(line),
                    Err(_) => v.feed_not_utf8(),
                }
                rest = &rest[i + 1..];
            }
            None => {
                v.feed_torn_tail(rest.len());
                rest = &[];
            }
        }
    }
    v.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(n: u64) -> Vec<String> {
        let mut prev: Option<AuditRecord> = None;
        let mut lines = Vec::new();
        for i in 1..=n {
            let rec = chain_next(
                prev.as_ref(),
                1_700_000_000 + i as i64,
                "fedpriv://operator/alice",
                AuditEvent::ALL[(i as usize) % AuditEvent::ALL.len()],
                json!({"study": "s1", "round": i, "z": [1.5, null, "é\n\"x\""], "a": {"y": 1, "b": -2}}),
            );
            lines.push(encode_line(&rec));
            prev = Some(rec);
        }
        lines
    }

    fn report(lines: &[String], head: Option<&AuditHead>) -> VerifyReport {
        verify(lines.iter().map(String::as_str), head)
    }

    fn head_of(lines: &[String]) -> AuditHead {
        decode_line(lines.last().expect("non-empty"))
            .expect("valid")
            .head()
    }

    #[test]
    fn clean_log_verifies_and_round_trips() {
        let lines = log(5);
        let head = head_of(&lines);
        let r = report(&lines, Some(&head));
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.records, 5);
        assert_eq!(r.last, head);
        assert_eq!(r.head, HeadStatus::Matches);
        for (i, l) in lines.iter().enumerate() {
            let rec = decode_line(l).expect("decodes");
            assert_eq!(rec.seq, i as u64 + 1);
            assert_eq!(&encode_line(&rec), l);
        }
        // Keys are sorted and strings escaped canonically.
        assert!(lines[0].contains(r#""details":{"a":{"b":-2,"y":1},"round":1,"#));
        assert!(lines[0].contains(r#""é\n\"x\"""#));
        assert!(lines[0].starts_with(r#"{"seq":1,"ts":1700000001,"actor":"#));
        assert!(lines[0].contains(&format!("\"prev\":\"{GENESIS_HASH}\"")));
    }

    #[test]
    fn empty_log() {
        let r = verify(std::iter::empty(), Some(&AuditHead::genesis()));
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.head, HeadStatus::Matches);
        let r = verify(std::iter::empty(), None);
        assert!(r.is_ok());
        assert_eq!(r.head, HeadStatus::NotChecked);
    }

    #[test]
    fn edit_is_located() {
        let mut lines = log(6);
        lines[2] = lines[2].replace("\"round\":3", "\"round\":4");
        let r = report(&lines, None);
        assert_eq!(r.problem_count, 1, "{r}");
        assert_eq!(r.problems[0].line, Some(3));
        assert_eq!(r.problems[0].seq, Some(3));
        assert_eq!(r.problems[0].kind, ProblemKind::ContentAltered);
    }

    #[test]
    fn whitespace_edit_is_seen() {
        let mut lines = log(3);
        lines[1] = lines[1].replacen("\"ts\":", "\"ts\": ", 1);
        let r = report(&lines, None);
        assert_eq!(r.problems[0].kind, ProblemKind::NonCanonical, "{r}");
        assert_eq!(r.problems[0].line, Some(2));
    }

    #[test]
    fn rehashed_edit_breaks_the_next_link() {
        let mut lines = log(4);
        let mut rec = decode_line(&lines[1]).expect("valid");
        rec.actor = "fedpriv://operator/mallory".into();
        let forged = chain_next(
            Some(&decode_line(&lines[0]).expect("valid")),
            rec.ts,
            &rec.actor,
            rec.event,
            rec.details,
        );
        lines[1] = encode_line(&forged);
        let r = report(&lines, None);
        assert_eq!(r.problem_count, 1, "{r}");
        assert_eq!(r.problems[0].line, Some(3));
        assert_eq!(r.problems[0].kind, ProblemKind::ChainBroken);
    }

    #[test]
    fn deletion_and_reorder_are_located() {
        let mut lines = log(6);
        lines.remove(3);
        let r = report(&lines, None);
        assert_eq!(r.problem_count, 1, "{r}");
        assert_eq!(r.problems[0].line, Some(4));
        assert_eq!(
            r.problems[0].kind,
            ProblemKind::Missing {
                expected: 4,
                found: 5
            }
        );

        let mut lines = log(6);
        lines.swap(1, 2);
        let r = report(&lines, None);
        assert!(r
            .problems
            .iter()
            .any(|p| p.line == Some(3) && matches!(p.kind, ProblemKind::OutOfOrder { .. })));
        assert!(
            r.problems.iter().all(|p| matches!(p.line, Some(2..=4))),
            "{r}"
        );
    }

    #[test]
    fn head_checks() {
        let lines = log(5);
        let head = head_of(&lines);
        // Trailing record dropped.
        let r = report(&lines[..4], Some(&head));
        assert_eq!(
            r.problems[0].kind,
            ProblemKind::Truncated {
                head_seq: 5,
                log_seq: 4
            }
        );
        // Head one behind: a note, not a problem.
        let behind = head_of(&lines[..4]);
        let r = report(&lines, Some(&behind));
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.head, HeadStatus::Behind { head_seq: 4 });
        // Head with a wrong hash.
        let bad = AuditHead {
            seq: 5,
            hash: "ab".repeat(32),
        };
        let r = report(&lines, Some(&bad));
        assert_eq!(
            r.problems[0].kind,
            ProblemKind::HeadMismatch { head_seq: 5 }
        );
        assert_eq!(r.head, HeadStatus::Disagrees);
    }

    #[test]
    fn head_file_format() {
        let h = AuditHead {
            seq: 7,
            hash: "0f".repeat(32),
        };
        assert_eq!(AuditHead::parse(&h.encode()), Ok(h.clone()));
        assert!(AuditHead::parse("{\"seq\":7}\n").is_err());
        assert!(AuditHead::parse(&h.encode().replace("0f", "0F")).is_err());
        assert!(AuditHead::parse(&h.encode().replace(":", ": ")).is_err());
    }

    #[test]
    fn bytes_torn_tail_and_garbage() {
        let lines = log(3);
        let mut data = lines.join("\n").into_bytes();
        data.push(b'\n');
        assert!(verify_bytes(&data, None).is_ok());
        let cut = data.len() - 10;
        let r = verify_bytes(&data[..cut], None);
        assert_eq!(r.problem_count, 1, "{r}");
        assert_eq!(r.problems[0].line, Some(3));
        assert!(matches!(
            r.problems[0].kind,
            ProblemKind::TornLastLine { .. }
        ));

        let mut bad = data.clone();
        bad.extend_from_slice(b"\xff\xfe\n{\"seq\":\"secret-value\"}\n");
        let r = verify_bytes(&bad, None);
        assert_eq!(r.problems[0].kind, ProblemKind::NotUtf8);
        assert_eq!(r.problems[0].line, Some(4));
        assert!(matches!(r.problems[1].kind, ProblemKind::Malformed { .. }));
        // Reports never quote the log's content.
        assert!(!r.to_string().contains("secret-value"), "{r}");
    }

    #[test]
    fn unknown_event_is_reported() {
        let lines = log(2);
        let rec = decode_line(&lines[1]).expect("valid");
        // A correctly hashed record whose event is not ours.
        let body = canonical_body(3, 0, "x", "teleported", &json!({}), &rec.hash);
        let line = with_hash(body.clone(), &body_hash(&body));
        let mut all = lines.clone();
        all.push(line);
        let r = report(&all, None);
        assert_eq!(r.problem_count, 1, "{r}");
        assert_eq!(r.problems[0].kind, ProblemKind::UnknownEvent);
    }

    #[test]
    fn a_log_holding_every_event_verifies() {
        // Each event (the newest included) is one the verifier knows.
        let lines = log(AuditEvent::ALL.len() as u64);
        assert!(lines
            .iter()
            .any(|l| l.contains("\"event\":\"access_granted\"")));
        let r = report(&lines, Some(&head_of(&lines)));
        assert!(r.is_ok(), "{r}");
    }

    #[test]
    fn event_names_round_trip() {
        for e in AuditEvent::ALL {
            assert_eq!(AuditEvent::from_name(e.as_str()), Some(*e));
            let via_serde = serde_json::to_value(e).expect("serialises");
            assert_eq!(via_serde, json!(e.as_str()));
        }
    }

    #[test]
    fn problem_cap() {
        let lines: Vec<String> = (0..MAX_REPORTED_PROBLEMS + 5).map(|_| "x".into()).collect();
        let r = report(&lines, None);
        assert_eq!(r.problems.len(), MAX_REPORTED_PROBLEMS);
        assert_eq!(r.problem_count, MAX_REPORTED_PROBLEMS + 5);
        assert!(r.to_string().contains("and 5 more"));
    }
}
