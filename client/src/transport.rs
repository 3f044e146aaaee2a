//! The site's side of the QUIC transport: it always dials out (hospitals expose no inbound
//! port), keeps one connection, and reconnects with exponential backoff and full jitter.
//! Keep-alives every 10 s (see [`TransportLimits::site`]) stop a long local training from
//! letting the idle timeout drop the connection.
//!
//! The stream helpers shared with the coordinator live in [`fedpriv_common::quic_io`] and
//! are re-exported here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub use fedpriv_common::quic_io::{
    self, close, describe_close, recv_end, recv_frame, recv_tensor_body, send_message, StreamError,
    TransportLimits,
};

/// First reconnection delay (before jitter).
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnection delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Why the site could not set up or dial.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("config error: TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    #[error("config error: {0}")]
    Config(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The handshake failed or timed out (network, or the coordinator refused us).
    #[error("cannot connect to {addr}: {}", quic_io::describe_close(.source))]
    Connect {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("shutting down")]
    Shutdown,
}

impl DialError {
    /// Worth retrying later (as opposed to a configuration error or shutdown).
    pub fn is_transient(&self) -> bool {
        matches!(self, DialError::Connect { .. })
    }

    /// Why the connection was refused, when one side refused the other: we did not accept
    /// the coordinator's certificate, or it did not accept ours (TLS alerts), or it closed
    /// the connection with a reason. None for a coordinator that is down or unreachable.
    pub fn refusal(&self) -> Option<String> {
        let DialError::Connect { source, .. } = self else {
            return None;
        };
        // TLS alerts travel as QUIC's CRYPTO_ERROR codes 0x100-0x1ff.
        let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
        match source {
            quinn::ConnectionError::TransportError(e) if crypto(e.code) => {
                Some(format!("we refused the coordinator: {e}"))
            }
            quinn::ConnectionError::ConnectionClosed(c) if crypto(c.error_code) => {
                Some(format!("the coordinator refused us: {c}"))
            }
            quinn::ConnectionError::ApplicationClosed(_) => Some(format!(
                "the coordinator refused us: {}",
                quic_io::describe_close(source)
            )),
            _ => None,
        }
    }
}

/// The local address to bind for dialing `server`: any port, same address family.
pub fn bind_addr_for(server: SocketAddr) -> SocketAddr {
    let ip = match server.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// A client-only endpoint bound to `bind` that dials with `tls` (from
/// [`fedpriv_common::pki::client_config`]). Needs a tokio runtime.
pub fn client_endpoint(
    tls: rustls::ClientConfig,
    bind: SocketAddr,
    limits: &TransportLimits,
) -> Result<quinn::Endpoint, DialError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| DialError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(
        limits.transport_config().map_err(DialError::Config)?,
    ));
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|source| DialError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Dials the coordinator once. `server_name` is the DNS name (or IP) in its certificate.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    server_addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, DialError> {
    let connecting = endpoint.connect(server_addr, server_name).map_err(|e| {
        DialError::Config(format!("cannot dial {server_addr} as {server_name:?}: {e}"))
    })?;
    connecting.await.map_err(|source| DialError::Connect {
        addr: server_addr,
        source,
    })
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(max, min_delay * 2^n)]`, so many sites that lost the coordinator at once do not
/// all come back in the same instant.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_MIN, BACKOFF_MAX)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
            rng: seed(),
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The next delay to wait, and one step up the ladder.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(self.unit())
    }

    /// Back to the first step (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Uniform in [0, 1) from a splitmix64 step: jitter needs spread, not secrecy.
    fn unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A per-process random seed from std's randomly keyed hasher (no extra dependency).
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Dials until connected, waiting [`Backoff`] delays between attempts and logging each
/// failure. Returns [`DialError::Shutdown`] as soon as `shutdown` turns true (or its sender
/// is dropped), even mid-handshake or mid-wait, and a configuration error at once (no
/// retry can fix it).
pub async fn connect_with_backoff(
    endpoint: &quinn::Endpoint,
    server_addr: SocketAddr,
    server_name: &str,
    backoff: &mut Backoff,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<quinn::Connection, DialError> {
    connect_with_backoff_reporting(
        endpoint,
        server_addr,
        server_name,
        backoff,
        shutdown,
        &mut |_| {},
    )
    .await
}

/// [`connect_with_backoff`], telling `on_failure` of every failed attempt that will be
/// retried (the daemon audits refusals).
pub async fn connect_with_backoff_reporting(
    endpoint: &quinn::Endpoint,
    server_addr: SocketAddr,
    server_name: &str,
    backoff: &mut Backoff,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    on_failure: &mut (dyn FnMut(&DialError) + Send),
) -> Result<quinn::Connection, DialError> {
    loop {
        if *shutdown.borrow_and_update() {
            return Err(DialError::Shutdown);
        }
        let attempt = tokio::select! {
            r = connect(endpoint, server_addr, server_name) => r,
            _ = wait_shutdown(shutdown) => return Err(DialError::Shutdown),
        };
        match attempt {
            Ok(conn) => {
                backoff.reset();
                tracing::info!(server = %server_addr, "connected to the coordinator");
                return Ok(conn);
            }
            Err(e) if e.is_transient() => {
                on_failure(&e);
                let delay = backoff.next_delay();
                tracing::warn!(server = %server_addr, error = %e, retry_in = ?delay, "connection failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = wait_shutdown(shutdown) => return Err(DialError::Shutdown),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Resolves when shutdown is requested or nobody can request it any more.
async fn wait_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone: treat it as shutdown rather than spin.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let mut b = Backoff::default();
        let ceilings: Vec<Duration> = (0..12)
            .map(|_| {
                let c = b.ceiling();
                let d = b.next_delay();
                assert!(d <= c, "{d:?} > {c:?}");
                c
            })
            .collect();
        assert_eq!(ceilings[0], Duration::from_millis(200));
        assert_eq!(ceilings[1], Duration::from_millis(400));
        assert_eq!(ceilings[7], Duration::from_millis(25_600));
        assert_eq!(ceilings[8], BACKOFF_MAX);
        assert_eq!(ceilings[11], BACKOFF_MAX);
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), BACKOFF_MAX);
        // Full jitter: delays spread over the whole range.
        let delays: Vec<f64> = (0..1000).map(|_| b.next_delay().as_secs_f64()).collect();
        let min = delays.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = delays.iter().cloned().fold(0.0, f64::max);
        assert!(min < 3.0 && max > 27.0, "{min} {max}");
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_MIN);
    }

    #[test]
    fn bind_address_family_follows_server() {
        let v4: SocketAddr = "10.0.0.1:4433".parse().expect("addr");
        let v6: SocketAddr = "[::1]:4433".parse().expect("addr");
        assert!(bind_addr_for(v4).is_ipv4());
        assert!(bind_addr_for(v6).is_ipv6());
        assert_eq!(bind_addr_for(v4).port(), 0);
    }

    #[tokio::test]
    async fn backoff_stops_promptly_on_shutdown() {
        let ca = fedpriv_common::pki::generate_ca("ca", 1).expect("ca");
        let id =
            fedpriv_common::pki::Identity::new(fedpriv_common::pki::Role::Site, "a").expect("id");
        let leaf = fedpriv_common::pki::issue_identity_cert(&ca, &id, 1).expect("leaf");
        let tls = fedpriv_common::pki::client_config(
            ca.cert_pem.as_bytes(),
            leaf.cert_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
        )
        .expect("tls");
        let mut limits = TransportLimits::site();
        limits.idle_timeout = Duration::from_secs(30);
        let ep =
            client_endpoint(tls, "127.0.0.1:0".parse().expect("addr"), &limits).expect("endpoint");
        // Nobody listens on this port: every attempt times out or fails.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = dead.local_addr().expect("addr");
        drop(dead);
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let started = std::time::Instant::now();
        let task = tokio::spawn(async move {
            let mut b = Backoff::default();
            connect_with_backoff(&ep, addr, "localhost", &mut b, &mut rx).await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send(true).expect("send");
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops promptly")
            .expect("joins");
        assert!(matches!(r, Err(DialError::Shutdown)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
