//! A study with `encoding = "bf16"`, end to end over loopback QUIC with real certificates:
//! the coordinator broadcasts the model in bf16, sites that accept nothing but bf16 receive
//! it and answer in bf16, and the coordinator aggregates in f32. Each round's model must be
//! the f32 aggregate of the bf16-rounded updates (not of the values the sites started
//! from), and the next round's broadcast must be that model rounded to bf16.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fedpriv_client::transport::{client_endpoint, connect};
use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::model::Architecture;
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_common::wire::{bf16_to_f32, f32_to_bf16, Dtype};
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::server::{self, Notification, Options};

#[path = "support/test_pki.rs"]
mod test_pki;
use fedpriv_common::test_util::StudyBuilder as Study;

const HIDDEN: usize = 10_000;
const FEATURES: usize = 8;
const ROUNDS: u64 = 2;

fn bf16(v: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(v))
}

/// A site's update for a round: values of a few 1e-3 that bf16 cannot hold exactly (its
/// 8-bit mantissa: errors up to ~1e-5 here), so that rounding them moves the aggregate
/// measurably.
fn update(d: usize, salt: usize, round: u64) -> Vec<f32> {
    (0..d)
        .map(|i| {
            let k = (i * 31 + salt * 7 + round as usize * 13) % 997;
            (k as f32 - 498.0) * 8.0e-6 + 4.0e-3 / 3.0
        })
        .collect()
}

/// A site that accepts the model only in bf16 and answers every task in bf16. Returns the
/// model each task carried, in round order.
async fn site(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    name: &'static str,
    salt: usize,
) -> Result<Vec<Vec<f32>>, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let ep = client_endpoint(
        tls,
        "127.0.0.1:0".parse().map_err(|x| e(&x))?,
        &TransportLimits::site(),
    )
    .map_err(|x| e(&x))?;
    let conn = connect(&ep, addr, "localhost").await.map_err(|x| e(&x))?;
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: name.into(),
    };
    quic_io::send_message(&conn, &hello, None)
        .await
        .map_err(|x| e(&x))?;
    let spec = arch::model_spec(&Architecture::mlp(HIDDEN), FEATURES, 1).map_err(|x| e(&x))?;
    let d = spec.num_values();
    let mut received = Vec::new();
    loop {
        let Ok(mut recv) = conn.accept_uni().await else {
            break;
        };
        let msg: CoordinatorMessage = quic_io::recv_frame(&mut recv).await.map_err(|x| e(&x))?;
        match msg {
            CoordinatorMessage::Welcome { studies, .. } => {
                for ann in studies {
                    let ready = SiteMessage::Ready {
                        study: ann.study,
                        records: 100,
                    };
                    quic_io::send_message(&conn, &ready, None)
                        .await
                        .map_err(|x| e(&x))?;
                }
            }
            CoordinatorMessage::Task(task) => {
                if task.header.dtype != Dtype::Bf16 {
                    return Err(format!("task in {:?}, not bf16", task.header.dtype));
                }
                let mut model = vec![f32::NAN; d];
                quic_io::recv_tensor_body_accepting(
                    &mut recv,
                    &task.header,
                    &spec,
                    &[Dtype::Bf16],
                    |off, chunk| model[off..off + chunk.len()].copy_from_slice(chunk),
                )
                .await
                .map_err(|x| e(&x))?;
                received.push(model);
                let msg = SiteMessage::Update {
                    study: task.study.clone(),
                    round: task.round,
                    header: task.header.clone(),
                };
                let values = update(d, salt, task.round);
                quic_io::send_message_as(&conn, &msg, Some(&values), Dtype::Bf16)
                    .await
                    .map_err(|x| e(&x))?;
            }
            CoordinatorMessage::StudyEnded { .. } | CoordinatorMessage::Refused { .. } => break,
            CoordinatorMessage::StudyAnnounced(_) => {}
        }
    }
    conn.close(0u32.into(), b"done");
    Ok(received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_study_aggregates_the_rounded_updates_and_broadcasts_in_bf16() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = test_pki::ca("test CA");
    let server_tls = test_pki::server_tls(&ca);
    let site_tls = |name: &str| test_pki::site_tls(&ca, name);
    let text = Study::new("half")
        .mlp(HIDDEN)
        .features(FEATURES)
        .rounds(ROUNDS)
        .encoding("bf16")
        .noise(2.0, 80.0)
        .enrolled(["east", "west"])
        .toml();
    let cfg = StudyConfig::from_toml(&text).expect("study");
    assert_eq!(cfg.encoding, Dtype::Bf16);
    let spec = arch::model_spec(&cfg.model, FEATURES, 1).expect("spec");
    let d = spec.num_values();
    assert!(
        d > 2 * server::UPLOAD_CHUNK_VALUES,
        "updates must span several upload chunks"
    );
    let init = arch::init_model(&cfg.model, FEATURES, 1, 0)
        .expect("init")
        .values;

    // Port 0: the coordinator says which port it bound.
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let at_rest_key = std::sync::Arc::new(
        fedpriv_common::seal::SealKey::from_material(
            fedpriv_common::seal::generate_key_hex()
                .expect("random key")
                .as_bytes(),
        )
        .expect("key"),
    );
    let opts = Options {
        listen: addr,
        state_dir: dir.path().join("state"),
        tls: server_tls,
        studies: vec![(cfg, text)],
        max_concurrent_uploads: 2,
        at_rest_key,
    };
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel();
    let running = server::start(opts, Limits::default(), stop_rx, Some(note_tx), true)
        .await
        .expect("coordinator starts");
    let addr = running.addr;
    let coordinator = tokio::spawn(running.finished());
    let east = tokio::spawn(site(addr, site_tls("east"), "east", 1));
    let west = tokio::spawn(site(addr, site_tls("west"), "west", 2));

    let mut models = vec![init.clone()];
    while models.len() <= ROUNDS as usize {
        match tokio::time::timeout(Duration::from_secs(60), note_rx.recv()).await {
            Ok(Some(Notification::RoundCompleted { round, model, .. })) => {
                assert_eq!(round as usize, models.len());
                models.push(model.to_vec());
            }
            Ok(Some(Notification::RoundAborted { reason, .. })) => panic!("aborted: {reason}"),
            Ok(Some(_)) => {}
            other => panic!("no round completed: {other:?}"),
        }
    }
    let worst = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for round in 1..=ROUNDS {
        let before = &models[round as usize - 1];
        let after = &models[round as usize];
        // What the coordinator must compute: the mean of the updates as they arrived
        // (rounded to bf16), in f32, added to the previous model.
        let (a, b) = (update(d, 1, round), update(d, 2, round));
        let expected: Vec<f32> = (0..d)
            .map(|i| before[i] + (bf16(a[i]) + bf16(b[i])) * 0.5)
            .collect();
        let unrounded: Vec<f32> = (0..d).map(|i| before[i] + (a[i] + b[i]) * 0.5).collect();
        let err = worst(after, &expected);
        assert!(
            err < 1e-6,
            "round {round}: model off the bf16 aggregate by {err}"
        );
        // The check can tell: the sites' unrounded values would give another model.
        let gap = worst(after, &unrounded);
        assert!(
            gap > 1e-6,
            "round {round}: bf16 rounding left no trace ({gap})"
        );
    }
    for (name, site) in [("east", east), ("west", west)] {
        let received = tokio::time::timeout(Duration::from_secs(30), site)
            .await
            .expect("site ends")
            .expect("site task")
            .expect("site ran");
        assert_eq!(received.len(), ROUNDS as usize, "{name}: tasks received");
        for (r, got) in received.iter().enumerate() {
            // Round r+1's task carries round r's model, rounded to bf16 once.
            let want: Vec<f32> = models[r].iter().map(|&v| bf16(v)).collect();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: round {} broadcast is not the bf16 rounding of the model",
                r + 1
            );
            assert!(
                worst(got, &models[r]) > 0.0,
                "{name}: broadcast was not rounded"
            );
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), coordinator).await;
}

/// The real site daemons in a bf16 study: they train, clip and noise (DP-SGD), receive the
/// model in bf16 and answer in bf16; every round takes all three sites' updates (none is
/// refused for its encoding) and the model learns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_daemons_train_in_a_bf16_study() {
    use fedpriv::demo::{self, DemoOptions, SITES};
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = DemoOptions {
        rounds: 5,
        epsilon: 3.0,
        non_iid: false,
        // Every round needs all three sites: a refused bf16 update aborts it.
        min_sites: SITES.len(),
        encoding: Dtype::Bf16,
        ..DemoOptions::default()
    };
    let report = demo::run(dir.path(), &opts, |_| {})
        .await
        .expect("demo runs");
    assert_eq!(report.rounds.len(), 5, "ended: {}", report.end_reason);
    for r in &report.rounds {
        assert_eq!(
            r.sites.len(),
            SITES.len(),
            "round {}: {:?}",
            r.round,
            r.sites
        );
    }
    let store = fedpriv_coordinator::store::Store::open(report.state_dir.join("coordinator.db"))
        .expect("store");
    let row = store.study(&report.study_id).expect("read").expect("study");
    let cfg = fedpriv_common::config::StudyConfig::from_toml(&row.config_toml).expect("config");
    assert_eq!(cfg.encoding, Dtype::Bf16);
    assert!(
        report.final_accuracy > 0.8,
        "final accuracy {}",
        report.final_accuracy
    );
}
