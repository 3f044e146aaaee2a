//! One task per connected site: it reads the site's messages (checked against the
//! [`Directory`] the owner publishes), streams each upload chunk by chunk into its spool and
//! on to the owner, and runs a writer that sends, in order, what the owner puts in the
//! site's outbox. Peer errors are the site's: refused, audited within the per-source cap,
//! and the connection goes on for the site's other messages.
//!
//! What it does not do: decide anything about a round (the owner does), or hold a site's
//! update (a chunk at a time, bounded by the upload permits).

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedpriv_common::audit::details::{Refused, UpdateReceived, UpdateRejected};
use fedpriv_common::model::ModelSpec;
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::wire::{CloseCode, TensorHeader};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::refusals::Refusals;
use super::spool::{Spool, SpoolMemory};
use super::studies::Directory;
use super::{Event, Outgoing, OwnerTx};
use crate::audit::AuditHandle;
use crate::limits::{Limits, TokenBucket, UploadAllowance};
use crate::metrics::{self, Metrics};
use crate::round::Input;
use crate::transport::{self, AuthenticatedPeer};

/// Chunks per unit of [`crate::server::Options::max_concurrent_uploads`].
pub const CHUNKS_PER_UPLOAD: usize = 8;

/// Values per upload chunk handed to the aggregator (128 KiB): network packets (about
/// 1.2 kB each) are gathered up to this size so that spooling and folding work in large
/// pieces, while each upload in progress holds little (64 sites: 8 MiB in all).
pub const UPLOAD_CHUNK_VALUES: usize = 1 << 15;

/// How long a site's writer may take to deliver what is left in its outbox once the
/// connection is ending (the last `StudyEnded` before the coordinator exits).
const WRITER_GRACE: Duration = Duration::from_secs(5);

/// What a site's connection task needs.
#[derive(Debug, Clone)]
pub struct SiteCtx {
    pub conn_id: u64,
    pub owner: OwnerTx,
    /// Each study's model and enrolled sites, as the owner last published them.
    pub directory: watch::Receiver<Directory>,
    /// Chunk permits: decoded upload chunks waiting for the aggregator.
    pub uploads: Arc<Semaphore>,
    pub spool_dir: PathBuf,
    /// The memory every upload's spool draws from before it spills to its file.
    pub spool_memory: Arc<SpoolMemory>,
    pub next_upload: Arc<AtomicU64>,
    pub shutdown: watch::Receiver<bool>,
    pub audit: AuditHandle,
    pub metrics: Metrics,
    pub refusals: Refusals,
    pub limits: Arc<Limits>,
    /// Update body bytes this connection's site may still send, per study (granted by
    /// each task the writer sends, charged by each upload).
    pub allowance: Arc<UploadAllowance>,
}

/// Audits (within the per-source cap) a refusal of something `peer` asked for.
pub fn refused(refusals: &Refusals, peer: &AuthenticatedPeer, action: &str, reason: &str) {
    let who = peer.identity.to_string();
    refusals.note(
        &who,
        &Refused::Request {
            identity: who.clone(),
            remote: peer.remote_address().to_string(),
            action: action.to_string(),
            reason: reason.to_string(),
            study: None,
        },
    );
}

/// How a site's connection began.
#[derive(Debug)]
pub enum Opening {
    /// A hello on a unidirectional stream, as the site protocol starts.
    Hello { version: u32, claimed_site: String },
    /// A bidirectional stream: an admin request made with a site's certificate.
    AdminRequest(quinn::SendStream, quinn::RecvStream),
    /// Anything else, or nothing within the time allowed (`why`, for the record).
    NotAHello { why: String },
}

/// Waits (up to `within`) for a site's first stream and reads its hello.
pub async fn opening(peer: &AuthenticatedPeer, within: Duration) -> Opening {
    let conn = peer.conn.clone();
    let first = async {
        let mut recv = tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => recv,
                Err(e) => return Opening::NotAHello { why: e.to_string() },
            },
            bi = conn.accept_bi() => return match bi {
                Ok((send, recv)) => Opening::AdminRequest(send, recv),
                Err(e) => Opening::NotAHello { why: e.to_string() },
            },
        };
        let msg = match transport::recv_frame::<SiteMessage>(&mut recv).await {
            Ok(msg) => msg,
            Err(e) => return Opening::NotAHello { why: e.to_string() },
        };
        if let Err(e) = transport::recv_end(&mut recv).await {
            return Opening::NotAHello { why: e.to_string() };
        }
        match msg {
            SiteMessage::Hello {
                version,
                claimed_site,
            } => Opening::Hello {
                version,
                claimed_site,
            },
            _ => Opening::NotAHello {
                why: "another message".into(),
            },
        }
    };
    tokio::time::timeout(within, first)
        .await
        .unwrap_or_else(|_| Opening::NotAHello {
            why: "no hello in time".into(),
        })
}

/// Serves one authenticated site that said hello, until it disconnects or the coordinator
/// stops.
pub async fn serve(peer: AuthenticatedPeer, version: u32, claimed_site: &str, mut ctx: SiteCtx) {
    if version != PROTOCOL_VERSION {
        refused(
            &ctx.refusals,
            &peer,
            "hello",
            &format!("protocol version {version}"),
        );
        let _ = transport::refuse(
            &peer,
            CloseCode::BadVersion,
            &format!("protocol version {version}, this coordinator speaks {PROTOCOL_VERSION}"),
        );
        return;
    }
    if transport::require_claim(&peer, claimed_site).is_err() {
        refused(&ctx.refusals, &peer, "hello", "claimed another site's name");
        return;
    }
    let site = peer.identity.name.clone();
    let conn = peer.conn.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let connected = Event::Connected {
        site: site.clone(),
        conn_id: ctx.conn_id,
        tx,
    };
    if ctx.owner.send(connected).is_err() {
        return;
    }
    // Writer: sends in order, one stream per message, until the owner drops the outbox.
    let writer_conn = conn.clone();
    let allowance = Arc::clone(&ctx.allowance);
    let bodies_per_task = u64::from(ctx.limits.upload_bodies_per_task);
    let mut writer = tokio::spawn(async move {
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
                // The site shut down (a study's end, say): what was still queued for it
                // is not needed; a normal outcome.
                Err(e) if e.is_orderly_close() => {
                    tracing::debug!(error = %e, "site closed its connection; message not sent");
                    break;
                }
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
                if ctx.owner.send(event).is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(%site, %reason, "message from site refused");
                refused(&ctx.refusals, &peer, "message", &reason);
            }
        }
    }
    let _ = ctx.owner.send(Event::Disconnected {
        site,
        conn_id: ctx.conn_id,
    });
    // What the owner queued before it let go of the outbox (a study's end before the
    // coordinator exits) still goes out, within the grace period.
    if tokio::time::timeout(WRITER_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

/// Reads one message (and its body). Peer errors are returned as text to log; the
/// connection stays up for the site's other messages.
async fn read_site_message(
    site: &str,
    recv: &mut quinn::RecvStream,
    ctx: &SiteCtx,
) -> Result<Option<Event>, String> {
    let msg: SiteMessage = transport::recv_frame(recv)
        .await
        .map_err(|e| e.to_string())?;
    let directory = ctx.directory.borrow().clone();
    let enrolled_in = |study: &str| {
        directory
            .get(study)
            .filter(|entry| entry.is_enrolled(site))
            .ok_or(format!("not enrolled in study {study:?}"))
    };
    let ev = |study: String, input: Input| Ok(Some(Event::Study { study, input }));
    match msg {
        SiteMessage::Hello { .. } => Err("a second hello".into()),
        SiteMessage::Ready { study, records } => {
            transport::recv_end(recv).await.map_err(|e| e.to_string())?;
            enrolled_in(&study)?;
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
            enrolled_in(&study)?;
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
            enrolled_in(&study)?;
            ev(
                study,
                Input::Declined {
                    site: site.to_string(),
                    round,
                    reason,
                },
            )
        }
        SiteMessage::Evaluation {
            study,
            round,
            values,
        } => {
            transport::recv_end(recv).await.map_err(|e| e.to_string())?;
            enrolled_in(&study)?;
            ev(
                study,
                Input::Evaluation {
                    site: site.to_string(),
                    round,
                    values,
                },
            )
        }
        SiteMessage::Update {
            study,
            round,
            header,
        } => {
            let entry = enrolled_in(&study)?;
            let upload = Upload {
                header: &header,
                spec: &entry.spec,
                central: entry.central,
                study: &study,
                site,
                round,
            };
            stream_update(recv, upload, ctx).await?;
            Ok(None)
        }
    }
}

/// The update being received.
struct Upload<'a> {
    header: &'a TensorHeader,
    spec: &'a ModelSpec,
    /// Un-noised clipped delta (central placement): no figure of it may be recorded.
    central: bool,
    study: &'a str,
    site: &'a str,
    round: u64,
}

/// Streams an update body to the aggregator chunk by chunk (sized by our model, never by
/// the peer's claim): each chunk is first written to the upload's spool (so that,
/// should the upload be refused or cut short after part of it was folded, that part can
/// be taken back out), then sent to the owner, holding a chunk permit until it is folded.
/// Memory: the chunks in flight and the spools' shared pool (both bounded), whatever the
/// model size and the number of uploads.
async fn stream_update(
    recv: &mut quinn::RecvStream,
    up: Upload<'_>,
    ctx: &SiteCtx,
) -> Result<(), String> {
    use std::sync::atomic::Ordering;
    let Upload {
        header,
        spec,
        central,
        study,
        site,
        round,
    } = up;
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
                ctx.refusals.note(
                    &format!("site/{site}"),
                    &UpdateRejected {
                        study: study.to_string(),
                        round,
                        site: site.to_string(),
                        reason,
                    },
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
    let spool = Spool::new(&ctx.spool_memory, &ctx.spool_dir, upload);
    let send = |input: Input, spool: Option<(u64, Spool)>, permit: Option<OwnedSemaphorePermit>| {
        ctx.owner
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
        // Spool before the values can be folded: every folded value is kept.
        spool
            .write(&values, *buf_at)
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
            let refused = spool.is_refused();
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
                sq_norm += fedpriv_common::model::sum_squares(v);
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
        if !buf.is_empty() && !spool.is_refused() {
            let permit = Arc::clone(&ctx.uploads)
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            flush(&mut buf, &mut buf_at, permit)?;
        }
        Ok(())
    }
    .await;
    let bytes = header.num_values.saturating_mul(header.dtype.size());
    // Durable before the engine may accept the update into a released aggregate.
    let result = match result {
        Ok(()) if !spool.is_refused() => {
            let record = UpdateReceived {
                study: study.to_string(),
                round,
                site: site.to_string(),
                values: header.num_values,
                bytes,
                dtype: format!("{:?}", header.dtype).to_lowercase(),
                // A central update is an un-noised clipped delta: its norm is a fact about
                // the site's records that no record may carry.
                norm: (!central).then(|| sq_norm.sqrt()),
            };
            ctx.audit
                .record(&format!("site/{site}"), &record)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        other => other,
    };
    if result.is_ok() {
        ctx.metrics
            .add(metrics::UPDATE_BYTES, &[("study", study)], bytes);
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
