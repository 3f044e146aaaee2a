//! Least privilege for people: operators and auditors talk to the running coordinator over
//! the same mTLS QUIC endpoint as the sites, one request per bidirectional stream (see
//! [`fedpriv_common::admin`]); what each may do follows from the role in its certificate.
//!
//! | request | operator | auditor | site |
//! |---|---|---|---|
//! | create, change, stop a study | yes | no | no |
//! | list studies, show a ledger, metrics | yes | yes | no |
//! | read the audit log | no | yes | no |
//!
//! Operators do not read the audit log: it is the record auditors hold operators to, and an
//! operator has no need of it to run studies (least privilege). Sites use their own
//! protocol and see only the studies they are enrolled in.
//!
//! Every refusal is counted, and written to the audit log (durably) before the requester
//! hears of it, up to the per-identity cap the coordinator applies to all refusals (10 a
//! minute, then counted and summarised: a requester looping on forbidden requests cannot
//! turn them into a flood of fsyncs). Every read that is served (study list, ledger,
//! metrics, a page of the audit log) is on record as `access_granted` before its answer
//! leaves, and is not served if it cannot be recorded. Reads are served from a read-only
//! SQLite connection and the audit file; writes go to the task that owns the studies
//! ([`AdminCommand`]), which audits them before they take effect.

use fedpriv_common::digest::sha256_hex;
use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedpriv_common::admin::{
    self, AdminRequest, AdminResponse, ChangeError, StudyProgress, Whose, MAX_RESPONSE_BYTES,
};
use fedpriv_common::audit::{AuditEvent, MAX_LINE_BYTES};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_common::protocol::CoordinatorMessage;
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::seal::SealKey;
use fedpriv_common::wire::{encode_frame, CloseCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::audit::AuditHandle;
use crate::metrics::Metrics;
use crate::server::{RefusalCap, StudyRuntime};
use crate::store::{Store, StudyStatus};
use crate::transport::{self, AuthenticatedPeer};

/// How long a requester has to send its request once it opened the stream.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most audit-log bytes one page carries (the page goes out in parts under the frame cap).
const AUDIT_PAGE_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------------------------------
// Authorization

/// A request the requester's role may not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub action: &'static str,
    pub reason: String,
}

/// Who may do what; see the module's table.
pub fn authorize(role: Role, request: &AdminRequest) -> Result<(), Refusal> {
    use AdminRequest as R;
    let allowed = match role {
        Role::Operator => matches!(
            request,
            R::CreateStudy { .. }
                | R::ChangeStudy { .. }
                | R::StopStudy { .. }
                | R::ListStudies
                | R::ShowLedger { .. }
                | R::Metrics
        ),
        Role::Auditor => matches!(
            request,
            R::ListStudies | R::ShowLedger { .. } | R::FetchAudit { .. } | R::Metrics
        ),
        Role::Site => false,
    };
    if allowed {
        return Ok(());
    }
    let why = match role {
        Role::Operator => "operators manage studies; the audit log is for auditors",
        Role::Auditor => {
            "auditors may list studies and read ledgers, the audit log and metrics, nothing else"
        }
        Role::Site => "sites have no admin rights; a site uses the site protocol",
    };
    Err(Refusal {
        action: request.action(),
        reason: format!("role {role} may not {}: {why}", request.action()),
    })
}

// ---------------------------------------------------------------------------------------
// Serving

/// A write, sent to the task that owns the studies; the answer comes back on `reply`.
#[derive(Debug)]
pub struct AdminCommand {
    pub request: AdminRequest,
    pub by: Identity,
    pub reply: oneshot::Sender<AdminResponse>,
}

/// What an admin connection needs.
#[derive(Debug, Clone)]
pub struct AdminCtx {
    pub state_dir: PathBuf,
    pub audit: AuditHandle,
    pub metrics: Metrics,
    pub owner: mpsc::UnboundedSender<AdminCommand>,
    pub shutdown: watch::Receiver<bool>,
    /// The coordinator's per-source refusal cap (keyed here by identity).
    pub refusals: RefusalCap,
    /// Requests read per connection (as for sites' messages): each read is an fsynced
    /// access record and a database check, so an operator or auditor in a loop is slowed,
    /// not served flat out.
    pub message_rate: crate::limits::Rate,
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
    let mut details = json!({"identity": who, "action": action, "reason": reason, "remote": peer.remote_address().to_string()});
    if let Some(study) = study {
        details["study"] = json!(study);
    }
    if let Err(e) = ctx
        .refusals
        .note(&ctx.audit, &ctx.metrics, &who, details)
        .await
    {
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
        if ctx.owner.send(cmd).is_err() {
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
    let mut details = json!({"identity": who, "action": action});
    if let Some(study) = study {
        details["study"] = json!(study);
    }
    if let Some(from) = audit_from {
        details["from_seq"] = json!(from);
        details["records"] = json!(text.lines().count());
    }
    ctx.audit
        .record(&who, AuditEvent::AccessGranted, details)
        .await
        .map_err(|e| {
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

/// Per site, the epsilon its recorded spends add up to; and the study's (the worst site's).
fn per_site_epsilon(
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
    Ok(json!({
        "study": study, "status": row.status, "end_reason": row.end_reason,
        "budget": {"epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get(), "accountant": cfg.privacy.accountant.as_str()},
        "epsilon_spent": study_eps, "per_site_epsilon": per_site, "entries": ledger,
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
    out.push_str(&format!(
        "{:<6} {:<20} {:>8} {:>8} {:>6} {:>10}\n",
        "round", "site", "q", "sigma", "steps", "epsilon"
    ));
    for e in v
        .get("entries")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
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
    out
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

// ---------------------------------------------------------------------------------------
// The owner's side of writes

/// Where the owner is, for a write.
pub(crate) struct Owner<'a> {
    pub studies: &'a mut BTreeMap<String, StudyRuntime>,
    pub store: &'a mut Store,
    pub state_dir: &'a Path,
    pub at_rest_key: &'a Arc<SealKey>,
    pub audit: &'a AuditHandle,
    /// Messages for each study's enrolled, connected sites.
    pub broadcast: &'a mut Vec<(String, CoordinatorMessage)>,
}

impl Owner<'_> {
    /// Carries out a write (already authorized). Each is audited durably before it takes
    /// effect; a policy refusal is audited before it is answered.
    pub(crate) fn execute(&mut self, request: AdminRequest, by: &Identity) -> AdminResponse {
        let who = by.to_string();
        match request {
            AdminRequest::CreateStudy { config_toml } => self.create(&who, &config_toml),
            AdminRequest::ChangeStudy { study, changes } => self.change(&who, &study, &changes),
            AdminRequest::StopStudy { study, reason } => self.stop(&who, &study, &reason),
            other => error(
                Whose::Internal,
                format!("{} is not a write", other.action()),
            ),
        }
    }

    fn audit(&self, who: &str, event: AuditEvent, details: Value) -> Result<(), AdminResponse> {
        self.audit
            .record_blocking(who, event, details)
            .map(|_| ())
            .map_err(|e| error(Whose::Operator, format!("{e}; nothing was changed")))
    }

    /// A policy refusal. Not audited here: the requester's connection audits it (under the
    /// identity's refusal cap) before the requester is told, keeping fsyncs of a requester
    /// that loops on refused changes out of the owner's loop.
    fn refuse(&self, who: &str, action: &str, study: &str, reason: String) -> AdminResponse {
        tracing::info!(identity = %who, action, %study, "refused by policy");
        AdminResponse::Refused { reason }
    }

    fn create(&mut self, who: &str, config_toml: &str) -> AdminResponse {
        let cfg = match StudyConfig::from_toml(config_toml) {
            Ok(c) => c,
            Err(e) => return error(Whose::Peer, format!("study config: {e}")),
        };
        let exists =
            self.studies.contains_key(&cfg.id) || !matches!(self.store.study(&cfg.id), Ok(None));
        if exists {
            return error(
                Whose::Peer,
                format!(
                    "study {:?} already exists; a study id is never reused",
                    cfg.id
                ),
            );
        }
        if let Err(e) = crate::server::study_spec(&cfg) {
            return error(Whose::Peer, e.to_string());
        }
        // On file before anything else happens; a study nobody recorded never runs.
        if let Err(e) = self.audit(
            who,
            AuditEvent::StudyCreated,
            json!({"study": cfg.id, "by": who, "enrolled": cfg.enrolled, "epsilon": cfg.privacy.epsilon.get(), "delta": cfg.privacy.delta.get(), "unit": format!("{:?}", cfg.privacy.unit).to_lowercase(), "sha256": sha256_hex(config_toml.as_bytes())}),
        ) {
            return e;
        }
        let runtime = crate::server::study_runtime(
            self.store,
            self.state_dir,
            &cfg,
            config_toml,
            self.at_rest_key,
        );
        let rt = match runtime {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(study = %cfg.id, error = %e, "cannot create the study");
                return error(Whose::Internal, format!("cannot create the study: {e}"));
            }
        };
        let announcement = rt.announcement.clone();
        self.studies.insert(cfg.id.clone(), rt);
        self.broadcast.push((
            cfg.id.clone(),
            CoordinatorMessage::StudyAnnounced(Box::new(announcement)),
        ));
        tracing::info!(study = %cfg.id, by = %who, sites = cfg.enrolled.len(), "study created");
        AdminResponse::Ok {
            text: format!(
                "created study {} with {} enrolled sites ({}); epsilon budget {} at delta {}",
                cfg.id,
                cfg.enrolled.len(),
                cfg.enrolled.join(", "),
                cfg.privacy.epsilon,
                cfg.privacy.delta
            ),
            next: None,
            head: None,
        }
    }

    fn change(&mut self, who: &str, study: &str, changes: &[(String, String)]) -> AdminResponse {
        let Some(rt) = self.studies.get_mut(study) else {
            return error(Whose::Peer, format!("no study {study:?} is running"));
        };
        if rt.engine.is_finished() {
            return error(
                Whose::Peer,
                format!("study {study:?} has ended; it cannot change"),
            );
        }
        let stored = match self.store.study(study) {
            Ok(Some(row)) => row.config_toml,
            Ok(None) => {
                return error(
                    Whose::Internal,
                    format!("study {study:?} is not in the store"),
                )
            }
            Err(e) => return error(Whose::Internal, e.to_string()),
        };
        let rounds_started = match self.store.rounds(study) {
            Ok(r) => r.iter().map(|r| r.round).max().unwrap_or(0),
            Err(e) => return error(Whose::Internal, e.to_string()),
        };
        let progress = StudyProgress {
            rounds_started,
            epsilon_spent: rt.engine.study_epsilon(),
        };
        let (text, cfg) = match admin::apply_changes(&stored, changes, progress) {
            Ok(ok) => ok,
            Err(ChangeError::Refused(reason)) => {
                return self.refuse(who, "change_study", study, reason)
            }
            Err(ChangeError::Invalid(reason)) => return error(Whose::Peer, reason),
        };
        if let Err(e) = self.audit(
            who,
            AuditEvent::StudyChanged,
            json!({"study": study, "by": who, "changes": changes, "sha256": sha256_hex(text.as_bytes())}),
        ) {
            return e;
        }
        if let Err(e) = self.store.set_study_config(study, &text) {
            tracing::error!(%study, error = %e, "cannot store the changed study");
            return error(Whose::Internal, format!("the change was not stored: {e}"));
        }
        if let Some(rt) = self.studies.get_mut(study) {
            rt.engine.set_config(Arc::new(cfg));
        }
        tracing::info!(%study, by = %who, changes = changes.len(), "study changed");
        let list: Vec<String> = changes.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        AdminResponse::Ok {
            text: format!("changed study {study}: {}", list.join(", ")),
            next: None,
            head: None,
        }
    }

    fn stop(&mut self, who: &str, study: &str, reason: &str) -> AdminResponse {
        let Some(rt) = self.studies.get(study) else {
            return error(Whose::Peer, format!("no study {study:?} is running"));
        };
        if rt.engine.is_finished() {
            return error(Whose::Peer, format!("study {study:?} has already ended"));
        }
        if let Err(e) = self.audit(
            who,
            AuditEvent::StudyStopped,
            json!({"study": study, "by": who, "reason": reason}),
        ) {
            return e;
        }
        let text = format!("stopped by {who}: {reason}");
        // The study stops whatever the store says: fail closed.
        if let Some(rt) = self.studies.get_mut(study) {
            rt.engine.mark_ended(&text);
        }
        self.broadcast.push((
            study.to_string(),
            CoordinatorMessage::StudyEnded {
                study: study.to_string(),
                reason: text.clone(),
            },
        ));
        if let Err(e) = self
            .store
            .set_study_status(study, StudyStatus::Stopped, Some(&text))
        {
            tracing::error!(%study, error = %e, "cannot store the study's stop");
            return error(
                Whose::Internal,
                format!("the study stopped in this process, but the state database did not record the stop ({e}): a restart would resume it; repair the state database and stop the study again"),
            );
        }
        tracing::info!(%study, by = %who, "study stopped");
        AdminResponse::Ok {
            text: format!("stopped study {study}"),
            next: None,
            head: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client: `fedpriv-coordinator admin`

/// Why an admin command failed, and the exit status it gives.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Our own files or arguments (certificate, key, CA, study file). Exit 2.
    #[error("config error: {0}")]
    Config(String),
    /// The coordinator could not be reached, or the connection failed. Exit 4.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The coordinator refused the request for this certificate's role or by policy. Exit 3.
    #[error("refused: {0}")]
    Refused(String),
    /// The coordinator could not do it. Exit 5.
    #[error("{whose}: {reason}")]
    Failed { whose: Whose, reason: String },
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Refused(_) => 3,
            Self::Connect(_) => 4,
            Self::Failed { .. } => 5,
        }
    }
}

/// A successful answer: the payload and, for paged reads, what to ask for next and (for
/// the audit log) the head to stop at (see [`AdminResponse::Ok`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub next: Option<u64>,
    pub head: Option<u64>,
}

/// Dials the coordinator as the holder of `cert`/`key` (PEM), trusting `ca` (PEM).
pub async fn connect(
    server: std::net::SocketAddr,
    server_name: &str,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
    let tls = pki::client_config(ca, cert, key).map_err(|e| ClientError::Config(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(
        TransportLimits::default()
            .transport_config()
            .map_err(ClientError::Config)?,
    ));
    let bind: std::net::SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind)
        .map_err(|e| ClientError::Connect(format!("cannot bind {bind}: {e}")))?;
    endpoint.set_default_client_config(config);
    let connecting = endpoint.connect(server, server_name).map_err(|e| {
        ClientError::Config(format!("cannot dial {server} as {server_name:?}: {e}"))
    })?;
    let conn = tokio::time::timeout(Duration::from_secs(15), connecting)
        .await
        .map_err(|_| ClientError::Connect(format!("no answer from {server} within 15 s")))?
        .map_err(|e| ClientError::Connect(format!("{server}: {}", quic_io::describe_close(&e))))?;
    Ok((endpoint, conn))
}

/// Sends one request on its own stream and gathers the answer.
pub async fn request(conn: &quinn::Connection, req: &AdminRequest) -> Result<Reply, ClientError> {
    let lost = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
    let frame = encode_frame(req).map_err(|e| ClientError::Config(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| lost(&quic_io::describe_close(&e)))?;
    send.write_all(&frame).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))?;
    let mut text = String::new();
    loop {
        let frame: AdminResponse = quic_io::recv_frame(&mut recv).await.map_err(|e| match e {
            // The coordinator closed the connection with its reason (e.g. a site's role).
            quic_io::StreamError::Connection(c) => lost(&quic_io::describe_close(&c)),
            other => lost(&other),
        })?;
        match frame {
            AdminResponse::Part { text: t } => {
                if text.len() + t.len() > MAX_RESPONSE_BYTES {
                    return Err(ClientError::Failed {
                        whose: Whose::Peer,
                        reason: format!("answer is over {MAX_RESPONSE_BYTES} bytes"),
                    });
                }
                text.push_str(&t)
            }
            AdminResponse::Ok {
                text: t,
                next,
                head,
            } => {
                text.push_str(&t);
                return Ok(Reply { text, next, head });
            }
            AdminResponse::Refused { reason } => return Err(ClientError::Refused(reason)),
            AdminResponse::Error { reason, whose } => {
                return Err(ClientError::Failed { whose, reason })
            }
        }
    }
}

/// Fetches audit records from `from_seq` on, page by page, up to `limit` records, and no
/// further than the log's head when the first page was served: each page is itself put
/// on record, so a pager that followed the log's end would never reach it.
pub async fn fetch_audit(
    conn: &quinn::Connection,
    from_seq: u64,
    limit: Option<u64>,
) -> Result<String, ClientError> {
    fetch_audit_in_pages(conn, from_seq, limit, admin::MAX_AUDIT_PAGE).await
}

/// As [`fetch_audit`], asking for at most `page` records per request.
pub async fn fetch_audit_in_pages(
    conn: &quinn::Connection,
    from_seq: u64,
    limit: Option<u64>,
    page: u32,
) -> Result<String, ClientError> {
    let page = u64::from(page.clamp(1, admin::MAX_AUDIT_PAGE));
    let mut out = String::new();
    let mut from = from_seq.max(1);
    let mut got = 0u64;
    let mut stop_at: Option<u64> = None;
    loop {
        let want = limit.map_or(page, |l| l.saturating_sub(got).min(page));
        if want == 0 {
            return Ok(out);
        }
        let reply = request(
            conn,
            &AdminRequest::FetchAudit {
                from_seq: from,
                max: want as u32,
            },
        )
        .await?;
        // A coordinator that gives no head: its log does not grow per page.
        let head = *stop_at.get_or_insert(reply.head.unwrap_or(u64::MAX));
        // Line k of a page holds seq from + k: keep those up to the head.
        let keep = head.saturating_sub(from).saturating_add(1);
        for line in reply
            .text
            .split_inclusive('\n')
            .take(usize::try_from(keep).unwrap_or(usize::MAX))
        {
            out.push_str(line);
            got += 1;
        }
        match reply.next {
            Some(n) if n > from && n <= head => from = n,
            _ => return Ok(out),
        }
    }
}

/// `fedpriv-coordinator admin ...`: how to reach the coordinator, and what to ask.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The coordinator (HOST:PORT).
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// The name in the coordinator's certificate (default: HOST of --server).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// The study CA (PEM).
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// Your certificate (PEM), issued with role operator or auditor.
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// Your private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[command(subcommand)]
    pub cmd: AdminCli,
}

/// What to ask.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCli {
    /// Create a study from its TOML (operator).
    Create {
        #[arg(long, value_name = "FILE")]
        study: PathBuf,
    },
    /// Change an active study (operator): --set rounds=40, round_timeout_secs=N,
    /// min_sites=N (raise only), privacy.epsilon=E (lower only, not below what is spent).
    Change {
        #[arg(long)]
        study: String,
        #[arg(long = "set", value_name = "KEY=VALUE", required = true)]
        set: Vec<String>,
    },
    /// Stop a study now (operator).
    Stop {
        #[arg(long)]
        study: String,
        #[arg(long)]
        reason: String,
    },
    /// Every study with its status and budget, as JSON (operator, auditor).
    List,
    /// A study's privacy ledger (operator, auditor).
    Ledger {
        #[arg(long)]
        study: String,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Audit records, one JSON line each (auditor).
    Audit {
        /// First record (seq) to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many records.
        #[arg(long)]
        max: Option<u64>,
    },
    /// The coordinator's counters, Prometheus text format (operator, auditor).
    Metrics,
}

/// Runs an admin command; returns what to print.
pub fn run_cli(args: &AdminArgs) -> Result<String, ClientError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))
    };
    let (ca, cert, key) = (read(&args.ca)?, read(&args.cert)?, read(&args.key)?);
    let request = match &args.cmd {
        AdminCli::Create { study } => {
            let text = std::fs::read_to_string(study)
                .map_err(|e| ClientError::Config(format!("{}: {e}", study.display())))?;
            // Checked here too, so a bad file is reported as the caller's before dialing.
            StudyConfig::from_toml(&text)
                .map_err(|e| ClientError::Config(format!("{}: {e}", study.display())))?;
            Some(AdminRequest::CreateStudy { config_toml: text })
        }
        AdminCli::Change { study, set } => {
            let mut changes = Vec::new();
            for s in set {
                let (k, v) = s.split_once('=').ok_or_else(|| {
                    ClientError::Config(format!("--set {s:?}: expected KEY=VALUE"))
                })?;
                changes.push((k.trim().to_string(), v.trim().to_string()));
            }
            Some(AdminRequest::ChangeStudy {
                study: study.clone(),
                changes,
            })
        }
        AdminCli::Stop { study, reason } => Some(AdminRequest::StopStudy {
            study: study.clone(),
            reason: reason.clone(),
        }),
        AdminCli::List => Some(AdminRequest::ListStudies),
        AdminCli::Ledger { study, .. } => Some(AdminRequest::ShowLedger {
            study: study.clone(),
        }),
        AdminCli::Audit { .. } => None,
        AdminCli::Metrics => Some(AdminRequest::Metrics),
    };
    if let Some(r) = &request {
        r.check_bounds().map_err(ClientError::Config)?;
    }
    let server = resolve(&args.server)?;
    let server_name = match &args.server_name {
        Some(n) => n.clone(),
        None => host_of(&args.server),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Config(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let (endpoint, conn) = connect(server, &server_name, &ca, &cert, &key).await?;
        let out = match (&args.cmd, request) {
            (AdminCli::Audit { from, max }, _) => fetch_audit(&conn, *from, *max).await,
            (AdminCli::Ledger { json: false, .. }, Some(r)) => {
                let reply = request_text(&conn, &r).await?;
                let v: Value = serde_json::from_str(&reply).map_err(|e| ClientError::Failed {
                    whose: Whose::Internal,
                    reason: format!("ledger is not JSON: {e}"),
                })?;
                Ok(ledger_text(&v))
            }
            (_, Some(r)) => request_text(&conn, &r).await,
            (_, None) => Err(ClientError::Config("nothing to ask".into())),
        };
        quic_io::close(&conn, CloseCode::Normal, "done");
        endpoint.wait_idle().await;
        out
    })
}

async fn request_text(conn: &quinn::Connection, req: &AdminRequest) -> Result<String, ClientError> {
    request(conn, req).await.map(|r| r.text)
}

fn host_of(server: &str) -> String {
    match server.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => server.to_string(),
    }
}

fn resolve(server: &str) -> Result<std::net::SocketAddr, ClientError> {
    use std::net::ToSocketAddrs;
    server
        .to_socket_addrs()
        .map_err(|e| ClientError::Config(format!("--server {server:?}: {e}")))?
        .next()
        .ok_or_else(|| ClientError::Config(format!("--server {server:?} resolves to no address")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn every_request() -> Vec<AdminRequest> {
        vec![
            AdminRequest::CreateStudy {
                config_toml: String::new(),
            },
            AdminRequest::ChangeStudy {
                study: "s".into(),
                changes: vec![("rounds".into(), "3".into())],
            },
            AdminRequest::StopStudy {
                study: "s".into(),
                reason: "r".into(),
            },
            AdminRequest::ListStudies,
            AdminRequest::ShowLedger { study: "s".into() },
            AdminRequest::FetchAudit {
                from_seq: 1,
                max: 10,
            },
            AdminRequest::Metrics,
        ]
    }

    #[test]
    fn the_whole_role_matrix() {
        // (action, operator, auditor, site)
        let expected = [
            ("create_study", true, false, false),
            ("change_study", true, false, false),
            ("stop_study", true, false, false),
            ("list_studies", true, true, false),
            ("show_ledger", true, true, false),
            ("fetch_audit", false, true, false),
            ("metrics", true, true, false),
        ];
        let requests = every_request();
        assert_eq!(
            requests.len(),
            expected.len(),
            "every request kind is in the matrix"
        );
        for (req, (action, op, aud, site)) in requests.iter().zip(expected) {
            assert_eq!(req.action(), action);
            for (role, allowed) in [
                (Role::Operator, op),
                (Role::Auditor, aud),
                (Role::Site, site),
            ] {
                match authorize(role, req) {
                    Ok(()) => assert!(allowed, "{role} may not {action}"),
                    Err(r) => {
                        assert!(!allowed, "{role} must be allowed to {action}");
                        assert_eq!(r.action, action);
                        assert!(r.reason.contains(role.as_str()), "{}", r.reason);
                    }
                }
            }
            // Writes are exactly what only operators may do.
            assert_eq!(req.is_write(), op && !aud, "{action}");
        }
    }

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

    #[test]
    fn server_names_default_to_the_host() {
        assert_eq!(host_of("coord.example.org:7443"), "coord.example.org");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("127.0.0.1:7443"), "127.0.0.1");
    }
}
