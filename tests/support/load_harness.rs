//! The load scenario shared by `tests/load.rs` (assertions, debug build) and
//! `examples/load.rs` (figures, release build): a real coordinator in this process, real
//! QUIC on loopback, real certificates; N sites take part in one round while, at the same
//! time, hostile peers start handshakes with bad certificates and send malformed messages.
//!
//! Every peer binds its own loopback address (Linux routes all of 127.0.0.0/8 to `lo`), as
//! hospitals and attackers would come from their own addresses: the coordinator's
//! per-source handshake limit then throttles the flooders without touching the sites.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fedpriv_client::transport::client_endpoint;
use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::model::{Architecture, ModelSpec, TensorSpec};
use fedpriv_common::pki::{self, CaBundle, Identity, Role, Validity};
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::wire::{self, Dtype, TensorHeader};
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::server::{self, Notification, Options};
use fedpriv_coordinator::store::Store;
use rustls::pki_types::pem::PemObject;

#[path = "test_pki.rs"]
mod test_pki;
use fedpriv_common::test_util::StudyBuilder as Study;

pub const STUDY: &str = "load";
const FEATURES: usize = 8;
/// Sources (loopback addresses) the bad handshakes come from, and the attackers with
/// valid certificates that send malformed messages.
const FLOOD_SOURCES: u8 = 10;
const ATTACKERS: u8 = 10;

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub sites: usize,
    pub bad_handshakes: usize,
    pub malformed: usize,
}

/// What a valid site does in the round. Under a flood, some sites also send what a
/// faulty or malicious site would (each rejected by the coordinator, none may break the
/// round); without one, every site is plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Plain,
    NanFirst,
    InfFirst,
    OutOfRoundFirst,
    WrongShapeFirst,
    ReplayAfter,
}

impl Behaviour {
    fn of(i: usize, flood: bool) -> Self {
        if !flood {
            return Behaviour::Plain;
        }
        match i % 10 {
            0 => Behaviour::NanFirst,
            1 => Behaviour::InfFirst,
            2 => Behaviour::OutOfRoundFirst,
            3 => Behaviour::WrongShapeFirst,
            4 => Behaviour::ReplayAfter,
            _ => Behaviour::Plain,
        }
    }
}

/// How the bad handshakes ended, as their peers saw it.
#[derive(Debug, Default)]
pub struct HandshakeOutcomes {
    /// Refused before any cryptography (QUIC CONNECTION_REFUSED).
    pub refused_early: AtomicUsize,
    /// Failed in or right after the TLS handshake (the certificate was refused).
    pub failed_tls: AtomicUsize,
    /// No answer in time.
    pub timed_out: AtomicUsize,
    /// Handshake finished on the client's side, and no close seen within 3 s. TLS 1.3
    /// lets a client finish before the server has checked its certificate; the server's
    /// close can then be lost (a burst overflowing a socket buffer) and the client, sending
    /// nothing more, never hears it. Whether the coordinator served any of these is
    /// answered from its audit log ([`Outcome::accepted`]), not from here.
    pub unconfirmed: AtomicUsize,
}

#[derive(Debug)]
pub struct Outcome {
    /// From the first connection attempt to the round's completion.
    pub round_ms: u128,
    /// From the first connection attempt to the last hostile peer's end.
    pub flood_ms: u128,
    pub contributors: Vec<String>,
    pub epsilon: f64,
    /// Connection attempts the valid sites needed (one each when nothing refused them).
    pub site_attempts: usize,
    pub handshakes: Arc<HandshakeOutcomes>,
    /// Malformed messages sent (by attackers and by faulty sites).
    pub malformed_sent: usize,
    /// kB, from /proc/self/status: resident set before the coordinator started, and the
    /// process's peak (coordinator and every simulated peer together).
    pub rss_before_kb: u64,
    pub rss_peak_kb: u64,
    /// Audit records by event, and whether the chain verified.
    pub audit_events: BTreeMap<String, usize>,
    pub audit_verified: bool,
    pub rejected_reasons: Vec<String>,
    /// `connection_accepted` records by identity.
    pub accepted: BTreeMap<String, usize>,
    /// Sum of a counter's samples in the coordinator's metrics.prom.
    pub connections_refused: u64,
    pub audit_suppressed: u64,
    pub ledger_rows: usize,
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn site_name(i: usize) -> String {
    format!("site-{i:03}")
}

fn spec() -> ModelSpec {
    arch::model_spec(&Architecture::LogisticRegression, FEATURES, 1).expect("spec")
}

fn update(d: usize, salt: usize) -> Vec<f32> {
    (0..d)
        .map(|i| ((i * 31 + salt * 7) % 17) as f32 / 4096.0)
        .collect()
}

struct Pki {
    ca: CaBundle,
}

impl Pki {
    fn site_tls(&self, name: &str) -> rustls::ClientConfig {
        test_pki::site_tls(&self.ca, name)
    }

    /// The three kinds of bad client: no certificate, another CA's, an expired one.
    fn bad_tls(&self) -> Vec<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(
                rustls::pki_types::CertificateDer::from_pem_slice(self.ca.cert_pem.as_bytes())
                    .expect("ca pem"),
            )
            .expect("root");
        let mut anon = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls13")
            .with_root_certificates(roots)
            .with_no_client_auth();
        anon.alpn_protocols = vec![wire::ALPN.to_vec()];
        let other = pki::generate_ca("an attacker's CA", 1).expect("ca");
        let id = Identity::new(Role::Site, "site-000").expect("id");
        let foreign = pki::issue_identity_cert(&other, &id, 1).expect("cert");
        let foreign = pki::client_config(
            self.ca.cert_pem.as_bytes(),
            foreign.cert_pem.as_bytes(),
            foreign.key_pem.as_bytes(),
        )
        .expect("tls");
        let day = Duration::from_secs(86_400);
        let expired = pki::issue_identity_cert_with_validity(
            &self.ca,
            &id,
            Validity {
                not_before: SystemTime::now() - 10 * day,
                not_after: SystemTime::now() - day,
            },
        )
        .expect("cert");
        let expired = pki::client_config(
            self.ca.cert_pem.as_bytes(),
            expired.cert_pem.as_bytes(),
            expired.key_pem.as_bytes(),
        )
        .expect("tls");
        vec![anon, foreign, expired]
    }
}

fn endpoint_on(ip: Ipv4Addr, tls: rustls::ClientConfig) -> quinn::Endpoint {
    client_endpoint(tls, SocketAddr::from((ip, 0)), &TransportLimits::site()).expect("endpoint")
}

/// Dials until the coordinator lets us in (a flood may have it refuse us for a moment).
async fn dial(ep: &quinn::Endpoint, addr: SocketAddr) -> (quinn::Connection, usize) {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match ep.connect(addr, "localhost").expect("connect").await {
            Ok(conn) => return (conn, attempts),
            Err(e) if attempts < 200 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50 + (attempts as u64 % 7) * 20)).await;
            }
            Err(e) => panic!("could not connect after {attempts} attempts: {e}"),
        }
    }
}

async fn send_update(
    conn: &quinn::Connection,
    round: u64,
    header: &TensorHeader,
    values: &[f32],
) -> Result<(), quic_io::StreamError> {
    let msg = SiteMessage::Update {
        study: STUDY.into(),
        round,
        header: header.clone(),
    };
    quic_io::send_message(conn, &msg, Some(values)).await
}

/// A valid site: hello, ready, then answers its task (after its faulty message, if any).
/// Plain sites wait for `go` before answering, so that every faulty message reaches the
/// coordinator while the round is still collecting (a replay after the round closed would
/// be refused for that reason, not as a replay).
#[allow(clippy::too_many_arguments)]
async fn valid_site(
    addr: SocketAddr,
    ip: Ipv4Addr,
    tls: rustls::ClientConfig,
    name: String,
    salt: usize,
    behaviour: Behaviour,
    faulty_done: Arc<AtomicUsize>,
    faulty_total: usize,
) -> usize {
    let ep = endpoint_on(ip, tls);
    let (conn, attempts) = dial(&ep, addr).await;
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: name,
    };
    quic_io::send_message(&conn, &hello, None)
        .await
        .expect("hello");
    let spec = spec();
    let d = spec.num_values();
    let mut answered = false;
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(r) => r,
            // The coordinator exits once its study ends; only then may it go away.
            Err(_) if answered => break,
            Err(e) => panic!("coordinator stream: {e}"),
        };
        let msg: CoordinatorMessage = quic_io::recv_frame(&mut recv).await.expect("frame");
        match msg {
            CoordinatorMessage::Welcome { studies, .. } => {
                for ann in studies {
                    let ready = SiteMessage::Ready {
                        study: ann.study,
                        records: 100,
                    };
                    quic_io::send_message(&conn, &ready, None)
                        .await
                        .expect("ready");
                }
            }
            CoordinatorMessage::Task(task) => {
                quic_io::recv_tensor_body(&mut recv, &task.header, &spec, |_, _| {})
                    .await
                    .expect("model");
                let good = update(d, salt);
                let header = task.header.clone();
                // Each faulty message is answered (read to its end, or its stream
                // stopped) before the site goes on; errors are the expected refusals.
                match behaviour {
                    Behaviour::Plain => {
                        while faulty_done.load(Ordering::SeqCst) < faulty_total {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Behaviour::NanFirst | Behaviour::InfFirst => {
                        let mut bad = good.clone();
                        bad[d / 2] = if behaviour == Behaviour::NanFirst {
                            f32::NAN
                        } else {
                            f32::INFINITY
                        };
                        let _ = send_update(&conn, task.round, &header, &bad).await;
                    }
                    Behaviour::OutOfRoundFirst => {
                        let _ = send_update(&conn, task.round + 5, &header, &good).await;
                    }
                    Behaviour::WrongShapeFirst => {
                        let mut tensors = header.tensors.clone();
                        tensors[0] = TensorSpec::new(&tensors[0].name, &[FEATURES as u64 + 1, 1]);
                        let wrong = TensorHeader {
                            tensors,
                            dtype: Dtype::F32,
                            num_values: d as u64 + 1,
                        };
                        let _ = send_update(&conn, task.round, &wrong, &update(d + 1, salt)).await;
                    }
                    Behaviour::ReplayAfter => {}
                }
                send_update(&conn, task.round, &header, &good)
                    .await
                    .expect("update");
                if behaviour == Behaviour::ReplayAfter {
                    let _ = send_update(&conn, task.round, &header, &good).await;
                }
                if behaviour != Behaviour::Plain {
                    faulty_done.fetch_add(1, Ordering::SeqCst);
                }
                answered = true;
            }
            CoordinatorMessage::StudyEnded { .. } | CoordinatorMessage::Refused { .. } => break,
            // Announcements of studies added later: not this scenario's.
            _ => {}
        }
    }
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
    attempts
}

/// `n` handshakes from `ip`, cycling through the bad client configurations.
async fn bad_handshakes(
    addr: SocketAddr,
    ip: Ipv4Addr,
    configs: Arc<Vec<quinn::ClientConfig>>,
    n: usize,
    out: Arc<HandshakeOutcomes>,
) {
    let ep = quinn::Endpoint::client(SocketAddr::from((ip, 0))).expect("endpoint");
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..n {
        let config = configs[k % configs.len()].clone();
        let ep = ep.clone();
        let out = Arc::clone(&out);
        tasks.spawn(async move {
            let connecting = ep.connect_with(config, addr, "localhost").expect("connect");
            match tokio::time::timeout(Duration::from_secs(10), connecting).await {
                Err(_) => out.timed_out.fetch_add(1, Ordering::Relaxed),
                Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    out.refused_early.fetch_add(1, Ordering::Relaxed)
                }
                Ok(Err(_)) => out.failed_tls.fetch_add(1, Ordering::Relaxed),
                // TLS 1.3: the client may finish before the server has checked its
                // certificate; the server then closes the connection.
                Ok(Ok(conn)) => {
                    match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
                        Ok(_) => out.failed_tls.fetch_add(1, Ordering::Relaxed),
                        Err(_) => out.unconfirmed.fetch_add(1, Ordering::Relaxed),
                    }
                }
            };
        });
    }
    while tasks.join_next().await.is_some() {}
    ep.close(0u32.into(), b"");
}

/// A peer with a valid, unenrolled site certificate that sends `n` malformed messages.
async fn attacker(
    addr: SocketAddr,
    ip: Ipv4Addr,
    tls: rustls::ClientConfig,
    name: String,
    n: usize,
) {
    let ep = endpoint_on(ip, tls);
    let (conn, _) = dial(&ep, addr).await;
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: name.clone(),
    };
    let _ = quic_io::send_message(&conn, &hello, None).await;
    let spec = spec();
    let header = TensorHeader::for_spec(&spec, Dtype::F32);
    let body = update(spec.num_values(), 3);
    for k in 0..n {
        let raw = |bytes: Vec<u8>| {
            let conn = conn.clone();
            async move {
                let Ok(mut s) = conn.open_uni().await else {
                    return;
                };
                let _ = s.write_all(&bytes).await;
                let _ = s.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), s.stopped()).await;
            }
        };
        match k % 7 {
            // Garbage where a frame should be.
            0 => raw([&[0, 0, 0, 24][..], &[0xfe; 24]].concat()).await,
            // A length prefix far over the frame cap.
            1 => raw([&[0xff, 0xff, 0xff, 0x7f][..], &[0u8; 16]].concat()).await,
            // A frame cut short.
            2 => raw([&[0, 0, 1, 0][..], &[1u8; 10]].concat()).await,
            // An update for a study that does not exist.
            3 => {
                let msg = SiteMessage::Update {
                    study: "no-such-study".into(),
                    round: 1,
                    header: header.clone(),
                };
                let _ = quic_io::send_message(&conn, &msg, Some(&body)).await;
            }
            // An update for the study, from a site not enrolled in it.
            4 => {
                let _ = send_update(&conn, 1, &header, &body).await;
            }
            5 => {
                let _ = quic_io::send_message(&conn, &hello, None).await;
            }
            _ => {
                let ready = SiteMessage::Ready {
                    study: STUDY.into(),
                    records: 100,
                };
                let _ = quic_io::send_message(&conn, &ready, None).await;
            }
        }
    }
    conn.close(0u32.into(), b"done");
    ep.wait_idle().await;
}

/// Runs one scenario to the end of its round and the coordinator's exit.
pub async fn run(scenario: Scenario) -> Outcome {
    // RUST_LOG=info shows the coordinator's side.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = test_pki::ca("load CA");
    let server_tls = test_pki::server_tls(&ca);
    let pki = Pki { ca };
    let flood = scenario.bad_handshakes > 0 || scenario.malformed > 0;
    let site_tls: Vec<rustls::ClientConfig> = (0..scenario.sites)
        .map(|i| pki.site_tls(&site_name(i)))
        .collect();
    let bad: Arc<Vec<quinn::ClientConfig>> = Arc::new(
        pki.bad_tls()
            .into_iter()
            .map(|tls| {
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
                    .expect("quic tls");
                quinn::ClientConfig::new(Arc::new(crypto))
            })
            .collect(),
    );
    let text = Study::new(STUDY)
        .features(FEATURES)
        .min_sites(scenario.sites)
        .enrolled((0..scenario.sites).map(site_name))
        .toml();
    let cfg = StudyConfig::from_toml(&text).expect("study");
    // Port 0: the coordinator says which port it bound.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let state = dir.path().join("state");
    let opts = Options {
        listen: addr,
        state_dir: state.clone(),
        tls: server_tls,
        studies: vec![(cfg, text)],
        max_concurrent_uploads: 8,
        at_rest_key: Arc::new(
            fedpriv_common::seal::SealKey::from_material(
                fedpriv_common::seal::generate_key_hex()
                    .expect("random key")
                    .as_bytes(),
            )
            .expect("key"),
        ),
    };
    let rss_before_kb = proc_status_kb("VmRSS:");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel();
    // Defaults, but for the idle timeout: after a flood, the coordinator's shutdown waits
    // for handshakes the flood left half-done to time out (`Endpoint::wait_idle`); 15 s
    // (sites send keep-alives every 10 s) keeps the test's shutdown short.
    let limits = Limits {
        transport: TransportLimits {
            idle_timeout: Duration::from_secs(15),
            ..TransportLimits::default()
        },
        ..Limits::default()
    };
    let running = server::start(opts, limits, stop_rx, Some(note_tx), false)
        .await
        .expect("coordinator starts");
    let addr = running.addr;
    let coordinator = tokio::spawn(running.finished());

    let started = Instant::now();
    let outcomes = Arc::new(HandshakeOutcomes::default());
    let mut hostile = tokio::task::JoinSet::new();
    let participants_faulty = (0..scenario.sites)
        .filter(|&i| Behaviour::of(i, flood) != Behaviour::Plain)
        .count();
    let attacker_messages = scenario.malformed.saturating_sub(participants_faulty);
    for s in 0..FLOOD_SOURCES {
        let n = scenario.bad_handshakes / usize::from(FLOOD_SOURCES)
            + usize::from(usize::from(s) < scenario.bad_handshakes % usize::from(FLOOD_SOURCES));
        if n > 0 {
            let ip = Ipv4Addr::new(127, 0, 3, s + 1);
            hostile.spawn(bad_handshakes(
                addr,
                ip,
                Arc::clone(&bad),
                n,
                Arc::clone(&outcomes),
            ));
        }
    }
    for a in 0..ATTACKERS {
        let n = attacker_messages / usize::from(ATTACKERS)
            + usize::from(usize::from(a) < attacker_messages % usize::from(ATTACKERS));
        if n > 0 {
            let name = format!("mallory-{a}");
            let tls = pki.site_tls(&name);
            hostile.spawn(attacker(
                addr,
                Ipv4Addr::new(127, 0, 4, a + 1),
                tls,
                name,
                n,
            ));
        }
    }
    let faulty_done = Arc::new(AtomicUsize::new(0));
    let mut sites = tokio::task::JoinSet::new();
    for (i, tls) in site_tls.into_iter().enumerate() {
        let ip = Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, (i % 250) as u8 + 1);
        sites.spawn(valid_site(
            addr,
            ip,
            tls,
            site_name(i),
            i,
            Behaviour::of(i, flood),
            Arc::clone(&faulty_done),
            participants_faulty,
        ));
    }

    let (contributors, epsilon) = loop {
        match tokio::time::timeout(Duration::from_secs(120), note_rx.recv()).await {
            Ok(Some(Notification::RoundCompleted {
                contributors,
                epsilon,
                ..
            })) => break (contributors, epsilon),
            Ok(Some(Notification::RoundAborted { reason, .. })) => {
                panic!("round aborted: {reason}")
            }
            Ok(Some(_)) => {}
            other => panic!("no round completed: {other:?}"),
        }
    };
    let round_ms = started.elapsed().as_millis();
    let mut site_attempts = 0;
    while let Some(res) = sites.join_next().await {
        site_attempts += res.expect("site task");
    }

    // The flood is served to its end before the coordinator stops.
    while let Some(res) = tokio::time::timeout(Duration::from_secs(60), hostile.join_next())
        .await
        .expect("hostile peers finish")
    {
        res.expect("hostile task");
    }
    let flood_ms = started.elapsed().as_millis();

    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(60), coordinator)
        .await
        .expect("coordinator stops")
        .expect("coordinator task")
        .expect("coordinator run");
    let rss_peak_kb = proc_status_kb("VmHWM:");

    let log = state.join("audit.log");
    let audit_verified = fedpriv_common::audit_file::verify_file(&log)
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let mut audit_events = BTreeMap::new();
    let mut rejected_reasons = Vec::new();
    let mut accepted = BTreeMap::new();
    for line in std::fs::read_to_string(&log).expect("audit log").lines() {
        let rec: serde_json::Value = serde_json::from_str(line).expect("audit record");
        let event = rec["event"].as_str().unwrap_or("?").to_string();
        if event == "update_rejected" {
            rejected_reasons.push(rec["details"]["reason"].as_str().unwrap_or("").to_string());
        }
        if event == "connection_accepted" {
            let who = rec["details"]["identity"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            *accepted.entry(who).or_insert(0) += 1;
        }
        *audit_events.entry(event).or_insert(0) += 1;
    }
    let prom = std::fs::read_to_string(state.join("metrics.prom")).unwrap_or_default();
    let counter = |name: &str| -> u64 {
        prom.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    };
    let store = Store::open_read_only(state.join("coordinator.db")).expect("store");
    let ledger_rows = store.ledger(STUDY).expect("ledger").len();
    Outcome {
        round_ms,
        flood_ms,
        contributors,
        epsilon,
        site_attempts,
        handshakes: outcomes,
        malformed_sent: participants_faulty + attacker_messages,
        rss_before_kb,
        rss_peak_kb,
        audit_events,
        audit_verified,
        rejected_reasons,
        accepted,
        connections_refused: counter("fedpriv_connections_refused_total"),
        audit_suppressed: counter("fedpriv_audit_records_suppressed_total"),
        ledger_rows,
    }
}

impl Outcome {
    pub fn to_json(&self, scenario: &Scenario) -> serde_json::Value {
        let h = &self.handshakes;
        serde_json::json!({
            "sites": scenario.sites,
            "bad_handshakes": scenario.bad_handshakes,
            "malformed_messages": self.malformed_sent,
            "round_ms": self.round_ms as u64,
            "flood_ms": self.flood_ms as u64,
            "contributors": self.contributors.len(),
            "epsilon": self.epsilon,
            "site_connect_attempts": self.site_attempts,
            "bad_handshakes_refused_early": h.refused_early.load(Ordering::Relaxed),
            "bad_handshakes_failed_tls": h.failed_tls.load(Ordering::Relaxed),
            "bad_handshakes_timed_out": h.timed_out.load(Ordering::Relaxed),
            "bad_handshakes_unconfirmed": h.unconfirmed.load(Ordering::Relaxed),
            "connections_refused_counted": self.connections_refused,
            "audit_records": self.audit_events.values().sum::<usize>(),
            "audit_connection_refused": self.audit_events.get("connection_refused").copied().unwrap_or(0),
            "audit_refused": self.audit_events.get("refused").copied().unwrap_or(0),
            "audit_update_rejected": self.audit_events.get("update_rejected").copied().unwrap_or(0),
            "audit_records_suppressed": self.audit_suppressed,
            "audit_verified": self.audit_verified,
            "identities_accepted": self.accepted.len(),
            "update_rejections_audited": self.rejected_reasons.len(),
            "rss_before_kb": self.rss_before_kb,
            "rss_peak_kb": self.rss_peak_kb,
            "ledger_rows": self.ledger_rows,
        })
    }
}
