//! Streaming aggregation through the real server, end to end over loopback QUIC: a site
//! whose update breaks the norm bound part-way through (after earlier chunks were already
//! folded into the round's aggregate) is refused, what it folded is taken back out from its
//! spool (held in memory, in its sealed file, or part in each), and when it then sends a
//! proper update the round's model is exactly what the two good updates make.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use fedpriv_client::transport::{client_endpoint, connect};
use fedpriv_common::arch;
use fedpriv_common::config::StudyConfig;
use fedpriv_common::model::Architecture;
use fedpriv_common::protocol::{CoordinatorMessage, SiteMessage, PROTOCOL_VERSION};
use fedpriv_common::quic_io::{self, TransportLimits};
use fedpriv_coordinator::limits::Limits;
use fedpriv_coordinator::server::{self, Notification, Options};

#[path = "support/test_pki.rs"]
mod test_pki;
use fedpriv_common::test_util::StudyBuilder as Study;

const HIDDEN: usize = 1000;
const FEATURES: usize = 98;

/// A small, exactly representable update that differs per site.
fn good_update(d: usize, salt: usize) -> Vec<f32> {
    (0..d)
        .map(|i| ((i * 31 + salt * 7) % 17) as f32 / 4096.0 - 0.002)
        .collect()
}

async fn site(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    name: &'static str,
    updates: Vec<Vec<f32>>,
) -> Result<(), String> {
    let ep = client_endpoint(
        tls,
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        &TransportLimits::site(),
    )
    .map_err(|e| e.to_string())?;
    let conn = connect(&ep, addr, "localhost")
        .await
        .map_err(|e| e.to_string())?;
    let hello = SiteMessage::Hello {
        version: PROTOCOL_VERSION,
        claimed_site: name.into(),
    };
    quic_io::send_message(&conn, &hello, None)
        .await
        .map_err(|e| e.to_string())?;
    let spec =
        arch::model_spec(&Architecture::mlp(HIDDEN), FEATURES, 1).map_err(|e| e.to_string())?;
    loop {
        let mut recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
        let msg: CoordinatorMessage = quic_io::recv_frame(&mut recv)
            .await
            .map_err(|e| e.to_string())?;
        match msg {
            CoordinatorMessage::Welcome { studies, .. } => {
                for ann in studies {
                    let ready = SiteMessage::Ready {
                        study: ann.study,
                        records: 100,
                    };
                    quic_io::send_message(&conn, &ready, None)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            CoordinatorMessage::Task(task) => {
                quic_io::recv_tensor_body(&mut recv, &task.header, &spec, |_, _| {})
                    .await
                    .map_err(|e| e.to_string())?;
                // Every update in turn, each on its own stream, for the same round.
                for u in &updates {
                    let msg = SiteMessage::Update {
                        study: task.study.clone(),
                        round: task.round,
                        header: task.header.clone(),
                    };
                    quic_io::send_message(&conn, &msg, Some(u))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            CoordinatorMessage::StudyEnded { .. } | CoordinatorMessage::Refused { .. } => break,
            // Studies created at runtime: not this scenario's.
            CoordinatorMessage::StudyAnnounced(_) => {}
        }
    }
    conn.close(0u32.into(), b"done");
    Ok(())
}

/// The refused upload's folded part is held in memory (the default budget has room for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_leaves_no_trace_in_the_aggregate() {
    refused_upload_is_taken_back_out(Limits::default()).await;
}

/// No spool memory: every upload goes to its sealed file and is read back from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_taken_back_out_of_its_sealed_file() {
    refused_upload_is_taken_back_out(Limits {
        upload_spool_memory: 0,
        ..Limits::default()
    })
    .await;
}

/// Room for one slab (256 KiB, two chunks): the refused upload's first two chunks come back
/// from memory, its third from its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_is_taken_back_out_of_memory_and_file() {
    refused_upload_is_taken_back_out(Limits {
        upload_spool_memory: 2 * server::UPLOAD_CHUNK_VALUES * 4,
        ..Limits::default()
    })
    .await;
}

async fn refused_upload_is_taken_back_out(limits: Limits) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = test_pki::ca("test CA");
    let server_tls = test_pki::server_tls(&ca);
    let site_tls = |name: &str| test_pki::site_tls(&ca, name);
    let text = Study::new("stream")
        .mlp(HIDDEN)
        .features(FEATURES)
        .enrolled(["good", "flaky"])
        .toml();
    let cfg = StudyConfig::from_toml(&text).expect("study");
    let spec = arch::model_spec(&cfg.model, FEATURES, 1).expect("spec");
    let d = spec.num_values();
    let chunk = server::UPLOAD_CHUNK_VALUES;
    assert!(d > 3 * chunk + 100, "the update must span several chunks");

    // The flaky site's first update: small values (so its first chunks pass every check
    // and are folded), then one value that breaks the norm bound in its fourth chunk.
    let mut bad = vec![0.01f32; d];
    bad[3 * chunk + 100] = 1e5;
    let good = good_update(d, 1);
    let flaky_good = good_update(d, 2);
    let init = arch::init_model(&cfg.model, FEATURES, 1, 0)
        .expect("init")
        .values;
    let want: Vec<f32> = (0..d)
        .map(|i| init[i] + (good[i] + flaky_good[i]) * 0.5)
        .collect();

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
        at_rest_key: std::sync::Arc::clone(&at_rest_key),
    };
    let state_dir = opts.state_dir.clone();
    let study_id = opts.studies[0].0.id.clone();
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (note_tx, mut note_rx) = tokio::sync::mpsc::unbounded_channel();
    let running = server::start(opts, limits, stop_rx, Some(note_tx), true)
        .await
        .expect("coordinator starts");
    let addr = running.addr;
    let coordinator = tokio::spawn(running.finished());
    let a = tokio::spawn(site(addr, site_tls("good"), "good", vec![good]));
    let b = tokio::spawn(site(
        addr,
        site_tls("flaky"),
        "flaky",
        vec![bad, flaky_good],
    ));

    let (round, model) = loop {
        match tokio::time::timeout(Duration::from_secs(60), note_rx.recv()).await {
            Ok(Some(Notification::RoundCompleted {
                round,
                model,
                contributors,
                ..
            })) => {
                assert_eq!(contributors, vec!["flaky".to_string(), "good".to_string()]);
                break (round, model);
            }
            Ok(Some(Notification::RoundAborted { reason, .. })) => panic!("aborted: {reason}"),
            Ok(Some(_)) => {}
            other => panic!("no round completed: {other:?}"),
        }
    };
    // Exact up to f32 rounding of the sums and of taking the refused prefix back out.
    let worst = model
        .iter()
        .zip(&want)
        .map(|(m, w)| (m - w).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "model differs by up to {worst}");
    // Had the refused prefix stayed in, its first chunks would be off by 0.005.

    // The checkpoint is sealed at rest: no plaintext model bytes or safetensors header on
    // disk; it opens, with the key, to exactly the model.
    let path = server::model_path(&state_dir, &study_id, round);
    let sealed = std::fs::read(&path).expect("checkpoint");
    assert!(sealed.starts_with(fedpriv_common::seal::STREAM_MAGIC));
    assert!(!sealed.windows(12).any(|w| w == b"__metadata__"));
    let needle: Vec<u8> = model[1000..1016]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert!(
        !sealed.windows(needle.len()).any(|w| w == &needle[..]),
        "plaintext model on disk"
    );
    let mut plain = Vec::new();
    server::read_checkpoint(&at_rest_key, &path, &study_id, round, None, &mut plain)
        .expect("opens with the key");
    let back = fedpriv_common::model::FlatModel::from_safetensors_bytes(&plain, Some(&spec))
        .expect("safetensors");
    assert_eq!(back.values, model[..]);
    let _ = tokio::time::timeout(Duration::from_secs(30), coordinator).await;
    for s in [a, b] {
        let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
    }
}
