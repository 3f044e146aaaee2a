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
    studies: BTreeMap<String, Arc<PreparedStudy>>,
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
    audit_log.append_now(
        &cfg.name,
        AuditEvent::ServiceStarted,
        serde_json::json!({"version": env!("CARGO_PKG_VERSION"), "coordinator": cfg.coordinator.to_string(), "epsilon_caps": caps, "max_delta": cfg.max_delta.get()}),
    )?;
    let (addr, server_name, name) = (cfg.coordinator, cfg.server_name.clone(), cfg.name.clone());
    let state = Arc::new(Mutex::new(SiteState {
        cfg,
        ledger,
        noise,
        audit: audit_log,
        studies: BTreeMap::new(),
    }));
    let mut backoff = Backoff::default();
    // A refusal is audited when its reason is new, not at every retry: a coordinator with
    // a bad certificate would otherwise write a record per backoff step.
    let mut last_refusal: Option<String> = None;
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
        serde_json::json!({"reason": "shutdown requested"}),
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
                if let Err(e) = take_up(conn, state, ann).await {
                    return e;
                }
            }
            CoordinatorMessage::Task(task) => {
                let study = state
                    .lock()
                    .ok()
                    .and_then(|g| g.studies.get(&task.study).cloned());
                let Some(study) = study else {
                    let reply = SiteMessage::Decline {
                        study: task.study.clone(),
                        round: task.round,
                        reason: DeclineReason::StudyNotAllowed,
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
                    tracing::warn!(error = %e, "task body refused");
                    continue;
                }
                let (st, t, coord) = (Arc::clone(state), task.clone(), coordinator.clone());
                let outcome = tokio::task::spawn_blocking(move || {
                    let mut guard = st
                        .lock()
                        .map_err(|_| DeclineReason::Internal("state lock poisoned".into()))?;
                    let SiteState {
                        cfg, ledger, noise, ..
                    } = &mut *guard;
                    let result = site::run_task(cfg, &study, ledger, noise, &t, global, &coord);
                    // The record of what this round spent is on disk before the update
                    // leaves; if it cannot be written, nothing is sent.
                    let (event, details) = match &result {
                        Ok(_) => (
                            AuditEvent::BudgetSpent,
                            serde_json::json!({"study": t.study, "round": t.round, "q": t.cost.q.get(), "sigma": t.cost.sigma.get(), "steps": t.cost.steps, "delta": t.delta}),
                        ),
                        Err(reason) => (
                            AuditEvent::Refused,
                            serde_json::json!({"identity": "coordinator", "action": "task", "study": t.study, "round": t.round, "reason": reason.to_string()}),
                        ),
                    };
                    guard.audit(event, details).map_err(DeclineReason::Internal)?;
                    result
                })
                .await
                .unwrap_or_else(|e| Err(DeclineReason::Internal(e.to_string())));
                let sent = match outcome {
                    Ok(update) => {
                        tracing::info!(study = %task.study, round = task.round, "update trained, noised and sent");
                        // Updates go back in the study's encoding; they are already noised.
                        let dtype = task.header.dtype;
                        let header = TensorHeader::for_spec(&task_spec(state, &task.study), dtype);
                        quic_io::send_message_as(
                            conn,
                            &SiteMessage::Update {
                                study: task.study.clone(),
                                round: task.round,
                                header,
                            },
                            Some(&update),
                            dtype,
                        )
                        .await
                    }
                    Err(reason) => {
                        tracing::warn!(study = %task.study, round = task.round, %reason, "declined the round");
                        quic_io::send_message(
                            conn,
                            &SiteMessage::Decline {
                                study: task.study.clone(),
                                round: task.round,
                                reason,
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
                tracing::info!(%study, %reason, "study ended")
            }
            CoordinatorMessage::Refused { reason } => {
                return format!("refused by the coordinator: {reason}")
            }
        }
    }
}

/// Prepares an announced study (data checks, audited) and tells the coordinator whether
/// the site can take part. An error ends the session.
async fn take_up(
    conn: &quinn::Connection,
    state: &Arc<Mutex<SiteState>>,
    ann: StudyAnnouncement,
) -> Result<(), String> {
    let study = ann.study.clone();
    let st = Arc::clone(state);
    let preparation = tokio::task::spawn_blocking(move || match st.lock() {
        Ok(guard) => site::prepare_study_with_check(&guard.cfg, &ann),
        Err(_) => site::Preparation {
            result: Err(DeclineReason::Internal("state lock poisoned".into())),
            columns: None,
        },
    })
    .await
    .unwrap_or_else(|e| site::Preparation {
        result: Err(DeclineReason::Internal(e.to_string())),
        columns: None,
    });
    let prepared = preparation.result;
    // What was checked, and the outcome; never a cell value.
    let outcome = match (&prepared, &preparation.columns) {
        (_, Some(check)) => {
            serde_json::json!({"study": study, "check": check.details(), "outcome": if prepared.is_ok() { "allowed" } else { "refused" }, "reason": prepared.as_ref().err().map(|r| r.to_string())})
        }
        (Ok(_), None) => serde_json::json!({"study": study, "outcome": "allowed"}),
        (Err(reason), None) => {
            serde_json::json!({"study": study, "outcome": "refused", "reason": reason.to_string()})
        }
    };
    if let Err(e) = audit(state, AuditEvent::ColumnCheck, outcome) {
        return Err(format!("audit log: {e}"));
    }
    let reply = match prepared {
        Ok(p) => {
            let records = p.data.n as u64;
            if let Ok(mut g) = state.lock() {
                g.studies.insert(study.clone(), Arc::new(p));
            }
            tracing::info!(%study, records, "study data loaded; ready");
            SiteMessage::Ready { study, records }
        }
        Err(reason) => {
            tracing::warn!(%study, %reason, "cannot take part in an announced study");
            SiteMessage::Unable { study, reason }
        }
    };
    if let Err(e) = quic_io::send_message(conn, &reply, None).await {
        return Err(format!("send failed: {e}"));
    }
    Ok(())
}

fn task_spec(state: &Arc<Mutex<SiteState>>, study: &str) -> fedpriv_common::model::ModelSpec {
    state
        .lock()
        .ok()
        .and_then(|g| g.studies.get(study).map(|s| s.spec.clone()))
        .unwrap_or(fedpriv_common::model::ModelSpec {
            tensors: Vec::new(),
        })
}
