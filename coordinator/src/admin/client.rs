//! The admin client: `fedpriv-coordinator admin ...` and the functions tests use to talk
//! to a running coordinator as an operator or auditor. Dials the coordinator's endpoint
//! with the holder's certificate, sends one request per stream and gathers the answer.
//!
//! What it does not do: decide anything (the coordinator authorizes and answers); it only
//! tells the caller's mistakes (exit 2) from refusals (3), connection failures (4) and the
//! coordinator's failures (5).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedpriv_common::admin::{self, AdminRequest, AdminResponse, Whose, MAX_RESPONSE_BYTES};
use fedpriv_common::config::StudyConfig;
use fedpriv_common::pki;
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::wire::{encode_frame, CloseCode};
use serde_json::Value;

use super::serve::ledger_text;

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
            AdminResponse::Bytes { .. } => {
                return Err(ClientError::Failed {
                    whose: Whose::Peer,
                    reason: "binary data in a text answer".into(),
                })
            }
            AdminResponse::Refused { reason } => return Err(ClientError::Refused(reason)),
            AdminResponse::Error { reason, whose } => {
                return Err(ClientError::Failed { whose, reason })
            }
        }
    }
}

/// Exports a model over the admin channel into `out` (0600; written as `out.partial` and
/// renamed once its size and SHA-256 match what the coordinator says it sent). Returns
/// the coordinator's description of the export (JSON: study, round, bytes, sha256).
pub async fn export_model(
    conn: &quinn::Connection,
    study: &str,
    round: Option<u64>,
    out: &Path,
) -> Result<String, ClientError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let lost = |e: &dyn std::fmt::Display| ClientError::Connect(e.to_string());
    let req = AdminRequest::ExportModel {
        study: study.to_string(),
        round,
    };
    req.check_bounds().map_err(ClientError::Config)?;
    if out.exists() {
        return Err(ClientError::Config(format!(
            "{} already exists; an export never overwrites a file",
            out.display()
        )));
    }
    let mut partial_name = out
        .file_name()
        .ok_or_else(|| ClientError::Config(format!("{}: not a file path", out.display())))?
        .to_os_string();
    partial_name.push(".partial");
    let partial = out.with_file_name(partial_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| ClientError::Config(format!("{}: {e}", partial.display())))?;
    let mut w = std::io::BufWriter::new(file);
    let local = |e: std::io::Error| ClientError::Config(format!("{}: {e}", partial.display()));
    let result = async {
        let frame = encode_frame(&req).map_err(|e| ClientError::Config(e.to_string()))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| lost(&quic_io::describe_close(&e)))?;
        send.write_all(&frame).await.map_err(|e| lost(&e))?;
        send.finish().map_err(|e| lost(&e))?;
        let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
        let mut bytes = 0u64;
        loop {
            let frame: AdminResponse =
                quic_io::recv_frame(&mut recv).await.map_err(|e| match e {
                    quic_io::StreamError::Connection(c) => lost(&quic_io::describe_close(&c)),
                    other => lost(&other),
                })?;
            match frame {
                AdminResponse::Bytes { data } => {
                    hash.update(&data);
                    bytes += data.len() as u64;
                    w.write_all(&data).map_err(local)?;
                }
                AdminResponse::Ok { text, .. } => {
                    let said: Value =
                        serde_json::from_str(&text).map_err(|e| ClientError::Failed {
                            whose: Whose::Peer,
                            reason: format!("export description is not JSON: {e}"),
                        })?;
                    let sha = fedpriv_common::digest::hex(hash.finish().as_ref());
                    if said["bytes"].as_u64() != Some(bytes) || said["sha256"] != sha.as_str() {
                        return Err(ClientError::Failed {
                            whose: Whose::Peer,
                            reason: format!(
                                "the model arrived incomplete or altered ({bytes} bytes, sha256 {sha})"
                            ),
                        });
                    }
                    w.flush().map_err(local)?;
                    w.get_ref().sync_all().map_err(local)?;
                    return Ok(text);
                }
                AdminResponse::Part { .. } => {
                    return Err(ClientError::Failed {
                        whose: Whose::Peer,
                        reason: "text in a model export".into(),
                    })
                }
                AdminResponse::Refused { reason } => return Err(ClientError::Refused(reason)),
                AdminResponse::Error { reason, whose } => {
                    return Err(ClientError::Failed { whose, reason })
                }
            }
        }
    }
    .await;
    match result {
        Ok(text) => {
            std::fs::rename(&partial, out).map_err(|e| {
                ClientError::Config(format!("{} -> {}: {e}", partial.display(), out.display()))
            })?;
            Ok(text)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
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
    /// Export a completed round's model (the last one by default) while the coordinator
    /// runs (operator): streamed over this channel, recorded with its digest before it is
    /// sent, refused while the study's release conditions are unmet.
    Export {
        #[arg(long)]
        study: String,
        #[arg(long)]
        round: Option<u64>,
        /// Where to write it (created 0600; must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
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
        AdminCli::Audit { .. } | AdminCli::Export { .. } => None,
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
            (AdminCli::Export { study, round, out }, _) => {
                export_model(&conn, study, *round, out).await
            }
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
    use super::*;

    #[test]
    fn server_names_default_to_the_host() {
        assert_eq!(host_of("coord.example.org:7443"), "coord.example.org");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("127.0.0.1:7443"), "127.0.0.1");
    }
}
