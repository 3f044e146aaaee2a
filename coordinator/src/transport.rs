//! The coordinator's QUIC endpoint: accepting sites, operators and auditors whose identity
//! comes from their certificate (see [`fedpriv_common::pki`]).
//!
//! Thin glue: TLS verification (CA, expiry, CRLs) happens inside rustls during the
//! handshake; [`accept`] then reads the identity from the verified certificate and refuses,
//! with a close code and reason the peer can log, anything that carries none. The shared
//! stream helpers (`send_message`, `recv_frame`, `recv_tensor_body`) live in
//! [`fedpriv_common::quic_io`] and are re-exported here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_common::wire::CloseCode;

use crate::limits::{Admission, IdentitySlots, Limits};

pub use fedpriv_common::quic_io::{
    self, close, describe_close, recv_end, recv_frame, recv_tensor_body, send_message, StreamError,
    TransportLimits,
};

/// A connection whose certificate carried a valid fedpriv identity.
#[derive(Debug, Clone)]
pub struct AuthenticatedPeer {
    pub identity: Identity,
    pub conn: quinn::Connection,
}

impl AuthenticatedPeer {
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }
}

/// A connection attempt that was refused, and why (already logged; the peer was told).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedPeer {
    pub addr: SocketAddr,
    pub reason: String,
}

impl std::fmt::Display for RefusedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused peer {}: {}", self.addr, self.reason)
    }
}

/// The endpoint could not be set up (our configuration's fault).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("config error: TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    #[error("config error: {0}")]
    Limits(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds the coordinator's endpoint. `tls` should come from [`pki::server_config`]
/// (client certificates required, TLS 1.3, fedpriv ALPN). Needs a tokio runtime.
pub fn make_server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(
        limits.transport_config().map_err(EndpointError::Limits)?,
    ));
    // Sites always dial out; nothing here ever migrates, so refuse migration outright.
    config.migration(false);
    quinn::Endpoint::server(config, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// As [`make_server_endpoint`], with a stateless-reset key that survives restarts: after a
/// crash the restarted coordinator can reset the sites' stale connections at once, instead
/// of the sites waiting out their idle timeout before they reconnect.
pub fn make_server_endpoint_with_reset_key(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    limits: &TransportLimits,
    reset_key: &[u8; 32],
) -> Result<quinn::Endpoint, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(
        limits.transport_config().map_err(EndpointError::Limits)?,
    ));
    config.migration(false);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Limits("no async runtime for the QUIC endpoint".into()))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
        .map_err(|source| EndpointError::Bind { addr, source })
}

/// The coordinator's endpoint with every limit of [`Limits`] applied: the QUIC transport
/// settings, and how many connection attempts (and how many of their bytes) quinn queues
/// before the acceptor decides on them, so a flood of Initial packets is bounded in memory
/// before any of our code runs. `reset_key` as in [`make_server_endpoint_with_reset_key`].
pub fn make_coordinator_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    limits: &Limits,
    reset_key: &[u8; 32],
) -> Result<quinn::Endpoint, EndpointError> {
    limits.validate().map_err(EndpointError::Limits)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(
        limits
            .transport
            .transport_config()
            .map_err(EndpointError::Limits)?,
    ));
    config.migration(false);
    // An attempt that waits in the queue holds its first datagrams (one Initial, ~1.2 kB,
    // is all an honest client sends before we answer); 64 KiB each and 16 MiB in all is
    // ample for that and caps what a flood can make quinn hold.
    config
        .max_incoming(limits.incoming_queue)
        .incoming_buffer_size(64 << 10)
        .incoming_buffer_size_total(16 << 20);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
    let endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    let socket =
        std::net::UdpSocket::bind(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Limits("no async runtime for the QUIC endpoint".into()))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime)
        .map_err(|source| EndpointError::Bind { addr, source })
}

/// Asks the peer of a connection attempt to prove its address (a QUIC Retry: stateless,
/// one round trip, answered by the peer's QUIC stack by itself), or refuses the attempt if
/// a Retry is not allowed for it. Neither costs any cryptography or per-connection state.
pub fn retry_or_refuse(incoming: quinn::Incoming) {
    if let Err(e) = incoming.retry() {
        e.into_incoming().refuse();
    }
}

/// As [`accept`], giving up (and dropping the connection, which closes it) if the
/// handshake has not finished within `timeout`: a peer that starts handshakes and stalls
/// must not hold a handshake slot for the whole idle timeout.
pub async fn accept_within(
    incoming: quinn::Incoming,
    timeout: std::time::Duration,
) -> Result<AuthenticatedPeer, RefusedPeer> {
    let addr = incoming.remote_address();
    match tokio::time::timeout(timeout, accept(incoming)).await {
        Ok(result) => result,
        Err(_) => Err(refused(
            addr,
            format!("TLS handshake not finished within {timeout:?}"),
        )),
    }
}

/// Completes the handshake of an incoming connection and reads the peer's identity from its
/// verified certificate. Refusals are logged (warn) with the address and reason, and the
/// peer gets a close code: TLS failures (no certificate, unknown CA, expired, revoked,
/// other protocol version) as the TLS alert, missing or ill-formed identities as
/// [`CloseCode::NotAuthenticated`].
pub async fn accept(incoming: quinn::Incoming) -> Result<AuthenticatedPeer, RefusedPeer> {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            return Err(refused(
                addr,
                format!("TLS handshake failed: {}", describe_close(&e)),
            ))
        }
    };
    if let Err(e) = quic_io::check_negotiated_alpn(&conn) {
        close(&conn, CloseCode::BadVersion, &e.to_string());
        return Err(refused(addr, e.to_string()));
    }
    let Some(leaf) = quic_io::peer_leaf_cert(&conn) else {
        // rustls requires a client certificate, so this is our bug if it ever happens.
        let reason = "no client certificate after the handshake";
        close(&conn, CloseCode::NotAuthenticated, reason);
        return Err(refused(addr, reason.to_owned()));
    };
    match pki::identity_from_cert(&leaf) {
        Ok(identity) => {
            tracing::info!(peer = %addr, %identity, "peer authenticated");
            Ok(AuthenticatedPeer { identity, conn })
        }
        Err(e) => {
            let reason = format!("no valid fedpriv identity: {e}");
            close(&conn, CloseCode::NotAuthenticated, &reason);
            Err(refused(addr, reason))
        }
    }
}

fn refused(addr: SocketAddr, reason: String) -> RefusedPeer {
    tracing::warn!(peer = %addr, %reason, "refused peer");
    RefusedPeer { addr, reason }
}

/// Refuses `peer` unless its certificate grants `role`: closes the connection with
/// [`CloseCode::RoleNotAllowed`] and logs. For a per-request check that keeps the
/// connection, use [`pki::check_role`].
pub fn require_role(peer: &AuthenticatedPeer, role: Role) -> Result<(), RefusedPeer> {
    pki::check_role(&peer.identity, role)
        .map_err(|e| refuse(peer, CloseCode::RoleNotAllowed, &e.to_string()))
}

/// Refuses `peer` if a name it stated in a message (e.g. a hello) is not the one in its
/// certificate: closes the connection with [`CloseCode::IdentityMismatch`] and logs.
pub fn require_claim(peer: &AuthenticatedPeer, claimed: &str) -> Result<(), RefusedPeer> {
    pki::check_claim(&peer.identity, claimed)
        .map_err(|e| refuse(peer, CloseCode::IdentityMismatch, &e.to_string()))
}

/// Closes `peer`'s connection with `code` and `reason`, logs, and returns the refusal.
pub fn refuse(peer: &AuthenticatedPeer, code: CloseCode, reason: &str) -> RefusedPeer {
    close(&peer.conn, code, reason);
    refused(
        peer.remote_address(),
        format!("{}: {reason}", peer.identity),
    )
}

/// The live authenticated connections, per identity: a site holds one (a newer connection
/// replaces the older, which is closed), an operator or auditor at most
/// [`Limits::connections_per_identity`] (more are refused with [`CloseCode::Limit`]).
#[derive(Debug)]
pub struct ConnectionTable {
    per_identity: usize,
    inner: Mutex<(IdentitySlots, HashMap<u64, quinn::Connection>)>,
}

/// A connection's place in the [`ConnectionTable`], given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    table: Arc<ConnectionTable>,
    identity: String,
    conn_id: u64,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.table.inner.lock() {
            inner.0.release(&self.identity, self.conn_id);
            inner.1.remove(&self.conn_id);
        }
    }
}

impl ConnectionTable {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            per_identity: limits.connections_per_identity,
            inner: Mutex::new((IdentitySlots::new(), HashMap::new())),
        })
    }

    /// Admits `peer`'s connection `conn_id`, closing the older connection it replaces, or
    /// refuses it (closed, logged) if its identity holds its maximum.
    pub fn admit(
        self: &Arc<Self>,
        peer: &AuthenticatedPeer,
        conn_id: u64,
    ) -> Result<ConnectionSlot, RefusedPeer> {
        let identity = peer.identity.to_string();
        let site = peer.identity.role == Role::Site;
        let max = if site { 1 } else { self.per_identity };
        let replaced: Vec<quinn::Connection> = {
            let Ok(mut inner) = self.inner.lock() else {
                return Err(refuse(
                    peer,
                    CloseCode::Internal,
                    "internal error: connection table unusable",
                ));
            };
            let replaced = match inner.0.admit(&identity, conn_id, max, site) {
                Admission::Admit => Vec::new(),
                Admission::Replace(old) => old.iter().filter_map(|id| inner.1.remove(id)).collect(),
                Admission::Refuse { held } => {
                    drop(inner);
                    return Err(refuse(
                        peer,
                        CloseCode::Limit,
                        &format!("{identity} already holds {held} connections, the most allowed; close one first"),
                    ));
                }
            };
            inner.1.insert(conn_id, peer.conn.clone());
            replaced
        };
        for old in replaced {
            tracing::info!(peer = %peer.remote_address(), %identity, "newer connection replaces the older one");
            close(
                &old,
                CloseCode::Normal,
                "replaced by a newer connection of the same identity",
            );
        }
        Ok(ConnectionSlot {
            table: Arc::clone(self),
            identity,
            conn_id,
        })
    }

    /// Connections held now (all identities).
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.1.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
