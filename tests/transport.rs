//! The transport over real loopback QUIC with real certificates made by `pki` commands in a
//! temporary directory: who gets in, who is refused (and that a refusal leaves other
//! connected sites working), and how hostile bytes are rejected.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use fedpriv_client::transport::{
    bind_addr_for, client_endpoint, connect, connect_with_backoff, Backoff, DialError,
};
use fedpriv_common::model::{ModelSpec, TensorSpec};
use fedpriv_common::pki::{self, Identity, Role, Validity};
use fedpriv_common::wire::{self, CloseCode, Dtype, TensorHeader, MAX_CONTROL_FRAME};
use fedpriv_coordinator::pki_cli::{self, PkiCommand};
use fedpriv_coordinator::transport::{
    accept, describe_close, make_server_endpoint, recv_end, recv_frame, recv_tensor_body,
    require_claim, require_role, send_message, RefusedPeer, StreamError, TransportLimits,
};
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[path = "support/pki_files.rs"]
mod pki_files;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { name: String },
    Ping(u32),
    Pong(u32),
    Update { round: u64, header: TensorHeader },
    Ack { values: u64, sum: f64 },
    Rejected(String),
}

#[derive(Debug)]
enum Event {
    Accepted(Identity),
    Refused(RefusedPeer),
    Rejected(String),
}

fn spec() -> ModelSpec {
    ModelSpec::new(vec![
        TensorSpec::new("w", &[64, 32]),
        TensorSpec::new("b", &[32]),
    ])
    .unwrap()
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
}

// ---------------------------------------------------------------------------------------
// PKI fixture: files written by the `pki` commands.

struct Pki {
    _dir: tempfile::TempDir,
    root: PathBuf,
    ca_dir: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let ca_dir = root.join("ca");
        pki_files::init(&ca_dir, "test study CA");
        Self {
            _dir: dir,
            root,
            ca_dir,
        }
    }

    fn issue(&self, role: Role, name: &str) -> (PathBuf, PathBuf) {
        pki_files::issue(&self.root, role, name)
    }

    fn ca_pem(&self) -> Vec<u8> {
        read(&self.ca_dir.join(pki_cli::CA_CERT))
    }

    fn server_tls(&self, crls: &[Vec<u8>]) -> rustls::ServerConfig {
        pki_files::server_tls(&self.root, crls)
    }

    fn client_tls(&self, cert: &Path, key: &Path) -> rustls::ClientConfig {
        pki::client_config(&self.ca_pem(), &read(cert), &read(key)).unwrap()
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

// ---------------------------------------------------------------------------------------
// A small coordinator: accepts, checks the role, then answers messages one at a time.

struct Server {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    _endpoint: quinn::Endpoint,
}

impl Server {
    fn start(tls: rustls::ServerConfig, role: Role, limits: TransportLimits) -> Self {
        let endpoint = make_server_endpoint("127.0.0.1:0".parse().unwrap(), tls, &limits).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(serve(incoming, role, tx.clone()));
            }
        });
        Self {
            addr,
            events,
            _endpoint: endpoint,
        }
    }

    async fn next_event(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("server event in time")
            .expect("server running")
    }

    async fn expect_rejected(&mut self) -> String {
        match self.next_event().await {
            Event::Rejected(r) => r,
            other => panic!("expected a rejected message, got {other:?}"),
        }
    }

    async fn expect_refused(&mut self) -> RefusedPeer {
        match self.next_event().await {
            Event::Refused(r) => r,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

async fn serve(incoming: quinn::Incoming, role: Role, events: mpsc::UnboundedSender<Event>) {
    let peer = match accept(incoming).await {
        Ok(p) => p,
        Err(r) => {
            let _ = events.send(Event::Refused(r));
            return;
        }
    };
    if let Err(r) = require_role(&peer, role) {
        let _ = events.send(Event::Refused(r));
        return;
    }
    let _ = events.send(Event::Accepted(peer.identity.clone()));
    let spec = spec();
    while let Ok(mut recv) = peer.conn.accept_uni().await {
        let reply = match recv_frame::<Msg>(&mut recv).await {
            Err(e) => Err(e),
            Ok(Msg::Hello { name }) => {
                if let Err(r) = require_claim(&peer, &name) {
                    let _ = events.send(Event::Refused(r));
                    return;
                }
                recv_end(&mut recv).await.map(|()| Msg::Pong(0))
            }
            Ok(Msg::Ping(n)) => recv_end(&mut recv).await.map(|()| Msg::Pong(n)),
            Ok(Msg::Update { header, .. }) => {
                let (mut values, mut sum) = (0u64, 0f64);
                recv_tensor_body(&mut recv, &header, &spec, |_, v| {
                    values += v.len() as u64;
                    sum += v.iter().map(|&x| f64::from(x)).sum::<f64>();
                })
                .await
                .map(|()| Msg::Ack { values, sum })
            }
            Ok(other) => Ok(Msg::Rejected(format!("unexpected {other:?}"))),
        };
        let reply = reply.unwrap_or_else(|e: StreamError| {
            let _ = events.send(Event::Rejected(e.to_string()));
            Msg::Rejected(e.to_string())
        });
        if send_message(&peer.conn, &reply, None).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Site side

async fn dial(server: &Server, tls: rustls::ClientConfig) -> Result<quinn::Connection, DialError> {
    let ep = client_endpoint(tls, bind_addr_for(server.addr), &TransportLimits::site()).unwrap();
    connect(&ep, server.addr, "localhost").await
}

async fn next_reply(conn: &quinn::Connection) -> Msg {
    let mut recv = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .expect("reply in time")
        .expect("reply stream");
    let msg = recv_frame(&mut recv).await.expect("reply frame");
    recv_end(&mut recv).await.expect("reply ends");
    msg
}

async fn ping(conn: &quinn::Connection, n: u32) {
    send_message(conn, &Msg::Ping(n), None)
        .await
        .expect("ping sent");
    assert_eq!(next_reply(conn).await, Msg::Pong(n));
}

/// The close reason a refused client ends up with, whether the handshake failed on its side
/// or the server closed the connection right after.
async fn refusal_seen_by_client(result: Result<quinn::Connection, DialError>) -> String {
    match result {
        Err(e) => e.to_string(),
        Ok(conn) => {
            let err = tokio::time::timeout(WAIT, conn.closed())
                .await
                .expect("refused connection closes");
            describe_close(&err)
        }
    }
}

/// Sends raw bytes on a new stream, as a hostile peer would.
async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    // The server may stop the stream early; that is the point.
    let _ = s.write_all(bytes).await;
    let _ = s.finish();
}

fn rejected(msg: Msg) -> String {
    match msg {
        Msg::Rejected(reason) => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_site_connects_with_the_identity_in_its_certificate() {
    init_logs();
    let pki = Pki::new();
    let mut server = Server::start(pki.server_tls(&[]), Role::Site, TransportLimits::default());
    let (cert, key) = pki.issue(Role::Site, "st-marys");
    let conn = dial(&server, pki.client_tls(&cert, &key)).await.unwrap();
    let cert_der = rustls::pki_types::CertificateDer::from_pem_slice(&read(&cert)).unwrap();
    let from_cert = pki::identity_from_cert(&cert_der).unwrap();
    match server.next_event().await {
        Event::Accepted(id) => {
            assert_eq!(id, from_cert);
            assert_eq!(id, Identity::new(Role::Site, "st-marys").unwrap());
        }
        other => panic!("{other:?}"),
    }
    send_message(
        &conn,
        &Msg::Hello {
            name: "st-marys".into(),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(next_reply(&conn).await, Msg::Pong(0));
    ping(&conn, 7).await;

    // A tensor update that matches the model goes through, chunk by chunk.
    let values: Vec<f32> = (0..spec().num_values()).map(|i| i as f32).collect();
    let header = TensorHeader::for_spec(&spec(), Dtype::F32);
    send_message(&conn, &Msg::Update { round: 1, header }, Some(&values))
        .await
        .unwrap();
    let expected: f64 = values.iter().map(|&v| f64::from(v)).sum();
    assert_eq!(
        next_reply(&conn).await,
        Msg::Ack {
            values: values.len() as u64,
            sum: expected
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_other_sites_working() {
    init_logs();
    let pki = Pki::new();
    let (good_cert, good_key) = pki.issue(Role::Site, "good");
    let (revoked_cert, revoked_key) = pki.issue(Role::Site, "stolen");
    let crl = pki.root.join("crl.pem");
    pki_cli::run(&PkiCommand::Revoke {
        ca_dir: pki.ca_dir.clone(),
        cert: revoked_cert.clone(),
        crl: crl.clone(),
        days: 7,
    })
    .unwrap();
    let mut server = Server::start(
        pki.server_tls(&[read(&crl)]),
        Role::Site,
        TransportLimits::default(),
    );
    let good = dial(&server, pki.client_tls(&good_cert, &good_key))
        .await
        .unwrap();
    assert!(matches!(server.next_event().await, Event::Accepted(_)));
    ping(&good, 1).await;

    let ca_pem = pki.ca_pem();
    let ca = pki_cli::load_ca(&pki.ca_dir).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls13 = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
    };
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        r.add(rustls::pki_types::CertificateDer::from_pem_slice(&ca_pem).unwrap())
            .unwrap();
        Arc::new(r)
    };

    // 1. No client certificate.
    let mut anon = tls13()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    anon.alpn_protocols = vec![wire::ALPN.to_vec()];
    // 2. A certificate from another CA.
    let other = pki::generate_ca("another CA", 5).unwrap();
    let foreign =
        pki::issue_identity_cert(&other, &Identity::new(Role::Site, "good").unwrap(), 5).unwrap();
    let foreign_tls = pki::client_config(
        &ca_pem,
        foreign.cert_pem.as_bytes(),
        foreign.key_pem.as_bytes(),
    )
    .unwrap();
    // 3. An expired certificate.
    let day = Duration::from_secs(86_400);
    let expired = pki::issue_identity_cert_with_validity(
        &ca,
        &Identity::new(Role::Site, "lapsed").unwrap(),
        Validity {
            not_before: SystemTime::now() - 10 * day,
            not_after: SystemTime::now() - day,
        },
    )
    .unwrap();
    let expired_tls = pki::client_config(
        &ca_pem,
        expired.cert_pem.as_bytes(),
        expired.key_pem.as_bytes(),
    )
    .unwrap();
    // 4. A revoked certificate.
    let revoked_tls = pki.client_tls(&revoked_cert, &revoked_key);
    // 5. Another protocol version.
    let (v2_cert, v2_key) = pki.issue(Role::Site, "future");
    let mut v2_tls = pki.client_tls(&v2_cert, &v2_key);
    v2_tls.alpn_protocols = vec![b"fedpriv/2".to_vec()];
    // 6. A certificate of the study CA that is not meant for clients (the server's own).
    let server_as_client = pki.client_tls(
        &pki.ca_dir.join(pki_cli::SERVER_CERT),
        &pki.ca_dir.join(pki_cli::SERVER_KEY),
    );

    let cases: Vec<(&str, rustls::ClientConfig, &[&str])> = vec![
        (
            "no client certificate",
            anon,
            &[
                "no certificate",
                "certificaterequired",
                "certificate required",
            ],
        ),
        (
            "certificate from another CA",
            foreign_tls,
            &["unknownissuer", "unknown issuer"],
        ),
        ("expired certificate", expired_tls, &["expired"]),
        ("revoked certificate", revoked_tls, &["revoked"]),
        (
            "other protocol version",
            v2_tls,
            &["protocol version mismatch"],
        ),
        (
            "server certificate as client",
            server_as_client,
            &["purpose", "usage"],
        ),
    ];
    for (what, tls, words) in cases {
        let client_view = refusal_seen_by_client(dial(&server, tls).await).await;
        let refusal = server.expect_refused().await;
        let server_view = refusal.reason.to_lowercase();
        println!("{what}: server: {server_view} | client: {client_view}");
        assert!(
            words.iter().any(|w| server_view.contains(w)),
            "{what}: server reason {server_view:?} lacks {words:?}"
        );
        assert!(!client_view.is_empty());
        // The site that was already connected is unaffected.
        ping(&good, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_claims_are_enforced_after_the_handshake() {
    init_logs();
    let pki = Pki::new();
    let (op_cert, op_key) = pki.issue(Role::Operator, "alice");
    let (site_cert, site_key) = pki.issue(Role::Site, "st-marys");
    let (other_cert, other_key) = pki.issue(Role::Site, "general");

    // An operator-only endpoint: a site certificate is refused with a clear reason.
    let mut ops = Server::start(
        pki.server_tls(&[]),
        Role::Operator,
        TransportLimits::default(),
    );
    let operator = dial(&ops, pki.client_tls(&op_cert, &op_key)).await.unwrap();
    assert!(matches!(ops.next_event().await, Event::Accepted(_)));
    let site_as_op = dial(&ops, pki.client_tls(&site_cert, &site_key)).await;
    let seen = refusal_seen_by_client(site_as_op).await;
    assert!(
        seen.contains("RoleNotAllowed") && seen.contains("needs role operator"),
        "{seen}"
    );
    assert!(ops.expect_refused().await.reason.contains("site/st-marys"));
    ping(&operator, 3).await;

    // A site that claims another site's name is closed; the other site is unaffected.
    let mut sites = Server::start(pki.server_tls(&[]), Role::Site, TransportLimits::default());
    let honest = dial(&sites, pki.client_tls(&other_cert, &other_key))
        .await
        .unwrap();
    assert!(matches!(sites.next_event().await, Event::Accepted(_)));
    let liar = dial(&sites, pki.client_tls(&site_cert, &site_key))
        .await
        .unwrap();
    assert!(matches!(sites.next_event().await, Event::Accepted(_)));
    send_message(
        &liar,
        &Msg::Hello {
            name: "general".into(),
        },
        None,
    )
    .await
    .ok();
    let err = tokio::time::timeout(WAIT, liar.closed()).await.unwrap();
    let seen = describe_close(&err);
    assert!(
        seen.contains("IdentityMismatch") && seen.contains("claims"),
        "{seen}"
    );
    match &err {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(CloseCode::IdentityMismatch.code())
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(sites.expect_refused().await.reason.contains("claims"));
    send_message(
        &honest,
        &Msg::Hello {
            name: "general".into(),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(next_reply(&honest).await, Msg::Pong(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_and_bodies_are_rejected_without_harm() {
    init_logs();
    let pki = Pki::new();
    let mut server = Server::start(pki.server_tls(&[]), Role::Site, TransportLimits::default());
    let (cert, key) = pki.issue(Role::Site, "fuzzy");
    let (b_cert, b_key) = pki.issue(Role::Site, "bystander");
    let conn = dial(&server, pki.client_tls(&cert, &key)).await.unwrap();
    assert!(matches!(server.next_event().await, Event::Accepted(_)));
    let bystander = dial(&server, pki.client_tls(&b_cert, &b_key))
        .await
        .unwrap();
    assert!(matches!(server.next_event().await, Event::Accepted(_)));

    let frame = |len: u32, payload: &[u8]| {
        let mut f = len.to_le_bytes().to_vec();
        f.extend_from_slice(payload);
        f
    };
    let ping_frame = wire::encode_frame(&Msg::Ping(5)).unwrap();
    let mut trailing = ping_frame.clone();
    trailing.extend_from_slice(b"junk");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed payload", frame(5, &[0xff; 5]), "malformed"),
        ("truncated payload", frame(100, &[0; 10]), "truncated"),
        ("truncated prefix", vec![1, 0], "truncated"),
        // Claims 4 GB: refused on the prefix alone, with nothing else sent.
        (
            "oversized (4 GB claim)",
            frame(u32::MAX, &[]),
            "over the cap",
        ),
        (
            "oversized (cap + 1)",
            frame(MAX_CONTROL_FRAME as u32 + 1, &[0; 64]),
            "over the cap",
        ),
        ("trailing bytes after a frame", trailing, "unexpected bytes"),
    ];
    for (what, bytes, word) in cases {
        let t0 = Instant::now();
        send_raw(&conn, &bytes).await;
        let reason = rejected(next_reply(&conn).await);
        assert!(reason.contains(word), "{what}: {reason}");
        assert!(t0.elapsed() < WAIT, "{what} took {:?}", t0.elapsed());
        assert!(server.expect_rejected().await.contains(word), "{what}");
        ping(&conn, 9).await;
        ping(&bystander, 10).await;
    }

    // Tensor headers that do not match the model are refused before the body is read.
    let spec = spec();
    let body: Vec<f32> = vec![0.5; spec.num_values()];
    let mut wrong_shape = TensorHeader::for_spec(&spec, Dtype::F32);
    wrong_shape.tensors[0].shape = vec![32, 64];
    // A header claiming the largest model (8 GB): checked, never allocated.
    let huge = ModelSpec::new(vec![TensorSpec::new("w", &[1 << 31])]).unwrap();
    let huge_header = TensorHeader::for_spec(&huge, Dtype::F32);
    let f16 = TensorHeader::for_spec(&spec, Dtype::F16);
    let exact = TensorHeader::for_spec(&spec, Dtype::F32);
    let n = spec.num_values();
    let cases: Vec<(&str, TensorHeader, &[f32], &str)> = vec![
        ("shape mismatch", wrong_shape, &body, "shape [32, 64]"),
        ("8 GB header", huge_header, &body[..16], "model has 2"),
        ("f16 body", f16, &body[..n / 2], "dtype"),
        ("short body", exact.clone(), &body[..n - 1], "ended after"),
        ("empty body", exact.clone(), &[], "ended after 0"),
    ];
    for (what, header, values, word) in cases {
        // The server may stop the stream before we finish writing: either outcome is fine.
        let _ = send_message(&conn, &Msg::Update { round: 2, header }, Some(values)).await;
        let reason = rejected(next_reply(&conn).await);
        assert!(reason.contains(word), "{what}: {reason}");
        assert!(server.expect_rejected().await.contains(word), "{what}");
        ping(&conn, 11).await;
        ping(&bystander, 12).await;
    }

    // A body longer than its header: the extra bytes are refused, not absorbed.
    let frame = wire::encode_frame(&Msg::Update {
        round: 3,
        header: exact.clone(),
    })
    .unwrap();
    let mut long = frame.clone();
    long.extend_from_slice(&wire::f32_body_bytes(&body));
    long.extend_from_slice(&[0; 3]);
    send_raw(&conn, &long).await;
    let reason = rejected(next_reply(&conn).await);
    assert!(reason.contains("longer than"), "{reason}");
    assert_eq!(server.expect_rejected().await, reason);

    // And after all that, a correct update still works on the same connection.
    let sent = send_message(
        &conn,
        &Msg::Update {
            round: 4,
            header: exact,
        },
        Some(&body),
    )
    .await;
    sent.unwrap();
    assert!(matches!(next_reply(&conn).await, Msg::Ack { values, .. } if values == n as u64));
    ping(&bystander, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_reconnects_with_backoff_and_keep_alives_hold_idle_connections() {
    init_logs();
    let pki = Pki::new();
    let (cert, key) = pki.issue(Role::Site, "patient-site");
    // Find a free port, start dialing it before anyone listens, then start the server.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let limits = TransportLimits {
        idle_timeout: Duration::from_millis(1500),
        keep_alive: Some(Duration::from_millis(300)),
        ..TransportLimits::default()
    };
    let ep = client_endpoint(pki.client_tls(&cert, &key), bind_addr_for(addr), &limits).unwrap();
    let (_stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let dialer = tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
        let conn = connect_with_backoff(&ep, addr, "localhost", &mut backoff, &mut stop_rx).await;
        (conn, ep)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let server_limits = TransportLimits {
        idle_timeout: Duration::from_millis(1500),
        ..TransportLimits::default()
    };
    let endpoint = make_server_endpoint(addr, pki.server_tls(&[]), &server_limits).unwrap();
    let ep2 = endpoint.clone();
    let (tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = ep2.accept().await {
            tokio::spawn(serve(incoming, Role::Site, tx.clone()));
        }
    });
    let (conn, _ep) = tokio::time::timeout(WAIT, dialer).await.unwrap().unwrap();
    let conn = conn.unwrap();
    assert!(matches!(events.recv().await, Some(Event::Accepted(_))));
    // Idle for longer than the idle timeout: keep-alives hold the connection open.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    ping(&conn, 1).await;

    // Without keep-alives the same silence closes it.
    let quiet = TransportLimits {
        idle_timeout: Duration::from_millis(1500),
        keep_alive: None,
        ..TransportLimits::default()
    };
    let ep = client_endpoint(pki.client_tls(&cert, &key), bind_addr_for(addr), &quiet).unwrap();
    let idle = connect(&ep, addr, "localhost").await.unwrap();
    let err = tokio::time::timeout(WAIT, idle.closed()).await.unwrap();
    assert!(matches!(err, quinn::ConnectionError::TimedOut), "{err:?}");
    ping(&conn, 2).await;
}

/// A hospital's own PKI: leaves made by another tool (here rcgen directly, as OpenSSL would)
/// work if they carry the fedpriv SAN URI; a valid certificate without one is refused after
/// the handshake with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hospital_pki_leaves_work_and_need_a_fedpriv_uri() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    init_logs();
    let pki = Pki::new();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Hospital Issuing CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let hospital_ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<SanType>| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "ward-7 gateway");
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &hospital_ca, &ca_key).unwrap();
        pki::client_config(
            &pki.ca_pem(),
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )
        .unwrap()
    };
    // The coordinator trusts the hospital CA for clients; sites trust the study CA.
    let server_tls = pki::server_config(
        hospital_ca.pem().as_bytes(),
        &read(&pki.ca_dir.join(pki_cli::SERVER_CERT)),
        &read(&pki.ca_dir.join(pki_cli::SERVER_KEY)),
        &[],
    )
    .unwrap();
    let mut server = Server::start(server_tls, Role::Site, TransportLimits::default());

    let with_uri = leaf(vec![
        SanType::DnsName("gw.ward7.hospital.example".try_into().unwrap()),
        SanType::URI("fedpriv://site/ward-7".try_into().unwrap()),
    ]);
    let conn = dial(&server, with_uri).await.unwrap();
    match server.next_event().await {
        Event::Accepted(id) => assert_eq!(id, Identity::new(Role::Site, "ward-7").unwrap()),
        other => panic!("{other:?}"),
    }
    ping(&conn, 1).await;

    let without = leaf(vec![SanType::DnsName(
        "gw.ward8.hospital.example".try_into().unwrap(),
    )]);
    let seen = refusal_seen_by_client(dial(&server, without).await).await;
    assert!(
        seen.contains("NotAuthenticated") && seen.contains("fedpriv"),
        "{seen}"
    );
    assert!(server
        .expect_refused()
        .await
        .reason
        .contains("no valid fedpriv identity"));
    ping(&conn, 2).await;
}
