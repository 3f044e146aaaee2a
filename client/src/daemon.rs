//! The site daemon: dials out to the coordinator (hospitals expose no inbound port), keeps
//! one connection, reconnects with backoff, and serves tasks until shutdown. Each task's
//! work (policy, ledger, training) runs on a blocking thread through [`crate::site`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedpriv_common::audit::AuditEvent;
use fedpriv_common::audit_file::AuditLog;
use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::pki;
use fedpriv_common::protocol::{
    CoordinatorMessage, DeclineReason, SiteMessage, StudyAnnouncement, PROTOCOL_VERSION,
};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::wire::{Dtype, TensorHeader};
use tokio::sync::watch;

use crate::config::SiteConfig;
use crate::site::{self, PreparedStudy};
use crate::store::SiteLedger;
use crate::transport::{self, Backoff, DialError};

/// Why the daemon stopped on its own (not by shutdown). The operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("config error: {0}")]
    Config(String),
    #[error("site ledger: {0}")]
    Ledger(#[from] crate::store::StoreError),
    #[error("audit log: {0}")]
    Audit(#[from] fedpriv_common::audit_file::AuditError),
    #[error("{0}")]
    Dial(#[from] DialError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shared between the connection task and the blocking training threads.
struct SiteState {
    cfg: SiteConfig,
    ledger: SiteLedger,
    noise: NoiseSource,
    audit: AuditLog,
    /// Each configured study's data as loaded at start (or why it is unavailable): decided
    /// once, never per announcement.
    loaded: BTreeMap<String, site::StudyLoad>,
    studies: BTreeMap<String, Arc<PreparedStudy>>,
    /// Configured studies the coordinator said have ended (this process's life).
    ended: std::collections::BTreeSet<String>,
}

impl SiteState {
    /// Whether every study this site is configured for has ended: nothing is left to serve
    /// until its config changes (which takes a restart), so the daemon stops.
    fn all_studies_ended(&self) -> bool {
        !self.cfg.studies.is_empty() && self.cfg.studies.keys().all(|s| self.ended.contains(s))
    }
}

impl SiteState {
    /// Appends an audit record (flushed to disk). Callers act only if it succeeded.
    fn audit(&mut self, event: AuditEvent, details: serde_json::Value) -> Result<(), String> {
        let actor = self.cfg.name.clone();
        self.audit
            .append_now(&actor, event, details)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// The site's audit log, in its state directory.
pub fn audit_path(cfg: &SiteConfig) -> std::path::PathBuf {
    cfg.state_dir.join("audit.log")
}

/// Audits through the shared state; a failure is logged and returned.
fn audit(
    state: &Arc<Mutex<SiteState>>,
    event: AuditEvent,
    details: serde_json::Value,
) -> Result<(), String> {
    let mut guard = state
        .lock()
        .map_err(|_| "state lock poisoned".to_string())?;
    guard
        .audit(event, details)
        .inspect_err(|e| tracing::error!(error = %e, "audit log write failed"))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, DaemonError> {
    std::fs::read(path).map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))
}

/// Runs until `shutdown` turns true.
pub async fn run(cfg: SiteConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    // Cargo unifies features: a test run with `audit-weak-noise` rebuilds this crate (and
    // its binary) with the noise scaled down. Such a build never serves a coordinator.
    if crate::train::noise_scale() != 1.0 {
        return Err(DaemonError::Config(
            "this build scales the privacy noise down for the audit's tests (feature audit-weak-noise); it cannot serve a coordinator: rebuild without it".into(),
        ));
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| DaemonError::Config(format!("{}: {e}", cfg.state_dir.display())))?;
    let ledger_path = cfg.state_dir.join("site-ledger.db");
    if !ledger_path.exists() && audit_path(&cfg).exists() {
        // The audit log shows earlier rounds; a fresh ledger would forget what they spent.
        return Err(DaemonError::Config(format!(
            "site ledger {} is missing but the audit log {} exists from earlier runs: restore the ledger from backup; \
             it is never recreated silently (move the state directory aside to start from nothing)",
            ledger_path.display(),
            audit_path(&cfg).display()
        )));
    }
    let ledger = SiteLedger::open(&ledger_path)?;
    let tls = pki::client_config(&read(&cfg.ca)?, &read(&cfg.cert)?, &read(&cfg.key)?)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let endpoint = transport::client_endpoint(
        tls,
        transport::bind_addr_for(cfg.coordinator),
        &TransportLimits::site(),
    )?;
    let noise = NoiseSource::from_os().map_err(|e| DaemonError::Internal(e.to_string()))?;
    let mut audit_log = AuditLog::open(audit_path(&cfg))?;
    let caps: BTreeMap<&String, f64> = cfg
        .studies
        .iter()
        .map(|(id, s)| (id, s.epsilon_cap.get()))
        .collect();
    let source_caps: BTreeMap<&String, serde_json::Value> = cfg
        .sources
        .iter()
        .map(|(id, s)| (id, serde_json::json!({"epsilon_cap": s.epsilon_cap.get(), "delta": s.delta.get(), "declared_records": s.records})))
        .collect();
    audit_log.append_now(
        &cfg.name,
        AuditEvent::ServiceStarted,
        serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "coordinator": cfg.coordinator.to_string(), "epsilon_caps": caps, "sources": source_caps}),
    )?;
    // Which studies' data can be used is decided here, once, from the config alone.
    let load_cfg = cfg.clone();
    let loaded = tokio::task::spawn_blocking(move || site::load_site_data(&load_cfg))
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?;
    for (study, load) in &loaded {
        let source = cfg.studies.get(study).map(|s| s.source.clone());
        let details = match &load.result {
            Ok(l) => {
                tracing::info!(%study, rows = l.data.n, "study data loaded");
                serde_json::json!({"study": study, "source": source, "available": true, "check": load.columns.as_ref().map(|c| c.details()), "report": l.report})
            }
            Err(why) => {
                tracing::warn!(%study, %why, "study data unavailable; every announcement of it will be refused");
                serde_json::json!({"study": study, "source": source, "available": false, "check": load.columns.as_ref().map(|c| c.details()), "why": why})
            }
        };
        audit_log.append_now(&cfg.name, AuditEvent::DataLoaded, details)?;
    }
    let (addr, server_name, name) = (cfg.coordinator, cfg.server_name.clone(), cfg.name.clone());
    let state = Arc::new(Mutex::new(SiteState {
        cfg,
        ledger,
        noise,
        audit: audit_log,
        loaded,
        studies: BTreeMap::new(),
        ended: Default::default(),
    }));
    let mut backoff = Backoff::default();
    // A refusal is audited when its reason is new, not at every retry: a coordinator with
    // a bad certificate would otherwise write a record per backoff step.
    let mut last_refusal: Option<String> = None;
    let mut stop_reason = "shutdown requested";
    loop {
        let mut on_failure = |e: &DialError| {
            if let Some(reason) = e.refusal() {
                if last_refusal.as_deref() != Some(reason.as_str()) {
                    let _ = audit(
                        &state,
                        AuditEvent::ConnectionRefused,
                        serde_json::json!({"identity": "coordinator", "remote": addr.to_string(), "reason": reason}),
                    );
                    last_refusal = Some(reason);
                }
            }
        };
        let conn = match transport::connect_with_backoff_reporting(
            &endpoint,
            addr,
            &server_name,
            &mut backoff,
            &mut shutdown,
            &mut on_failure,
        )
        .await
        {
            Ok(c) => {
                last_refusal = None;
                c
            }
            Err(DialError::Shutdown) => break,
            Err(e) => return Err(e.into()),
        };
        tokio::select! {
            reason = session(&conn, &name, &state) => {
                let done = state.lock().map(|g| g.all_studies_ended()).unwrap_or(false);
                if done {
                    tracing::info!("every study this site serves has ended; stopping");
                    quic_io::close(&conn, fedpriv_common::wire::CloseCode::Normal, "all studies ended");
                    stop_reason = "every study this site serves has ended";
                    break;
                }
                tracing::warn!(%reason, "connection to the coordinator ended; reconnecting");
            }
            _ = shutdown.wait_for(|s| *s) => {
                quic_io::close(&conn, fedpriv_common::wire::CloseCode::Normal, "site shutting down");
                break;
            }
        }
    }
    endpoint.wait_idle().await;
    let _ = audit(
        &state,
        AuditEvent::ServiceStopped,
        serde_json::json!({"reason": stop_reason}),
    );
    Ok(())
}

/// Serves one connection; returns why it ended.
async fn session(conn: &quinn::Connection, name: &str, state: &Arc<Mutex<SiteState>>) -> String {
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: name.to_string(),
    };
    if let Err(e) = quic_io::send_message(conn, &hello, None).await {
        return format!("hello failed: {e}");
    }
    let coordinator = conn.remote_address().to_string();
    if let Err(e) = audit(
        state,
        AuditEvent::ConnectionAccepted,
        serde_json::json!({"identity": "coordinator", "remote": coordinator}),
    ) {
        return format!("audit log: {e}");
    }
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            Err(e) => return quic_io::describe_close(&e),
        };
        let msg: CoordinatorMessage = match quic_io::recv_frame(&mut recv).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "bad message from the coordinator");
                continue;
            }
        };
        if !matches!(msg, CoordinatorMessage::Task(_)) {
            // Read to the end: a stream dropped half-read is stopped, and the coordinator
            // stops writing to a site that stops its messages (a StudyEnded for one study
            // would cut the site off from its others).
            let _ = quic_io::recv_end(&mut recv).await;
        }
        match msg {
            CoordinatorMessage::Welcome { version, studies } => {
                if version != PROTOCOL_VERSION {
                    return format!(
                        "coordinator speaks protocol {version}, this site {PROTOCOL_VERSION}"
                    );
                }
                for ann in studies {
                    if let Err(e) = take_up(conn, state, ann).await {
                        return e;
                    }
                }
            }
            CoordinatorMessage::StudyAnnounced(ann) => {
                // A study created after the welcome; the same checks apply.
                if let Err(e) = take_up(conn, state, *ann).await {
                    return e;
                }
            }
            CoordinatorMessage::Task(task) => {
                let study = state
                    .lock()
                    .ok()
                    .and_then(|g| g.studies.get(&task.study).cloned());
                let Some(study) = study else {
                    let reason = unprepared_reason(state, &task.study);
                    note_declined(
                        state,
                        &task,
                        &coordinator,
                        reason,
                        "no accepted announcement of this study",
                    );
                    let reply = SiteMessage::Decline {
                        study: task.study.clone(),
                        round: task.round,
                        reason,
                    };
                    let _ = quic_io::send_message(conn, &reply, None).await;
                    continue;
                };
                let mut global = vec![0f32; study.spec.num_values()];
                if let Err(e) =
                    // The study may send the model as bf16/f16 (post-processing, no privacy cost).
                    quic_io::recv_tensor_body_accepting(
                        &mut recv,
                        &task.header,
                        &study.spec,
                        &Dtype::ALL,
                        |off, chunk| {
                            global[off..off + chunk.len()].copy_from_slice(chunk);
                        },
                    )
                    .await
                {
                    // The coordinator's model, not anything of ours: say so and go on.
                    tracing::warn!(error = %e, "task body refused");
                    note_declined(
                        state,
                        &task,
                        &coordinator,
                        DeclineReason::InvalidTask,
                        &format!("model body: {e}"),
                    );
                    let reply = SiteMessage::Decline {
                        study: task.study.clone(),
                        round: task.round,
                        reason: DeclineReason::InvalidTask,
                    };
                    if let Err(e) = quic_io::send_message(conn, &reply, None).await {
                        return format!("send failed: {e}");
                    }
                    continue;
                }
                let (st, t, coord) = (Arc::clone(state), task.clone(), coordinator.clone());
                let spec = study.spec.clone();
                let outcome = tokio::task::spawn_blocking(move || {
                    let mut guard = st.lock().map_err(|_| {
                        site::Refusal {
                            reason: DeclineReason::Internal,
                            detail: "state lock poisoned".into(),
                        }
                    })?;
                    let SiteState {
                        cfg, ledger, noise, ..
                    } = &mut *guard;
                    let result = site::run_task(cfg, &study, ledger, noise, &t, global, &coord);
                    // The record of what this round spent is on disk before the update
                    // leaves; if it cannot be written, nothing is sent (the ledger already
                    // charged the round: an over-count, never an under-count).
                    match &result {
                        Ok(released) => {
                            guard
                                .audit(
                                    AuditEvent::BudgetSpent,
                                    serde_json::json!({"study": t.study, "round": t.round, "q": t.cost.q.get(), "sigma": t.cost.sigma.get(), "steps": t.cost.steps, "evaluation": t.evaluation, "delta": t.delta, "source": study.local.source, "study_epsilon": released.paid.study_epsilon, "source_level": released.paid.source_level}),
                                )
                                .map_err(|e| site::Refusal {
                                    reason: DeclineReason::Internal,
                                    detail: e,
                                })?;
                            let stand_in = match (&released.fallback, released.zeroed) {
                                (Some(why), _) => Some(("noise_only", why.clone())),
                                (None, true) => Some(("zero_delta", "local training diverged or failed; the zero delta was clipped and noised".to_string())),
                                (None, false) => None,
                            };
                            if let Some((kind, why)) = stand_in {
                                guard
                                    .audit(
                                        AuditEvent::StandInReleased,
                                        serde_json::json!({"study": t.study, "round": t.round, "kind": kind, "why": why}),
                                    )
                                    .map_err(|e| site::Refusal {
                                        reason: DeclineReason::Internal,
                                        detail: e,
                                    })?;
                            }
                        }
                        Err(refusal) => {
                            let now = unix_now();
                            let SiteState { ledger, .. } = &mut *guard;
                            if let Err(e) = ledger.record_refusal(&t.study, t.round, &coord, refusal.reason.as_str(), now) {
                                tracing::error!(error = %e, "could not record a refusal in the site ledger");
                            }
                            guard
                                .audit(
                                    AuditEvent::Refused,
                                    serde_json::json!({"identity": "coordinator", "action": "task", "study": t.study, "round": t.round, "reason": refusal.reason.as_str(), "detail": refusal.detail}),
                                )
                                .map_err(|e| site::Refusal {
                                    reason: DeclineReason::Internal,
                                    detail: e,
                                })?;
                        }
                    }
                    result
                })
                .await
                .unwrap_or_else(|e| {
                    Err(site::Refusal {
                        reason: DeclineReason::Internal,
                        detail: e.to_string(),
                    })
                });
                let sent = match outcome {
                    Ok(released) => {
                        // The evaluation goes first, on an earlier stream: the coordinator
                        // reads a site's streams in order, so it has the vector before the
                        // update that may close the round.
                        if let Some(values) = &released.evaluation {
                            let msg = SiteMessage::Evaluation {
                                study: task.study.clone(),
                                round: task.round,
                                values: values.clone(),
                            };
                            if let Err(e) = quic_io::send_message(conn, &msg, None).await {
                                return format!("send failed: {e}");
                            }
                            tracing::info!(study = %task.study, round = task.round, "noised evaluation sent");
                        }
                        tracing::info!(study = %task.study, round = task.round, "update trained, noised and sent");
                        // Updates go back in the study's encoding; they are already noised.
                        let dtype = task.header.dtype;
                        let header = TensorHeader::for_spec(&spec, dtype);
                        quic_io::send_message_as(
                            conn,
                            &SiteMessage::Update {
                                study: task.study.clone(),
                                round: task.round,
                                header,
                            },
                            Some(&released.update),
                            dtype,
                        )
                        .await
                    }
                    Err(refusal) => {
                        tracing::warn!(study = %task.study, round = task.round, reason = refusal.reason.as_str(), "declined the round");
                        quic_io::send_message(
                            conn,
                            &SiteMessage::Decline {
                                study: task.study.clone(),
                                round: task.round,
                                reason: refusal.reason,
                            },
                            None,
                        )
                        .await
                    }
                };
                if let Err(e) = sent {
                    return format!("send failed: {e}");
                }
            }
            CoordinatorMessage::StudyEnded { study, reason } => {
                tracing::info!(%study, %reason, "study ended");
                let all_ended = match state.lock() {
                    Ok(mut g) => {
                        if g.cfg.studies.contains_key(&study) {
                            g.ended.insert(study);
                        }
                        g.all_studies_ended()
                    }
                    Err(_) => false,
                };
                if all_ended {
                    return "every study this site serves has ended".into();
                }
            }
            CoordinatorMessage::Refused { reason } => {
                return format!("refused by the coordinator: {reason}")
            }
        }
    }
}

/// Why a task for a study the site has not prepared is declined.
/// Records a task declined before it reached the ledger's payment (no accepted
/// announcement, a malformed model): in the ledger's refusals, which `inventory` counts,
/// and in the audit log, like every other refusal.
fn note_declined(
    state: &Arc<Mutex<SiteState>>,
    task: &fedpriv_common::protocol::Task,
    coordinator: &str,
    reason: DeclineReason,
    detail: &str,
) {
    if let Ok(mut g) = state.lock() {
        if let Err(e) = g.ledger.record_refusal(
            &task.study,
            task.round,
            coordinator,
            reason.as_str(),
            unix_now(),
        ) {
            tracing::error!(error = %e, "could not record a refusal in the site ledger");
        }
    }
    let _ = audit(
        state,
        AuditEvent::Refused,
        serde_json::json!({"identity": "coordinator", "action": "task", "study": task.study, "round": task.round, "reason": reason.as_str(), "detail": detail}),
    );
}

fn unprepared_reason(state: &Arc<Mutex<SiteState>>, study: &str) -> DeclineReason {
    let Ok(g) = state.lock() else {
        return DeclineReason::Internal;
    };
    if !g.cfg.studies.contains_key(study) {
        DeclineReason::NotEnrolled
    } else if matches!(g.loaded.get(study).map(|l| l.result.is_ok()), Some(true)) {
        DeclineReason::TermsDiffer
    } else {
        DeclineReason::Unavailable
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Checks an announced study against the site's pinned terms (audited) and tells the
/// coordinator whether the site takes part. An accepted announcement replaces the prepared
/// study; a refused one leaves it as it was. An error ends the session.
/// A site ledger that cannot be read or written: the site's own failure, declined before
/// anything is paid or sent.
fn ledger_refusal(e: crate::store::StoreError) -> site::Refusal {
    site::Refusal {
        reason: DeclineReason::Internal,
        detail: format!("site ledger: {e}"),
    }
}

async fn take_up(
    conn: &quinn::Connection,
    state: &Arc<Mutex<SiteState>>,
    ann: StudyAnnouncement,
) -> Result<(), String> {
    let study = ann.study.clone();
    let st = Arc::clone(state);
    let prepared = tokio::task::spawn_blocking(move || match st.lock() {
        Ok(mut guard) => {
            let pinned = guard
                .ledger
                .pinned_terms(&ann.study)
                .map_err(ledger_refusal)?;
            let run = guard
                .ledger
                .pinned_instance(&ann.study)
                .map_err(ledger_refusal)?;
            // Paid under another run of this study id: refuse this run as a whole.
            if run.as_deref().is_some_and(|r| r != ann.instance) {
                return Err(site::Refusal {
                    reason: DeclineReason::OtherInstance,
                    detail: "the study was paid for under another run".into(),
                });
            }
            // A study with evaluation holds out records: the split's seed is drawn once
            // and kept in the ledger.
            let holdout_seed = match ann.evaluation {
                Some(_) => {
                    let g = &mut *guard;
                    let fresh = rand::RngCore::next_u64(g.noise.rng());
                    let seed = g
                        .ledger
                        .holdout_seed(&ann.study, fresh, site::unix_now())
                        .map_err(ledger_refusal)?;
                    Some(seed)
                }
                None => None,
            };
            site::prepare_study(
                &guard.cfg,
                &guard.loaded,
                pinned.as_ref(),
                &ann,
                holdout_seed,
            )
        }
        Err(_) => Err(site::Refusal {
            reason: DeclineReason::Internal,
            detail: "state lock poisoned".into(),
        }),
    })
    .await
    .unwrap_or_else(|e| {
        Err(site::Refusal {
            reason: DeclineReason::Internal,
            detail: e.to_string(),
        })
    });
    let details = match &prepared {
        Ok(p) => {
            serde_json::json!({"identity": "coordinator", "action": "announcement", "study": study, "outcome": "accepted", "terms_sha256": fedpriv_common::digest::sha256_hex(p.terms.as_bytes()), "columns": p.announcement.data.features.iter().chain([&p.announcement.data.label]).collect::<Vec<_>>()})
        }
        Err(r) => {
            serde_json::json!({"identity": "coordinator", "action": "announcement", "study": study, "outcome": "refused", "reason": r.reason.as_str(), "detail": r.detail})
        }
    };
    let event = if prepared.is_ok() {
        AuditEvent::StudyAccepted
    } else {
        AuditEvent::Refused
    };
    if let Err(e) = audit(state, event, details) {
        return Err(format!("audit log: {e}"));
    }
    let reply = match prepared {
        Ok(p) => {
            // The public figure the site declared, never the file's count.
            let records = p.source.records;
            if let Ok(mut g) = state.lock() {
                g.studies.insert(study.clone(), Arc::new(p));
            }
            tracing::info!(%study, "study terms accepted; ready");
            SiteMessage::Ready { study, records }
        }
        Err(refusal) => {
            tracing::warn!(%study, reason = refusal.reason.as_str(), "refused an announced study");
            SiteMessage::Unable {
                study,
                reason: refusal.reason,
            }
        }
    };
    if let Err(e) = quic_io::send_message(conn, &reply, None).await {
        return Err(format!("send failed: {e}"));
    }
    Ok(())
}
