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
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::model::{FlatModel, ModelSpec};
use fedpriv_common::pki::Role;
use fedpriv_common::protocol::{
    CoordinatorMessage, SiteMessage, StudyAnnouncement, PROTOCOL_VERSION,
};
use fedpriv_common::wire::{CloseCode, TensorHeader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::round::{Action, Input, StudyEngine};
use crate::store::{RoundStatus, Store, StoreError, StudyStatus};
use crate::transport::{self, AuthenticatedPeer, TransportLimits};

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
}

/// Chunks per unit of [`Options::max_concurrent_uploads`].
pub const CHUNKS_PER_UPLOAD: usize = 8;

/// Values per upload chunk handed to the aggregator (128 KiB): network packets (about
/// 1.2 kB each) are gathered up to this size so that spooling and folding work in large
/// pieces, while each upload in progress holds little (64 sites: 8 MiB in all).
pub const UPLOAD_CHUNK_VALUES: usize = 1 << 15;

/// Values per piece when an upload's folded prefix is read back from its spool file.
const UNFOLD_VALUES: usize = 1 << 18;

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
    file: Arc<std::fs::File>,
    refused: Arc<std::sync::atomic::AtomicBool>,
}

enum Outgoing {
    Message(CoordinatorMessage),
    WithModel(CoordinatorMessage, transport::quic_io::SharedBody),
}

struct StudyRuntime {
    engine: StudyEngine,
    spec: ModelSpec,
    announcement: StudyAnnouncement,
    /// The model body of the round being sent out, encoded once for every site.
    broadcast: Option<(u64, transport::quic_io::SharedBody)>,
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
    arch::model_spec(cfg.model, cfg.data.features.len(), cfg.n_outputs())
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

/// Streams `values` as a safetensors file (f32, little-endian) into `out` and returns the
/// SHA-256 of what was written, without building the file in memory: the header, then
/// the values straight from the model's memory in 1 MiB pieces. Tensors are stored in
/// the spec's (flat-vector) order, so the data is one contiguous run; the order is also
/// kept in the metadata, as [`FlatModel::to_safetensors_bytes`] does, and the file reads
/// back with [`FlatModel::from_safetensors_bytes`] (or any safetensors reader).
pub fn write_safetensors(
    spec: &ModelSpec,
    values: &[f32],
    out: &mut impl std::io::Write,
) -> std::io::Result<String> {
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
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            fedpriv_common::model::SAFETENSORS_ORDER_KEY: serde_json::to_string(&order)?,
        }),
    );
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
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut put = |bytes: &[u8]| -> std::io::Result<()> {
        hash.update(bytes);
        out.write_all(bytes)
    };
    put(&(header.len() as u64).to_le_bytes())?;
    put(&header)?;
    let body = fedpriv_common::wire::f32_body_bytes(values);
    for piece in body.chunks(1 << 20) {
        put(piece)?;
    }
    Ok(hex(hash.finish().as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Opens the store and builds each study's engine, creating new studies and resuming
/// known ones from their last completed round.
fn load_studies(
    store: &mut Store,
    state_dir: &Path,
    studies: &[(StudyConfig, String)],
) -> Result<BTreeMap<String, StudyRuntime>, ServerError> {
    let mut out = BTreeMap::new();
    for (cfg, toml_text) in studies {
        let spec = study_spec(cfg)?;
        match store.study(&cfg.id)? {
            None => store.create_study(&cfg.id, toml_text, &cfg.enrolled, unix_now())?,
            Some(row) => {
                let stored = StudyConfig::from_toml(&row.config_toml)
                    .map_err(|e| ServerError::Config(format!("stored study {}: {e}", cfg.id)))?;
                if &stored != cfg {
                    return Err(ServerError::Config(format!(
                        "study {} already exists with a different configuration; a study's privacy terms cannot change once it has started (use a new study id)",
                        cfg.id
                    )));
                }
            }
        }
        let global = match store.last_completed_round(&cfg.id)? {
            Some((round, file, sha)) => {
                let path = state_dir.join(&file);
                let bytes = std::fs::read(&path).map_err(io_err(&path))?;
                if sha256_hex(&bytes) != sha {
                    return Err(ServerError::Config(format!("model file {} of round {round} does not match its recorded digest; restore it from backup", path.display())));
                }
                let model = FlatModel::from_safetensors_bytes(&bytes, Some(&spec))
                    .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
                model.values
            }
            None => {
                arch::init_model(cfg.model, cfg.data.features.len(), cfg.n_outputs(), 0)
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
        let announcement = StudyAnnouncement {
            study: cfg.id.clone(),
            model: cfg.model,
            data: cfg.data.clone(),
            unit: cfg.privacy.unit,
            placement: cfg.privacy.placement,
            delta: cfg.privacy.delta.get(),
        };
        out.insert(
            cfg.id.clone(),
            StudyRuntime {
                engine,
                spec,
                announcement,
                broadcast: None,
            },
        );
    }
    Ok(out)
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
    mut shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<(), ServerError> {
    std::fs::create_dir_all(&opts.state_dir).map_err(io_err(&opts.state_dir))?;
    let db = opts.state_dir.join("coordinator.db");
    refuse_missing_ledger(&opts.state_dir, &db)?;
    let mut store = Store::open(&db)?;
    let mut studies = load_studies(&mut store, &opts.state_dir, &opts.studies)?;
    let endpoint = transport::make_server_endpoint_with_reset_key(
        opts.listen,
        opts.tls,
        &TransportLimits::default(),
        &reset_key(&opts.state_dir)?,
    )?;
    tracing::info!(addr = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), studies = studies.len(), "coordinator listening");
    let specs: Arc<HashMap<String, (ModelSpec, Vec<String>)>> = Arc::new(
        studies
            .iter()
            .map(|(id, s)| {
                (
                    id.clone(),
                    (s.spec.clone(), s.engine.config().enrolled.clone()),
                )
            })
            .collect(),
    );
    let announcements: Arc<Vec<StudyAnnouncement>> =
        Arc::new(studies.values().map(|s| s.announcement.clone()).collect());
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
        tasks.spawn(async move {
            let mut conn_id = 0u64;
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        conn_id += 1;
                        let ctx = ConnCtx { conn_id, events: events_tx.clone(), specs: Arc::clone(&specs), announcements: Arc::clone(&announcements), uploads: Arc::clone(&uploads), spool_dir: spool_dir.clone(), next_upload: Arc::clone(&next_upload), shutdown: shutdown.clone() };
                        conns.spawn(async move {
                            if let Ok(peer) = transport::accept(incoming).await {
                                serve_site(peer, ctx).await;
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
            _ = tick.tick() => studies.keys().map(|k| (k.clone(), Input::Tick)).collect(),
            ev = events_rx.recv() => match ev {
                None => break,
                Some(Event::Connected { site, conn_id, tx }) => {
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
                    &mut store,
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
                        if matches!(e, StoreError::Sqlite(_) | StoreError::Io { .. }) {
                            result = Err(ServerError::Store(e));
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
    endpoint.wait_idle().await;
    result
}

/// Carries out one action. Returns an input to feed back (the spend's commit).
#[allow(clippy::too_many_arguments)]
fn execute(
    study: &str,
    rt: &mut StudyRuntime,
    action: Action,
    store: &mut Store,
    state_dir: &Path,
    sites: &HashMap<String, (u64, mpsc::UnboundedSender<Outgoing>)>,
    notify: Option<&mpsc::UnboundedSender<Notification>>,
    broadcast: &mut Vec<(String, CoordinatorMessage)>,
) -> Result<Option<Input>, StoreError> {
    let now = unix_now();
    match action {
        Action::RecordSpend { round, entries } => {
            let rows: Vec<(String, _, f64)> = entries
                .iter()
                .map(|e| (e.site.clone(), e.event, e.epsilon_after))
                .collect();
            store.record_spend(study, round, &rows, now)?;
            tracing::info!(%study, round, sites = rows.len(), "budget spent and recorded");
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
        Action::UpdateAccepted { site, round, norm } => {
            tracing::info!(%study, round, %site, norm = format!("{norm:.3}"), "update accepted")
        }
        Action::UpdateRejected {
            site,
            round,
            reason,
        } => tracing::warn!(%study, round, %site, %reason, "update rejected"),
        // Carried out by the caller, which can feed the engine.
        Action::Unfold { .. } => {}
        Action::SiteDeclined {
            site,
            round,
            reason,
        } => tracing::info!(%study, round, %site, %reason, "site declined the round"),
        Action::Checkpoint {
            round,
            model,
            contributors,
            epsilon,
        } => {
            if let Some(index) = fedpriv_common::model::first_non_finite(&model) {
                return Err(StoreError::Invalid(format!(
                    "round {round}: model value {index} is not finite"
                )));
            }
            let path = model_path(state_dir, study, round);
            // Streamed from the model's own memory: no copy of the model, no file image.
            let digest = write_atomic(&path, |f| {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                let digest = write_safetensors(&rt.spec, &model, &mut w)?;
                std::io::Write::flush(&mut w)?;
                Ok(digest)
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(state_dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            store.complete_round(study, round, &rel, &digest, &contributors, now)?;
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
    specs: Arc<HashMap<String, (ModelSpec, Vec<String>)>>,
    announcements: Arc<Vec<StudyAnnouncement>>,
    /// Chunk permits: decoded upload chunks waiting for the aggregator.
    uploads: Arc<Semaphore>,
    spool_dir: PathBuf,
    next_upload: Arc<std::sync::atomic::AtomicU64>,
    shutdown: watch::Receiver<bool>,
}

/// Serves one authenticated site until it disconnects or the coordinator stops.
async fn serve_site(peer: AuthenticatedPeer, mut ctx: ConnCtx) {
    if transport::require_role(&peer, Role::Site).is_err() {
        return;
    }
    let site = peer.identity.name.clone();
    let conn = peer.conn.clone();
    // The first stream must be the hello.
    let hello = async {
        let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let msg: SiteMessage = transport::recv_frame(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        transport::recv_end(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(msg)
    };
    match tokio::time::timeout(Duration::from_secs(10), hello).await {
        Ok(Ok(SiteMessage::Hello {
            version,
            claimed_site,
        })) => {
            if version != PROTOCOL_VERSION {
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
                return;
            }
        }
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            let _ = transport::refuse(
                &peer,
                CloseCode::ProtocolViolation,
                "expected a hello first",
            );
            return;
        }
    }
    let visible: Vec<StudyAnnouncement> = ctx
        .announcements
        .iter()
        .filter(|a| {
            ctx.specs
                .get(&a.study)
                .is_some_and(|(_, enrolled)| enrolled.contains(&site))
        })
        .cloned()
        .collect();
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
    let _ = tx.send(Outgoing::Message(CoordinatorMessage::Welcome {
        version: PROTOCOL_VERSION,
        studies: visible,
    }));
    // Writer: sends in order, one stream per message.
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let res = match &out {
                Outgoing::Message(m) => transport::send_message(&writer_conn, m, None).await,
                Outgoing::WithModel(m, body) => {
                    transport::quic_io::send_message_shared(&writer_conn, m, body).await
                }
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, "send to site failed");
                break;
            }
        }
    });
    loop {
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
            Err(reason) => tracing::warn!(%site, %reason, "message from site refused"),
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
    let enrolled_in = |study: &str| {
        ctx.specs
            .get(study)
            .filter(|(_, enrolled)| enrolled.iter().any(|s| s == site))
            .map(|(spec, _)| spec)
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
            tracing::warn!(%site, %study, %reason, "site cannot take part");
            Ok(None)
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
            let spec = enrolled_in(&study).ok_or(format!("not enrolled in study {study:?}"))?;
            stream_update(recv, &header, spec, &study, site, round, ctx).await?;
            Ok(None)
        }
    }
}

/// Streams an update body to the aggregator chunk by chunk (sized by our model, never by
/// the peer's claim): each chunk is first written to the upload's spool file (so that,
/// should the upload be refused or cut short after part of it was folded, that part can
/// be taken back out), then sent to the engine, holding a chunk permit until it is folded.
/// Memory: the chunks in flight, whatever the model size and the number of uploads.
async fn stream_update(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    spec: &ModelSpec,
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
                return Err(e.to_string());
            }
        };
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
    // Values gathered from network packets until a chunk is full, and where they start.
    let mut buf: Vec<f32> = Vec::with_capacity(UPLOAD_CHUNK_VALUES + 1);
    let mut buf_at = 0usize;
    let flush = |buf: &mut Vec<f32>, buf_at: &mut usize, permit| -> Result<(), String> {
        let values = std::mem::replace(buf, Vec::with_capacity(UPLOAD_CHUNK_VALUES + 1));
        // Spool before the values can be folded: every folded value is on file.
        let bytes = fedpriv_common::wire::f32_body_bytes(&values);
        write_spool(&spool.file, &bytes, *buf_at as u64 * 4)
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

/// A new spool file for upload `id`, unlinked at once: only the open handle reaches it, and
/// the kernel frees it when the last handle is dropped (also after a crash).
fn open_spool(dir: &Path, id: u64) -> std::io::Result<Arc<std::fs::File>> {
    let path = dir.join(format!("upload-{id}.f32"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(Arc::new(file))
}

fn write_spool(file: &std::fs::File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, at)
}

/// Feeds the first `len` values of an upload back from its spool file as
/// [`Input::Unfold`]s. False if they cannot be read (the caller then reports the unfold as
/// failed, and the engine drops the round's aggregate).
fn unfold_from_spool(
    spool: Option<&Arc<std::fs::File>>,
    upload: u64,
    len: usize,
    mut feed: impl FnMut(Input),
) -> bool {
    use std::os::unix::fs::FileExt;
    let Some(file) = spool else {
        return false;
    };
    let mut bytes = vec![0u8; UNFOLD_VALUES.min(len) * 4];
    let mut offset = 0usize;
    while offset < len {
        let n = UNFOLD_VALUES.min(len - offset);
        let buf = &mut bytes[..n * 4];
        if file.read_exact_at(buf, offset as u64 * 4).is_err() {
            return false;
        }
        let values = buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        feed(Input::Unfold {
            upload,
            offset,
            values,
        });
        offset += n;
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::model::TensorSpec;

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
        let digest = write_safetensors(&spec, &values, &mut file).unwrap();
        assert_eq!(digest, sha256_hex(&file));
        let back = FlatModel::from_safetensors_bytes(&file, Some(&spec)).unwrap();
        assert_eq!(back.values, values);
        // Without the spec, the stored order gives back the flat vector as it was.
        let back = FlatModel::from_safetensors_bytes(&file, None).unwrap();
        assert_eq!((back.spec, back.values), (spec.clone(), values.clone()));
        // The data starts 8-byte aligned, as safetensors' own writer leaves it.
        let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header) % 8, 0);
        assert_eq!(file.len(), 8 + header + 21 * 4);
        assert!(write_safetensors(&spec, &values[1..], &mut Vec::new()).is_err());
    }

    #[test]
    fn spooled_prefixes_are_fed_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = open_spool(dir.path(), 7).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked"
        );
        let values: Vec<f32> = (0..(UNFOLD_VALUES + 10)).map(|i| i as f32).collect();
        let bytes = fedpriv_common::wire::f32_body_bytes(&values);
        // Written in pieces that split values, as network chunks do.
        let (a, b) = bytes.split_at(4 * 1000 + 3);
        write_spool(&spool, a, 0).unwrap();
        write_spool(&spool, b, a.len() as u64).unwrap();
        let mut got = Vec::new();
        let ok = unfold_from_spool(Some(&spool), 7, UNFOLD_VALUES + 5, |input| match input {
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
        assert!(ok);
        assert_eq!(got, values[..UNFOLD_VALUES + 5]);
        // Asking for more than was spooled fails rather than inventing values.
        assert!(!unfold_from_spool(
            Some(&spool),
            7,
            values.len() + 1,
            |_| {}
        ));
        assert!(!unfold_from_spool(None, 7, 1, |_| {}));
    }
}
