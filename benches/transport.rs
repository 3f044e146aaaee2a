//! Throughput of one large model transfer over loopback QUIC with mutual TLS: the fedpriv
//! path (control frame + tensor header, body streamed through `TensorBodyDecoder` into a
//! sink) against a plain quinn transfer of the same bytes on the same connection setup.
//! Prints one JSON line.
//!
//! `cargo bench --bench transport` (400 MB); `FEDPRIV_BENCH_MB=50` for a quicker run.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedpriv_client::transport::{client_endpoint, connect};
use fedpriv_common::model::{ModelSpec, TensorSpec};
use fedpriv_common::pki::{self, Identity, Role};
use fedpriv_common::wire::{Dtype, TensorHeader};
use fedpriv_coordinator::transport::{
    accept, make_server_endpoint, recv_frame, recv_tensor_body, send_message, TransportLimits,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    Update { round: u64, header: TensorHeader },
}

/// Runs of each path after one warm-up of each; the median is reported.
const RUNS: usize = 5;

/// Whether transfer `i` takes the fedpriv path. Pairs alternate which path goes first, so
/// neither always profits from a warmer cache or a quieter moment.
fn is_fedpriv(i: usize) -> bool {
    (i & 1 == 0) == (i & 2 == 0)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let mb: usize = std::env::var("FEDPRIV_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(bench(mb))
}

async fn bench(mb: usize) -> Result<(), BoxError> {
    // Two tensors, `mb` MB of f32 in all (MB = 10^6 bytes).
    let values_total = mb * 1_000_000 / 4;
    let half = (values_total / 2) as u64;
    let spec = ModelSpec::new(vec![
        TensorSpec::new("layer.0.weight", &[half / 1000, 1000]),
        TensorSpec::new("layer.1.weight", &[half / 1000, 1000]),
    ])?;
    let n = spec.num_values();
    let bytes_total = (n * 4) as f64;
    let values: Vec<f32> = (0..n).map(|i| (i % 1021) as f32 * 1e-3).collect();

    let ca = pki::generate_ca("bench CA", 1)?;
    let server = pki::issue_server_cert(&ca, &["localhost".into()], &[], 1)?;
    let site = pki::issue_identity_cert(&ca, &Identity::new(Role::Site, "bench")?, 1)?;
    let server_tls = pki::server_config(
        ca.cert_pem.as_bytes(),
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
        &[],
    )?;
    let client_tls = pki::client_config(
        ca.cert_pem.as_bytes(),
        site.cert_pem.as_bytes(),
        site.key_pem.as_bytes(),
    )?;
    let endpoint = make_server_endpoint(
        "127.0.0.1:0".parse()?,
        server_tls,
        &TransportLimits::default(),
    )?;
    let addr: SocketAddr = endpoint.local_addr()?;
    let client = client_endpoint(client_tls, "127.0.0.1:0".parse()?, &TransportLimits::site())?;

    let server_task = {
        let endpoint = endpoint.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
            let peer = accept(incoming).await.map_err(|r| r.to_string())?;
            let mut done = Vec::new();
            for i in 0..2 * (RUNS + 1) {
                let mut recv = peer.conn.accept_uni().await?;
                let mut received = 0usize;
                if is_fedpriv(i) {
                    let Msg::Update { header, .. } = recv_frame(&mut recv).await?;
                    recv_tensor_body(&mut recv, &header, &spec, |_, v| {
                        received += black_box(v).len() * 4;
                    })
                    .await?;
                } else {
                    while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                        received += black_box(&chunk.bytes).len();
                    }
                }
                done.push((Instant::now(), received));
            }
            Ok::<_, BoxError>(done)
        })
    };

    let conn = connect(&client, addr, "localhost").await?;
    let header = TensorHeader::for_spec(&spec, Dtype::F32);
    let raw = fedpriv_common::wire::f32_body_bytes(&values);
    let mut starts = Vec::new();
    for i in 0..2 * (RUNS + 1) {
        let t0 = Instant::now();
        if is_fedpriv(i) {
            let msg = Msg::Update {
                round: i as u64,
                header: header.clone(),
            };
            send_message(&conn, &msg, Some(&values)).await?;
        } else {
            let mut send = conn.open_uni().await?;
            for chunk in raw.chunks(1 << 20) {
                send.write_all(chunk).await?;
            }
            send.finish()?;
            send.stopped().await?;
        }
        starts.push(t0);
    }
    let done = tokio::time::timeout(Duration::from_secs(600), server_task).await???;

    let mut fedpriv = Vec::new();
    let mut plain = Vec::new();
    for (i, (t0, (t1, received))) in starts.iter().zip(&done).enumerate() {
        if *received != n * 4 {
            return Err(format!("run {i} received {received} of {} bytes", n * 4).into());
        }
        let mbps = bytes_total / 1e6 / t1.duration_since(*t0).as_secs_f64();
        // Transfers 0 and 1 are warm-ups.
        if i >= 2 {
            if is_fedpriv(i) {
                fedpriv.push(mbps);
            } else {
                plain.push(mbps);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let f = median(&mut fedpriv);
    let p = median(&mut plain);
    let (f_best, p_best) = (fedpriv[RUNS - 1], plain[RUNS - 1]);
    let decoder = decoder_mb_per_s(&spec, &raw)?;
    let round1 = |x: f64| (x * 10.0).round() / 10.0;
    let line = serde_json::json!({
        "bench": "transport",
        "bytes": n * 4,
        "runs": RUNS,
        "fedpriv_mb_per_s": round1(f),
        "plain_quinn_mb_per_s": round1(p),
        "overhead_percent": round1((p - f) / p * 100.0),
        "fedpriv_best_mb_per_s": round1(f_best),
        "plain_quinn_best_mb_per_s": round1(p_best),
        "overhead_best_percent": round1((p_best - f_best) / p_best * 100.0),
        // The decoder alone, on unaligned packet-sized chunks: its share of a transfer.
        "decoder_only_mb_per_s": round1(decoder),
        "decoder_share_percent": round1(f / decoder * 100.0),
        "fedpriv_runs_mb_per_s": fedpriv,
        "plain_runs_mb_per_s": plain,
    });
    println!("{line}");
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    Ok(())
}

/// Throughput of `TensorBodyDecoder` alone over `raw`, fed in 1,451-byte pieces (about one
/// QUIC packet, odd so that values straddle pieces and most pieces are unaligned).
fn decoder_mb_per_s(spec: &ModelSpec, raw: &[u8]) -> Result<f64, BoxError> {
    let header = TensorHeader::for_spec(spec, Dtype::F32);
    let t0 = Instant::now();
    let mut decoder = fedpriv_common::wire::TensorBodyDecoder::new(&header, spec)?;
    let mut seen = 0usize;
    let mut sink = |_: usize, v: &[f32]| seen += black_box(v).len();
    for piece in raw.chunks(1451) {
        decoder.feed(piece, &mut sink)?;
    }
    decoder.finish()?;
    let secs = t0.elapsed().as_secs_f64();
    if seen * 4 != raw.len() {
        return Err("decoder lost values".into());
    }
    Ok(raw.len() as f64 / 1e6 / secs)
}
