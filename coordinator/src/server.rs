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
use tokio::sync::{mpsc, watch, Semaphore};
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
    /// Uploads received at once; each holds one model-sized buffer until folded in.
    pub max_concurrent_uploads: usize,
}

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
}

enum Outgoing {
    Message(CoordinatorMessage),
    WithModel(CoordinatorMessage, Arc<Vec<f32>>),
}

struct StudyRuntime {
    engine: StudyEngine,
    spec: ModelSpec,
    announcement: StudyAnnouncement,
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

/// Writes a file so that it is either all there or not there: temporary file, fsync,
/// rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
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
            },
        );
    }
    Ok(out)
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
    let mut store = Store::open(opts.state_dir.join("coordinator.db"))?;
    let mut studies = load_studies(&mut store, &opts.state_dir, &opts.studies)?;
    let endpoint =
        transport::make_server_endpoint(opts.listen, opts.tls, &TransportLimits::default())?;
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
    let uploads = Arc::new(Semaphore::new(opts.max_concurrent_uploads.max(1)));
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
                        let ctx = ConnCtx { conn_id, events: events_tx.clone(), specs: Arc::clone(&specs), announcements: Arc::clone(&announcements), uploads: Arc::clone(&uploads), shutdown: shutdown.clone() };
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
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let state_dir = opts.state_dir.clone();
    let mut result = Ok(());
    loop {
        if exit_when_done && studies.values().all(|s| s.engine.is_finished()) {
            break;
        }
        let mut broadcast: Vec<(String, CoordinatorMessage)> = Vec::new();
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
            },
        };
        for (study_id, input) in study_inputs {
            let Some(rt) = studies.get_mut(&study_id) else {
                continue;
            };
            let mut queue: std::collections::VecDeque<Action> =
                rt.engine.handle(input, now_ms(), &mut noise).into();
            while let Some(action) = queue.pop_front() {
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
            match sites.get(&site) {
                Some((_, tx))
                    if tx
                        .send(Outgoing::WithModel(CoordinatorMessage::Task(task), model))
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
            let flat = FlatModel::new(rt.spec.clone(), model.to_vec())
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let bytes = flat
                .to_safetensors_bytes()
                .map_err(|e| StoreError::Invalid(e.to_string()))?;
            let path = model_path(state_dir, study, round);
            write_atomic(&path, &bytes).map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
            let rel = path
                .strip_prefix(state_dir)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            store.complete_round(study, round, &rel, &sha256_hex(&bytes), &contributors, now)?;
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
    uploads: Arc<Semaphore>,
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
                Outgoing::WithModel(m, model) => {
                    transport::send_message(&writer_conn, m, Some(model.as_slice())).await
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
            receive_update(recv, &header, spec, &ctx.uploads)
                .await
                .and_then(|values| {
                    ev(
                        study,
                        Input::Update {
                            site: site.to_string(),
                            round,
                            values,
                        },
                    )
                })
        }
    }
}

/// Receives an update body into one model-sized buffer (sized by our model, never by the
/// peer's claim), under the upload limit.
async fn receive_update(
    recv: &mut quinn::RecvStream,
    header: &TensorHeader,
    spec: &ModelSpec,
    uploads: &Semaphore,
) -> Result<Vec<f32>, String> {
    header.check_against(spec).map_err(|e| e.to_string())?;
    let _permit = uploads.acquire().await.map_err(|e| e.to_string())?;
    let mut values = vec![0f32; spec.num_values()];
    transport::recv_tensor_body(recv, header, spec, |offset, chunk| {
        values[offset..offset + chunk.len()].copy_from_slice(chunk);
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(values)
}
