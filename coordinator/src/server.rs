//! The running coordinator, wired together: opens the state directory (the store, the
//! audit log), builds the studies, binds the endpoint, and starts the tasks of
//! [`crate::node`]: the studies' owner on its own thread, the acceptor, one task per
//! connection. Each authenticated peer is served by its certificate's role: sites speak the
//! site protocol ([`crate::node::site_conn`]), operators and auditors the admin protocol
//! ([`crate::admin::serve`]).
//!
//! Shutdown is a watch channel: the owner stops between steps (never between a spend and
//! its commit), connections get a grace period to deliver what the owner queued last, and
//! [`run`] returns once every task has stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedpriv_common::audit::details::{
    ConfigLoaded, ConnectionAccepted, RoundFinished, RoundOutcome, ServiceStarted, ServiceStopped,
};
use fedpriv_common::audit_file::AuditLog;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::digest::sha256_hex;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::pki::Role;
use fedpriv_common::seal::SealKey;
use fedpriv_common::wire::CloseCode;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::admin::{self, AdminCtx};
use crate::audit::{AuditFailed, AuditHandle, COORDINATOR};
use crate::limits::{Limits, UploadAllowance};
use crate::metrics::{self, Metrics};
use crate::node::checkpointer::Checkpointer;
use crate::node::refusals::Refusals;
use crate::node::site_conn::{self, Opening, SiteCtx};
use crate::node::studies::{self, study_created};
use crate::node::{acceptor, owner, Event};
use crate::store::Store;
use crate::transport::{self, AuthenticatedPeer};

pub use crate::audit::local_user;
pub use crate::checkpoint::{model_path, read_checkpoint, write_checkpoint, write_safetensors};
pub use crate::error::ServerError;
pub use crate::node::site_conn::{CHUNKS_PER_UPLOAD, UPLOAD_CHUNK_VALUES};
pub use crate::node::studies::study_spec;
pub use crate::node::Notification;

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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
    shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<(), ServerError> {
    start(opts, limits, shutdown, notify, exit_when_done)
        .await?
        .finished()
        .await
}

/// A coordinator that is up: the address its endpoint bound (with port 0 in
/// [`Options::listen`], the one the system chose), and the task that runs it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// The coordinator's counters (what `metrics.prom` and `--metrics-listen` serve).
    pub metrics: Metrics,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Waits until the coordinator has stopped; how its run ended.
    pub async fn finished(self) -> Result<(), ServerError> {
        self.task
            .await
            .map_err(|e| ServerError::Internal(format!("the coordinator's task failed: {e}")))?
    }
}

/// Starts a coordinator: everything [`run`] does up to listening (an error here is a
/// refused start, with nothing served), then the rest in a task of its own.
pub async fn start(
    opts: Options,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
) -> Result<Running, ServerError> {
    limits.validate().map_err(ServerError::Config)?;
    std::fs::create_dir_all(&opts.state_dir).map_err(io_err(&opts.state_dir))?;
    let db = opts.state_dir.join("coordinator.db");
    refuse_missing_ledger(&opts.state_dir, &db)?;
    let store = Store::open(&db)?;
    let audit_path = opts.state_dir.join("audit.log");
    let audit_log = AuditLog::open(&audit_path).map_err(|source| ServerError::Audit {
        path: audit_path.clone(),
        source,
    })?;
    let (audit, audit_thread) =
        crate::audit::start(audit_log).map_err(|e| ServerError::Internal(e.to_string()))?;
    let metrics = Metrics::new();
    let served_metrics = metrics.clone();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let result = serve(
            opts,
            limits,
            store,
            &audit,
            &metrics,
            shutdown,
            notify,
            exit_when_done,
            bound_tx,
        )
        .await;
        let reason = match &result {
            Ok(()) => "shutdown".to_string(),
            Err(e) => format!("error: {e}"),
        };
        let _ = audit.record(COORDINATOR, &ServiceStopped { reason }).await;
        drop(audit);
        // The audit thread only waits on the disk; let it finish what it was sent.
        let _ = tokio::task::spawn_blocking(move || audit_thread.finish()).await;
        result
    });
    match bound_rx.await {
        Ok(addr) => Ok(Running {
            addr,
            metrics: served_metrics,
            task,
        }),
        // The start failed before the endpoint was up: its error.
        Err(_) => Err(match task.await {
            Ok(Err(e)) => e,
            Ok(Ok(())) => {
                ServerError::Internal("the coordinator stopped before it listened".into())
            }
            Err(e) => ServerError::Internal(format!("the coordinator's task failed: {e}")),
        }),
    }
}

/// Tells the owner thread to stop when dropped. [`serve`] holds one while it waits for the
/// owner: if its future is dropped instead (the runtime shut down under it, say after a
/// panic elsewhere), nobody else would tell the owner, and the owner and the checkpoint
/// writer, each holding the sender the other waits on, would keep the runtime's blocking
/// pool, and with it the process, from ever ending.
struct StopOwnerOnDrop(crate::node::OwnerTx);

impl Drop for StopOwnerOnDrop {
    fn drop(&mut self) {
        // Once the owner has stopped nobody receives this; that is fine.
        let _ = self.0.send(Event::Shutdown);
    }
}

/// Everything of [`run`] after the store and the audit log are open.
#[allow(clippy::too_many_arguments)]
async fn serve(
    opts: Options,
    limits: Limits,
    mut store: Store,
    audit: &AuditHandle,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
    notify: Option<mpsc::UnboundedSender<Notification>>,
    exit_when_done: bool,
    bound: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<(), ServerError> {
    let audit_err = |e: AuditFailed| ServerError::Internal(e.to_string());
    let started = ServiceStarted {
        version: env!("CARGO_PKG_VERSION").to_string(),
        listen: opts.listen.to_string(),
        studies: opts.studies.len(),
    };
    audit
        .record(COORDINATOR, &started)
        .await
        .map_err(audit_err)?;
    let by = local_user();
    for (cfg, toml_text) in &opts.studies {
        let loaded = ConfigLoaded {
            study: cfg.id.clone(),
            sha256: sha256_hex(toml_text.as_bytes()),
        };
        audit.record(&by, &loaded).await.map_err(audit_err)?;
        if store.study(&cfg.id)?.is_none() {
            // Recorded before `load_studies` creates it.
            audit
                .record(&by, &study_created(cfg, &by, toml_text))
                .await
                .map_err(audit_err)?;
        }
    }
    // Rounds the last run left reserved (it stopped during them, or before their model
    // version was written) are aborted as the studies load: on the trail first.
    for (study, round) in studies::interrupted_rounds(&store)? {
        let finished = RoundFinished {
            study,
            round,
            outcome: RoundOutcome::Aborted {
                reason: studies::INTERRUPTED.to_string(),
            },
        };
        audit
            .record(COORDINATOR, &finished)
            .await
            .map_err(audit_err)?;
    }
    let studies = studies::load_studies(
        &mut store,
        &opts.state_dir,
        &opts.studies,
        &opts.at_rest_key,
        unix_now(),
    )?;
    let endpoint = transport::make_coordinator_endpoint(
        opts.listen,
        opts.tls,
        &limits,
        &reset_key(&opts.state_dir)?,
    )?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| ServerError::Internal(format!("the endpoint has no address: {e}")))?;
    let limits = Arc::new(limits);
    tracing::info!(%addr, studies = studies.len(), "coordinator listening");
    // Spool files of uploads in flight (unlinked as soon as they are opened); anything
    // here was left by a crash.
    let spool_dir = opts.state_dir.join("spool");
    if spool_dir.exists() {
        std::fs::remove_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
    }
    std::fs::create_dir_all(&spool_dir).map_err(io_err(&spool_dir))?;
    let noise = NoiseSource::from_os().map_err(|e| ServerError::Internal(e.to_string()))?;
    let refusals = Refusals::new(audit.clone(), metrics.clone());

    // The studies' owner, on its own thread.
    let (directory_tx, directory) = watch::channel(studies.directory());
    let (owner_tx, inbox) = std::sync::mpsc::channel::<Event>();
    let owner = owner::Owner::new(
        studies,
        store,
        &opts.state_dir,
        Arc::clone(&opts.at_rest_key),
        audit.clone(),
        metrics.clone(),
        noise,
        exit_when_done,
    );
    let outlets = owner::Outlets {
        directory: directory_tx,
        notify,
        checkpoints: Checkpointer::start(owner_tx.clone()).map_err(|e| {
            ServerError::Internal(format!("cannot start the checkpoint writer: {e}"))
        })?,
    };
    let owner_refusals = refusals.clone();
    let owner_thread = std::thread::Builder::new()
        .name("studies-owner".into())
        .spawn(move || owner::run(owner, inbox, &outlets, &owner_refusals))
        .map_err(|e| ServerError::Internal(format!("cannot start the owner thread: {e}")))?;

    // Connections stop when the run does, whichever way it ends.
    let (stop_tx, stop) = watch::channel(false);
    let admin_ctx = AdminCtx {
        state_dir: opts.state_dir.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        owner: owner_tx.clone(),
        shutdown: stop.clone(),
        refusals: refusals.clone(),
        message_rate: limits.message_rate,
        at_rest_key: Arc::clone(&opts.at_rest_key),
    };
    let site_ctx = SiteCtx {
        conn_id: 0,
        owner: owner_tx.clone(),
        directory,
        uploads: Arc::new(Semaphore::new(
            opts.max_concurrent_uploads.max(1) * CHUNKS_PER_UPLOAD,
        )),
        spool_dir,
        spool_memory: crate::node::spool::SpoolMemory::new(limits.upload_spool_memory),
        next_upload: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        shutdown: stop.clone(),
        audit: audit.clone(),
        metrics: metrics.clone(),
        refusals: refusals.clone(),
        limits: Arc::clone(&limits),
        allowance: Arc::new(UploadAllowance::new()),
    };
    let (peer_audit, peer_metrics) = (audit.clone(), metrics.clone());
    let dispatch = move |peer: AuthenticatedPeer, conn_id: u64| {
        let site = SiteCtx {
            conn_id,
            allowance: Arc::new(UploadAllowance::new()),
            ..site_ctx.clone()
        };
        let peer_ctx = PeerCtx {
            audit: peer_audit.clone(),
            metrics: peer_metrics.clone(),
            admin: admin_ctx.clone(),
            site,
        };
        serve_peer(peer, peer_ctx)
    };
    let acceptor = tokio::spawn(acceptor::run(
        endpoint.clone(),
        Arc::clone(&limits),
        refusals.clone(),
        stop.clone(),
        dispatch,
    ));
    let _ = bound.send(addr);

    // Until the owner stops: on its own (every study ended, or a fatal failure), or when
    // told to.
    let stop_owner_if_dropped = StopOwnerOnDrop(owner_tx.clone());
    let mut owner_done = tokio::task::spawn_blocking(move || owner_thread.join());
    let joined = tokio::select! {
        joined = &mut owner_done => joined,
        _ = shutdown.changed() => {
            let _ = owner_tx.send(Event::Shutdown);
            owner_done.await
        }
    };
    drop(owner_tx);
    drop(stop_owner_if_dropped);
    let result = match joined {
        Ok(Ok(result)) => result,
        Ok(Err(_)) | Err(_) => Err(ServerError::Internal("the owner thread panicked".into())),
    };
    // The owner has let go of every site's outbox: the writers deliver what it queued last
    // (a study's end), admin requests in progress get their answers, then the endpoint
    // closes.
    let _ = stop_tx.send(true);
    let _ = acceptor.await;
    endpoint.close(
        transport::quic_io::var_int(CloseCode::Normal),
        b"coordinator shutting down",
    );
    // Peers that vanished without closing (a flood's half-open handshakes) would hold this
    // until the idle timeout; the close frames have gone out by then in practice.
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    refusals.flush(true);
    if let Err(e) = metrics.write_file(&opts.state_dir) {
        tracing::warn!(error = %e, "cannot write metrics.prom");
    }
    result
}

/// What serving one peer needs, whatever its role.
struct PeerCtx {
    audit: AuditHandle,
    metrics: Metrics,
    admin: AdminCtx,
    site: SiteCtx,
}

/// Serves one authenticated peer by its certificate's role, once its connection is on
/// record. Sites speak the site protocol; operators and auditors the admin protocol.
async fn serve_peer(peer: AuthenticatedPeer, ctx: PeerCtx) {
    let who = peer.identity.to_string();
    ctx.metrics.inc(
        metrics::CONNECTIONS_ACCEPTED,
        &[("role", peer.identity.role.as_str())],
    );
    let record = ConnectionAccepted {
        identity: who.clone(),
        role: peer.identity.role.as_str().to_string(),
        remote: peer.remote_address().to_string(),
    };
    if let Err(e) = ctx.audit.record(&who, &record).await {
        tracing::error!(error = %e, "cannot record a connection; closing it");
        let _ = transport::refuse(
            &peer,
            CloseCode::Internal,
            "the coordinator cannot record this connection",
        );
        return;
    }
    match peer.identity.role {
        Role::Operator | Role::Auditor => admin::serve_admin(peer, ctx.admin).await,
        Role::Site => match site_conn::opening(&peer, ctx.site.limits.handshake_timeout).await {
            Opening::Hello {
                version,
                claimed_site,
            } => site_conn::serve(peer, version, &claimed_site, ctx.site).await,
            // An admin request with a site's certificate: refused and audited there.
            Opening::AdminRequest(send, recv) => {
                admin::serve::refuse_site_request(&peer, &ctx.admin, send, recv).await
            }
            Opening::NotAHello { why } => {
                tracing::info!(identity = %who, %why, "site did not open with a hello");
                site_conn::refused(&ctx.site.refusals, &peer, "hello", "expected a hello first");
                let _ = transport::refuse(
                    &peer,
                    CloseCode::ProtocolViolation,
                    "expected a hello first",
                );
            }
        },
    }
}
