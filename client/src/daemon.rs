//! The site daemon: dials out to the coordinator (hospitals expose no inbound port), keeps
//! one connection, reconnects with backoff, and serves tasks until shutdown. Each task's
//! work (policy, ledger, training) runs on a blocking thread through [`crate::site`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedpriv_common::dp::noise::NoiseSource;
use fedpriv_common::pki;
use fedpriv_common::protocol::{CoordinatorMessage, DeclineReason, SiteMessage, PROTOCOL_VERSION};
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
    studies: BTreeMap<String, Arc<PreparedStudy>>,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, DaemonError> {
    std::fs::read(path).map_err(|e| DaemonError::Config(format!("{}: {e}", path.display())))
}

/// Runs until `shutdown` turns true.
pub async fn run(cfg: SiteConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| DaemonError::Config(format!("{}: {e}", cfg.state_dir.display())))?;
    let ledger = SiteLedger::open(cfg.state_dir.join("site-ledger.db"))?;
    let tls = pki::client_config(&read(&cfg.ca)?, &read(&cfg.cert)?, &read(&cfg.key)?)
        .map_err(|e| DaemonError::Config(e.to_string()))?;
    let endpoint = transport::client_endpoint(
        tls,
        transport::bind_addr_for(cfg.coordinator),
        &TransportLimits::site(),
    )?;
    let noise = NoiseSource::from_os().map_err(|e| DaemonError::Internal(e.to_string()))?;
    let (addr, server_name, name) = (cfg.coordinator, cfg.server_name.clone(), cfg.name.clone());
    let state = Arc::new(Mutex::new(SiteState {
        cfg,
        ledger,
        noise,
        studies: BTreeMap::new(),
    }));
    let mut backoff = Backoff::default();
    loop {
        let conn = match transport::connect_with_backoff(
            &endpoint,
            addr,
            &server_name,
            &mut backoff,
            &mut shutdown,
        )
        .await
        {
            Ok(c) => c,
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
        match msg {
            CoordinatorMessage::Welcome { version, studies } => {
                if version != PROTOCOL_VERSION {
                    return format!(
                        "coordinator speaks protocol {version}, this site {PROTOCOL_VERSION}"
                    );
                }
                for ann in studies {
                    let study = ann.study.clone();
                    let st = Arc::clone(state);
                    let prepared = tokio::task::spawn_blocking(move || {
                        let guard = st
                            .lock()
                            .map_err(|_| DeclineReason::Internal("state lock poisoned".into()))?;
                        site::prepare_study(&guard.cfg, &ann)
                    })
                    .await
                    .unwrap_or_else(|e| Err(DeclineReason::Internal(e.to_string())));
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
                        return format!("send failed: {e}");
                    }
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
                    quic_io::recv_tensor_body(&mut recv, &task.header, &study.spec, |off, chunk| {
                        global[off..off + chunk.len()].copy_from_slice(chunk);
                    })
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
                    site::run_task(cfg, &study, ledger, noise, &t, global, &coord)
                })
                .await
                .unwrap_or_else(|e| Err(DeclineReason::Internal(e.to_string())));
                let sent = match outcome {
                    Ok(update) => {
                        tracing::info!(study = %task.study, round = task.round, "update trained, noised and sent");
                        let header =
                            TensorHeader::for_spec(&task_spec(state, &task.study), Dtype::F32);
                        quic_io::send_message(
                            conn,
                            &SiteMessage::Update {
                                study: task.study.clone(),
                                round: task.round,
                                header,
                            },
                            Some(&update),
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

fn task_spec(state: &Arc<Mutex<SiteState>>, study: &str) -> fedpriv_common::model::ModelSpec {
    state
        .lock()
        .ok()
        .and_then(|g| g.studies.get(study).map(|s| s.spec.clone()))
        .unwrap_or(fedpriv_common::model::ModelSpec {
            tensors: Vec::new(),
        })
}
