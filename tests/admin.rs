//! Least privilege over the real endpoint: operators and auditors use the admin protocol
//! with their own certificates against a real coordinator (`server::run`, real QUIC, real
//! SQLite, real audit log); sites speak the site protocol on raw connections so the test
//! sees every message a site receives.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedpriv_common::admin::{AdminRequest, Whose};
use fedpriv_common::audit_file::verify_file;
use fedpriv_common::pki::{self, Role};
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::seal::SealKey;
use fedpriv_coordinator::admin::{self, ClientError};
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::pki_cli::{self, PkiCommand};
use fedpriv_coordinator::server::{self, Options};
use fedpriv_coordinator::store::Store;
use serde_json::Value;
use tokio::sync::watch;

use fedpriv_common::test_util::StudyBuilder as Study;

#[path = "support/pki_files.rs"]
mod pki_files;

const WAIT: Duration = Duration::from_secs(10);

/// The admin tests' study: a logistic regression on two features with central noise and the
/// default accountant.
fn study(id: &str, enrolled: &[&str], min_sites: usize) -> String {
    Study::new(id)
        .named_features(&[("a", 0.0, 1.0), ("b", -1.0, 1.0)])
        .rounds(10)
        .min_sites(min_sites)
        .round_timeout_secs(30)
        .placement("central")
        .noise(5.0, 3.0)
        .accountant(None)
        .enrolled(enrolled.iter().copied())
        .toml()
}

/// A study CA with everyone's certificates, and a coordinator over a state directory.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    join: Option<tokio::task::JoinHandle<Result<(), server::ServerError>>>,
    metrics: Option<fedpriv_coordinator::metrics::Metrics>,
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        pki_files::make(
            &root,
            "admin test CA",
            &[
                (Role::Operator, "alice"),
                (Role::Auditor, "carol"),
                (Role::Site, "site-a"),
                (Role::Site, "site-b"),
                (Role::Site, "site-c"),
            ],
        );
        let (stop, _) = watch::channel(false);
        let mut fx = Self {
            _dir: dir,
            state: root.join("state"),
            root,
            // Port 0 on the first start; a restart listens where the first run did.
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop,
            join: None,
            metrics: None,
        };
        fx.run_coordinator(Vec::new()).await;
        fx
    }

    /// (Re)starts the coordinator with `studies` given as `--study` files would be.
    async fn run_coordinator(&mut self, studies: Vec<String>) {
        self.run_coordinator_until(studies, false).await
    }

    /// As [`Self::run_coordinator`]; with `exit_when_done`, as `run --exit-when-done`.
    async fn run_coordinator_until(&mut self, studies: Vec<String>, exit_when_done: bool) {
        self.run_coordinator_with(studies, exit_when_done, Limits::default())
            .await
    }

    /// As [`Self::run_coordinator_until`], under `limits`.
    async fn run_coordinator_with(
        &mut self,
        studies: Vec<String>,
        exit_when_done: bool,
        limits: Limits,
    ) {
        let tls = pki_files::server_tls(&self.root, &[]);
        let studies = studies
            .into_iter()
            .map(|t| {
                (
                    fedpriv_common::config::StudyConfig::from_toml(&t).unwrap(),
                    t,
                )
            })
            .collect();
        let opts = Options {
            listen: self.addr,
            state_dir: self.state.clone(),
            tls,
            studies,
            max_concurrent_uploads: 2,
            at_rest_key: Arc::new(SealKey::from_bytes(&[7; 32]).unwrap()),
        };
        let (stop, stop_rx) = watch::channel(false);
        self.stop = stop;
        // Listening once `start` returns: it reports the address it bound.
        let running = server::start(opts, limits, stop_rx, None, exit_when_done)
            .await
            .unwrap();
        self.addr = running.addr;
        self.metrics = Some(running.metrics.clone());
        self.join = Some(tokio::spawn(running.finished()));
    }

    async fn stop_coordinator(&mut self) {
        let _ = self.stop.send(true);
        if let Some(j) = self.join.take() {
            tokio::time::timeout(WAIT, j)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        }
    }

    fn cert(&self, name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let issued = self.root.join("issued");
        (
            read(&self.root.join("ca").join(pki_cli::CA_CERT)),
            read(&issued.join(format!("{name}.pem"))),
            read(&issued.join(format!("{name}.key"))),
        )
    }

    async fn dial(&self, name: &str) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
        let (ca, cert, key) = self.cert(name);
        admin::connect(self.addr, "localhost", &ca, &cert, &key).await
    }

    /// One request as `name`, on a connection of its own.
    async fn ask(&self, name: &str, req: AdminRequest) -> Result<String, ClientError> {
        let (_endpoint, conn) = self.dial(name).await?;
        let out = admin::request(&conn, &req).await.map(|r| r.text);
        conn.close(0u32.into(), b"done");
        out
    }

    async fn site(&self, name: &str) -> RawSite {
        let (ca, cert, key) = self.cert(name);
        let tls = pki::client_config(&ca, &cert, &key).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(
            TransportLimits::site().transport_config().unwrap(),
        ));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(self.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let hello = SiteMessage::Hello {
            version: PROTOCOL_VERSION,
            claimed_site: name.into(),
        };
        quic_io::send_message(&conn, &hello, None).await.unwrap();
        let mut site = RawSite {
            name: name.to_string(),
            _endpoint: endpoint,
            conn,
            seen: Vec::new(),
        };
        match site.next().await {
            CoordinatorMessage::Welcome { .. } => {}
            other => panic!("{name}: expected a welcome, got {other:?}"),
        }
        site
    }

    /// (actor, `details[key]`) of every `event` record, in log order.
    fn audited(&self, event: &str, key: &str) -> Vec<(String, String)> {
        self.audit_lines()
            .iter()
            .filter(|r| r["event"] == event)
            .map(|r| {
                (
                    r["actor"].as_str().unwrap().to_string(),
                    r["details"][key].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Shows that nothing else is on its way to `sites`: creates a study enrolling them,
    /// whose announcement must be the next message each receives (the coordinator sends a
    /// site's messages one after the other, in order). Unlike waiting a while for nothing,
    /// this cannot pass merely because a wrong message is slow.
    async fn nothing_else_for(&self, sites: &mut [&mut RawSite]) {
        static FENCES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FENCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("fence-{n}");
        let names: Vec<&str> = sites.iter().map(|s| s.name.as_str()).collect();
        let toml = study(&id, &names, 1);
        self.ask("alice", AdminRequest::CreateStudy { config_toml: toml })
            .await
            .unwrap();
        for site in sites.iter_mut() {
            match site.next().await {
                CoordinatorMessage::StudyAnnounced(a) if a.study == id => {}
                other => panic!("{}: {other:?} arrived before {id}", site.name),
            }
        }
    }

    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.state.join("audit.log"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// A site on a raw connection: every message it receives is kept.
struct RawSite {
    name: String,
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    seen: Vec<CoordinatorMessage>,
}

impl RawSite {
    async fn next(&mut self) -> CoordinatorMessage {
        self.next_within(WAIT).await.expect("a message in time")
    }

    async fn next_within(&mut self, wait: Duration) -> Option<CoordinatorMessage> {
        // None also when the coordinator closed the connection (a newer one replaced it).
        let mut recv = tokio::time::timeout(wait, self.conn.accept_uni())
            .await
            .ok()?
            .ok()?;
        let msg: CoordinatorMessage = quic_io::recv_frame(&mut recv).await.unwrap();
        // Read to the end: a stream dropped half-read is stopped, which the coordinator
        // takes as the site refusing that message.
        let _ = recv.read_to_end(1 << 26).await;
        self.seen.push(msg.clone());
        Some(msg)
    }

    async fn send(&self, msg: &SiteMessage) {
        quic_io::send_message(&self.conn, msg, None).await.unwrap();
    }

    /// The studies named in what this site received. Every kind of message is listed, so a
    /// new kind (one that might carry another site's data) must be looked at here.
    fn studies_seen(&self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &self.seen {
            match m {
                CoordinatorMessage::Welcome { studies, .. } => {
                    out.extend(studies.iter().map(|a| a.study.clone()))
                }
                CoordinatorMessage::StudyAnnounced(a) => out.push(a.study.clone()),
                // A task carries the global model (the noised aggregate), never an update.
                CoordinatorMessage::Task(t) => out.push(t.study.clone()),
                CoordinatorMessage::StudyEnded { study, .. } => out.push(study.clone()),
                CoordinatorMessage::Refused { .. } => {}
            }
        }
        out
    }
}

fn refused(r: Result<String, ClientError>) -> String {
    match r {
        Err(ClientError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn list(text: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_created_at_runtime_reach_only_their_enrolled_sites() {
    let fx = Fixture::start().await;
    let mut a = fx.site("site-a").await;
    let mut b = fx.site("site-b").await;

    let out = fx
        .ask(
            "alice",
            AdminRequest::CreateStudy {
                config_toml: study("s1", &["site-a", "site-c"], 2),
            },
        )
        .await
        .unwrap();
    assert!(out.contains("created study s1"), "{out}");
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s2", &["site-b", "site-c"], 2),
        },
    )
    .await
    .unwrap();
    // Connected sites hear of the studies they are enrolled in, and only those.
    match a.next().await {
        CoordinatorMessage::StudyAnnounced(ann) => assert_eq!(ann.study, "s1"),
        other => panic!("{other:?}"),
    }
    match b.next().await {
        CoordinatorMessage::StudyAnnounced(ann) => assert_eq!(ann.study, "s2"),
        other => panic!("{other:?}"),
    }
    // An id is never reused.
    match fx
        .ask(
            "alice",
            AdminRequest::CreateStudy {
                config_toml: study("s1", &["site-a"], 1),
            },
        )
        .await
    {
        Err(ClientError::Failed {
            whose: Whose::Peer,
            reason,
        }) => assert!(reason.contains("already exists"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // The announced study takes the site's answer (it is in the connection tasks' view).
    a.send(&SiteMessage::Ready {
        study: "s1".into(),
        records: 100,
    })
    .await;
    let db = fx.state.join("coordinator.db");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !Store::open_read_only(&db)
        .unwrap()
        .site_records("s1")
        .unwrap()
        .contains_key("site-a")
    {
        assert!(tokio::time::Instant::now() < deadline, "ready not taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A site that says it is ready for a study it is not enrolled in is not taken.
    b.send(&SiteMessage::Ready {
        study: "s1".into(),
        records: 100,
    })
    .await;
    // Wait for its refusal to be on record, so the checks below see it handled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !fx.audit_lines().iter().any(|r| {
        r["event"] == "refused"
            && r["actor"] == "site/site-b"
            && r["details"]["reason"]
                .as_str()
                .is_some_and(|x| x.contains("not enrolled"))
    }) {
        assert!(tokio::time::Instant::now() < deadline, "ready not refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Sites that connect later get what they are enrolled in in their welcome.
    let mut c = fx.site("site-c").await;
    let mut late_b = fx.site("site-b").await;
    assert_eq!(c.studies_seen(), ["s1", "s2"]);
    assert_eq!(late_b.studies_seen(), ["s2"]);

    // The newer connection of site-b replaced the older one, which the coordinator closed;
    // nothing else is on its way to the others.
    let closed = tokio::time::timeout(WAIT, b.conn.closed()).await.unwrap();
    assert!(closed.to_string().contains("replaced"), "{closed}");
    fx.nothing_else_for(&mut [&mut a, &mut c, &mut late_b])
        .await;
    let real = |seen: Vec<String>| -> Vec<String> {
        seen.into_iter()
            .filter(|s| !s.starts_with("fence-"))
            .collect()
    };
    assert_eq!(real(a.studies_seen()), ["s1"]);
    assert_eq!(real(b.studies_seen()), ["s2"]);
    assert_eq!(real(c.studies_seen()), ["s1", "s2"]);
    assert_eq!(real(late_b.studies_seen()), ["s2"]);
    let records = Store::open_read_only(&db)
        .unwrap()
        .site_records("s1")
        .unwrap();
    assert_eq!(records.keys().collect::<Vec<_>>(), ["site-a"]);

    // Each creation is on record, by the operator's certificate identity.
    let mut created = fx.audited("study_created", "study");
    created.retain(|(_, s)| !s.starts_with("fence-"));
    assert_eq!(
        created,
        [
            ("operator/alice".to_string(), "s1".to_string()),
            ("operator/alice".to_string(), "s2".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_stops_a_study_and_its_sites_are_told() {
    let fx = Fixture::start().await;
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s1", &["site-a", "site-b"], 2),
        },
    )
    .await
    .unwrap();
    let mut a = fx.site("site-a").await;
    let mut c = fx.site("site-c").await;
    assert_eq!(a.studies_seen(), ["s1"]);
    fx.ask(
        "alice",
        AdminRequest::StopStudy {
            study: "s1".into(),
            reason: "protocol amendment".into(),
        },
    )
    .await
    .unwrap();
    match a.next().await {
        CoordinatorMessage::StudyEnded { study, reason } => {
            assert_eq!(study, "s1");
            assert!(
                reason.contains("operator/alice") && reason.contains("protocol amendment"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Site-c is not enrolled in s1: it hears nothing of the stop.
    fx.nothing_else_for(&mut [&mut c]).await;
    let studies = list(&fx.ask("carol", AdminRequest::ListStudies).await.unwrap());
    let s1 = studies.iter().find(|s| s["study"] == "s1").unwrap();
    assert_eq!(s1["status"], "stopped");
    // Stopping twice, or a study that does not exist, is the requester's error.
    for s in ["s1", "nope"] {
        match fx
            .ask(
                "alice",
                AdminRequest::StopStudy {
                    study: s.into(),
                    reason: "again".into(),
                },
            )
            .await
        {
            Err(ClientError::Failed {
                whose: Whose::Peer, ..
            }) => {}
            other => panic!("{s}: {other:?}"),
        }
    }
    let stopped = fx
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "study_stopped")
        .collect::<Vec<_>>();
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["actor"], "operator/alice");
    assert_eq!(stopped[0]["details"]["reason"], "protocol amendment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_read_but_cannot_write_and_every_refusal_is_audited_first() {
    let mut fx = Fixture::start().await;
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s1", &["site-a", "site-b"], 2),
        },
    )
    .await
    .unwrap();

    let (_ep, conn) = fx.dial("carol").await.unwrap();
    let studies = list(
        &admin::request(&conn, &AdminRequest::ListStudies)
            .await
            .unwrap()
            .text,
    );
    assert_eq!(studies.len(), 1);
    assert_eq!(studies[0]["study"], "s1");
    let ledger: Value = serde_json::from_str(
        &admin::request(&conn, &AdminRequest::ShowLedger { study: "s1".into() })
            .await
            .unwrap()
            .text,
    )
    .unwrap();
    assert_eq!(ledger["study"], "s1");
    assert_eq!(ledger["budget"]["epsilon"], 3.0);
    assert!(admin::ledger_text(&ledger).starts_with("study s1 (active)"));
    let metrics = admin::request(&conn, &AdminRequest::Metrics).await.unwrap();
    assert!(metrics.text.contains("fedpriv_connections_accepted_total"));

    // Writes are refused, on the same connection, and each refusal is on file before the
    // auditor hears of it: the very next read of the log has it.
    for req in [
        AdminRequest::CreateStudy {
            config_toml: study("s2", &["site-a"], 1),
        },
        AdminRequest::StopStudy {
            study: "s1".into(),
            reason: "no".into(),
        },
        AdminRequest::ChangeStudy {
            study: "s1".into(),
            changes: vec![("rounds".into(), "20".into())],
        },
    ] {
        let action = req.action();
        let reason = match admin::request(&conn, &req).await {
            Err(ClientError::Refused(r)) => r,
            other => panic!("{action}: {other:?}"),
        };
        assert!(reason.contains("auditor"), "{reason}");
        let log = admin::fetch_audit(&conn, 1, None).await.unwrap();
        let last: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
        assert_eq!(last["event"], "refused");
        assert_eq!(last["actor"], "auditor/carol");
        assert_eq!(last["details"]["action"], action);
    }
    // Paging: one record at a time gives the same log. Each page is itself on record, so
    // the log grows as fast as this reads it: paging stops at the head of the first page.
    let whole = admin::fetch_audit(&conn, 1, None).await.unwrap();
    let mut paged = String::new();
    let mut from = 1;
    let mut head = None;
    loop {
        let page = admin::request(
            &conn,
            &AdminRequest::FetchAudit {
                from_seq: from,
                max: 1,
            },
        )
        .await
        .unwrap();
        let head = *head.get_or_insert(page.head.unwrap());
        paged.push_str(&page.text);
        match page.next {
            Some(n) if n <= head => from = n,
            _ => break,
        }
    }
    assert!(
        paged.starts_with(&whole),
        "paged reads give the log as it was"
    );
    assert!(whole.lines().count() >= 8, "{whole}");
    assert!(admin::fetch_audit(&conn, 3, Some(2))
        .await
        .unwrap()
        .starts_with(r#"{"seq":3,"#));

    // Operators do not read the audit log.
    assert!(refused(
        fx.ask(
            "alice",
            AdminRequest::FetchAudit {
                from_seq: 1,
                max: 10
            }
        )
        .await
    )
    .contains("auditors"));
    // Nothing the auditor asked for happened.
    assert_eq!(
        list(&fx.ask("alice", AdminRequest::ListStudies).await.unwrap()).len(),
        1
    );

    conn.close(0u32.into(), b"done");
    fx.stop_coordinator().await;
    let report = verify_file(fx.state.join("audit.log")).unwrap();
    assert!(report.is_ok(), "{report:?}");
    let refusals = fx.audited("refused", "action");
    assert_eq!(
        refusals,
        [
            ("auditor/carol", "create_study"),
            ("auditor/carol", "stop_study"),
            ("auditor/carol", "change_study"),
            ("operator/alice", "fetch_audit"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_certificate_gets_nothing_on_the_admin_channel() {
    let fx = Fixture::start().await;
    for req in [AdminRequest::ListStudies, AdminRequest::Metrics] {
        let reason = refused(fx.ask("site-a", req).await);
        assert!(reason.contains("role site"), "{reason}");
    }
    // An operator may not speak the site protocol either.
    let (ca, cert, key) = fx.cert("alice");
    let tls = pki::client_config(&ca, &cert, &key).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(fx.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: "alice".into(),
    };
    let _ = quic_io::send_message(&conn, &hello, None).await;
    let closed = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();
    assert!(
        quic_io::describe_close(&closed).contains("RoleNotAllowed"),
        "{closed}"
    );

    let refusals: Vec<(String, String)> = fx
        .audit_lines()
        .iter()
        .filter(|r| r["event"] == "refused")
        .map(|r| {
            (
                r["details"]["identity"].as_str().unwrap().to_string(),
                r["details"]["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        refusals,
        [
            ("site/site-a", "list_studies"),
            ("site/site-a", "metrics"),
            ("operator/alice", "site_protocol"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_terms_cannot_be_loosened_and_safe_changes_survive_a_restart() {
    let mut fx = Fixture::start().await;
    let toml = study("s1", &["site-a", "site-b"], 1);
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: toml.clone(),
        },
    )
    .await
    .unwrap();
    let change = |k: &str, v: &str| AdminRequest::ChangeStudy {
        study: "s1".into(),
        changes: vec![(k.into(), v.into())],
    };
    for (k, v) in [
        ("privacy.epsilon", "5"),
        ("privacy.delta", "1e-3"),
        ("privacy.clip_norm", "10"),
        ("privacy.noise_multiplier", "0.5"),
        ("privacy.unit", "record"),
        ("sites.enrolled", "site-z"),
    ] {
        let reason = refused(fx.ask("alice", change(k, v)).await);
        assert!(!reason.is_empty(), "{k}");
    }
    fx.ask("alice", change("rounds", "20")).await.unwrap();
    fx.ask("alice", change("min_sites", "2")).await.unwrap();
    fx.ask("alice", change("privacy.epsilon", "2.5"))
        .await
        .unwrap();
    let show = |text: String| list(&text)[0].clone();
    let s = show(fx.ask("carol", AdminRequest::ListStudies).await.unwrap());
    assert_eq!(
        (
            &s["rounds"]["planned"],
            &s["budget"]["epsilon"],
            &s["budget"]["delta"]
        ),
        (&Value::from(20), &Value::from(2.5), &Value::from(1e-5))
    );
    let refusals = fx
        .audit_lines()
        .iter()
        .filter(|r| r["event"] == "refused" && r["details"]["action"] == "change_study")
        .count();
    assert_eq!(refusals, 6);
    let changes = fx
        .audit_lines()
        .iter()
        .filter(|r| r["event"] == "study_changed")
        .count();
    assert_eq!(changes, 3);

    // A restart without --study resumes the runtime study as changed; one with its original
    // file keeps the stored (changed) config too.
    fx.stop_coordinator().await;
    fx.run_coordinator(Vec::new()).await;
    let s = show(fx.ask("carol", AdminRequest::ListStudies).await.unwrap());
    assert_eq!(
        (&s["status"], &s["rounds"]["planned"]),
        (&Value::from("active"), &Value::from(20))
    );
    assert!(refused(fx.ask("alice", change("privacy.epsilon", "2.8")).await).contains("lowered"));
    fx.stop_coordinator().await;
    fx.run_coordinator(vec![toml]).await;
    // The stored, changed terms won over the file's: 20 planned rounds, epsilon 2.5.
    let s = show(fx.ask("carol", AdminRequest::ListStudies).await.unwrap());
    assert_eq!(s["rounds"]["planned"], 20);
    assert_eq!(s["budget"]["epsilon"], 2.5);
    assert!(refused(fx.ask("alice", change("privacy.epsilon", "2.8")).await).contains("lowered"));
    fx.ask("alice", change("privacy.epsilon", "2.0"))
        .await
        .unwrap();
    let s = show(fx.ask("carol", AdminRequest::ListStudies).await.unwrap());
    assert_eq!(s["budget"]["epsilon"], 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_tells_refusals_from_config_and_request_errors() {
    let fx = Fixture::start().await;
    let file = fx.root.join("s1.toml");
    std::fs::write(&file, study("s1", &["site-a", "site-b"], 2)).unwrap();
    let run = |who: &str, cmd: admin::AdminCli| {
        let issued = fx.root.join("issued");
        let args = admin::AdminArgs {
            server: fx.addr.to_string(),
            server_name: Some("localhost".into()),
            ca: fx.root.join("ca").join(pki_cli::CA_CERT),
            cert: issued.join(format!("{who}.pem")),
            key: issued.join(format!("{who}.key")),
            cmd,
        };
        // The command makes its own runtime, as the binary does.
        tokio::task::spawn_blocking(move || admin::run_cli(&args))
    };
    let out = run(
        "alice",
        admin::AdminCli::Create {
            study: file.clone(),
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.contains("created study s1"), "{out}");
    let table = run(
        "carol",
        admin::AdminCli::Ledger {
            study: "s1".into(),
            json: false,
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        table.starts_with("study s1 (active): epsilon 0.0000 of 3 spent"),
        "{table}"
    );
    let audit = run(
        "carol",
        admin::AdminCli::Audit {
            from: 1,
            max: Some(3),
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(audit.lines().count(), 3);

    let code = |r: Result<String, ClientError>| r.map(|_| 0).unwrap_or_else(|e| e.exit_code());
    // Refused for the role: 3.
    let r = run("carol", admin::AdminCli::Create { study: file })
        .await
        .unwrap();
    assert_eq!(code(r), 3);
    // The requester's own files: 2, before anything is sent.
    let r = run("nobody", admin::AdminCli::List).await.unwrap();
    assert_eq!(code(r), 2);
    // A request the coordinator cannot serve: 5, with whose fault it is.
    let r = run(
        "alice",
        admin::AdminCli::Ledger {
            study: "nope".into(),
            json: true,
        },
    )
    .await
    .unwrap();
    match &r {
        Err(ClientError::Failed {
            whose: Whose::Peer, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(code(r), 5);
    let r = run(
        "alice",
        admin::AdminCli::Change {
            study: "s1".into(),
            set: vec!["rounds".into()],
        },
    )
    .await
    .unwrap();
    assert_eq!(code(r), 2, "KEY=VALUE is checked before dialing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_site_daemon_takes_up_a_study_created_after_it_connected() {
    let fx = Fixture::start().await;
    let dir = fx.root.join("site-a");
    std::fs::create_dir_all(&dir).unwrap();
    let issued = fx.root.join("issued");
    let mut csv = String::from("a,b,y\n");
    for i in 0..40 {
        csv.push_str(&format!(
            "{},{},{}\n",
            i as f32 / 40.0,
            0.5 - i as f32 / 40.0,
            i % 2
        ));
    }
    std::fs::write(dir.join("patients.csv"), csv).unwrap();
    // The site pins exactly the study's terms before it exists at the coordinator.
    let s1 = fedpriv_common::config::StudyConfig::from_toml(&study("s1", &["site-a", "site-c"], 2))
        .unwrap();
    let toml = site_toml(
        &fx,
        &fx.root.join("ca").join(pki_cli::CA_CERT),
        &issued,
        40,
        &s1,
    );
    std::fs::write(dir.join("site.toml"), toml).unwrap();
    let cfg = fedpriv_client::config::SiteConfig::load(&dir.join("site.toml")).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let daemon = tokio::spawn(fedpriv_client::daemon::run(cfg, stop_rx));
    // Connected (its connection is on record) before the study exists.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !fx
        .audit_lines()
        .iter()
        .any(|r| r["event"] == "connection_accepted" && r["actor"] == "site/site-a")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "site did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s1", &["site-a", "site-c"], 2),
        },
    )
    .await
    .unwrap();
    // The daemon checked its data against the announced study and said it is ready.
    let db = fx.state.join("coordinator.db");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let records = Store::open_read_only(&db)
            .unwrap()
            .site_records("s1")
            .unwrap();
        if let Some(n) = records.get("site-a") {
            assert_eq!(*n, 40);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "announcement not taken up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// HIPAA access log: every read an operator or auditor is served is on record, by whom and
/// of what, before the answer arrives; a read that fails is not. Paging the audit log one
/// record at a time ends although every page adds a record (the pager stops at the head
/// its first page saw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_read_is_on_record_before_its_answer_and_paging_ends() {
    let mut fx = Fixture::start().await;
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s1", &["site-a", "site-b"], 2),
        },
    )
    .await
    .unwrap();
    let last = |fx: &Fixture| fx.audit_lines().pop().unwrap();
    let (_ep, carol) = fx.dial("carol").await.unwrap();
    let (_ep2, alice) = fx.dial("alice").await.unwrap();
    let reads = [
        (&carol, "auditor/carol", AdminRequest::ListStudies),
        (
            &carol,
            "auditor/carol",
            AdminRequest::ShowLedger { study: "s1".into() },
        ),
        (&carol, "auditor/carol", AdminRequest::Metrics),
        (&alice, "operator/alice", AdminRequest::ListStudies),
        (
            &alice,
            "operator/alice",
            AdminRequest::ShowLedger { study: "s1".into() },
        ),
        (&alice, "operator/alice", AdminRequest::Metrics),
    ];
    for (conn, who, req) in reads {
        let action = req.action();
        let study = req.study().map(str::to_string);
        admin::request(conn, &req).await.unwrap();
        // On file by the time the answer is here.
        let rec = last(&fx);
        assert_eq!(
            (&rec["event"], &rec["actor"]),
            (&Value::from("access_granted"), &Value::from(who)),
            "{action}: {rec}"
        );
        assert_eq!(rec["details"]["identity"], who);
        assert_eq!(rec["details"]["action"], action);
        assert_eq!(rec["details"]["study"].as_str(), study.as_deref());
    }
    // A read that is not served is not an access.
    let before = fx.audit_lines().len();
    let failed = admin::request(
        &carol,
        &AdminRequest::ShowLedger {
            study: "nope".into(),
        },
    )
    .await;
    assert!(matches!(
        failed,
        Err(ClientError::Failed {
            whose: Whose::Peer,
            ..
        })
    ));
    assert_eq!(fx.audit_lines().len(), before);

    // Paging one record per request: the log grows by one record per page, as fast as it
    // is read; the pager stops at the head of its first page, which is that page's own
    // access record.
    let paged = tokio::time::timeout(WAIT, admin::fetch_audit_in_pages(&carol, 1, None, 1))
        .await
        .expect("paging ends")
        .unwrap();
    let pages: Vec<Value> = paged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, rec) in pages.iter().enumerate() {
        assert_eq!(rec["seq"], i as u64 + 1, "consecutive from 1");
    }
    let head = pages.last().unwrap();
    assert_eq!(head["event"], "access_granted");
    assert_eq!(
        (
            &head["details"]["action"],
            &head["details"]["from_seq"],
            &head["details"]["records"]
        ),
        (
            &Value::from("fetch_audit"),
            &Value::from(1),
            &Value::from(1)
        )
    );
    assert_eq!(head["seq"].as_u64().unwrap() as usize, before + 1);
    // Every page was recorded: as many page records as records read.
    let page_records = fx
        .audit_lines()
        .iter()
        .filter(|r| r["event"] == "access_granted" && r["details"]["action"] == "fetch_audit")
        .count();
    assert_eq!(page_records, pages.len());
    // A page that ends at the log's end needs no head to stop, and holds no record of itself.
    let whole = admin::fetch_audit(&carol, 1, None).await.unwrap();
    assert_eq!(whole.lines().count(), before + pages.len());
    carol.close(0u32.into(), b"done");
    alice.close(0u32.into(), b"done");
    fx.stop_coordinator().await;
    let report = verify_file(fx.state.join("audit.log")).unwrap();
    assert!(report.is_ok(), "{report:?}");
}

/// Refusals on the admin channel share the coordinator's per-source cap (keyed by
/// identity): the first 10 a minute are on record before the requester hears of them, the
/// rest are counted (and would be summarised when the window closes), so a requester that
/// loops on forbidden requests cannot turn them into a flood of fsyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refusals_are_capped_per_identity_and_counted_in_full() {
    let fx = Fixture::start().await;
    let (_ep, conn) = fx.dial("carol").await.unwrap();
    let on_record = |fx: &Fixture| {
        fx.audit_lines()
            .iter()
            .filter(|r| r["event"] == "refused" && r["actor"] == "auditor/carol")
            .count()
    };
    for i in 1..=20 {
        let r = admin::request(
            &conn,
            &AdminRequest::StopStudy {
                study: "s1".into(),
                reason: "no".into(),
            },
        )
        .await;
        assert!(matches!(r, Err(ClientError::Refused(_))), "{i}: {r:?}");
        assert_eq!(on_record(&fx), i.min(10), "after refusal {i}");
    }
    // Another identity has its own allowance.
    assert!(refused(fx.ask("site-a", AdminRequest::ListStudies).await).contains("role site"));
    assert_eq!(
        fx.audit_lines()
            .iter()
            .filter(|r| r["event"] == "refused" && r["actor"] == "site/site-a")
            .count(),
        1
    );
    let metrics = admin::request(&conn, &AdminRequest::Metrics)
        .await
        .unwrap()
        .text;
    assert!(metrics.contains("fedpriv_refusals_total 21\n"), "{metrics}");
    assert!(
        metrics.contains("fedpriv_audit_records_suppressed_total 10\n"),
        "{metrics}"
    );
    // The 20th refusal within the minute raised the repeated-refusals alert, once.
    assert!(
        metrics.contains("fedpriv_alerts_total{kind=\"repeated_refusals\"} 1\n"),
        "{metrics}"
    );
    let alerts: Vec<_> = fx
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "alert" && r["details"]["kind"] == "repeated_refusals")
        .collect();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["details"]["subject"], "auditor/carol");
}

/// The coordinator's writer keeps serving a site that stopped one message's stream (a site
/// may refuse one message, e.g. one it cannot use): the next message on the same
/// connection still arrives. The raw site's stream window is smaller than the welcome, so
/// its stop reaches the coordinator while the welcome is still being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_that_stops_one_message_still_gets_the_next() {
    let fx = Fixture::start().await;
    let (ca, cert, key) = fx.cert("site-a");
    let tls = pki::client_config(&ca, &cert, &key).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = TransportLimits::site().transport_config().unwrap();
    transport.stream_receive_window(4u32.into());
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint
        .connect(fx.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: "site-a".into(),
    };
    quic_io::send_message(&conn, &hello, None).await.unwrap();
    // The welcome's stream: refused before it could be read whole.
    let mut welcome = tokio::time::timeout(WAIT, conn.accept_uni())
        .await
        .unwrap()
        .unwrap();
    welcome.stop(7u32.into()).unwrap();
    let mut site = RawSite {
        name: "site-a".into(),
        _endpoint: endpoint,
        conn,
        seen: Vec::new(),
    };
    fx.ask(
        "alice",
        AdminRequest::CreateStudy {
            config_toml: study("s1", &["site-a", "site-b"], 2),
        },
    )
    .await
    .unwrap();
    match site.next().await {
        CoordinatorMessage::StudyAnnounced(ann) => assert_eq!(ann.study, "s1"),
        other => panic!("{other:?}"),
    }
    assert!(site.conn.close_reason().is_none());
}

/// A site daemon whose CA did not sign the coordinator's certificate refuses it, and its
/// own audit log says so once (not once per retry), with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_refusing_the_coordinators_certificate_puts_it_on_record_once() {
    let fx = Fixture::start().await;
    // Another CA: what the site trusts; the coordinator's certificate is not from it.
    pki_files::init(&fx.root.join("other-ca"), "another hospital CA");
    let dir = fx.root.join("site-a");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("patients.csv"), "a,b,y\n0.1,0.2,1\n").unwrap();
    let issued = fx.root.join("issued");
    let s1 = fedpriv_common::config::StudyConfig::from_toml(&study("s1", &["site-a", "site-c"], 2))
        .unwrap();
    let toml = site_toml(
        &fx,
        &fx.root.join("other-ca").join(pki_cli::CA_CERT),
        &issued,
        1,
        &s1,
    );
    std::fs::write(dir.join("site.toml"), toml).unwrap();
    let cfg = fedpriv_client::config::SiteConfig::load(&dir.join("site.toml")).unwrap();
    let log = fedpriv_client::daemon::audit_path(&cfg);
    let (stop, stop_rx) = watch::channel(false);
    let daemon = tokio::spawn(fedpriv_client::daemon::run(cfg, stop_rx));
    let refusals = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["event"] == "connection_refused")
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while refusals().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal on record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several more attempts (backoff starts at 200 ms): still one record.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.send(true).unwrap();
    daemon.await.unwrap().unwrap();
    let recs = refusals();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let reason = recs[0]["details"]["reason"].as_str().unwrap();
    assert!(reason.contains("we refused the coordinator"), "{reason}");
    assert!(verify_file(&log).unwrap().is_ok());
    // It never reached the coordinator as a connection.
    assert!(!fx
        .audit_lines()
        .iter()
        .any(|r| r["event"] == "connection_accepted" && r["actor"] == "site/site-a"));
}

/// A runtime dropped under a running coordinator, with no shutdown sent (a panic elsewhere
/// in `main`, or a test that ends without stopping its coordinator), still finishes
/// dropping: the coordinator's owner thread is told to stop. Before, the owner and the
/// checkpoint writer waited on each other's channels and the drop never returned (a test of
/// this file hung that way in CI).
#[test]
fn a_runtime_dropped_under_a_running_coordinator_still_ends() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (fx, stop) = rt.block_on(async {
            let mut fx = Fixture::start().await;
            // Keep the real stop sender alive and unsent past the runtime's end; the
            // fixture's drop then sends on a stand-in that no one listens to.
            let stop = std::mem::replace(&mut fx.stop, watch::channel(false).0);
            (fx, stop)
        });
        drop(rt);
        let _ = done_tx.send(());
        drop((fx, stop));
    });
    done_rx
        .recv_timeout(3 * WAIT)
        .expect("the runtime never finished dropping: the coordinator's threads did not stop");
}

/// Site `site-a`'s config: the given CA, its issued certificate, `patients.csv` beside the
/// config with `records` declared, and study `s1`'s terms pinned with a cap of 2.
fn site_toml(
    fx: &Fixture,
    ca: &std::path::Path,
    issued: &std::path::Path,
    records: u64,
    s1: &fedpriv_common::config::StudyConfig,
) -> String {
    fedpriv_client::config::SiteSetup {
        name: "site-a",
        coordinator: fx.addr,
        ca,
        cert: &issued.join("site-a.pem"),
        key: &issued.join("site-a.key"),
        data: std::path::Path::new("patients.csv"),
        records,
        source_delta: 1e-5,
        source_cap: 10.0,
    }
    .toml(&[(s1, 2.0)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_exports_a_model_over_the_admin_channel_once_its_release_conditions_hold() {
    let mut fx = Fixture::start().await;
    fx.stop_coordinator().await;
    // A study with a completed round, as a run leaves the state directory; it requires a
    // passing privacy audit before any model leaves.
    let toml = format!(
        "{}\n[release]\nrequire_privacy_audit = true\n",
        study("exp", &["site-a", "site-b"], 2)
    );
    let cfg = fedpriv_common::config::StudyConfig::from_toml(&toml).unwrap();
    let key = SealKey::from_bytes(&[7; 32]).unwrap();
    let spec = server::study_spec(&cfg).unwrap();
    let values: Vec<f32> = (0..spec.num_values())
        .map(|i| i as f32 * 0.5 - 1.0)
        .collect();
    {
        let mut store = Store::open(fx.state.join("coordinator.db")).unwrap();
        let now = 1_700_000_000;
        store
            .create_study(&cfg.id, &toml, &cfg.enrolled, now)
            .unwrap();
        let ev = fedpriv_common::dp::SgmEvent::new(1.0, 5.0, 1).unwrap();
        store
            .record_spend(&cfg.id, 1, &[("site-a".to_string(), ev, 0.1)], now)
            .unwrap();
        let path = server::model_path(&fx.state, &cfg.id, 1);
        let card = fedpriv_common::model_card::ModelCard::for_round(&cfg, 1, 0.1).metadata();
        let sha = server::write_checkpoint(&key, &spec, &values, &card, &cfg.id, 1, &path).unwrap();
        let rel = path.strip_prefix(&fx.state).unwrap().to_string_lossy();
        store
            .complete_round(&cfg.id, 1, &rel, &sha, &["site-a".to_string()], now + 1)
            .unwrap();
    }
    fx.run_coordinator(Vec::new()).await;
    let out = fx.root.join("model.safetensors");
    // An auditor may not; the operator may not either until an audit passed.
    assert!(matches!(
        export_as(&fx, "carol", &out).await,
        Err(ClientError::Refused(_))
    ));
    match export_as(&fx, "alice", &out).await {
        Err(ClientError::Refused(reason)) => {
            assert!(reason.contains("privacy audit"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!out.exists() && !fx.root.join("model.safetensors.partial").exists());
    assert!(fx
        .audited("refused", "action")
        .iter()
        .any(|(who, a)| who.contains("alice") && a == "export_model"));

    // A passing audit of exactly these terms on record: the model leaves, with it.
    fx.stop_coordinator().await;
    {
        let mut store = Store::open(fx.state.join("coordinator.db")).unwrap();
        store
            .record_privacy_audit(&fedpriv_coordinator::store::PrivacyAuditRow {
                study: cfg.id.clone(),
                terms_sha256: cfg.mechanism_digest(),
                audited_at: 1_700_000_100,
                epsilon_claimed: 2.0,
                epsilon_lower_bound: 0.4,
                delta: 1e-5,
                confidence: 0.95,
                canaries: 1000,
                guesses: 200,
                correct_guesses: 130,
                passed: true,
                report_json: "{}".into(),
            })
            .unwrap();
    }
    fx.run_coordinator(Vec::new()).await;
    let said: Value = serde_json::from_str(&export_as(&fx, "alice", &out).await.unwrap()).unwrap();
    assert_eq!(
        (said["study"].as_str(), said["round"].as_u64()),
        (Some("exp"), Some(1))
    );
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(said["bytes"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(
        fedpriv_common::model::FlatModel::from_safetensors_bytes(&bytes, Some(&spec))
            .unwrap()
            .values,
        values
    );
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header["__metadata__"]["fedpriv.privacy_audit"]
        .as_str()
        .unwrap()
        .contains("\"correct_guesses\":130"));
    // On record, with the digest, by the operator.
    let exported = fx.audited("model_exported", "sha256");
    assert_eq!(exported.len(), 1, "{exported:?}");
    assert!(exported[0].0.contains("alice"));
    // A second export to the same file is refused locally: nothing is overwritten.
    assert!(matches!(
        export_as(&fx, "alice", &out).await,
        Err(ClientError::Config(_))
    ));
    fx.stop_coordinator().await;
    assert!(verify_file(fx.state.join("audit.log")).unwrap().is_ok());
}

async fn export_as(fx: &Fixture, name: &str, out: &Path) -> Result<String, ClientError> {
    let (_endpoint, conn) = fx.dial(name).await.unwrap();
    let r = admin::export_model(&conn, "exp", None, out).await;
    conn.close(0u32.into(), b"done");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_last_study_under_exit_when_done_answers_and_tells_its_sites() {
    let mut fx = Fixture::start().await;
    fx.stop_coordinator().await;
    fx.run_coordinator_until(vec![study("last", &["site-a"], 1)], true)
        .await;
    let mut a = fx.site("site-a").await;
    assert_eq!(a.studies_seen(), ["last"]);
    // The stop ends the run; the operator still hears that it worked.
    fx.ask(
        "alice",
        AdminRequest::StopStudy {
            study: "last".into(),
            reason: "done early".into(),
        },
    )
    .await
    .expect("the stop is answered before the coordinator exits");
    match a.next().await {
        CoordinatorMessage::StudyEnded { study, .. } => assert_eq!(study, "last"),
        other => panic!("{other:?}"),
    }
    // And the coordinator exits on its own.
    let join = fx.join.take().unwrap();
    tokio::time::timeout(WAIT, join)
        .await
        .expect("exits")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sites_from_one_address_all_get_in() {
    let mut fx = Fixture::start().await;
    let names: Vec<String> = (0..8).map(|i| format!("burst-{i}")).collect();
    for name in &names {
        pki_cli::run(&PkiCommand::Issue {
            ca_dir: fx.root.join("ca"),
            role: Role::Site,
            name: name.clone(),
            out: fx.root.join("issued"),
            days: 5,
        })
        .unwrap();
    }
    fx.stop_coordinator().await;
    // One handshake at a time per source (64 / 64): eight sites dialling at once from
    // 127.0.0.1 must queue for it, not be turned away.
    let limits = Limits {
        handshakes_in_flight: 64,
        retry_above: 64,
        ..Limits::default()
    };
    fx.run_coordinator_with(Vec::new(), false, limits).await;
    let fx = &fx;
    let sites = futures_join_all(names.iter().map(|n| fx.site(n))).await;
    assert_eq!(sites.len(), 8);
    let refused = fx
        .audit_lines()
        .into_iter()
        .filter(|r| r["event"] == "connection_refused")
        .count();
    assert_eq!(refused, 0);
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.map(Box::pin).collect();
    let mut out = Vec::with_capacity(futs.len());
    let mut pending: Vec<_> = futs.into_iter().map(Some).collect();
    let mut done: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        done[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(done.into_iter().flatten());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraper_reads_the_running_coordinators_counters_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fx = Fixture::start().await;
    let _a = fx.site("site-a").await;
    let listener = fedpriv_client::metrics_http::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = fx.metrics.clone().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let served = tokio::spawn(fedpriv_client::metrics_http::serve(
        listener,
        move || metrics.render(),
        stop_rx,
    ));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(
        reply.contains("# TYPE fedpriv_connections_accepted_total counter"),
        "{reply}"
    );
    assert!(
        reply.contains("fedpriv_connections_accepted_total"),
        "{reply}"
    );
    stop.send(true).unwrap();
    served.await.unwrap();
}
