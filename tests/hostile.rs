//! A hostile coordinator against a real site daemon, over real QUIC with real certificates.
//!
//! The coordinator here is built from the protocol types alone and deviates at every step:
//! placement flips, lower noise, higher sampling rates, more steps, larger deltas, new
//! columns, a study the site never joined, under-priced and replayed rounds, terms changed
//! after the site paid, models with NaN, huge and crafted values, and a stream of rounds
//! across studies that share one data source. Whatever it does, it asserts:
//! - no un-noised update ever leaves (each update's norm is at least what its noise alone
//!   gives; the one study the site opted into central placement for sends clipped deltas);
//! - the site's ledger never undercounts: every update it sent is paid for in its ledger with
//!   exactly the mechanism an independent recomputation prices, per study and per source,
//!   and the source's filter level is the one recomputed from those events;
//! - every answer is a message of the protocol, and every refusal one of the fixed reasons;
//!   the record count the site sends is the one it declared, not its file's;
//! - every deviation is in the site's audit log, which verifies.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use fedpriv_client::config::SiteConfig;
use fedpriv_common::config::{DataSpec, LocalPlan, Placement, PrivacyUnit, Task as DataTask};
use fedpriv_common::dp::{filter, SgmEvent};
use fedpriv_common::model::{Architecture, ModelSpec};
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_common::protocol::{
    CoordinatorMessage, DeclineReason, SiteMessage, StudyAnnouncement, Task, PROTOCOL_VERSION,
};
use fedpriv_common::wire::{Dtype, TensorHeader};
use fedpriv_coordinator::transport::{
    accept, make_server_endpoint, recv_end, recv_frame, send_message, TransportLimits,
};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);
/// Rows in the site's file; it declares more (the declared count is what sets q).
const TRUE_ROWS: usize = 380;
const DECLARED: u64 = 400;
const HIDDEN: usize = 4000;

fn features() -> Vec<String> {
    vec!["a".into(), "b".into()]
}

fn announcement(study: &str, unit: PrivacyUnit, placement: Placement) -> StudyAnnouncement {
    let (noise_multiplier, local) = match unit {
        PrivacyUnit::Record => (
            1.0,
            LocalPlan::DpSgd {
                steps: 1,
                expected_batch: 10.0,
                learning_rate: 0.5,
            },
        ),
        PrivacyUnit::Site => (
            2.0,
            LocalPlan::Sgd {
                epochs: 1,
                batch_size: 32,
                learning_rate: 0.1,
            },
        ),
    };
    StudyAnnouncement {
        instance: "run-1".into(),
        study: study.into(),
        model: Architecture::mlp(HIDDEN),
        data: DataSpec {
            task: DataTask::Binary,
            label: "y".into(),
            classes: 0,
            class_labels: Vec::new(),
            features: features(),
            ranges: vec![[0.0, 1.0], [-1.0, 1.0]],
            label_range: None,
            fills: vec![None, None],
            categorical: Vec::new(),
            image: None,
        },
        unit,
        placement,
        delta: 1e-6,
        clip_norm: 1.0,
        noise_multiplier,
        local,
        evaluation: None,
    }
}

/// The price an honest site charges, computed here from the terms alone: (study event,
/// source event under record-level add/remove adjacency).
fn independent_price(ann: &StudyAnnouncement) -> (SgmEvent, SgmEvent) {
    match (&ann.local, ann.unit, ann.placement) {
        (
            LocalPlan::DpSgd {
                steps,
                expected_batch,
                ..
            },
            PrivacyUnit::Record,
            _,
        ) => {
            let e = SgmEvent::new(
                expected_batch / DECLARED as f64,
                ann.noise_multiplier,
                *steps,
            )
            .unwrap();
            (e, e)
        }
        (_, PrivacyUnit::Site, Placement::Local) => {
            let e = SgmEvent::new(1.0, ann.noise_multiplier / 2.0, 1).unwrap();
            (e, e)
        }
        (_, PrivacyUnit::Site, Placement::Central) => (
            SgmEvent::new(1.0, ann.noise_multiplier, 1).unwrap(),
            SgmEvent::new(1.0, ann.noise_multiplier / 2.0, 1).unwrap(),
        ),
        _ => panic!("no such plan"),
    }
}

fn spec() -> ModelSpec {
    fedpriv_common::arch::model_spec(&Architecture::mlp(HIDDEN), 2, 1).unwrap()
}

fn task(ann: &StudyAnnouncement, round: u64) -> Task {
    Task {
        study: ann.study.clone(),
        round,
        header: TensorHeader::for_spec(&spec(), Dtype::F32),
        cost: independent_price(ann).0,
        clip_norm: ann.clip_norm,
        noise_multiplier: ann.noise_multiplier,
        unit: ann.unit,
        placement: ann.placement,
        local: ann.local.clone(),
        delta: ann.delta,
        evaluation: ann
            .evaluation
            .filter(|e| e.is_due(round))
            .map(|e| e.event()),
    }
}

/// The hostile coordinator's side of one connection.
struct Peer {
    conn: quinn::Connection,
}

/// What the site answered.
#[derive(Debug)]
enum Answer {
    Ready(String, u64),
    Unable(String, DeclineReason),
    Update(String, u64, Vec<f32>),
    Decline(String, u64, DeclineReason),
    Evaluation(String, u64, Vec<f64>),
}

impl Peer {
    async fn send(&self, msg: &CoordinatorMessage, body: Option<&[f32]>) {
        send_message(&self.conn, msg, body).await.unwrap();
    }

    async fn answer(&self) -> Answer {
        let mut recv = tokio::time::timeout(WAIT, self.conn.accept_uni())
            .await
            .expect("the site answers")
            .unwrap();
        let msg: SiteMessage = recv_frame(&mut recv).await.unwrap();
        match msg {
            SiteMessage::Ready { study, records } => {
                recv_end(&mut recv).await.unwrap();
                Answer::Ready(study, records)
            }
            SiteMessage::Unable { study, reason } => {
                recv_end(&mut recv).await.unwrap();
                Answer::Unable(study, reason)
            }
            SiteMessage::Decline {
                study,
                round,
                reason,
            } => {
                recv_end(&mut recv).await.unwrap();
                Answer::Decline(study, round, reason)
            }
            SiteMessage::Evaluation {
                study,
                round,
                values,
            } => {
                recv_end(&mut recv).await.unwrap();
                Answer::Evaluation(study, round, values)
            }
            SiteMessage::Update {
                study,
                round,
                header,
            } => {
                let mut values = vec![0f32; spec().num_values()];
                fedpriv_common::quic_io::recv_tensor_body_accepting(
                    &mut recv,
                    &header,
                    &spec(),
                    &Dtype::ALL,
                    |off, chunk| values[off..off + chunk.len()].copy_from_slice(chunk),
                )
                .await
                .unwrap();
                Answer::Update(study, round, values)
            }
            SiteMessage::Hello { .. } => panic!("a second hello"),
        }
    }

    async fn announce(&self, ann: &StudyAnnouncement) -> Answer {
        self.send(
            &CoordinatorMessage::StudyAnnounced(Box::new(ann.clone())),
            None,
        )
        .await;
        self.answer().await
    }

    async fn task(&self, t: &Task, model: &[f32]) -> Answer {
        self.send(&CoordinatorMessage::Task(t.clone()), Some(model))
            .await;
        let a = self.answer().await;
        if let Answer::Decline(s, ..) | Answer::Update(s, ..) = &a {
            assert_eq!(s, &t.study, "the answer is about the task's study");
        }
        a
    }
}

/// Each update's norm must be at least what its noise alone gives (the noise of d values
/// has norm std * sqrt(d), within a few units of std): an un-noised clipped delta has norm
/// at most C, and an un-noised DP-SGD step at most lr * C * (drawn batch / expected batch).
fn assert_noised(ann: &StudyAnnouncement, update: &[f32]) {
    let d = update.len() as f64;
    let norm = fedpriv_common::model::l2_norm(update);
    let (std, clean_bound) = match &ann.local {
        LocalPlan::DpSgd {
            steps,
            expected_batch,
            learning_rate,
        } => {
            let lr = f64::from(*learning_rate);
            (
                lr / expected_batch * ann.noise_multiplier * ann.clip_norm * (*steps as f64).sqrt(),
                lr * ann.clip_norm * *steps as f64 * 4.0,
            )
        }
        LocalPlan::Sgd { .. } => (ann.noise_multiplier * ann.clip_norm, ann.clip_norm),
    };
    let floor = std * (d.sqrt() - 6.0);
    assert!(
        floor > 2.0 * clean_bound,
        "test setup: noise must dominate ({floor} vs {clean_bound})"
    );
    assert!(
        norm >= floor,
        "{}: update norm {norm} is below its noise floor {floor}: un-noised?",
        ann.study
    );
}

fn write_site(dir: &Path, addr: std::net::SocketAddr, ca: &pki::CaBundle) -> SiteConfig {
    let cert =
        pki::issue_identity_cert(ca, &Identity::new(Role::Site, "st-marys").unwrap(), 1).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("site.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("site.key"), &cert.key_pem).unwrap();
    let mut csv = String::from("a,b,y\n");
    for i in 0..TRUE_ROWS {
        let a = (i % 97) as f32 / 97.0;
        let b = ((i * 31) % 89) as f32 / 44.5 - 1.0;
        csv.push_str(&format!("{a},{b},{}\n", usize::from(a + b > 0.5)));
    }
    std::fs::write(dir.join("patients.csv"), csv).unwrap();
    let pins = |id: &str, unit: &str, extra: &str| {
        format!(
            "[studies.{id}]\nsource = \"wards\"\nepsilon_cap = 100.0\nunit = \"{unit}\"\ntask = \"binary\"\n\
             label = \"y\"\nfeatures = [\"a\", \"b\"]\nclip_norm = 1.0\nmax_delta = 1e-6\n{extra}\n"
        )
    };
    let toml = format!(
        "[site]\nname = \"st-marys\"\nstate_dir = \"state\"\naccountant = \"rdp\"\n\n\
         [coordinator]\naddress = \"{addr}\"\nserver_name = \"localhost\"\n\n\
         [tls]\nca = \"ca.pem\"\ncert = \"site.pem\"\nkey = \"site.key\"\n\n\
         [sources.wards]\npath = \"patients.csv\"\nrecords = {DECLARED}\ndelta = 1e-5\nepsilon_cap = 25.0\n\n{}{}{}{}",
        pins(
            "rec",
            "record",
            "min_noise_multiplier = 1.0\nmax_sample_rate = 0.03\nmax_steps_per_round = 2"
        ),
        pins("loc", "site", "min_noise_multiplier = 2.0"),
        pins(
            "ev",
            "record",
            "min_noise_multiplier = 1.0\nmax_sample_rate = 0.03\nmax_steps_per_round = 2\nevaluation = { holdout = 0.2, min_noise_multiplier = 4.0 }"
        ),
        pins(
            "cen",
            "site",
            "min_noise_multiplier = 2.0\nplacements = [\"central\"]"
        ),
    );
    std::fs::write(dir.join("site.toml"), toml).unwrap();
    SiteConfig::load(&dir.join("site.toml")).unwrap()
}

/// A real site daemon dialled in to the hostile coordinator of this test.
struct Started {
    dir: tempfile::TempDir,
    endpoint: quinn::Endpoint,
    cfg: SiteConfig,
    _stop: watch::Sender<bool>,
    daemon: tokio::task::JoinHandle<Result<(), fedpriv_client::daemon::DaemonError>>,
    peer: Peer,
}

async fn start() -> Started {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("hostile test CA", 1).unwrap();
    let server = pki::issue_server_cert(&ca, &["localhost".into()], &[], 1).unwrap();
    let tls = pki::server_config(
        ca.cert_pem.as_bytes(),
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
        &[],
    )
    .unwrap();
    let endpoint = make_server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        &TransportLimits::default(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let cfg = write_site(dir.path(), addr, &ca);

    let (stop, stop_rx) = watch::channel(false);
    let daemon = tokio::spawn(fedpriv_client::daemon::run(cfg.clone(), stop_rx));
    let incoming = tokio::time::timeout(WAIT, endpoint.accept())
        .await
        .unwrap()
        .unwrap();
    let authed = accept(incoming).await.unwrap();
    assert_eq!(authed.identity.name, "st-marys");
    let peer = Peer {
        conn: authed.conn.clone(),
    };
    let mut hello = peer.conn.accept_uni().await.unwrap();
    match recv_frame::<SiteMessage>(&mut hello).await.unwrap() {
        SiteMessage::Hello { version, .. } => assert_eq!(version, PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }
    recv_end(&mut hello).await.unwrap();

    Started {
        dir,
        endpoint,
        cfg,
        _stop: stop,
        daemon,
        peer,
    }
}

/// Ends every study the site serves; the daemon then stops on its own (no signal). Returns
/// its ledger, read-only.
async fn end_every_study(
    peer: &Peer,
    cfg: &SiteConfig,
    daemon: tokio::task::JoinHandle<Result<(), fedpriv_client::daemon::DaemonError>>,
    endpoint: quinn::Endpoint,
) -> fedpriv_client::store::SiteLedger {
    for study in cfg.studies.keys() {
        peer.send(
            &CoordinatorMessage::StudyEnded {
                study: study.clone(),
                reason: "done".into(),
            },
            None,
        )
        .await;
    }
    tokio::time::timeout(WAIT, daemon)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    endpoint.close(0u32.into(), b"done");
    fedpriv_client::store::SiteLedger::open_read_only(cfg.state_dir.join("site-ledger.db")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_coordinator_cannot_bend_the_sites_guarantee() {
    let Started {
        dir: _dir,
        endpoint,
        cfg,
        _stop,
        daemon,
        peer,
    } = start().await;
    let rec = announcement("rec", PrivacyUnit::Record, Placement::Local);
    let loc = announcement("loc", PrivacyUnit::Site, Placement::Local);
    let cen = announcement("cen", PrivacyUnit::Site, Placement::Central);
    peer.send(
        &CoordinatorMessage::Welcome {
            version: PROTOCOL_VERSION,
            studies: vec![rec.clone()],
        },
        None,
    )
    .await;
    // The declared count, never the file's.
    match peer.answer().await {
        Answer::Ready(s, records) => assert_eq!((s.as_str(), records), ("rec", DECLARED)),
        other => panic!("{other:?}"),
    }
    let mut deviations = 0usize;
    let mut paid: Vec<(StudyAnnouncement, u64, Vec<f32>)> = Vec::new();

    // Announcements outside the pinned terms.
    let mut bad = Vec::new();
    let mut a = rec.clone();
    a.placement = Placement::Central;
    bad.push(("placement flip", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.noise_multiplier = 0.5;
    bad.push(("lower sigma", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.local = LocalPlan::DpSgd {
        steps: 1,
        expected_batch: 13.0,
        learning_rate: 0.5,
    };
    bad.push(("higher q", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.local = LocalPlan::DpSgd {
        steps: 3,
        expected_batch: 10.0,
        learning_rate: 0.5,
    };
    bad.push(("more steps", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.delta = 1e-5;
    bad.push(("larger delta", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.data.features.push("ssn".into());
    a.data.ranges.push([0.0, 1.0]);
    a.data.fills.push(None);
    bad.push(("new column", a, DeclineReason::TermsDiffer));
    let mut a = loc.clone();
    a.placement = Placement::Central;
    bad.push(("central without opt-in", a, DeclineReason::TermsDiffer));
    let mut a = rec.clone();
    a.study = "other".into();
    bad.push(("not enrolled", a, DeclineReason::NotEnrolled));
    for (what, ann, want) in &bad {
        match peer.announce(ann).await {
            Answer::Unable(s, reason) => {
                assert_eq!((&s, reason), (&ann.study, *want), "{what}");
            }
            other => panic!("{what}: {other:?}"),
        }
        deviations += 1;
    }

    // A model the transport refuses (NaN) and one out of bounds: refused before any spend.
    let zeros = vec![0f32; spec().num_values()];
    let mut nan = zeros.clone();
    nan[3] = f32::NAN;
    let mut huge = zeros.clone();
    huge[3] = 1e30;
    for (what, model) in [("NaN model", &nan), ("huge model", &huge)] {
        match peer.task(&task(&rec, 1), model).await {
            Answer::Decline(_, 1, DeclineReason::InvalidTask) => {}
            other => panic!("{what}: {other:?}"),
        }
        deviations += 1;
    }
    // A task whose terms differ from the announcement, and an under-priced one.
    let mut t = task(&rec, 1);
    t.noise_multiplier = 0.5;
    match peer.task(&t, &zeros).await {
        Answer::Decline(_, 1, DeclineReason::TermsDiffer) => {}
        other => panic!("lower sigma task: {other:?}"),
    }
    deviations += 1;
    let mut t = task(&rec, 1);
    t.cost = SgmEvent::new(t.cost.q.get() / 10.0, t.cost.sigma.get(), t.cost.steps).unwrap();
    match peer.task(&t, &zeros).await {
        Answer::Decline(_, 1, DeclineReason::InvalidTask) => {}
        other => panic!("under-priced task: {other:?}"),
    }
    deviations += 1;
    // A task for a study the site never accepted.
    match peer.task(&task(&loc, 1), &zeros).await {
        Answer::Decline(_, 1, DeclineReason::TermsDiffer) => {}
        other => panic!("task before its announcement: {other:?}"),
    }
    deviations += 1;

    // An honest round, then a crafted model meant to make some records' arithmetic blow up
    // (saturated hidden units on `a > 0.5`, huge output weights): a noised update either way.
    match peer.task(&task(&rec, 1), &zeros).await {
        Answer::Update(s, 1, u) => {
            assert_eq!(s, "rec");
            assert_noised(&rec, &u);
            paid.push((rec.clone(), 1, u));
        }
        other => panic!("honest round: {other:?}"),
    }
    let mut crafted = zeros.clone();
    for h in 0..HIDDEN {
        crafted[2 * h] = 1e6; // hidden.weight[h][a]
        crafted[2 * HIDDEN + h] = -0.5e6; // hidden.bias[h]
        crafted[3 * HIDDEN + h] = 1e6; // out.weight[0][h]
    }
    match peer.task(&task(&rec, 2), &crafted).await {
        Answer::Update(_, 2, u) => {
            assert_noised(&rec, &u);
            paid.push((rec.clone(), 2, u));
        }
        other => panic!("crafted model: {other:?}"),
    }
    // Replays of a paid round, with the same or another model.
    for model in [&zeros, &crafted] {
        match peer.task(&task(&rec, 2), model).await {
            Answer::Decline(_, 2, DeclineReason::AlreadyPaid) => {}
            other => panic!("replay: {other:?}"),
        }
        deviations += 1;
    }
    // Terms changed after the spend, even within the pins: refused, and a task under them
    // too; the old terms still work.
    let mut changed = rec.clone();
    changed.delta = 5e-7;
    match peer.announce(&changed).await {
        Answer::Unable(_, DeclineReason::TermsDiffer) => {}
        other => panic!("re-announcement after spend: {other:?}"),
    }
    deviations += 1;
    match peer.task(&task(&changed, 3), &zeros).await {
        Answer::Decline(_, 3, DeclineReason::TermsDiffer) => {}
        other => panic!("task under changed terms: {other:?}"),
    }
    deviations += 1;
    match peer.task(&task(&rec, 3), &zeros).await {
        Answer::Update(_, 3, u) => {
            assert_noised(&rec, &u);
            paid.push((rec.clone(), 3, u));
        }
        other => panic!("old terms: {other:?}"),
    }
    // Another run of the same study id (a coordinator with fresh state, whose rounds start
    // at 1 again): refused as a whole at its announcement (the prepared run stays; a task
    // carries no run of its own, so tasks are paid under the prepared run only).
    let mut rerun = rec.clone();
    rerun.instance = "run-2".into();
    match peer.announce(&rerun).await {
        Answer::Unable(_, DeclineReason::OtherInstance) => {}
        other => panic!("another run: {other:?}"),
    }
    deviations += 1;

    // The central study the site opted into: clipped, un-noised deltas (norm at most C).
    match peer.announce(&cen).await {
        Answer::Ready(..) => {}
        other => panic!("{other:?}"),
    }
    match peer.task(&task(&cen, 1), &zeros).await {
        Answer::Update(_, 1, u) => {
            assert!(fedpriv_common::model::l2_norm(&u) <= 1.0 + 1e-5);
            paid.push((cen.clone(), 1, u));
        }
        other => panic!("{other:?}"),
    }
    // Site-unit rounds with local noise until the shared source's cap stops them: each
    // study's own cap (100) is far above the source's (25), so only the source binds.
    match peer.announce(&loc).await {
        Answer::Ready(..) => {}
        other => panic!("{other:?}"),
    }
    let mut over_cap = false;
    for round in 1..=20 {
        match peer.task(&task(&loc, round), &zeros).await {
            Answer::Update(_, r, u) => {
                assert_noised(&loc, &u);
                paid.push((loc.clone(), r, u));
            }
            Answer::Decline(_, _, DeclineReason::OverCap) => {
                over_cap = true;
                deviations += 1;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(over_cap, "the source's cap never bound");
    // Another study on the same source fits only what is left of the source's cap.
    match peer.task(&task(&rec, 4), &zeros).await {
        Answer::Decline(_, 4, DeclineReason::OverCap) => deviations += 1,
        Answer::Update(_, 4, u) => {
            assert_noised(&rec, &u);
            paid.push((rec.clone(), 4, u));
        }
        other => panic!("{other:?}"),
    }

    // Every study it serves has ended: the daemon stops on its own (no signal), instead of
    // dialling a coordinator that has nothing more for it.
    let ledger = end_every_study(&peer, &cfg, daemon, endpoint).await;
    // The ledger against an independent recomputation: every update paid for exactly.
    let mut source_events = Vec::new();
    for (ann, round, _) in &paid {
        let (study_event, source_event) = independent_price(ann);
        let rows = ledger.spends(&ann.study).unwrap();
        let row = rows
            .iter()
            .find(|r| r.round == *round)
            .unwrap_or_else(|| panic!("{} round {round} sent but not paid", ann.study));
        assert_eq!(row.event, study_event, "{} round {round}", ann.study);
        source_events.push(source_event);
    }
    let charged: usize = ["rec", "loc", "cen"]
        .iter()
        .map(|s| ledger.spends(s).unwrap().len())
        .sum();
    assert!(charged >= paid.len());
    let recorded = ledger.source_events("wards").unwrap();
    assert_eq!(recorded.len(), charged);
    let want = filter::level(&source_events, &filter::DEFAULT_ORDERS, 1e-5)
        .unwrap()
        .0;
    let got = ledger.source_level("wards").unwrap();
    assert!(
        got >= want - 1e-9,
        "source level {got} below recomputed {want}"
    );
    assert!(got <= 25.0, "source level {got} above its cap");
    // What `fedpriv-client ledger` shows: the same figures, per source and per study.
    let view = fedpriv_client::ledger_view::build(&cfg).unwrap();
    assert_eq!(view.sources.len(), 1);
    assert_eq!(view.sources[0].source, "wards");
    assert_eq!(view.sources[0].filter_level, got);
    assert_eq!(view.sources[0].studies, ["cen", "loc", "rec"]);
    assert!(view.sources[0].pld_epsilon.unwrap() < got);
    let rec_view = view.studies.iter().find(|s| s.study == "rec").unwrap();
    assert_eq!(rec_view.delta, Some(1e-6));
    assert!(rec_view.rounds_declined > 0 && rec_view.epsilon.unwrap() > 0.0);
    // What `fedpriv-client run --metrics-listen` serves: the same figures, per scrape.
    let prom = fedpriv_client::site_metrics::render(&cfg).unwrap();
    assert!(
        prom.contains(&format!(
            "fedpriv_site_source_epsilon{{source=\"wards\"}} {got}\n"
        )),
        "{prom}"
    );
    assert!(prom.contains("fedpriv_site_source_epsilon_cap{source=\"wards\"} 25\n"));
    let rec_paid = ledger.spends("rec").unwrap().len();
    assert!(prom.contains(&format!(
        "fedpriv_site_tasks_paid_total{{study=\"rec\"}} {rec_paid}\n"
    )));
    assert!(
        prom.contains("fedpriv_site_tasks_declined_total{study=\"rec\",reason=\"invalid_task\"}")
    );
    // Tasks declined before any payment (a malformed model, a study not yet accepted) are
    // in the ledger's refusals too, which `fedpriv-client inventory` counts.
    let reasons = |study: &str| -> Vec<String> {
        ledger
            .refusals(study)
            .unwrap()
            .into_iter()
            .map(|r| r.reason)
            .collect()
    };
    let rec_reasons = reasons("rec");
    assert!(
        rec_reasons.iter().filter(|r| *r == "invalid_task").count() >= 3,
        "{rec_reasons:?}"
    );
    assert!(reasons("loc").contains(&"terms_differ".to_string()));

    // Every deviation is on the site's record, and the record verifies.
    let log = fedpriv_client::daemon::audit_path(&cfg);
    let report = fedpriv_common::audit_file::verify_file(&log).unwrap();
    assert!(report.is_ok(), "{report}");
    let text = std::fs::read_to_string(&log).unwrap();
    let refusals: Vec<serde_json::Value> = text
        .lines()
        .map(|l| fedpriv_common::audit::decode_line(l).unwrap())
        .filter(|r| r.event == fedpriv_common::audit::AuditEvent::Refused)
        .map(|r| r.details)
        .collect();
    assert_eq!(refusals.len(), deviations, "{refusals:#?}");
    for r in &refusals {
        assert!(r["detail"].as_str().is_some_and(|d| !d.is_empty()), "{r}");
    }
}

/// DP evaluation against a hostile coordinator, with a real site daemon: an evaluation asked
/// for off the announced plan, left out where it is due, priced with less noise, or under
/// terms with less evaluation noise than the site pinned, is refused before anything is
/// paid or sent; an honest evaluation round sends the noised vector, then the update, both
/// paid in the site's ledger (study and source) before they leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_coordinator_gets_no_evaluation_off_the_plan() {
    let Started {
        dir: _dir,
        endpoint,
        cfg,
        _stop,
        daemon,
        peer,
    } = start().await;
    let mut ev = announcement("ev", PrivacyUnit::Record, Placement::Local);
    ev.evaluation = Some(fedpriv_common::evaluation::EvaluationPlan {
        every: 1,
        noise_multiplier: fedpriv_common::dp::NoiseMultiplier::new(5.0).unwrap(),
        loss_clip: 1.0,
    });
    let zeros = vec![0f32; spec().num_values()];
    peer.send(
        &CoordinatorMessage::Welcome {
            version: PROTOCOL_VERSION,
            studies: Vec::new(),
        },
        None,
    )
    .await;
    // Less evaluation noise than the site pinned (4): refused at the announcement.
    let mut weak = ev.clone();
    weak.evaluation = weak.evaluation.map(|mut e| {
        e.noise_multiplier = fedpriv_common::dp::NoiseMultiplier::new(3.0).unwrap();
        e
    });
    match peer.announce(&weak).await {
        Answer::Unable(_, DeclineReason::TermsDiffer) => {}
        other => panic!("weak evaluation noise: {other:?}"),
    }
    match peer.announce(&ev).await {
        Answer::Ready(s, _) => assert_eq!(s, "ev"),
        other => panic!("{other:?}"),
    }
    let plan = ev.evaluation.unwrap();
    // Round 1 carries no evaluation: one asked for there is refused unpaid.
    let mut t = task(&ev, 1);
    t.evaluation = Some(plan.event());
    match peer.task(&t, &zeros).await {
        Answer::Decline(_, 1, DeclineReason::InvalidTask) => {}
        other => panic!("off-plan evaluation: {other:?}"),
    }
    // Round 2 does: leaving it out, or pricing it with less noise, is refused unpaid.
    let mut t = task(&ev, 2);
    t.evaluation = None;
    match peer.task(&t, &zeros).await {
        Answer::Decline(_, 2, DeclineReason::InvalidTask) => {}
        other => panic!("evaluation left out: {other:?}"),
    }
    let mut t = task(&ev, 2);
    t.evaluation = Some(SgmEvent::new(1.0, 2.0, 1).unwrap());
    match peer.task(&t, &zeros).await {
        Answer::Decline(_, 2, DeclineReason::InvalidTask) => {}
        other => panic!("under-priced evaluation: {other:?}"),
    }
    // The honest round: the vector first, then the update.
    let t = task(&ev, 2);
    assert_eq!(t.evaluation, Some(plan.event()));
    peer.send(&CoordinatorMessage::Task(t.clone()), Some(&zeros))
        .await;
    match peer.answer().await {
        Answer::Evaluation(s, 2, v) => {
            assert_eq!(s, "ev");
            assert_eq!(v.len(), 6);
            assert!(v.iter().all(|x| x.is_finite()));
        }
        other => panic!("the evaluation: {other:?}"),
    }
    match peer.answer().await {
        Answer::Update(_, 2, u) => assert_noised(&ev, &u),
        other => panic!("the update: {other:?}"),
    }
    // A replay of the round gets neither again.
    match peer.task(&task(&ev, 2), &zeros).await {
        Answer::Decline(_, 2, DeclineReason::AlreadyPaid) => {}
        other => panic!("replay: {other:?}"),
    }
    let ledger = end_every_study(&peer, &cfg, daemon, endpoint).await;
    assert_eq!(ledger.spends("ev").unwrap().len(), 1);
    assert_eq!(
        ledger.evaluation_spends("ev").unwrap(),
        vec![(2, plan.event())]
    );
    // Training and evaluation, both at the source.
    assert_eq!(ledger.source_events("wards").unwrap().len(), 2);
}
