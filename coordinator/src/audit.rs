//! The coordinator's audit trail. One thread owns the hash-chained log
//! ([`fedpriv_common::audit_file::AuditLog`]); everyone else holds an [`AuditHandle`] and
//! sends it records. A record is written and `fdatasync`ed before the caller hears back,
//! so the caller acts only once its record is durable, and does not act if it failed.
//!
//! Why a thread and not a task: each append waits on the disk; the owner of the studies and
//! the connection tasks must not stall the async runtime's workers on it, and one writer
//! keeps the chain in order without a lock.

use std::sync::mpsc;
use std::thread::JoinHandle;

use fedpriv_common::audit::details::Details;
use fedpriv_common::audit::AuditEvent;
use fedpriv_common::audit_file::AuditLog;
use serde_json::Value;

/// The coordinator's own actor name in its records (people and sites are named by their
/// certificate identity, `role/name`).
pub const COORDINATOR: &str = "coordinator";

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

/// Appending failed: the log is unwritable or poisoned. Ours (the state directory), not
/// the peer's; whatever was to be recorded must not happen.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit log write failed: {0}")]
pub struct AuditFailed(pub String);

enum Reply {
    Blocking(mpsc::SyncSender<Result<u64, AuditFailed>>),
    Async(tokio::sync::oneshot::Sender<Result<u64, AuditFailed>>),
    None,
}

struct Request {
    actor: String,
    event: AuditEvent,
    details: Value,
    reply: Reply,
}

/// Sends records to the audit thread. Cheap to clone.
#[derive(Clone)]
pub struct AuditHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for AuditHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditHandle")
    }
}

/// The audit thread; [`AuditThread::finish`] waits for it once every handle is dropped.
#[derive(Debug)]
pub struct AuditThread {
    thread: Option<JoinHandle<()>>,
}

/// Starts the thread that owns `log`.
pub fn start(log: AuditLog) -> Result<(AuditHandle, AuditThread), AuditFailed> {
    let (tx, rx) = mpsc::channel::<Request>();
    let thread = std::thread::Builder::new()
        .name("audit".into())
        .spawn(move || writer(log, rx))
        .map_err(|e| AuditFailed(format!("cannot start the audit thread: {e}")))?;
    Ok((
        AuditHandle { tx },
        AuditThread {
            thread: Some(thread),
        },
    ))
}

fn writer(mut log: AuditLog, rx: mpsc::Receiver<Request>) {
    while let Ok(req) = rx.recv() {
        let res = log
            .append_now(&req.actor, req.event, req.details)
            .map_err(|e| AuditFailed(e.to_string()));
        if let Err(e) = &res {
            tracing::error!(error = %e, event = %req.event, "audit record not written");
        }
        match req.reply {
            Reply::Blocking(tx) => {
                let _ = tx.send(res);
            }
            Reply::Async(tx) => {
                let _ = tx.send(res);
            }
            Reply::None => {}
        }
    }
}

impl AuditHandle {
    /// Records an event and waits until it is on disk. For async callers.
    pub async fn record<D: Details>(&self, actor: &str, details: &D) -> Result<u64, AuditFailed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(actor, details, Reply::Async(tx))?;
        rx.await
            .map_err(|_| AuditFailed("the audit thread stopped".into()))?
    }

    /// Records an event and blocks until it is on disk. For the studies' owner, which runs
    /// on its own thread and acts only once its records are durable (as its SQLite writes).
    pub fn record_blocking<D: Details>(
        &self,
        actor: &str,
        details: &D,
    ) -> Result<u64, AuditFailed> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(actor, details, Reply::Blocking(tx))?;
        rx.recv()
            .map_err(|_| AuditFailed("the audit thread stopped".into()))?
    }

    /// Queues a record without waiting: for reports (alerts, summaries) that gate nothing.
    /// A failure is logged by the audit thread.
    pub fn record_detached<D: Details>(&self, actor: &str, details: &D) {
        let _ = self.send(actor, details, Reply::None);
    }

    fn send<D: Details>(&self, actor: &str, details: &D, reply: Reply) -> Result<(), AuditFailed> {
        self.tx
            .send(Request {
                actor: actor.to_string(),
                event: D::EVENT,
                details: details.to_value(),
                reply,
            })
            .map_err(|_| AuditFailed("the audit thread stopped".into()))
    }
}

impl AuditThread {
    /// Waits for the thread to write what it was sent and stop. Every handle must be
    /// dropped first, or this waits for ever.
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedpriv_common::audit::details;
    use fedpriv_common::audit_file::verify_file;

    #[tokio::test]
    async fn records_from_both_kinds_of_caller_land_in_order_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (handle, thread) = start(AuditLog::open(&path).unwrap()).unwrap();
        let accepted = details::ConnectionAccepted {
            identity: "site/a".into(),
            role: "site".into(),
            remote: "127.0.0.1:9".into(),
        };
        let a = handle.record("site/a", &accepted).await.unwrap();
        let h2 = handle.clone();
        let b = tokio::task::spawn_blocking(move || {
            let started = details::RoundStarted {
                study: "s".into(),
                round: 1,
                sites: vec!["a".into()],
            };
            h2.record_blocking(COORDINATOR, &started)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!((a, b), (1, 2));
        drop(handle);
        thread.finish();
        let report = verify_file(&path).unwrap();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.records, 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.contains("connection_accepted") && first.contains("site/a"));
    }

    #[test]
    fn a_second_writer_on_the_same_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (handle, thread) = start(AuditLog::open(&path).unwrap()).unwrap();
        assert!(AuditLog::open(&path).is_err());
        drop(handle);
        thread.finish();
        assert!(AuditLog::open(&path).is_ok());
    }
}
