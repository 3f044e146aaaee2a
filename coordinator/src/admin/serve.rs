//! Serving operators and auditors on the coordinator's endpoint: one request per
//! bidirectional stream (see [`fedpriv_common::admin`]), authorized by
//! [`super::policy::authorize`] from the role in the requester's certificate.
//!
//! Every refusal is counted, and written to the audit log (durably) before the requester
//! hears of it, up to the per-identity cap the coordinator applies to all refusals (10 a
//! minute, then counted and summarised: a requester looping on forbidden requests cannot
//! turn them into a flood of fsyncs). Every read that is served (study list, ledger,
//! metrics, a page of the audit log) is on record as `access_granted` before its answer
//! leaves, and is not served if it cannot be recorded. Reads are served here, from a
//! read-only SQLite connection and the audit file; writes go to the studies' owner
//! ([`crate::node::AdminCommand`]), which audits them before they take effect.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedpriv_common::admin::{self, AdminRequest, AdminResponse, Whose};
use fedpriv_common::audit::details::{AccessGranted, Refused};
use fedpriv_common::audit::MAX_LINE_BYTES;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::quic_io;
use fedpriv_common::wire::{encode_frame, CloseCode};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};

use super::policy::authorize;
use crate::audit::AuditHandle;
use crate::metrics::Metrics;
use crate::node::refusals::Refusals;
use crate::node::{AdminCommand, Event, OwnerTx};
use crate::store::Store;
use crate::transport::{self, AuthenticatedPeer};

/// How long a requester has to send its request once it opened the stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most audit-log bytes one page carries (the page goes out in parts under the frame cap).
const AUDIT_PAGE_BYTES: usize = 1 << 20;

/// What an admin connection needs.
#[derive(Debug, Clone)]
pub struct AdminCtx {
    pub state_dir: PathBuf,
    pub audit: AuditHandle,
    pub metrics: Metrics,
    /// The studies' owner, which carries out writes.
    pub owner: OwnerTx,
    pub shutdown: watch::Receiver<bool>,
    /// The coordinator's per-source refusal cap (keyed here by identity).
    pub refusals: Refusals,
    /// Requests read per connection (as for sites' messages): each read is an fsynced
    /// access record and a database check, so an operator or auditor in a loop is slowed,
    /// not served flat out.
    pub message_rate: crate::limits::Rate,
    /// Decrypts checkpoints for `admin export`.
    pub at_rest_key: std::sync::Arc<fedpriv_common::seal::SealKey>,
}

/// Serves an operator's or auditor's connection: one request per bidirectional stream, in
/// turn, until the peer goes or the coordinator stops. A unidirectional stream (the site
/// protocol) from such a peer is refused, audited, and ends the connection.
pub async fn serve_admin(peer: AuthenticatedPeer, mut ctx: AdminCtx) {
    let conn = peer.conn.clone();
    let rate = ctx.message_rate;
    let opened = std::time::Instant::now();
    let mut requests = crate::limits::TokenBucket::full(&rate, 0);
    loop {
        // Over the rate, the next request is read later (the peer may open only
        // `max_bidi_streams` meanwhile, so nothing piles up here).
        let wait = requests.wait_ms(&rate, opened.elapsed().as_millis() as u64);
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(wait)) => {}
                _ = ctx.shutdown.changed() => return,
            }
        }
        requests.take(&rate, opened.elapsed().as_millis() as u64);
        tokio::select! {
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => serve_request(&peer, &ctx, send, recv).await,
                Err(e) => {
                    tracing::info!(identity = %peer.identity, reason = %quic_io::describe_close(&e), "admin connection ended");
                    return;
                }
            },
            uni = conn.accept_uni() => {
                if uni.is_ok() {
                    let reason = format!("role {} may not use the site protocol", peer.identity.role);
                    record_refusal(&ctx, &peer, "site_protocol", None, &reason).await;
                    let _ = transport::refuse(&peer, CloseCode::RoleNotAllowed, &reason);
                }
                return;
            }
            _ = ctx.shutdown.changed() => return,
        }
    }
}

/// Answers a site that opened a bidirectional stream (an admin request) on its connection:
/// reads the request, refuses it (audited first), answers, and closes the connection.
pub async fn refuse_site_request(
    peer: &AuthenticatedPeer,
    ctx: &AdminCtx,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    serve_request(peer, ctx, send, recv).await;
    let _ = transport::refuse(
        peer,
        CloseCode::RoleNotAllowed,
        "sites have no admin rights",
    );
}

async fn serve_request(
    peer: &AuthenticatedPeer,
    ctx: &AdminCtx,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let read = async {
        let req: AdminRequest = quic_io::recv_frame(&mut recv).await?;
        quic_io::recv_end(&mut recv).await?;
        Ok::<_, quic_io::StreamError>(req)
    };
    let frames = match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Err(_) => vec![error(Whose::Peer, "no complete request within 10 s")],
        Ok(Err(e)) => vec![error(Whose::Peer, format!("bad request: {e}"))],
        Ok(Ok(req @ AdminRequest::ExportModel { .. })) => {
            // Streamed as it is decrypted, not gathered first.
            export(peer, ctx, req, &mut send).await;
            Vec::new()
        }
        Ok(Ok(req)) => answer(peer, ctx, req).await,
    };
    for frame in frames {
        let bytes = match encode_frame(&frame) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "admin response does not encode");
                break;
            }
        };
        if let Err(e) = send.write_all(&bytes).await {
            tracing::info!(identity = %peer.identity, error = %e, "admin requester went away");
            return;
        }
    }
    let _ = send.finish();
    // Wait (briefly) until the requester has the answer, so a close that follows does
    // not cut it off.
    let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
}

/// Writes one response frame; false when the requester has gone.
async fn send_frame(send: &mut quinn::SendStream, frame: &AdminResponse) -> bool {
    match encode_frame(frame) {
        Ok(bytes) => send.write_all(&bytes).await.is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "admin response does not encode");
            false
        }
    }
}

/// Bytes per [`AdminResponse::Bytes`] frame (under the control-frame cap).
const MODEL_PART_BYTES: usize = admin::PART_BYTES;

/// A `Write` that hands the model to the async sender in frame-sized pieces and hashes
/// what it hands over.
struct PartWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    hash: ring::digest::Context,
    bytes: u64,
}

impl PartWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(MODEL_PART_BYTES));
        self.hash.update(&part);
        self.bytes += part.len() as u64;
        self.tx.blocking_send(part).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the requester went away")
        })
    }
}

impl std::io::Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = MODEL_PART_BYTES - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MODEL_PART_BYTES {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `admin export`: an operator's model export while the coordinator runs. Authorized,
/// cleared by the release gate (a withheld model is a refusal, on record), recorded with
/// its digest, and only then decrypted and streamed; the final frame gives its size and
/// SHA-256 so that the client can tell a cut-off transfer from a whole one.
async fn export(
    peer: &AuthenticatedPeer,
    ctx: &AdminCtx,
    req: AdminRequest,
    send: &mut quinn::SendStream,
) {
    let AdminRequest::ExportModel { study, round } = req.clone() else {
        return;
    };
    let action = req.action();
    tracing::info!(identity = %peer.identity, action, %study, "admin request");
    if let Err(reason) = req.check_bounds() {
        send_frame(send, &error(Whose::Peer, reason)).await;
        return;
    }
    if let Err(refusal) = authorize(peer.identity.role, &req) {
        record_refusal(ctx, peer, refusal.action, Some(&study), &refusal.reason).await;
        send_frame(
            send,
            &AdminResponse::Refused {
                reason: refusal.reason,
            },
        )
        .await;
        return;
    }
    let state_dir = ctx.state_dir.clone();
    let s = study.clone();
    let cleared = tokio::task::spawn_blocking(move || {
        let store = Store::open_read_only(state_dir.join("coordinator.db"))
            .map_err(|e| crate::release::ReleaseError::State(format!("state database: {e}")))?;
        crate::release::clear(&store, &s, round)
    })
    .await;
    let cleared = match cleared {
        Ok(Ok(c)) => c,
        Ok(Err(crate::release::ReleaseError::Withheld(reason))) => {
            record_refusal(ctx, peer, action, Some(&study), &reason).await;
            send_frame(send, &AdminResponse::Refused { reason }).await;
            return;
        }
        Ok(Err(e @ crate::release::ReleaseError::NotFound(_))) => {
            send_frame(send, &error(Whose::Peer, e.to_string())).await;
            return;
        }
        Ok(Err(e)) => {
            send_frame(send, &error(Whose::Operator, e.to_string())).await;
            return;
        }
        Err(e) => {
            send_frame(send, &error(Whose::Internal, e.to_string())).await;
            return;
        }
    };
    let who = peer.identity.to_string();
    let exported = fedpriv_common::audit::details::ModelExported {
        study: study.clone(),
        model_version: cleared.round,
        sha256: cleared.sha256.clone(),
        by: who.clone(),
        to: format!("admin channel ({})", peer.remote_address()),
    };
    if let Err(e) = ctx.audit.record(&who, &exported).await {
        tracing::error!(error = %e, identity = %who, "export not audited; not served");
        send_frame(
            send,
            &error(
                Whose::Operator,
                format!("{e}; the model was not sent (every export is recorded first)"),
            ),
        )
        .await;
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let key = std::sync::Arc::clone(&ctx.at_rest_key);
    let path = crate::checkpoint::model_path(&ctx.state_dir, &study, cleared.round);
    let (s, round, sha) = (study.clone(), cleared.round, cleared.sha256.clone());
    let reader = tokio::task::spawn_blocking(move || {
        let parts = PartWriter {
            tx,
            buf: Vec::with_capacity(MODEL_PART_BYTES),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
        };
        let mut w = crate::checkpoint::MetadataAdder::new(parts, cleared.metadata);
        crate::checkpoint::read_checkpoint(&key, &path, &s, round, Some(&sha), &mut w)
            .map_err(|e| e.to_string())?;
        let mut parts = w.finish().map_err(|e| e.to_string())?;
        parts.send().map_err(|e| e.to_string())?;
        Ok::<_, String>((
            parts.bytes,
            fedpriv_common::digest::hex(parts.hash.finish().as_ref()),
        ))
    });
    let mut gone = false;
    while let Some(data) = rx.recv().await {
        if !send_frame(send, &AdminResponse::Bytes { data }).await {
            gone = true;
            break;
        }
    }
    drop(rx);
    let done = reader.await;
    if gone {
        tracing::info!(identity = %who, %study, "the requester went away during an export");
        return;
    }
    let last = match done {
        Ok(Ok((bytes, sha256))) => {
            tracing::info!(identity = %who, %study, round, bytes, "model exported over the admin channel");
            AdminResponse::Ok {
                text: json!({"study": study, "round": round, "bytes": bytes, "sha256": sha256})
                    .to_string(),
                next: None,
                head: None,
            }
        }
        Ok(Err(e)) => error(
            Whose::Operator,
            format!("the checkpoint could not be read: {e}"),
        ),
        Err(e) => error(Whose::Internal, e.to_string()),
    };
    send_frame(send, &last).await;
}

fn error(whose: Whose, reason: impl Into<String>) -> AdminResponse {
    AdminResponse::Error {
        reason: reason.into(),
        whose,
    }
}

/// Counts a refusal and, within the identity's cap, audits it durably; only then may the
/// requester be told.
async fn record_refusal(
    ctx: &AdminCtx,
    peer: &AuthenticatedPeer,
    action: &str,
    study: Option<&str>,
    reason: &str,
) {
    let who = peer.identity.to_string();
    let details = Refused::Request {
        identity: who.clone(),
        remote: peer.remote_address().to_string(),
        action: action.to_string(),
        reason: reason.to_string(),
        study: study.map(str::to_string),
    };
    if let Err(e) = ctx.refusals.note_durably(&who, &details).await {
        // The refusal stands (it is the safe outcome); the missing record is the
        // operator's to investigate.
        tracing::error!(error = %e, identity = %who, action, "refusal not audited");
    }
}

async fn answer(peer: &AuthenticatedPeer, ctx: &AdminCtx, req: AdminRequest) -> Vec<AdminResponse> {
    let action = req.action();
    tracing::info!(identity = %peer.identity, action, "admin request");
    if let Err(reason) = req.check_bounds() {
        return vec![error(Whose::Peer, reason)];
    }
    let study = req.study().map(str::to_string);
    if let Err(refusal) = authorize(peer.identity.role, &req) {
        record_refusal(ctx, peer, refusal.action, study.as_deref(), &refusal.reason).await;
        return vec![AdminResponse::Refused {
            reason: refusal.reason,
        }];
    }
    if req.is_write() {
        let (tx, rx) = oneshot::channel();
        let cmd = AdminCommand {
            request: req,
            by: peer.identity.clone(),
            reply: tx,
        };
        if ctx.owner.send(Event::Admin(cmd)).is_err() {
            return vec![error(Whose::Internal, "the coordinator is stopping")];
        }
        let resp = rx
            .await
            .unwrap_or_else(|_| error(Whose::Internal, "the coordinator is stopping"));
        if let AdminResponse::Refused { reason } = &resp {
            // Refused by policy (e.g. loosening privacy). Audited here rather than by the
            // owner: under the identity's cap, and without an fsync in the owner's loop.
            tracing::warn!(identity = %peer.identity, action, %reason, "admin request refused");
            record_refusal(ctx, peer, action, study.as_deref(), reason).await;
        }
        return vec![resp];
    }
    let audit_from = match &req {
        AdminRequest::FetchAudit { from_seq, .. } => Some(*from_seq),
        _ => None,
    };
    let served = if let AdminRequest::Metrics = req {
        Ok((ctx.metrics.render(), None))
    } else {
        let state_dir = ctx.state_dir.clone();
        match tokio::task::spawn_blocking(move || serve_read(&state_dir, &req)).await {
            Ok(read) => read,
            Err(e) => Err(error(Whose::Internal, e.to_string())),
        }
    };
    let (text, next) = match served {
        Ok(read) => read,
        Err(e) => return vec![e],
    };
    match record_access(ctx, peer, action, study.as_deref(), audit_from, &text).await {
        // The seq of this read's own record is the head a pager stops at.
        Ok(seq) => admin::into_frames(&text, next, audit_from.map(|_| seq)),
        Err(e) => vec![e],
    }
}

/// Puts a read on record (HIPAA access log) before its answer leaves. A read that cannot
/// be recorded is not served: the error is the operator's (the audit log's disk).
async fn record_access(
    ctx: &AdminCtx,
    peer: &AuthenticatedPeer,
    action: &str,
    study: Option<&str>,
    audit_from: Option<u64>,
    text: &str,
) -> Result<u64, AdminResponse> {
    let who = peer.identity.to_string();
    let details = AccessGranted {
        identity: who.clone(),
        action: action.to_string(),
        study: study.map(str::to_string),
        from_seq: audit_from,
        records: audit_from.map(|_| text.lines().count()),
    };
    ctx.audit.record(&who, &details).await.map_err(|e| {
        tracing::error!(error = %e, identity = %who, action, "read not audited; not served");
        error(
            Whose::Operator,
            format!("{e}; the read was not served (every read is recorded first)"),
        )
    })
}

/// A read: from a read-only connection to the state database, or the audit file.
fn serve_read(
    state_dir: &Path,
    req: &AdminRequest,
) -> Result<(String, Option<u64>), AdminResponse> {
    let open = || {
        Store::open_read_only(state_dir.join("coordinator.db"))
            .map_err(|e| error(Whose::Operator, format!("state database: {e}")))
    };
    let internal = |e: String| error(Whose::Internal, e);
    match req {
        AdminRequest::ListStudies => {
            Ok((list_studies(&open()?).map_err(internal)?.to_string(), None))
        }
        AdminRequest::ShowLedger { study } => {
            let store = open()?;
            if store
                .study(study)
                .map_err(|e| internal(e.to_string()))?
                .is_none()
            {
                return Err(error(Whose::Peer, format!("no study {study:?}")));
            }
            Ok((
                ledger_json(&store, study).map_err(internal)?.to_string(),
                None,
            ))
        }
        AdminRequest::FetchAudit { from_seq, max } => {
            let path = state_dir.join("audit.log");
            let (lines, next) = audit_page(&path, *from_seq, *max as usize, AUDIT_PAGE_BYTES)
                .map_err(|e| error(Whose::Operator, format!("{}: {e}", path.display())))?;
            Ok((lines, next))
        }
        _ => Err(internal(format!("{} is not a read", req.action()))),
    }
}

/// Every study with its status, enrolled sites, rounds and budget (JSON array).
pub fn list_studies(store: &Store) -> Result<Value, String> {
    let mut out = Vec::new();
    for row in store.studies().map_err(|e| e.to_string())? {
        let cfg = StudyConfig::from_toml(&row.config_toml)
            .map_err(|e| format!("stored study {}: {e}", row.id))?;
        let rounds = store.rounds(&row.id).map_err(|e| e.to_string())?;
        let completed = rounds
            .iter()
            .filter(|r| r.status == crate::store::RoundStatus::Completed)
            .count();
        out.push(json!({
            "study": row.id, "status": row.status, "end_reason": row.end_reason,
            "created_at": row.created_at, "enrolled": cfg.enrolled,
            "rounds": {"planned": cfg.rounds, "started": rounds.iter().map(|r| r.round).max().unwrap_or(0), "completed": completed},
            "budget": {"epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get()},
            "epsilon_spent": epsilon_spent(store, &row.id, &cfg)?,
        }));
    }
    Ok(Value::Array(out))
}

/// Per site, the epsilon its recorded spends compose to (the accountant, never a sum); and
/// the study's (the worst site's). Also the study report's figures.
pub(crate) fn per_site_epsilon(
    store: &Store,
    study: &str,
    cfg: &StudyConfig,
) -> Result<(serde_json::Map<String, Value>, f64), String> {
    let spent = store.spent_by_site(study).map_err(|e| e.to_string())?;
    let mut per_site = serde_json::Map::new();
    let mut worst = 0.0f64;
    for (site, events) in &spent {
        let eps = fedpriv_common::dp::accountant::epsilon(
            cfg.privacy.accountant,
            events,
            cfg.privacy.delta,
        )
        .map_err(|e| e.to_string())?;
        worst = worst.max(eps);
        per_site.insert(site.clone(), json!(eps));
    }
    Ok((per_site, worst))
}

fn epsilon_spent(store: &Store, study: &str, cfg: &StudyConfig) -> Result<f64, String> {
    per_site_epsilon(store, study, cfg).map(|(_, worst)| worst)
}

/// A study's ledger as one JSON object (what `ledger show --json` prints).
pub fn ledger_json(store: &Store, study: &str) -> Result<Value, String> {
    let row = store
        .study(study)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no study {study:?}"))?;
    let cfg = StudyConfig::from_toml(&row.config_toml).map_err(|e| e.to_string())?;
    let ledger = store.ledger(study).map_err(|e| e.to_string())?;
    let (per_site, study_eps) = per_site_epsilon(store, study, &cfg)?;
    // Evaluation charges apart from training, and what the evaluations said (noised).
    let evaluation_entries = store.evaluation_ledger(study).map_err(|e| e.to_string())?;
    let evaluations = store.evaluations(study).map_err(|e| e.to_string())?;
    Ok(json!({
        "study": study, "status": row.status, "end_reason": row.end_reason,
        "budget": {"epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get(), "accountant": cfg.privacy.accountant.as_str()},
        "epsilon_spent": study_eps, "per_site_epsilon": per_site, "entries": ledger,
        "evaluation_entries": evaluation_entries, "evaluations": evaluations,
    }))
}

/// The table `ledger show` prints, from [`ledger_json`]'s object.
pub fn ledger_text(v: &Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("");
    let f = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let end = v
        .get("end_reason")
        .and_then(Value::as_str)
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let mut out = format!(
        "study {} ({}{end}): epsilon {:.4} of {} spent at delta {} ({} accountant)\n",
        s("/study"),
        s("/status"),
        f("/epsilon_spent"),
        f("/budget/epsilon"),
        f("/budget/delta"),
        s("/budget/accountant"),
    );
    charge_table(&mut out, &json_list(v, "entries"));
    let evaluation_entries = json_list(v, "evaluation_entries");
    if !evaluation_entries.is_empty() {
        out.push_str(
            "evaluation charges (beside the same round's training; epsilon after both):\n",
        );
        charge_table(&mut out, &evaluation_entries);
    }
    let evaluations = json_list(v, "evaluations");
    if !evaluations.is_empty() {
        out.push_str("DP evaluations (noised; sd: the noise's standard deviation):\n");
        out.push_str(&format!(
            "{:<6} {:<7} {:>5} {:>10} {:>9} {:>9} {:>10} {:>8}\n",
            "round", "model", "sites", "examples", "accuracy", "sd", "mean_loss", "rmse"
        ));
        for e in evaluations {
            let g = |p: &str| e.pointer(p).and_then(Value::as_f64);
            let num = |x: Option<f64>, w: usize| match x {
                Some(x) => format!("{x:>w$.4}"),
                None => format!("{:>w$}", "-"),
            };
            out.push_str(&format!(
                "{:<6} {:<7} {:>5} {:>10.0} {} {} {} {}\n",
                e.get("round").and_then(Value::as_u64).unwrap_or(0),
                e.get("model_round").and_then(Value::as_u64).unwrap_or(0),
                e.pointer("/summary/sites")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                g("/summary/examples").unwrap_or(f64::NAN),
                num(g("/summary/accuracy"), 9),
                num(g("/summary/accuracy_sd"), 9),
                num(g("/summary/mean_loss"), 10),
                num(g("/summary/rmse"), 8),
            ));
        }
    }
    out
}

/// The array at `key` of a JSON object (empty when missing).
fn json_list<'a>(v: &'a Value, key: &str) -> Vec<&'a Value> {
    v.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect()
}

/// Ledger rows (training or evaluation charges) as a table: round, site, the mechanism and
/// the site's epsilon after the round.
fn charge_table(out: &mut String, rows: &[&Value]) {
    out.push_str(&format!(
        "{:<6} {:<20} {:>8} {:>8} {:>6} {:>10}\n",
        "round", "site", "q", "sigma", "steps", "epsilon"
    ));
    for e in rows {
        let g = |p: &str| e.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
        out.push_str(&format!(
            "{:<6} {:<20} {:>8.4} {:>8.4} {:>6} {:>10.4}\n",
            e.get("round").and_then(Value::as_u64).unwrap_or(0),
            e.get("site").and_then(Value::as_str).unwrap_or(""),
            g("/event/q"),
            g("/event/sigma"),
            e.pointer("/event/steps")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            g("/epsilon_after"),
        ));
    }
}

/// Audit records `from_seq..` (line k of the log holds seq k), at most `max` of them and
/// about `max_bytes`, as the log's own lines. `next` is the seq to ask for next if the page
/// stopped at a limit (None at the end of the log). A last line without its newline (a
/// record being written) is left for the next page.
pub fn audit_page(
    path: &Path,
    from_seq: u64,
    max: usize,
    max_bytes: usize,
) -> std::io::Result<(String, Option<u64>)> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), None)),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(file);
    let mut out = String::new();
    let mut line = Vec::new();
    let mut seq = 0u64;
    let mut taken = 0usize;
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            if n > MAX_LINE_BYTES {
                return Err(std::io::Error::other(format!(
                    "line {} is longer than any record; run `audit verify`",
                    seq + 1
                )));
            }
            return Ok((out, None));
        }
        seq += 1;
        if seq < from_seq {
            continue;
        }
        if taken == max || (taken > 0 && out.len() + line.len() > max_bytes) {
            return Ok((out, Some(seq)));
        }
        let text = std::str::from_utf8(&line).map_err(|_| {
            std::io::Error::other(format!("line {seq} is not UTF-8; run `audit verify`"))
        })?;
        out.push_str(text);
        taken += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn audit_pages_follow_seq_and_stop_at_limits_and_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        assert_eq!(
            audit_page(&path, 1, 10, 1 << 20).unwrap(),
            (String::new(), None)
        );
        let lines: Vec<String> = (1..=5).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
        std::fs::write(&path, format!("{}{{\"seq\":6", lines.concat())).unwrap();
        // All complete lines; the torn sixth is not served.
        assert_eq!(
            audit_page(&path, 1, 10, 1 << 20).unwrap(),
            (lines.concat(), None)
        );
        // By count.
        assert_eq!(
            audit_page(&path, 2, 2, 1 << 20).unwrap(),
            (lines[1..3].concat(), Some(4))
        );
        // By bytes: at least one line per page, so paging always moves on.
        assert_eq!(
            audit_page(&path, 4, 10, 1).unwrap(),
            (lines[3].clone(), Some(5))
        );
        assert_eq!(
            audit_page(&path, 9, 10, 1 << 20).unwrap(),
            (String::new(), None)
        );
    }
}
