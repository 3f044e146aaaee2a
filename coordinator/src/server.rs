//! The running coordinator: one task owns every study's state machine and the store; one
//! task per connected site reads its messages and forwards them as events; one writer per
//! site sends what the owner tells it to. Shutdown is a watch channel: tasks stop at a safe
//! point (between actions, never between a spend and its commit) and `run` waits for them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::digest::{hex, sha256_hex};
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::model::{FlatModel, ModelSpec};
use fedpriv_common::pki::Role;
use fedpriv_common::protocol::{
    CoordinatorMessage, SiteMessage, StudyAnnouncement, PROTOCOL_VERSION,
};
use fedpriv_common::seal::{SealError, SealKey, SealReader, SealWriter};
use fedpriv_common::wire::{CloseCode, TensorHeader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use fedpriv_common::audit::AuditEvent;
use fedpriv_common::audit_file::AuditLog;
use serde_json::json;

use crate::audit::{AuditFailed, AuditHandle, COORDINATOR};
use crate::limits::{
    EarlyRefusal, HandshakeDecision, HandshakeGate, Limits, Source, TokenBucket, UploadAllowance,
};
use crate::metrics::{self, Metrics, RefusalTracker};
use crate::round::{Action, Input, StudyEngine};
use crate::store::{RoundStatus, Store, StoreError, StudyStatus};
use crate::transport::{self, AuthenticatedPeer};

/// Something observers (the demo, tests, metrics) may want to know.
#[derive(Debug, Clone)]
pub enum Notification {
    RoundCompleted {
        study: String,
        round: u64,
        model: Arc<Vec<f32>>,
        contributors: Vec<String>,
        epsilon: f64,
        budget: f64,
    },
    RoundAborted {
        study: String,
        round: u64,
        reason: String,
    },
    StudyEnded {
        study: String,
        reason: String,
    },
}

/// How to run a coordinator.
#[derive(Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub tls: rustls::ServerConfig,
    /// Studies to run (created on first start, resumed afterwards).
    pub studies: Vec<(StudyConfig, String)>,
    /// How much of the sites' uploads may wait, decoded, for the aggregator: this many
    /// uploads' worth of [`CHUNKS_PER_UPLOAD`] chunks of [`UPLOAD_CHUNK_VALUES`] values.
    /// Updates are folded into the round's aggregate chunk by chunk as they arrive, so no
    /// upload ever holds a model-sized buffer; this bounds the memory between the
    /// connections and the aggregator (independent of the model size and of the number of
    /// sites; each upload in progress also fills one chunk of its own).
    pub max_concurrent_uploads: usize,
    /// Seals model checkpoints at rest (see [`crate::at_rest`] for where it comes from).
    pub at_rest_key: Arc<SealKey>,
}

/// Chunks per unit of [`Options::max_concurrent_uploads`].
pub const CHUNKS_PER_UPLOAD: usize = 8;

/// Values per upload chunk handed to the aggregator (128 KiB): network packets (about
/// 1.2 kB each) are gathered up to this size so that spooling and folding work in large
/// pieces, while each upload in progress holds little (64 sites: 8 MiB in all).
pub const UPLOAD_CHUNK_VALUES: usize = 1 << 15;

/// Largest plaintext of one spool record: a chunk is at most a few times
/// [`UPLOAD_CHUNK_VALUES`]; the cap bounds what a damaged length prefix can make us allocate.
const MAX_SPOOL_RECORD: usize = 64 << 20;

/// Errors that stop the coordinator from starting. Operator's (config, state) or ours.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Endpoint(#[from] transport::EndpointError),
    #[error("config error: {0}")]
    Config(String),
    #[error("state directory {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("audit log {}: {source}; check it with `fedpriv-coordinator audit verify --log {}` (a crash's torn last line is repaired by the recovery path; an edited log must be restored from backup)", path.display(), path.display())]
    Audit {
        path: PathBuf,
        source: fedpriv_common::audit_file::AuditError,
    },
}

/// Why an action could not be carried out: the ledger or the audit log failed. Either way
/// the study stops (fail closed).
#[derive(Debug, thiserror::Error)]
enum ActError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditFailed),
}

/// Refusals per source audited one by one per minute; the alert fires at the 20th.
const REFUSAL_WINDOW_MS: u64 = 60_000;
const REFUSALS_AUDITED_PER_WINDOW: u32 = 10;
const REFUSALS_ALERT_AT: u32 = 20;
/// Over all sources together (a flood sprayed from many addresses).
const REFUSALS_AUDITED_PER_WINDOW_ALL: u32 = 200;

/// Share of a study's budget spent at which the near-budget alert fires (once per study
/// and process).
const BUDGET_ALERT_FRACTION: f64 = 0.9;

/// Who ran a command, for `by` in records of what the command line did (studies created
/// from `--study` files, exports, prunes): the login name and the real uid.
pub fn local_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    match std::env::var("USER") {
        Ok(name) if !name.is_empty() => format!("local/{name} (uid {uid})"),
        _ => format!("local/uid-{uid}"),
    }
}

/// The actor name of a certificate identity in audit records (`role/name`).
fn actor(peer: &AuthenticatedPeer) -> String {
    peer.identity.to_string()
}

/// Counts a refusal, writes the summary of the source's window that just closed, and says
/// whether this refusal is within the source's cap (to be audited one by one) and whether
/// the repeated-refusals alert is due.
fn tally_refusal(
    tracker: &std::sync::Mutex<RefusalTracker>,
    started: Instant,
    audit: &AuditHandle,
    metrics: &Metrics,
    source: &str,
    event: AuditEvent,
) -> Option<metrics::RefusalVerdict> {
    let now = started.elapsed().as_millis() as u64;
    let verdict = {
        let mut t = tracker.lock().ok()?;
        // Failed handshakes name no identity we issued: only their address.
        if event == AuditEvent::ConnectionRefused {
            t.refused_anonymous(source, now)
        } else {
            t.refused(source, now)
        }
    };
    let counter = if event == AuditEvent::ConnectionRefused {
        metrics::CONNECTIONS_REFUSED
    } else {
        metrics::REFUSALS
    };
    metrics.inc(counter, &[]);
    if verdict.suppressed_in_closed_window > 0 {
        audit.record_detached(
            COORDINATOR,
            AuditEvent::Refused,
            json!({"source": source, "suppressed_refusals": verdict.suppressed_in_closed_window, "window_s": REFUSAL_WINDOW_MS / 1000}),
        );
    }
    if verdict.suppressed_globally_in_closed_window > 0 {
        audit.record_detached(
            COORDINATOR,
            AuditEvent::Refused,
            json!({"source": "all", "suppressed_refusals": verdict.suppressed_globally_in_closed_window, "window_s": REFUSAL_WINDOW_MS / 1000}),
        );
    }
    if !verdict.audit {
        metrics.inc(metrics::AUDIT_SUPPRESSED, &[]);
    }
    Some(verdict)
}

fn alert_repeated_refusals(audit: &AuditHandle, metrics: &Metrics, source: &str) {
    metrics.alert(
        Some(audit),
        metrics::alert::REPEATED_REFUSALS,
        source,
        &format!(
            "{REFUSALS_ALERT_AT} refusals within {} s",
            REFUSAL_WINDOW_MS / 1000
        ),
    );
}

/// Audits a refusal unless the source already had its share this window (then it is
/// counted, and summarised when the window closes), and raises the repeated-refusals alert.
fn note_refusal(
    tracker: &std::sync::Mutex<RefusalTracker>,
    started: Instant,
    audit: &AuditHandle,
    metrics: &Metrics,
    source: &str,
    event: AuditEvent,
    details: serde_json::Value,
) {
    let Some(verdict) = tally_refusal(tracker, started, audit, metrics, source, event) else {
        return;
    };
    if verdict.audit {
        audit.record_detached(source, event, details);
    }
    if verdict.alert {
        alert_repeated_refusals(audit, metrics, source);
    }
}

/// The per-source refusal cap, for refusals made outside a site connection (the admin
/// channel): the same tracker and clock as the acceptor's and the sites', so an identity's
/// refusals are capped whichever way it is refused.
#[derive(Debug, Clone)]
pub struct RefusalCap {
    tracker: Arc<std::sync::Mutex<RefusalTracker>>,
    started: Instant,
}

impl RefusalCap {
    /// As [`note_refusal`], keyed by `source`, but a refusal within the cap is on disk
    /// before this returns: the requester is told of it next, and what it is told of must
    /// already be on record. Err if that record could not be written.
    pub async fn note(
        &self,
        audit: &AuditHandle,
        metrics: &Metrics,
        source: &str,
        details: serde_json::Value,
    ) -> Result<(), AuditFailed> {
        let event = AuditEvent::Refused;
        // A poisoned tracker (a panic elsewhere) must not silence refusals: audit them all.
        let verdict = tally_refusal(&self.tracker, self.started, audit, metrics, source, event)
            .unwrap_or(metrics::RefusalVerdict {
                audit: true,
                alert: false,
                suppressed_in_closed_window: 0,
                suppressed_globally_in_closed_window: 0,
            });
        let written = if verdict.audit {
            audit.record(source, event, details).await.map(|_| ())
        } else {
            Ok(())
        };
        if verdict.alert {
            alert_repeated_refusals(audit, metrics, source);
        }
        written
    }
}

enum Event {
    Connected {
        site: String,
        conn_id: u64,
        tx: mpsc::UnboundedSender<Outgoing>,
    },
    Disconnected {
        site: String,
        conn_id: u64,
    },
    Study {
        study: String,
        input: Input,
    },
    /// A streamed upload's begin, chunk or end (`input`), with its spool (on begin) and
    /// the permit its chunk holds (released once the chunk is folded).
    Upload {
        study: String,
        input: Input,
        spool: Option<(u64, Spool)>,
        permit: Option<OwnedSemaphorePermit>,
    },
}

/// An upload's spool file, and the flag that tells its connection task to stop spooling
/// and forwarding (set once the upload is refused: the rest of its body is drained).
#[derive(Clone)]
struct Spool {
    file: Arc<SpoolFile>,
    refused: Arc<std::sync::atomic::AtomicBool>,
}

enum Outgoing {
    Message(CoordinatorMessage),
    WithModel(CoordinatorMessage, transport::quic_io::SharedBody),
}

pub(crate) struct StudyRuntime {
    pub(crate) engine: StudyEngine,
    spec: ModelSpec,
    pub(crate) announcement: StudyAnnouncement,
    /// The model body of the round being sent out, encoded once for every site.
    broadcast: Option<(u64, transport::quic_io::SharedBody)>,
    /// Seals this study's checkpoints.
    at_rest_key: Arc<SealKey>,
}

/// Each study's model and enrolled sites, for the connection tasks.
/// Per study: the model's layout, the enrolled sites, and whether updates are un-noised
/// (central placement: no figure computed from one may be recorded or logged).
type Directory = Arc<HashMap<String, (ModelSpec, Vec<String>, bool)>>;

fn directory(studies: &BTreeMap<String, StudyRuntime>) -> Directory {
    Arc::new(
        studies
            .iter()
            .map(|(id, s)| {
                let p = &s.engine.config().privacy;
                let central = p.unit == fedpriv_common::config::PrivacyUnit::Site
                    && p.placement == fedpriv_common::config::Placement::Central;
                (
                    id.clone(),
                    (s.spec.clone(), s.engine.config().enrolled.clone(), central),
                )
            })
            .collect(),
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The spec of a study's model.
pub fn study_spec(cfg: &StudyConfig) -> Result<ModelSpec, ServerError> {
    arch::spec_for_data(&cfg.model, &cfg.data, cfg.n_outputs())
        .map_err(|e| ServerError::Config(format!("study {}: {e}", cfg.id)))
}

/// Path of a model version's file.
pub fn model_path(state_dir: &Path, study: &str, round: u64) -> PathBuf {
    state_dir
        .join("models")
        .join(study)
        .join(format!("round-{round:05}.safetensors"))
}

/// Writes a file so that it is either all there or not there: temporary file (filled by
/// `fill`), fsync, rename, fsync of the directory.
fn write_atomic<T>(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let out = {
        let mut f = std::fs::File::create(&tmp)?;
        let out = fill(&mut f)?;
        f.sync_all()?;
        out
    };
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(out)
}

/// Streams `values` as a safetensors file (f32, little-endian) into `out` without building
/// the file in memory: the header, then the values straight from the model's memory in
/// 1 MiB pieces. Tensors are stored in
/// the spec's (flat-vector) order, so the data is one contiguous run; the order is also
/// kept in the metadata, as [`FlatModel::to_safetensors_bytes`] does, and the file reads
/// back with [`FlatModel::from_safetensors_bytes`] (or any safetensors reader).
pub fn write_safetensors(
    spec: &ModelSpec,
    values: &[f32],
    meta: &BTreeMap<String, String>,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let n = spec.validate().map_err(|e| invalid(e.to_string()))? as usize;
    if values.len() != n {
        return Err(invalid(format!(
            "model spec says {n} values, got {}",
            values.len()
        )));
    }
    let order: Vec<&str> = spec.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut header = serde_json::Map::new();
    let mut metadata: serde_json::Map<String, serde_json::Value> = meta
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    metadata.insert(
        fedpriv_common::model::SAFETENSORS_ORDER_KEY.into(),
        serde_json::Value::String(serde_json::to_string(&order)?),
    );
    header.insert("__metadata__".into(), serde_json::Value::Object(metadata));
    for (name, shape, off, len) in spec.layout() {
        header.insert(
            name.to_owned(),
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [off * 4, (off + len) * 4],
            }),
        );
    }
    let mut header = serde_json::to_vec(&header)?;
    // Pad with spaces so the data starts 8-byte aligned, as safetensors' own writer does.
    while (header.len() + 8) % 8 != 0 {
        header.push(b' ');
    }
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let body = fedpriv_common::wire::f32_body_bytes(values);
    for piece in body.chunks(1 << 20) {
        out.write_all(piece)?;
    }
    Ok(())
}

/// What a checkpoint is sealed for: a file moved into another study's or round's slot
/// does not open there.
fn checkpoint_purpose(study: &str, round: u64) -> Vec<u8> {
    format!("fedpriv checkpoint\0study={study}\0round={round}").into_bytes()
}

/// SHA-256 of the bytes written through it.
struct HashingWriter<W> {
    inner: W,
    hash: ring::digest::Context,
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// SHA-256 of the bytes read through it.
struct HashingReader<R> {
    inner: R,
    hash: ring::digest::Context,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes round `round`'s model as a sealed (streamed AES-256-GCM) safetensors file at
/// `path`, atomically, and returns the SHA-256 of the sealed file (what the store records).
/// Memory: one 1 MiB segment; the model is read from its own memory, never copied whole.
pub fn write_checkpoint(
    key: &SealKey,
    spec: &ModelSpec,
    values: &[f32],
    meta: &BTreeMap<String, String>,
    study: &str,
    round: u64,
    path: &Path,
) -> std::io::Result<String> {
    write_atomic(path, |f| {
        let hashing = HashingWriter {
            inner: f,
            hash: ring::digest::Context::new(&ring::digest::SHA256),
        };
        let mut sealed = SealWriter::new(key, hashing, &checkpoint_purpose(study, round))
            .map_err(std::io::Error::other)?;
        write_safetensors(spec, values, meta, &mut sealed)?;
        let hashing = sealed.finish().map_err(std::io::Error::other)?;
        Ok(hex(hashing.hash.finish().as_ref()))
    })
}

/// Decrypts round `round`'s checkpoint at `path` into `out`, segment by segment, each
/// authenticated before it is written; with `expected_sha`, the sealed file must also have
/// that SHA-256 (checked once the whole file was read: on a mismatch, whatever reached
/// `out` must be discarded, as on any error). Errors name the file and the way out.
pub fn read_checkpoint(
    key: &SealKey,
    path: &Path,
    study: &str,
    round: u64,
    expected_sha: Option<&str>,
    out: &mut impl std::io::Write,
) -> Result<(), ServerError> {
    let what = format!(
        "model file {} (round {round} of study {study})",
        path.display()
    );
    let sealed_err = |e: SealError| match e {
        SealError::Io { kind, message } => ServerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(kind, message),
        },
        SealError::WrongKey {
            file_key_id,
            our_key_id,
        } => ServerError::Config(format!(
            "{what} was sealed with another at-rest key (key id {file_key_id}; the key given \
             has id {our_key_id}): start with the key this state directory was written with \
             (--at-rest-key-file or {})",
            crate::at_rest::KEY_ENV
        )),
        SealError::NotSealed => ServerError::Config(format!(
            "{what} is not an encrypted checkpoint (plaintext, another format, or damaged at \
             the start); nothing of it was used: restore it from backup"
        )),
        SealError::Truncated { .. } | SealError::Authentication => ServerError::Config(format!(
            "{what} does not authenticate under the at-rest key: it was altered, truncated \
                 or moved from another study or round; nothing unauthenticated was used: \
                 restore it from backup"
        )),
        other => ServerError::Internal(format!("{what}: {other}")),
    };
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let hashing = HashingReader {
        inner: std::io::BufReader::with_capacity(1 << 16, file),
        hash: ring::digest::Context::new(&ring::digest::SHA256),
    };
    let mut reader =
        SealReader::new(key, hashing, &checkpoint_purpose(study, round)).map_err(sealed_err)?;
    while let Some(plain) = reader.next_segment().map_err(sealed_err)? {
        out.write_all(plain).map_err(|e| {
            ServerError::Internal(format!("{what}: writing the decrypted model: {e}"))
        })?;
    }
    let digest = hex(reader.into_inner().hash.finish().as_ref());
    match expected_sha {
        Some(sha) if sha != digest => Err(ServerError::Config(format!(
            "{what} authenticates but is not the file the ledger recorded (SHA-256 differs): \
             an older or newer copy of that round; restore it from backup"
        ))),
        _ => Ok(()),
    }
}

/// Opens the store and builds each study's engine, creating new studies and resuming
/// known ones from their last completed round. Active studies in the store that `studies`
/// does not list (created by an operator at runtime) resume from their stored config.
fn load_studies(
    store: &mut Store,
    state_dir: &Path,
    studies: &[(StudyConfig, String)],
    key: &Arc<SealKey>,
) -> Result<BTreeMap<String, StudyRuntime>, ServerError> {
    let mut out = BTreeMap::new();
    for (cfg, toml_text) in studies {
        out.insert(
            cfg.id.clone(),
            study_runtime(store, state_dir, cfg, toml_text, key)?,
        );
    }
    for row in store.studies()? {
        if row.status != StudyStatus::Active || out.contains_key(&row.id) {
            continue;
        }
        let cfg = StudyConfig::from_toml(&row.config_toml)
            .map_err(|e| ServerError::Config(format!("stored study {}: {e}", row.id)))?;
        tracing::info!(study = %row.id, "resuming a study created at runtime");
        out.insert(
            row.id.clone(),
            study_runtime(store, state_dir, &cfg, &row.config_toml, key)?,
        );
    }
    Ok(out)
}

/// Builds one study's engine: creates the study in the store if it is new, else resumes it
/// from its last completed round. A study an operator changed at runtime (see
/// [`fedpriv_common::admin::apply_changes`]) keeps its stored config over `cfg`.
pub(crate) fn study_runtime(
    store: &mut Store,
    state_dir: &Path,
    cfg: &StudyConfig,
    toml_text: &str,
    key: &Arc<SealKey>,
) -> Result<StudyRuntime, ServerError> {
    let stored_cfg;
    let cfg = {
        match store.study(&cfg.id)? {
            None => {
                store.create_study(&cfg.id, toml_text, &cfg.enrolled, unix_now())?;
                cfg
            }
            Some(row) => {
                let stored = StudyConfig::from_toml(&row.config_toml)
                    .map_err(|e| ServerError::Config(format!("stored study {}: {e}", cfg.id)))?;
                if &stored == cfg {
                    cfg
                } else if fedpriv_common::admin::is_runtime_change_of(cfg, &stored) {
                    tracing::info!(study = %cfg.id, "an operator changed this study at runtime; using its stored configuration");
                    stored_cfg = stored;
                    &stored_cfg
                } else {
                    return Err(ServerError::Config(format!(
                        "study {} already exists with a different configuration; a study's privacy terms cannot change once it has started (use a new study id)",
                        cfg.id
                    )));
                }
            }
        }
    };
    {
        let spec = study_spec(cfg)?;
        let global = match store.last_completed_round(&cfg.id)? {
            Some((round, file, sha)) => {
                let path = state_dir.join(&file);
                // Authenticated (and digest-checked) in full before a byte is parsed.
                let mut bytes = Vec::with_capacity(spec.num_values() * 4 + 4096);
                read_checkpoint(key, &path, &cfg.id, round, Some(&sha), &mut bytes)?;
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
        // Every round ever reserved is consumed, completed or not: its spend stands.
        let next_round = store
            .rounds(&cfg.id)?
            .iter()
            .map(|r| r.round)
            .max()
            .unwrap_or(0)
            + 1;
        for r in store.rounds(&cfg.id)? {
            if r.status == RoundStatus::Reserved {
                store.abort_round(
                    &cfg.id,
                    r.round,
                    "the coordinator stopped during the round",
                    unix_now(),
                )?;
            }
        }
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
        let status = store.study(&cfg.id)?.map(|r| r.status);
        if status != Some(StudyStatus::Active) {
            tracing::info!(study = %cfg.id, "study already ended; serving its state read-only");
            engine.mark_ended("ended before this start");
        }
        let announcement = StudyAnnouncement::for_study(cfg);
        Ok(StudyRuntime {
            engine,
            spec,
            announcement,
            broadcast: None,
            at_rest_key: Arc::clone(key),
        })
    }
}

/// The QUIC stateless-reset key, kept (0600) in the state directory so that it outlives a
/// crash; created on first start.
fn reset_key(state_dir: &Path) -> Result<[u8; 32], ServerError> {
    use std::io::Write;
    let path = state_dir.join("quic-reset.key");
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| {
            ServerError::Config(format!(
                "{} is not a 32-byte key; delete it to make a new one",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| ServerError::Internal("no system randomness".into()))?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&path).map_err(io_err(&path))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(io_err(&path))?;
            Ok(key)
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// A state directory that holds earlier runs' models or audit log but no database lost its
/// ledger: starting afresh would reset every study's spent budget to zero. Refuse.
fn refuse_missing_ledger(state_dir: &Path, db: &Path) -> Result<(), ServerError> {
    let earlier = ["models", "audit.log"]
        .iter()
        .map(|f| state_dir.join(f))
        .find(|p| p.exists());
    match earlier {
        Some(evidence) if !db.exists() => Err(ServerError::Config(format!(
            "state database {} is missing but {} exists from earlier runs: restore the database from backup; \
             the privacy ledger is never recreated silently (move the whole directory aside to start from nothing)",
            db.display(),
            evidence.display()
        ))),
        _ => Ok(()),
    }
}

/// Runs the coordinator until `shutdown` turns true (or every study has ended and
/// `exit_when_done` is set). Returns once every task has stopped.
pub async fn run(
    opts: Options,
    shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<(), ServerError> {
    run_with_limits(opts, Limits::default(), shutdown, notify, exit_when_done).await
}

/// As [`run`], with the given network limits (handshakes, connections per identity,
/// message rate, upload allowance: see [`Limits`]) instead of their defaults.
pub async fn run_with_limits(
    opts: Options,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<(), ServerError> {
    limits.validate().map_err(ServerError::Config)?;
    std::fs::create_dir_all(&opts.state_dir).map_err(io_err(&opts.state_dir))?;
    let db = opts.state_dir.join("coordinator.db");
    refuse_missing_ledger(&opts.state_dir, &db)?;
    let mut store = Store::open(&db)?;
    let audit_path = opts.state_dir.join("audit.log");
    let audit_log = AuditLog::open(&audit_path).map_err(|source| ServerError::Audit {
        path: audit_path.clone(),
        source,
    })?;
    let (audit, audit_thread) =
        crate::audit::start(audit_log).map_err(|e| ServerError::Internal(e.to_string()))?;
    let metrics = Metrics::new();
    let result = serve(
        opts,
        limits,
        &mut store,
        &audit,
        &metrics,
        &mut shutdown,
        notify,
        exit_when_done,
    )
    .await;
    let stop_reason = match &result {
        Ok(()) => "shutdown".to_string(),
        Err(e) => format!("error: {e}"),
    };
    let _ = audit
        .record(
            COORDINATOR,
            AuditEvent::ServiceStopped,
            json!({"reason": stop_reason}),
        )
        .await;
    drop(audit);
    // The audit thread only waits on the disk; let it finish what it was sent.
    let _ = tokio::task::spawn_blocking(move || audit_thread.finish()).await;
    result
}

/// Everything of [`run`] after the store and the audit log are open.
#[allow(clippy::too_many_arguments)]
async fn serve(
    opts: Options,
    limits: Limits,
    store: &mut Store,
    audit: &AuditHandle,
    metrics: &Metrics,
    shutdown: &mut watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<(), ServerError> {
    let audit_err = |e: AuditFailed| ServerError::Internal(e.to_string());
    audit
        .record(
            COORDINATOR,
            AuditEvent::ServiceStarted,
            json!({"version": env!("CARGO_PKG_VERSION"), "listen": opts.listen.to_string(), "studies": opts.studies.len()}),
        )
        .await
        .map_err(audit_err)?;
    let by = local_user();
    for (cfg, toml_text) in &opts.studies {
        audit
            .record(
                &by,
                AuditEvent::ConfigLoaded,
                json!({"study": cfg.id, "sha256": sha256_hex(toml_text.as_bytes())}),
            )
            .await
            .map_err(audit_err)?;
        if store.study(&cfg.id)?.is_none() {
            // Recorded before `load_studies` creates it.
            audit
                .record(
                    &by,
                    AuditEvent::StudyCreated,
                    json!({"study": cfg.id, "by": by, "enrolled": cfg.enrolled, "epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get(), "unit": format!("{:?}", cfg.privacy.unit).to_lowercase()}),
                )
                .await
                .map_err(audit_err)?;
        }
    }
    let mut studies = load_studies(store, &opts.state_dir, &opts.studies, &opts.at_rest_key)?;
    let endpoint = transport::make_coordinator_endpoint(
        opts.listen,
        opts.tls,
        &limits,
        &reset_key(&opts.state_dir)?,
    )?;
    let limits = Arc::new(limits);
    tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), studies = studies.len(), "coordinator listening");
    // Studies change at runtime (an operator creates one): connection tasks read the
    // latest directory; the owner publishes a new one after each change.
    let (specs_tx, specs) = watch::channel(directory(&studies));
    let (admin_tx, mut admin_rx) = mpsc::unbounded_channel::<crate::admin::AdminCommand>();
    let refusals = Arc::new(std::sync::Mutex::new(RefusalTracker::with_global_cap(
        REFUSAL_WINDOW_MS,
        REFUSALS_AUDITED_PER_WINDOW,
        REFUSALS_ALERT_AT,
        REFUSALS_AUDITED_PER_WINDOW_ALL,
    )));
    // The clock origin of the refusal windows, shared by everyone who uses `refusals`.
    let refusals_started = Instant::now();
    let admin_ctx = crate::admin::AdminCtx {
        state_dir: opts.state_dir.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        owner: admin_tx,
        shutdown: shutdown.clone(),
        refusals: RefusalCap {
            tracker: Arc::clone(&refusals),
            started: refusals_started,
        },
        message_rate: limits.message_rate,
    };
    let at_rest_key = Arc::clone(&opts.at_rest_key);
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<Event>();
    let uploads = Arc::new(Semaphore::new(
        opts.max_concurrent_uploads.max(1) * CHUNKS_PER_UPLOAD,
    ));
    // Spool files of uploads in flight (unlinked as soon as they are opened); anything
    // here was left by a crash.
    let spool_dir = opts.state_dir.join("spool");
    if spool_dir.exists() {
        std::fs::remove_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
    }
    std::fs::create_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
    let next_upload = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let mut tasks = JoinSet::new();

    // Acceptor: handshakes run in their own tasks so a slow or hostile peer blocks no one.
    {
        let endpoint = endpoint.clone();
        let events_tx = events_tx.clone();
        let mut shutdown = shutdown.clone();
        let audit = audit.clone();
        let metrics = metrics.clone();
        let refusals = Arc::clone(&refusals);
        let started = refusals_started;
        let limits = Arc::clone(&limits);
        tasks.spawn(async move {
            let mut conn_id = 0u64;
            let mut conns = JoinSet::new();
            // Cheap decisions before any cryptography: a flood of attempts (bad
            // certificates or none) costs a refusal packet each, not a handshake.
            let mut gate = HandshakeGate::new(&limits);
            let handshakes = Arc::new(Semaphore::new(limits.handshakes_in_flight));
            let source_slots = crate::limits::SourceSlots::new(&limits);
            let table = transport::ConnectionTable::new(&limits);
            loop {
                tokio::select! {
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        let addr = incoming.remote_address();
                        let in_flight = limits.handshakes_in_flight.saturating_sub(handshakes.available_permits());
                        let decision = gate.decide(addr.ip(), incoming.remote_address_validated(), incoming.may_retry(), in_flight, started.elapsed().as_millis() as u64);
                        let mut decision = decision;
                        let permit = match decision {
                            HandshakeDecision::Accept => match source_slots.try_take(Source::of(addr.ip())) {
                                Some(slot) => Arc::clone(&handshakes).try_acquire_owned().ok().map(|p| (p, slot)),
                                None => {
                                    decision = HandshakeDecision::Refuse(EarlyRefusal::SourceBusy);
                                    None
                                }
                            },
                            HandshakeDecision::Retry => {
                                transport::retry_or_refuse(incoming);
                                continue;
                            }
                            HandshakeDecision::Refuse(_) => None,
                        };
                        let Some(permit) = permit else {
                            incoming.refuse();
                            let why = match decision { HandshakeDecision::Refuse(why) => why, _ => EarlyRefusal::Busy };
                            // Keyed by source (address, or IPv6 /64): what the rate limit charges.
                            note_refusal(&refusals, started, &audit, &metrics, &Source::of(addr.ip()).to_string(), AuditEvent::ConnectionRefused, json!({"remote": addr.to_string(), "reason": why.reason()}));
                            continue;
                        };
                        conn_id += 1;
                        let ctx = ConnCtx { conn_id, events: events_tx.clone(), specs: specs.clone(), admin: admin_ctx.clone(), uploads: Arc::clone(&uploads), spool_dir: spool_dir.clone(), next_upload: Arc::clone(&next_upload), shutdown: shutdown.clone(), audit: audit.clone(), metrics: metrics.clone(), refusals: Arc::clone(&refusals), started, limits: Arc::clone(&limits), allowance: Arc::new(UploadAllowance::new()) };
                        let table = Arc::clone(&table);
                        let handshake_timeout = limits.handshake_timeout;
                        conns.spawn(async move {
                            let accepted = transport::accept_within(incoming, handshake_timeout).await;
                            drop(permit);
                            match accepted {
                                Ok(peer) => {
                                    // Held until the connection's task ends.
                                    let Ok(_slot) = table.admit(&peer, ctx.conn_id) else {
                                        ctx.refused(&peer, "connect", "too many connections of this identity");
                                        return;
                                    };
                                    serve_peer(peer, ctx).await
                                }
                                Err(refused) => {
                                    // Keyed by address: a bad certificate names no one we trust.
                                    let source = refused.addr.ip().to_string();
                                    note_refusal(&ctx.refusals, ctx.started, &ctx.audit, &ctx.metrics, &source, AuditEvent::ConnectionRefused, json!({"remote": refused.addr.to_string(), "reason": refused.reason}));
                                }
                            }
                        });
                    }
                    _ = shutdown.changed() => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
            conns.shutdown().await;
        });
    }

    let started = Instant::now();
    let now_ms = move || started.elapsed().as_millis() as u64;
    let mut budget_alerted: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut metrics_written = Instant::now();
    let mut noise = NoiseSource::from_os().map_err(|e| ServerError::Internal(e.to_string()))?;
    let mut sites: HashMap<String, (u64, mpsc::UnboundedSender<Outgoing>)> = HashMap::new();
    // Spool files of the streamed uploads in flight, by upload id.
    let mut spools: HashMap<u64, Spool> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let state_dir = opts.state_dir.clone();
    let mut result = Ok(());
    loop {
        if exit_when_done && studies.values().all(|s| s.engine.is_finished()) {
            break;
        }
        let mut broadcast: Vec<(String, CoordinatorMessage)> = Vec::new();
        // Held until the chunk it came with is folded.
        let mut _chunk_permit = None;
        // An upload that ended: its spool is dropped once its end is handled.
        let mut ended_upload = None;
        // An upload that began: if the engine did not admit it, its sender stops.
        let mut began_upload = None;
        let study_inputs: Vec<(String, Input)> = tokio::select! {
            _ = shutdown.changed() => break,
            Some(cmd) = admin_rx.recv() => {
                let response = crate::admin::Owner {
                    studies: &mut studies,
                    store,
                    state_dir: &state_dir,
                    at_rest_key: &at_rest_key,
                    audit,
                    broadcast: &mut broadcast,
                }
                .execute(cmd.request, &cmd.by);
                // Before any announcement leaves: the sites' answers must find the study.
                specs_tx.send_replace(directory(&studies));
                let _ = cmd.reply.send(response);
                Vec::new()
            }
            _ = tick.tick() => {
                if metrics_written.elapsed() >= Duration::from_secs(5) {
                    metrics_written = Instant::now();
                    flush_refusals(&refusals, refusals_started, audit, false);
                    if let Err(e) = metrics.write_file(&state_dir) {
                        tracing::warn!(error = %e, "cannot write metrics.prom");
                    }
                }
                studies.keys().map(|k| (k.clone(), Input::Tick)).collect()
            }
            ev = events_rx.recv() => match ev {
                None => break,
                Some(Event::Connected { site, conn_id, tx }) => {
                    // Sent by the owner: a study created before this is in the welcome, one
                    // created after is announced to the site (it is in `sites` by then).
                    let visible = studies
                        .values()
                        .filter(|s| s.engine.config().enrolled.contains(&site))
                        .map(|s| s.announcement.clone())
                        .collect();
                    let _ = tx.send(Outgoing::Message(CoordinatorMessage::Welcome {
                        version: PROTOCOL_VERSION,
                        studies: visible,
                    }));
                    sites.insert(site, (conn_id, tx));
                    Vec::new()
                }
                Some(Event::Disconnected { site, conn_id }) => {
                    if sites.get(&site).is_some_and(|(id, _)| *id == conn_id) {
                        sites.remove(&site);
                        studies.keys().map(|k| (k.clone(), Input::SiteGone { site: site.clone() })).collect()
                    } else {
                        Vec::new()
                    }
                }
                Some(Event::Study { study, input }) => {
                    if let Input::SiteReady { site, records } = &input {
                        if let Err(e) = store.set_site_records(&study, site, *records) {
                            tracing::error!(%study, %site, error = %e, "cannot record the site's record count");
                        }
                    }
                    vec![(study, input)]
                }
                Some(Event::Upload { study, input, spool, permit }) => {
                    if let Some((id, spool)) = spool {
                        spools.insert(id, spool);
                        began_upload = Some(id);
                    }
                    if let Input::UpdateEnd { upload, .. } = &input {
                        ended_upload = Some(*upload);
                    }
                    _chunk_permit = permit;
                    vec![(study, input)]
                }
            },
        };
        for (study_id, input) in study_inputs {
            let Some(rt) = studies.get_mut(&study_id) else {
                continue;
            };
            let mut queue: std::collections::VecDeque<Action> =
                rt.engine.handle(input, now_ms(), &mut noise).into();
            while let Some(action) = queue.pop_front() {
                if let Action::Unfold {
                    site,
                    round,
                    upload,
                    len,
                } = &action
                {
                    // Take a refused or cut-short upload's folded values back out, from its
                    // spool, before anything else reaches the engine.
                    if let Some(spool) = spools.get(upload) {
                        spool
                            .refused
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    let file = spools.get(upload).map(|s| &s.file);
                    let ok = unfold_from_spool(file, *upload, *len, |input| {
                        queue.extend(rt.engine.handle(input, now_ms(), &mut noise))
                    });
                    if ok {
                        tracing::info!(study = %study_id, round, %site, values = len, "partly folded update taken back out of the aggregate");
                    } else {
                        tracing::error!(study = %study_id, round, %site, "cannot read back a partly folded update; the round's aggregate is lost");
                    }
                    let done = Input::UnfoldDone {
                        upload: *upload,
                        ok,
                    };
                    queue.extend(rt.engine.handle(done, now_ms(), &mut noise));
                    spools.remove(upload);
                    continue;
                }
                match execute(
                    &study_id,
                    rt,
                    action,
                    &mut Acting {
                        store,
                        audit,
                        metrics,
                        budget_alerted: &mut budget_alerted,
                    },
                    &state_dir,
                    &sites,
                    notify.as_ref(),
                    &mut broadcast,
                ) {
                    Ok(Some(follow_up)) => {
                        queue.extend(rt.engine.handle(follow_up, now_ms(), &mut noise))
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // Fail closed: without a durable ledger no task may leave.
                        tracing::error!(study = %study_id, error = %e, "state write failed; stopping the study");
                        let reason = format!("stopped: the state database failed ({e})");
                        let _ =
                            store.set_study_status(&study_id, StudyStatus::Stopped, Some(&reason));
                        rt.engine.mark_ended(&reason);
                        broadcast.push((
                            study_id.clone(),
                            CoordinatorMessage::StudyEnded {
                                study: study_id.clone(),
                                reason,
                            },
                        ));
                        queue.clear();
                        match e {
                            ActError::Store(
                                e @ (StoreError::Sqlite(_) | StoreError::Io { .. }),
                            ) => {
                                result = Err(ServerError::Store(e));
                            }
                            ActError::Audit(e) => {
                                result = Err(ServerError::Internal(e.to_string()))
                            }
                            ActError::Store(_) => {}
                        }
                    }
                }
            }
            // Every task of a round leaves in one batch; holding its body longer would keep
            // the old model alive when the round closes and force a copy of it.
            rt.broadcast = None;
        }
        if let Some(id) = began_upload {
            let admitted = studies.values().any(|s| s.engine.is_receiving(id));
            if !admitted {
                if let Some(spool) = spools.remove(&id) {
                    spool
                        .refused
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
        if let Some(id) = ended_upload {
            spools.remove(&id);
        }
        for (study_id, msg) in broadcast.drain(..) {
            let enrolled = studies
                .get(&study_id)
                .map(|s| s.engine.config().enrolled.clone())
                .unwrap_or_default();
            for site in enrolled {
                if let Some((_, tx)) = sites.get(&site) {
                    let _ = tx.send(Outgoing::Message(msg.clone()));
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    endpoint.close(
        transport::quic_io::var_int(CloseCode::Normal),
        b"coordinator shutting down",
    );
    drop(events_rx);
    tasks.shutdown().await;
    // Peers that vanished without closing (a flood's half-open handshakes) would hold this
    // until the idle timeout; the close frames have gone out by then in practice.
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    flush_refusals(&refusals, refusals_started, audit, true);
    if let Err(e) = metrics.write_file(&state_dir) {
        tracing::warn!(error = %e, "cannot write metrics.prom");
    }
    result
}

/// Writes the summaries of refusals the caps kept out of the log (see
/// [`RefusalTracker::flush`]); `all` at shutdown.
fn flush_refusals(
    tracker: &std::sync::Mutex<RefusalTracker>,
    started: Instant,
    audit: &AuditHandle,
    all: bool,
) {
    let now = started.elapsed().as_millis() as u64;
    let due = match tracker.lock() {
        Ok(mut t) => t.flush(now, all),
        Err(_) => return,
    };
    for (source, n) in due {
        audit.record_detached(
            COORDINATOR,
            AuditEvent::Refused,
            json!({"source": source, "suppressed_refusals": n, "window_s": REFUSAL_WINDOW_MS / 1000}),
        );
    }
}

/// What `execute` writes to: the ledger, the audit log, the counters.
struct Acting<'a> {
    store: &'a mut Store,
    audit: &'a AuditHandle,
    metrics: &'a Metrics,
    budget_alerted: &'a mut std::collections::HashSet<String>,
}

/// Carries out one action. Returns an input to feed back (the spend's commit).
#[allow(clippy::too_many_arguments)]
fn execute(
    study: &str,
    rt: &mut StudyRuntime,
    action: Action,
    acting: &mut Acting<'_>,
    state_dir: &Path,
    sites: &HashMap<String, (u64, mpsc::UnboundedSender<Outgoing>)>,
    notify: Option<&mpsc::UnboundedSender<Notification>>,
    broadcast: &mut Vec<(String, CoordinatorMessage)>,
) -> Result<Option<Input>, ActError> {
    let now = unix_now();
    let store = &mut *acting.store;
    let audit = acting.audit;
    let metrics = acting.metrics;
    let record = |event: AuditEvent, details: serde_json::Value| {
        audit.record_blocking(COORDINATOR, event, details)
    };
    match action {
        Action::RecordSpend { round, entries } => {
            let rows: Vec<(String, _, f64)> = entries
                .iter()
                .map(|e| (e.site.clone(), e.event, e.epsilon_after))
                .collect();
            store.record_spend(study, round, &rows, now)?;
            // Both durable before `SpendCommitted` lets the round's tasks leave.
            let delta = rt.engine.config().privacy.delta.get();
            for e in &entries {
                record(
                    AuditEvent::BudgetSpent,
                    json!({"study": study, "round": round, "site": e.site, "q": e.event.q.get(), "sigma": e.event.sigma.get(), "steps": e.event.steps, "epsilon": e.epsilon_after, "delta": delta}),
                )?;
            }
            let selected: Vec<&str> = entries.iter().map(|e| e.site.as_str()).collect();
            record(
                AuditEvent::RoundStarted,
                json!({"study": study, "round": round, "sites": selected}),
            )?;
            tracing::info!(%study, round, sites = rows.len(), "budget spent and recorded");
            let budget = rt.engine.config().privacy.epsilon.get();
            let worst = entries.iter().map(|e| e.epsilon_after).fold(0.0, f64::max);
            if worst >= BUDGET_ALERT_FRACTION * budget
                && acting.budget_alerted.insert(study.to_string())
            {
                metrics.alert(
                    Some(audit),
                    metrics::alert::BUDGET_NEAR,
                    study,
                    &format!("epsilon {worst:.4} of {budget} spent after round {round}"),
                );
            }
            return Ok(Some(Input::SpendCommitted { round }));
        }
        Action::SendTask { site, task, model } => {
            let round = task.round;
            // One body per round, shared by every site's send buffer (not one copy each).
            let body = match &rt.broadcast {
                Some((r, body)) if *r == round => body.clone(),
                _ => {
                    let body = transport::quic_io::SharedBody::encode(model, task.header.dtype);
                    rt.broadcast = Some((round, body.clone()));
                    body
                }
            };
            match sites.get(&site) {
                Some((_, tx))
                    if tx
                        .send(Outgoing::WithModel(CoordinatorMessage::Task(task), body))
                        .is_ok() =>
                {
                    tracing::info!(%study, round, %site, "task sent");
                }
                _ => {
                    tracing::warn!(%study, round, %site, "site went away before its task could be sent");
                    return Ok(Some(Input::SiteGone { site }));
                }
            }
        }
        Action::UpdateAccepted {
            site,
            round,
            norm: None,
        } => {
            tracing::info!(%study, round, %site, "update accepted");
            metrics.inc(metrics::UPDATES_ACCEPTED, &[("study", study)]);
        }
        Action::UpdateAccepted {
            site,
            round,
            norm: Some(norm),
        } => {
            tracing::info!(%study, round, %site, norm = format!("{norm:.3}"), "update accepted");
            metrics.inc(metrics::UPDATES_ACCEPTED, &[("study", study)]);
            let floor = crate::round::norm_floor(rt.engine.config(), rt.spec.num_values());
            if norm < floor {
                metrics.alert(
                    Some(audit),
                    metrics::alert::NORM_ANOMALY,
                    &format!("site/{site}"),
                    &format!("study {study} round {round}: update norm {norm:.4} is below {floor:.4}, the least the study's noise allows: the site may not be adding its noise"),
                );
            }
        }
        Action::UpdateRejected {
            site,
            round,
            reason,
        } => {
            tracing::warn!(%study, round, %site, %reason, "update rejected");
            metrics.inc(metrics::UPDATES_REJECTED, &[("study", study)]);
            record(
                AuditEvent::UpdateRejected,
                json!({"study": study, "round": round, "site": site, "reason": reason}),
            )?;
            if reason.contains("norm") {
                metrics.alert(
                    Some(audit),
                    metrics::alert::NORM_ANOMALY,
                    &format!("site/{site}"),
                    &format!("study {study} round {round}: {reason}"),
                );
            }
        }
        // Carried out by the caller, which can feed the engine.
        Action::Unfold { .. } => {}
        Action::SiteDeclined {
            site,
            round,
            reason,
        } => {
            tracing::info!(%study, round, %site, reason = reason.as_str(), "site declined the round")
        }
        Action::SiteExcluded { site, reason } => {
            tracing::warn!(%study, %site, %reason, "site left out of the study")
        }
        Action::Checkpoint {
            round,
            model,
            contributors,
            epsilon,
        } => {
            if let Some(index) = fedpriv_common::model::first_non_finite(&model) {
                return Err(StoreError::Invalid(format!(
                    "round {round}: model value {index} is not finite"
                ))
                .into());
            }
            let path = model_path(state_dir, study, round);
            // Sealed and streamed from the model's own memory: no copy of the model.
            // The model describes itself: its study, data contract, layers and guarantee.
            let card = fedpriv_common::model_card::ModelCard::for_round(
                rt.engine.config(),
                round,
                epsilon,
            )
            .metadata();
            let digest = write_checkpoint(
                &rt.at_rest_key,
                &rt.spec,
                &model,
                &card,
                study,
                round,
                &path,
            )
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(state_dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            // The model version exists once the store commits it: record it first.
            record(
                AuditEvent::RoundFinished,
                json!({"study": study, "round": round, "outcome": "completed", "model_version": round, "file": rel, "sha256": digest, "contributors": contributors, "epsilon": epsilon}),
            )?;
            store.complete_round(study, round, &rel, &digest, &contributors, now)?;
            metrics.inc(metrics::ROUNDS_COMPLETED, &[("study", study)]);
            let budget = rt.engine.config().privacy.epsilon.get();
            tracing::info!(%study, round, sites = contributors.len(), epsilon = format!("{epsilon:.4}"), budget, "round completed");
            if let Some(n) = notify {
                let _ = n.send(Notification::RoundCompleted {
                    study: study.to_string(),
                    round,
                    model,
                    contributors,
                    epsilon,
                    budget,
                });
            }
        }
        Action::RoundAborted { round, reason } => {
            record(
                AuditEvent::RoundFinished,
                json!({"study": study, "round": round, "outcome": "aborted", "reason": reason}),
            )?;
            metrics.inc(metrics::ROUNDS_ABORTED, &[("study", study)]);
            store.abort_round(study, round, &reason, now)?;
            tracing::warn!(%study, round, %reason, "round aborted");
            if let Some(n) = notify {
                let _ = n.send(Notification::RoundAborted {
                    study: study.to_string(),
                    round,
                    reason,
                });
            }
        }
        Action::StudyEnded { reason } => {
            record(
                AuditEvent::StudyStopped,
                json!({"study": study, "by": COORDINATOR, "reason": reason}),
            )?;
            store.set_study_status(study, StudyStatus::Completed, Some(&reason))?;
            tracing::info!(%study, %reason, "study ended");
            broadcast.push((
                study.to_string(),
                CoordinatorMessage::StudyEnded {
                    study: study.to_string(),
                    reason: reason.clone(),
                },
            ));
            if let Some(n) = notify {
                let _ = n.send(Notification::StudyEnded {
                    study: study.to_string(),
                    reason,
                });
            }
        }
    }
    Ok(None)
}

struct ConnCtx {
    conn_id: u64,
    events: mpsc::UnboundedSender<Event>,
    /// Each study's model and enrolled sites, as the owner last published them.
    specs: watch::Receiver<Directory>,
    admin: crate::admin::AdminCtx,
    /// Chunk permits: decoded upload chunks waiting for the aggregator.
    uploads: Arc<Semaphore>,
    spool_dir: PathBuf,
    next_upload: Arc<std::sync::atomic::AtomicU64>,
    shutdown: watch::Receiver<bool>,
    audit: AuditHandle,
    metrics: Metrics,
    refusals: Arc<std::sync::Mutex<RefusalTracker>>,
    /// The acceptor's clock origin, for the refusal windows.
    started: Instant,
    limits: Arc<Limits>,
    /// Update body bytes this connection's site may still send, per study (granted by
    /// each task the writer sends, charged by each upload).
    allowance: Arc<UploadAllowance>,
}

impl ConnCtx {
    /// Audits (within the per-source cap) a refusal of something `peer` asked for.
    fn refused(&self, peer: &AuthenticatedPeer, action: &str, reason: &str) {
        let who = actor(peer);
        note_refusal(
            &self.refusals,
            self.started,
            &self.audit,
            &self.metrics,
            &who,
            AuditEvent::Refused,
            json!({"identity": who, "remote": peer.remote_address().to_string(), "action": action, "reason": reason}),
        );
    }
}

/// Serves one authenticated peer by its certificate's role, once its connection is on
/// record. Sites speak the site protocol; operators and auditors the admin protocol.
async fn serve_peer(peer: AuthenticatedPeer, ctx: ConnCtx) {
    let who = actor(&peer);
    ctx.metrics.inc(
        metrics::CONNECTIONS_ACCEPTED,
        &[("role", peer.identity.role.as_str())],
    );
    let accepted = ctx
        .audit
        .record(
            &who,
            AuditEvent::ConnectionAccepted,
            json!({"identity": who, "role": peer.identity.role.as_str(), "remote": peer.remote_address().to_string()}),
        )
        .await;
    if let Err(e) = accepted {
        tracing::error!(error = %e, "cannot record a connection; closing it");
        let _ = transport::refuse(
            &peer,
            CloseCode::Internal,
            "the coordinator cannot record this connection",
        );
        return;
    }
    match peer.identity.role {
        Role::Site => serve_site(peer, ctx).await,
        Role::Operator | Role::Auditor => crate::admin::serve_admin(peer, ctx.admin.clone()).await,
    }
}

/// The hello's outcome when a site made an admin request instead.
const ADMIN_BY_SITE: &str = "admin request from a site";

/// Serves one authenticated site until it disconnects or the coordinator stops.
async fn serve_site(peer: AuthenticatedPeer, mut ctx: ConnCtx) {
    if transport::require_role(&peer, Role::Site).is_err() {
        ctx.refused(&peer, "site protocol", "not a site certificate");
        return;
    }
    let site = peer.identity.name.clone();
    let conn = peer.conn.clone();
    // The first stream must be the hello.
    let hello = async {
        let mut recv = tokio::select! {
            uni = conn.accept_uni() => uni.map_err(|e| e.to_string())?,
            bi = conn.accept_bi() => {
                if let Ok((send, recv)) = bi {
                    // An admin request with a site's certificate: refused and audited there.
                    crate::admin::refuse_site_request(&peer, &ctx.admin, send, recv).await;
                }
                return Err(ADMIN_BY_SITE.to_string());
            }
        };
        let msg: SiteMessage = transport::recv_frame(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        transport::recv_end(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(msg)
    };
    match tokio::time::timeout(ctx.limits.handshake_timeout, hello).await {
        Ok(Ok(SiteMessage::Hello {
            version,
            claimed_site,
        })) => {
            if version != PROTOCOL_VERSION {
                ctx.refused(&peer, "hello", &format!("protocol version {version}"));
                let _ = transport::refuse(
                    &peer,
                    CloseCode::BadVersion,
                    &format!(
                        "protocol version {version}, this coordinator speaks {PROTOCOL_VERSION}"
                    ),
                );
                return;
            }
            if transport::require_claim(&peer, &claimed_site).is_err() {
                ctx.refused(&peer, "hello", "claimed another site's name");
                return;
            }
        }
        // Already refused, audited and closed.
        Ok(Err(e)) if e == ADMIN_BY_SITE => return,
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            ctx.refused(&peer, "hello", "expected a hello first");
            let _ = transport::refuse(
                &peer,
                CloseCode::ProtocolViolation,
                "expected a hello first",
            );
            return;
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    if ctx
        .events
        .send(Event::Connected {
            site: site.clone(),
            conn_id: ctx.conn_id,
            tx: tx.clone(),
        })
        .is_err()
    {
        return;
    }
    // Writer: sends in order, one stream per message.
    let writer_conn = conn.clone();
    let allowance = Arc::clone(&ctx.allowance);
    let bodies_per_task = u64::from(ctx.limits.upload_bodies_per_task);
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            if let Outgoing::WithModel(CoordinatorMessage::Task(task), _) = &out {
                // Granted before the task leaves: the site may answer at once.
                let body = crate::limits::f32_body_bytes(task.header.num_values);
                allowance.grant(&task.study, bodies_per_task.saturating_mul(body));
            }
            let res = match &out {
                Outgoing::Message(m) => transport::send_message(&writer_conn, m, None).await,
                Outgoing::WithModel(m, body) => {
                    transport::quic_io::send_message_shared(&writer_conn, m, body).await
                }
            };
            match res {
                Ok(()) => {}
                // The site refused this one message (stopped its stream); the connection
                // and the site's other studies go on.
                Err(
                    e @ (transport::quic_io::StreamError::Stopped(_)
                    | transport::quic_io::StreamError::Write(quinn::WriteError::Stopped(_))),
                ) => tracing::warn!(error = %e, "site refused a message"),
                Err(e) => {
                    tracing::warn!(error = %e, "send to site failed");
                    break;
                }
            }
        }
    });
    let mut messages = TokenBucket::full(&ctx.limits.message_rate, 0);
    let opened = Instant::now();
    loop {
        // Over its message rate, the site's next message is read later; meanwhile it can
        // open only `max_uni_streams` streams, so nothing piles up on our side.
        let wait = messages.wait_ms(
            &ctx.limits.message_rate,
            opened.elapsed().as_millis() as u64,
        );
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = ctx.shutdown.changed() => break,
            }
        }
        messages.take(
            &ctx.limits.message_rate,
            opened.elapsed().as_millis() as u64,
        );
        let recv = tokio::select! {
            r = conn.accept_uni() => r,
            _ = ctx.shutdown.changed() => break,
        };
        let mut recv = match recv {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%site, reason = %transport::describe_close(&e), "site disconnected");
                break;
            }
        };
        match read_site_message(&site, &mut recv, &ctx).await {
            Ok(Some(event)) => {
                if ctx.events.send(event).is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(%site, %reason, "message from site refused");
                ctx.refused(&peer, "message", &reason);
            }
        }
    }
    let _ = ctx.events.send(Event::Disconnected {
        site,
        conn_id: ctx.conn_id,
    });
    writer.abort();
}

/// Reads one message (and its body). Peer errors are returned as text to log; the
/// connection stays up for the site's other messages.
async fn read_site_message(
    site: &str,
    recv: &mut quinn::RecvStream,
    ctx: &ConnCtx,
) -> Result<Option<Event>, String> {
    let msg: SiteMessage = transport::recv_frame(recv)
        .await
        .map_err(|e| e.to_string())?;
    let specs = ctx.specs.borrow().clone();
    let enrolled_in = |study: &str| {
        specs
            .get(study)
            .filter(|(_, enrolled, _)| enrolled.iter().any(|s| s == site))
            .map(|(spec, _, central)| (spec, *central))
    };
    let ev = |study: String, input: Input| Ok(Some(Event::Study { study, input }));
    match msg {
        SiteMessage::Hello { .. } => Err("a second hello".into()),
        SiteMessage::Ready { study, records } => {
            transport::recv_end(recv).await.map_err(|e| e.to_string())?;
            enrolled_in(&study).ok_or(format!("not enrolled in study {study:?}"))?;
            ev(
                study,
                Input::SiteReady {
                    site: site.to_string(),
                    records,
                },
            )
        }
        SiteMessage::Unable { study, reason } => {
            transport::recv_end(recv).await.map_err(|e| e.to_string())?;
            tracing::warn!(%site, %study, reason = reason.as_str(), "site cannot take part");
            enrolled_in(&study).ok_or(format!("not enrolled in study {study:?}"))?;
            // A refusal for good takes the site out of the study (which may then end).
            if reason.is_permanent() {
                ev(
                    study,
                    Input::Declined {
                        site: site.to_string(),
                        round: 0,
                        reason,
                    },
                )
            } else {
                Ok(None)
            }
        }
        SiteMessage::Decline {
            study,
            round,
            reason,
        } => {
            transport::recv_end(recv).await.map_err(|e| e.to_string())?;
            enrolled_in(&study).ok_or(format!("not enrolled in study {study:?}"))?;
            ev(
                study,
                Input::Declined {
                    site: site.to_string(),
                    round,
                    reason,
                },
            )
        }
        SiteMessage::Update {
            study,
            round,
            header,
        } => {
            let (spec, central) =
                enrolled_in(&study).ok_or(format!("not enrolled in study {study:?}"))?;
            stream_update(recv, &header, spec, central, &study, site, round, ctx).await?;
            Ok(None)
        }
    }
}

/// Streams an update body to the aggregator chunk by chunk (sized by our model, never by
/// the peer's claim): each chunk is first written to the upload's spool file (so that,
/// should the upload be refused or cut short after part of it was folded, that part can
/// be taken back out), then sent to the engine, holding a chunk permit until it is folded.
/// Memory: the chunks in flight, whatever the model size and the number of uploads.
#[allow(clippy::too_many_arguments)]
async fn stream_update(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    spec: &ModelSpec,
    central: bool,
    study: &str,
    site: &str,
    round: u64,
    ctx: &ConnCtx,
) -> Result<(), String> {
    use std::sync::atomic::Ordering;
    // Sites may send their update in any supported encoding (f32, f16, bf16): rounding a
    // noised update is theirs to choose; the values are f32 from here on.
    let accepted = fedpriv_common::wire::Dtype::ALL;
    let mut decoder =
        match fedpriv_common::wire::TensorBodyDecoder::new_accepting(header, spec, &accepted) {
            Ok(d) => d,
            Err(e) => {
                let _ = recv.stop(transport::quic_io::var_int(e.close_code()));
                // An update of the wrong shape is a rejected update (audited as one,
                // within the per-source cap, since no body was read or charged).
                let reason = format!("wrong shape: {e}");
                tracing::warn!(%study, round, %site, %reason, "update rejected");
                ctx.metrics
                    .inc(metrics::UPDATES_REJECTED, &[("study", study)]);
                let who = format!("site/{site}");
                note_refusal(
                    &ctx.refusals,
                    ctx.started,
                    &ctx.audit,
                    &ctx.metrics,
                    &who,
                    AuditEvent::UpdateRejected,
                    json!({"study": study, "round": round, "site": site, "reason": reason}),
                );
                return Ok(());
            }
        };
    // At most `upload_bodies_per_task` bodies per round: cut off before a byte is read.
    let body_bytes = header.body_len_bytes().map_err(|e| e.to_string())?;
    if let Err(over) = ctx.allowance.take(study, body_bytes) {
        let _ = recv.stop(transport::quic_io::var_int(CloseCode::Limit));
        return Err(over.to_string());
    }
    let upload = ctx.next_upload.fetch_add(1, Ordering::Relaxed);
    let spool = Spool {
        file: open_spool(&ctx.spool_dir, upload).map_err(|e| {
            let _ = recv.stop(transport::quic_io::var_int(CloseCode::Normal));
            format!("cannot open a spool file for the upload: {e}")
        })?,
        refused: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let send = |input: Input, spool: Option<(u64, Spool)>, permit: Option<OwnedSemaphorePermit>| {
        ctx.events
            .send(Event::Upload {
                study: study.to_string(),
                input,
                spool,
                permit,
            })
            .map_err(|_| "the coordinator is stopping".to_string())
    };
    send(
        Input::UpdateBegin {
            site: site.to_string(),
            round,
            upload,
        },
        Some((upload, spool.clone())),
        None,
    )?;
    // The body's squared norm as it arrives, for the audit record (the engine decides on
    // its own running norm).
    let mut sq_norm = 0f64;
    // Values gathered from network packets until a chunk is full, and where they start.
    let mut buf: Vec<f32> = Vec::with_capacity(UPLOAD_CHUNK_VALUES + 1);
    let mut buf_at = 0usize;
    let flush = |buf: &mut Vec<f32>, buf_at: &mut usize, permit| -> Result<(), String> {
        let values = std::mem::replace(buf, Vec::with_capacity(UPLOAD_CHUNK_VALUES + 1));
        // Spool before the values can be folded: every folded value is on file.
        let bytes = fedpriv_common::wire::f32_body_bytes(&values);
        write_spool(&spool.file, &bytes, *buf_at)
            .map_err(|e| format!("spool write failed: {e}"))?;
        let offset = *buf_at;
        *buf_at += values.len();
        send(
            Input::UpdateChunk {
                upload,
                offset,
                values,
            },
            None,
            Some(permit),
        )
    };
    let result: Result<(), String> = async {
        loop {
            let refused = spool.refused.load(Ordering::Relaxed);
            // Never more than fits in the chunk (plus the end of a split value).
            let room = if refused {
                1 << 20
            } else {
                (UPLOAD_CHUNK_VALUES.saturating_sub(buf.len()) * 4).max(4)
            };
            let chunk = match recv.read_chunk(room, true).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            };
            if refused {
                // The aggregator refused the upload (already reported): drain the rest
                // unspooled, length-checked, so the site sees its message delivered as
                // before (stopping the stream would make it drop its connection).
                buf.clear();
                if let Err(e) = decoder.feed(&chunk.bytes, &mut |_, _: &[f32]| {}) {
                    let _ = recv.stop(transport::quic_io::var_int(e.close_code()));
                    return Err(e.to_string());
                }
                continue;
            }
            if let Err(e) = decoder.feed(&chunk.bytes, &mut |_, v: &[f32]| {
                sq_norm += v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>();
                buf.extend_from_slice(v);
            }) {
                let _ = recv.stop(transport::quic_io::var_int(e.close_code()));
                return Err(e.to_string());
            }
            if buf.len() >= UPLOAD_CHUNK_VALUES {
                let permit = Arc::clone(&ctx.uploads)
                    .acquire_owned()
                    .await
                    .map_err(|e| e.to_string())?;
                flush(&mut buf, &mut buf_at, permit)?;
            }
        }
        decoder.finish().map_err(|e| e.to_string())?;
        if !buf.is_empty() && !spool.refused.load(Ordering::Relaxed) {
            let permit = Arc::clone(&ctx.uploads)
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            flush(&mut buf, &mut buf_at, permit)?;
        }
        Ok(())
    }
    .await;
    // Durable before the engine may accept the update into a released aggregate.
    let result = match result {
        Ok(()) if !spool.refused.load(Ordering::Relaxed) => ctx
            .audit
            .record(
                &format!("site/{site}"),
                AuditEvent::UpdateReceived,
                {
                    let mut d = json!({"study": study, "round": round, "site": site, "values": header.num_values, "bytes": header.num_values.saturating_mul(header.dtype.size()), "dtype": format!("{:?}", header.dtype).to_lowercase()});
                    // A central update is an un-noised clipped delta: its norm is a fact
                    // about the site's records that no record may carry.
                    if !central {
                        d["norm"] = json!(sq_norm.sqrt());
                    }
                    d
                },
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        other => other,
    };
    if result.is_ok() {
        ctx.metrics.add(
            metrics::UPDATE_BYTES,
            &[("study", study)],
            header.num_values.saturating_mul(header.dtype.size()),
        );
    }
    send(
        Input::UpdateEnd {
            upload,
            result: result.clone(),
        },
        None,
        None,
    )?;
    result
}

/// An upload's spool: an unlinked file of sealed records (`u32 LE length ‖ sealed chunk`),
/// one per chunk in arrival order, under a key drawn for this file and held only in
/// memory. Received updates never lie on disk (or in swapped-out page cache) in plaintext,
/// and the file is unreadable once the process is gone, which is also when it is freed.
struct SpoolFile {
    file: std::fs::File,
    key: SealKey,
    /// Where the next record goes: file position, record index, value offset.
    next: std::sync::Mutex<(u64, u64, u64)>,
}

fn spool_aad(index: u64, offset: u64) -> [u8; 30] {
    let mut aad = [0u8; 30];
    aad[..14].copy_from_slice(b"fedpriv spool\0");
    aad[14..22].copy_from_slice(&index.to_le_bytes());
    aad[22..].copy_from_slice(&offset.to_le_bytes());
    aad
}

/// A new spool file for upload `id`, unlinked at once: only the open handle reaches it, and
/// the kernel frees it when the last handle is dropped (also after a crash).
fn open_spool(dir: &Path, id: u64) -> std::io::Result<Arc<SpoolFile>> {
    let material = fedpriv_common::seal::generate_key_hex().map_err(std::io::Error::other)?;
    let key = SealKey::from_material(material.as_bytes()).map_err(std::io::Error::other)?;
    drop(material);
    let path = dir.join(format!("upload-{id}.sealed"));
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts.open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(Arc::new(SpoolFile {
        file,
        key,
        next: std::sync::Mutex::new((0, 0, 0)),
    }))
}

/// Appends `bytes` (whole little-endian f32 values, starting at value `offset`) as the
/// next sealed record. Records must come in order, without gaps: the read-back walks them
/// from the start.
fn write_spool(spool: &SpoolFile, bytes: &[u8], offset: usize) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    if !bytes.chunks_exact(4).remainder().is_empty() || bytes.len() > MAX_SPOOL_RECORD {
        return Err(invalid(
            "a spool record holds whole values, at most the record cap",
        ));
    }
    let mut next = spool
        .next
        .lock()
        .map_err(|_| std::io::Error::other("spool lock poisoned"))?;
    let (pos, index, at) = *next;
    if offset as u64 != at {
        return Err(invalid(
            "spool records must be written in order, without gaps",
        ));
    }
    let sealed = fedpriv_common::seal::seal(&spool.key, bytes, &spool_aad(index, at))
        .map_err(std::io::Error::other)?;
    let mut record = Vec::with_capacity(4 + sealed.len());
    record.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    record.extend_from_slice(&sealed);
    spool.file.write_all_at(&record, pos)?;
    *next = (
        pos + record.len() as u64,
        index + 1,
        at + bytes.len() as u64 / 4,
    );
    Ok(())
}

/// Feeds the first `len` values of an upload back from its spool file as
/// [`Input::Unfold`]s, one per record, each authenticated before use. False if they cannot
/// be read or do not authenticate (the caller then reports the unfold as failed, and the
/// engine drops the round's aggregate).
fn unfold_from_spool(
    spool: Option<&Arc<SpoolFile>>,
    upload: u64,
    len: usize,
    mut feed: impl FnMut(Input),
) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(spool) = spool else {
        return false;
    };
    let max_sealed =
        fedpriv_common::seal::HEADER_LEN + MAX_SPOOL_RECORD + fedpriv_common::seal::TAG_LEN;
    let (mut pos, mut index, mut offset) = (0u64, 0u64, 0usize);
    let mut sealed = Vec::new();
    while offset < len {
        let mut prefix = [0u8; 4];
        if spool.file.read_exact_at(&mut prefix, pos).is_err() {
            return false;
        }
        let n = u32::from_le_bytes(prefix) as usize;
        if n > max_sealed {
            return false;
        }
        sealed.resize(n, 0);
        if spool.file.read_exact_at(&mut sealed, pos + 4).is_err() {
            return false;
        }
        let Ok(bytes) =
            fedpriv_common::seal::open(&spool.key, &sealed, &spool_aad(index, offset as u64))
        else {
            return false;
        };
        let take = (bytes.len() / 4).min(len - offset);
        if take == 0 {
            return false;
        }
        let values = bytes[..take * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        feed(Input::Unfold {
            upload,
            offset,
            values,
        });
        offset += take;
        pos += 4 + n as u64;
        index += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::model::TensorSpec;

    fn test_key(byte: u8) -> SealKey {
        SealKey::from_bytes(&[byte; 32]).unwrap()
    }

    #[test]
    fn streamed_checkpoints_read_back_with_their_digest() {
        let spec = ModelSpec::new(vec![
            TensorSpec::new("z.weight", &[3, 5]),
            TensorSpec::new("a.bias", &[5]),
            TensorSpec::new("m", &[1]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..21).map(|i| i as f32 * 0.25 - 2.0).collect();
        let mut file = Vec::new();
        write_safetensors(&spec, &values, &BTreeMap::new(), &mut file).unwrap();
        let back = FlatModel::from_safetensors_bytes(&file, Some(&spec)).unwrap();
        assert_eq!(back.values, values);
        // Without the spec, the stored order gives back the flat vector as it was.
        let back = FlatModel::from_safetensors_bytes(&file, None).unwrap();
        assert_eq!((back.spec, back.values), (spec.clone(), values.clone()));
        // The data starts 8-byte aligned, as safetensors' own writer leaves it.
        let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header) % 8, 0);
        assert_eq!(file.len(), 8 + header + 21 * 4);
        assert!(write_safetensors(&spec, &values[1..], &BTreeMap::new(), &mut Vec::new()).is_err());
    }

    #[test]
    fn sealed_checkpoints_hide_the_model_and_open_only_in_their_slot() {
        // Over two 1 MiB segments.
        let spec = ModelSpec::new(vec![
            TensorSpec::new("w", &[300, 1000]),
            TensorSpec::new("b", &[7]),
        ])
        .unwrap();
        let values: Vec<f32> = (0..300_007)
            .map(|i| (i % 977) as f32 * 0.125 + 1.5)
            .collect();
        let mut plain = Vec::new();
        write_safetensors(&spec, &values, &BTreeMap::new(), &mut plain).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = model_path(dir.path(), "s1", 3);
        let key = test_key(1);
        let digest =
            write_checkpoint(&key, &spec, &values, &BTreeMap::new(), "s1", 3, &path).unwrap();
        let sealed = std::fs::read(&path).unwrap();
        assert_eq!(
            digest,
            sha256_hex(&sealed),
            "digest is over the sealed file"
        );
        assert!(sealed.starts_with(fedpriv_common::seal::STREAM_MAGIC));
        let needle = &plain[plain.len() - 4096..plain.len() - 4000];
        assert!(
            !sealed.windows(needle.len()).any(|w| w == needle),
            "plaintext model on disk"
        );
        assert!(
            !sealed.windows(8).any(|w| w == b"__metada"),
            "plaintext header on disk"
        );

        let mut out = Vec::new();
        read_checkpoint(&key, &path, "s1", 3, Some(&digest), &mut out).unwrap();
        assert_eq!(out, plain);

        let refused =
            |key: &SealKey, round: u64, sha: Option<&str>, path: &Path| match read_checkpoint(
                key,
                path,
                "s1",
                round,
                sha,
                &mut Vec::new(),
            ) {
                Err(ServerError::Config(m)) => m,
                other => panic!("{other:?}"),
            };
        let m = refused(&test_key(2), 3, None, &path);
        assert!(
            m.contains("another at-rest key") && m.contains(&path.display().to_string()),
            "{m}"
        );
        let m = refused(&key, 4, None, &path);
        assert!(
            m.contains("does not authenticate") && m.contains("restore it from backup"),
            "{m}"
        );
        let m = refused(&key, 3, Some(&"0".repeat(64)), &path);
        assert!(m.contains("not the file the ledger recorded"), "{m}");
        for at in [30, sealed.len() / 2, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            let m = refused(&key, 3, None, &path);
            assert!(m.contains("does not authenticate"), "byte {at}: {m}");
        }
        std::fs::write(&path, &plain).unwrap();
        let m = refused(&key, 3, None, &path);
        assert!(m.contains("not an encrypted checkpoint"), "{m}");
    }

    #[test]
    fn spooled_prefixes_are_fed_back_in_order() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let spool = open_spool(dir.path(), 7).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked"
        );
        let values: Vec<f32> = (0..(2 * UPLOAD_CHUNK_VALUES + 10))
            .map(|i| i as f32 + 0.5)
            .collect();
        let bytes = fedpriv_common::wire::f32_body_bytes(&values);
        // Chunks of uneven sizes, as a stream in f16 makes them.
        let cuts = [0, 1000, UPLOAD_CHUNK_VALUES + 3, values.len()];
        for w in cuts.windows(2) {
            write_spool(&spool, &bytes[w[0] * 4..w[1] * 4], w[0]).unwrap();
        }
        // Out of order, with a gap, or with a split value: refused.
        assert!(write_spool(&spool, &bytes[..4], 0).is_err());
        assert!(write_spool(&spool, &bytes[..4], values.len() + 1).is_err());
        assert!(write_spool(&spool, &bytes[..6], values.len()).is_err());
        let unfold = |spool: &Arc<SpoolFile>, len: usize| {
            let mut got = Vec::new();
            let ok = unfold_from_spool(Some(spool), 7, len, |input| match input {
                Input::Unfold {
                    upload: 7,
                    offset,
                    values,
                } => {
                    assert_eq!(offset, got.len());
                    got.extend(values);
                }
                other => panic!("{other:?}"),
            });
            ok.then_some(got)
        };
        for len in [1, 1000, 1005, UPLOAD_CHUNK_VALUES + 3, values.len()] {
            assert_eq!(unfold(&spool, len).unwrap(), values[..len], "len {len}");
        }
        // Asking for more than was spooled fails rather than inventing values.
        assert!(unfold(&spool, values.len() + 1).is_none());
        assert!(!unfold_from_spool(None, 7, 1, |_| {}));

        // On disk: sealed, never the values themselves.
        let size = spool.file.metadata().unwrap().len() as usize;
        let mut raw = vec![0u8; size];
        spool.file.read_exact_at(&mut raw, 0).unwrap();
        let needle = &bytes[4000..4064];
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "plaintext update on disk"
        );
        // A changed byte in the second record fails the read-back of anything past it.
        let at =
            4 + (fedpriv_common::seal::HEADER_LEN + 4000 + fedpriv_common::seal::TAG_LEN) + 4 + 100;
        spool.file.write_all_at(&[raw[at] ^ 1], at as u64).unwrap();
        assert_eq!(unfold(&spool, 1000).unwrap(), values[..1000]);
        assert!(unfold(&spool, 1001).is_none());
    }
}
